"""Backend policy: which backends exist, what each supports, and how "auto" picks one.

"auto" on GPU arrays tries flash (sm80+) then mea; on NumPy arrays it is the reference.
A backend asked for by name runs or raises ``UnsupportedError`` with its reasons; "auto"
raises one error carrying every candidate's reasons. ``CUPY_PAGED_BACKEND`` overrides "auto".
``plan_for`` makes (once) and returns the ``Plan`` of a call.
"""
from __future__ import annotations

import os

from ..errors import UnsupportedError
from . import flash, mea, reference
from .plan import DEFAULT_OPTIONS

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


# The one cache of plans: (requested, id(problem), kind, device, options) -> (problem, Plan).
# _validate hands the same Problem object to every call of one signature, so a decode loop
# finds its plan by identity; the entry holds the object, so its id is never reused while
# cached.
_PLANS: dict = {}
_PLANS_MAX = 1024


def plan_for(requested, problem, kind, device, sm, options=DEFAULT_OPTIONS):
    """The cached ``Plan`` of ``problem``: made once per (requested backend, problem, array
    kind, device, options); ``UnsupportedError`` listing why no backend can run it.

    requested: a name from ``NAMES``; kind: "numpy" or "cupy"; device: GPU id (None on the
    host); sm: its compute capability as an int (e.g. 90), None on the host.
    """
    key = (requested, id(problem), kind, device,
           None if options is DEFAULT_OPTIONS else options)  # the default: no hashing
    held = _PLANS.get(key)
    if held is not None and held[0] is problem:
        return held[1]
    backend, reason = _choose(requested, problem, kind, sm)
    plan = backend.make_plan(problem, device, sm, options, reason)
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = (problem, plan)
    return plan


def choose_backend(requested, problem, kind, sm):
    """The Backend "auto" (or the name) picks for ``problem``; ``UnsupportedError`` listing
    why none can. kind: "numpy" or "cupy"; sm: compute capability (None on the host)."""
    return _choose(requested, problem, kind, sm)[0]


def _choose(requested, problem, kind, sm):
    """(Backend, why it runs this call)."""
    candidates = AUTO_ORDER[kind] if requested == "auto" else (requested,)
    reasons = []
    for name in candidates:
        why = BACKENDS[name].capabilities.reasons(problem, kind, sm)
        if not why:
            if requested != "auto":
                return BACKENDS[name], f"{name}: asked for by name"
            skipped = "".join(f"; {r}" for r in reasons)
            return BACKENDS[name], (f"{name}: the first of {', '.join(candidates)} that "
                                    f"runs this call{skipped}")
        reasons.append(f"{name}: {'; '.join(why)}")
    where = f"sm{sm}" if sm is not None else "the host (NumPy arrays)"
    raise UnsupportedError(
        f"no backend can run this call (backend={requested!r}, {problem.dtype}, "
        f"head_size {problem.head_size}, block_size {problem.block_size}, on {where}):\n  "
        + "\n  ".join(reasons)
        + ("\n  (backend='reference' runs the NumPy reference on host copies)"
           if kind == "cupy" else ""))
