"""Paged-attention test cases shared by the reference tests and the GPU parity tests.

A ``Case`` names a configuration; ``make_inputs`` draws fresh random inputs for it (caches
poisoned with random values); ``check_against_naive`` compares an implementation's output and
caches with the naive loop of ``naive_paged_attention.py``.
"""
import dataclasses
import zlib

import numpy as np

try:
    from .naive_paged_attention import naive_paged_attention, visible_positions
except ImportError:
    from naive_paged_attention import naive_paged_attention, visible_positions

# relative output error allowed against the float64 naive loop (spec: compute in float32,
# round only the output; an fp16 output rounding alone is ~3e-4 relative)
OUT_TOL = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3}
# rotated K is computed, not copied: (rtol, atol) for one rounding step at the cache dtype
KROT_TOL = {"float64": (1e-12, 1e-13), "float32": (2e-6, 1e-6), "float16": (1e-3, 1e-5)}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    lens: tuple = None        # ((q_len, past), ...) per sequence; None: drawn from `mode`
    mode: str = "mixed"       # mixed | decode | prefill | chunk
    B: int = 3
    N: int = 4
    Nkv: int = 2
    H: int = 16
    bs: int = 16
    packed: bool = False
    rotary: str = "none"      # none | neox | gptj
    R: int = 0                # rotary dim; 0 means H
    W: int = -1
    softcap: float = 0.0
    scale: float = 0.0
    q_gain: float = 1.0       # > 1 makes big logits (softcap saturation)
    share: int = 0            # odd sequences read the first `share` blocks of the previous one
    holes: int = 0            # random -1 entries among the needed table columns
    unmapped: tuple = ()      # sequences whose whole block_table row is -1
    spare: int = 0            # physical blocks no sequence uses
    extra_cols: int = 0       # table columns past the need, holding other sequences' block ids
    dtype: str = "float64"
    api: bool = False         # through cupy_paged.paged_attention(backend="reference")
    sink: float = 0.0         # > 0: a head_sink of N logits drawn at this scale (head 1: -inf)
    slots: bool = False       # a slot_mapping of distinct random slots, a quarter of them -1
    qk_norm: bool = False     # q_norm_weight / k_norm_weight drawn in [0.5, 1.5)
    rot_off: int = 0          # rotary_offset (set R too: R + rot_off <= H)
    quant: str = ""           # key_cache as int8 / float8_e4m3fn with a k_scale
    vquant: str = None        # value_cache's (None: as quant)
    per_channel: bool = False # scales (Nkv, 1, H) instead of (1,)
    causal: bool = True       # False: is_causal=False (needs W <= 0)


def draw_lens(case, rng):
    cap = min(3 * case.bs, 40)
    out = []
    for _ in range(case.B):
        if case.mode == "decode":
            out.append((1, int(rng.integers(0, 61))))
        elif case.mode == "prefill":
            out.append((int(rng.integers(1, 10)), 0))
        elif case.mode == "chunk":
            out.append((int(rng.integers(2, 13)), int(rng.integers(0, cap + 1))))
        elif case.mode == "shared":
            out.append((int(rng.integers(1, 5)), case.share * case.bs + int(rng.integers(0, 20))))
        else:
            out.append((int(rng.integers(0, 6)), int(rng.integers(0, cap + 1))))
    return tuple(out)


@dataclasses.dataclass
class Inputs:
    args: tuple               # positional arguments, caches are the poisoned originals
    kwargs: dict
    q_lens: list
    pasts: list


