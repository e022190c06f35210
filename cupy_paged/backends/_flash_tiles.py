"""Flash backend tiles: the instantiated head sizes, the ``Tile`` of one instantiation (rows,
keys, warps, stages, key split, shared-memory row layout), the heuristic that picks one per
head size, rows per sequence and tile class (``tile_for``), and the arch facts it needs. Pure Python; the kernel side is
``cuda_src/flash/traits.cuh`` and ``smem_layout.cuh``, which ``Tile.smem_bytes`` mirrors.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import _arch

# Instantiated (padded) head sizes; H % 8 == 0 pads up to the next one (32, 40 -> 64).
HEAD_SIZES = (64, 80, 96, 128, 160, 192, 256)
# Padded heads whose rows can be swizzled: whole 128-byte lines and a power-of-two chunk count.
SWIZZLE_HEADS = (64, 128, 256)
# Opt-in dynamic shared memory per block (bytes) of each tile class: the arch table's sm80 and
# sm86 entries (cuda_src/common/arch.cuh; flash/traits.cuh's kSmemSm80 / kSmemSm86).
SMEM_LIMIT = {"sm80": _arch.info(80).smem_per_block, "sm86": _arch.info(86).smem_per_block}


@dataclass(frozen=True)
class Tile:
    """One instantiation's tile: BM query rows x BN keys over a padded head, per tile class.
    key_warps > 1: groups of that many warps share rows and split each key tile (decode).
    swizzle: the tiles' shared-memory rows are XOR-swizzled instead of padded by 16 bytes
    (cuda_src/flash/smem_layout.cuh; needs head 64, 128 or 256)."""

    head: int
    bm: int
    bn: int
    warps: int
    stages: int
    arch: str  # "sm80" (163 KB shared memory per block) or "sm86" (99 KB)
    key_warps: int = 1
    swizzle: bool = False

    def __post_init__(self):
        if self.swizzle and self.head not in SWIZZLE_HEADS:
            raise ValueError(f"a swizzled tile needs head in {SWIZZLE_HEADS}, got {self.head}")

    @property
    def threads(self):
        return 32 * self.warps

    @property
    def mfrag(self):
        return self.bm // (16 * (self.warps // self.key_warps))

    @property
    def warp_keys(self):
        return self.bn // self.key_warps

    @property
    def smem_bytes(self):
        """Mirrors Traits::SMEM_BYTES: rows of Q plus STAGES K and V tiles, 2 bytes an element
        (padded rows: head + 8 elements; swizzled: head, plus STAGES + 1 slots of 8-byte key
        offsets, flash/kv_stages.cuh)."""
        row = self.head if self.swizzle else self.head + 8
        side = 8 * (self.stages + 1) * self.bn if self.swizzle else 0
        return (self.bm * row + 2 * self.stages * self.bn * row) * 2 + side


def arch_class(sm):
    """The tile class of compute capability ``sm`` (e.g. 90, sm80 or newer): "sm86" for parts
    whose shared memory per block is below the sm80 class's (~100 KB), else "sm80"."""
    entry = _arch.info(sm)
    small = entry is not None and entry.sm >= 80 and entry.smem_per_block < SMEM_LIMIT["sm80"]
    return "sm86" if small else "sm80"


def smem_per_sm(sm):
    """Shared memory per SM (bytes) of compute capability ``sm`` (100 KB when unknown)."""
    entry = _arch.info(sm)
    return 102400 if entry is None else entry.smem_per_sm


def padded_head(head_size):
    for h in HEAD_SIZES:
        if head_size <= h:
            return h
    raise ValueError(f"head_size {head_size} > {HEAD_SIZES[-1]}: the flash kernel is "
                     f"instantiated up to {HEAD_SIZES[-1]} channels")


def tile_for(head, rows_bound, arch):
    """Tile for padded head ``head`` when sequences have about ``rows_bound`` rows (q_len * G).

    Decode (rows_bound <= 16): one 16-row fragment whose four warps split each 64-key tile,
    so every warp multiplies keys rather than zero rows; 3 stages where two CTAs per SM still
    fit. Short chunks (<= 64 rows) and heads above 128: 4 warps of 16 rows. Prefill: 4 warps
    of 32 rows (each K/V fragment feeds two MMAs) on 64-key tiles up to head 128, 32 keys
    above (and for head 128 on ~100 KB parts, where 64 keys do not fit); 2 stages, one K/V
    tile in flight while one computes. Rows are swizzled wherever the head allows (64, 128,
    256): padded rows straddle L2 sectors on every other cp.async. Each choice was the fastest
    of the sweeps recorded in benchmarks/NOTES.md (sessions 2-5, H100 and H200). Any tile is
    correct for any q_len: speed only.
    """
    small = arch == "sm86"
    swizzle = head in SWIZZLE_HEADS
    if rows_bound <= 16:
        # Decode: one 16-row fragment whose warps split each key tile (16 keys a warp), so
        # every warp multiplies keys instead of zero rows; 64-key tiles, 3 stages where they
        # fit twice per SM; on ~100 KB parts above head 128, 2 warps on 32-key tiles.
        if small and head > 128:
            return Tile(head, 16, 32, 2, 2, arch, key_warps=2, swizzle=swizzle)
        return Tile(head, 16, 64, 4, 3 if head <= 128 and not small else 2, arch, key_warps=4,
                    swizzle=swizzle)
    if rows_bound <= 64 or head > 128:
        bn = 64 if head <= (128 if small else 192) else 32
        return Tile(head, 64, bn, 4, 2, arch, swizzle=swizzle)
    return Tile(head, 128, 64 if head <= (96 if small else 128) else 32, 4, 2, arch,
                swizzle=swizzle)


def all_tiles(arch):
    """Every tile the heuristic can pick in ``arch`` class, in a stable order."""
    tiles = []
    for head in HEAD_SIZES:
        for rows in (16, 64, 65):
            t = tile_for(head, rows, arch)
            if t not in tiles:
                tiles.append(t)
    return tiles
