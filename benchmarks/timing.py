"""Shim: the harness's timing module lives in the package, as cupy_paged/_bench/timing.py.

``from benchmarks import timing`` gives that very module (not a copy), so the scripts beside this
one see, and may set, the same module state as the harness.
"""
import sys

from cupy_paged._bench import timing as _packaged

sys.modules[__name__] = _packaged
