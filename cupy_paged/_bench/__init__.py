"""cupy_paged's benchmark harness, shipped in the wheel: ``python -m cupy_paged bench``.

cases.py (shapes, metadata, FLOPs and bytes; NumPy only), report.py (tables and JSON; pure
Python), timing.py and peers.py (torch + GPU; imported lazily), plot.py (matplotlib; imported
for --plot only), run.py (the command line). A source checkout's benchmarks/ modules of the
same names are these modules under their old names, for the scripts that sit beside them.
"""
