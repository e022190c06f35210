"""Shim: the bar chart lives in the package, as cupy_paged/_bench/plot.py.

``python benchmarks/plot.py results.json out.png`` draws it; ``from benchmarks import plot``
gives that very module.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):      # run as a script: make the checkout's cupy_paged importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cupy_paged._bench import plot as _packaged  # noqa: E402

if __name__ == "__main__":
    sys.exit(_packaged.main())
sys.modules[__name__] = _packaged
