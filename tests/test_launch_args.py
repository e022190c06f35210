"""The kernels' scalar parameter structs (backends/_launch.ScalarStruct): the NumPy mirror
lays fields out as C does (natural alignment, tail padding), since NVRTC cannot check offsets
itself (it static_asserts the size only); packing is checked for count and values. CPU only."""
from __future__ import annotations

import numpy as np
import pytest

from cupy_paged.backends import _flash_kernels, _guard, _prologue
from cupy_paged.backends._launch import ScalarStruct

_SIZES = {"int": 4, "unsigned": 4, "float": 4, "long long": 8}
STRUCTS = {"flash": _flash_kernels.FWD_SCALARS, "prologue": _prologue.SCALARS,
           "guard": _guard.SCALARS}


def c_layout(fields):
    """(offsets, size) of a C struct of these fields: each at a multiple of its size."""
    offset, offsets, align = 0, [], 1
    for ctype, _ in fields:
        size = _SIZES[ctype]
        offset = -(-offset // size) * size
        offsets.append(offset)
        offset += size
        align = max(align, size)
    return offsets, -(-offset // align) * align


@pytest.mark.parametrize("struct", list(STRUCTS.values()), ids=list(STRUCTS))
def test_numpy_mirror_has_c_layout(struct):
    offsets, size = c_layout(struct.fields)
    assert [struct.dtype.fields[n][1] for _, n in struct.fields] == offsets
    assert struct.dtype.itemsize == size
    assert f"sizeof({struct.name}) == {size}" in struct.definition


def test_pack_checks_the_count_and_keeps_values():
    s = ScalarStruct("T", (("int", "a"), ("long long", "b"), ("float", "c")))
    packed = s.pack(-3, 2**40, 0.5)
    assert packed.shape == (1,) and s.dtype.itemsize == 24
    assert (int(packed[0]["a"]), int(packed[0]["b"]), float(packed[0]["c"])) == (-3, 2**40, 0.5)
    with pytest.raises(ValueError, match="T: 3 values expected, got 2"):
        s.pack(1, 2)
    assert np.asarray(packed).tobytes()[4:8] == b"\0\0\0\0"   # padding before the long long
