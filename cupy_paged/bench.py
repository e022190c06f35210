"""``main(argv)``: ``python -m cupy_paged bench``, the benchmark harness shipped in the package.

It hands argv to ``cupy_paged._bench.run`` (the same module ``python benchmarks/run.py`` runs in
a source checkout), so an installed wheel runs it too, with no benchmarks/ folder. Results go to
``--out``: benchmarks/results in a source checkout, ./bench-results in the current directory
otherwise. ``main(["--list"])`` needs neither torch nor a GPU.
"""
from __future__ import annotations

import sys

from ._bench import run


def main(argv=None):
    """Run the harness with argv (list of str; None means sys.argv[1:]); returns an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run.main(argv, prog="python -m cupy_paged bench")
