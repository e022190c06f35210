"""The examples stay runnable: decode_loop.py and quickstart.py on NumPy, the cache-layout
notebook executed headless, and PagedKVCache's HTML view.

CPU only. The notebook dependencies (nbclient, nbformat, ipykernel, matplotlib) come from the
``notebook`` extra: CI installs it and runs the notebook; without it that one test skips, saying
which package is missing.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from cupy_paged.cache import PagedKVCache

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _env():
    """The child's environment: this checkout importable, no GPU visible, no display."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""    # the NumPy path even on a machine with a GPU
    env["MPLBACKEND"] = "Agg"
    return env


def _run_example(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)


def test_decode_loop_runs_on_numpy_and_every_step_matches_dense():
    done = _run_example(str(EXAMPLES / "decode_loop.py"), "--numpy", "--steps", "48",
                        "--seed", "0")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "running on numpy with float32" in out
    check = re.search(r"check: all (\d+) steps match the dense float64 recomputation "
                      r"\(max \|paged - dense\| = (\S+), max \|cache - history\| = (\S+),", out)
    assert check, out[-2000:]
    assert int(check.group(1)) > 10
    assert float(check.group(2)) <= 1e-4 and float(check.group(3)) <= 1e-4
    # the run exercised what it claims: chunked prefill, mixed batches, frees and reuse
    assert re.search(r"\(\d+ decode, [1-9]\d* prefill chunks?\)", out)
    assert re.search(r"\([1-9]\d* decode, [1-9]\d* prefill chunks?\)", out), "no mixed step"
    assert "finished [" in out
    reuse = re.search(r"(\d+) requests finished, .* (\d+) block allocations reused them", out)
    assert reuse and int(reuse.group(1)) > 0 and int(reuse.group(2)) > 0, out[-1000:]
    assert re.search(r"queued [1-9]", out), "no request ever waited for blocks"
    assert "tokens/s" in out


def test_decode_loop_falls_back_to_numpy_without_a_gpu_and_honours_flags():
    done = _run_example(str(EXAMPLES / "decode_loop.py"), "--steps", "6", "--seed", "3")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "running on numpy" in done.stdout
    assert "check: all 6 steps match" in done.stdout


def test_quickstart_runs_on_numpy():
    done = _run_example(str(EXAMPLES / "quickstart.py"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "running on numpy" in done.stdout
    assert "no NVIDIA driver/GPU found" in done.stdout
    assert "running the NumPy reference" in done.stdout
    assert "insufficient" not in done.stdout     # CUDA's words for "no driver" read like "too old"
    assert done.stdout.count("max |paged - dense|") == 2


def test_cache_layouts_notebook_executes_headless(monkeypatch):
    for name, value in _env().items():
        monkeypatch.setenv(name, value)         # the kernel inherits this process's env
    # Imported here, not at module level, so `pytest -m gpu` collects on a GPU machine without
    # the notebook extra; CI installs the extra and runs this test.
    modules = {}
    for name in ("matplotlib", "ipykernel", "nbclient", "nbformat"):   # the notebook extra
        modules[name] = pytest.importorskip(
            name, reason=f'no {name} (the notebook extra): pip install ".[notebook]"')
    nbclient, nbformat = modules["nbclient"], modules["nbformat"]

    nb = nbformat.read(EXAMPLES / "cache_layouts.ipynb", as_version=4)
    nbformat.validate(nb)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()                            # raises CellExecutionError on any error
    errors = [o for cell in nb.cells for o in cell.get("outputs", [])
              if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "match the dense K/V" in text
    html = [o["data"]["text/html"] for cell in nb.cells for o in cell.get("outputs", [])
            if "text/html" in o.get("data", {})]
    assert html and "PagedKVCache" in html[0]


def test_repr_html_shows_every_sequence_owner_and_free_count():
    cache = PagedKVCache(20, 4, 2, 8, dtype=numpy.float32, allocation="random", seed=0)
    a, b, c = (cache.add_sequence() for _ in range(3))
    cache.begin_step({a: 9, b: 4, c: 1})
    child = cache.fork(a)                       # shares a's two full blocks
    cache.free(b)
    html = cache._repr_html_()
    for sid in cache.sequences:
        assert f"sequence {sid}</td><td>{cache.length(sid)} tokens" in html
    assert f"sequence {b}<" not in html        # freed sequences are gone
    assert f"{cache.num_free_blocks} free" in html
    assert "2 shared" in html
    # one square per physical block, each titled with its id and owner or "free"
    cells = re.findall(r'title="block (\d+): ([^"]*)"', html)
    assert [int(i) for i, _ in cells] == list(range(cache.num_blocks))
    assert sum(t == "free" for _, t in cells) == cache.num_free_blocks
    for blk in cache.blocks_of(c):
        assert (str(blk), f"sequence {c}, 1/4 tokens") in cells
    for blk in cache.blocks_of(child)[:2]:
        assert (str(blk), f"sequence {a}, sequence {child}, 4/4 tokens (shared)") in cells


def test_repr_html_of_an_empty_and_of_a_huge_cache():
    empty = PagedKVCache(3, 16, 1, 8)
    assert "0 sequences" in empty._repr_html_() and "3 free" in empty._repr_html_()
    huge = PagedKVCache(5000, 1, 1, 8)
    many = [huge.add_sequence() for _ in range(70)]
    huge.begin_step({s: 1 for s in many})
    html = huge._repr_html_()
    assert "first 4096 of 5000 blocks shown" in html and "4930 free" in html
    assert "... and 6 more sequences" in html
    assert len(html) < 1_000_000
