"""Shim: the harness's command line lives in the package, as cupy_paged/_bench/run.py.

``python benchmarks/run.py [options]`` runs it (``--help`` lists the options; ``--out``
defaults to benchmarks/results here), and ``from benchmarks import run`` gives that very
module, the same one ``python -m cupy_paged bench`` runs.
"""
import sys
from pathlib import Path

if __package__ in (None, ""):      # run as a script: make the checkout's cupy_paged importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cupy_paged._bench import run as _packaged  # noqa: E402

if __name__ == "__main__":
    sys.exit(_packaged.main())
sys.modules[__name__] = _packaged
