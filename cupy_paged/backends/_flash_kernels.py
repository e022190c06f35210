"""Flash backend kernels: variant naming and registration, split heuristic, launch (the tiles
and their heuristic: ``_flash_tiles``).

Mechanism lives in ``cuda_src/flash/`` (a FlashAttention-2 style forward kernel that reads K/V
straight from the paged cache, and the split-KV combine); this module holds the policy: which
instantiation a call uses (``variant_name``), how many key splits (``plan_splits``), and the
launch on the current CuPy stream (``launch_flash``). Imports with NumPy alone; CuPy loads at
the first launch. Nothing here reads device memory: every launch is CUDA-graph capturable.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np

from ..jit import KernelSpec, get_function, register
from ._flash_tiles import (HEAD_SIZES, SMEM_LIMIT, SWIZZLE_HEADS, Tile,  # noqa: F401
                           all_tiles, arch_class, padded_head, tile_for)
from ._launch import (POINTER, DirectLaunch, ScalarStruct, pointer, programmatic_supported,
                      sm_count)

_DTYPES = {"float16": ("f16", "__half"), "bfloat16": ("bf16", "__nv_bfloat16")}
# Shared memory per SM (bytes), for the occupancy estimate of the split heuristic.
_SMEM_PER_SM = {80: 167936, 86: 102400, 87: 167936, 89: 102400, 90: 233472, 100: 233472,
                103: 233472, 120: 102400, 121: 102400}
_LOG2E = math.log2(math.e)
_COMBINE_THREADS = 256
_MAX_SPLITS = 64
_MAX_WORKSPACE_BYTES = 256 << 20

# The forward kernel's pointer parameters, in order: (C type, name). T* becomes void* here and
# the entry forwards them to cupy_paged::flash::fwd_entry.
FWD_POINTERS = (
    ("const void*", "q"), ("const void*", "key_cache"), ("const void*", "value_cache"),
    ("const int*", "cum"), ("const int*", "past"), ("const int*", "block_table"),
    ("void*", "out"), ("float*", "partial_o"), ("float*", "partial_lse"),
)
# Its scalars travel as one struct passed by value (_launch.ScalarStruct).
FWD_SCALARS = ScalarStruct("FwdScalars", (
    ("int", "num_tokens"), ("int", "batch"), ("int", "num_heads"), ("int", "kv_heads"),
    ("int", "head_size"), ("int", "group"), ("int", "block_size"), ("int", "block_shift"),
    ("unsigned", "block_magic"), ("int", "block_magic_shift"), ("int", "num_blocks"),
    ("int", "max_blocks"), ("float", "scale_log2"), ("float", "cap_in"), ("float", "cap_out"),
    ("int", "window"), ("int", "num_splits"),
))


def _rows_bound(problem):
    """G times the caller's max_seqlen_q, else times the mean q_len (T / B): without a hint a
    decode batch (T = B) must not get the prefill tile."""
    T, B = problem.num_tokens, max(problem.batch, 1)
    q = min(T, problem.max_seqlen_q) if problem.max_seqlen_q is not None else -(-T // B)
    return problem.group * max(q, 1)


def problem_tile(problem, sm):
    return tile_for(padded_head(problem.head_size), _rows_bound(problem), arch_class(sm))


# ---------------------------------------------------------------- names and registration


def fwd_name(dtype, tile):
    """e.g. flash_fwd_f16_h128_m64_n64_w4_s2_sm80: extern "C" symbol, cache file, test id."""
    short = _DTYPES[dtype][0]
    keys = f"_k{tile.key_warps}" if tile.key_warps > 1 else ""
    swz = "_swz" if tile.swizzle else ""
    return (f"flash_fwd_{short}_h{tile.head}_m{tile.bm}_n{tile.bn}_w{tile.warps}{keys}"
            f"_s{tile.stages}{swz}_{tile.arch}")


def combine_name(dtype):
    return f"flash_combine_{_DTYPES[dtype][0]}"


@functools.lru_cache(maxsize=None)
def _register_fwd(dtype, tile):
    name = fwd_name(dtype, tile)
    if tile.smem_bytes > SMEM_LIMIT[tile.arch]:
        raise ValueError(f"{name}: {tile.smem_bytes} bytes of shared memory > the "
                         f"{tile.arch} class's {SMEM_LIMIT[tile.arch]}")
    ctype = _DTYPES[dtype][1]
    limit = "kSmemSm80" if tile.arch == "sm80" else "kSmemSm86"
    traits = (f"cupy_paged::flash::Traits<{ctype}, {tile.head}, {tile.bm}, {tile.bn}, "
              f"{tile.warps}, {tile.stages}, cupy_paged::flash::{limit}, {tile.key_warps}, "
              f"{'true' if tile.swizzle else 'false'}>")
    params = ",\n    ".join(f"{t} {n}" for t, n in FWD_POINTERS)
    args = ", ".join(n for _, n in FWD_POINTERS)
    entry = (FWD_SCALARS.definition +
             f'extern "C" __global__ void __launch_bounds__({tile.threads})\n{name}(\n'
             f"    {params},\n    const FwdScalars scalars, const int* fault) {{\n"
             f"  cupy_paged::flash::fwd_entry<{traits}>({args}, scalars, fault);\n}}\n")
    register(KernelSpec(name, "flash/flash.cu", entry, min_arch=80))
    return name


@functools.lru_cache(maxsize=None)
def _register_combine(dtype):
    name, ctype = combine_name(dtype), _DTYPES[dtype][1]
    entry = (f'extern "C" __global__ void __launch_bounds__({_COMBINE_THREADS})\n{name}('
             f"const float* partial_o, const float* partial_lse, {ctype}* out, int rows, "
             f"int head_size, int num_splits, const int* fault, int batch) {{\n"
             f"  cupy_paged::flash::combine<{ctype}>(partial_o, partial_lse, out, rows, "
             f"head_size, num_splits, fault, batch);\n}}\n")
    register(KernelSpec(name, "flash/flash.cu", entry, min_arch=80))
    return name


def _check_dtype(dtype):
    if dtype not in _DTYPES:
        raise ValueError(f"the flash kernel runs float16 and bfloat16, got {dtype}")


def variant_name(problem, sm):
    """Registers and returns the forward instantiation ``problem`` runs on compute capability
    ``sm`` (an int such as 80 or 90)."""
    _check_dtype(problem.dtype)
    return _register_fwd(problem.dtype, problem_tile(problem, sm))


def all_variant_names(arch="sm80"):
    """Every forward instantiation of tile class ``arch`` and the combine kernels, registered."""
    names = [_register_fwd(d, t) for d in _DTYPES for t in all_tiles(arch)]
    return names + [_register_combine(d) for d in _DTYPES]


# ---------------------------------------------------------------- split-KV heuristic


def ctas_per_sm(tile, sm):
    """Resident CTAs per SM: shared memory (1 KB reserved per CTA) and an estimate of
    registers (accumulators + scores + ~64), capped by 64 warps per SM."""
    by_smem = _SMEM_PER_SM.get(int(sm), 102400) // (tile.smem_bytes + 1024)
    regs = min(255, 64 + tile.mfrag * (tile.head // 2 + tile.warp_keys // 2))
    by_regs = 65536 // (tile.threads * regs)
    return max(1, min(by_smem, by_regs, 64 // tile.warps, 32))


def _work_tiles(problem, bm):
    """CTAs that do work per kv head, sum over b of ceil(q_len_b G / BM): bounded by T and
    max_seqlen_q, estimated from the mean q_len (T / B) when there is no hint."""
    T, B, G = problem.num_tokens, problem.batch, problem.group
    q = min(T, problem.max_seqlen_q) if problem.max_seqlen_q is not None else -(-T // B)
    return min(B * -(-G * q // bm), -(-T * G // bm) + min(B, T) - 1)


def plan_splits(problem, sm_count, sm=80):
    """Key splits per work unit, from host-known shapes only (T, B, Nkv, the key bound
    max_seqlen_k or max_blocks * block_size, SM count): 1 when the units fill the GPU, else
    the smallest count whose last wave is >= 85% as full as the best one (FlashAttention-2's
    rule, with the resident CTAs per SM counted), each split keeping >= 2 key tiles."""
    if problem.num_tokens == 0:
        return 1
    tile = problem_tile(problem, sm)
    units = problem.kv_num_heads * _work_tiles(problem, tile.bm)
    slots = sm_count * ctas_per_sm(tile, sm)
    if units <= 0 or units >= 4 * slots:
        return 1
    kv_bound = problem.max_blocks * problem.block_size
    if problem.max_seqlen_k is not None:
        kv_bound = min(kv_bound, problem.max_seqlen_k)
    key_tiles = -(-kv_bound // tile.bn)
    row_bytes = problem.num_tokens * problem.num_heads * (problem.head_size + 1) * 4
    max_splits = min(_MAX_SPLITS, key_tiles // 2, -(-4 * slots // units),
                     _MAX_WORKSPACE_BYTES // max(row_bytes, 1))
    if max_splits <= 1:
        return 1

    def efficiency(s):
        return units * s / (-(-units * s // slots) * slots)

    best = max(efficiency(s) for s in range(1, max_splits + 1))
    return next(s for s in range(1, max_splits + 1) if efficiency(s) >= 0.85 * best)


def workspace_shape(problem, num_splits):
    """(partial_o, partial_lse) float32 shapes: (S, T*N, H) and (S, T*N)."""
    rows = problem.num_tokens * problem.num_heads
    return (num_splits, rows, problem.head_size), (num_splits, rows)


# ---------------------------------------------------------------- launch


def block_divisor(block_size):
    """(block_size, shift, magic, magic_shift) of cuda_src/flash/paged_tiles.cuh BlockDiv:
    shift = log2 for powers of two, else q = umulhi(n, magic) >> magic_shift for n < 2^31."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if block_size & (block_size - 1) == 0:
        return block_size, block_size.bit_length() - 1, 0, 0
    p = 31 + (block_size - 1).bit_length()
    return block_size, -1, -(-(1 << p) // block_size), p - 32


@dataclass(frozen=True)
class _Plan:
    fwd: str
    combine: str
    smem: int
    grid: tuple
    block: tuple
    splits: int
    scalars: np.ndarray  # (1,) FWD_SCALARS.dtype
    combine_grid: tuple
    combine_scalars: tuple
    batch: np.int32
    overlap: bool  # launch behind the previous kernel (programmatic launch): overlap_launches


# Programmatic launches (cuda_src/common/pdl.cuh) save GPU time at each kernel boundary
# (H100, graph replay of a B = 8 decode step: 13.6 -> 10.5 us a call; decode 64 x 4096:
# 0.3744 -> 0.3696 ms) but cost host time (the same decode step's Python loop: 37-38 -> 42-53
# us a call, session 5): used only for calls whose GPU time clearly exceeds the host's.
# CUPY_PAGED_OVERLAP_MIN_US overrides the threshold (0: every call; the GPU tests run so too).
def _overlap_threshold(text):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"CUPY_PAGED_OVERLAP_MIN_US must be a number of microseconds, "
                         f"got {text!r}") from None


