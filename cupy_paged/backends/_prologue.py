"""The attention prologue on the GPU (spec steps 1-3): split packed QKV, rotate Q and K, write the
new K and V into the paged cache, in one kernel (``cuda_src/prologue/prologue.cu``).

Variants: ``prologue_f16`` (sm50+) and ``prologue_bf16`` (sm80+); packed, rotary and
interleaved are runtime flags (uniform branches). CuPy is imported on first launch only.
"""
from __future__ import annotations

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
        grid = (grid_size(-(-T // _TOKENS_PER_BLOCK) * THREADS, device),)  # 4 tokens a block
        name = prologue_name(problem.dtype)
        self.launch = DirectLaunch(get_function(name, device=device), PARAMS, _packed(problem),
                                   grid, (THREADS,), programmatic=programmatic)
        self.facts = Launch(name, grid, (THREADS, 1, 1), 0, programmatic)

    def __call__(self, call):
        call.q = self.run(call.a, call.fault, call.stream)

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
        import cupy

        problem, query = self.problem, a["query"]
        T, N, H = problem.num_tokens, problem.num_heads, problem.head_size
        q = cupy.empty((T, N * H), dtype=query.dtype) if self.write_q else query
        if T == 0 or problem.batch == 0:
            return q
        key = query if problem.packed else a["key"]            # never read when packed
        value = query if problem.packed else a["value"]
        cos = a["cos_cache"] if problem.do_rotary else query   # never read without rotary
        sin = a["sin_cache"] if problem.do_rotary else query
        kc, vc = a["key_cache"], a["value_cache"]
        q_p, k_p, v_p, kc_p, vc_p = (query.data.ptr, key.data.ptr, value.data.ptr,
                                     kc.data.ptr, vc.data.ptr)
        if (q_p | k_p | v_p | kc_p | vc_p) & 15:  # the kernel moves 16-byte vectors
            check_aligned(query=query, key=key, value=value, key_cache=kc, value_cache=vc)
        self.launch(q_p, k_p, v_p, kc_p, vc_p, a["cumulative_sequence_length"].data.ptr,
                    a["past_seqlens"].data.ptr, a["block_table"].data.ptr, pointer(fault),
                    cos.data.ptr, sin.data.ptr, q.data.ptr, stream=stream)
        return q


def run_prologue(problem, a, fault=None):
    """The prologue alone on the query's GPU (``PrologueStep.run``), outside a plan."""
    return PrologueStep(problem, a["query"].data.device_id).run(a, fault)


def _packed(problem):
    rotary = problem.do_rotary
    return PARAMS.pack(
        num_tokens=problem.num_tokens, batch=problem.batch, num_heads=problem.num_heads,
        kv_heads=problem.kv_num_heads, head_size=problem.head_size,
        block_size=problem.block_size, num_blocks=problem.num_blocks,
        max_blocks=problem.max_blocks, rotary_dim=problem.rotary_dim if rotary else 0,
        cos_rows=problem.cos_rows if rotary else 0, packed=problem.packed, do_rotary=rotary,
        interleaved=problem.rotary_interleaved, write_q=problem.packed or rotary)
