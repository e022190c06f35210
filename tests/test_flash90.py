"""The sm90a flash kernel (cuda_src/hopper/, backends/_flash90.py): warp-specialised wgmma
forward for compute capability 9.0.

CPU: the generated wgmma header is what its generator writes, every sm90a variant compiles
under NVRTC (well inside the 20 s budget), the tiles fit, the policy picks the kernel for
prefill on 9.0 only and falls back to the sm80 kernel where it splits keys. GPU (9.0 only):
the parity matrix of tests/test_flash_kernel.py forced onto the new kernel, every tile, the
public API's automatic choice against the sm80 kernel on the same inputs, head sinks,
determinism, CUDA-graph capture with the metadata changed in place, the guard's NaN rows; the
persistent tiles (the default) bit for bit against one CTA per unit, their counter reset.
"""
import dataclasses
import time
import zlib

import numpy as np
import pytest

from cupy_paged.backends import _flash90 as f90
from cupy_paged.backends import _flash_kernels as fk
from cupy_paged.backends import _flash_policy as policy
from cupy_paged.backends import _wgmma_gen

try:
    from .paged_cases import Case
    from .test_flash_kernel import EDGE_CASES, _matrix, run_flash
    from .test_flash_policy import ELF_MAGIC, flash_cache_dir, make_problem  # noqa: F401
except ImportError:
    from paged_cases import Case
    from test_flash_kernel import EDGE_CASES, _matrix, run_flash
    from test_flash_policy import ELF_MAGIC, flash_cache_dir, make_problem  # noqa: F401


# ---------------------------------------------------------------- CPU


def test_sm90_wgmma_header_is_generated():
    assert _wgmma_gen.HEADER.read_text() == _wgmma_gen.render(), \
        "cuda_src/hopper/wgmma_ops.cuh is stale: run python -m cupy_paged.backends._wgmma_gen"


def test_sm90_compile_every_sm90a_variant(flash_cache_dir):
    """Every sm90a instantiation builds for sm_90a; one cold compile stays far below 20 s."""
    from cupy_paged.jit import compile_variant, get_spec

    names = [n for n in fk.all_variant_names("sm90a") if n.startswith("flash90_")]
    assert len(names) == 2 * len(f90.HEAD_SIZES)
    names += [fk._register_fwd("float16", t) for t in f90.all_tiles(pingpong=True)]
    names += [fk._register_fwd("float16", t) for t in f90.all_tiles(persistent=False)]
    for name in names:
        start = time.perf_counter()
        r = compile_variant(name, get_spec(name).target(90))
        seconds = time.perf_counter() - start
        data = r.path.read_bytes()
        assert r.arch == "sm_90a" and data[:4] == ELF_MAGIC and name.encode() in data
        assert seconds < 20, f"{name}: {seconds:.1f} s cold compile"


def test_sm90_variants_build_only_for_sm90a():
    from cupy_paged.jit import get_spec

    name = fk.variant_name(make_problem(4096, 2, 32, 8, 128, 16, 300, 150), 90)
    spec = get_spec(name)
    assert name == "flash90_fwd_f16_h128_n128_s2_sm90a"
    assert spec.target(90) == "sm_90a" and spec.unsupported_reason("sm_90a") == ""
    assert "built only for sm_90" in spec.unsupported_reason("sm_100")


