"""The attention prologue on the GPU (spec steps 1-3): split packed QKV, rotate Q and K, write the
new K and V into the paged cache, in one kernel (``cuda_src/prologue/prologue.cu``).

Variants: ``prologue_f16`` (sm50+) and ``prologue_bf16`` (sm80+); packed, rotary and
interleaved are runtime flags (uniform branches). CuPy is imported on first launch only.
"""
from __future__ import annotations

from ..jit import get_function
from ._launch import (POINTER, THREADS, DirectLaunch, ScalarStruct, check_aligned, grid_size,
                      pointer, programmatic_supported, register_per_dtype, variant)

# Scalars travel as one struct passed by value (``_launch.ScalarStruct``), packed once per
# problem and device into the launch's argument block by ``_launcher``.
SCALARS = ScalarStruct("PrologueScalars", tuple(("int", n) for n in (
    "num_tokens", "batch", "num_heads", "kv_num_heads", "head_size", "block_size", "num_blocks",
    "max_blocks", "rotary_dim", "cos_rows", "packed", "do_rotary", "interleaved", "write_q")))
_PROLOGUE_ARGS = (
    "const {T}* query, const {T}* key, const {T}* value, {T}* key_cache, {T}* value_cache, "
    "const int* cumulative_sequence_length, const int* past_seqlens, const int* block_table, "
    "const int* fault, const {T}* cos_cache, const {T}* sin_cache, {T}* q_out, "
    "const PrologueScalars s")
_PROLOGUE_CALL = (
    "query, key, value, key_cache, value_cache, cumulative_sequence_length, past_seqlens, "
    "block_table, fault, cos_cache, sin_cache, q_out, "
    + ", ".join(f"s.{n}" for _, n in SCALARS.fields))


def prologue_name(dtype):
    """The variant for ``dtype`` ("float16" or "bfloat16"): prologue_f16 / prologue_bf16."""
    return variant("prologue", dtype)


SPECS = register_per_dtype("prologue", "prologue/prologue.cu", _PROLOGUE_ARGS,
                           f"cupy_paged::prologue::run<{{T}}>({_PROLOGUE_CALL});",
                           preamble=SCALARS.definition,
                           min_blocks=3)  # <= 85 registers: 3 x 256 threads an SM hide the lookups

_TOKENS_PER_BLOCK = 4  # prologue.cu kTokens
_launchers: dict = {}  # (id(problem), after guard) -> (problem, device, DirectLaunch)
_LAUNCHERS_MAX = 256


def _launcher(problem, device, after_guard):
    """The prologue's DirectLaunch for ``problem`` on GPU ``device`` (grid and packed
    PrologueScalars inside), built once per Problem object (_validate hands the same object to
    every call of one signature). after_guard: the metadata guard is the kernel launched just
    before on the stream; the prologue then starts programmatically behind it (sm90+,
    cuda_src/common/pdl.cuh)."""
    key = (id(problem), after_guard)
    entry = _launchers.get(key)
    if entry is not None and entry[0] is problem and entry[1] == device:
        return entry[2]
    T, N, Nkv, H = problem.num_tokens, problem.num_heads, problem.kv_num_heads, problem.head_size
    write_q = problem.packed or problem.do_rotary
    scalars = SCALARS.pack(
        T, problem.batch, N, Nkv, H, problem.block_size, problem.num_blocks,
        problem.max_blocks, problem.rotary_dim if problem.do_rotary else 0,
        problem.cos_rows if problem.do_rotary else 0, problem.packed, problem.do_rotary,
        problem.rotary_interleaved, write_q)
    launch = DirectLaunch(get_function(prologue_name(problem.dtype), device=device),
                          (POINTER,) * 12 + (scalars,),
                          (grid_size(-(-T // _TOKENS_PER_BLOCK) * THREADS, device),),
                          (THREADS,),  # 4 tokens a block, up to a wave of blocks
                          programmatic=after_guard and programmatic_supported(device))
    if len(_launchers) >= _LAUNCHERS_MAX:
        _launchers.clear()
    _launchers[key] = (problem, device, launch)
    return launch


def run_prologue(problem, a, fault=None, overlap=False):
    """Unpack, rotate and write the caches; returns the (T, N*H) query to attend with.

    problem: the call's ``_validate.Problem``; a: the CuPy arrays by argument name (query, key,
    value, key_cache, value_cache, cumulative_sequence_length, past_seqlens, block_table,
    cos_cache, sin_cache; key/value/cos/sin may be None). The caches are written in place.
    fault: the metadata guard's int32 (B+1,) verdict (``_guard.run_guard``), or None: tokens of
    a faulted sequence (every token when fault[B] != 0) are neither rotated nor written.
    overlap: with fault given (the guard is the kernel just before on the stream), start
    programmatically behind it on sm90+ (``_flash_kernels.overlap_launches`` decides).
    Returns ``a["query"]`` itself when it is neither packed nor rotated, else a new (T, N*H)
    array. Launches on the current stream; never synchronises.
    """
    import cupy

    query = a["query"]
    T, N, H = problem.num_tokens, problem.num_heads, problem.head_size
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
    launch = _launcher(problem, query.data.device_id, overlap and fault is not None)
    launch(query.data.ptr, key.data.ptr, value.data.ptr, a["key_cache"].data.ptr,
           a["value_cache"].data.ptr, a["cumulative_sequence_length"].data.ptr,
           a["past_seqlens"].data.ptr, a["block_table"].data.ptr, pointer(fault), cos.data.ptr,
           sin.data.ptr, q.data.ptr)
    return q
