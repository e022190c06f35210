"""The sm90a flash kernel's tiles and registration (``cuda_src/hopper/``): a warp-specialised
forward kernel (one producer warpgroup gathering K/V through the block table, two consumer
warpgroups on warpgroup MMAs) that runs on compute capability 9.0 exactly (H100, H200), for one
key split. Pure Python; ``Tile90.smem_bytes`` mirrors ``cuda_src/hopper/traits.cuh``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from ..jit import KernelSpec, register
from ._launch import DTYPES
from ._params import entry_point

# Padded heads of the sm90a kernel: a head of H % 8 == 0 channels runs the next one up.
HEAD_SIZES = (64, 96, 128, 192, 256)
SM = 90
SMEM_LIMIT = 232448  # cuda_src/common/arch.cuh: sm90's opt-in shared memory per block
PRODUCER_THREADS, CONSUMERS = 128, 2


@dataclass(frozen=True)
class Tile90:
    """One sm90a instantiation: 128 query rows (two consumer warpgroups of 64) x ``bn`` keys
    over padded head ``head``, K and V in rings of ``stages`` tiles; pingpong: the consumer
    warpgroups take turns at the tensor cores; persistent (the default): one CTA per SM walks
    the work units a launch counter hands out, the next unit's loads under the current one's
    end; False: one CTA per unit."""

    head: int
    bn: int
    stages: int
    pingpong: bool = False
    persistent: bool = True
    arch: str = "sm90a"
    bm: int = 128

    def __post_init__(self):
        if self.head not in HEAD_SIZES:
            raise ValueError(f"Tile90: head must be one of {HEAD_SIZES}, got {self.head}")
        if self.bn not in (64, 128):
            raise ValueError(f"Tile90: bn must be 64 or 128, got {self.bn}")
        if self.stages < 2:
            raise ValueError(f"Tile90: stages must be >= 2, got {self.stages}")
        if self.smem_bytes > SMEM_LIMIT:
            raise ValueError(f"Tile90{(self.head, self.bn, self.stages)}: {self.smem_bytes} "
                             f"bytes of shared memory > sm90's {SMEM_LIMIT}")

    @property
    def threads(self):
        return PRODUCER_THREADS * (1 + CONSUMERS)

    @property
    def warps(self):
        return self.threads // 32

    @property
    def smem_bytes(self):
        """Mirrors Traits90::SMEM_BYTES (``_bytes`` with ``q_buffers`` Q tiles)."""
        return self._bytes(self.q_buffers)

    @property
    def q_buffers(self):
        """Q tiles (Traits90::Q_BUFS): 2 for a persistent tile where they fit (the next unit's Q
        loads while this one computes), else 1."""
        return 2 if self.persistent and self._bytes(2) <= SMEM_LIMIT else 1

    def _bytes(self, q_buffers):
        """Shared memory with ``q_buffers`` Q tiles: those, STAGES K and V tiles of 128-byte
        panels, each stage's 4-byte key rows, the hole flags (16-byte rounded), a persistent
        tile's two 64-byte unit slots, the mbarriers (2 per Q tile, 4 per stage, 4 persistent)."""
        panels = -(-self.head // 64)
        q, kv = self.bm * panels * 128, self.bn * panels * 128
        holes = 16 * -(-(self.stages * 4) // 16)
        units = 2 * 64 if self.persistent else 0
        bars = 2 * q_buffers + 4 * self.stages + (4 if self.persistent else 0)
        return q_buffers * q + 2 * self.stages * kv + self.stages * self.bn * 4 + holes \
            + units + 8 * bars


def padded_head(head_size):
    """The sm90a kernel's padded head for ``head_size``, or None above 256."""
    return next((h for h in HEAD_SIZES if head_size <= h), None)


def tile_for(head, pingpong=False, persistent=True):
    """The tile of padded head ``head``: 128-key tiles up to head 128 (2 stages; 3 for head
    64, where they fit), 64 above (the P V accumulators of 192 / 256 channels and the S tile
    must share a consumer thread's 224 registers). pingpong, persistent: Tile90's."""
    if head <= 64:
        return Tile90(head, 128, 3, pingpong, persistent)
    if head <= 128:
        return Tile90(head, 128, 2, pingpong, persistent)
    return Tile90(head, 64, 2, pingpong, persistent)


def all_tiles(pingpong=False, persistent=True):
    return [tile_for(h, pingpong, persistent) for h in HEAD_SIZES]


def fwd_name(dtype, tile):
    """e.g. flash90_fwd_f16_h128_n128_s2_sm90a (persistent; _pp: ping-pong consumers; _unit:
    one CTA per work unit)."""
    flags = ("_pp" if tile.pingpong else "") + ("" if tile.persistent else "_unit")
    return (f"flash90_fwd_{DTYPES[dtype].short}_h{tile.head}_n{tile.bn}_s{tile.stages}{flags}_"
            f"{tile.arch}")


@functools.cache
def register_fwd(dtype, tile, fwd_params):
    """Registers the instantiation of ``tile`` for ``dtype`` (its FwdParams struct: the
    sm80 kernel's, ``fwd_params``); returns its name."""
    name, ctype = fwd_name(dtype, tile), DTYPES[dtype].ctype
    flag = {True: "true", False: "false"}
    traits = (f"cupy_paged::hopper::Traits90<{ctype}, {tile.head}, {tile.bn}, {tile.stages}, "
              f"{flag[tile.pingpong]}, {flag[tile.persistent]}>")
    # the launch's dynamic shared memory is Tile90.smem_bytes: the build checks it is the
    # kernel's own count
    check = (f"static_assert({traits}::SMEM_BYTES == {tile.smem_bytes}, \"Tile90.smem_bytes "
             f"must mirror Traits90::SMEM_BYTES\");\n")
    entry = check + entry_point(name, fwd_params, f"cupy_paged::hopper::fwd90<{traits}>(p);",
                                tile.threads, min_blocks=1)
    register(KernelSpec(name, "hopper/flash90.cu", entry, archs=(SM,), arch_features="a"))
    return name
