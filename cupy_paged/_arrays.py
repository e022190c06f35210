"""Which array module a call runs on, and zero-copy adoption of foreign GPU arrays.

NumPy arrays run on the host; CuPy arrays on their GPU. Objects exposing
``__cuda_array_interface__`` or ``__dlpack__`` (torch tensors, JAX arrays...) are viewed
without a copy as CuPy (GPU) or NumPy (CPU) arrays, and the output goes back as the caller's
kind where that is cheap (torch). CuPy is imported only when a GPU array shows up.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

_DLPACK_CPU, _DLPACK_CUDA = 1, 2


@dataclass
class AdoptedArrays:
    """The call's arrays as NumPy or CuPy arrays (None where the argument was None).

    kind: "numpy" or "cupy"; xp: that module; origin: "torch" when the caller passed torch
    tensors (the output is returned as one), else None.
    """

    kind: str
    xp: object
    arrays: dict = field(default_factory=dict)
    origin: str | None = None

    def wrap(self, result):
        """Return ``result`` as the kind of array the caller passed (zero-copy)."""
        if self.origin == "torch":
            import torch
            return torch.from_dlpack(result)
        return result


def adopt_arrays(named):
    """Turn each named argument into a NumPy or CuPy array, all of one kind and device.

    named: ordered mapping argument name -> array-like or None. The first non-None argument
    decides the kind. Raises TypeError naming the argument that is not an array or that
    differs in kind, ValueError for a CuPy array on another GPU.
    """
    arrays, kinds, origin = {}, {}, None
    for name, value in named.items():
        if value is None:
            arrays[name] = None
            continue
        arrays[name], kinds[name], value_origin = _as_array(name, value)
        origin = origin or value_origin
    if not kinds:
        raise TypeError("query: expected an array, got None")
    first_name, kind = next(iter(kinds.items()))
    for name, other in kinds.items():
        if other != kind:
            raise TypeError(
                f"{name}: is a {other} array but {first_name} is a {kind} array; "
                "pass every array on the same side (all NumPy, or all on the GPU)")
    if kind == "cupy":
        _check_same_device(arrays, first_name)
        import cupy as xp
    else:
        xp = np
    return AdoptedArrays(kind=kind, xp=xp, arrays=arrays, origin=origin)


def _as_array(name, value):
    """(array, kind, origin) for one argument."""
    if isinstance(value, np.ndarray):
        return value, "numpy", None
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(value, cupy.ndarray):
        return value, "cupy", None
    origin = "torch" if type(value).__module__.split(".")[0] == "torch" else None
    if hasattr(value, "__cuda_array_interface__"):
        import cupy
        return cupy.asarray(value), "cupy", origin
    if hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
        device_type = int(value.__dlpack_device__()[0])
        if device_type == _DLPACK_CPU:
            return np.from_dlpack(value), "numpy", origin
        if device_type == _DLPACK_CUDA:
            import cupy
            return cupy.from_dlpack(value), "cupy", origin
    raise TypeError(
        f"{name}: expected a NumPy or CuPy array (or a GPU array exposing "
        f"__cuda_array_interface__ / __dlpack__), got {type(value).__name__}")


def _check_same_device(arrays, first_name):
    device = arrays[first_name].device.id
    for name, array in arrays.items():
        if array is not None and array.device.id != device:
            raise ValueError(
                f"{name}: expected an array on GPU {device} (where {first_name} is), "
                f"got one on GPU {array.device.id}")
