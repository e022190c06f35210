"""Concurrency on the GPU: calls on several CuPy streams at once, from one thread (interleaved
launches) and from several threads, each output bit-identical to the same call run alone; arrays
on the wrong GPU refused (needs two GPUs); a damaged cached cubin rebuilt before it is loaded.

The four calls differ in every way that gives a call private state: a long decode (flash splits
the keys: per-stream workspace), a prefill with rotary (prologue scratch), a 64-sequence decode
with window and softcap at block size 3, packed QKV with GPT-J rotary; half of them pass host
bounds (mea then sizes its scratch without a sync).
"""
import dataclasses
import threading

import numpy as np
import pytest

try:
    from .gpu_parity import host_dtype
    from .paged_cases import Case, make_inputs
except ImportError:
    from gpu_parity import host_dtype
    from paged_cases import Case, make_inputs

CALLS = [
    (Case("long_decode", lens=((1, 3000), (1, 777)), N=32, Nkv=8, H=128, bs=16), {}),
    (Case("prefill_rotary", lens=((300, 0), (20, 50)), N=8, Nkv=2, H=64, bs=32,
          rotary="neox"),
     {"max_seqlen_q": 300, "max_seqlen_k": 320, "total_kv_tokens": 370}),
    (Case("decode64_window", mode="decode", B=64, N=6, Nkv=3, H=64, bs=3, W=100,
          softcap=50.0, scale=0.05), {}),
    (Case("packed_gptj", lens=((5, 11), (16, 0), (0, 40)), packed=True, N=4, Nkv=1, H=128,
          bs=5, rotary="gptj"),
     {"max_seqlen_q": 16, "max_seqlen_k": 40, "total_kv_tokens": 88}),
]
ROUNDS = 4


def _device_call(index, dtype="float16"):
    """(device args, kwargs) of CALLS[index] in ``dtype``."""
    import cupy

    case, hints = CALLS[index]
    inp = make_inputs(dataclasses.replace(case, dtype="float32"),
                      np.random.default_rng(1000 + index))
    lowp = host_dtype(dtype)
    dev = [None if x is None else cupy.asarray(x.astype(lowp) if x.dtype.kind == "f" else x)
           for x in inp.args]
    return dev, dict(inp.kwargs, **hints)


def _call(dev, kwargs, backend):
    """One call on private copies of the caches: (out, key_cache, value_cache)."""
    import cupy_paged

    args = list(dev)
    args[3], args[4] = args[3].copy(), args[4].copy()
    out = cupy_paged.paged_attention(*args, **kwargs, backend=backend)
    return out, args[3], args[4]


def _same_bits(a, b):
    import cupy
    return bool(cupy.array_equal(a.view(cupy.uint16), b.view(cupy.uint16)))


def _backend_of(mode, i):
    return mode if mode != "mixed" else ("flash", "mea")[i % 2]


def _calls_run_alone(mode):
    """The CALLS on the device, and each one's (out, key_cache, value_cache) run alone, done."""
    import cupy

    calls = [_device_call(i) for i in range(len(CALLS))]
    alone = [_call(dev, kw, _backend_of(mode, i)) for i, (dev, kw) in enumerate(calls)]
    cupy.cuda.Device().synchronize()
    return calls, alone


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["flash", "mea", "mixed"])
def test_four_streams_interleaved(mode):
    import cupy

    calls, alone = _calls_run_alone(mode)
    streams = [cupy.cuda.Stream(non_blocking=True) for _ in calls]
    results = [[] for _ in calls]
    for _ in range(ROUNDS):
        for i, ((dev, kw), stream) in enumerate(zip(calls, streams)):
            with stream:
                results[i].append(_call(dev, kw, _backend_of(mode, i)))
    for stream in streams:
        stream.synchronize()
    for i, runs in enumerate(results):
        for r, got in enumerate(runs):
            for name, a, b in zip(("out", "key_cache", "value_cache"), got, alone[i]):
                assert _same_bits(a, b), f"{CALLS[i][0].name} round {r}: {name} differs " \
                                         f"from the call run alone ({mode})"


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["flash", "mea", "mixed"])
def test_four_threads_each_with_its_stream(mode):
    import cupy

    calls, alone = _calls_run_alone(mode)
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def work(i):
        try:
            stream = cupy.cuda.Stream(non_blocking=True)
            dev, kw = calls[i]
            barrier.wait(timeout=60)
            with stream:
                runs = [_call(dev, kw, _backend_of(mode, i)) for _ in range(ROUNDS)]
            stream.synchronize()
            results[i] = runs
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for i, runs in enumerate(results):
        for r, got in enumerate(runs):
            for name, a, b in zip(("out", "key_cache", "value_cache"), got, alone[i]):
                assert _same_bits(a, b), f"{CALLS[i][0].name} run {r}: {name} differs " \
                                         f"from the call run alone ({mode}, threads)"


# ---------------------------------------------------------------- two GPUs


def _two_gpus():
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"needs two GPUs, CuPy sees {count}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "mea"])
@pytest.mark.parametrize("moved", ["query", "key_cache", "block_table", "cos_cache"])
def test_array_on_another_gpu_is_refused(backend, moved):
    import cupy

    import cupy_paged

    _two_gpus()
    dev, kw = _device_call(1)                         # on GPU 0; has cos/sin (rotary)
    names = ["query", "key", "value", "key_cache", "value_cache",
             "cumulative_sequence_length", "past_seqlens", "block_table", "cos_cache",
             "sin_cache"]
    i = names.index(moved)
    with cupy.cuda.Device(1):
        dev[i] = cupy.asarray(dev[i].get())
    # the first array decides the device: moving query makes every other one the odd one out
    odd, where = (("key", 1) if moved == "query" else (moved, 0))
    with pytest.raises(ValueError, match=f"{odd}: expected an array on GPU {where} "
                                         r"\(where query is\)"):
        cupy_paged.paged_attention(*dev, **kw, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "mea"])
