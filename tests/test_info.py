"""``python -m cupy_paged info`` and ``cupy_paged.info``: versions, paths, cache, backends.

The command runs here in subprocesses (with and without CuPy); the GPU-only branches (device
lines, per-SM refusals) are checked by feeding ``_backends``/``format_info`` a described GPU,
and their sentences are compared with the ``UnsupportedError`` the same call would raise.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cupy_paged import backends, info
from cupy_paged.errors import UnsupportedError
from cupy_paged.jit import find_toolchain
from cupy_paged._precompile import representative_problem

REPO = Path(__file__).resolve().parents[1]
NO_CUPY = ("import sys; sys.modules['cupy'] = sys.modules['cupy_backends'] = None; "
           "from cupy_paged.__main__ import main; sys.exit(main(['info']))")


def _run(cache_dir, *args, code=None):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUPY_PAGED_CACHE_DIR": str(cache_dir)}
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "cupy_paged", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, check=False, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _backend_lines(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backends ("))
    section = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):   # the next section ("optional inputs ...")
            break
        section.append(line)
    return section


def test_info_prints_versions_paths_cache_and_every_backend(tmp_path):
    (tmp_path / "prologue_f16-sm_80-0123456789abcdef.cubin").write_bytes(b"x" * 1000)
    (tmp_path / "prologue_f16-sm_80-0123456789abcdef.json").write_text("{}")
    out = _run(tmp_path, "info")
    tc = find_toolchain()
    for label, value in [("NVRTC", "{}.{}".format(*tc.nvrtc_version)),
                         ("CUDA headers", info._cuda_version(tc.headers.cuda_version)),
                         ("CCCL", str(tc.headers.cccl_include)),
                         ("CUTLASS", tc.cutlass_version), ("CUTLASS", str(tc.cutlass_include)),
                         ("cuda_src", str(tc.source_dir)), ("CuPy", "."), ("GPU", "")]:
        assert any(line.startswith(label) and value in line for line in out.splitlines()), \
            f"no {label} line with {value!r} in:\n{out}"
    cache_line = next(line for line in out.splitlines() if line.startswith("cache"))
    assert str(tmp_path) in cache_line and "1 kernels (sm_80: 1), 2 files" in cache_line
    names = [line.split()[0] for line in _backend_lines(out) if line[2] != " "]
    assert names == list(backends.BACKENDS)
    assert any(line.split()[:2] == ["reference", "available"] for line in _backend_lines(out))


def test_info_without_cupy_says_so_and_still_reports(tmp_path):
    out = _run(tmp_path, code=NO_CUPY)
    lines = out.splitlines()
    assert any(line.startswith("CuPy") and "not importable" in line for line in lines), out
    assert any(line.startswith("GPU") and "no GPU" in line for line in lines), out
    assert any(line.startswith("NVRTC") and "CuPy is not importable" in line for line in lines)
    backend_lines = dict(line.split(None, 1) for line in _backend_lines(out))
    assert backend_lines["reference"] == "available"
    assert "CuPy is not importable" in backend_lines["flash"]
    assert "CuPy is not importable" in backend_lines["mea"]


def test_info_json_is_collect(tmp_path):
    data = json.loads(_run(tmp_path, "info", "--json"))
    assert set(data) >= {"cupy_paged", "cupy", "gpu", "toolchain", "cache", "backends"}
    assert data["cache"]["dir"] == str(tmp_path) and data["cache"]["kernels"] == 0
    assert set(data["backends"]["by_backend"]) == set(backends.BACKENDS)


def test_collect_without_a_gpu_names_the_reason_for_each_gpu_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_PAGED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(info, "_gpu", lambda: {"error": "no GPU: test machine"})
    data = info.collect()
    for name in ("flash", "mea"):
        assert data["backends"]["by_backend"][name] == {
            "float16": ["no GPU: test machine"], "bfloat16": ["no GPU: test machine"]}
    assert data["backends"]["by_backend"]["reference"] == {"float16": [], "bfloat16": []}


def _gpu(sm):
    return {"devices": [{"index": 0, "name": "Test GPU", "sm": sm, "memory_gib": 15.9}],
            "current": 0, "driver": "12.8", "runtime": "12.9"}


@pytest.mark.parametrize("sm", [75, 90])
def test_reasons_on_a_gpu_are_the_unsupported_error_sentences(sm):
    states = info._backends(_gpu(sm), info._toolchain())["by_backend"]
    for dtype in info.PROBE_DTYPES:
        problem = representative_problem(dtype, 128, 32, 8, 16)
        for name in ("flash", "mea"):
            why = states[name][dtype]
            if not why:
                assert backends.choose_backend(name, problem, "cupy", sm).name == name
                continue
            with pytest.raises(UnsupportedError) as err:
                backends.choose_backend(name, problem, "cupy", sm)
            assert "; ".join(why) in str(err.value)
    if sm == 75:
        assert states["flash"]["float16"] == ["float16 needs sm80, this GPU is sm75"]
        assert states["mea"]["float16"] == [] and states["mea"]["bfloat16"]
    else:
        assert all(not why for name in ("flash", "mea") for why in states[name].values())


def test_machine_reasons_missing_cutlass_and_unbuildable_arch():
    tc = info._toolchain()
    no_cutlass = {**tc, "cutlass": {"error": "CUTLASS headers were not found: pip install x"}}
    states = info._backends(_gpu(90), no_cutlass)["by_backend"]
    assert states["mea"]["float16"] == ["CUTLASS headers were not found: pip install x"]
    assert states["flash"]["float16"] == []  # flash needs no CUTLASS
    old_nvrtc = {**tc, "nvrtc": {**tc["nvrtc"], "archs": [75, 80, 90]}}
    states = info._backends(_gpu(70), old_nvrtc)["by_backend"]
    assert any("cannot build sm_70" in s for s in states["mea"]["float16"])
    broken = info._backends(_gpu(90), {"error": "NVRTC could not be loaded"})["by_backend"]
    assert broken["flash"]["float16"] == [
        "its kernels cannot be compiled: NVRTC could not be loaded"]


def test_format_info_with_a_gpu_lists_devices_and_per_dtype_refusals(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_PAGED_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(info, "_gpu", lambda: _gpu(75))
    text = info.format_info(info.collect())
    assert "GPU 0" in text and "Test GPU, sm_75, 15.9 GiB" in text
    assert "12.8, runtime 12.9" in text and "on GPU 0 (sm_75)" in text
    lines = _backend_lines(text)
    at = lines.index("  mea        float16: available")
    assert lines[at + 1].split(None, 1) == ["bfloat16:", "bfloat16 needs sm80, this GPU is sm75"]


def test_versions_are_decoded():
    assert info._cuda_version(12090) == "12.9" and info._cuda_version(13000) == "13.0"
    assert info._cccl_version(2008002) == "2.8.2" and info._cccl_version(0) == "unknown"


# ---- what a machine without an NVIDIA driver is told --------------------------------------

class _CudaError(Exception):
    """A CUDARuntimeError as far as info reads it: the status code and CUDA's message."""

    def __init__(self, status, text):
        super().__init__(text)
        self.status = status


