"""Backend policy: which backends exist, what each supports, and how "auto" picks one.

"auto" on GPU arrays tries flash (sm80+) then mea; on NumPy arrays it is the reference.
A backend asked for by name runs or raises ``UnsupportedError`` with its reasons; "auto"
raises one error carrying every candidate's reasons. ``CUPY_PAGED_BACKEND`` overrides "auto".
"""
from __future__ import annotations

import os

from ..errors import UnsupportedError
from . import flash, mea, reference

BACKENDS = {
    "flash": flash.BACKEND,
    "mea": mea.BACKEND,
    "reference": reference.BACKEND,
}
AUTO_ORDER = {"cupy": ("flash", "mea"), "numpy": ("reference",)}
NAMES = ("auto",) + tuple(BACKENDS)


def check_backend_name(backend):
    """The requested backend name after the env override; ValueError for unknown names."""
    if backend == "auto":
        backend = os.environ.get("CUPY_PAGED_BACKEND", "auto") or "auto"
        source = "CUPY_PAGED_BACKEND"
    else:
        source = "backend"
    if backend not in NAMES:
        raise ValueError(f"{source}: expected one of {', '.join(map(repr, NAMES))}, "
                         f"got {backend!r}")
    return backend


_CHOSEN: dict = {}  # (requested, id(problem), kind, sm) -> (problem, Backend)
_CHOSEN_MAX = 1024


def choose_backend(requested, problem, kind, sm):
    """The Backend to run ``problem`` on; ``UnsupportedError`` listing why none can.

    requested: a name from ``NAMES``; kind: "numpy" or "cupy"; sm: compute capability as an
    int on the GPU (e.g. 90), None on the host. The choice is kept per Problem object
    (_validate hands the same object to every call of one signature).
    """
    key = (requested, id(problem), kind, sm)
    held = _CHOSEN.get(key)
    if held is not None and held[0] is problem:
        return held[1]
    chosen = _choose(requested, problem, kind, sm)
    if len(_CHOSEN) >= _CHOSEN_MAX:
        _CHOSEN.clear()
    _CHOSEN[key] = (problem, chosen)
    return chosen


def _choose(requested, problem, kind, sm):
    candidates = AUTO_ORDER[kind] if requested == "auto" else (requested,)
    reasons = []
    for name in candidates:
        why = BACKENDS[name].capabilities.reasons(problem, kind, sm)
        if not why:
            return BACKENDS[name]
        reasons.append(f"{name}: {'; '.join(why)}")
    where = f"sm{sm}" if sm is not None else "the host (NumPy arrays)"
    raise UnsupportedError(
        f"no backend can run this call (backend={requested!r}, {problem.dtype}, "
        f"head_size {problem.head_size}, block_size {problem.block_size}, on {where}):\n  "
        + "\n  ".join(reasons)
        + ("\n  (backend='reference' runs the NumPy reference on host copies)"
           if kind == "cupy" else ""))
