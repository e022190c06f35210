"""The flash backend's attention kernel: cuda_src/flash/ driven by backends/_flash_kernels.py.

(Compiles, names, tiles, split heuristic, tile arithmetic: tests/test_flash_policy.py.)
GPU: ``launch_flash``
against the NumPy reference on float32 copies of the fp16 / bf16 inputs (the new K/V are written
into the caches on the host), output poisoned with NaN first, rows that see no key exactly 0.
``python tests/test_flash_kernel.py`` times one prefill and one decode (CUDA events).
"""
import dataclasses
import time
import zlib

import numpy as np
import pytest

from cupy_paged.backends import _flash_kernels as fk
from cupy_paged.backends import _flash_policy as policy
from cupy_paged.backends import _flash_tiles as tiles
from cupy_paged.reference import paged_attention_reference

try:
    from .paged_cases import Case, make_inputs, rel_err
    from .test_flash_policy import make_problem
except ImportError:
    from paged_cases import Case, make_inputs, rel_err
    from test_flash_policy import make_problem

OUT_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}


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
