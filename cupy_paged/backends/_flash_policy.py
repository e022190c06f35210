"""Flash backend policy from host-known shapes: the tile a call runs (``problem_tile``), its
key splits (``plan_splits``), both at once (``choose``), and whether its kernels launch
programmatically (``overlap_launches``). Pure Python: nothing here touches the GPU.
"""
from __future__ import annotations

import os

from . import _flash90
from ._flash_tiles import arch_class, padded_head, smem_per_sm, tile_for

# The sm90a kernel (cupy_paged/backends/_flash90.py) runs prefill-shaped work on compute
# capability 9.0 unless CUPY_PAGED_SM90=0 (then every call runs the sm80 kernel, e.g. to
# compare the two in one process).
SM90_ENABLED = os.environ.get("CUPY_PAGED_SM90", "1") != "0"

_MAX_SPLITS = 64
_MAX_WORKSPACE_BYTES = 256 << 20


def _rows_bound(problem):
    """G times the caller's max_seqlen_q, else times the mean q_len (T / B): without a hint a
    decode batch (T = B) must not get the prefill tile."""
    T, B = problem.num_tokens, max(problem.batch, 1)
    q = min(T, problem.max_seqlen_q) if problem.max_seqlen_q is not None else -(-T // B)
    return problem.group * max(q, 1)


def problem_tile(problem, sm, sm90=None):
    """The tile for ``problem`` on compute capability ``sm``: on 9.0, for rows per sequence
    above 64 (prefill chunks; decode and short chunks keep the sm80 decode tiles), the sm90a
    kernel's (``_flash90.tile_for``); else ``tile_for``'s. sm90: None = ``SM90_ENABLED``."""
    rows = _rows_bound(problem)
    if sm == _flash90.SM and rows > 64 and (SM90_ENABLED if sm90 is None else sm90) \
            and problem.num_blocks * problem.block_size < 2 ** 31:  # int32 cache rows
        head = _flash90.padded_head(problem.head_size)
        if head is not None:
            return _flash90.tile_for(head)
    return tile_for(padded_head(problem.head_size), rows, arch_class(sm))


KERNELS = ("sm80", "sm90a")


def choose(problem, sm, sm_count, tile=None, num_splits=None, kernel=None):
    """(tile, key splits) of ``problem``: the given ones, else ``problem_tile`` and
    ``plan_splits``. kernel: None (the policy's), "sm80" or "sm90a": that family's tile. The
    sm90a kernel runs one split: where the planner wants more, the sm80 tile runs instead
    (and a forced sm90a tile or kernel with num_splits > 1 is a ValueError)."""
    if kernel is not None:
        if kernel not in KERNELS:
            raise ValueError(f"options.kernel: expected one of {', '.join(KERNELS)} or None, "
                             f"got {kernel!r}")
        if tile is not None and isinstance(tile, _flash90.Tile90) != (kernel == "sm90a"):
            raise ValueError(f"options.kernel={kernel!r} and options.tile={tile} name "
                             f"different kernel families")
        if kernel == "sm90a" and tile is None:
            head = _flash90.padded_head(problem.head_size)
            if sm != _flash90.SM or head is None:
                raise ValueError(f"options.kernel='sm90a' runs on compute capability 9.0 "
                                 f"with head_size <= 256 (this GPU is {sm // 10}.{sm % 10}, "
                                 f"head_size {problem.head_size})")
            tile = _flash90.tile_for(head)
        elif kernel == "sm80" and tile is None:
            tile = problem_tile(problem, sm, sm90=False)
    forced = tile is not None
    tile = problem_tile(problem, sm) if tile is None else tile
    if isinstance(tile, _flash90.Tile90) and sm != _flash90.SM:
        raise ValueError(f"tile {tile}: the sm90a kernel runs on compute capability 9.0 only "
                         f"(this GPU is {sm // 10}.{sm % 10})")
    splits = plan_splits(problem, sm_count, sm, tile) if num_splits is None else int(num_splits)
    if isinstance(tile, _flash90.Tile90) and splits > 1:
        if forced:
            raise ValueError(f"tile {tile}: the sm90a kernel runs one key split, got "
                             f"num_splits={splits}")
        tile = problem_tile(problem, sm, sm90=False)
        splits = plan_splits(problem, sm_count, sm, tile) if num_splits is None \
            else int(num_splits)
    return tile, splits


def ctas_per_sm(tile, sm):
    """Resident CTAs per SM: shared memory (1 KB reserved per CTA) and an estimate of
    registers (accumulators + scores + ~64), capped by 64 warps per SM. sm90a tiles: one
    (their 384 threads take the register file)."""
    if isinstance(tile, _flash90.Tile90):
        return 1
    by_smem = smem_per_sm(sm) // (tile.smem_bytes + 1024)
    regs = min(255, 64 + tile.mfrag * (tile.head // 2 + tile.warp_keys // 2))
    by_regs = 65536 // (tile.threads * regs)
    return max(1, min(by_smem, by_regs, 64 // tile.warps, 32))


def _work_tiles(problem, bm):
    """CTAs that do work per kv head, sum over b of ceil(q_len_b G / BM): bounded by T and
    max_seqlen_q, estimated from the mean q_len (T / B) when there is no hint."""
    T, B, G = problem.num_tokens, problem.batch, problem.group
    q = min(T, problem.max_seqlen_q) if problem.max_seqlen_q is not None else -(-T // B)
    return min(B * -(-G * q // bm), -(-T * G // bm) + min(B, T) - 1)


def plan_splits(problem, sm_count, sm=80, tile=None):
    """Key splits per work unit, from host-known shapes only (T, B, Nkv, the key bound
    max_seqlen_k or max_blocks * block_size, SM count): 1 when the units fill the GPU, else
    the smallest count whose last wave is >= 85% as full as the best one (FlashAttention-2's
    rule, with the resident CTAs per SM counted), each split keeping >= 2 key tiles.
    tile: the tile the call runs (None: ``problem_tile``'s)."""
    if problem.num_tokens == 0:
        return 1
    tile = problem_tile(problem, sm) if tile is None else tile
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


# Programmatic launches (cuda_src/common/pdl.cuh) save a few microseconds of GPU time at each
# kernel boundary but cost host time per call (benchmarks/NOTES.md, session 5): used only for
# calls whose GPU time clearly exceeds the host's. CUPY_PAGED_OVERLAP_MIN_US overrides the
# threshold (0: every call).
def _overlap_threshold(text):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"CUPY_PAGED_OVERLAP_MIN_US must be a number of microseconds, "
                         f"got {text!r}") from None


OVERLAP_MIN_GPU_US = _overlap_threshold(os.environ.get("CUPY_PAGED_OVERLAP_MIN_US", "50"))
_EST_BYTES_PER_US = 3.0e6   # ~H100 HBM3 (bytes per microsecond)
_EST_FLOPS_PER_US = 3.0e8   # ~mma.sync fp16 on an H100 (FLOPs per microsecond)


def overlap_launches(problem, threshold_us=None):
    """Whether the call's kernels should start programmatically behind one another: when an
    upper bound of its GPU time, from host-known shapes (T, B, the key bound max_blocks *
    block_size or max_seqlen_k, Nkv, N, H), reaches ``threshold_us`` (None:
    OVERLAP_MIN_GPU_US)."""
    T, B = problem.num_tokens, problem.batch
    keys = problem.max_blocks * problem.block_size
    if problem.max_seqlen_k is not None:
        keys = min(keys, problem.max_seqlen_k)
    kv_tokens = B * keys
    if problem.total_kv_tokens is not None:
        kv_tokens = min(kv_tokens, problem.total_kv_tokens)
    kv_bytes = 4 * problem.kv_num_heads * problem.head_size * kv_tokens
    flops = 4 * problem.num_heads * problem.head_size * T * keys
    limit = OVERLAP_MIN_GPU_US if threshold_us is None else threshold_us
    return max(kv_bytes / _EST_BYTES_PER_US, flops / _EST_FLOPS_PER_US) >= limit
