"""The "flash" backend: metadata guard, prologue kernel, then our sm80+ attention kernel reading
the paged cache in place (``cuda_src/flash/``), with split-KV for long contexts and few work
units.

No device->host synchronisation: grids, split counts and workspaces come from host-known
shapes, so a call can be captured in a CUDA graph.
"""
from __future__ import annotations

from .._buffers import buffer_sizes
from . import _flash_policy, _guard, _prologue
from ._flash_kernels import ForwardStep
from ._launch import programmatic_supported
from .base import Backend, gpu_capabilities
from .plan import Plan

OPTIONS = ("tile", "num_splits", "programmatic", "kernel")


def make_plan(problem, device, sm, options, reason):
    """The flash ``Plan`` of ``problem`` on GPU ``device`` (compute capability ``sm``): guard,
    prologue, forward kernel (and combine). Programmatic launches are decided here, once:
    ``options.programmatic``, else when the call's estimated GPU time reaches the threshold
    (``_flash_policy.overlap_launches``); only on sm90+ with a driver that has them."""
    options.check("flash", OPTIONS)
    wanted = (_flash_policy.overlap_launches(problem) if options.programmatic is None
              else options.programmatic)
    pdl = bool(wanted) and programmatic_supported(device)
    guard = _guard.GuardStep(problem, device)
    prologue = _prologue.PrologueStep(problem, device, programmatic=pdl)
    forward = ForwardStep(problem, device, sm, options.tile, options.num_splits,
                          programmatic=pdl, kernel=options.kernel)
    return Plan("flash", reason, problem, device, options, (guard, prologue, forward),
                (guard.facts, prologue.facts) + forward.facts,
                {"tile": forward.tile, "num_splits": forward.splits, "programmatic": pdl},
                sizes=buffer_sizes(problem))


BACKEND = Backend("flash", gpu_capabilities({"float16": 80, "bfloat16": 80}, 256,
                                             features={"head_sink"}), make_plan)