def make_inputs(case, rng):
    lens = case.lens if case.lens is not None else draw_lens(case, rng)
    q_lens = [q for q, _ in lens]
    pasts = [p for _, p in lens]
    B, bs, N, Nkv, H = len(lens), case.bs, case.N, case.Nkv, case.H
    need = [-(-(q + p) // bs) for q, p in lens]
    shared = [0] * B
    for b in range(1, B, 2):
        shared[b] = min(case.share, pasts[b - 1] // bs, pasts[b] // bs)
    own = sum(n - s for n, s in zip(need, shared))
    num_blocks = max(own + case.spare, 1)
    ids = iter(rng.permutation(num_blocks))          # shuffled, non-contiguous
    max_blocks = max(need + [1]) + case.extra_cols
    table = np.full((B, max_blocks), -1, dtype=np.int32)
    for b in range(B):
        for i in range(need[b]):
            table[b, i] = table[b - 1, i] if i < shared[b] else next(ids)
        for i in range(need[b], max_blocks):         # never read: k <= p < past + q_len
            table[b, i] = rng.integers(-1, num_blocks)
    for _ in range(case.holes):
        rows = [b for b in range(B) if need[b] > 0]
        if rows:
            b = int(rng.choice(rows))
            table[b, rng.integers(0, need[b])] = -1
    for b in case.unmapped:
        table[b, :] = -1

    T = sum(q_lens)
    dt = np.dtype(case.dtype)
    width = (N + 2 * Nkv) * H if case.packed else N * H
    query = rng.standard_normal((T, width))
    query[:, :N * H] *= case.q_gain
    key = value = None
    if not case.packed:
        key = rng.standard_normal((T, Nkv * H)).astype(dt)
        value = rng.standard_normal((T, Nkv * H)).astype(dt)
    key_cache = rng.standard_normal((num_blocks, bs, Nkv, H)).astype(dt)
    value_cache = rng.standard_normal((num_blocks, bs, Nkv, H)).astype(dt)
    cum = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cos = sin = None
    if case.rotary != "none":
        half = (case.R or H) // 2
        max_pos = max(q + p for q, p in lens) + int(rng.integers(0, 4))
        # independent random cos and sin (not a unit rotation): a swapped sign or pair shows
        cos = rng.uniform(-1, 1, (max_pos, half)).astype(dt)
        sin = rng.uniform(-1, 1, (max_pos, half)).astype(dt)
    args = (query.astype(dt), key, value, key_cache, value_cache, cum,
            np.array(pasts, dtype=np.int32), table, cos, sin)
    kwargs = dict(num_heads=N, kv_num_heads=Nkv, scale=case.scale, softcap=case.softcap,
                  local_window_size=case.W, do_rotary=case.rotary != "none",
                  rotary_interleaved=case.rotary == "gptj")
    if not case.causal:
        kwargs["is_causal"] = False
    if case.sink:                                     # drawn last: other cases' draws unchanged
        sink = rng.normal(0.0, case.sink, N)
        if N > 2:
            sink[1] = -np.inf                         # -inf: that head has no sink
        kwargs["head_sink"] = sink.astype(dt)
    if case.slots:                                    # writes go anywhere; reads use the table
        slots = rng.permutation(num_blocks * bs)[:T]
        slots[rng.random(T) < 0.25] = -1
        kwargs["slot_mapping"] = slots.astype(np.int32)
    if case.qk_norm:
        kwargs["q_norm_weight"] = rng.uniform(0.5, 1.5, H).astype(dt)
        kwargs["k_norm_weight"] = rng.uniform(0.5, 1.5, H).astype(dt)
        kwargs["qk_norm_epsilon"] = 1e-5
    if case.rot_off:
        kwargs["rotary_offset"] = case.rot_off
    vquant = case.quant if case.vquant is None else case.vquant
    if case.quant or vquant:                          # one-byte caches of random contents
        caches = list(args[3:5])
        for i, (kind, name) in enumerate(((case.quant, "k_scale"), (vquant, "v_scale"))):
            if kind:
                shape = (Nkv, 1, H) if case.per_channel else (1,)
                kwargs[name] = rng.uniform(0.01, 0.04, shape).astype(np.float32)
                caches[i] = _one_byte(kind, caches[i].shape, rng)
        args = args[:3] + tuple(caches) + args[5:]
    return Inputs(args, kwargs, q_lens, pasts)


def _one_byte(kind, shape, rng):
    """A random int8 or float8_e4m3fn cache."""
    if kind == "int8":
        return rng.integers(-128, 128, shape).astype(np.int8)
    import ml_dtypes
    return np.clip(rng.standard_normal(shape) * 60, -448, 448).astype(ml_dtypes.float8_e4m3fn)


def written_slots(inp):
    """(num_blocks, block_size) mask of the cache slots the call must write (spec step 3)."""
    kc, table = inp.args[3], inp.args[7]
    mask = np.zeros(kc.shape[:2], dtype=bool)
    slots = inp.kwargs.get("slot_mapping")
    if slots is not None:                             # the call writes where the slots say
        for flat in slots[slots >= 0]:
            mask[flat // kc.shape[1], flat % kc.shape[1]] = True
        return mask
    for b, (q, past) in enumerate(zip(inp.q_lens, inp.pasts)):
        for p in range(past, past + q):
            blk = table[b, p // kc.shape[1]]
            if blk != -1:
                assert not mask[blk, p % kc.shape[1]], "test bug: colliding writes"
                mask[blk, p % kc.shape[1]] = True
    return mask


def empty_rows(inp):
    """Rows of out whose query sees no key."""
    table, bs, W = inp.args[7], inp.args[3].shape[1], inp.kwargs["local_window_size"]
    causal = inp.kwargs.get("is_causal", True)
    rows, t = [], 0
    for b, (q, past) in enumerate(zip(inp.q_lens, inp.pasts)):
        for j in range(q):
            if not visible_positions(table[b], bs, past + j, W, None if causal else past + q):
                rows.append(t)
            t += 1
    return rows


def rel_err(a, b):
    den = np.linalg.norm(b.astype(np.float64))
    num = np.linalg.norm(a.astype(np.float64) - b.astype(np.float64))
    return num / den if den > 0 else num


def bits(a):
    return a.view(np.dtype("u%d" % a.dtype.itemsize))


def check_against_naive(inp, out, kc, vc, dtype, tag):
    query, key_cache, value_cache = inp.args[0], inp.args[3], inp.args[4]
    exp, exp_kc, exp_vc = naive_paged_attention(*inp.args, **inp.kwargs)
    N, H = inp.kwargs["num_heads"], key_cache.shape[3]
    assert isinstance(out, np.ndarray), tag
    assert out.shape == (query.shape[0], N * H), f"{tag}: out shape {out.shape}"
    assert out.dtype == query.dtype, f"{tag}: out dtype {out.dtype}"
    assert np.isfinite(out).all(), f"{tag}: non-finite output"
    err = rel_err(out, exp)
    assert err <= OUT_TOL[dtype], f"{tag}: relative output error {err:.3e} > {OUT_TOL[dtype]}"
    for t in empty_rows(inp):
        assert np.all(out[t] == 0), f"{tag}: row {t} sees no key but is not 0"

    mask = written_slots(inp)
    for name, got, want, orig in (("key_cache", kc, exp_kc, key_cache),
                                  ("value_cache", vc, exp_vc, value_cache)):
        assert got.shape == orig.shape and got.dtype == orig.dtype, f"{tag}: {name} reshaped"
        assert np.array_equal(bits(want[~mask]), bits(orig[~mask])), f"{tag}: naive bug"
        changed = np.argwhere((bits(got) != bits(orig)).any(axis=(2, 3)) & ~mask)
        assert changed.size == 0, \
            f"{tag}: {name} changed at unwritten (block, offset) {changed[:5].tolist()}"
        computed = inp.kwargs["do_rotary"] or inp.kwargs.get("q_norm_weight") is not None
        if name == "key_cache" and computed:         # rotated and / or normed: within rounding
            rtol, atol = KROT_TOL[dtype]
            ok = np.isclose(got[mask].astype(np.float64), want[mask].astype(np.float64),
                            rtol=rtol, atol=atol)
            assert ok.all(), f"{tag}: computed key_cache wrong at {np.argwhere(~ok)[:5].tolist()}"
        else:
            bad = np.argwhere((bits(got[mask]) != bits(want[mask])).any(axis=(1, 2)))
            assert bad.size == 0, \
                f"{tag}: {name} written slots {np.argwhere(mask)[bad[:5, 0]].tolist()} wrong"


def seed_of(name):
    return zlib.crc32(name.encode())


# ----------------------------------------------------------------------------- the matrix
HEAD_PAIRS = [(1, 1), (2, 2), (3, 3), (5, 5), (7, 7), (2, 1), (6, 3), (10, 5), (3, 1), (9, 3),
              (6, 2), (4, 1), (8, 2), (12, 3), (8, 1), (16, 2), (5, 1), (7, 1), (12, 1)]
HEAD_SIZES = [8, 16, 32, 40, 64, 80, 96, 128, 160, 192, 224, 256]
BLOCK_SIZES = [1, 3, 16, 32, 256]


def _bs_lens(bs, kind):
    if kind == "capacity":      # the longest sequence ends exactly at max_blocks * block_size
        q = min(3, 2 * bs)
        return ((q, 2 * bs - q), (1, bs - 1), (0, bs))
    if kind == "cross":         # new tokens crossing one or several block boundaries
        q = min(2 * bs + 2, 12)
        return ((q, bs - 1), (q, max(bs - q // 2, 0)), (2, 2 * bs - 1))
    return None


def build_cases():
    cases = []
    for i, (n, nkv) in enumerate(HEAD_PAIRS):
        cases.append(Case(f"heads-N{n}-Nkv{nkv}-mixed", N=n, Nkv=nkv, H=8))
        cases.append(Case(f"heads-N{n}-Nkv{nkv}-decode-packed", N=n, Nkv=nkv, H=8,
                          mode="decode", packed=True, B=4))
        cases.append(Case(f"heads-N{n}-Nkv{nkv}-chunk-neox", N=n, Nkv=nkv, H=16, mode="chunk",
                          rotary="neox", bs=(3, 16)[i % 2], B=2))
    rot = [("none", 0), ("neox", 0), ("gptj", 0), ("neox", "half"), ("gptj", "quarter")]
    for i, h in enumerate(HEAD_SIZES):
        for j, (r, part) in enumerate(rot):
            rdim = {0: 0, "half": h // 2, "quarter": max(2, h // 4 - 2)}[part]
            cases.append(Case(f"H{h}-{r}-R{rdim or h}", lens=((2, 5), (0, 3), (3, 0)), N=4,
                              Nkv=(1, 2, 4)[(i + j) % 3], H=h, bs=(16, 3, 32)[j % 3],
                              packed=(i + j) % 2 == 1, rotary=r, R=rdim))
    for bs in BLOCK_SIZES:
        for kind in ("prefill", "decode", "mixed", "chunk", "capacity", "cross"):
            lens = _bs_lens(bs, kind)
            cases.append(Case(f"bs{bs}-{kind}", lens=lens, mode=kind, bs=bs, N=6, Nkv=2, H=8,
                              rotary="gptj" if kind in ("cross", "capacity") else "none"))
    for w in (-1, 0, 1, 2, 5, 1000):
        for cap, scale, gain in ((0.0, 0.0, 1.0), (0.5, 1.0, 8.0), (50.0, 0.37, 4.0)):
            for r in ("none", "gptj"):
                cases.append(Case(f"W{w}-cap{cap}-scale{scale}-{r}", mode="chunk", W=w,
                                  softcap=cap, scale=scale, q_gain=gain, rotary=r, bs=5))
    for scale in (0.0, 0.05, 1.0, 2.5):
        for cap in (0.0, 0.5, 5.0, 50.0):
            cases.append(Case(f"scale{scale}-cap{cap}", scale=scale, softcap=cap, q_gain=4.0,
                              mode="chunk", N=6, Nkv=3))
    cases += [
        Case("T0-B1", lens=((0, 7),)),
        Case("T0-B3-packed-rotary", lens=((0, 0), (0, 5), (0, 33)), packed=True, rotary="neox"),
        Case("T0-B7-window", lens=tuple((0, 3 * i) for i in range(7)), W=2, softcap=5.0),
        Case("T0-B2-unmapped", lens=((0, 4), (0, 0)), unmapped=(0, 1), bs=3),
        Case("qlen0-first", lens=((0, 5), (3, 2), (4, 0))),
        Case("qlen0-middle", lens=((2, 3), (0, 0), (0, 7), (1, 1)), bs=3),
        Case("qlen0-last", lens=((3, 4), (0, 9)), rotary="gptj"),
        Case("qlen0-alternating", lens=tuple(((i % 2) * 3, i) for i in range(8)), bs=2),
        Case("qlen0-single-token", lens=((0, 0), (1, 0), (0, 0)), packed=True),
        Case("qlen0-window", lens=((0, 40), (5, 40), (0, 1)), W=3, bs=4),
        Case("B1-prefill", lens=((11, 0),), bs=4, rotary="neox"),
        Case("B1-decode", lens=((1, 200),), bs=16, N=8, Nkv=1),
        Case("B1-chunk", lens=((7, 30),), bs=1, packed=True),
        Case("B300-decode", mode="decode", B=300, N=2, Nkv=1, H=8, bs=3, lens=None),
        Case("B300-mixed-packed", B=300, N=1, Nkv=1, H=8, bs=2, packed=True,
             lens=tuple(((i * 7) % 3, (i * 5) % 11) for i in range(300))),
        Case("B257-decode-rotary", mode="decode", B=257, N=3, Nkv=1, H=8, bs=4, rotary="gptj"),
        Case("shared-1-bs16", mode="shared", share=1, B=4, spare=3),
        Case("shared-2-bs3", mode="shared", share=2, bs=3, B=6),
        Case("shared-4-bs3-rotary", mode="shared", share=4, bs=3, B=4, rotary="neox"),
        Case("shared-3-bs1-window", mode="shared", share=3, bs=1, B=5, W=2),
        Case("shared-2-bs5-holes", mode="shared", share=2, bs=5, B=4, holes=2),
        Case("shared-1-bs32-packed", mode="shared", share=1, bs=32, B=2, packed=True),
        Case("holes-1-chunk", mode="chunk", holes=1, bs=3),
        Case("holes-3-chunk", mode="chunk", holes=3, bs=4, rotary="gptj"),
        Case("holes-6-chunk", mode="chunk", holes=6, bs=2, B=4, W=4),
        Case("holes-1-decode", mode="decode", holes=1, bs=8, B=5),
        Case("holes-3-decode", mode="decode", holes=3, bs=3, B=5, packed=True),
        Case("holes-6-decode", mode="decode", holes=6, bs=5, B=8, softcap=2.0),
        Case("unmapped-one-row", mode="chunk", unmapped=(1,), bs=4),
        Case("unmapped-all", mode="mixed", unmapped=(0, 1, 2), rotary="neox"),
        Case("unmapped-first-last", mode="decode", unmapped=(0, 3), B=4, bs=2),
        Case("overprovisioned", mode="mixed", spare=200, extra_cols=10, bs=4),
        Case("overprovisioned-decode", mode="decode", spare=64, extra_cols=3, B=6),
        Case("overprovisioned-bs1", mode="chunk", spare=50, extra_cols=20, bs=1),
        Case("decode-long-bs1", lens=tuple((1, 40 + 7 * i) for i in range(6)), bs=1, spare=9),
        Case("decode-long-bs3", lens=tuple((1, 120 + 31 * i) for i in range(6)), bs=3, N=6),
        Case("decode-long-bs16", lens=tuple((1, 100 + 37 * i) for i in range(8)), bs=16,
             spare=50, N=8, Nkv=1),
        Case("decode-long-bs32-window", lens=tuple((1, 150 + 17 * i) for i in range(5)),
             bs=32, W=40, rotary="gptj"),
        # one sequence longer than any internal row chunking (e.g. 256 query rows)
        Case("prefill-long-300", lens=((300, 0),), N=2, Nkv=1, H=8, bs=16, rotary="neox"),
        Case("chunk-long-520-window", lens=((2, 3), (520, 40)), N=2, Nkv=1, H=8, bs=32, W=9),
    ]
    api_pick = ["heads-N6-Nkv3-mixed", "heads-N8-Nkv2-decode-packed", "heads-N5-Nkv1-chunk-neox",
                "H8-gptj-R8", "H40-neox-R20", "H80-gptj-R18", "H128-none-R128",
                "H256-neox-R256", "H96-neox-R48", "bs1-cross", "bs3-capacity", "bs16-mixed",
                "bs256-decode", "bs32-chunk", "prefill-long-300", "W2-cap0.0-scale0.0-gptj",
                "W1000-cap0.0-scale0.0-none", "W1-cap0.0-scale0.0-none",
                "scale0.05-cap5.0", "T0-B3-packed-rotary", "qlen0-middle", "B1-prefill",
                "shared-2-bs3", "holes-3-chunk", "unmapped-one-row", "overprovisioned"]
    by_name = {c.name: c for c in cases}
    assert len(by_name) == len(cases), "duplicate case names"
    for name in api_pick:
        for dt in ("float32", "float16"):
            cases.append(dataclasses.replace(by_name[name], name=f"api-{dt}-{name}",
                                             dtype=dt, api=True))
    return cases
