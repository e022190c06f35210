"""The "mea" backend: metadata guard, prologue kernel, paged->packed gather, CUTLASS
memory-efficient attention.

Runs on any NVIDIA GPU from sm50 (fp16; bf16 from sm80) and is the forced fallback everywhere
(``backend="mea"``). The attention kernel is our own main loop over CUTLASS fMHA components
(``cuda_src/mea/``), which adds softcap, sliding window, GQA and unmapped-block masking.

Scratch: the gather buffer holds ``sum(past + q_len)`` rows. With ``total_kv_tokens`` (or
``max_seqlen_k``) given, it is sized from that host bound with no device->host sync; otherwise
the call reads the exact total back once (one sync).
"""
from __future__ import annotations

import numpy as np

from .._buffers import buffer_sizes
from . import _gather, _guard, _mea_kernels, _prologue
from .base import Backend, gpu_capabilities
from .plan import Launch, Plan

OPTIONS = ("arch_tag",)


class AttentionStep:
    """The gather and the fMHA of one plan. Their grids depend on the packed K/V rows and the
    longest q_len: from host bounds when given, else read back per call (one sync)."""

    def __init__(self, problem, device, sm):
        self.problem, self.device, self.sm = problem, device, sm
        self.accum = _mea_kernels.workspace_elements(problem)
        self.bounded = problem.total_kv_tokens is not None or problem.max_seqlen_k is not None
        name = _mea_kernels.variant_name(problem.dtype, sm, problem.head_size)
        self.facts = (Launch(_gather.gather_name(problem.dtype), (), ()),  # sized per call
                      Launch(name, (), ()))

    def __call__(self, call):
        import cupy

        problem, a, fault = self.problem, call.a, call.fault
        cum = a["cumulative_sequence_length"]
        seqstart_k = _gather.kv_seqstarts(problem, cum, a["past_seqlens"], fault)
        rows, max_q = self._bounds(seqstart_k, cum)
        if self.bounded:
            # The guard stops a sequence (or the batch) that needs more than a host bound, and
            # counts it 0 rows: then this changes nothing. Without the guard, a wrong bound
            # truncates keys instead of reading past the buffer.
            seqstart_k = cupy.minimum(seqstart_k, np.int32(rows))
        k_packed, v_packed = _gather.gather_kv(problem, a, seqstart_k, rows, fault)
        out_accum = cupy.empty(self.accum, dtype=cupy.float32) if self.accum else None
        _mea_kernels.launch_fmha(
            problem, call.q, problem.num_heads * problem.head_size, k_packed, v_packed,
            call.out, out_accum, cum, seqstart_k, a["block_table"], max_q, self.sm,
            fault=fault)

    def _bounds(self, seqstart_k, cum):
        """(packed K/V rows, grid bound on q_len) from host hints; without a K/V bound, read
        the exact total and the largest q_len back in one device->host copy (one sync).
        Garbage metadata (a stopped batch) can make the read-back total negative: it counts
        as 0."""
        problem = self.problem
        max_q = problem.num_tokens if problem.max_seqlen_q is None else min(
            problem.max_seqlen_q, problem.num_tokens)
        if problem.total_kv_tokens is not None:
            return problem.total_kv_tokens, max_q
        if problem.max_seqlen_k is not None:
            return problem.batch * problem.max_seqlen_k, max_q
        import cupy

        total, longest = (int(x) for x in cupy.stack(
            [seqstart_k[-1], cupy.diff(cum).max()]).get())
        return max(total, 0), max(min(longest, max_q), 0)


def make_plan(problem, device, sm, options, reason):
    """The mea ``Plan``: guard, prologue, gather + fMHA (``options.arch_tag`` forces the
    CUTLASS arch tag, e.g. 75 for the Sm75 kernel on a newer GPU)."""
    options.check("mea", OPTIONS)
    tag_sm = sm if options.arch_tag is None else min(int(options.arch_tag), sm)
    guard = _guard.GuardStep(problem, device)
    prologue = _prologue.PrologueStep(problem, device)
    attention = AttentionStep(problem, device, tag_sm)
    return Plan("mea", reason, problem, device, options, (guard, prologue, attention),
                (guard.facts, prologue.facts) + attention.facts,
                {"arch_tag": _mea_kernels.arch_tag(tag_sm)},
                sizes=buffer_sizes(problem))


BACKEND = Backend("mea", gpu_capabilities({"float16": 50, "bfloat16": 80}, 256), make_plan)