def test_call_on_the_second_gpu_while_the_first_is_current(backend):
    """Every array on GPU 1, GPU 0 current: it runs on GPU 1 and gives GPU 0's bits."""
    import cupy

    import cupy_paged

    _two_gpus()
    dev, kw = _device_call(0)
    want = _call(dev, kw, backend)
    with cupy.cuda.Device(1):          # ndarray.copy() allocates on the current device
        dev1 = [None if x is None else cupy.asarray(x.get()) for x in dev]
    with cupy.cuda.Device(0):
        out = cupy_paged.paged_attention(*dev1, **kw, backend=backend)
    got = (out, dev1[3], dev1[4])
    assert all(x.device.id == 1 for x in got)
    for name, a, b in zip(("out", "key_cache", "value_cache"), got, want):
        with cupy.cuda.Device(1):
            a_host = a.get()
        assert np.array_equal(a_host.view(np.uint16), b.get().view(np.uint16)), name


def _head_shard(dev, kw, part, device):
    """CALLS-style (args, kwargs) of kv heads [part * Nkv/2, (part + 1) * Nkv/2) and their query
    heads, copied onto GPU ``device`` (the tensor-parallel split of one call)."""
    import cupy

    N, Nkv = kw["num_heads"], kw["kv_num_heads"]
    q, k, v, kc, vc = dev[:5]
    H = kc.shape[-1]
    T = q.shape[0]
    n = slice(part * N // 2, (part + 1) * N // 2)
    nkv = slice(part * Nkv // 2, (part + 1) * Nkv // 2)
    host = [q.reshape(T, N, H)[:, n].reshape(T, -1), k.reshape(T, Nkv, H)[:, nkv].reshape(T, -1),
            v.reshape(T, Nkv, H)[:, nkv].reshape(T, -1), kc[:, :, nkv], vc[:, :, nkv]]
    host = [x.get() for x in host] + [None if x is None else x.get() for x in dev[5:]]
    with cupy.cuda.Device(device):
        shard = [None if x is None else cupy.asarray(np.ascontiguousarray(x)) for x in host]
    return shard, dict(kw, num_heads=N // 2, kv_num_heads=Nkv // 2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "mea"])
@pytest.mark.parametrize("index", [0, 1])
def test_heads_sharded_across_two_gpus_match_one_gpu(backend, index):
    """Half the kv heads (and their query heads) on each GPU, as tensor parallelism splits a
    layer: the two outputs side by side equal the one-GPU call within the fp16 budget (the
    split-KV planner may choose differently for half the heads), and each GPU's caches equal
    its heads' slice of the one-GPU caches bit for bit."""
    import cupy

    import cupy_paged

    _two_gpus()
    dev, kw = _device_call(index)
    want_out, want_kc, want_vc = (x.get() for x in _call(dev, kw, backend))
    T, N, H = want_out.shape[0], kw["num_heads"], dev[3].shape[-1]
    Nkv = kw["kv_num_heads"]
    got = []
    for part in (0, 1):
        shard, skw = _head_shard(dev, kw, part, part)
        with cupy.cuda.Device(part):
            out = cupy_paged.paged_attention(*shard, **skw, backend=backend)
            got.append((out.get(), shard[3].get(), shard[4].get()))
            assert out.device.id == part
    out = np.concatenate([g[0].reshape(T, N // 2, H) for g in got], axis=1).astype(np.float32)
    want = want_out.reshape(T, N, H).astype(np.float32)
    err = np.linalg.norm(out - want) / max(np.linalg.norm(want), 1e-30)
    assert np.isfinite(out).all() and err <= 2e-3, f"{backend} call {index}: rel err {err:.2e}"
    for part, g in enumerate(got):
        nkv = slice(part * Nkv // 2, (part + 1) * Nkv // 2)
        for name, have, full in (("key_cache", g[1], want_kc), ("value_cache", g[2], want_vc)):
            assert np.array_equal(have.view(np.uint16), full[:, :, nkv].view(np.uint16)), (
                f"{backend} call {index}: GPU {part} {name}")


# ---------------------------------------------------------------- damaged cubin, then load


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["tail_cut", "byte_flipped"])
def test_damaged_cubin_is_rebuilt_before_loading(how, tmp_path, monkeypatch):
    import cupy

    from cupy_paged.jit import KernelSpec, compile_variant, get_function, register

    monkeypatch.setenv("CUPY_PAGED_CACHE_DIR", str(tmp_path))
    name = f"concurrency_gpu_axpy_{how}"
    register(KernelSpec(name, "smoke/axpy.cu",
                        f'extern "C" __global__ void {name}(int n, float a, const float* x, '
                        f"float* y) {{\n  cupy_paged::smoke::axpy<float>(n, a, x, y);\n}}\n"))
    sm = cupy.cuda.Device().compute_capability
    path = compile_variant(name, f"sm_{sm}").path
    data = path.read_bytes()
    path.write_bytes(data[:-64] if how == "tail_cut"
                     else data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    kernel = get_function(name)                         # first load of this variant
    assert path.read_bytes() == data, "the damaged cubin was not rebuilt"
    n, a = 1000, 1.5
    x = cupy.arange(n, dtype=cupy.float32)
    y = cupy.ones(n, dtype=cupy.float32)
    kernel((4,), (128,), (np.int32(n), np.float32(a), x, y))
    assert bool(cupy.allclose(y, a * cupy.arange(n, dtype=cupy.float32) + 1))
