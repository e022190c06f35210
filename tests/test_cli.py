"""``python -m cupy_paged``: dispatch, the bench command's GPU-free listing, and precompile's
wording for an arch that is not this machine's."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "cupy_paged", *args], cwd=REPO,
                          capture_output=True, text=True)


def test_bench_list_prints_every_case_with_its_two_numbers():
    done = _run("bench", "--list")
    assert done.returncode == 0, done.stderr
    for case in ("prefill_8x2048", "decode_64x4096", "decode_4x32768", "mixed"):
        assert case in done.stdout
    assert "FLOPs" in done.stdout and "bytes" in done.stdout


def test_unknown_command_prints_usage_and_fails():
    done = _run("frobnicate")
    assert done.returncode == 2
    assert "bench" in done.stderr
    assert "unknown command 'frobnicate'" in done.stderr       # says so, then the usage


def test_bench_help_names_the_command_it_was_called_as():
    done = _run("bench", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: python -m cupy_paged bench")


def test_help_succeeds():
    done = _run("--help")
    assert done.returncode == 0 and "bench" in done.stdout


def test_precompile_for_an_absent_arch_never_speaks_of_this_gpu():
    done = _run("precompile", "--arch", "sm_75", "--head-size", "64", "--list")
    assert done.returncode == 0, done.stderr
    assert "skipped flash float16 for sm_75: float16 needs sm_80 or newer" in done.stdout
    assert "skipped mea bfloat16 for sm_75: bfloat16 needs sm_80 or newer" in done.stdout
    assert "this GPU" not in done.stdout + done.stderr

