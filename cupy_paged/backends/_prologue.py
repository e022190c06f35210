"""The attention prologue on the GPU (spec steps 1-3): split packed QKV, rotate Q and K, write the
new K and V into the paged cache, in one kernel (``cuda_src/prologue/prologue.cu``).

Variants: ``prologue_f16`` (sm50+) and ``prologue_bf16`` (sm80+); packed, rotary and
interleaved are runtime flags (uniform branches). CuPy is imported on first launch only.
"""
from __future__ import annotations

import functools

from ..jit import get_function
from ._launch import (THREADS, DirectLaunch, check_aligned, grid_size, pointer,
                      register_per_dtype, variant)
from ._params import params_struct
from .plan import Launch

PARAMS = params_struct("prologue/params.cuh", "cupy_paged::prologue::PrologueParams")
SPECS = register_per_dtype("prologue", "prologue/prologue.cu", PARAMS,
                           "cupy_paged::prologue::run<{T}>(p);",
                           min_blocks=3)  # <= 85 registers: 3 x 256 threads an SM hide the lookups
_TOKENS_PER_BLOCK = 4  # prologue.cu kTokens


def prologue_name(dtype):
    """The variant for ``dtype`` ("float16" or "bfloat16"): prologue_f16 / prologue_bf16."""
    return variant("prologue", dtype)


class PrologueStep:
    """The prologue as a plan step: unpacks, rotates and writes the caches, and sets
    ``call.q`` to the query the attention reads. programmatic: start behind the kernel
    launched just before on the stream (the guard; sm90+, cuda_src/common/pdl.cuh)."""

    def __init__(self, problem, device, programmatic=False):
        T = problem.num_tokens
        self.problem = problem
        self.write_q = problem.packed or problem.do_rotary
        # The arguments the kernel reads, by name: query stands in for what it never reads
        # (key and value when packed, cos and sin without rotary).
        packed, rotary = problem.packed, problem.do_rotary
        self.inputs = ("query", "query" if packed else "key", "query" if packed else "value",
                       "key_cache", "value_cache", "cumulative_sequence_length",
                       "past_seqlens", "block_table")
        self.tables = ("cos_cache", "sin_cache") if rotary else ("query", "query")
        grid = (grid_size(-(-T // _TOKENS_PER_BLOCK) * THREADS, device),)  # 4 tokens a block
        name = prologue_name(problem.dtype)
        self.launch = DirectLaunch(get_function(name, device=device), PARAMS, _packed(problem),
                                   grid, (THREADS,), programmatic=programmatic)
        self.facts = Launch(name, grid, (THREADS, 1, 1), 0, programmatic)

    def __call__(self, call):
        q = self._output(call.a["query"])
        q_p = q.data.ptr if self.write_q else call.ptr["query"]
        if self.problem.num_tokens and self.problem.batch:
            self._launch(call.ptr, call.fault, q_p, call.stream)
        call.q, call.q_ptr = q, q_p

    def run(self, a, fault=None, stream=None):
        """Unpack, rotate and write the caches; returns the (T, N*H) query to attend with.

        a: the CuPy arrays by argument name (query, key, value, key_cache, value_cache,
        cumulative_sequence_length, past_seqlens, block_table, cos_cache, sin_cache; key /
        value / cos / sin may be None). The caches are written in place. fault: the metadata
        guard's int32 (B+1,) verdict, or None: tokens of a faulted sequence (every token when
        fault[B] != 0) are neither rotated nor written. Returns a fresh (T, N*H) array (packed
        or rotated input) or ``query`` itself. Launches on ``stream`` (a handle; None: the
        current CuPy stream); never synchronises.
        """
        problem = self.problem
        q = self._output(a["query"])
        if problem.num_tokens == 0 or problem.batch == 0:
            return q
        moved = {n: a[n] for n in self.inputs[:5]}  # the kernel moves 16-byte vectors
        check_aligned(**moved)
        ptr = {n: a[n].data.ptr for n in self.inputs + self.tables}
        self._launch(ptr, fault, q.data.ptr, stream)
        return q

    def _output(self, query):
        """The (T, N*H) query the attention reads: a fresh array when the prologue writes it."""
        if not self.write_q:
            return query
        import cupy

        problem = self.problem
        return cupy.empty((problem.num_tokens, problem.num_heads * problem.head_size),
                          dtype=query.dtype)

    def _launch(self, ptr, fault, q_out, stream):
        """The launch on ``stream`` (a handle) from the arguments' device addresses ``ptr``
        (name -> int), the guard's verdict and q_out's address."""
        self.launch(*[ptr[n] for n in self.inputs], pointer(fault),
                    *[ptr[n] for n in self.tables], q_out, stream=stream)


def run_prologue(problem, a, fault=None):
    """The prologue alone on the query's GPU (``PrologueStep.run``), outside a plan."""
    return _standalone_step(problem, a["query"].data.device_id).run(a, fault)


@functools.lru_cache(maxsize=16)
def _standalone_step(problem, device):
    """The PrologueStep ``run_prologue`` runs, kept for calls that repeat (tests, timing)."""
    return PrologueStep(problem, device)


def _packed(problem):
    rotary = problem.do_rotary
    return PARAMS.pack(
        num_tokens=problem.num_tokens, batch=problem.batch, num_heads=problem.num_heads,
        kv_heads=problem.kv_num_heads, head_size=problem.head_size,
        block_size=problem.block_size, num_blocks=problem.num_blocks,
        max_blocks=problem.max_blocks, rotary_dim=problem.rotary_dim if rotary else 0,
        cos_rows=problem.cos_rows if rotary else 0, packed=problem.packed, do_rotary=rotary,
        interleaved=problem.rotary_interleaved, write_q=problem.packed or rotary)
