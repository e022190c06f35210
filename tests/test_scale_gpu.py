"""Scale tests: caches past 2^31 elements, B = 4096 decode, a 64k-token prefill, H = 256 with 64
heads, on both GPU backends (their envelopes cover all of these: H <= 256, B <= 65535 for mea,
fewer than 2^31 packed K/V rows).

One pair of caches of 9 * 2^28 elements each (2^31 + 2^28; 4.5 GiB in fp16/bf16) is viewed as
(num_blocks, block_size, Nkv, H) per scenario. Every block a sequence uses lies where its first
element is past 2^31 (the top of the cache, the very last block included), so any 32-bit
offset arithmetic reads or writes the wrong place. Everything else is NaN: a stray read shows
up as NaN in the output, a stray write as a changed NaN count.

Checked per scenario: the output has no NaN; every new token's K/V slot holds it (V bit-exact,
K within one rounding of the float32 rotation); every other slot of the used blocks is
unchanged; the NaN count of the unused region is unchanged; a sample of output rows matches
float32 attention computed here from the caches (tests/sampled_attention.py: a full NumPy
reference would take minutes) within tests/gpu_parity.py's budget.
"""
import dataclasses
import math
import zlib

import numpy as np
import pytest

try:
    from . import sampled_attention as sa
    from .gpu_parity import K_RTOL, OUT_TOL, host_dtype
    from .paged_cases import rel_err
except ImportError:
    import sampled_attention as sa
    from gpu_parity import K_RTOL, OUT_TOL, host_dtype
    from paged_cases import rel_err

CACHE_ELEMENTS = 9 * 2**28          # > 2^31; divisible by every scenario's block
OFFSET_FLOOR = 2**31                # every used block starts at or past this element
# 16-bit patterns: a quiet NaN, and the +inf that every finite |x| lies below
NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0}
INF_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    N: int
    Nkv: int
    H: int
    bs: int
    own: tuple                  # ((q_len, past tokens in the sequence's own blocks), ...)
    shared_prefix: int = 0      # read-only blocks every sequence starts with (prefix sharing)
    rotary: str = "none"
    R: int = 0                  # 0: H
    W: int = -1
    softcap: float = 0.0
    hole_every: int = 0         # every k-th sequence gets its first own past block unmapped
    samples: int = 64           # sequences (decode) or rows (long sequences) compared


def _decode_lens():
    rng = np.random.default_rng(4096)
    tails = rng.integers(0, 41, 4096)
    tails[::512] += 2000                                  # 8 long sequences
    return tuple((1, int(t)) for t in tails)


SCENARIOS = {
    # 4096 decode rows over a 36-block shared prefix: 2.5M keys in all, so mea's packed K/V
    # copy is itself past 2^31 elements
    "decode_b4096": Scenario("decode_b4096", N=32, Nkv=8, H=128, bs=16, own=_decode_lens(),
                             shared_prefix=36, rotary="neox", hole_every=97, samples=256),
    "prefill_64k_bs48": Scenario("prefill_64k_bs48", N=16, Nkv=4, H=128, bs=48,
                                 own=((65536, 0),), rotary="gptj", R=64, samples=48),
    "prefill_64k_bs256_window": Scenario("prefill_64k_bs256_window", N=16, Nkv=4, H=128,
                                         bs=256, own=((65536, 0),), W=5000, softcap=30.0,
                                         samples=48),
    "h256_n64": Scenario("h256_n64", N=64, Nkv=8, H=256, bs=16,
                         own=((700, 0), (1, 4000), (37, 900), (0, 100), (130, 2100), (1, 1)),
                         rotary="neox", hole_every=2, samples=40),
}


@pytest.fixture(scope="module")
def cache_buffers():
    """Two uint16 buffers of CACHE_ELEMENTS, viewed per scenario and dtype."""
    import cupy

    buffers = (cupy.empty(CACHE_ELEMENTS, dtype=cupy.uint16),
               cupy.empty(CACHE_ELEMENTS, dtype=cupy.uint16))
    yield buffers
    del buffers
    cupy.get_default_memory_pool().free_all_blocks()


