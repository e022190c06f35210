"""``main(argv)``: run the benchmark harness of a source checkout (benchmarks/run.py).

Thin entry for a future ``python -m cupy_paged bench``: it finds the ``benchmarks`` folder
beside this package (it ships in the source tree and sdist, not in the wheel) or in the current
directory, and hands it argv. ``main(["--list"])`` needs neither torch nor a GPU.
"""
from __future__ import annotations

import sys
from pathlib import Path


def _harness_root():
    """The folder holding ``benchmarks/run.py``, or None."""
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (root / "benchmarks" / "run.py").is_file():
            return root
    return None


def main(argv=None):
    """Run the harness with argv (list of str; None means sys.argv[1:]); returns an exit code."""
    root = _harness_root()
    if root is None:
        print("cupy_paged bench: the benchmarks/ folder is not here; it ships with the source "
              "tree (git checkout or sdist), not with the wheel. Run from a checkout.",
              file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import run
    argv = list(sys.argv[1:] if argv is None else argv)
    return run.main(argv, prog="python -m cupy_paged bench")