OVERLAP_MIN_GPU_US = _overlap_threshold(os.environ.get("CUPY_PAGED_OVERLAP_MIN_US", "50"))
_EST_BYTES_PER_US = 3.0e6   # ~H100 HBM3 (bytes per microsecond)
_EST_FLOPS_PER_US = 3.0e8   # ~mma.sync fp16 on an H100 (FLOPs per microsecond)


def overlap_launches(problem):
    """Whether the call's kernels should start programmatically behind one another: when an
    upper bound of its GPU time, from host-known shapes (T, B, the key bound max_blocks *
    block_size or max_seqlen_k, Nkv, N, H), reaches OVERLAP_MIN_GPU_US."""
    T, B = problem.num_tokens, problem.batch
    keys = problem.max_blocks * problem.block_size
    if problem.max_seqlen_k is not None:
        keys = min(keys, problem.max_seqlen_k)
    kv_tokens = B * keys
    if problem.total_kv_tokens is not None:
        kv_tokens = min(kv_tokens, problem.total_kv_tokens)
    kv_bytes = 4 * problem.kv_num_heads * problem.head_size * kv_tokens
    flops = 4 * problem.num_heads * problem.head_size * T * keys
    return max(kv_bytes / _EST_BYTES_PER_US, flops / _EST_FLOPS_PER_US) >= OVERLAP_MIN_GPU_US