def _layout(sc, rng):
    """(block_table, num_blocks, pasts, q_lens, used block ids) with every used block at the
    top of the cache, ids shuffled, the last block of the cache among them."""
    block_elems = sc.bs * sc.Nkv * sc.H
    num_blocks = CACHE_ELEMENTS // block_elems
    first_high = -(-OFFSET_FLOOR // block_elems)         # first block whose offset is >= 2^31
    q_lens = [q for q, _ in sc.own]
    own_past = [p for _, p in sc.own]
    pasts = [sc.shared_prefix * sc.bs + p for p in own_past]
    need = [-(-(p + q) // sc.bs) for p, q in zip(pasts, q_lens)]
    total = sc.shared_prefix + sum(n - sc.shared_prefix for n in need)
    pool = np.arange(first_high, num_blocks)
    assert total <= pool.size, f"{sc.name}: {total} blocks do not fit above 2^31"
    ids = rng.permutation(pool)[:total]
    if num_blocks - 1 not in ids:                        # the very last block is used too
        ids[rng.integers(total)] = num_blocks - 1
    ids = iter(ids.tolist())
    prefix = [next(ids) for _ in range(sc.shared_prefix)]
    table = np.full((len(need), max(need) + 2), -1, dtype=np.int32)
    for b, n in enumerate(need):
        table[b, :sc.shared_prefix] = prefix
        for i in range(sc.shared_prefix, n):
            table[b, i] = next(ids)
        if sc.hole_every and b % sc.hole_every == 0 and own_past[b] >= sc.bs:
            table[b, sc.shared_prefix] = -1                 # read-only: wholly before past
    used = np.unique(table[table >= 0])
    return table, num_blocks, pasts, q_lens, used


# Device arrays are handled as 16-bit patterns (uint16) with float32 arithmetic on them, and
# viewed as float16 / bfloat16 only for the call: no CuPy elementwise op ever runs on bf16.
def to_bits(cupy, x32, dtype):
    """float32 -> fp16 / bf16 bit patterns (round to nearest even; x finite)."""
    if dtype == "float16":
        return x32.astype(cupy.float16).view(cupy.uint16)
    u = x32.view(cupy.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(cupy.uint16)


def to_f32(cupy, bits16, dtype):
    """fp16 / bf16 bit patterns -> float32."""
    if dtype == "float16":
        return bits16.view(cupy.float16).astype(cupy.float32)
    return (bits16.astype(cupy.uint32) << 16).view(cupy.float32)


def _random(cupy, gen, shape, dtype, low=None):
    """(bits, float32 of the rounded values): standard normal, or uniform in [low, -low]."""
    x = (gen.standard_normal(shape, dtype=cupy.float32) if low is None else
         gen.random(shape, dtype=cupy.float32) * (-2 * low) + low)
    b = to_bits(cupy, x, dtype)
    return b, to_f32(cupy, b, dtype)


def _nan_count(cupy, buf, dtype):
    """NaNs (any payload) among the fp16 / bf16 bit patterns of a uint16 buffer, in chunks."""
    total, step = 0, 1 << 28
    for lo in range(0, buf.size, step):
        total += int(cupy.count_nonzero((buf[lo:lo + step] & 0x7FFF) > INF_BITS[dtype]))
    return total


def _expected_rows(cupy, sc, dtype, q32, kb, vb, table, pasts, cum, cos32, sin32, picks):
    """Float32 attention of the picked (sequence, row-in-sequence) pairs, grouped by sequence,
    from the caches' bit patterns kb / vb as the call left them."""
    N, H = sc.N, sc.H
    got_rows, want = [], []
    by_seq = {}
    for b, j in picks:
        by_seq.setdefault(b, []).append(j)
    for b, js in by_seq.items():
        js = np.array(sorted(js))
        rows = cum[b] + js
        pos = pasts[b] + js
        qr = q32[cupy.asarray(rows)].reshape(len(js), N, H)
        if sc.rotary != "none":
            p = cupy.asarray(pos)
            qr = sa.rotate(cupy, qr, cos32[p], sin32[p], sc.rotary == "gptj")
        keys, values, mapped = sa.sequence_keys(
            cupy, kb, vb, cupy.asarray(table[b]), int(pos.max()) + 1,
            to_float32=lambda a: to_f32(cupy, a, dtype))
        want.append(sa.attention_rows(cupy, qr, pos, keys, values, mapped, scale=0.0,
                                      softcap=sc.softcap, window=sc.W))
        got_rows.extend(rows.tolist())
    return got_rows, cupy.concatenate(want)


def _picks(sc, rng, q_lens, pasts):
    """(sequence, row) pairs to compare: sampled sequences (all their rows when few) with the
    first, the last and the long ones; for one long sequence, boundary rows and random rows."""
    B = len(q_lens)
    if B > 1:
        seqs = [b for b in range(B) if q_lens[b]]
        pick = set(rng.choice(seqs, min(sc.samples, len(seqs)), replace=False).tolist())
        pick |= {seqs[0], seqs[-1]} | {b for b in seqs if pasts[b] > 1000}
        return [(b, j) for b in sorted(pick) for j in
                (range(q_lens[b]) if q_lens[b] <= 40 else
                 sorted({0, q_lens[b] - 1} | set(rng.integers(0, q_lens[b], 16).tolist())))]
    n, bs = q_lens[0], sc.bs
    fixed = {0, 1, bs - 1, bs, n // 2, n - bs, n - 2, n - 1, 4095, 4096, 32767}
    return [(0, j) for j in sorted(fixed | set(rng.integers(0, n, sc.samples).tolist()))
            if 0 <= j < n]


def run_scenario(sc, backend, dtype, buffers):
    import cupy

    import cupy_paged

    rng = np.random.default_rng(zlib.crc32(f"{sc.name}-{dtype}".encode()))
    lowp = host_dtype(dtype)
    table, num_blocks, pasts, q_lens, used = _layout(sc, rng)
    B, T, N, Nkv, H, bs = len(q_lens), sum(q_lens), sc.N, sc.Nkv, sc.H, sc.bs
    block_elems = bs * Nkv * H
    kb, vb = (buf.reshape(num_blocks, bs, Nkv, H) for buf in buffers)
    used_d = cupy.asarray(used)
    gen = cupy.random.default_rng(int(rng.integers(2**31)))
    for c in (kb, vb):
        c.fill(NAN_BITS[dtype])
        for lo in range(0, used.size, 4096):                  # bounded float32 temporaries
            part = used_d[lo:lo + 4096]
            c[part] = _random(cupy, gen, (part.size, bs, Nkv, H), dtype)[0]
    before = [c[used_d] for c in (kb, vb)]                    # copies (fancy indexing)
    nan_before = [_nan_count(cupy, buf, dtype) for buf in buffers]
    assert nan_before[0] == (num_blocks - used.size) * block_elems

    qb, q32 = _random(cupy, gen, (T, N * H), dtype)
    kbits, k32 = _random(cupy, gen, (T, Nkv * H), dtype)
    vbits, _ = _random(cupy, gen, (T, Nkv * H), dtype)
    cos = sin = cos32 = sin32 = None
    if sc.rotary != "none":
        rows = max(p + ql for p, ql in zip(pasts, q_lens)) + 1
        half = (sc.R or H) // 2
        cosb, cos32 = _random(cupy, gen, (rows, half), dtype, low=-1.0)
        sinb, sin32 = _random(cupy, gen, (rows, half), dtype, low=-1.0)
        cos, sin = cosb.view(lowp), sinb.view(lowp)
    cum = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    out_bits = cupy.full((T, N * H), NAN_BITS[dtype], dtype=cupy.uint16)
    cupy_paged.paged_attention(
        qb.view(lowp), kbits.view(lowp), vbits.view(lowp), kb.view(lowp), vb.view(lowp),
        cupy.asarray(cum), cupy.asarray(np.array(pasts, np.int32)), cupy.asarray(table),
        cos, sin, num_heads=N, kv_num_heads=Nkv, softcap=sc.softcap, local_window_size=sc.W,
        do_rotary=sc.rotary != "none", rotary_interleaved=sc.rotary == "gptj",
        backend=backend, out=out_bits.view(lowp))
    cupy.cuda.Device().synchronize()
    tag = f"{sc.name} [{backend}, {dtype}]"
    assert bool(((out_bits & 0x7FFF) < INF_BITS[dtype]).all()), f"{tag}: NaN/inf in the output"

    # every new token's slot, then every other slot of the used blocks, then the NaN region
    tok_b = np.repeat(np.arange(B), q_lens)
    tok_p = np.array(pasts)[tok_b] + np.arange(T) - cum[:-1][tok_b]
    blk = table[tok_b, tok_p // bs]
    w = blk >= 0
    slot = (cupy.asarray(blk[w]), cupy.asarray(tok_p[w] % bs))
    tokens = cupy.asarray(np.flatnonzero(w))
    assert bool((vb[slot] == vbits.reshape(T, Nkv, H)[tokens]).all()), \
        f"{tag}: value_cache slots of the new tokens differ from value"
    if sc.rotary != "none":
        pos = cupy.asarray(tok_p[w])
        want_k = sa.rotate(cupy, k32.reshape(T, Nkv, H)[tokens], cos32[pos], sin32[pos],
                           sc.rotary == "gptj")
        tol = K_RTOL[dtype]
        diff = cupy.abs(to_f32(cupy, kb[slot], dtype) - want_k)
        assert bool((diff <= tol + tol * cupy.abs(want_k)).all()), \
            f"{tag}: rotated key_cache slots differ (max |diff| {float(diff.max()):.3e})"
    else:
        assert bool((kb[slot] == kbits.reshape(T, Nkv, H)[tokens]).all()), \
            f"{tag}: key_cache slots of the new tokens differ from key"
    written = np.zeros((used.size, bs), dtype=bool)
    written[np.searchsorted(used, blk[w]), tok_p[w] % bs] = True
    written_d = cupy.asarray(written)
    for name, c, old in (("key_cache", kb, before[0]), ("value_cache", vb, before[1])):
        changed = (c[used_d] != old).any(axis=(2, 3))
        assert not bool((changed & ~written_d).any()), \
            f"{tag}: {name} changed in used blocks outside the new tokens' slots"
    del before
    nan_after = [_nan_count(cupy, buf, dtype) for buf in buffers]
    assert nan_after == nan_before, f"{tag}: a write landed in the unused (NaN) region"

    # sampled output rows against float32 attention from the caches
    picks = _picks(sc, rng, q_lens, pasts)
    rows, want = _expected_rows(cupy, sc, dtype, q32, kb, vb, table, pasts, cum, cos32, sin32,
                                picks)
    got = to_f32(cupy, out_bits[cupy.asarray(rows)], dtype)
    err = rel_err(cupy.asnumpy(got), cupy.asnumpy(want))
    assert err <= OUT_TOL[dtype], \
        f"{tag}: relative error {err:.3e} > {OUT_TOL[dtype]} over {len(rows)} sampled rows"
    print(f"{tag}: {T} tokens, {used.size} blocks above 2^31, rel err {err:.2e} over "
          f"{len(rows)} rows")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["flash", "mea"])
@pytest.mark.parametrize("name", ["decode_b4096", "prefill_64k_bs48",
                                  "prefill_64k_bs256_window"])
def test_scale_fp16(name, backend, cache_buffers):
    run_scenario(SCENARIOS[name], backend, "float16", cache_buffers)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", ["flash", "mea"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_head_size_256_with_64_heads(dtype, backend, cache_buffers):
    run_scenario(SCENARIOS["h256_n64"], backend, dtype, cache_buffers)


def test_scenarios_fit_above_2_31():
    """Host-side sanity of the layouts (no GPU): every used block starts past 2^31 elements."""
    for sc in SCENARIOS.values():
        table, num_blocks, pasts, q_lens, used = _layout(sc, np.random.default_rng(0))
        block_elems = sc.bs * sc.Nkv * sc.H
        assert CACHE_ELEMENTS % block_elems == 0 and num_blocks * block_elems > OFFSET_FLOOR
        assert int(used.min()) * block_elems >= OFFSET_FLOOR and num_blocks - 1 in used
        assert all(p + q <= table.shape[1] * sc.bs for p, q in zip(pasts, q_lens))
        assert math.prod((num_blocks, sc.bs, sc.Nkv, sc.H)) == CACHE_ELEMENTS
