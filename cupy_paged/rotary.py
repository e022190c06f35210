"""Rotary-embedding tables (cos_cache, sin_cache) in the layout paged_attention reads.

Row p of each table holds the angles of absolute position p; column i pairs channel i with
channel i + R/2 (non-interleaved) or 2i with 2i+1 (interleaved). See spec/semantics.md, step 2.
"""

import operator

import numpy


def _array_module(xp, argname="xp"):
    """Resolve ``xp`` (None, "numpy", "cupy", or the module itself) to numpy or cupy.

    CuPy is imported only here and only when asked for, so NumPy-only users never need it.
    """
    if xp is None or xp is numpy or xp == "numpy":
        return numpy
    name = xp if isinstance(xp, str) else getattr(xp, "__name__", None)
    if name == "cupy":
        if isinstance(xp, str):
            try:
                import cupy
            except ImportError as exc:
                raise ImportError(
                    f'{argname}="cupy" needs CuPy (import failed: {exc}); '
                    "install cupy-cuda12x or pass xp=numpy"
                ) from exc
            return cupy
        return xp
    raise TypeError(
        f'{argname} must be None, "numpy", "cupy", numpy or cupy (got {xp!r})'
    )


def _as_int(value, argname, minimum):
    """``value`` as a Python int >= minimum; bools and floats are refused, not truncated."""
    if isinstance(value, bool):
        raise TypeError(f"{argname} must be an integer (got bool {value!r})")
    try:
        result = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{argname} must be an integer (got {type(value).__name__} {value!r})"
        ) from None
    if result < minimum:
        raise ValueError(f"{argname} must be >= {minimum} (got {result})")
    return result


def _float_dtype(dtype, argname="dtype"):
    """numpy.dtype(dtype), which must be a floating type (bfloat16 from ml_dtypes included)."""
    try:
        resolved = numpy.dtype(dtype)
    except TypeError:
        raise TypeError(f"{argname} must be a floating dtype (got {dtype!r})") from None
    if resolved.kind != "f" and resolved.name != "bfloat16":
        raise TypeError(
            f"{argname} must be a floating dtype such as numpy.float16 (got {resolved})"
        )
    return resolved


def rotary_cache(max_pos, rotary_dim, base=10000.0, dtype=numpy.float16, xp=None):
    """Build the (cos, sin) tables for rotary embeddings of positions 0 .. max_pos-1.

    inv_freq[i] = base ** (-2i / rotary_dim) and angle[p, i] = p * inv_freq[i], computed in
    float64 on the host and rounded once to ``dtype``.

    Args:
        max_pos: number of positions (rows), >= 1; must exceed every position the op sees.
        rotary_dim: R, the number of rotated channels per head; even, > 0 and <= head_size.
        base: the frequency base (10000 for most models), a finite number > 0.
        dtype: floating dtype of the tables; match the query's dtype (float16 on GPU).
        xp: array module for the result: numpy, cupy, "numpy", "cupy", or None (numpy).

    Returns:
        (cos, sin), each (max_pos, rotary_dim // 2) of ``dtype`` in ``xp``, C-contiguous.
    """
    max_pos = _as_int(max_pos, "max_pos", 1)
    rotary_dim = _as_int(rotary_dim, "rotary_dim", 1)
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even (got {rotary_dim})")
    if isinstance(base, bool) or not isinstance(base, (int, float, numpy.number)):
        raise TypeError(f"base must be a number (got {type(base).__name__} {base!r})")
    if not (numpy.isfinite(base) and base > 0):
        raise ValueError(f"base must be a finite number > 0 (got {base!r})")
    dtype = _float_dtype(dtype)
    module = _array_module(xp)

    exponents = numpy.arange(0, rotary_dim, 2, dtype=numpy.float64) / rotary_dim
    inv_freq = numpy.float64(base) ** -exponents                      # (R/2,)
    angle = numpy.arange(max_pos, dtype=numpy.float64)[:, None] * inv_freq  # (max_pos, R/2)
    cos = numpy.ascontiguousarray(numpy.cos(angle).astype(dtype))
    sin = numpy.ascontiguousarray(numpy.sin(angle).astype(dtype))
    if module is numpy:
        return cos, sin
    return module.asarray(cos), module.asarray(sin)
