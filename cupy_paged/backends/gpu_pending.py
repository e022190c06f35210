"""The flash backend's declared envelope, before its kernel is wired into this version.

"flash" (our sm80+ kernel reading the cache in place) declares what it will support; until its
launch code lands it refuses every call with a sentence, and nothing falls back silently.
"""
from __future__ import annotations

from .base import Backend, Capabilities


def _refuse(problem, adopted):
    raise AssertionError("unreachable: an unavailable backend is never chosen")


FLASH = Backend(
    name="flash",
    capabilities=Capabilities(
        array_kinds=frozenset({"cupy"}), dtype_min_sm={"float16": 80, "bfloat16": 80},
        max_head_size=256,
        unavailable="not built into this version yet (the sm80+ flash kernel is pending)"),
    run=_refuse)
