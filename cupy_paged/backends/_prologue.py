"""The attention prologue on the GPU (spec steps 1-3): split packed QKV, rotate Q and K, write the
new K and V into the paged cache, in one kernel (``cuda_src/prologue/prologue.cu``).

Variants: ``prologue_f16`` (sm50+) and ``prologue_bf16`` (sm80+); packed, rotary and
interleaved are runtime flags (uniform branches). CuPy is imported on first launch only.
"""
from __future__ import annotations

import numpy as np

from ..jit import get_function
from ._launch import NULL, THREADS, check_aligned, grid_size, register_per_dtype, variant

_PROLOGUE_ARGS = (
    "const {T}* query, const {T}* key, const {T}* value, {T}* key_cache, {T}* value_cache, "
    "const int* cumulative_sequence_length, const int* past_seqlens, const int* block_table, "
    "const int* fault, const {T}* cos_cache, const {T}* sin_cache, {T}* q_out, "
    "int num_tokens, int batch, int num_heads, int kv_num_heads, int head_size, "
    "int block_size, int num_blocks, int max_blocks, int rotary_dim, int cos_rows, int packed, "
    "int do_rotary, int interleaved, int write_q")
_PROLOGUE_CALL = (
    "query, key, value, key_cache, value_cache, cumulative_sequence_length, past_seqlens, "
    "block_table, fault, cos_cache, sin_cache, q_out, num_tokens, batch, num_heads, "
    "kv_num_heads, head_size, block_size, num_blocks, max_blocks, rotary_dim, cos_rows, packed, "
    "do_rotary, interleaved, write_q")


def prologue_name(dtype):
    """The variant for ``dtype`` ("float16" or "bfloat16"): prologue_f16 / prologue_bf16."""
    return variant("prologue", dtype)


SPECS = register_per_dtype("prologue", "prologue/prologue.cu", _PROLOGUE_ARGS,
                           f"cupy_paged::prologue::run<{{T}}>({_PROLOGUE_CALL});")


def run_prologue(problem, a, fault=None):
    """Unpack, rotate and write the caches; returns the (T, N*H) query to attend with.

    problem: the call's ``_validate.Problem``; a: the CuPy arrays by argument name (query, key,
    value, key_cache, value_cache, cumulative_sequence_length, past_seqlens, block_table,
    cos_cache, sin_cache; key/value/cos/sin may be None). The caches are written in place.
    fault: the metadata guard's int32 (B+1,) verdict (``_guard.run_guard``), or None: tokens of
    a faulted sequence (every token when fault[B] != 0) are neither rotated nor written.
    Returns ``a["query"]`` itself when it is neither packed nor rotated, else a new (T, N*H)
    array. Launches on the current stream; never synchronises.
    """
    import cupy

    query = a["query"]
    T, N, Nkv, H = problem.num_tokens, problem.num_heads, problem.kv_num_heads, problem.head_size
    write_q = problem.packed or problem.do_rotary
    q = cupy.empty((T, N * H), dtype=query.dtype) if write_q else query
    if T == 0 or problem.batch == 0:
        return q
    key = query if problem.packed else a["key"]            # never read when packed
    value = query if problem.packed else a["value"]
    cos = a["cos_cache"] if problem.do_rotary else query   # never read without rotary
    sin = a["sin_cache"] if problem.do_rotary else query
    check_aligned(query=query, key=key, value=value, key_cache=a["key_cache"],
                  value_cache=a["value_cache"])
    items = T * ((N if write_q else 0) + 2 * Nkv) * (H // 8)
    kernel = get_function(prologue_name(problem.dtype))
    kernel((grid_size(items),), (THREADS,), (
        query, key, value, a["key_cache"], a["value_cache"], a["cumulative_sequence_length"],
        a["past_seqlens"], a["block_table"], NULL if fault is None else fault, cos, sin, q,
        np.int32(T), np.int32(problem.batch), np.int32(N), np.int32(Nkv), np.int32(H),
        np.int32(problem.block_size), np.int32(problem.num_blocks), np.int32(problem.max_blocks),
        np.int32(problem.rotary_dim if problem.do_rotary else 0),
        np.int32(problem.cos_rows if problem.do_rotary else 0), np.int32(problem.packed),
        np.int32(problem.do_rotary), np.int32(problem.rotary_interleaved), np.int32(write_q)))
    return q
