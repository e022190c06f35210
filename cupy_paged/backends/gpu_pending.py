"""The GPU backends' declared envelopes, before their kernels are built into this version.

"flash" (our sm80+ kernel) and "mea" (CUTLASS memory-efficient attention, sm50+) declare what
they will support; until their launch code lands they refuse every call with a sentence, and
nothing falls back to them or from them silently.
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

MEA = Backend(
    name="mea",
    capabilities=Capabilities(
        array_kinds=frozenset({"cupy"}), dtype_min_sm={"float16": 50, "bfloat16": 80},
        max_head_size=256,
        unavailable="not built into this version yet (the CUTLASS memory-efficient kernel is "
                    "pending)"),
    run=_refuse)
