"""Hypothesis strategies for differential fuzzing of ``paged_attention``.

Shared by the CPU fuzz (``test_fuzz_reference.py``: the NumPy reference against the naive loop)
and the GPU fuzz (``test_fuzz_gpu.py``: flash and mea against the reference, flash against mea).

Hypothesis draws a ``FuzzConfig``, the structure of one call (lengths, heads, block size,
options, how the block table is laid out), and shrinks it on failure. ``build_inputs`` turns a
config and a seed into arrays: the data, the physical block ids and which columns alias come
from NumPy's generator, so ``(config, seed)`` (printed in every failure message) reproduces an
example exactly. Every config is VALID input: a written cache slot belongs to exactly one
sequence; blocks are shared (aliased, even twice in one row) only where nobody writes them.
"""
import dataclasses
import math

import numpy as np
from hypothesis import strategies as st

try:
    from .paged_cases import Inputs
except ImportError:
    from paged_cases import Inputs


@dataclasses.dataclass(frozen=True)
class FuzzConfig:
    lens: tuple           # ((q_len, past), ...) per sequence; () is B = 0
    N: int                # num_heads
    Nkv: int              # kv_num_heads
    H: int                # head_size
    bs: int               # block_size
    packed: bool          # key = value = None, query (T, (N + 2 Nkv) H)
    rotary: str           # none | neox | gptj
    R: int                # rotary_dim (even, 2..H); unused without rotary
    W: int                # local_window_size
    softcap: float
    scale: float          # 0: 1/sqrt(H)
    q_gain: float         # query multiplier (> 1: big logits, softcap saturation)
    alias: float          # chance that a read-only column reuses an already used read-only block
    holes: float          # chance that a needed table column is -1
    unmapped_rows: tuple  # sequences whose whole table row is -1
    pad: str              # columns past a row's need: "neg1" (all -1) or "garbage" (any id)
    extra_cols: int       # table columns beyond the longest need
    spare: int            # physical blocks no sequence uses
    cos_extra: int        # cos/sin rows beyond the last position
    hints: str            # host bounds passed: none | exact | loose
    dtype: str = "float32"

    @property
    def kwargs(self):
        return {"num_heads": self.N, "kv_num_heads": self.Nkv, "scale": self.scale,
                "softcap": self.softcap, "local_window_size": self.W,
                "do_rotary": self.rotary != "none",
                "rotary_interleaved": self.rotary == "gptj"}


def _length(draw, small, large):
    """Mostly short (shrinks well, keeps the oracles fast), sometimes anywhere up to ``large``."""
    if large > small and draw(st.integers(0, 3)) == 0:
        return draw(st.integers(0, large))
    return draw(st.integers(0, small))


