"""cupy_paged's benchmark harness (source tree only; not shipped in the wheel).

cases.py (shapes, metadata, FLOPs and bytes; NumPy only), report.py (tables and JSON; pure
Python), timing.py and peers.py (torch + GPU; imported lazily), run.py (the command line).
"""
