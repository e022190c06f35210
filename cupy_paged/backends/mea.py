"""The "mea" backend: prologue kernel, paged->packed gather, CUTLASS memory-efficient attention.

Runs on any NVIDIA GPU from sm50 (fp16; bf16 from sm80) and is the forced fallback everywhere
(``backend="mea"``). The attention kernel is our own main loop over CUTLASS fMHA components
(``cuda_src/mea/``), which adds softcap, sliding window, GQA and unmapped-block masking.

Scratch: the gather buffer holds ``sum(past + q_len)`` rows. With ``total_kv_tokens`` (or
``max_seqlen_k``) given, it is sized from that host bound with no device->host sync; otherwise
the call reads the exact total back once (one sync).
"""
from __future__ import annotations

import numpy as np

from . import _gather, _mea_kernels, _prologue
from .base import Backend, Capabilities


def _run(problem, adopted, out, fault=None):
    xp, a, sm = adopted.xp, adopted.arrays, adopted.sm
    q = _prologue.run_prologue(problem, a, fault)
    seqstart_k = _gather.kv_seqstarts(problem, a["cumulative_sequence_length"],
                                      a["past_seqlens"], fault)
    rows, max_seqlen_q = _scratch_bounds(problem, xp, seqstart_k,
                                         a["cumulative_sequence_length"])
    if problem.total_kv_tokens is not None or problem.max_seqlen_k is not None:
        # The guard stops a sequence (or the batch) that needs more than a host bound, and
        # counts it 0 rows: then this changes nothing. Without the guard, a wrong bound
        # truncates keys instead of reading past the buffer.
        seqstart_k = xp.minimum(seqstart_k, np.int32(rows))
    k_packed, v_packed = _gather.gather_kv(problem, a, seqstart_k, rows, fault)
    accum_elements = _mea_kernels.workspace_elements(problem)
    out_accum = xp.empty(accum_elements, dtype=xp.float32) if accum_elements else None
    _mea_kernels.launch_fmha(
        problem, q, problem.num_heads * problem.head_size, k_packed, v_packed, out, out_accum,
        a["cumulative_sequence_length"], seqstart_k, a["block_table"],
        max_seqlen_q, sm, fault=fault)


def _scratch_bounds(problem, xp, seqstart_k, cum):
    """(packed K/V rows, grid bound on q_len) from host hints; without a K/V bound, read the
    exact total and the largest q_len back in one device->host copy (one sync). Garbage
    metadata (a stopped batch) can make the read-back total negative: it counts as 0."""
    max_q = problem.num_tokens if problem.max_seqlen_q is None else min(
        problem.max_seqlen_q, problem.num_tokens)
    if problem.total_kv_tokens is not None:
        return problem.total_kv_tokens, max_q
    if problem.max_seqlen_k is not None:
        return problem.batch * problem.max_seqlen_k, max_q
    total, longest = (int(x) for x in xp.stack(
        [seqstart_k[-1], xp.diff(cum).max()]).get())
    return max(total, 0), max(min(longest, max_q), 0)


BACKEND = Backend(
    name="mea",
    capabilities=Capabilities(
        array_kinds=frozenset({"cupy"}), dtype_min_sm={"float16": 50, "bfloat16": 80},
        max_head_size=256),
    run=_run)