def fuzz_configs(*, head_sizes, dtypes, max_batch=5, small_q=4, max_q=6, small_past=12,
                 max_past=24, max_kv_heads=3, groups=(1, 2, 3, 4), max_heads=8,
                 block_sizes=(1, 2, 3, 4, 5, 7, 8, 12, 16, 32), windows=(2, 40),
                 bounded_logits=False):
    """Strategy of FuzzConfig.

    bounded_logits: keep |logits| about N(0, 1) unless a softcap bounds them. Kernels round the
    rotated q and k to fp16/bf16 while the float32 reference does not; with unbounded logits that
    legal difference grows with |logit| past the GPU tolerances (see tests/gpu_parity.py).
    """
    @st.composite
    def draw_config(draw):
        B = 0 if draw(st.integers(0, 9)) == 0 else draw(st.integers(1, max_batch))
        lens = tuple((_length(draw, small_q, max_q), _length(draw, small_past, max_past))
                     for _ in range(B))
        Nkv = draw(st.integers(1, max_kv_heads))
        group = draw(st.sampled_from([g for g in groups if g * Nkv <= max_heads] or [1]))
        H = draw(st.sampled_from(head_sizes))
        rotary = draw(st.sampled_from(["none", "neox", "gptj"]))
        R = H
        if rotary != "none":
            R = draw(st.sampled_from(["full", "half", "two", "any"]))
            R = {"full": H, "half": H // 2, "two": 2}.get(R) or 2 * draw(st.integers(1, H // 2))
        W = draw(st.one_of(st.sampled_from([-1, 0, 1, 2, 1000]),
                           st.integers(windows[0] + 1, windows[1])))
        softcap = draw(st.sampled_from([0.0, 0.0, 0.5, 5.0, 50.0]))
        if bounded_logits:
            scale = draw(st.sampled_from([0.0, 0.25, 0.5, 1.5])) / math.sqrt(H)
            q_gain = draw(st.sampled_from([1.0, 4.0, 8.0])) if 0 < softcap <= 5 else 1.0
        else:
            scale = draw(st.sampled_from([0.0, 0.05, 0.37, 1.0, 2.5]))
            q_gain = draw(st.sampled_from([1.0, 1.0, 4.0, 8.0]))
        unmapped = ()
        if B and draw(st.integers(0, 7)) == 0:
            unmapped = tuple(sorted(set(draw(st.lists(st.integers(0, B - 1), min_size=1,
                                                      max_size=2)))))
        return FuzzConfig(
            lens=lens, N=Nkv * group, Nkv=Nkv, H=H, bs=draw(st.sampled_from(block_sizes)),
            packed=draw(st.booleans()), rotary=rotary, R=R, W=W, softcap=softcap, scale=scale,
            q_gain=q_gain, alias=draw(st.sampled_from([0.0, 0.5, 1.0])),
            holes=draw(st.sampled_from([0.0, 0.0, 0.15, 0.5])), unmapped_rows=unmapped,
            pad=draw(st.sampled_from(["neg1", "garbage"])),
            extra_cols=draw(st.sampled_from([0, 0, 1, 3])),
            spare=draw(st.sampled_from([0, 0, 1, 5])),
            cos_extra=draw(st.integers(0, 3)),
            hints=draw(st.sampled_from(["none", "exact", "loose"])),
            dtype=draw(st.sampled_from(dtypes)))
    return draw_config()


def _written_columns(q_len, past, bs):
    """Table columns of one sequence that hold a slot its new tokens write."""
    if q_len == 0:
        return set()
    return set(range(past // bs, (past + q_len - 1) // bs + 1))


def build_table(cfg, rng):
    """(block_table (B, max_blocks) int32, num_blocks) for ``cfg``.

    Written columns get fresh blocks of their own (or -1, a hole: those tokens are not written);
    read-only columns (wholly before past, or any column of a q_len-0 sequence) get a fresh block,
    a hole, or, with chance cfg.alias, a block some read-only column already uses (any sequence,
    any column, this row included). Physical ids are a random permutation (shuffled,
    non-contiguous); cfg.spare ids stay unused. Columns past the need are -1 or garbage ids.
    """
    B, bs = len(cfg.lens), cfg.bs
    need = [-(-(q + p) // bs) for q, p in cfg.lens]
    max_blocks = max(need + [0]) + cfg.extra_cols
    plan = []                       # (b, column, "fresh" | "hole" | ("alias", k))
    read_only = []                  # indices into `fresh` that no one writes
    fresh = 0
    for b, (q, p) in enumerate(cfg.lens):
        written = _written_columns(q, p, bs)
        for i in range(need[b]):
            if b in cfg.unmapped_rows or rng.random() < cfg.holes:
                plan.append((b, i, "hole"))
            elif i not in written and read_only and rng.random() < cfg.alias:
                plan.append((b, i, ("alias", read_only[rng.integers(len(read_only))])))
            else:
                if i not in written:
                    read_only.append(fresh)
                plan.append((b, i, ("fresh", fresh)))
                fresh += 1
    num_blocks = fresh + cfg.spare
    ids = rng.permutation(num_blocks).astype(np.int32)
    table = np.full((B, max_blocks), -1, dtype=np.int32)
    if cfg.pad == "garbage" and num_blocks:
        table[:] = rng.integers(-1, num_blocks, size=table.shape)
    for b, i, what in plan:
        table[b, i] = -1 if what == "hole" else ids[what[1]]
    for b in cfg.unmapped_rows:
        table[b, :] = -1
    return table, num_blocks


def build_inputs(cfg, rng, dtype=None):
    """``paged_cases.Inputs`` for ``cfg`` in ``dtype`` (default cfg.dtype; NumPy arrays).

    Data are standard normal (query heads times cfg.q_gain); both caches are filled with random
    values (poison: a slot read or written by mistake shows); cos/sin are independent uniform
    values in [-1, 1] (not a unit rotation, so a swapped sign or pair shows).
    """
    dt = np.dtype(dtype or cfg.dtype)
    q_lens = [q for q, _ in cfg.lens]
    pasts = [p for _, p in cfg.lens]
    N, Nkv, H = cfg.N, cfg.Nkv, cfg.H
    table, num_blocks = build_table(cfg, rng)
    T = sum(q_lens)
    width = (N + 2 * Nkv) * H if cfg.packed else N * H
    query = rng.standard_normal((T, width))
    query[:, :N * H] *= cfg.q_gain
    key = value = None
    if not cfg.packed:
        key = rng.standard_normal((T, Nkv * H)).astype(dt)
        value = rng.standard_normal((T, Nkv * H)).astype(dt)
    key_cache = rng.standard_normal((num_blocks, cfg.bs, Nkv, H)).astype(dt)
    value_cache = rng.standard_normal((num_blocks, cfg.bs, Nkv, H)).astype(dt)
    cum = np.concatenate([[0], np.cumsum(q_lens, dtype=np.int64)]).astype(np.int32)
    cos = sin = None
    if cfg.rotary != "none":
        rows = max([q + p for q, p in cfg.lens if q > 0] + [1]) + cfg.cos_extra
        cos = rng.uniform(-1, 1, (rows, cfg.R // 2)).astype(dt)
        sin = rng.uniform(-1, 1, (rows, cfg.R // 2)).astype(dt)
    args = (query.astype(dt), key, value, key_cache, value_cache, cum,
            np.array(pasts, dtype=np.int32), table, cos, sin)
    return Inputs(args, cfg.kwargs, q_lens, pasts)


def host_bounds(cfg, inp):
    """The optional host bounds (max_seqlen_q, max_seqlen_k, total_kv_tokens) cfg.hints asks
    for: none, the exact values, or valid but loose ones (a little above the exact values)."""
    if cfg.hints == "none":
        return {}
    q = np.array(inp.q_lens, dtype=np.int64)
    kv = q + np.array(inp.pasts, dtype=np.int64)
    exact = {"max_seqlen_q": int(q.max(initial=0)), "max_seqlen_k": int(kv.max(initial=0)),
             "total_kv_tokens": int(kv.sum())}
    if cfg.hints == "exact":
        return exact
    return {name: value + slack for (name, value), slack in zip(exact.items(), (1, 5, 11))}


def describe(cfg, seed):
    """One line that reproduces an example: build_inputs(cfg, np.random.default_rng(seed))."""
    return f"{cfg!r} seed={seed}"
