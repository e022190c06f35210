"""Each GPU backend (forced by name) against the NumPy reference over the parity matrix.

Every factor of the matrix appears with each of its values; the combinations rotate through the
other factors so that each case differs from its neighbours in several at once.
"""
import itertools
import zlib

import numpy as np
import pytest

try:
    from .gpu_parity import check_backend
    from .paged_cases import Case
except ImportError:
    from gpu_parity import check_backend
    from paged_cases import Case

HEAD_SIZES = [32, 40, 64, 80, 96, 128, 160, 192, 256]
HEADS = [(6, 6), (6, 3), (9, 3), (32, 8), (8, 1)]
BLOCK_SIZES = [1, 16, 32, 256]
ROTARY = [("none", 0), ("neox", 0), ("gptj", 0), ("neox", 16)]
WINDOWS = [-1, 1, 7, 100]
SOFTCAPS = [(0.0, 0.0), (1.0, 0.3), (50.0, 0.05)]     # (softcap, custom scale; 0 = default)
MODES = ["mixed", "decode", "prefill", "chunk"]


def _matrix():
    cycle = lambda xs: itertools.cycle(xs)  # noqa: E731
    h, nk, bs, rot, w, sc, mode = (cycle(x) for x in (HEAD_SIZES, HEADS, BLOCK_SIZES, ROTARY,
                                                        WINDOWS, SOFTCAPS, MODES))
    cases = []
    for i in range(48):
        H, (N, Nkv), block, (rotary, R), W, (cap, scale), m = (
            next(h), next(nk), next(bs), next(rot), next(w), next(sc), next(mode))
        if i % 4 == 3:
            next(nk)                       # shift the head cycle against the others
        cases.append(Case(
            name=f"m{i}_H{H}_N{N}x{Nkv}_bs{block}_{rotary}{R or ''}_W{W}_cap{cap}_{m}",
            mode=m, B=3 + i % 5, N=N, Nkv=Nkv, H=H, bs=block, packed=i % 2 == 1,
            rotary=rotary, R=R if R < H else 0, W=W, softcap=cap, scale=scale,
            q_gain=8.0 if cap == 1.0 else 1.0, holes=i % 3, spare=i % 7))
    return cases


EDGE_CASES = [
    Case("batch1_prefill", lens=((37, 0),), N=8, Nkv=2, H=64, bs=16),
    Case("batch257_decode", mode="decode", B=257, N=4, Nkv=1, H=32, bs=16),
    Case("batch1000_decode", mode="decode", B=1000, N=6, Nkv=3, H=32, bs=32),
    Case("qlen0_everywhere", lens=((0, 5), (3, 0), (0, 0), (4, 17), (0, 40)), H=64, bs=16),
    Case("capacity_exact", lens=((5, 11), (16, 0)), H=64, bs=16),
    Case("cross_many_blocks", lens=((40, 3),), H=64, bs=3, N=6, Nkv=3),
    Case("unmapped_rows", lens=((3, 4), (2, 6)), unmapped=(1,), H=64, bs=4),
    Case("shared_prefix", mode="shared", B=4, share=2, H=64, bs=8),
    Case("long_decode", lens=((1, 3000), (1, 777)), N=32, Nkv=8, H=128, bs=16),
    Case("long_prefill", lens=((700, 0), (300, 200)), N=8, Nkv=2, H=128, bs=256),
    Case("window_past_context", lens=((4, 10),), W=1000, H=64, bs=16),
    Case("mqa_all_heads", lens=((6, 9), (1, 30)), N=8, Nkv=1, H=128, bs=16),
    Case("odd_heads", lens=((5, 7),), N=9, Nkv=3, H=40, bs=16),
    Case("over_provisioned", lens=((3, 2),), spare=500, extra_cols=5, H=64, bs=16),
]


BACKENDS = ["mea", "flash"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", _matrix() + EDGE_CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_reference(backend, case, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{case.name}-{dtype}".encode()))
    check_backend(case, rng, backend, dtype)


def _small_gpu_call(seed):
    import cupy

    rng = np.random.default_rng(seed)
    T, N, Nkv, H, bs = 22, 8, 2, 64, 16
    q = cupy.asarray(rng.standard_normal((T, N * H)), dtype=cupy.float16)
    k = cupy.asarray(rng.standard_normal((T, Nkv * H)), dtype=cupy.float16)
    v = cupy.asarray(rng.standard_normal((T, Nkv * H)), dtype=cupy.float16)
    kc = cupy.asarray(rng.standard_normal((12, bs, Nkv, H)), dtype=cupy.float16)
    vc = cupy.asarray(rng.standard_normal((12, bs, Nkv, H)), dtype=cupy.float16)
    cum = cupy.asarray([0, 5, 21, 22], dtype=cupy.int32)
    past = cupy.asarray([11, 0, 40], dtype=cupy.int32)
    table = cupy.asarray([[3, -1, -1], [7, 1, -1], [0, 2, 9]], dtype=cupy.int32)
    return (q, k, v, kc, vc, cum, past, table), dict(num_heads=N, kv_num_heads=Nkv)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_call_with_host_bounds_is_graph_capturable(backend):
    """With every bound given, a call needs no device->host sync: it can be captured into a
    CUDA graph, and the replay matches the eager result."""
    import cupy
    import cupy_paged

    case = Case("hinted", lens=((5, 11), (16, 0), (1, 40)), H=64, bs=16)
    check_backend(case, np.random.default_rng(7), backend, "float16",
                  max_seqlen_q=16, max_seqlen_k=41, total_kv_tokens=16 + 16 + 41)

    args, kw = _small_gpu_call(8)
    kw.update(backend=backend, max_seqlen_q=16, max_seqlen_k=41, total_kv_tokens=73)
    eager = cupy_paged.paged_attention(*args, **kw)
    out = cupy.full_like(eager, np.nan)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        cupy_paged.paged_attention(*args, out=out, **kw)     # first use of the stream
        out.fill(np.nan)
        stream.begin_capture()
        cupy_paged.paged_attention(*args, out=out, **kw)
        graph = stream.end_capture()
    graph.launch(stream)
    stream.synchronize()
    assert bool(cupy.array_equal(out, eager))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_on_two_streams_do_not_interfere(backend):
    import cupy
    import cupy_paged

    calls = [_small_gpu_call(seed) for seed in (1, 2)]
    expected = [cupy_paged.paged_attention(*[x.copy() for x in args], **kw, backend=backend)
                for args, kw in calls]
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in calls]
    outs = []
    for _ in range(5):
        for (args, kw), stream in zip(calls, streams):
            with stream:
                outs.append(cupy_paged.paged_attention(*args, **kw, backend=backend))
    for stream in streams:
        stream.synchronize()
    for i, out in enumerate(outs):
        assert bool(cupy.array_equal(out, expected[i % 2])), f"call {i}"
