"""The cache dtype of a ``PagedKVCache`` and, for a one-byte cache, its scales (docs/
semantics.md, "Quantized caches"); the dequantisation ``gather`` applies."""

import numpy

from cupy_paged import _quant
from cupy_paged.rotary import _float_dtype


def dtype_and_scales(dtype, scale, kv_num_heads, head_size, xp, latent=False):
    """(dtype, k_scale, v_scale) of a new cache: a floating dtype and no scales, or a one-byte
    dtype (``_quant.CACHE_DTYPES``) with its float32 scales in xp. A latent cache has one
    cache, the key cache: it takes one scale (no pair) and its v_scale is None."""
    if isinstance(dtype, str) and dtype.startswith("float8"):
        import ml_dtypes  # noqa: F401  (registers the float8 dtype names with NumPy)
    try:
        one_byte = numpy.dtype(dtype).name in _quant.CACHE_DTYPES
    except TypeError:
        one_byte = False
    if not one_byte:
        if scale is not None:
            raise ValueError(f"scale: only a one-byte cache ({', '.join(_quant.CACHE_DTYPES)}) "
                             f"takes a scale, got dtype {dtype!r}")
        return _float_dtype(dtype), None, None
    resolved = numpy.dtype(dtype)
    if latent:
        if scale is None or isinstance(scale, tuple):
            got = "None" if scale is None else f"a tuple of {len(scale)} items"
            raise ValueError(
                f"scale: a latent {resolved} cache has one cache, key_cache, and needs its "
                f"scale alone (a number or a (1, 1, head_size) = (1, 1, {head_size}) array; "
                f"V is dequantised with it), got {got}")
        pair = (scale,)
    else:
        if scale is None:
            raise ValueError(f"scale: a {resolved} cache needs its scale (a number, a "
                             "(Nkv, 1, H) array, or a (k_scale, v_scale) pair), got None")
        pair = scale if isinstance(scale, tuple) else (scale, scale)
        if len(pair) != 2:
            raise ValueError(f"scale: expected a (k_scale, v_scale) pair, got {len(pair)} items")
    scales = []
    for name, s in zip(("k_scale", "v_scale"), pair):
        s = numpy.asarray(s, dtype=numpy.float32)
        s = s.reshape(1) if s.ndim == 0 else s
        if s.shape not in ((1,), (kv_num_heads, 1, head_size)):
            raise ValueError(f"scale: {name} must be a number or of shape (kv_num_heads, 1, "
                             f"head_size) = ({kv_num_heads}, 1, {head_size}), got {s.shape}")
        _quant.check_scale_values(name, s)
        scales.append(xp.asarray(s))
    return resolved, scales[0], (scales[1] if len(scales) > 1 else None)


def dequantize(x, scale):
    """A one-byte (length, Nkv, H) array as float32 values x_q * scale, in x's module."""
    return x.astype("float32") * (scale if scale.shape == (1,) else scale[:, 0, :])
