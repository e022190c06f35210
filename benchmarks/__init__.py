"""cupy_paged's benchmark scripts (source tree). The harness itself ships in the package as
``cupy_paged._bench`` (``python -m cupy_paged bench``); cases.py, peers.py, timing.py,
report.py, plot.py and run.py here are the same modules under their old names, for the
diagnostic scripts beside them (kernel_times.py, profile_case.py, tile_sweep.py, ...) and
``python benchmarks/run.py``. Measurements and their history: NOTES.md.
"""
