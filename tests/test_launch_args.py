"""The kernels' scalar parameter structs (backends/_launch.ScalarStruct): the NumPy mirror
lays fields out as C does (natural alignment, tail padding), since NVRTC cannot check offsets
itself (it static_asserts the size only); packing is checked for count and values. CPU only."""
from __future__ import annotations

import dataclasses

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


def test_argument_block_points_at_each_value():
    """cuLaunchKernel's parameter array: entry i points at parameter i's bytes; pointer slots
    change with each fill, constants (scalars, structs) keep their bytes whatever is filled."""
    import ctypes

    from cupy_paged.backends._launch import POINTER, ArgumentBlock

    s = ScalarStruct("T", (("int", "a"), ("long long", "b"), ("float", "c")))
    packed = s.pack(-3, 2**40, 0.5)
    block = ArgumentBlock((POINTER, POINTER, packed, POINTER, np.int32(7), np.float32(2.5)))
    assert block.pointer_count == 3
    for pointers in ((1, 2**64 - 1, 0xDEADBEEF0), (0, 0, 0), (2**40 + 16, 2**63, 17)):
        block.fill(pointers)
        assert [int.from_bytes(block.read(i, 8), "little") for i in (0, 1, 3)] == list(pointers)
        assert block.read(2, s.dtype.itemsize) == packed.tobytes()
        assert block.read(4, 4) == np.int32(7).tobytes()
        assert block.read(5, 4) == np.float32(2.5).tobytes()
    addresses = (ctypes.c_void_p * 6).from_address(block.params)
    assert all(a % 8 == 0 for a in addresses)               # every value naturally aligned
    with pytest.raises(struct_error()):
        block.fill((1, 2))                                    # one pointer per slot


def struct_error():
    import struct
    return struct.error


class _Recorder:
    """Stands in for DirectLaunch: keeps the parameter list a launcher builds."""

    def __init__(self, kernel, args, grid, block, shared_mem=0, programmatic=False):
        self.args, self.grid, self.block = args, grid, block
        self.programmatic = programmatic


def _entry_parameters(code, name):
    """The parameter list of ``extern "C" ... name(...)`` in generated entry code, split."""
    start = code.index(f"{name}(") + len(name) + 1
    return [p.strip() for p in code[start:code.index(")", start)].split(",")]


def _problem():
    from cupy_paged import _validate

    return _validate.Problem(
        num_tokens=10, batch=3, num_heads=8, kv_num_heads=2, head_size=128, block_size=16,
        num_blocks=64, max_blocks=8, packed=False, dtype="float16", scale=0.125,
        softcap=0.0, window=-1, do_rotary=True, rotary_interleaved=False, rotary_dim=64,
        cos_rows=100, max_seqlen_q=None, max_seqlen_k=None, total_kv_tokens=None)