@pytest.mark.parametrize("head", f90.HEAD_SIZES)
def test_sm90_tiles_fit_and_mirror_the_traits(head):
    tile = f90.tile_for(head)
    panels = -(-head // 64)
    assert tile.smem_bytes <= f90.SMEM_LIMIT
    assert tile.smem_bytes >= 128 * panels * 128 + 2 * tile.stages * tile.bn * panels * 128
    assert tile.threads == 384 and tile.bm == 128


def test_sm90_persistent_tiles_double_buffer_q_where_it_fits():
    """A persistent tile loads the next unit's Q while this unit computes when two Q tiles fit
    next to the rings (Traits90::Q_BUFS): every head but 256."""
    for tile in f90.all_tiles(persistent=True):
        assert tile.q_buffers == (2 if tile.head < 256 else 1), tile
        assert tile.smem_bytes <= f90.SMEM_LIMIT
        one_per_cta = f90.Tile90(tile.head, tile.bn, tile.stages, persistent=False)
        assert tile.smem_bytes > one_per_cta.smem_bytes
    assert all(t.q_buffers == 1 for t in f90.all_tiles(persistent=False))


def test_sm90_tile_rejects_what_the_kernel_cannot_run():
    with pytest.raises(ValueError, match="head must be one of"):
        f90.Tile90(80, 128, 2)
    with pytest.raises(ValueError, match="bn must be 64 or 128"):
        f90.Tile90(128, 96, 2)
    with pytest.raises(ValueError, match="shared memory"):
        f90.Tile90(256, 128, 3)


def test_sm90_policy_prefill_only_on_9_0():
    prefill = make_problem(8 * 2048, 8, 32, 8, 128, 16, 8 * 128, 128)
    decode = make_problem(64, 64, 32, 8, 128, 16, 64 * 256, 256)
    assert isinstance(policy.problem_tile(prefill, 90), f90.Tile90)
    assert not isinstance(policy.problem_tile(prefill, 90, sm90=False), f90.Tile90)
    for sm in (80, 86, 89, 100, 120):
        assert not isinstance(policy.problem_tile(prefill, sm), f90.Tile90)
    assert not isinstance(policy.problem_tile(decode, 90), f90.Tile90)
    # the kernel's cache rows are int32: a cache of 2^31 token slots or more runs sm80
    huge = dataclasses.replace(prefill, num_blocks=2 ** 27, block_size=16)
    assert not isinstance(policy.problem_tile(huge, 90), f90.Tile90)
    # head sizes pad up to the kernel's (80 -> 96, 8 -> 64); above 256 nothing runs there
    for h, padded in ((8, 64), (80, 96), (160, 192), (256, 256)):
        p = dataclasses.replace(prefill, head_size=h)
        assert policy.problem_tile(p, 90).head == padded


def test_sm90_policy_falls_back_to_sm80_for_split_keys():
    # one long sequence of few rows per kv head: the planner splits its keys
    few = make_problem(256, 1, 8, 8, 128, 16, 4096, 4096)
    tile, splits = policy.choose(few, 90, 132)
    assert splits > 1 and not isinstance(tile, f90.Tile90)
    tile, splits = policy.choose(few, 90, 132, num_splits=1)
    assert splits == 1 and isinstance(tile, f90.Tile90)
    with pytest.raises(ValueError, match="one key split"):
        policy.choose(few, 90, 132, tile=f90.tile_for(128), num_splits=2)
    with pytest.raises(ValueError, match="compute capability 9.0 only"):
        policy.choose(few, 80, 108, tile=f90.tile_for(128))


def test_sm90_precompile_lists_sm90a_targets():
    from cupy_paged._precompile_variants import needed_variants

    names, _ = needed_variants(dtypes=["float16"], head_sizes=[128], num_heads=32,
                               kv_num_heads=8, block_sizes=[16], archs=("sm_90",))
    assert ("flash90_fwd_f16_h128_n128_s2_sm90a", "sm_90a") in names
    assert any(n.startswith("flash_fwd_f16_h128_m128") and a == "sm_90" for n, a in names)


# ---------------------------------------------------------------- GPU (compute capability 9.0)


def _sm():
    import cupy
    return int(cupy.cuda.Device().compute_capability)


@pytest.fixture(scope="module")
def sm90():
    if _sm() != 90:
        pytest.skip("the sm90a kernel runs on compute capability 9.0 only")
    return 90


def _tile(H):
    return f90.tile_for(f90.padded_head(H))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", _matrix() + EDGE_CASES, ids=lambda c: c.name)
def test_sm90_matches_reference(case, dtype, sm90):
    run_flash(case, dtype, zlib.crc32(f"{case.name}-{dtype}-90".encode()), num_splits=1,
              tile=_tile(case.H))


PREFILL = Case("prefill90", lens=((700, 0), (0, 9), (300, 1100), (129, 3)), N=8, Nkv=2, H=128,
               bs=16, holes=2)


@pytest.mark.gpu
@pytest.mark.parametrize("tile", f90.all_tiles() + f90.all_tiles(pingpong=True)
                         + f90.all_tiles(persistent=False),
                         ids=lambda t: fk.fwd_name("float16", t))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sm90_every_tile_prefill(tile, dtype, sm90):
    for H in sorted({tile.head, tile.head - 8}):  # the padded head and one below it
        for W, cap, bs in ((-1, 0.0, 16), (500, 30.0, 256), (64, 0.0, 3)):
            case = dataclasses.replace(PREFILL, name=f"H{H}_W{W}_cap{cap}_bs{bs}", H=H, W=W,
                                       softcap=cap, bs=bs)
            run_flash(case, dtype, zlib.crc32(case.name.encode()), num_splits=1, tile=tile)


@pytest.mark.gpu
def test_sm90_long_prefill_gqa(sm90):
    case = Case("prefill_5000_G8", lens=((5000, 0), (1000, 3000)), N=16, Nkv=2, H=128, bs=64,
                holes=1)
    run_flash(case, "float16", 21, num_splits=1, tile=_tile(128))
    case = dataclasses.replace(case, name="prefill_5000_G1_H64", N=4, Nkv=4, H=64, W=2048)
    run_flash(case, "bfloat16", 22, num_splits=1, tile=_tile(64))


def _api_inputs(seed, T_per=(900, 333, 1), past=(0, 77, 2000), N=16, Nkv=4, H=128, bs=16):
    import cupy
    rng = np.random.default_rng(seed)
    B = len(T_per)
    T = sum(T_per)
    need = [-(-(q + p) // bs) for q, p in zip(T_per, past)]
    nb = sum(need) + 8
    perm = rng.permutation(nb)
    table = np.full((B, max(need)), -1, np.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[at:at + n]
        at += n
    f = lambda *s: cupy.asarray(rng.standard_normal(s), dtype=cupy.float16)  # noqa: E731
    return dict(query=f(T, N * H), key=f(T, Nkv * H), value=f(T, Nkv * H),
                key_cache=f(nb, bs, Nkv, H), value_cache=f(nb, bs, Nkv, H),
                cumulative_sequence_length=cupy.asarray(np.cumsum([0, *T_per]), cupy.int32),
                past_seqlens=cupy.asarray(past, cupy.int32), block_table=cupy.asarray(table),
                num_heads=N, kv_num_heads=Nkv)


def _call(inputs, **kw):
    import cupy
    import cupy_paged
    a = {k: (v.copy() if isinstance(v, cupy.ndarray) and k.endswith("cache") else v)
         for k, v in inputs.items()}
    out = cupy_paged.paged_attention(**a, backend="flash", **kw)
    return out, a


def _sm80_options(inputs, **kw):
    """PlanOptions running the sm80 kernel on the call the inputs make (one split)."""
    import cupy_paged
    from cupy_paged.backends.plan import PlanOptions

    problem = cupy_paged.plan(**inputs, backend="flash", **kw)._plan.problem
    return PlanOptions(tile=policy.problem_tile(problem, 90, sm90=False), num_splits=1)


@pytest.mark.gpu
def test_sm90_auto_choice_matches_sm80_kernel(sm90):
    import cupy
    import cupy_paged

    inputs = _api_inputs(31, T_per=(2000, 1000, 1), N=32, Nkv=8)
    plan = cupy_paged.plan(**inputs, backend="flash")
    assert isinstance(plan.details["tile"], f90.Tile90), plan.details
    got, a90 = _call(inputs)
    ref, a80 = _call(inputs, options=_sm80_options(inputs))
    diff = float(cupy.abs(got.astype(cupy.float32) - ref.astype(cupy.float32)).max())
    scale = float(cupy.abs(ref.astype(cupy.float32)).max())
    assert diff <= 2e-3 * max(scale, 1.0), (diff, scale)
    assert bool(cupy.array_equal(a90["key_cache"], a80["key_cache"]))  # the same prologue
    again, _ = _call(inputs)
    assert bool(cupy.array_equal(got, again)), "the sm90a kernel is not deterministic"


@pytest.mark.gpu
def test_sm90_head_sink(sm90):
    import cupy

    inputs = _api_inputs(32, T_per=(2000, 1000, 1), N=32, Nkv=8)
    sink = cupy.asarray(np.random.default_rng(3).standard_normal(32) * 2, dtype=cupy.float16)
    import cupy_paged
    plan = cupy_paged.plan(**inputs, backend="flash", head_sink=sink)
    assert isinstance(plan.details["tile"], f90.Tile90), plan.details
    got, _ = _call(inputs, head_sink=sink)
    ref, _ = _call(inputs, head_sink=sink, options=_sm80_options(inputs, head_sink=sink))
    diff = float(cupy.abs(got.astype(cupy.float32) - ref.astype(cupy.float32)).max())
    assert diff <= 2e-3, diff


def _tile_options(head, persistent):
    from cupy_paged.backends.plan import PlanOptions
    return PlanOptions(tile=f90.tile_for(head, persistent=persistent), num_splits=1)


@pytest.mark.gpu
@pytest.mark.parametrize("head", [64, 128, 192, 256])
def test_sm90_persistent_matches_one_unit_per_cta_bit_for_bit(head, sm90):
    """Persistent CTAs (units handed out by the launch's counter: far more units than SMs)
    compute every unit exactly as the one-unit-per-CTA kernel does, launch after launch: the
    counter is back at zero after each."""
    import cupy

    inputs = _api_inputs(41, T_per=(2000, 1000, 1), N=32, Nkv=8, H=head)
    want, _ = _call(inputs, options=_tile_options(head, False))
    for _ in range(3):
        got, _ = _call(inputs, options=_tile_options(head, True))
        assert bool(cupy.array_equal(got, want)), float(cupy.abs(
            got.astype(cupy.float32) - want.astype(cupy.float32)).max())
    counter = fk.stream_counter(cupy, cupy.cuda.Device().id, cupy.cuda.get_current_stream().ptr)
    assert counter.get().tolist() == [0, 0]


@pytest.mark.gpu
@pytest.mark.parametrize("persistent", [None, True], ids=["auto", "persistent"])
def test_sm90_graph_capture_with_metadata_changed_in_place(persistent, sm90):
    import cupy
    import cupy_paged

    inputs = _api_inputs(33, T_per=(1500, 1500), past=(0, 100), N=32, Nkv=8)
    kw = dict(max_seqlen_q=1500)
    if persistent:
        kw["options"] = _tile_options(128, True)
    copy = lambda d: {k: (v.copy() if isinstance(v, cupy.ndarray) else v)  # noqa: E731
                      for k, v in d.items()}
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        a = copy(inputs)
        out = cupy.empty_like(a["query"])
        plan = cupy_paged.plan(**a, backend="flash", **kw)
        assert isinstance(plan.details["tile"], f90.Tile90), plan.details
        cupy_paged.paged_attention(**a, backend="flash", out=out, **kw)  # warm
        stream.begin_capture()
        cupy_paged.paged_attention(**a, backend="flash", out=out, **kw)
        graph = stream.end_capture()
        a["past_seqlens"][...] = cupy.asarray([50, 7], cupy.int32)  # in place: new contexts
        b = copy(a)  # the same caches and metadata, for an eager call
        graph.launch(stream)
        graph.launch(stream)  # twice: a persistent grid's counter is reset by each launch
        stream.synchronize()
    want = cupy_paged.paged_attention(**b, backend="flash", **kw)
    assert bool(cupy.array_equal(out, want))
    assert bool(cupy.array_equal(a["key_cache"], b["key_cache"]))


@pytest.mark.gpu
def test_sm90_guard_fault_rows_are_nan(sm90):
    import cupy
    import cupy_paged

    inputs = _api_inputs(34, N=32, Nkv=8, T_per=(900, 2000, 333))
    assert isinstance(cupy_paged.plan(**inputs, backend="flash").details["tile"], f90.Tile90)
    bad = inputs["block_table"].copy()
    bad[1, 0] = 10 ** 6  # out of range: the guard faults sequence 1 only
    a = dict(inputs, block_table=bad)
    out = cupy_paged.paged_attention(**a, backend="flash", validate=False)
    got = cupy.asnumpy(out.astype(cupy.float32))
    assert np.isnan(got[900:2900]).all()
    assert np.isfinite(got[:900]).all() and np.isfinite(got[2900:]).all()


def test_sm90_kernel_option_picks_the_family():
    prefill = make_problem(8 * 2048, 8, 32, 8, 128, 16, 8 * 128, 128)
    tile, splits = policy.choose(prefill, 90, 132, kernel="sm80")
    assert not isinstance(tile, f90.Tile90) and tile.bm == 128
    tile, _ = policy.choose(prefill, 90, 132, kernel="sm90a")
    assert tile == f90.tile_for(128)
    tile, _ = policy.choose(dataclasses.replace(prefill, head_size=80), 90, 132,
                            kernel="sm90a")
    assert tile.head == 96
    decode = make_problem(64, 64, 32, 8, 128, 16, 64 * 256, 256)
    assert isinstance(policy.choose(decode, 90, 132, kernel="sm90a", num_splits=1)[0],
                      f90.Tile90)
    with pytest.raises(ValueError, match="compute capability 9.0"):
        policy.choose(prefill, 80, 108, kernel="sm90a")
    with pytest.raises(ValueError, match="expected one of sm80, sm90a"):
        policy.choose(prefill, 90, 132, kernel="hopper")
    with pytest.raises(ValueError, match="different kernel families"):
        policy.choose(prefill, 90, 132, tile=f90.tile_for(128), kernel="sm80")


def test_sm90_kernel_option_is_flash_only():
    from cupy_paged.backends.plan import PlanOptions

    with pytest.raises(ValueError, match="options.kernel: the mea backend does not take it"):
        PlanOptions(kernel="sm80").check("mea", ("arch_tag",))
    PlanOptions(kernel="sm80").check("flash", ("tile", "num_splits", "programmatic", "kernel"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", (_matrix() + EDGE_CASES)[::3], ids=lambda c: c.name)
def test_sm90_one_unit_per_cta_matches_reference(case, dtype, sm90):
    """A third of the parity matrix on the tiles of one CTA per work unit (the default tiles,
    persistent, run the whole matrix in test_sm90_matches_reference)."""
    run_flash(case, dtype, zlib.crc32(f"{case.name}-{dtype}-unit".encode()), num_splits=1,
              tile=f90.tile_for(f90.padded_head(case.H), persistent=False))
