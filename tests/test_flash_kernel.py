"""The flash backend's attention kernel: cuda_src/flash/ driven by backends/_flash_kernels.py.

CPU (CI): every instantiation "auto" can pick on sm_80 compiles for sm_80, one per template for
sm_86 / sm_89 / sm_90; the block-size division, tile budgets, split heuristic, and a NumPy model
of the kernel's tile -> (sequence, rows, key tiles, split) arithmetic. GPU: ``launch_flash``
against the NumPy reference on float32 copies of the fp16 / bf16 inputs (the new K/V are written
into the caches on the host), output poisoned with NaN first, rows that see no key exactly 0.
``python tests/test_flash_kernel.py`` times one prefill and one decode (CUDA events).
"""
import dataclasses
import math
import os
import re
import time
import zlib

import numpy as np
import pytest

from cupy_paged._validate import Problem
from cupy_paged.backends import _flash_kernels as fk
from cupy_paged.backends import _flash_policy as policy
from cupy_paged.backends import _flash_tiles as tiles
from cupy_paged.reference import paged_attention_reference

try:
    from .paged_cases import Case, make_inputs, rel_err
except ImportError:
    from paged_cases import Case, make_inputs, rel_err

OUT_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}
ELF_MAGIC = b"\x7fELF"


@pytest.fixture(scope="module")
def flash_cache_dir(tmp_path_factory):
    """One compile cache for the module's compile tests (never the user's)."""
    old = os.environ.get("CUPY_PAGED_CACHE_DIR")
    os.environ["CUPY_PAGED_CACHE_DIR"] = str(tmp_path_factory.mktemp("flash_cache"))
    yield
    if old is None:
        os.environ.pop("CUPY_PAGED_CACHE_DIR")
    else:
        os.environ["CUPY_PAGED_CACHE_DIR"] = old


def make_problem(T, B, N, Nkv, H, bs, num_blocks, max_blocks, dtype="float16", scale=0.0,
                 softcap=0.0, window=-1, max_seqlen_q=None, max_seqlen_k=None):
    return Problem(num_tokens=T, batch=B, num_heads=N, kv_num_heads=Nkv, head_size=H,
                   block_size=bs, num_blocks=num_blocks, max_blocks=max_blocks, packed=False,
                   dtype=dtype, scale=scale if scale > 0 else 1.0 / math.sqrt(H),
                   softcap=softcap, window=window, do_rotary=False, rotary_interleaved=False,
                   rotary_dim=0, cos_rows=0, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)


# ---------------------------------------------------------------- CPU: compiles


def _check_cubins(results):
    for r in results:
        data = r.path.read_bytes()
        assert data[:4] == ELF_MAGIC, f"{r.name} ({r.arch}): not an ELF cubin"
        assert r.name.encode() in data, f"{r.name}: extern \"C\" entry missing from the cubin"


def test_flash_compile_every_sm80_instantiation(flash_cache_dir):
    from cupy_paged.jit import compile_many

    names = fk.all_variant_names("sm80")
    start = time.perf_counter()
    results = compile_many([(n, "sm_80") for n in names])
    print(f"\ncompiled {len(results)} flash kernels for sm_80 in "
          f"{time.perf_counter() - start:.1f} s wall ({sum(r.seconds for r in results):.1f} s "
          "NVRTC)")
    _check_cubins(results)


@pytest.mark.parametrize("arch", ["sm_86", "sm_89", "sm_90"])
def test_flash_compile_each_template_for(arch, flash_cache_dir):
    from cupy_paged.jit import compile_many

    cls = tiles.arch_class(int(arch[3:]))
    picks = tiles.all_tiles(cls)
    names = [fk._register_fwd("float16", picks[0]), fk._register_fwd("bfloat16", picks[-1]),
             fk._register_combine("float16"), fk._register_combine("bfloat16")]
    start = time.perf_counter()
    results = compile_many([(n, arch) for n in names])
    print(f"\ncompiled {names} for {arch} in {time.perf_counter() - start:.1f} s")
    _check_cubins(results)


# ---------------------------------------------------------------- CPU: policy


