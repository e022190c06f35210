"""The kernels' parameter structs (backends/_params.py): each is parsed from its
cuda_src/<kernel>/params.cuh definition into a NumPy mirror laid out as C does (natural
alignment, tail padding), since NVRTC cannot check offsets itself (the generated entry
static_asserts the size); packing is checked for names and values; the argument block and the
plan's launches carry the struct. CPU only."""
from __future__ import annotations

import numpy as np
import pytest

from cupy_paged.backends import _flash_kernels, _gather, _guard, _mea_kernels, _prologue
from cupy_paged.backends._params import ParamsStruct

_SIZES = {"int": 4, "unsigned": 4, "float": 4, "long long": 8}
STRUCTS = {"flash": _flash_kernels.FWD_PARAMS, "combine": _flash_kernels.COMBINE_PARAMS,
           "prologue": _prologue.PARAMS, "guard": _guard.PARAMS, "gather": _gather.PARAMS,
           "mea": _mea_kernels.FMHA_PARAMS}


def c_layout(fields):
    """(offsets, size) of a C struct of these fields: each at a multiple of its size."""
    offset, offsets, align = 0, [], 1
    for ctype, _ in fields:
        size = 8 if ctype.endswith("*") else _SIZES[ctype]
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
    assert f"sizeof({struct.cname}) == {size}" in struct.size_check
    assert struct.pointers == tuple(n for c, n in struct.fields if c.endswith("*"))
    assert struct.fields[:len(struct.pointers)] == tuple(
        (c, n) for c, n in struct.fields if c.endswith("*"))   # pointers lead


def test_pack_checks_the_names_and_keeps_values():
    s = ParamsStruct("T", (("void*", "x"), ("int", "a"), ("long long", "b"), ("float", "c")))
    packed = s.pack(a=-3, b=2**40, c=0.5)
    assert packed.shape == (1,) and s.dtype.itemsize == 32
    assert (int(packed[0]["a"]), int(packed[0]["b"]), float(packed[0]["c"])) == (-3, 2**40, 0.5)
    with pytest.raises(ValueError, match=r"T: missing \['c'\], unknown \['d'\]"):
        s.pack(a=1, b=2, d=3)
    assert np.asarray(packed).tobytes()[12:16] == b"\0\0\0\0"   # padding before the long long
    with pytest.raises(ValueError, match="pointer fields must come first"):
        ParamsStruct("U", (("int", "a"), ("void*", "x")))


def test_argument_block_points_at_the_struct():
    """cuLaunchKernel's parameter array: one entry per pointer field, 8 bytes apart, and one
    for the scalars after them, all into the struct's bytes; the pointer fields change with
    each fill, the scalars keep their bytes whatever is filled."""
    import ctypes

    from cupy_paged.backends._launch import ArgumentBlock

    s = ParamsStruct("T", (("void*", "x"), ("int*", "y"), ("float*", "z"), ("int", "a"),
                           ("long long", "b"), ("float", "c")))
    packed = s.pack(a=-3, b=2**40, c=0.5)
    block = ArgumentBlock(packed, len(s.pointers))
    assert block.pointer_count == 3
    for pointers in ((1, 2**64 - 1, 0xDEADBEEF0), (0, 0, 0), (2**40 + 16, 2**63, 17)):
        block.fill(pointers)
        raw = block.read(s.dtype.itemsize)
        assert [int.from_bytes(raw[8 * i:8 * i + 8], "little") for i in range(3)] == \
            list(pointers)
        assert raw[24:] == packed.tobytes()[24:]
    addresses = (ctypes.c_void_p * 4).from_address(block.params)
    assert addresses[0] % 16 == 0                             # the struct is 16-byte aligned
    assert [a - addresses[0] for a in addresses] == [0, 8, 16, 24]  # pointers, then scalars
    with pytest.raises(struct_error()):
        block.fill((1, 2))                                    # one pointer per field


def struct_error():
    import struct
    return struct.error


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


