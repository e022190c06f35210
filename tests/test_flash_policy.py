"""The flash backend's policy and kernels without a GPU (CI): every instantiation "auto" can
pick on sm_80 compiles for sm_80, one per template for sm_86 / sm_89 / sm_90; variant names,
the block-size division, tile budgets, the split heuristic, how the scalars travel, and a
NumPy model of the kernel's tile -> (sequence, rows, key tiles, split) arithmetic. The GPU
parity tests are tests/test_flash_kernel.py.
"""
import dataclasses
import math
import os
import re
import time

import numpy as np
import pytest

from cupy_paged._validate import Problem
from cupy_paged.backends import _flash_kernels as fk
from cupy_paged.backends import _flash_policy as policy
from cupy_paged.backends import _flash_tiles as tiles

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
    # prefill on 9.0: the sm90a kernel (and the sm80 kernel's 128-row tile where it cannot run)
    assert fk.variant_name(prefill, 90) == "flash90_fwd_f16_h128_n128_s2_sm90a"
    assert "_m128_" in fk.variant_name(prefill, 90, sm90=False)
    assert "_m128_" in fk.variant_name(prefill, 80)
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
    s = fk.forward_params(problem, 3, 77)
    struct = fk.FWD_PARAMS
    assert s.shape == (1,) and s.dtype == struct.dtype
    fields = 8 * len(struct.pointers) + 4 * len(struct.scalars)
    assert s.dtype.itemsize == -(-fields // 8) * 8          # only tail padding
    assert list(s.dtype.names) == [name for _, name in struct.fields]
    bs, shift, magic, magic_shift = fk.block_divisor(48)
    want = dict(num_tokens=70, batch=3, num_heads=32, kv_heads=8, head_size=128, group=4,
                block_size=bs, block_shift=shift, block_magic=magic,
                block_magic_shift=magic_shift, num_blocks=200, max_blocks=40, window=100,
                num_splits=3, num_work=77)
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