def test_flash_variant_names_are_readable_and_unique():
    names = fk.all_variant_names("sm80") + fk.all_variant_names("sm86")[:-2]  # one combine
    assert len(names) == len(set(names))
    pattern = re.compile(
        r"flash_fwd_(f16|bf16)_h\d+_m\d+_n\d+_w\d(_k\d)?_s\d(_swz)?_sm8[06]|flash_combine_b?f16")
    assert all(pattern.fullmatch(n) for n in names), names
    decode = make_problem(T=4, B=4, N=8, Nkv=2, H=128, bs=16, num_blocks=64, max_blocks=16)
    # decode (G rows per kv head): one 16-row fragment, four warps splitting each key tile
    assert fk.variant_name(decode, 80) == "flash_fwd_f16_h128_m16_n64_w4_k4_s3_swz_sm80"
    # swizzled rows only where the head is whole 128-byte lines of a power-of-two chunk count
    assert "_swz_" not in fk.variant_name(dataclasses.replace(decode, head_size=96), 80)
    assert "_swz_" in fk.variant_name(dataclasses.replace(decode, head_size=256), 86)
    batch_decode = make_problem(T=64, B=64, N=32, Nkv=8, H=128, bs=16, num_blocks=64,
                                max_blocks=1)
    assert "_m16_n64_w4_k4_" in fk.variant_name(batch_decode, 90)  # T / B = 1 without a hint
    prefill = dataclasses.replace(batch_decode, num_tokens=64 * 100)
    assert "_m128_" in fk.variant_name(prefill, 90)
    assert "_m64_" in fk.variant_name(dataclasses.replace(prefill, max_seqlen_q=8), 90)
    assert fk.variant_name(decode, 90).endswith("_sm80")   # sm90 runs the sm80 code
    assert fk.variant_name(decode, 86).endswith("_sm86")
    odd = make_problem(T=100, B=1, N=8, Nkv=8, H=40, bs=3, num_blocks=64, max_blocks=40,
                       dtype="bfloat16")
    assert fk.variant_name(odd, 80).startswith("flash_fwd_bf16_h64_m128_")  # 40 pads to 64
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        fk.variant_name(dataclasses.replace(decode, dtype="float32"), 80)
    with pytest.raises(ValueError, match="head_size 264"):
        tiles.padded_head(264)


def test_flash_overlaps_launches_only_when_the_gpu_time_dominates():
    # benchmarks/host_overhead.py's step (B = 8, 101 keys): host bound, plain launches
    step = make_problem(T=8, B=8, N=32, Nkv=8, H=128, bs=16, num_blocks=56, max_blocks=7)
    assert not policy.overlap_launches(step)
    # decode 64 x 4096 (1 GB of K/V) and prefill 8 x 2048 (compute): programmatic launches
    decode = make_problem(T=64, B=64, N=32, Nkv=8, H=128, bs=16, num_blocks=16384,
                          max_blocks=256)
    prefill = make_problem(T=16384, B=8, N=32, Nkv=8, H=128, bs=16, num_blocks=1024,
                           max_blocks=128)
    assert policy.overlap_launches(decode) and policy.overlap_launches(prefill)
    # a host bound on the keys shrinks the estimate
    assert not policy.overlap_launches(dataclasses.replace(decode, max_seqlen_k=16))
    assert policy.overlap_launches(decode, threshold_us=0.0) and not policy.overlap_launches(
        decode, threshold_us=1e9)                       # the threshold the plan passes


def test_flash_swizzled_tile_needs_a_line_sized_head():
    with pytest.raises(ValueError, match="swizzled tile needs head in"):
        tiles.Tile(96, 16, 64, 4, 3, "sm80", key_warps=4, swizzle=True)
    padded = tiles.Tile(128, 16, 64, 4, 3, "sm80", key_warps=4)
    swizzled = dataclasses.replace(padded, swizzle=True)
    # rows of 128 elements instead of 136, plus 4 slots (stages + 1) of 8-byte key offsets
    assert padded.smem_bytes - swizzled.smem_bytes == (16 + 6 * 64) * 8 * 2 - 8 * 4 * 64


