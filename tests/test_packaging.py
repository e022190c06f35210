"""The wheel carries cuda_src/, and a non-editable install into a fresh venv finds and compiles it."""
import os
import subprocess
import sys
import sysconfig
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    import hatchling  # noqa: F401  (the test extra installs it; --no-build-isolation needs it)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(REPO)],
        check=True)
    (path,) = out.glob("cupy_paged-*.whl")
    return path


def test_wheel_contains_every_kernel_source(wheel):
    sources = {p.relative_to(REPO / "cuda_src").as_posix()
               for p in (REPO / "cuda_src").rglob("*") if p.is_file()}
    assert sources, "cuda_src/ is empty"
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n[len("cupy_paged/cuda_src/"):] for n in zf.namelist()
                   if n.startswith("cupy_paged/cuda_src/")}
    assert sources <= shipped, f"missing from the wheel: {sorted(sources - shipped)}"


def test_installed_wheel_in_fresh_venv_compiles_from_its_own_sources(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True)
    # Dependencies (numpy, cupy, the nvidia-* headers) come from this test run's environment;
    # cupy_paged itself must come from the fresh venv, not from the repository.
    deps = os.pathsep.join({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    script = textwrap.dedent("""
        import sys, pathlib, cupy_paged
        from cupy_paged.jit import compile_variant
        from cupy_paged.jit.toolchain import source_dir
        print(cupy_paged.__file__)
        print(source_dir())
        result = compile_variant("smoke_axpy_f32", arch="sm_80")
        print(pathlib.Path(result.path).read_bytes()[:4] == b"\\x7fELF")
    """)
    # CuPy finds pip's libnvrtc through site.getsitepackages(), which PYTHONPATH does not
    # extend: point the loader at those libraries directly.
    libs = os.pathsep.join(str(p) for p in Path(sysconfig.get_paths()["platlib"]).glob(
        "nvidia/*/lib") if any(p.glob("libnvrtc.so*")))
    env = dict(os.environ, PYTHONPATH=deps, CUPY_PAGED_CACHE_DIR=str(tmp_path / "cache"),
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [libs, os.environ.get(
                   "LD_LIBRARY_PATH", "")])))
    env.pop("CUPY_PAGED_SOURCE_DIR", None)
    done = subprocess.run([python, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    module_file, sources, elf = done.stdout.split()
    assert Path(module_file).is_relative_to(env_dir), module_file
    assert Path(sources).is_relative_to(env_dir), sources
    assert elf == "True"
