"""Shim: the harness's report module lives in the package, as cupy_paged/_bench/report.py.

``from benchmarks import report`` gives that very module (not a copy), so the scripts beside this
one see, and may set, the same module state as the harness.
"""
import sys

from cupy_paged._bench import report as _packaged

sys.modules[__name__] = _packaged
