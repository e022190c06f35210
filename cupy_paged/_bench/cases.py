"""Benchmark cases of cupy_paged: shapes, metadata, and the two numbers (FLOPs, minimum bytes).

Pure NumPy: nothing here touches a GPU, so CI tests it without torch or CuPy.

A case is a batch of sequences, each with q_len new tokens on top of `past` cached ones. Its
metadata is what ``paged_attention`` takes: cumulative_sequence_length (B+1,), past_seqlens
(B,) and a block table (B, max_blocks) whose columns are a random permutation of exactly the
physical blocks the batch needs (num_blocks = sum over sequences of ceil(kv_len / block_size)),
padded with -1 -- shuffled like the tables of a long-running server.

The two numbers (MEASURE: count before timing):

    FLOPs     = 4 * H * N * sum_b sum_{j<q_b} (past_b + j + 1)
              = 4 * H * N * sum_b (q_b * past_b + q_b * (q_b + 1) / 2)
        (causal counted once: query row j of sequence b sees past_b + j + 1 keys; 2*H for q.k
        and 2*H for p*v per (row, key, query head))

    min bytes = e * [ 2 * Nkv * H * sum_b kv_b          (K and V: each needed row read once
                                                         per kv head; kv_b = past_b + q_b,
                                                         0 when q_b = 0)
                    + 2 * N * H * T                      (Q read + out written)
                    + 2 * Nkv * H * T ]                  (new K and V written to the cache)
        e = bytes per element (2 for fp16); T = sum_b q_b. The new rows are read once from
        `key`/`value` (counted in the first term) and written once to the caches.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

DEFAULT_BLOCK_SIZE = 16
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}

FLOPS_FORMULA = "4*H*N*sum_b(q_b*past_b + q_b*(q_b+1)/2)"
BYTES_FORMULA = "e*(2*Nkv*H*sum_b(past_b+q_b) + 2*N*H*T + 2*Nkv*H*T)"


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark configuration; sequences in batch order."""

    name: str
    q_lens: tuple          # new tokens per sequence
    past: tuple            # cached tokens per sequence before the step
    num_heads: int = 32
    kv_num_heads: int = 8
    head_size: int = 128
    block_size: int = DEFAULT_BLOCK_SIZE
    dtype: str = "float16"

    def __post_init__(self):
        if len(self.q_lens) != len(self.past):
            raise ValueError(f"{self.name}: q_lens and past differ in length")
        if self.num_heads % self.kv_num_heads:
            raise ValueError(f"{self.name}: num_heads % kv_num_heads != 0")
        if self.block_size < 1:
            raise ValueError(f"{self.name}: block_size must be >= 1")
        if min(self.q_lens, default=0) < 0 or min(self.past, default=0) < 0:
            raise ValueError(f"{self.name}: negative length")

    # --- shapes --------------------------------------------------------------------------
    @property
    def batch(self):
        return len(self.q_lens)

    @property
    def num_tokens(self):
        """T: rows of query."""
        return int(sum(self.q_lens))

    @property
    def group(self):
        """G = N / Nkv."""
        return self.num_heads // self.kv_num_heads

    @property
    def itemsize(self):
        return ITEMSIZE[self.dtype]

    @property
    def kv_lens(self):
        """Keys each sequence's last new token sees: past + q_len (0 where q_len is 0)."""
        return tuple(p + q if q > 0 else 0 for q, p in zip(self.q_lens, self.past))

    @property
    def blocks_per_seq(self):
        """Blocks each sequence needs: ceil((past + q_len) / block_size) (its whole context)."""
        return tuple(-(-(p + q) // self.block_size) for q, p in zip(self.q_lens, self.past))

    @property
    def num_blocks(self):
        return int(sum(self.blocks_per_seq))

    @property
    def max_blocks(self):
        return max(1, max(self.blocks_per_seq, default=0))

    @property
    def label(self):
        """The case's name with its block size, e.g. 'prefill_8x2048/bs256'."""
        return f"{self.name}/bs{self.block_size}"

    # --- the two numbers -----------------------------------------------------------------
    def flops(self):
        """Attention FLOPs, causal counted once (see the module docstring)."""
        rows_x_keys = sum(q * p + q * (q + 1) // 2 for q, p in zip(self.q_lens, self.past))
        return 4 * self.head_size * self.num_heads * rows_x_keys

    def bytes_breakdown(self):
        """{'kv_read', 'q_read_out_write', 'kv_write'} in bytes (see the module docstring)."""
        e, H, N, Nkv, T = (self.itemsize, self.head_size, self.num_heads, self.kv_num_heads,
                           self.num_tokens)
        return {
            "kv_read": e * 2 * Nkv * H * sum(self.kv_lens),
            "q_read_out_write": e * 2 * N * H * T,
            "kv_write": e * 2 * Nkv * H * T,
        }

    def min_bytes(self):
        return int(sum(self.bytes_breakdown().values()))

    def cache_bytes(self):
        """Bytes of key_cache + value_cache (num_blocks, block_size, Nkv, H) each."""
        return (2 * self.num_blocks * self.block_size * self.kv_num_heads * self.head_size
                * self.itemsize)

    def flops_formula(self):
        """The FLOP formula with this case's numbers put in."""
        if len(set(zip(self.q_lens, self.past))) == 1:
            q, p = self.q_lens[0], self.past[0]
            return (f"4*H*N*B*(q*past + q*(q+1)/2) = 4*{self.head_size}*{self.num_heads}*"
                    f"{self.batch}*({q}*{p} + {q}*{q + 1}/2) = {self.flops():.4g}")
        return f"{FLOPS_FORMULA} = {self.flops():.4g}"

    def bytes_formula(self):
        """The byte formula with this case's numbers put in."""
        e, H, N, Nkv, T = (self.itemsize, self.head_size, self.num_heads, self.kv_num_heads,
                           self.num_tokens)
        return (f"{e}*(2*{Nkv}*{H}*{sum(self.kv_lens)} + 2*{N}*{H}*{T} + 2*{Nkv}*{H}*{T})"
                f" = {self.min_bytes():.4g}")

    def floors_ms(self, copy_bytes_per_s, flops_per_s):
        """(memory floor, compute floor, floor) in ms: bytes / bandwidth, FLOPs / rate."""
        mem = 1e3 * self.min_bytes() / copy_bytes_per_s if copy_bytes_per_s else None
        cmp_ = 1e3 * self.flops() / flops_per_s if flops_per_s else None
        both = [x for x in (mem, cmp_) if x is not None]
        return mem, cmp_, (max(both) if both else None)

    def describe(self):
        return {
            "name": self.name, "label": self.label, "batch": self.batch,
            "num_tokens": self.num_tokens, "q_lens": list(self.q_lens), "past": list(self.past),
            "num_heads": self.num_heads, "kv_num_heads": self.kv_num_heads,
            "head_size": self.head_size, "block_size": self.block_size, "dtype": self.dtype,
            "num_blocks": self.num_blocks, "flops": self.flops(), "min_bytes": self.min_bytes(),
            "bytes_breakdown": self.bytes_breakdown(), "flops_formula": self.flops_formula(),
            "bytes_formula": self.bytes_formula(), "cache_bytes": self.cache_bytes(),
        }


# --- the named cases ---------------------------------------------------------------------
def _prefill_8x2048(bs):
    return Case("prefill_8x2048", (2048,) * 8, (0,) * 8, block_size=bs)


def _decode_64x4096(bs):
    return Case("decode_64x4096", (1,) * 64, (4095,) * 64, block_size=bs)


def _decode_4x32768(bs):
    return Case("decode_4x32768", (1,) * 4, (32767,) * 4, block_size=bs)


def _mixed(bs):
    # 4 prefill chunks of 512 new tokens at past 0/1024/2048/3072, then 60 decodes at past 4095
    return Case("mixed", (512,) * 4 + (1,) * 60, (0, 1024, 2048, 3072) + (4095,) * 60,
                block_size=bs)


CASES = {
    "prefill_8x2048": _prefill_8x2048,
    "decode_64x4096": _decode_64x4096,
    "decode_4x32768": _decode_4x32768,
    "mixed": _mixed,
}
# Block sizes each case runs at when the command line names none: prefill also at 256.
DEFAULT_BLOCK_SIZES = {"prefill_8x2048": (16, 256)}


def make_case(name, block_size=DEFAULT_BLOCK_SIZE):
    """The named case at this block size; KeyError naming the known cases otherwise."""
    try:
        factory = CASES[name]
    except KeyError:
        raise KeyError(f"unknown case {name!r}; known: {', '.join(CASES)}") from None
    return factory(int(block_size))


def plan(names=None, block_sizes=None):
    """The (case) list to run: each name at the given block sizes, or at its defaults."""
    names = list(names) if names else list(CASES)
    out = []
    for name in names:
        sizes = block_sizes or DEFAULT_BLOCK_SIZES.get(name, (DEFAULT_BLOCK_SIZE,))
        out.extend(make_case(name, bs) for bs in sizes)
    return out


# --- metadata ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Metadata:
    """Host (NumPy int32) metadata of one case, as paged_attention takes it."""

    cumulative_sequence_length: np.ndarray   # (B+1,)
    past_seqlens: np.ndarray                 # (B,)
    block_table: np.ndarray                  # (B, max_blocks), -1 padded
    num_blocks: int


def build_metadata(case, seed=0, shuffle=True):
    """cum, past and a block table covering exactly the blocks the case needs: shuffled, or
    with ``shuffle=False`` in order (each sequence's blocks contiguous, like a dense cache)."""
    rng = np.random.default_rng(seed)
    cum = np.zeros(case.batch + 1, dtype=np.int32)
    cum[1:] = np.cumsum(case.q_lens, dtype=np.int64)
    past = np.asarray(case.past, dtype=np.int32).reshape(case.batch)
    perm = (rng.permutation(case.num_blocks) if shuffle else np.arange(case.num_blocks)).astype(
        np.int32)
    table = np.full((case.batch, case.max_blocks), -1, dtype=np.int32)
    start = 0
    for b, n in enumerate(case.blocks_per_seq):
        table[b, :n] = perm[start:start + n]
        start += n
    return Metadata(cum, past, table, case.num_blocks)


def token_slots(case, meta):
    """(block, offset) int64 arrays (T,): where each new token's K/V goes in the caches."""
    blocks = np.empty(case.num_tokens, dtype=np.int64)
    offsets = np.empty(case.num_tokens, dtype=np.int64)
    bs = case.block_size
    for b in range(case.batch):
        lo, hi = int(meta.cumulative_sequence_length[b]), int(
            meta.cumulative_sequence_length[b + 1])
        pos = int(meta.past_seqlens[b]) + np.arange(hi - lo, dtype=np.int64)
        blocks[lo:hi] = meta.block_table[b, pos // bs]
        offsets[lo:hi] = pos % bs
    return blocks, offsets


@dataclasses.dataclass(frozen=True)
class Group:
    """A run of consecutive sequences [first, first + count) sharing q_len (and past)."""

    first: int
    count: int
    q_len: int
    past: int | None      # None when the group's sequences differ in past (flex groups)
    row0: int             # their first query row (cum[first])

    @property
    def kv_len(self):
        return None if self.past is None else self.past + self.q_len


def groups(case, same_past=True):
    """Consecutive sequences with equal q_len (and, if same_past, equal past).

    Dense peers batch such a group into one (count, heads, len, H) call; sequences with no
    new tokens are left out.
    """
    out, b = [], 0
    row = 0
    while b < case.batch:
        q, p = case.q_lens[b], case.past[b]
        e = b + 1
        while e < case.batch and case.q_lens[e] == q and (
                not same_past or case.past[e] == p):
            e += 1
        if q > 0:
            same = len(set(case.past[b:e])) == 1
            out.append(Group(b, e - b, q, p if same else None, row))
        row += q * (e - b)
        b = e
    return out


def n_input_sets(set_bytes, l2_bytes, max_sets=8):
    """How many input sets to rotate among so that a run does not find its inputs in L2.

    One set when it is at least twice the L2; else enough sets to cover 3x the L2 (>= 2).
    """
    if l2_bytes <= 0 or set_bytes >= 2 * l2_bytes:
        return 1
    return int(min(max_sets, max(2, math.ceil(3 * l2_bytes / max(set_bytes, 1)))))


def sample_rows(case):
    """(sequence, row-in-sequence) pairs whose outputs are checked against the reference.

    The first and last rows of the first and last sequence, and of every distinct (q_len,
    past) seen in between -- a few rows per case, cheap to recompute in float32.
    """
    picked, seen = [], set()
    for b in range(case.batch):
        key = (case.q_lens[b], case.past[b])
        if case.q_lens[b] == 0 or (key in seen and b != case.batch - 1):
            continue
        seen.add(key)
        for j in sorted({0, case.q_lens[b] - 1}):
            picked.append((b, j))
    return picked
