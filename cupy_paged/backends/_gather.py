"""Paged -> packed varlen K/V for kernels that take contiguous keys (the CUTLASS memory-efficient
path): ``kv_seqstarts`` builds the per-sequence row starts, ``gather_kv`` copies the rows through
the block table (``cuda_src/mea/gather.cu``), zeros where a block is unmapped.

Variants: ``gather_kv_f16`` (sm50+) and ``gather_kv_bf16`` (sm80+). CuPy is imported on first use.
"""
from __future__ import annotations

import functools

from ..jit import get_function
from ._launch import (THREADS, DirectLaunch, check_aligned, grid_size, pointer,
                      register_per_dtype, variant)
from ._params import params_struct

_INT32_MAX = 2**31 - 1


def gather_name(dtype):
    """The variant for ``dtype`` ("float16" or "bfloat16"): gather_kv_f16 / gather_kv_bf16."""
    return variant("gather_kv", dtype)


PARAMS = params_struct("mea/params.cuh", "cupy_paged::mea::GatherParams")
SPECS = register_per_dtype("gather_kv", "mea/gather.cu", PARAMS,
                           "cupy_paged::mea::gather_kv<{T}>(p);")


def kv_seqstarts(problem, cum, past, fault=None):
    """seqstart_k, int32 (B+1,): 0, then the running sum of past[b] + q_len[b].

    cum: cumulative_sequence_length (B+1,) int32; past: past_seqlens (B,) int32, on the GPU.
    fault: the metadata guard's int32 (B+1,) verdict, or None. With it, a faulted sequence
    (every one when fault[B] != 0) counts 0 rows, so its garbage lengths never shift the
    others' rows, and so does a sequence with no new token (no query reads its keys).
    Row seqstart_k[b] + k of the gathered K/V is position k of sequence b. Device-side cumsum
    (CuPy's own scan), no synchronisation; the total must stay below 2^31 rows.
    """
    import cupy

    seqstart_k = cupy.zeros(problem.batch + 1, dtype=cupy.int32)
    if problem.batch:
        if fault is None:
            seqlens = past + (cum[1:] - cum[:-1])
        else:
            seqlens = _kv_lens()(cum[:-1], cum[1:], past, fault[:-1], fault[-1:])
        seqstart_k[1:] = cupy.cumsum(seqlens, dtype=cupy.int32)
    return seqstart_k


@functools.cache
def _kv_lens():
    """past + q_len per sequence; 0 where the guard faulted it or the batch, or q_len is 0:
    one fused kernel."""
    import cupy

    return cupy.ElementwiseKernel(
        "int32 begin, int32 end, int32 past, int32 fault, int32 batch_fault", "int32 kv_len",
        "kv_len = (fault | batch_fault) != 0 || end <= begin ? 0 : past + (end - begin)",
        "cupy_paged_kv_lens")


def gather_kv(problem, a, seqstart_k, rows_bound, fault=None):
    """(k_packed, v_packed), each (rows_bound, Nkv, H) in the cache dtype.

    a: the CuPy arrays by argument name (key_cache, value_cache, block_table are read);
    seqstart_k: ``kv_seqstarts``' (B+1,) int32; rows_bound: a host-known bound on
    seqstart_k[B] (the grid is sized from it). Rows below min(seqstart_k[B], rows_bound) hold
    the cache rows through the block table, zeros where the block is -1; rows past the real
    total are left uninitialised. fault: the guard's int32 (B+1,) verdict, or None: faulted
    sequences' rows (all rows when fault[B] != 0) are left as they are. Launches on the
    current stream; never synchronises.
    """
    import cupy

    key_cache, value_cache = a["key_cache"], a["value_cache"]
    Nkv, H = problem.kv_num_heads, problem.head_size
    rows_bound = int(rows_bound)
    if rows_bound < 0:
        raise ValueError(f"rows_bound: expected >= 0, got {rows_bound}")
    k_packed = cupy.empty((rows_bound, Nkv, H), dtype=key_cache.dtype)
    v_packed = cupy.empty((rows_bound, Nkv, H), dtype=value_cache.dtype)
    if rows_bound == 0 or problem.batch == 0:
        return k_packed, v_packed
    check_aligned(key_cache=key_cache, value_cache=value_cache)
    launch = gather_launch(problem, key_cache.data.device_id, rows_bound)
    launch(key_cache.data.ptr, value_cache.data.ptr, a["block_table"].data.ptr,
           seqstart_k.data.ptr, pointer(fault), k_packed.data.ptr, v_packed.data.ptr)
    return k_packed, v_packed


def gather_launch(problem, device, rows_bound):
    """The gather's DirectLaunch for ``problem`` on ``device``, its grid sized for
    ``rows_bound`` rows."""
    Nkv, H = problem.kv_num_heads, problem.head_size
    packed = PARAMS.pack(batch=problem.batch, kv_heads=Nkv, head_size=H,
                         block_size=problem.block_size, num_blocks=problem.num_blocks,
                         max_blocks=problem.max_blocks,
                         rows_bound=min(rows_bound, _INT32_MAX))
    return DirectLaunch(get_function(gather_name(problem.dtype), device=device), PARAMS, packed,
                        (grid_size(rows_bound * Nkv * (H // 8), device),), (THREADS,))
