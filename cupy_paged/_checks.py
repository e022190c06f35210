"""Small argument checks shared by the validators: rank, dtype, shape, integers, reals and
flags, each raising ValueError / TypeError that names the argument, the expected and the
actual value."""
from __future__ import annotations

import math
import numbers

import numpy as np

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def rank(name, array, rank, layout):
    if array.ndim != rank:
        raise ValueError(f"{name}: expected {rank} dimensions {layout}, "
                         f"got shape {tuple(array.shape)}")


def float_dtype(name, array):
    dtype = str(array.dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype ({', '.join(FLOAT_DTYPES)}), "
                        f"got {dtype}")
    return dtype


def dtype_is(name, array, dtype, like="query"):
    if str(array.dtype) != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of {like}), "
                        f"got {array.dtype}")


def same(name, array, like, like_name):
    """``array`` must match ``like`` in shape and dtype."""
    if array.ndim != like.ndim or tuple(array.shape) != tuple(like.shape):
        raise ValueError(f"{name}: expected the shape of {like_name} {tuple(like.shape)}, "
                         f"got {tuple(array.shape)}")
    if array.dtype != like.dtype:
        raise TypeError(f"{name}: expected the dtype of {like_name} ({like.dtype}), "
                        f"got {array.dtype}")


def optional_bound(name, value):
    if value is None:
        return None
    value = integer(name, value)
    if value < 0:
        raise ValueError(f"{name}: expected None or an integer >= 0, got {value}")
    return value


def positive_int(name, value):
    value = integer(name, value)
    if value <= 0:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return value


def integer(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return int(value)


def flag(name, value):
    """True or False (NumPy's bool too); ORT's 0/1 attributes or strings are refused, so a
    truthy "False" never turns a feature on."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name}: expected a bool (True or False), got {value!r} "
                    f"({type(value).__name__})")


def finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return float(value)
