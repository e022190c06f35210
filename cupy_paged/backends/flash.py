"""The "flash" backend: prologue kernel, then our sm80+ attention kernel reading the paged
cache in place (``cuda_src/flash/``), with split-KV for long contexts and few work units.

No device->host synchronisation: grids, split counts and workspaces come from host-known
shapes, so a call can be captured in a CUDA graph. The split-KV workspace is kept per
(device, stream) and only grows (outgrown buffers are kept), so a captured graph's workspace
stays alive and calls on different streams never share one.
"""
from __future__ import annotations

from . import _flash_kernels, _prologue
from .base import Backend, Capabilities

_workspaces: dict = {}  # (device id, stream ptr) -> (partial_o, partial_lse), grow-only
_retired: list = []     # outgrown workspaces, kept alive for graphs captured before the growth


def _run(problem, adopted, out, fault=None):
    xp, a, sm = adopted.xp, adopted.arrays, adopted.sm
    device = a["query"].data.device_id
    plan = _flash_kernels.launch_plan(problem, sm, device)
    q = _prologue.run_prologue(problem, a, fault, overlap=plan.overlap)
    splits = plan.splits
    workspace = _workspace(xp, device, problem, splits) if splits > 1 else None
    _flash_kernels.launch_flash(
        problem, q, a["key_cache"], a["value_cache"], a["cumulative_sequence_length"],
        a["past_seqlens"], a["block_table"], out, sm, workspace=workspace, fault=fault,
        after_prologue=True)


def _workspace(xp, device, problem, splits):
    """Float32 (partial_o, partial_lse) views of at least ``workspace_shape`` elements."""
    o_shape, lse_shape = _flash_kernels.workspace_shape(problem, splits)
    key = (device, xp.cuda.get_current_stream().ptr)
    held = _workspaces.get(key)
    n_o, n_lse = o_shape[0] * o_shape[1] * o_shape[2], lse_shape[0] * lse_shape[1]
    if held is None or held[0].size < n_o or held[1].size < n_lse:
        n_o, n_lse = max(n_o, 0 if held is None else held[0].size), max(
            n_lse, 0 if held is None else held[1].size)
        if held is not None:
            _retired.append(held)  # a graph captured earlier may still point into it
        held = (xp.empty(n_o, dtype=xp.float32), xp.empty(n_lse, dtype=xp.float32))
        _workspaces[key] = held
    return held


BACKEND = Backend(
    name="flash",
    capabilities=Capabilities(
        array_kinds=frozenset({"cupy"}), dtype_min_sm={"float16": 80, "bfloat16": 80},
        max_head_size=256),
    run=_run)
