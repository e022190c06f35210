"""What each SM generation offers the kernels, read from ``cuda_src/common/arch.cuh`` (the one
description; the kernels use the same table at compile time): shared memory per block (opt-in)
and per SM, cp.async, the fp16 mma.sync shape."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_ENTRY = re.compile(r"^\s*\{(\d+), (\d+), (\d+), (true|false), (\d+), (\d+), (\d+)\},"
                    r"\s*// sm(\d+)\s*$")


@dataclass(frozen=True)
class ArchInfo:
    """One SM generation: sm (e.g. 90), smem_per_block (opt-in dynamic shared memory, bytes),
    smem_per_sm (bytes), cp_async, mma (m, n, k of the fp16 mma.sync; (0, 0, 0): none)."""

    sm: int
    smem_per_block: int
    smem_per_sm: int
    cp_async: bool
    mma: tuple


@functools.cache
def table():
    """{sm: ArchInfo} of every entry of common/arch.cuh."""
    from ..jit.toolchain import source_dir

    rows = {}
    for line in (source_dir() / "common" / "arch.cuh").read_text().splitlines():
        m = _ENTRY.match(line)
        if m:
            sm, per_block, per_sm, cp_async, mm, mn, mk, tag = m.groups()
            if sm != tag:
                raise ValueError(f"common/arch.cuh: the entry of sm{sm} is tagged sm{tag}")
            rows[int(sm)] = ArchInfo(int(sm), int(per_block), int(per_sm), cp_async == "true",
                                     (int(mm), int(mn), int(mk)))
    if not rows:
        raise ValueError("common/arch.cuh: no arch table entries found")
    return rows


def info(sm):
    """The ArchInfo of compute capability ``sm`` (an int such as 90), or None if unknown."""
    return table().get(int(sm))