@pytest.mark.parametrize("module", ["flash", "prologue", "guard"])
def test_direct_launch_parameters_match_the_entry_point(module, monkeypatch):
    """Each launcher's argument block has the generated entry point's parameters in order:
    a POINTER slot for each pointer parameter, the packed scalar struct for the struct."""
    from cupy_paged.backends._launch import POINTER
    from cupy_paged.jit import get_spec

    problem = _problem()
    if module == "flash":
        monkeypatch.setattr(_flash_kernels, "DirectLaunch", _Recorder)
        monkeypatch.setattr(_flash_kernels, "_kernel", lambda *a: None)
        monkeypatch.setattr(_flash_kernels, "programmatic_supported", lambda device: True)
        plan = dataclasses.replace(_flash_kernels._plan(problem, 90, 132, 4), overlap=True)
        launch, combine = _flash_kernels._direct_launches(0, plan, True)
        # behind the prologue, on a GPU that can: both start programmatically
        assert launch.programmatic and combine.programmatic
        alone, _ = _flash_kernels._direct_launches(0, plan, False)
        assert not alone.programmatic   # called without the prologue before it: launch order
        _flash_kernels._launchers.clear()
        name = plan.fwd
        spec = _flash_kernels._register_fwd("float16", _flash_kernels.problem_tile(problem, 90))
        struct = _flash_kernels.FWD_SCALARS
        combine_params = _entry_parameters(get_spec(plan.combine).entry_code, plan.combine)
        assert [a is POINTER for a in combine.args] == ["*" in p for p in combine_params]
    elif module == "prologue":
        monkeypatch.setattr(_prologue, "DirectLaunch", _Recorder)
        monkeypatch.setattr(_prologue, "get_function", lambda *a, **k: None)
        monkeypatch.setattr(_prologue, "grid_size", lambda items, device: 1)
        monkeypatch.setattr(_prologue, "programmatic_supported", lambda device: True)
        launch = _prologue._launcher(problem, 0, True)
        assert launch.programmatic                                  # behind the guard
        assert not _prologue._launcher(problem, 0, False).programmatic  # no guard before it
        _prologue._launchers.clear()
        name = spec = _prologue.prologue_name("float16")
        struct = _prologue.SCALARS
    else:
        monkeypatch.setattr(_guard, "DirectLaunch", _Recorder)
        monkeypatch.setattr(_guard, "_device", lambda device: (None, None))
        launch, _ = _guard._launcher(problem, 0)
        _guard._LAUNCHERS.clear()
        name = spec = _guard.NAME
        struct = _guard.SCALARS
    params = _entry_parameters(get_spec(spec).entry_code, name)
    assert len(launch.args) == len(params)
    for arg, param in zip(launch.args, params):
        if "*" in param:
            assert arg is POINTER, param
        else:
            assert param.split()[-2] == struct.name and arg.dtype == struct.dtype, param


def test_direct_launch_calls_the_driver_with_its_block(monkeypatch):
    """DirectLaunch hands cuLaunchKernel the function, 3-D grid and block, shared memory, the
    current stream (or the one given) and the block's parameter array, refilled per call."""
    import types

    from cupy_paged.backends import _launch

    calls = []

    def launch_kernel(*args):
        function, gx, gy, gz, bx, by, bz, smem, stream, params, extra = args
        pointers = [int.from_bytes(ctypes_read(params, i), "little") for i in range(2)]
        calls.append((function, (gx, gy, gz), (bx, by, bz), smem, stream, pointers, extra))

    def ctypes_read(params, index):
        import ctypes
        address = (ctypes.c_void_p * 3).from_address(params)[index]
        return ctypes.string_at(address, 8)

    fake = types.SimpleNamespace(
        driver=types.SimpleNamespace(launchKernel=launch_kernel),
        get_current_stream=lambda: types.SimpleNamespace(ptr=777))
    monkeypatch.setattr(_launch, "_cuda", _launch._cuda)  # restored after the test
    monkeypatch.setitem(__import__("sys").modules, "cupy", types.SimpleNamespace(cuda=fake))
    monkeypatch.setitem(__import__("sys").modules, "cupy.cuda", fake)
    kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=4242))
    launch = _launch.DirectLaunch(kernel, (_launch.POINTER, _launch.POINTER, np.int32(5)),
                                  (7,), (128,), shared_mem=1024)
    launch(0x1000, 0x2000)
    launch(0x3000, 0, stream=99)
    assert calls == [(4242, (7, 1, 1), (128, 1, 1), 1024, 777, [0x1000, 0x2000], 0),
                     (4242, (7, 1, 1), (128, 1, 1), 1024, 99, [0x3000, 0], 0)]


def test_launch_config_mirrors_cuda_h():
    """cuLaunchKernelEx's structs as cuda.h lays them out on 64-bit hosts: CUlaunchAttribute
    (id, pad to 8, a 64-byte value union) and CUlaunchConfig (7 uints, stream, attrs, count)."""
    import ctypes

    from cupy_paged.backends._launch import _LaunchAttribute, _LaunchConfig

    assert ctypes.sizeof(_LaunchAttribute) == 72
    assert _LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(_LaunchConfig) == 56
    assert (_LaunchConfig.shared_mem.offset, _LaunchConfig.stream.offset,
            _LaunchConfig.attrs.offset, _LaunchConfig.num_attrs.offset) == (24, 32, 40, 48)


def test_programmatic_launch_can_be_turned_off(monkeypatch):
    from cupy_paged.backends import _launch

    monkeypatch.setenv("CUPY_PAGED_PDL", "0")
    assert not _launch.programmatic_supported(0)
