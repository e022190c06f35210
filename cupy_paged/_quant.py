"""One-byte KV caches (ONNX Runtime's k_scale / v_scale inputs with int8 and float8_e4m3fn
caches; docs/semantics.md, "Quantized caches"): which cache dtypes, how a scale is shaped,
and the exact quantisation rule the reference applies (the GPU kernels must match it).

Symmetric scales, no zero point, float32: per tensor (1,) or per channel (Nkv, 1, H).
int8: x_q = clip(round_half_even(x / scale), -128, 127); float8_e4m3fn: x_q =
e4m3(clip(x / scale, -448, 448)) (round to nearest even, saturating: e4m3fn has no infinity).
Dequantised as x_q * scale before the dot products.
"""
from __future__ import annotations

import numpy as np

from . import _checks

CACHE_DTYPES = ("int8", "float8_e4m3fn")
E4M3_MAX = 448.0


def cache_dtype(name, cache, scale, dtype, kv_num_heads, head_size):
    """The quantised dtype of cache ``name`` ("int8" / "float8_e4m3fn"), or "" for a cache
    in the activations' dtype; checks that a scale is given exactly for a one-byte cache and
    that it is float32 (1,) or (Nkv, 1, H)."""
    scale_name = {"key_cache": "k_scale", "value_cache": "v_scale"}[name]
    got = str(cache.dtype)
    if scale is None:
        if got in CACHE_DTYPES:
            raise ValueError(f"{scale_name}: a {got} {name} needs its scale (float32, (1,) per "
                             f"tensor or (kv_num_heads, 1, head_size) per channel), got None")
        _checks.dtype_is(name, cache, dtype)
        return ""
    if got not in CACHE_DTYPES:
        raise TypeError(f"{name}: with {scale_name} given, expected a one-byte cache dtype "
                        f"({', '.join(CACHE_DTYPES)}), got {got}")
    if str(scale.dtype) != "float32":
        raise TypeError(f"{scale_name}: expected dtype float32, got {scale.dtype}")
    if tuple(scale.shape) not in ((1,), (kv_num_heads, 1, head_size)):
        raise ValueError(f"{scale_name}: expected shape (1,) (per tensor) or "
                         f"(kv_num_heads, 1, head_size) = ({kv_num_heads}, 1, {head_size}) "
                         f"(per channel), got {tuple(scale.shape)}")
    return got


def check_scale_values(name, scale):
    """Data check of a scale (host array): every value finite and > 0."""
    bad = np.flatnonzero(~(np.isfinite(scale) & (scale > 0)).ravel())
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}: every scale must be finite and > 0, got "
                         f"{np.ravel(scale)[i]} at flat index {i}")


def quantize(x, scale, cache_dtype, out_dtype):
    """x (tokens, Nkv, H) in float -> the cache's one-byte values (out_dtype: the cache's
    NumPy dtype). scale: (1,) or (Nkv, 1, H)."""
    y = x / _per_head(scale)
    if cache_dtype == "int8":
        return np.clip(np.rint(y), -128, 127).astype(out_dtype)
    return np.clip(y, -E4M3_MAX, E4M3_MAX).astype(out_dtype)


def dequantize(x_q, scale, compute_dtype):
    """Cache values (..., Nkv, H) -> x_q * scale in compute_dtype."""
    return x_q.astype(compute_dtype) * _per_head(scale).astype(compute_dtype)


def _per_head(scale):
    """A scale broadcastable over (..., Nkv, H): (1,) stays, (Nkv, 1, H) -> (Nkv, H)."""
    scale = np.asarray(scale)          # float32 (validated)
    return scale if scale.shape == (1,) else scale[:, 0, :]