@pytest.mark.parametrize("module", ["flash", "combine", "prologue", "guard", "gather", "mea"])
def test_every_entry_point_takes_its_params_struct(module):
    """Each generated entry takes its params struct's pointer fields one by one, then the
    scalars as one struct by value, after both size checks, and assembles the struct the
    kernel reads: the one way entries are generated."""
    from cupy_paged.jit import get_spec

    problem = _problem()
    name = {"flash": lambda: _flash_kernels.variant_name(problem, 90),
            "combine": lambda: _flash_kernels._register_combine("float16"),
            "prologue": lambda: _prologue.prologue_name("float16"),
            "guard": lambda: _guard.NAME,
            "gather": lambda: _gather.gather_name("float16"),
            "mea": lambda: _mea_kernels.variant_name("float16", 80, 128)}[module]()
    struct = STRUCTS[module]
    code = get_spec(name).entry_code
    pointers = [n for n in struct.pointers]
    got = _entry_parameters(code, name)
    assert [p.split()[-1] for p in got] == pointers + ["s"]
    assert got[-1] == f"const {struct.scalars_cname} s"
    assert struct.size_check in code and struct.scalars_definition in code
    assert f"const {struct.cname} p{{" in code


def test_the_plan_decides_programmatic_launches_once(monkeypatch):
    """A flash plan made with programmatic launches on a GPU that can: the prologue, the
    forward kernel and the combine start programmatically, the guard (first) never; without,
    none does. Decided by the plan option, reported in its launches and details."""
    import types

    from cupy_paged.backends import _launch, flash
    from cupy_paged.backends.plan import PlanOptions

    fake_kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=1),
                                        max_dynamic_shared_size_bytes=0)
    monkeypatch.setattr(_launch, "_cuda", None)
    for module in (_flash_kernels, _prologue):
        monkeypatch.setattr(module, "get_function", lambda *a, **k: fake_kernel)
    monkeypatch.setattr(_guard, "_device", lambda device: (fake_kernel, None))
    monkeypatch.setattr(_prologue, "grid_size", lambda items, device: 1)
    monkeypatch.setattr(_flash_kernels, "sm_count", lambda device: 132)
    monkeypatch.setattr(flash, "programmatic_supported", lambda device: True)
    monkeypatch.setitem(__import__("sys").modules, "cupy.cuda", types.SimpleNamespace())
    monkeypatch.setattr("cupy_paged.backends._launch.DirectLaunch.__init__",
                        _recording_init, raising=True)
    problem = _problem()
    on = flash.make_plan(problem, 0, 90, PlanOptions(programmatic=True, num_splits=4), "test")
    assert [launch.programmatic for launch in on.launches] == [False, True, True, True]
    assert [step.launch.programmatic for step in on.steps[:2]] == [False, True]
    assert on.steps[2].forward.programmatic and on.steps[2].combine.programmatic
    assert on.details["programmatic"] and on.details["num_splits"] == 4
    off = flash.make_plan(problem, 0, 90, PlanOptions(programmatic=False, num_splits=4), "t")
    assert not any(launch.programmatic for launch in off.launches)


def _recording_init(self, kernel, params, packed, grid, block, shared_mem=0,
                    programmatic=False):
    self._ex = programmatic or None     # what DirectLaunch.programmatic reports


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
        address = (ctypes.c_void_p * 1).from_address(params)[0]
        return ctypes.string_at(address + 8 * index, 8)

    fake = types.SimpleNamespace(
        driver=types.SimpleNamespace(launchKernel=launch_kernel),
        get_current_stream=lambda: types.SimpleNamespace(ptr=777))
    monkeypatch.setattr(_launch, "_cuda", _launch._cuda)  # restored after the test
    monkeypatch.setitem(__import__("sys").modules, "cupy", types.SimpleNamespace(cuda=fake))
    monkeypatch.setitem(__import__("sys").modules, "cupy.cuda", fake)
    kernel = types.SimpleNamespace(kernel=types.SimpleNamespace(ptr=4242))
    params = ParamsStruct("T", (("void*", "x"), ("void*", "y"), ("int", "n")))
    launch = _launch.DirectLaunch(kernel, params, params.pack(n=5), (7,), (128,),
                                  shared_mem=1024)
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
