"""Paged -> packed varlen K/V (cuda_src/mea/gather.cu, launched by backends/_gather.py).

CPU: every variant compiles under NVRTC for each arch it supports. GPU: ``kv_seqstarts`` equals
NumPy's running sum; row seqstart_k[b] + k of the gathered K/V equals the cache row of position k
of sequence b through the block table, zeros where the block is -1 (or past the table), over
fp16/bf16, block sizes 1/3/16/256, B in {1, 3, 257}, q_len-0 sequences, shuffled tables, a
rows_bound above (and below) the real total, a cache of more than 2^31 elements, and the whole
prologue + gather step captured in a CUDA graph (no host synchronisation).
"""
import numpy as np
import pytest

from cupy_paged.backends import _gather, _prologue
from cupy_paged.jit import compile_variant

try:
    from .paged_cases import Case, seed_of
    from .test_prologue import (POISON, compile_every_arch, device_bits, enc, expected,
                                poison_pool, prepare, problem_of, skip_unless_sm, to_device,
                                ulps)
except ImportError:
    from paged_cases import Case, seed_of
    from test_prologue import (POISON, compile_every_arch, device_bits, enc, expected,
                               poison_pool, prepare, problem_of, skip_unless_sm, to_device, ulps)


pytestmark = pytest.mark.usefixtures("cache_dir")  # conftest: a private kernel cache


def seqlens_of(prep):
    cum, past = prep.bits["cumulative_sequence_length"], prep.bits["past_seqlens"]
    return past.astype(np.int64) + np.diff(cum.astype(np.int64))


def expected_gather(kc, vc, table, seqlens):
    """NumPy: the (rows, Nkv, H) K and V of every sequence in turn, zeros where unmapped."""
    num_blocks, bs = kc.shape[:2]
    ks, vs = [], []
    for b, length in enumerate(seqlens):
        pos = np.arange(length)
        col = pos // bs
        blk = np.full(length, -1, dtype=np.int64)
        inside = col < table.shape[1]
        blk[inside] = table[b, col[inside]]
        mapped = (blk >= 0) & (blk < num_blocks)
        k = np.zeros((length,) + kc.shape[2:], dtype=kc.dtype)
        v = np.zeros_like(k)
        k[mapped] = kc[blk[mapped], pos[mapped] % bs]
        v[mapped] = vc[blk[mapped], pos[mapped] % bs]
        ks.append(k)
        vs.append(v)
    empty = np.zeros((0,) + kc.shape[2:], dtype=kc.dtype)
    return np.concatenate(ks or [empty]), np.concatenate(vs or [empty])


def gather_and_check(prep, tag, extra_rows=37, past_override=None):
    """kv_seqstarts + gather_kv on device copies of ``prep``; compares the first real rows."""
    import cupy

    skip_unless_sm(prep.dtype)
    a = to_device(prep)
    problem = problem_of(a, prep.kwargs, prep.dtype)
    if past_override is not None:
        prep.bits["past_seqlens"] = np.asarray(past_override, dtype=np.int32)
        a["past_seqlens"] = cupy.asarray(prep.bits["past_seqlens"])
    seqlens = seqlens_of(prep)
    total = int(seqlens.sum())
    seqstart_k = _gather.kv_seqstarts(problem, a["cumulative_sequence_length"],
                                      a["past_seqlens"])
    want_starts = np.concatenate([[0], np.cumsum(seqlens)])
    assert seqstart_k.dtype == np.int32 and seqstart_k.shape == (problem.batch + 1,), tag
    assert cupy.asnumpy(seqstart_k).tolist() == want_starts.tolist(), tag

    rows_bound = max(total + extra_rows, 0)
    nbytes = rows_bound * problem.kv_num_heads * problem.head_size * 2
    poison_pool(nbytes, nbytes)
    k, v = _gather.gather_kv(problem, a, seqstart_k, rows_bound)
    shape = (rows_bound, problem.kv_num_heads, problem.head_size)
    assert k.shape == shape and v.shape == shape and k.dtype == a["key_cache"].dtype, tag
    want_k, want_v = expected_gather(prep.bits["key_cache"], prep.bits["value_cache"],
                                     prep.bits["block_table"], seqlens)
    rows = min(total, rows_bound)
    for name, got, want in (("k_packed", k, want_k), ("v_packed", v, want_v)):
        got = device_bits(got)[:rows]
        bad = (got != want[:rows]).any(axis=(1, 2))
        assert not bad.any(), \
            f"{tag}: {name}: {int(bad.sum())} rows differ, first {np.flatnonzero(bad)[:5].tolist()}"
    return problem, a, seqlens