@pytest.mark.parametrize("arch", ["sm80", "sm86"])
def test_flash_tiles_fit_shared_memory(arch):
    for tile in tiles.all_tiles(arch):
        assert tile.smem_bytes <= tiles.SMEM_LIMIT[arch], tile
        assert tile.bm % (16 * (tile.warps // tile.key_warps)) == 0
        assert tile.warp_keys % 16 == 0 and tile.warps % tile.key_warps == 0
    heads = {t.head for t in tiles.all_tiles(arch)}
    assert heads == set(tiles.HEAD_SIZES)


@pytest.mark.parametrize("block_size", list(range(1, 70)) + [96, 100, 255, 256, 257, 511, 512,
                                                             1000, 4097, 65535, 1 << 20])
def test_flash_block_divisor_is_exact(block_size):
    bs, shift, magic, mshift = fk.block_divisor(block_size)
    assert bs == block_size and 0 <= magic < 2 ** 32
    rng = np.random.default_rng(block_size)
    ns = [0, 1, block_size - 1, block_size, block_size + 1, 2 ** 31 - 1, 2 ** 31 - block_size]
    ns += [int(x) for x in rng.integers(0, 2 ** 31, 2000)]
    for n in ns:
        q = n >> shift if shift >= 0 else ((n * magic) >> 32) >> mshift  # __umulhi then shift
        assert q == n // block_size, (block_size, n)


def test_flash_split_heuristic():
    sms = 132
    long_decode = make_problem(T=1, B=1, N=32, Nkv=8, H=128, bs=16, num_blocks=2048,
                               max_blocks=2048)
    s = policy.plan_splits(long_decode, sms, 90)
    assert 8 <= s <= 64, s                          # 8 units on 132 SMs: split the keys
    short_decode = dataclasses.replace(long_decode, max_blocks=4)
    assert policy.plan_splits(short_decode, sms, 90) == 1   # 64 keys: nothing to split
    prefill = make_problem(T=8 * 2048, B=8, N=32, Nkv=8, H=128, bs=16, num_blocks=8192,
                           max_blocks=128)
    assert policy.plan_splits(prefill, sms, 90) == 1
    batch_decode = make_problem(T=64, B=64, N=32, Nkv=8, H=128, bs=16, num_blocks=16384,
                                max_blocks=256)
    assert 1 <= policy.plan_splits(batch_decode, sms, 90) <= 4
    hinted = dataclasses.replace(long_decode, max_seqlen_k=64)
    assert policy.plan_splits(hinted, sms, 90) == 1         # the key hint bounds the splits
    assert policy.workspace_shape(long_decode, s) == ((s, 32, 128), (s, 32))


# ---------------------------------------------------------------- CPU: the kernel's arithmetic


def _kernel_tiles(cum, past, G, bm, bn, window, splits):
    """NumPy model of flash/cta_tile.cuh's index math: grid tile -> (b, row0, rows, splits' key
    tile ranges, first/last row positions)."""
    B, T = len(past), int(cum[-1])

    def first_tile(b):
        return (int(cum[b]) * G + bm - 1) // bm + b

    grid_x = -(-T * G // bm) + B
    assert first_tile(B) == grid_x
    out = []
    for block in range(grid_x):
        tile = grid_x - 1 - block
        lo, hi = 0, B
        while hi - lo > 1:
            mid = lo + (hi - lo) // 2
            lo, hi = (mid, hi) if first_tile(mid) <= tile else (lo, mid)
        b = lo
        rows = (int(cum[b + 1]) - int(cum[b])) * G
        m = tile - first_tile(b)
        if m < 0 or m * bm >= rows:
            continue
        row0 = m * bm
        p_first = int(past[b]) + row0 // G
        p_last = int(past[b]) + (min(row0 + bm, rows) - 1) // G
        k_lo = max(p_first - window + 1, 0) if window > 0 else 0
        t_lo, t_hi = k_lo // bn, p_last // bn + 1
        n = max(t_hi - t_lo, 0)
        per = -(-n // splits)
        ranges = [(t_lo + min(s * per, n), t_lo + min((s + 1) * per, n)) for s in range(splits)]
        out.append((b, row0, rows, ranges, p_first, p_last))
    return out


def test_flash_scalars_travel_as_one_struct_in_field_order():
    """The plan's scalars are one (1,) structured array whose fields mirror the C struct
    (8-byte pointers, then 4-byte fields, padding only at the tail), filled from the problem;
    the kernel takes that one struct."""
    problem = make_problem(T=70, B=3, N=32, Nkv=8, H=128, bs=48, num_blocks=200,
                           max_blocks=40, softcap=30.0, window=100)
    s = fk.forward_params(problem, 3)
    struct = fk.FWD_PARAMS
    assert s.shape == (1,) and s.dtype == struct.dtype
    fields = 8 * len(struct.pointers) + 4 * len(struct.scalars)
    assert s.dtype.itemsize == -(-fields // 8) * 8          # only tail padding
    assert list(s.dtype.names) == [name for _, name in struct.fields]
    bs, shift, magic, magic_shift = fk.block_divisor(48)
    want = dict(num_tokens=70, batch=3, num_heads=32, kv_heads=8, head_size=128, group=4,
                block_size=bs, block_shift=shift, block_magic=magic,
                block_magic_shift=magic_shift, num_blocks=200, max_blocks=40, window=100,
                num_splits=3)
    for name, value in want.items():
        assert int(s[0][name]) == value, name
    assert math.isclose(float(s[0]["cap_in"]), problem.scale / 30.0, rel_tol=1e-6)
    assert math.isclose(float(s[0]["cap_out"]), 30.0 * math.log2(math.e), rel_tol=1e-6)
    spec_entry = fk._register_fwd("float16", policy.problem_tile(problem, 90))
    from cupy_paged.jit import get_spec
    code = get_spec(spec_entry).entry_code
    assert struct.size_check in code and struct.scalars_definition in code
    assert f"const {struct.scalars_cname} s)" in code and f"const {struct.cname} p{{" in code


@pytest.mark.parametrize("seed", range(6))
def test_flash_tile_arithmetic_covers_every_row_and_visible_key(seed):
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 12))
    q_lens = rng.integers(0, 40, B) * (rng.random(B) < 0.8)
    past = rng.integers(0, 300, B)
    cum = np.concatenate([[0], np.cumsum(q_lens)])
    G, bm, bn = int(rng.choice([1, 2, 3, 8])), int(rng.choice([16, 64, 128])), 64
    window = int(rng.choice([-1, 1, 7, 100]))
    splits = int(rng.choice([1, 2, 5]))
    seen = {}
    for b, row0, rows, ranges, p_first, p_last in _kernel_tiles(cum, past, G, bm, bn, window,
                                                                 splits):
        covered = [t for lo, hi in ranges for t in range(lo, hi)]
        assert covered == sorted(set(covered)), "splits overlap"
        for r in range(row0, min(row0 + bm, rows)):
            assert (b, r) not in seen, "row handled twice"
            seen[(b, r)] = True
            p = int(past[b]) + r // G
            visible = [k for k in range(p + 1) if window <= 0 or k > p - window]
            assert {k // bn for k in visible} <= set(covered), "visible key outside the tiles"
            for t in covered:   # a tile the kernel treats as unmasked is fully visible
                k0 = t * bn
                need_mask = k0 + bn - 1 > p_first or (window > 0 and k0 <= p_last - window)
                if not need_mask:
                    assert all(k in visible for k in range(k0, k0 + bn))
    assert len(seen) == int(q_lens.sum()) * G, "some rows were not handled"


# ---------------------------------------------------------------- GPU helpers


def _bf16_bits(x):
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def _to_low(x, dtype):
    """float32 -> the GPU's 16-bit storage (float16, or bfloat16 bits as uint16)."""
    return x.astype(np.float16) if dtype == "float16" else _bf16_bits(x)


def _from_low(x, dtype):
    if dtype == "float16":
        return x.astype(np.float32)
    return (x.astype(np.uint32) << 16).view(np.float32)


def _rows_seeing_no_key(inp):
    """Rows of out whose query sees no key (vectorised: prefix counts of mapped positions)."""
    table, bs, W = inp.args[7], inp.args[3].shape[1], inp.kwargs["local_window_size"]
    rows, t = [], 0
    for b, (q, past) in enumerate(zip(inp.q_lens, inp.pasts)):
        k = np.arange(past + q)
        mapped = table[b][k // bs] >= 0
        count = np.concatenate([[0], np.cumsum(mapped)])
        p = past + np.arange(q)
        lo = np.maximum(p - W + 1, 0) if W > 0 else np.zeros_like(p)
        rows += list(t + np.nonzero(count[p + 1] - count[lo] == 0)[0])
        t += q
    return rows


def _nan_out(shape, dtype):
    import cupy
    if dtype == "float16":
        return cupy.full(shape, np.nan, dtype=cupy.float16)
    return cupy.full(shape, 0x7FC0, dtype=cupy.uint16)


def _device_sm():
    import cupy
    return int(cupy.cuda.Device().compute_capability)


def run_flash(case, dtype, seed, num_splits=None, tile=None, **hints):
    """Runs ``case`` (rotary none: q is already rotated) through launch_flash (``tile``: the
    tile to run, None: the heuristic's); returns (relative error, number of rows that see no
    key)."""
    import cupy

    inp = make_inputs(dataclasses.replace(case, dtype="float32", rotary="none", packed=False),
                      np.random.default_rng(seed))
    query, key, value, kc, vc, cum, past, table = inp.args[:8]
    host = [_from_low(_to_low(x, dtype), dtype) for x in (query, key, value, kc, vc)]
    q32, k32, v32, kc32, vc32 = host
    ref = paged_attention_reference(q32, k32, v32, kc32, vc32, cum, past, table, **inp.kwargs)
    # kc32 / vc32 now hold the new tokens too: that is what the prologue leaves in the caches.
    T, N, Nkv, H = q32.shape[0], case.N, case.Nkv, kc.shape[3]
    problem = make_problem(T, len(past), N, Nkv, H, kc.shape[1], kc.shape[0], table.shape[1],
                           dtype, case.scale, case.softcap, case.W, **hints)
    dev = dict(q=cupy.asarray(_to_low(q32, dtype)), kc=cupy.asarray(_to_low(kc32, dtype)),
               vc=cupy.asarray(_to_low(vc32, dtype)), cum=cupy.asarray(cum),
               past=cupy.asarray(past), table=cupy.asarray(table))
    out = _nan_out((T, N * H), dtype)
    fk.launch_flash(problem, dev["q"], dev["kc"], dev["vc"], dev["cum"], dev["past"],
                    dev["table"], out, _device_sm(), num_splits=num_splits, tile=tile)
    got = _from_low(cupy.asnumpy(out), dtype)
    tag = f"{case.name} [{dtype}, splits={num_splits}]"
    assert np.isfinite(got).all(), f"{tag}: NaN/inf in the output (unwritten rows?)"
    err = rel_err(got, ref)
    assert err <= OUT_TOL[dtype], f"{tag}: relative error {err:.3e} > {OUT_TOL[dtype]}"
    empty = _rows_seeing_no_key(inp)
    for t in empty:
        assert np.all(got[t] == 0), f"{tag}: row {t} sees no key but is not 0"
    print(f"{tag}: rel err {err:.2e}, {len(empty)} rows see no key")
    return err, len(empty)


@pytest.fixture(scope="module")
def flash_compiled():
    """Builds every instantiation for the device's arch at once, in parallel (the tests then
    load cubins from the cache instead of compiling one by one)."""
    from cupy_paged.jit import compile_many

    sm = _device_sm()
    names = fk.all_variant_names(tiles.arch_class(sm))
    start = time.perf_counter()
    compile_many([(n, f"sm_{sm}") for n in names])
    print(f"\nflash: {len(names)} kernels ready for sm_{sm} in {time.perf_counter() - start:.1f} s")
    return sm


# ---------------------------------------------------------------- GPU: the parity matrix

HEAD_SIZES = [32, 64, 80, 96, 128, 160, 192, 256, 40, 8]
HEADS = [(4, 4), (8, 4), (6, 2), (8, 2), (16, 2), (7, 1), (32, 8)]   # G = 1, 2, 3, 4, 8, N, 4
BLOCK_SIZES = [1, 3, 16, 64, 256, 512]
WINDOWS = [-1, 1, 7, 100]
SOFTCAPS = [(0.0, 0.0), (1.0, 0.3), (50.0, 0.05)]     # (softcap, custom scale; 0 = default)
MODES = ["mixed", "decode", "prefill", "chunk"]


def _matrix():
    import itertools
    cyc = itertools.cycle
    h, hd, bs, w, sc, mode = (cyc(x) for x in (HEAD_SIZES, HEADS, BLOCK_SIZES, WINDOWS,
                                                SOFTCAPS, MODES))
    cases = []
    for i in range(40):
        H, (N, Nkv), block, W, (cap, scale), m = next(h), next(hd), next(bs), next(w), \
            next(sc), next(mode)
        if i % 4 == 3:
            next(hd)
        cases.append(Case(f"m{i}_H{H}_N{N}x{Nkv}_bs{block}_W{W}_cap{cap}_{m}", mode=m,
                          B=3 + i % 5, N=N, Nkv=Nkv, H=H, bs=block, W=W, softcap=cap,
                          scale=scale, q_gain=8.0 if cap == 1.0 else 1.0, holes=i % 3,
                          spare=i % 7))
    return cases


EDGE_CASES = [
    Case("qlen0_everywhere", lens=((0, 5), (3, 0), (0, 0), (4, 17), (0, 40)), H=64, bs=16),
    Case("holes_rows_see_nothing", lens=((6, 10), (4, 3), (5, 0)), H=64, bs=1, holes=6, W=1,
         N=4, Nkv=2),
    Case("unmapped_rows", lens=((3, 4), (2, 6), (1, 0)), unmapped=(1,), H=128, bs=4),
    Case("shared_prefix", mode="shared", B=4, share=2, H=64, bs=8),
    Case("capacity_exact", lens=((5, 11), (16, 0)), H=96, bs=16),
    Case("cross_many_blocks", lens=((40, 3),), H=64, bs=3, N=6, Nkv=3),
    Case("mqa_prefill_G16", lens=((300, 50), (17, 0)), N=16, Nkv=1, H=64, bs=16, W=100),
    Case("batch1000_decode", mode="decode", B=1000, N=6, Nkv=3, H=64, bs=32),
    Case("odd_heads_H40", lens=((5, 7), (33, 64)), N=9, Nkv=3, H=40, bs=16, softcap=5.0),
    Case("over_provisioned", lens=((3, 2),), spare=500, extra_cols=5, H=64, bs=16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", _matrix() + EDGE_CASES, ids=lambda c: c.name)
def test_flash_matches_reference(case, dtype, flash_compiled):
    run_flash(case, dtype, zlib.crc32(f"{case.name}-{dtype}".encode()))


LONG_DECODE = Case("decode_ctx_1_to_32k", lens=((1, 4095), (1, 0), (1, 777), (1, 32767)),
                   N=8, Nkv=2, H=128, bs=16, holes=3)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1, 3, 20, 64])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_long_decode_split_kv(splits, dtype, flash_compiled):
    run_flash(LONG_DECODE, dtype, 11, num_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 1])
def test_flash_long_decode_window_softcap_gqa8(splits, flash_compiled):
    case = Case("decode_W100_cap50_G8", lens=((1, 20000), (1, 99), (1, 5000)), N=16, Nkv=2,
                H=256, bs=64, W=100, softcap=50.0, scale=0.05)
    run_flash(case, "bfloat16", 12, num_splits=splits)
    case = dataclasses.replace(case, name="decode_W-1_H64_bs512", H=64, bs=512, W=-1)
    run_flash(case, "float16", 13, num_splits=splits)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_flash_long_prefill(dtype, flash_compiled):
    case = Case("prefill_3000", lens=((3000, 0), (0, 9), (517, 1200)), N=8, Nkv=2, H=128,
                bs=16, holes=2)
    run_flash(case, dtype, 14)
    case = dataclasses.replace(case, name="prefill_3000_W1000_H80", H=80, W=1000, bs=256)
    run_flash(case, dtype, 15, num_splits=2)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", [tiles.Tile(128, 64, 32, 4, 4, "sm80"),
                                  tiles.Tile(128, 128, 64, 4, 3, "sm80"),
                                  tiles.Tile(128, 16, 64, 1, 2, "sm80"),
                                  tiles.Tile(128, 128, 64, 4, 2, "sm80"),  # padded prefill
                                  tiles.Tile(128, 64, 32, 4, 4, "sm80", swizzle=True)],
                         ids=lambda t: fk.fwd_name("float16", t))
def test_flash_other_tiles_and_deeper_pipelines(tile, flash_compiled):
    """Tiles the heuristic does not pick today (STAGES 3 and 4, one warp, padded rows at
    head 128, swizzled rows with 4 stages) stay correct."""
    case = Case("tiles", lens=((1, 3000), (70, 500), (0, 3), (200, 0)), N=8, Nkv=2, H=128,
                bs=16, holes=4, W=1000)
    run_flash(case, "float16", 19, tile=tile)
    run_flash(case, "bfloat16", 20, num_splits=3, tile=tile)


KEY_SPLIT_TILES = [tiles.Tile(128, 16, 64, 4, 3, "sm80", key_warps=4, swizzle=True),  # the pick
                   tiles.Tile(128, 16, 64, 4, 3, "sm80", key_warps=4),   # padded rows
                   tiles.Tile(128, 16, 64, 4, 2, "sm80", key_warps=4),
                   tiles.Tile(128, 16, 128, 4, 2, "sm80", key_warps=4, swizzle=True),  # 32 keys/warp
                   tiles.Tile(128, 32, 64, 4, 2, "sm80", key_warps=2),   # 2 row groups of 2
                   tiles.Tile(128, 32, 64, 4, 2, "sm80", key_warps=2, swizzle=True),
                   tiles.Tile(128, 16, 32, 2, 2, "sm86", key_warps=2, swizzle=True)]  # sm86 pick
KEY_SPLIT_CASES = [
    Case("ks_decode_ctx", lens=((1, 4095), (1, 0), (1, 777), (1, 3000)), N=8, Nkv=2, H=128,
         bs=16, holes=3),
    Case("ks_chunks_window", lens=((4, 300), (3, 0), (1, 60), (2, 1000)), N=16, Nkv=2, H=128,
         bs=3, W=50, softcap=30.0, scale=0.05),
    Case("ks_mha_prefill", lens=((40, 7), (0, 9), (17, 0)), N=4, Nkv=4, H=128, bs=64,
         holes=2),
    Case("ks_mqa_g16", lens=((1, 2000), (2, 33)), N=16, Nkv=1, H=128, bs=1, W=700),
]


@pytest.mark.gpu
@pytest.mark.parametrize("tile", KEY_SPLIT_TILES, ids=lambda t: fk.fwd_name("float16", t))
@pytest.mark.parametrize("case", KEY_SPLIT_CASES, ids=lambda c: c.name)
def test_flash_key_split_tiles_match_reference(tile, case, flash_compiled):
    """Decode tiles whose warps split each key tile: every slice's partial softmax merged
    (rows that see keys in only some slices, none at all, holes, windows, softcap, G = 1 to 16,
    split-KV on top), against the reference."""
    run_flash(case, "float16", zlib.crc32(case.name.encode()), tile=tile)
    run_flash(case, "bfloat16", 21, num_splits=3, tile=tile)


@pytest.mark.gpu
def test_flash_hints_pick_smaller_tiles(flash_compiled):
    case = Case("hinted", lens=((5, 11), (16, 0), (1, 40)), H=64, bs=16, N=8, Nkv=2)
    run_flash(case, "float16", 16, max_seqlen_q=16, max_seqlen_k=41)


@pytest.mark.gpu
def test_flash_cache_past_2_31_elements(flash_compiled):
    """Blocks at the end of a cache of more than 2^31 elements: 64-bit offsets."""
    import cupy

    bs, Nkv, H, N = 256, 8, 128, 16
    num_blocks = (1 << 31) // (bs * Nkv * H) + 8                   # 2^31 + 2^21 elements
    rng = np.random.default_rng(17)
    lens = [(3, 700), (1, 300)]
    used = np.array([num_blocks - 1, num_blocks - 5, num_blocks - 3, num_blocks - 2])
    table = np.array([[used[0], used[1], used[2]], [used[3], -1, -1]], dtype=np.int32)
    small_kc = rng.standard_normal((len(used), bs, Nkv, H)).astype(np.float16)
    small_vc = rng.standard_normal((len(used), bs, Nkv, H)).astype(np.float16)
    small_table = np.searchsorted(np.sort(used), table).astype(np.int32)
    small_table[table < 0] = -1
    order = np.argsort(used)
    small_kc, small_vc = small_kc[order], small_vc[order]
    T = sum(q for q, _ in lens)
    q = rng.standard_normal((T, N * H)).astype(np.float16)
    cum = np.array([0, 3, 4], dtype=np.int32)
    past = np.array([700, 300], dtype=np.int32)
    kw = dict(num_heads=N, kv_num_heads=Nkv)
    new = np.zeros((T, Nkv * H), dtype=np.float32)  # the new tokens are already in the cache:
    # the reference writes them, so hand it the cached values back at their slots
    pos = [700, 701, 702, 300]
    rows = [0, 0, 0, 1]
    for t, (b, p) in enumerate(zip(rows, pos)):
        blk = small_table[b, p // bs]
        new[t] = small_kc[blk, p % bs].reshape(-1)
    newv = np.stack([small_vc[small_table[b, p // bs], p % bs].reshape(-1)
                     for b, p in zip(rows, pos)])
    ref = paged_attention_reference(q.astype(np.float32), new, newv.astype(np.float32),
                                    small_kc.astype(np.float32), small_vc.astype(np.float32),
                                    cum, past, small_table, **kw)
    kc = cupy.empty((num_blocks, bs, Nkv, H), dtype=cupy.float16)
    vc = cupy.empty_like(kc)
    for i, blk in enumerate(np.sort(used)):
        kc[int(blk)] = cupy.asarray(small_kc[i])
        vc[int(blk)] = cupy.asarray(small_vc[i])
    problem = make_problem(T, 2, N, Nkv, H, bs, num_blocks, 3)
    out = _nan_out((T, N * H), "float16")
    fk.launch_flash(problem, cupy.asarray(q), kc, vc, cupy.asarray(cum), cupy.asarray(past),
                    cupy.asarray(table), out, flash_compiled)
    got = cupy.asnumpy(out).astype(np.float32)
    err = rel_err(got, ref)
    assert np.isfinite(got).all() and err <= OUT_TOL["float16"], err


@pytest.mark.gpu
def test_flash_is_deterministic_and_graph_capturable(flash_compiled):
    import cupy

    rng = np.random.default_rng(18)
    T, B, N, Nkv, H, bs, nb = 4, 4, 8, 2, 128, 16, 400
    kc = cupy.asarray(rng.standard_normal((nb, bs, Nkv, H)), dtype=cupy.float16)
    vc = cupy.asarray(rng.standard_normal((nb, bs, Nkv, H)), dtype=cupy.float16)
    q = cupy.asarray(rng.standard_normal((T, N * H)), dtype=cupy.float16)
    table = cupy.asarray(rng.permutation(nb)[:B * 100].reshape(B, 100), dtype=cupy.int32)
    cum = cupy.arange(B + 1, dtype=cupy.int32)
    past = cupy.asarray([1599, 20, 900, 0], dtype=cupy.int32)
    problem = make_problem(T, B, N, Nkv, H, bs, nb, 100)
    args = (problem, q, kc, vc, cum, past, table)
    o_shape, lse_shape = fk.workspace_shape(problem, 5)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        workspace = (cupy.empty(o_shape, cupy.float32), cupy.empty(lse_shape, cupy.float32))
        eager = fk.launch_flash(*args, cupy.empty((T, N * H), cupy.float16), flash_compiled,
                                num_splits=5)
        again = fk.launch_flash(*args, cupy.empty((T, N * H), cupy.float16), flash_compiled,
                                num_splits=5, workspace=workspace)
        out = cupy.full((T, N * H), np.nan, dtype=cupy.float16)
        stream.synchronize()
        assert bool(cupy.array_equal(eager, again)), "split-KV combine is not deterministic"
        stream.begin_capture()
        fk.launch_flash(*args, out, flash_compiled, num_splits=5, workspace=workspace)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    assert bool(cupy.array_equal(out, eager))
    none = fk.launch_flash(*args, cupy.empty((T, N * H), cupy.float16), flash_compiled,
                           num_splits=1)
    assert float(cupy.abs(none.astype(cupy.float32) - eager.astype(cupy.float32)).max()) < 2e-2


# ---------------------------------------------------------------- timing (python tests/...)


def _time_ms(fn, reps=20):
    import cupy
    for _ in range(3):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return float(np.median(times))


def _bench_case(B, q_len, ctx, N=32, Nkv=8, H=128, bs=16, dtype="float16", splits=None,
                tile=None):
    import cupy
    rng = cupy.random.default_rng(0)
    blocks_per = -(-ctx // bs)
    nb = B * blocks_per
    T = B * q_len

    def draw(shape):
        x = rng.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)
        return x if dtype == "float16" else x.view(cupy.uint16)  # finite bf16 bit patterns

    kc, vc, q = draw((nb, bs, Nkv, H)), draw((nb, bs, Nkv, H)), draw((T, N * H))
    table = cupy.asarray(np.random.default_rng(1).permutation(nb).reshape(B, blocks_per),
                         dtype=cupy.int32)
    cum = cupy.arange(0, T + 1, q_len, dtype=cupy.int32)
    past = cupy.full(B, ctx - q_len, dtype=cupy.int32)
    problem = make_problem(T, B, N, Nkv, H, bs, nb, blocks_per, dtype)
    out = _nan_out((T, N * H), dtype)
    sm = _device_sm()
    step = fk.ForwardStep(problem, q.device.id, sm, tile, splits)
    name = fk.variant_name(problem, sm, tile)
    ms = _time_ms(lambda: step.run(q, kc, vc, cum, past, table, out))
    used = step.splits
    assert np.isfinite(_from_low(cupy.asnumpy(out), dtype)).all()
    pairs = B * sum(min(ctx, ctx - q_len + j + 1) for j in range(q_len))
    flops = 4 * pairs * N * H
    kv_bytes = 2 * B * ctx * Nkv * H * 2
    return name, used, ms, flops / ms / 1e9, kv_bytes / ms / 1e6


def _bench():
    import cupy
    dev = cupy.cuda.Device()
    print(f"device: {cupy.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, "
          f"sm_{dev.compute_capability}")
    prefill = dict(B=8, q_len=2048, ctx=2048)
    decode = dict(B=64, q_len=1, ctx=4096)
    rows = [("prefill 8x2048 N32 Nkv8 H128 bs16", prefill),
            ("  bf16", dict(prefill, dtype="bfloat16")),
            ("  tile m64 n64", dict(prefill, tile=tiles.Tile(128, 64, 64, 4, 2, "sm80"))),
            ("  tile m128 n64", dict(prefill, tile=tiles.Tile(128, 128, 64, 4, 2, "sm80"))),
            ("  tile m128 n64 s3", dict(prefill, tile=tiles.Tile(128, 128, 64, 4, 3, "sm80"))),
            ("decode 64x4096 N32 Nkv8 H128 bs16", decode),
            ("  no split", dict(decode, splits=1)),
            ("  split 4", dict(decode, splits=4)),
            ("  bf16", dict(decode, dtype="bfloat16")),
            ("  bs256", dict(decode, bs=256)),
            ("  tile m16 n64 (1 warp)", dict(decode, tile=tiles.Tile(128, 16, 64, 1, 2, "sm80"))),
            ("  tile m64 n32 s4", dict(decode, tile=tiles.Tile(128, 64, 32, 4, 4, "sm80"))),
            ("  tile m64 n64 s3", dict(decode, tile=tiles.Tile(128, 64, 64, 4, 3, "sm80"))),
            ("decode 1x32768", dict(B=1, q_len=1, ctx=32768)),
            ("  no split", dict(B=1, q_len=1, ctx=32768, splits=1))]
    print(f"{'case':36s} {'kernel':42s} {'S':>3s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s(KV)':>9s}")
    for label, kw in rows:
        name, s, ms, tflops, gbs = _bench_case(**kw)
        print(f"{label:36s} {name:42s} {s:3d} {ms:8.3f} {tflops:8.1f} {gbs:9.0f}")


if __name__ == "__main__":
    _bench()


def test_flash_overlap_threshold_names_its_variable():
    assert policy._overlap_threshold("0") == 0.0
    with pytest.raises(ValueError, match="CUPY_PAGED_OVERLAP_MIN_US must be a number"):
        policy._overlap_threshold("fast")
