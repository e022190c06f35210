"""Launch helpers shared by the grid-stride kernels (prologue, gather) and the flash launcher:
the per-dtype variant table, generated entry points, grid sizing, SM counts, alignment checks.
CuPy is imported on first use only.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
import threading

import numpy as np

from ..jit import KernelSpec, register

NULL = np.uint64(0)  # a null pointer kernel argument (no guard flags, no workspace)
THREADS = 256
# Resident 256-thread blocks per SM at full occupancy (2048 threads/SM on sm70..sm90): the
# grid-stride loops need no more blocks than one full wave.
BLOCKS_PER_SM = 8

# dtype -> (name suffix, C++ type, lowest SM)
DTYPES = {"float16": ("f16", "__half", 50), "bfloat16": ("bf16", "__nv_bfloat16", 80)}


def entry_point(name, ctype, args, body, min_blocks=None):
    """``extern "C" __global__ void name(args) { body }`` with THREADS as its launch bound
    (and ``min_blocks`` resident blocks per SM asked of the register allocator, if given)."""
    bounds = THREADS if min_blocks is None else f"{THREADS}, {min_blocks}"
    return (f'extern "C" __global__ void __launch_bounds__({bounds})\n'
            f"{name}({args.format(T=ctype)}) {{\n  {body}\n}}\n")


def register_per_dtype(prefix, source, args, call, preamble="", min_blocks=None):
    """Register ``<prefix>_f16`` / ``<prefix>_bf16`` from ``source``: entries calling
    ``call.format(T=ctype)`` with ``args`` (a ``{T}``-templated parameter list), after
    ``preamble`` (e.g. a ``ScalarStruct.definition``); ``min_blocks`` as in entry_point."""
    return tuple(
        register(KernelSpec(f"{prefix}_{suffix}", source,
                            preamble + entry_point(f"{prefix}_{suffix}", ctype, args,
                                                   call.format(T=ctype), min_blocks),
                            min_arch=min_sm))
        for suffix, ctype, min_sm in DTYPES.values())


_NUMPY_OF_C = {"int": "<i4", "unsigned": "<u4", "float": "<f4", "long long": "<i8"}


class ScalarStruct:
    """A kernel's scalar parameters as one C struct passed by value, and its NumPy mirror.

    CuPy converts every kernel argument on every launch (H100: 5.4 us of host time for a
    10-argument launch, 9.9 us for 27); a (1,) NumPy structured array is passed by value as
    one argument, so a launcher packs its scalars once per problem and hands CuPy one object.
    fields: ((C type, name), ...) of "int", "unsigned", "float" and "long long"; the dtype is
    built with C's alignment rules (``align=True``), so its padding is the struct's; the
    generated definition static_asserts the size (NVRTC has no offsetof; tests compare the
    offsets with C's rules).
    """

    def __init__(self, name, fields):
        self.name, self.fields = name, tuple(fields)
        self.dtype = np.dtype([(n, _NUMPY_OF_C[c]) for c, n in self.fields], align=True)
        self.definition = (
            f"struct {name} {{\n" + "".join(f"  {c} {n};\n" for c, n in self.fields) + "};\n"
            f"static_assert(sizeof({name}) == {self.dtype.itemsize}, "
            f"\"{name}: the NumPy mirror's layout differs\");\n")

    def pack(self, *values):
        """The (1,) structured array holding ``values`` in field order."""
        if len(values) != len(self.fields):
            raise ValueError(f"{self.name}: {len(self.fields)} values expected, got "
                             f"{len(values)}")
        packed = np.zeros(1, dtype=self.dtype)
        packed[0] = values
        return packed


_cuda = None    # cupy.cuda, bound by the first DirectLaunch (CuPy loads on first use)
POINTER = None  # a DirectLaunch parameter refilled with a device pointer on every launch


class ArgumentBlock:
    """A kernel's parameter values laid out once in host memory, as ``cuLaunchKernel`` takes
    them: ``params`` is the address of an array of pointers, one per parameter, each to its
    value. Pointer parameters (``POINTER``) get 8-byte slots, packed together at the start of
    the block and refilled by ``fill``; every other parameter is a constant NumPy scalar or
    (1,) array (e.g. a ``ScalarStruct`` pack) copied in once, after them, 16-byte aligned.
    """

    __slots__ = ("_buffer", "_pack", "_params", "params", "pointer_count")

    def __init__(self, args):
        self.pointer_count = sum(arg is POINTER for arg in args)
        offsets, slot, offset = [], 0, -(-8 * self.pointer_count // 16) * 16
        constants = []
        for arg in args:
            if arg is POINTER:
                offsets.append(8 * slot)
                slot += 1
                continue
            data = np.asarray(arg).tobytes()
            if not data:
                raise ValueError("ArgumentBlock: an empty constant parameter")
            offsets.append(offset)
            constants.append((offset, data))
            offset = -(-(offset + len(data)) // 16) * 16
        self._buffer = (ctypes.c_uint8 * max(offset, 16))()
        base = ctypes.addressof(self._buffer)
        for at, data in constants:
            ctypes.memmove(base + at, data, len(data))
        self._params = (ctypes.c_void_p * max(len(offsets), 1))(*(base + o for o in offsets))
        self.params = ctypes.addressof(self._params)
        self._pack = struct.Struct(f"<{self.pointer_count}Q")

    def fill(self, pointers):
        """Write the device addresses (ints, in parameter order) into the pointer slots."""
        self._pack.pack_into(self._buffer, 0, *pointers)

    def read(self, index, size):
        """The ``size`` bytes parameter ``index`` points at (for tests)."""
        return ctypes.string_at(self._params[index], size)


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

    CuPy's ``RawKernel.__call__`` converts every argument on every launch (H200 host: 6.1 us
    for one argument, 17.5 us for 27; a NumPy structured argument goes through NumPy's
    descriptor machinery, ~10 us more). A launch here packs the call's device pointers into a
    prepared ``ArgumentBlock`` and calls ``cuLaunchKernel`` on the current CuPy stream, so a
    per-problem plan pays the conversions once. kernel: a ``cupy.RawKernel`` (kept alive);
    args: its parameters in order, ``POINTER`` or a constant (see ``ArgumentBlock``).
    Thread-safe: one lock covers filling the block and the launch (the driver copies the
    values before it returns). The launch is captured like any other by CUDA graph capture.

    programmatic=True (pass it only where ``programmatic_supported``): launched through
    cuLaunchKernelEx with programmatic stream serialization, so the kernel may start while the
    previous kernel on the stream runs (cuda_src/common/pdl.cuh says what the kernel must then
    do). Only for a kernel whose predecessor on the stream is always the one this project
    launches just before it.
    """

    __slots__ = ("_block", "_config", "_dims", "_ex", "_function", "_kernel", "_lock")

    def __init__(self, kernel, args, grid, block, shared_mem=0, programmatic=False):
        global _cuda
        import cupy.cuda

        _cuda = cupy.cuda
        self._kernel = kernel
        self._function = kernel.kernel.ptr
        self._block = ArgumentBlock(args)
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
    return f"{prefix}_{DTYPES[dtype][0]}"


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