# ---------------------------------------------------------------- CPU: NVRTC builds


def test_gather_variants_compile_for_every_arch(cache_dir):
    build = compile_every_arch(_gather.SPECS, cache_dir)
    assert {s.name for s, _ in build} == {"gather_kv_f16", "gather_kv_bf16"}


def test_gather_bf16_compile_refuses_before_sm80():
    with pytest.raises(ValueError, match="needs sm_80"):
        compile_variant("gather_kv_bf16", "sm_75")
    assert _gather.gather_name("float16") == "gather_kv_f16"


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3, 257])
@pytest.mark.parametrize("bs", [1, 3, 16, 256])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_gather_matches_block_table(dtype, bs, B):
    # mixed q_len 0..5 (B > 1), holes and spare blocks; Nkv * H = 3 * 40: 15 chunks a row
    case = Case(f"gather-{dtype}-bs{bs}-B{B}", B=B, N=3, Nkv=3, H=40, bs=bs,
                mode="chunk" if B == 1 else "mixed", holes=1 + B // 16, spare=5, extra_cols=2)
    seed = seed_of(case.name)
    gather_and_check(prepare(case, dtype, seed), f"[{case.name} seed={seed}]")


@pytest.mark.gpu
@pytest.mark.parametrize("H,Nkv", [(8, 1), (128, 8), (256, 2)])
def test_gather_head_sizes(H, Nkv):
    case = Case(f"gather-H{H}-Nkv{Nkv}", B=5, N=Nkv, Nkv=Nkv, H=H, bs=16, mode="chunk", holes=2)
    gather_and_check(prepare(case, "float16", seed_of(case.name)), case.name)


@pytest.mark.gpu
@pytest.mark.parametrize("extra_rows", [0, -5, -10**6], ids=["exact", "short", "zero"])
def test_gather_rows_bound_at_or_below_total(extra_rows):
    """A bound below the real total writes only rows_bound rows (never past the buffers)."""
    case = Case(f"gather-bound{extra_rows}", B=4, bs=3, mode="chunk")
    gather_and_check(prepare(case, "float16", seed_of(case.name)), case.name, extra_rows)


@pytest.mark.gpu
def test_gather_past_beyond_the_table():
    """A q_len-0 sequence's past is not capacity-checked: positions past the table are zeros."""
    case = Case("gather-past-beyond", lens=((2, 3), (0, 4), (1, 0)), bs=4, spare=2)
    prep = prepare(case, "float16", seed_of(case.name))
    capacity = prep.bits["block_table"].shape[1] * 4
    _, _, seqlens = gather_and_check(prep, case.name, past_override=[3, capacity + 9, 0])
    assert seqlens[1] > capacity


@pytest.mark.gpu
def test_kv_seqstarts_empty_batch_and_empty_sequences():
    import cupy

    for lens in (((0, 0),), ((0, 5), (0, 0), (3, 2), (0, 0))):
        case = Case(f"seqstarts-{len(lens)}", lens=lens)
        prep = prepare(case, "float16", 3)
        a = to_device(prep)
        problem = problem_of(a, prep.kwargs, "float16")
        got = _gather.kv_seqstarts(problem, a["cumulative_sequence_length"], a["past_seqlens"])
        assert cupy.asnumpy(got).tolist() == [0] + np.cumsum(seqlens_of(prep)).tolist()
        k, v = _gather.gather_kv(problem, a, got, 0)
        assert k.shape == v.shape == (0, problem.kv_num_heads, problem.head_size)


@pytest.mark.gpu
def test_gather_cache_over_2_31_elements():
    """17000 blocks x 256 x 8 x 64 fp16 (2.23e9 elements per cache): rows of block 16999 (the
    far end) and 16384 (element offset 2^31) come back right."""
    import cupy

    num_blocks, bs, Nkv, H = 17000, 256, 8, 64
    free = cupy.cuda.Device().mem_info[0]
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    try:
        kc = cupy.empty((num_blocks, bs, Nkv, H), dtype=cupy.float16)
        vc = cupy.empty_like(kc)
        kc.view(cupy.uint16).fill(POISON)
        vc.view(cupy.uint16).fill(POISON)
        rng = np.random.default_rng(2**31)
        far_k = enc(rng.standard_normal((bs, Nkv, H)), "float16")
        far_v = enc(rng.standard_normal((bs, Nkv, H)), "float16")
        mid_k = enc(rng.standard_normal((8, Nkv, H)), "float16")
        mid_v = enc(rng.standard_normal((8, Nkv, H)), "float16")
        kc[16999] = cupy.asarray(far_k.view(np.float16))
        vc[16999] = cupy.asarray(far_v.view(np.float16))
        kc[16384, :8] = cupy.asarray(mid_k.view(np.float16))
        vc[16384, :8] = cupy.asarray(mid_v.view(np.float16))
        # sequence 0: 256 past tokens in block 16999, no new ones; sequence 1: 8 at block 16384
        table = cupy.asarray(np.array([[16999, -1], [16384, 16999]], dtype=np.int32))
        seqstart_k = cupy.asarray(np.array([0, 256, 264], dtype=np.int32))
        empty = cupy.empty((0, Nkv * H), dtype=cupy.float16)
        args = {"query": empty, "key": empty, "value": empty, "key_cache": kc,
                "value_cache": vc, "block_table": table,
                "cumulative_sequence_length": cupy.zeros(3, dtype=cupy.int32),
                "past_seqlens": cupy.asarray(np.array([256, 8], dtype=np.int32)),
                "cos_cache": None, "sin_cache": None}
        kwargs = {"num_heads": Nkv, "kv_num_heads": Nkv, "scale": 0.0, "softcap": 0.0,
                  "local_window_size": -1, "do_rotary": False, "rotary_interleaved": False}
        problem = problem_of(args, kwargs, "float16")
        k, v = _gather.gather_kv(problem, {"key_cache": kc, "value_cache": vc,
                                           "block_table": table}, seqstart_k, 300)
        got_k, got_v = device_bits(k[:264]), device_bits(v[:264])
        assert np.array_equal(got_k[:256], far_k) and np.array_equal(got_v[:256], far_v)
        assert np.array_equal(got_k[256:], mid_k) and np.array_equal(got_v[256:], mid_v)
    finally:
        kc = vc = None
        cupy.get_default_memory_pool().free_all_blocks()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_prologue_and_gather_capture_in_a_cuda_graph(dtype):
    """kv_seqstarts, run_prologue and gather_kv never synchronise with the host: the step
    captures into a CUDA graph (nothing runs at capture), and replaying it gives the reference's
    caches, the rotated q and the gathered rows."""
    import cupy

    skip_unless_sm(dtype)
    case = Case(f"graph-{dtype}", B=6, bs=3, mode="mixed", holes=1, packed=True, rotary="neox")
    prep = prepare(case, dtype, seed_of(case.name))
    a = to_device(prep)
    problem = problem_of(a, prep.kwargs, dtype)
    total = int(seqlens_of(prep).sum())
    _prologue.run_prologue(problem, to_device(prep))   # compile and load outside the capture
    warm = _gather.kv_seqstarts(problem, a["cumulative_sequence_length"], a["past_seqlens"])
    _gather.gather_kv(problem, to_device(prep), warm, total + 8)
    cupy.cuda.get_current_stream().synchronize()

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        q = _prologue.run_prologue(problem, a)
        seqstart_k = _gather.kv_seqstarts(problem, a["cumulative_sequence_length"],
                                          a["past_seqlens"])
        k, v = _gather.gather_kv(problem, a, seqstart_k, total + 8)
        graph = stream.end_capture()
        assert np.array_equal(device_bits(a["key_cache"]), prep.bits["key_cache"]), \
            "the capture ran the prologue"
        graph.launch()
        stream.synchronize()
        got_q, got_kc, got_vc = (device_bits(x) for x in (q, a["key_cache"], a["value_cache"]))
        got_k, got_v = device_bits(k)[:total], device_bits(v)[:total]
    exp_q, exp_kc, exp_vc = expected(prep)
    assert ulps(got_q, exp_q).max() <= 1
    assert ulps(got_kc, exp_kc).max() <= 1 and np.array_equal(got_vc, exp_vc)
    want_k, want_v = expected_gather(got_kc, got_vc, prep.bits["block_table"], seqlens_of(prep))
    assert np.array_equal(got_k, want_k) and np.array_equal(got_v, want_v)
