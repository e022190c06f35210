"""The benchmark harness ships in the package (cupy_paged._bench, in the wheel); benchmarks/
of the checkout keeps the old module names as aliases. Run without a GPU; the shim tests that
need torch skip without it.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cupy_paged._bench import cases as C  # noqa: E402
from cupy_paged._bench import run as bench_run  # noqa: E402

REPO_RESULTS = ROOT / "benchmarks" / "results"


# --- the harness ships in the package; benchmarks/ keeps the old names --------------------
def _python(args, cwd, pythonpath):
    """This interpreter on args in cwd with PYTHONPATH=pythonpath; the CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=str(pythonpath), COLUMNS="200")   # --help unwrapped
    return subprocess.run([sys.executable, *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=120)


def _assert_lists_every_case(res):
    assert res.returncode == 0, res.stderr
    for name in C.CASES:
        assert name in res.stdout
    assert C.FLOPS_FORMULA in res.stdout and "prefill_8x2048/bs256" in res.stdout


def test_bench_list_runs_outside_the_checkout(tmp_path):
    """`python -m cupy_paged bench --list` from a folder with no benchmarks/ in it."""
    res = _python(["-m", "cupy_paged", "bench", "--list"], tmp_path, ROOT)
    _assert_lists_every_case(res)
    assert list(tmp_path.iterdir()) == []                  # --list writes nothing


# Imports the harness and lists with `benchmarks` unimportable and torch never imported.
WITHOUT_BENCHMARKS = """
import sys
sys.modules["benchmarks"] = None          # any `import benchmarks...` now raises ImportError
import cupy_paged
from cupy_paged._bench import run
from cupy_paged.__main__ import main
print(cupy_paged.__file__)
print("default out:", run.DEFAULT_OUT)
rc = main(["bench", "--list"])
assert "torch" not in sys.modules, "torch imported"
sys.exit(rc)
"""


def test_an_installed_package_runs_the_harness_without_benchmarks(tmp_path):
    """The package alone, as a wheel lays it out: lists, and writes to ./bench-results."""
    site, work = tmp_path / "site", tmp_path / "work"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "cupy_paged", site / "cupy_paged", ignore=skip)
    shutil.copytree(ROOT / "cuda_src", site / "cupy_paged" / "cuda_src", ignore=skip)  # as the
    # wheel's force-include puts it: importing cupy_paged reads the arch table from it
    work.mkdir()
    res = _python(["-c", WITHOUT_BENCHMARKS], work, site)
    _assert_lists_every_case(res)
    first = res.stdout.splitlines()[0]
    assert Path(first).resolve().is_relative_to(site.resolve()), first   # the copy ran
    assert "default out: bench-results" in res.stdout
    helped = _python(["-m", "cupy_paged", "bench", "--help"], work, site)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: python -m cupy_paged bench")
    assert "(default bench-results:" in helped.stdout
    assert list(work.iterdir()) == []


def test_out_defaults_to_the_checkout_results_or_bench_results(tmp_path):
    if Path(bench_run.__file__).resolve().parents[2] == ROOT:       # imported from here
        assert bench_run.DEFAULT_OUT == str(REPO_RESULTS)
        assert bench_run.parse_args([]).out == str(REPO_RESULTS)
    assert bench_run.default_out(ROOT) == str(REPO_RESULTS)
    assert bench_run.default_out(tmp_path) == bench_run.INSTALLED_OUT == "bench-results"
    (tmp_path / "benchmarks").mkdir()                 # a stray benchmarks/run.py beside an
    (tmp_path / "benchmarks" / "run.py").write_text("")   # installed package: still installed
    assert bench_run.default_out(tmp_path) == "bench-results"
    assert bench_run.parse_args(["--out", "x"]).out == "x"


def test_benchmarks_run_py_still_runs_as_a_script(tmp_path):
    res = _python(["benchmarks/run.py", "--list"], ROOT, "")
    _assert_lists_every_case(res)
    res = _python([str(ROOT / "benchmarks" / "run.py"), "--list", "--case", "mixed"],
                  tmp_path, "")
    assert res.returncode == 0, res.stderr
    assert "mixed/bs16" in res.stdout and "prefill" not in res.stdout
    helped = _python([str(ROOT / "benchmarks" / "run.py"), "--help"], tmp_path, "")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: benchmarks/run.py")


def test_the_shims_are_the_packaged_modules():
    import importlib

    import cupy_paged._bench as packaged
    for name in ("cases", "report", "run", "plot"):
        shim = importlib.import_module(f"benchmarks.{name}")
        assert shim is getattr(packaged, name) is sys.modules[f"cupy_paged._bench.{name}"]
    from benchmarks import cases, run
    assert cases.CASES is C.CASES and cases.make_case is C.make_case
    assert run.main is bench_run.main and run._impl_specs is bench_run._impl_specs


def test_the_gpu_shims_alias_without_importing_torch():
    """benchmarks.peers / .timing are whatever cupy_paged._bench.peers / .timing are."""
    code = """
import sys, types
for name in ("peers", "timing"):   # stand-ins: the real ones import torch
    sys.modules["cupy_paged._bench." + name] = types.ModuleType("cupy_paged._bench." + name)
from benchmarks import peers, timing
import benchmarks.peers
assert peers is benchmarks.peers is sys.modules["cupy_paged._bench.peers"]
assert timing is sys.modules["cupy_paged._bench.timing"]
assert "torch" not in sys.modules
"""
    res = _python(["-c", code], ROOT, ROOT)
    assert res.returncode == 0, res.stderr


def test_the_gpu_shims_share_module_state():
    pytest.importorskip("torch", reason="peers and timing import torch")
    from benchmarks import peers, timing

    from cupy_paged._bench import peers as packaged_peers
    from cupy_paged._bench import timing as packaged_timing
    assert peers is packaged_peers and timing is packaged_timing
    assert timing.QUICK is packaged_timing.QUICK
    assert peers._FLEX is packaged_peers._FLEX     # one compile cache, one DEVICE setting
