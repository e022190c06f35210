"""Launch helpers shared by the grid-stride kernels (prologue, gather) and the flash launcher:
the per-dtype variant table, generated entry points, grid sizing, SM counts, alignment checks.
CuPy is imported on first use only.
"""
from __future__ import annotations

import functools

import numpy as np

from ..jit import KernelSpec, register

NULL = np.uint64(0)  # a null pointer kernel argument (no guard flags, no workspace)
THREADS = 256
# Resident 256-thread blocks per SM at full occupancy (2048 threads/SM on sm70..sm90): the
# grid-stride loops need no more blocks than one full wave.
BLOCKS_PER_SM = 8

# dtype -> (name suffix, C++ type, lowest SM)
DTYPES = {"float16": ("f16", "__half", 50), "bfloat16": ("bf16", "__nv_bfloat16", 80)}


def entry_point(name, ctype, args, body):
    """``extern "C" __global__ void name(args) { body }`` with THREADS as its launch bound."""
    return (f'extern "C" __global__ void __launch_bounds__({THREADS})\n'
            f"{name}({args.format(T=ctype)}) {{\n  {body}\n}}\n")


def register_per_dtype(prefix, source, args, call, preamble=""):
    """Register ``<prefix>_f16`` / ``<prefix>_bf16`` from ``source``: entries calling
    ``call.format(T=ctype)`` with ``args`` (a ``{T}``-templated parameter list), after
    ``preamble`` (e.g. a ``ScalarStruct.definition``)."""
    return tuple(
        register(KernelSpec(f"{prefix}_{suffix}", source,
                            preamble + entry_point(f"{prefix}_{suffix}", ctype, args,
                                                   call.format(T=ctype)),
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
