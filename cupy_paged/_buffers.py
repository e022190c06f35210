"""The buffers of a call, on every call and before anything is written: each array the call
writes (the caches in place, ``out``) must be writable and share no byte with any other
argument, and on the GPU the arrays the kernels move in 16-byte vectors must start on 16-byte
addresses. ValueError naming the arguments.
"""
from __future__ import annotations

import numpy as np

# What each call writes (the caches in place, out as its result), then what it only reads.
WRITTEN = ("key_cache", "value_cache", "out")
READ = ("query", "key", "value", "cumulative_sequence_length", "past_seqlens", "block_table",
        "cos_cache", "sin_cache", "head_sink", "slot_mapping", "q_norm_weight", "k_norm_weight",
        "k_scale", "v_scale")
_VECTORS = ("query", "key", "value")   # read by the GPU kernels in 16-byte vectors, as written


def check_buffers(a, kind, aligned=False):
    """Per call, before anything is written: each array the call writes is writable and shares
    no byte with any other argument; with aligned (GPU plans) the arrays the kernels move in
    16-byte vectors start on 16-byte addresses. ValueError naming the arguments.

    a: the adopted arrays by argument name; kind: "numpy" or "cupy". Every array is already
    C-contiguous, so its bytes are exactly [start, start + nbytes): NumPy's may_share_memory
    is exact here; on the GPU (CuPy arrays are always writable) the test is a few integer
    comparisons of pointer ranges, about a microsecond per call.
    """
    if kind == "numpy":
        for name in WRITTEN:
            x = a[name]
            if x is not None and not x.flags.writeable:
                raise ValueError(
                    f"{name}: expected a writable array (the call writes into it), got a "
                    f"read-only one ({name}.flags.writeable is False); pass a writable array "
                    f"(e.g. {name}.copy()) and keep using that one")
        _raise_overlap(a, np.may_share_memory)
        return
    spans = {n: _span(a.get(n)) for n in WRITTEN + READ}
    check_device_buffers({n: lo for n, (lo, _) in spans.items()},
                         {n: hi - lo for n, (lo, hi) in spans.items()}, a, aligned)


def check_device_buffers(ptr, sizes, a, aligned=True):
    """``check_buffers`` on the GPU from a call's device addresses ``ptr`` (name -> int, 0 for
    None; GPU plans read them once per call and launch with the same ones) and byte sizes
    ``sizes`` (name -> int: ``buffer_sizes`` of the call's Problem); ``a``: the arrays, read
    only to name the culprits when a check fails."""
    k0 = ptr["key_cache"]
    k1 = k0 + sizes["key_cache"]
    v0 = ptr["value_cache"]
    v1 = v0 + sizes["value_cache"]
    o0 = ptr["out"]
    o1 = o0 + sizes["out"]
    shared = k0 < v1 and v0 < k1 or o0 < k1 and k0 < o1 or o0 < v1 and v0 < o1
    for name in READ:
        lo = ptr.get(name, 0)
        hi = lo + sizes[name]
        if lo < hi and (lo < k1 and k0 < hi or lo < v1 and v0 < hi or lo < o1 and o0 < hi):
            shared = True
    if shared:
        _raise_overlap(a, lambda x, y: _span(x)[0] < _span(y)[1] and _span(y)[0] < _span(x)[1])
    # the arrays the kernels move in 16-byte vectors; their own check names the array
    if aligned and (k0 | v0 | o0 | ptr["query"] | ptr["key"] | ptr["value"]) & 15:
        from .backends._launch import check_aligned
        check_aligned(**{n: a[n] for n in _VECTORS + WRITTEN if a[n] is not None})


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def buffer_sizes(problem):
    """Bytes of each argument of a call of ``problem`` (0 for an absent one): known from the
    signature, so a GPU plan computes them once. The latent layout has no value and no
    value_cache, and its output is (T, N*Hv)."""
    e, i32 = _ITEMSIZE[problem.dtype], 4
    T, N, Nkv, H = problem.num_tokens, problem.num_heads, problem.kv_num_heads, problem.head_size
    no_value = problem.packed or problem.latent
    width = (N + 2 * Nkv) * H if problem.packed else N * H
    slots = problem.num_blocks * problem.block_size * Nkv * H
    k_item = 1 if problem.k_cache_dtype else e        # one-byte caches (cupy_paged/_quant.py)
    v_item = 1 if problem.v_cache_dtype else e
    rotary = problem.cos_rows * (problem.rotary_dim // 2) * e
    return {"query": T * width * e, "key": 0 if problem.packed else T * Nkv * H * e,
            "value": 0 if no_value else T * Nkv * H * e, "key_cache": slots * k_item,
            "value_cache": 0 if problem.latent else slots * v_item,
            "cumulative_sequence_length": (problem.batch + 1) * i32,
            "past_seqlens": problem.batch * i32,
            "block_table": problem.batch * problem.max_blocks * i32, "cos_cache": rotary,
            "sin_cache": rotary, "out": T * N * problem.value_head_size * e,
            "head_sink": N * e if problem.head_sink else 0,
            "slot_mapping": T * i32 if problem.slot_mapping else 0,
            "q_norm_weight": H * e if problem.qk_norm else 0,
            "k_norm_weight": H * e if problem.qk_norm else 0,
            # scales: at most per channel (a per-tensor one is 4 bytes of it)
            "k_scale": 4 * Nkv * H if problem.k_cache_dtype else 0,
            "v_scale": 4 * Nkv * H if problem.v_cache_dtype else 0}


def _span(x):
    """[first, end) bytes of a GPU array; (0, 0), which overlaps nothing, for None or empty."""
    if x is None or not x.nbytes:
        return 0, 0
    lo = x.data.ptr
    return lo, lo + x.nbytes


def _raise_overlap(a, overlaps):
    """ValueError for the first written array that overlaps a later argument, if any."""
    present = [(n, a.get(n)) for n in WRITTEN + READ if a.get(n) is not None]
    for i, (name, x) in enumerate(present):
        for other, y in present[i + 1:]:
            if name in WRITTEN and overlaps(x, y):
                fix = ("two separate caches" if other == "value_cache" else
                       "a separate out, or out=None" if "out" in (name, other) else
                       f"a {other} that is not a view of {name}")
                same = " (the same array)" if x is y else ""
                raise ValueError(f"{name}: expected memory of its own (the call writes "
                                 f"{name}), got memory shared with {other}{same}; pass {fix}")