INSUFFICIENT = "cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA " \
               "runtime version"


@pytest.mark.parametrize("status, text, driver, visible, expected", [
    (35, INSUFFICIENT, 0, None, "no NVIDIA driver/GPU found"),
    (100, "cudaErrorNoDevice: no CUDA-capable device is detected", 12080, None,
     "no NVIDIA driver/GPU found"),
    (100, "cudaErrorNoDevice: no CUDA-capable device is detected", 12080, "",
     "no NVIDIA driver/GPU found (CUDA_VISIBLE_DEVICES='')"),
    (35, INSUFFICIENT, 11040, None, "no GPU: the NVIDIA driver supports CUDA 11.4, older than "
     "CuPy's CUDA runtime 12.9; upgrade the driver or install the CuPy of an older CUDA"),
    (999, "cudaErrorUnknown: unknown error", 12080, None,
     "no GPU: cudaErrorUnknown: unknown error"),
], ids=["no-driver", "no-device", "devices-hidden", "old-driver", "other"])
def test_gpu_errors_in_a_users_words(status, text, driver, visible, expected, monkeypatch):
    cupy = pytest.importorskip("cupy", reason="the CUDA runtime comes with CuPy")
    monkeypatch.setattr(cupy.cuda.runtime, "driverGetVersion", lambda: driver)
    monkeypatch.setattr(cupy.cuda.runtime, "runtimeGetVersion", lambda: 12090)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert info.gpu_unavailable(_CudaError(status, text)) == expected

    def count():
        raise _CudaError(status, text)

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", count)
    assert info._gpu() == {"error": f"{expected}; running the NumPy reference"}


def test_info_on_this_machine_without_a_driver(tmp_path):
    cupy = pytest.importorskip("cupy", reason="the CUDA runtime comes with CuPy")
    if cupy.cuda.runtime.driverGetVersion() != 0:
        pytest.skip("this machine has an NVIDIA driver")
    out = _run(tmp_path, "info")
    gpu = next(line for line in out.splitlines() if line.startswith("GPU"))
    assert gpu.split(None, 1)[1] == "no NVIDIA driver/GPU found; running the NumPy reference"
    assert "insufficient" not in out


def test_info_lists_which_backend_takes_each_optional_input(tmp_path):
    data = json.loads(_run(tmp_path, "info", "--json"))
    assert data["features"] == info.features()
    assert data["features"]["head_sink"] == ["flash", "reference"]   # mea refuses it by name
    assert data["features"]["latent"] == ["reference"]       # the latent (MLA) cache layout
    text = _run(tmp_path, "info")
    assert "optional inputs (backends that take them):" in text
    assert re.search(r"head_sink\s+flash, reference", text)
    assert re.search(r"latent\s+reference", text)
