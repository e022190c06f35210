"""Quickstart: a paged KV cache, one prefill step and one decode step, checked densely.

    python examples/quickstart.py

Three sequences of 5, 17 and 33 tokens are prefilled into a cache of 16-token blocks handed
out in random order (as in a long-running server), then each decodes one token. The decode
and prefill outputs are compared with a dense NumPy recomputation from the cache's gathered
keys and values. Runs on the GPU (float16) when CuPy sees one, else on NumPy (float32).
"""

import numpy

import cupy_paged
from cupy_paged.cache import PagedKVCache
from cupy_paged.info import NUMPY_FALLBACK, gpu_unavailable
from cupy_paged.rotary import rotary_cache

N, NKV, H = 8, 2, 64          # query heads, kv heads (GQA group 4), head size
BLOCK_SIZE, NUM_BLOCKS = 16, 32
PREFILL = [5, 17, 33]         # prompt lengths: one partial block, a block + 1, two blocks + 1
MAX_POS = 128                 # rows of the rotary tables; every position must be below it


def pick_device():
    """(xp, dtype, why): CuPy + float16 if a GPU is usable, else NumPy + float32."""
    try:
        import cupy
    except ImportError:
        return numpy, numpy.float32, f"CuPy is not installed; {NUMPY_FALLBACK}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device, or a driver too old for this CuPy
        return numpy, numpy.float32, f"{gpu_unavailable(exc)}; {NUMPY_FALLBACK}"
    if count == 0:
        return numpy, numpy.float32, f"{gpu_unavailable(None)}; {NUMPY_FALLBACK}"
    name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    return cupy, numpy.float16, f"GPU 0: {name}"


def to_host(array):
    return array.get() if hasattr(array, "get") else numpy.asarray(array)


def rotate(x, positions, cos, sin):
    """Non-interleaved rotary of x (T, heads, H) at positions (T,), in float64."""
    half = cos.shape[1]
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return numpy.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half:]], axis=-1)


def dense_attention(q, keys, values, positions):
    """Causal attention of q (T, N, H) at positions (T,) over keys/values (L, Nkv, H)."""
    k = numpy.repeat(keys, N // NKV, axis=1)              # query head n uses kv head n // G
    v = numpy.repeat(values, N // NKV, axis=1)
    scores = numpy.einsum("tnh,lnh->ntl", q, k) / numpy.sqrt(H)
    visible = numpy.arange(len(keys))[None, :] <= positions[:, None]   # (T, L)
    scores = numpy.where(visible[None], scores, -numpy.inf)
    weights = numpy.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    return numpy.einsum("ntl,lnh->tnh", weights, v).reshape(len(q), N * H)


def run_step(cache, step, cos, sin, rng, backend):
    """Random Q/K/V for the step's new tokens, then paged_attention; returns (q, out, backend)."""
    xp, t = cache.xp, step.num_tokens
    q = xp.asarray(rng.standard_normal((t, N * H)).astype(cache.dtype))
    k = xp.asarray(rng.standard_normal((t, NKV * H)).astype(cache.dtype))
    v = xp.asarray(rng.standard_normal((t, NKV * H)).astype(cache.dtype))

    def call(name):
        return cupy_paged.paged_attention(
            q, k, v, cache.key_cache, cache.value_cache,
            step.cumulative_sequence_length, step.past_seqlens, step.block_table, cos, sin,
            num_heads=N, kv_num_heads=NKV, do_rotary=True, backend=name)

    try:
        return q, call(backend), backend
    except cupy_paged.UnsupportedError as exc:   # raised before any launch: caches untouched
        if backend == "reference":
            raise
        print(f"  GPU backends refused this call:\n    {exc}\n  -> using backend='reference'")
        return q, call("reference"), "reference"


def check_step(cache, step, q, out, cos, sin):
    """Max |paged - dense| over the step's rows, dense recomputed from cache.gather()."""
    cum, past = to_host(step.cumulative_sequence_length), to_host(step.past_seqlens)
    q, out = to_host(q).astype(numpy.float64), to_host(out).astype(numpy.float64)
    cos, sin = to_host(cos).astype(numpy.float64), to_host(sin).astype(numpy.float64)
    worst = 0.0
    for b, sid in enumerate(step.seq_ids):
        rows = slice(int(cum[b]), int(cum[b + 1]))
        positions = int(past[b]) + numpy.arange(rows.stop - rows.start)
        keys, values = (to_host(a).astype(numpy.float64) for a in cache.gather(sid))
        q_rot = rotate(q[rows].reshape(-1, N, H), positions, cos, sin)
        want = dense_attention(q_rot, keys, values, positions)
        worst = max(worst, float(numpy.abs(out[rows] - want).max(initial=0.0)))
    return worst


def main():
    xp, dtype, why = pick_device()
    print(f"cupy_paged {cupy_paged.__version__}: {why}")
    print(f"  running on {xp.__name__} with {numpy.dtype(dtype).name}")
    backend = "auto" if xp is not numpy else "reference"
    rng = numpy.random.default_rng(0)

    cache = PagedKVCache(NUM_BLOCKS, BLOCK_SIZE, NKV, H, dtype=dtype, xp=xp,
                         allocation="random", seed=0)
    cos, sin = rotary_cache(MAX_POS, H, dtype=dtype, xp=xp)
    sids = [cache.add_sequence() for _ in PREFILL]
    print(f"  key_cache/value_cache: {cache.key_cache.shape} {cache.key_cache.dtype}; "
          f"cos/sin: {cos.shape}")
    # float16 output rounding (~5e-4 relative) dominates; float32 reaches ~1e-6.
    tolerance = 1e-2 if dtype == numpy.float16 else 1e-4

    for label, counts in (("prefill", PREFILL), ("decode", [1] * len(sids))):
        step = cache.begin_step(dict(zip(sids, counts)))
        q, out, used = run_step(cache, step, cos, sin, rng, backend)
        backend = used   # once the GPU backends refuse, stay on the reference
        error = check_step(cache, step, q, out, cos, sin)
        host_out = to_host(out).astype(numpy.float64)
        print(f"\n{label}: T={step.num_tokens} query {tuple(q.shape)} -> out "
              f"{tuple(out.shape)} {out.dtype} via backend={used!r}")
        print(f"  cumulative_sequence_length={to_host(step.cumulative_sequence_length).tolist()}"
              f" past_seqlens={to_host(step.past_seqlens).tolist()}")
        print(f"  block_table=\n{to_host(step.block_table)}")
        for sid in sids:
            print(f"  sequence {sid}: length {cache.length(sid):3d}, blocks {cache.blocks_of(sid)}")
        print(f"  output checksum sum={host_out.sum():.6f} |sum|={numpy.abs(host_out).sum():.4f}")
        print(f"  max |paged - dense| = {error:.3e} (tolerance {tolerance:g})")
        if not error <= tolerance:
            raise SystemExit(f"{label} output disagrees with the dense recomputation")

    print(f"\n{cache!r}")


if __name__ == "__main__":
    main()