@functools.lru_cache(maxsize=512)
def _plan(problem, sm, sm_count, num_splits):
    tile = problem_tile(problem, sm)
    name = variant_name(problem, sm)
    splits = plan_splits(problem, sm_count, sm) if num_splits is None else int(num_splits)
    if not 1 <= splits <= 65535:
        raise ValueError(f"num_splits must be in [1, 65535], got {num_splits}")
    T, B, N, Nkv, H, G = (problem.num_tokens, problem.batch, problem.num_heads,
                          problem.kv_num_heads, problem.head_size, problem.group)
    grid_x = (-(-T * G // tile.bm) + B) * Nkv  # (query tile, kv head) pairs, kv head fastest
    if grid_x >= 2 ** 31:
        raise ValueError(f"grid ({grid_x}, 1, {splits}) exceeds CUDA's limits")
    bs, shift, magic, magic_shift = block_divisor(problem.block_size)
    cap = problem.softcap if problem.softcap > 0 else 0.0
    scalars = FWD_SCALARS.pack(
        T, B, N, Nkv, H, G, bs, shift, magic, magic_shift, problem.num_blocks,
        problem.max_blocks, problem.scale * _LOG2E, problem.scale / cap if cap else 0.0,
        cap * _LOG2E, problem.window if problem.window > 0 else 0, splits)
    i32 = np.int32
    rows = T * N
    combine = _register_combine(problem.dtype)
    items = rows * H // 4
    combine_grid = (max(1, min(-(-items // _COMBINE_THREADS), 16 * sm_count)), 1, 1)
    return _Plan(name, combine, tile.smem_bytes, (grid_x, 1, splits), (tile.threads, 1, 1),
                 splits, scalars, combine_grid, (i32(rows), i32(H), i32(splits)), i32(B),
                 overlap_launches(problem))


_kernels: dict = {}  # (device id, name) -> cupy.RawKernel, dynamic shared memory raised
_last_plan: list = [None]  # [(key, plan)] of the last call: a decode loop repeats it
_launchers: dict = {}  # (device id, id(plan), programmatic) -> (plan, forward, combine or None)
_LAUNCHERS_MAX = 512


def launch_plan(problem, sm, device, num_splits=None):
    """The cached launch plan of ``problem`` on ``device`` (compute capability ``sm``): variant,
    grid, split count (``plan_splits`` unless ``num_splits`` forces one) and kernel scalars."""
    # problem_tile and _plan are in the key: tests and benchmarks/tile_sweep.py replace them
    key = (problem, sm, device, num_splits, problem_tile, _plan)
    last = _last_plan[0]  # one read of one (key, plan) tuple: safe across threads
    if last is not None and last[0][0] is problem and last[0][1:] == key[1:]:
        return last[1]
    plan = _plan(problem, int(sm), sm_count(device), num_splits)
    _last_plan[0] = (key, plan)
    return plan


def _kernel(device, name, smem):
    fn = _kernels.get((device, name))
    if fn is None:
        fn = get_function(name, device=device)
        if smem > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = smem
        _kernels[(device, name)] = fn
    return fn


def _direct_launches(device, plan, after_prologue):
    """(forward, combine or None) DirectLaunch of ``plan`` on ``device``, built once: their
    argument blocks already hold the plan's scalars; a call supplies the pointers. When the
    plan overlaps launches (``overlap_launches``), on sm90+, the combine, and the forward
    kernel when ``after_prologue``, start programmatically (cuda_src/common/pdl.cuh) behind
    the kernel launched just before them."""
    key = (device, id(plan), after_prologue)
    held = _launchers.get(key)
    if held is not None and held[0] is plan:
        return held[1], held[2]
    pdl = plan.overlap and programmatic_supported(device)
    fwd = DirectLaunch(_kernel(device, plan.fwd, plan.smem),
                       (POINTER,) * len(FWD_POINTERS) + (plan.scalars, POINTER),
                       plan.grid, plan.block, plan.smem, programmatic=pdl and after_prologue)
    combine = None
    if plan.splits > 1:
        combine = DirectLaunch(_kernel(device, plan.combine, 0),
                               (POINTER, POINTER, POINTER) + plan.combine_scalars
                               + (POINTER, plan.batch),
                               plan.combine_grid, (_COMBINE_THREADS, 1, 1), programmatic=pdl)
    if len(_launchers) >= _LAUNCHERS_MAX:
        _launchers.clear()
    _launchers[key] = (plan, fwd, combine)
    return fwd, combine


def launch_flash(problem, q, key_cache, value_cache, cum, past, block_table, out, sm,
                 num_splits=None, workspace=None, fault=None, after_prologue=False):
    """Attention of the (already rotated) q over the paged caches into out, on the current
    CuPy stream; no device->host synchronisation. Returns out.

    q, out: (T, N*H); key_cache, value_cache: (num_blocks, block_size, Nkv, H), already holding
    the new keys; cum (B+1,), past (B,), block_table (B, max_blocks): int32. All C-contiguous,
    16-bit (float16 / bfloat16, or their bits as uint16), 16-byte aligned. sm: compute
    capability (e.g. 90). num_splits: None = plan_splits, 1 = no split-KV, S = force S.
    workspace: None (allocated per call from CuPy's pool), or float32 (partial_o, partial_lse)
    of ``workspace_shape(problem, S)`` or larger, which a CUDA graph capture must keep alive
    (a per-call workspace goes back to the pool when the call returns).
    fault: None, or the metadata guard's int32 (B+1,) flags: CTAs of a faulted sequence (all,
    when fault[B] != 0) write nothing to out, and with split-KV poison their partial sums so
    the combine writes NaN rows (the guard has already written NaN there).
    after_prologue: the kernel launched just before on this stream is the call's prologue
    (``_prologue.run_prologue``), whose outputs the forward kernel may then wait for on the
    device instead of the host's launch order (programmatic launch, sm90+, when the plan
    overlaps launches).
    """
    if problem.num_tokens == 0 or problem.batch == 0:
        return out
    for arr in (q, key_cache, value_cache, out):
        if arr.dtype.itemsize != 2 or arr.data.ptr % 16:
            raise ValueError("flash: q, caches and out must be 16-bit arrays on 16-byte "
                             f"aligned addresses (got {arr.dtype} at {arr.data.ptr:#x})")
    device = q.data.device_id
    plan = launch_plan(problem, sm, device, num_splits)
    if plan.splits > 1:
        o_shape, lse_shape = workspace_shape(problem, plan.splits)
        if workspace is None:
            import cupy
            partial_o = cupy.empty(o_shape, dtype=cupy.float32)
            partial_lse = cupy.empty(lse_shape, dtype=cupy.float32)
        else:
            partial_o, partial_lse = workspace
            if (partial_o.dtype.itemsize != 4 or partial_o.size < math.prod(o_shape)
                    or partial_lse.size < math.prod(lse_shape)):
                raise ValueError(f"flash: workspace must be float32 of shapes {o_shape} and "
                                 f"{lse_shape} (see workspace_shape)")
    else:
        partial_o = partial_lse = out  # never dereferenced with num_splits == 1
    fwd, combine = _direct_launches(device, plan, after_prologue)
    q_p, o_p, f_p = q.data.ptr, out.data.ptr, pointer(fault)
    po_p, pl_p = partial_o.data.ptr, partial_lse.data.ptr
    fwd(q_p, key_cache.data.ptr, value_cache.data.ptr, cum.data.ptr, past.data.ptr,
        block_table.data.ptr, o_p, po_p, pl_p, f_p)
    if combine is not None:
        combine(po_p, pl_p, o_p, f_p)
    return out
