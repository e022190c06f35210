"""How every kernel is launched: ``DirectLaunch`` (one params struct, driver launch, optionally
programmatic), plus the per-dtype variant table, grid sizing, SM counts and alignment checks
the launchers share. CuPy is imported on first use only.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading
from typing import NamedTuple

import numpy as np

from ..jit import KernelSpec, register
from ._params import entry_point

THREADS = 256
# Resident 256-thread blocks per SM at full occupancy (2048 threads/SM on sm70..sm90): the
# grid-stride loops need no more blocks than one full wave.
BLOCKS_PER_SM = 8


class GpuDtype(NamedTuple):
    """A 16-bit dtype the GPU kernels instantiate: variant-name suffix, CUDA type, CUTLASS
    type, lowest SM."""

    short: str
    ctype: str
    cutlass: str
    min_sm: int


# The one table of the kernels' dtypes.
DTYPES = {"float16": GpuDtype("f16", "__half", "cutlass::half_t", 50),
          "bfloat16": GpuDtype("bf16", "__nv_bfloat16", "cutlass::bfloat16_t", 80)}


def register_per_dtype(prefix, source, params, call, min_blocks=None):
    """Register ``<prefix>_f16`` / ``<prefix>_bf16`` from ``source``: entries taking the
    ``params`` struct (a ``_params.ParamsStruct``) and running ``call.format(T=ctype)``
    (``min_blocks`` as in ``_params.entry_point``)."""
    return tuple(
        register(KernelSpec(f"{prefix}_{suffix}", source,
                            entry_point(f"{prefix}_{suffix}", params, call.format(T=ctype),
                                        THREADS, min_blocks),
                            min_arch=min_sm))
        for suffix, ctype, _, min_sm in DTYPES.values())


_cuda = None    # cupy.cuda, bound by the first DirectLaunch (CuPy loads on first use)


class ArgumentBlock:
    """A kernel's parameters (``_params.entry_point``: the pointer fields one by one, then the
    scalars struct) laid out in host memory as ``cuLaunchKernel`` takes them: one buffer
    holding the params struct's bytes, and ``params``, the address of an array pointing at
    each pointer field (8 bytes apart) and at the scalars after them. The scalars are copied in
    once (``packed``: the struct's (1,) NumPy mirror); ``fill`` writes the call's device
    pointers into the leading ``pointer_count`` fields.
    """

    __slots__ = ("_buffer", "_pack", "_params", "params", "pointer_count")

    def __init__(self, packed, pointer_count):
        data = np.asarray(packed).tobytes()
        self.pointer_count = pointer_count
        self._buffer = (ctypes.c_uint8 * max(-(-len(data) // 16) * 16, 16))()
        ctypes.memmove(ctypes.addressof(self._buffer), data, len(data))
        base = ctypes.addressof(self._buffer)
        entries = [base + 8 * i for i in range(pointer_count)]
        if len(data) > 8 * pointer_count:
            entries.append(base + 8 * pointer_count)  # the scalars struct
        self._params = (ctypes.c_void_p * max(len(entries), 1))(*entries)
        self.params = ctypes.addressof(self._params)
        self._pack = struct.Struct(f"<{pointer_count}Q")

    def fill(self, pointers):
        """Write the device addresses (ints, in field order) into the pointer fields."""
        self._pack.pack_into(self._buffer, 0, *pointers)

    def read(self, size):
        """The first ``size`` bytes of the struct as the kernel would receive them (tests)."""
        return ctypes.string_at(self._params[0], size)


# ---------------------------------------------------------------- programmatic launches


class _LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute (cuda.h): an id, padding to 8 bytes, a 64-byte value union."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    """CUlaunchConfig (cuda.h)."""

    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3),
                ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


@functools.cache
def _launch_kernel_ex():
    """The driver's cuLaunchKernelEx through ctypes (CuPy wraps only cuLaunchKernel), or None
    where the driver library or the entry point is missing."""
    try:
        fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


def programmatic_supported(device_id):
    """Whether kernels on GPU ``device_id`` can be launched programmatically (sm90+, a driver
    with cuLaunchKernelEx) and CUPY_PAGED_PDL is not "0"."""
    if os.environ.get("CUPY_PAGED_PDL", "1") == "0" or _launch_kernel_ex() is None:
        return False
    import cupy

    return int(cupy.cuda.Device(device_id).compute_capability) >= 90


class DirectLaunch:
    """One kernel on fixed grid, block and shared memory, launched through the driver.

    CuPy's ``RawKernel.__call__`` converts every argument on every launch (its host time grows
    with the argument count: benchmarks/NOTES.md). A launch here packs the call's device
    pointers into a prepared ``ArgumentBlock`` and calls ``cuLaunchKernel`` on the current
    CuPy stream, so a plan pays the conversions once. kernel: a ``cupy.RawKernel`` (kept alive) whose
    one parameter is the struct ``params`` (a ``_params.ParamsStruct``); packed: its (1,) NumPy
    mirror holding the scalars (``params.pack``); a launch supplies the pointer fields.
    Thread-safe: one lock covers filling the block and the launch (the driver copies the
    values before it returns). The launch is captured like any other by CUDA graph capture.

    programmatic=True (pass it only where ``programmatic_supported``): launched through
    cuLaunchKernelEx with programmatic stream serialization, so the kernel may start while the
    previous kernel on the stream runs (cuda_src/common/pdl.cuh says what the kernel must then
    do). Only for a kernel whose predecessor on the stream is always the one this project
    launches just before it.
    """

    __slots__ = ("_block", "_config", "_dims", "_ex", "_function", "_kernel", "_lock")

    def __init__(self, kernel, params, packed, grid, block, shared_mem=0, programmatic=False):
        global _cuda
        import cupy.cuda

        _cuda = cupy.cuda
        self._kernel = kernel
        self._function = kernel.kernel.ptr
        self._block = ArgumentBlock(packed, len(params.pointers))
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        self._dims = grid + block + (int(shared_mem),)
        self._lock = threading.Lock()
        self._ex = self._config = None
        if programmatic:
            config = _LaunchConfig(shared_mem=int(shared_mem), num_attrs=1)
            config.grid[:], config.block[:] = grid, block
            # the pointer keeps the attribute alive as long as the config
            config.attrs = ctypes.pointer(
                _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1))
            self._config, self._ex = config, _launch_kernel_ex()

    @property
    def programmatic(self):
        """Whether this kernel starts programmatically behind the previous one."""
        return self._ex is not None

    def __call__(self, *pointers, stream=None):
        """Launch with ``pointers`` (device addresses as ints: ``array.data.ptr``, 0 for none)
        on ``stream`` (a CUDA stream handle; None: the current CuPy stream)."""
        if stream is None:
            stream = _cuda.get_current_stream().ptr
        with self._lock:
            self._block.fill(pointers)
            if self._ex is None:
                _cuda.driver.launchKernel(self._function, *self._dims, stream,
                                          self._block.params, 0)
                return
            self._config.stream = stream
            status = self._ex(self._config, self._function, self._block.params, None)
            if status:
                raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {status}")


def pointer(array):
    """The device address of a CuPy array (0 for None)."""
    return 0 if array is None else array.data.ptr


def variant(prefix, dtype):
    """The registered name of ``prefix`` for ``dtype`` ("float16" or "bfloat16")."""
    return f"{prefix}_{DTYPES[dtype].short}"


def grid_size(items, device=None):
    """Blocks for ``items`` grid-stride work items: enough for them, at most one full wave of
    GPU ``device`` (None: the current one)."""
    if device is None:
        import cupy
        device = cupy.cuda.Device().id
    return max(1, min(-(-items // THREADS), BLOCKS_PER_SM * sm_count(device)))


@functools.cache
def sm_count(device_id):
    """Multiprocessors of GPU ``device_id``."""
    import cupy

    return cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]


def check_aligned(**arrays):
    """ValueError naming the first array whose data is not 16-byte aligned (the kernels move
    16-byte vectors). Fresh CuPy allocations are 256-byte aligned; only odd views fail."""
    for name, x in arrays.items():
        if x.data.ptr % 16:
            raise ValueError(
                f"{name}: the GPU kernels need 16-byte aligned data, got address "
                f"{x.data.ptr:#x} (a view at an odd element offset?); pass a fresh array")
