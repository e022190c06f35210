"""Which array module a call runs on, and zero-copy adoption of foreign GPU arrays.

NumPy arrays run on the host; CuPy arrays on their GPU. Objects exposing
``__cuda_array_interface__`` or ``__dlpack__`` (torch tensors, JAX arrays...) are viewed
without a copy as CuPy (GPU) or NumPy (CPU) arrays, and the output goes back as the caller's
kind where that is cheap (torch). CuPy is imported only when a GPU array shows up.
"""
from __future__ import annotations

import contextlib
import functools
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

    @property
    def device(self):
        """The arrays' GPU id; None on NumPy."""
        return self.arrays["query"].data.device_id if self.kind == "cupy" else None

    @property
    def sm(self):
        """Compute capability of the arrays' GPU as an int (e.g. 90); None on NumPy."""
        if self.kind != "cupy":
            return None
        return _compute_capability(self.arrays["query"].data.device_id)

    def wrap(self, result, caller_out=None):
        """Return ``result`` as the kind of array the caller passed (zero-copy); the caller's
        own ``out`` object when one was given."""
        if caller_out is not None:
            return caller_out
        if self.origin == "torch":
            import torch
            return torch.from_dlpack(result)
        return result

    def context(self):
        """Where the call's GPU work runs: the arrays' device, and for torch tensors torch's
        current stream there (so the op orders with the caller's torch work). A no-op on
        NumPy."""
        if self.kind != "cupy":
            return _NOTHING
        device_id = self.arrays["query"].data.device_id
        if self.origin != "torch" and self.xp.cuda.runtime.getDevice() == device_id:
            return _NOTHING      # already current: a decode loop's usual case
        stack = contextlib.ExitStack()
        stack.enter_context(self.xp.cuda.Device(device_id))
        if self.origin == "torch":
            stack.enter_context(self._torch_stream(device_id))
        return stack

    def _torch_stream(self, device_id):
        import torch
        torch_stream = torch.cuda.current_stream(device_id)
        from_external = getattr(self.xp.cuda.Stream, "from_external", None)
        if from_external is not None:
            try:
                return from_external(torch_stream)
            except (TypeError, ValueError, AttributeError):
                pass
        return self.xp.cuda.ExternalStream(torch_stream.cuda_stream, device_id)


def adopt_arrays(named):
    """Turn each named argument into a NumPy or CuPy array, all of one kind and device.

    named: ordered mapping argument name -> array-like or None. The first non-None argument
    decides the kind. Raises TypeError naming the argument that is not an array or that
    differs in kind, ValueError for a CuPy array on another GPU.
    """
    arrays, kinds, origin = {}, {}, None
    cupy = sys.modules.get("cupy")
    gpu_array = None if cupy is None else cupy.ndarray
    for name, value in named.items():
        if value is None:
            arrays[name] = None
        elif type(value) is gpu_array:     # the common case, without a call per argument
            arrays[name], kinds[name] = value, "cupy"
        else:
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
    # DLPack first: it carries bfloat16, which __cuda_array_interface__ cannot describe (torch
    # raises on reading it for bf16). Look attributes up on the type: never call a property.
    kind = type(value)
    if hasattr(kind, "__dlpack__") and hasattr(kind, "__dlpack_device__"):
        device_type = int(value.__dlpack_device__()[0])
        if device_type == _DLPACK_CPU:
            return np.from_dlpack(value), "numpy", origin
        if device_type == _DLPACK_CUDA:
            import cupy
            return cupy.from_dlpack(value), "cupy", origin
    if hasattr(kind, "__cuda_array_interface__"):
        import cupy
        return cupy.asarray(value), "cupy", origin
    raise TypeError(
        f"{name}: expected a NumPy or CuPy array (or a GPU array exposing "
        f"__cuda_array_interface__ / __dlpack__), got {type(value).__name__}")


def _check_same_device(arrays, first_name):
    device = arrays[first_name].data.device_id
    for name, array in arrays.items():
        if array is not None and array.data.device_id != device:
            raise ValueError(
                f"{name}: expected an array on GPU {device} (where {first_name} is), "
                f"got one on GPU {array.data.device_id}")


_NOTHING = contextlib.nullcontext()


@functools.cache
def _compute_capability(device_id):
    import cupy
    return int(cupy.cuda.Device(device_id).compute_capability)
