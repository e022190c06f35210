"""Every sm90a tile that fits, against the policy's (``_flash90.tile_for``), forward kernel
alone (CUDA events): for each padded head, BN 64 / 128 x 2-4 stages (one Q tile where two do
not fit next to the rings), persistent, on sm90_heads.py's shapes (causal prefill 8 x 2048, one
16k prefill, 512-token chunks at past 3072; fp16, N 32, Nkv 8, block 16, shuffled table).
Prints ms, TFLOP/s and the policy tile's time over this tile's (> 1: this one is faster).

    python benchmarks/sm90_tiles.py [--heads 128 ...]     (compute capability 9.0 only)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from benchmarks.kernel_times import case, ms  # noqa: E402
from benchmarks.sm90_heads import CASES, causal_flops  # noqa: E402
from cupy_paged.backends import _flash90  # noqa: E402
from cupy_paged.backends import _flash_kernels as fk  # noqa: E402

SHAPES = [(128, 2), (128, 3), (128, 4), (64, 2), (64, 3), (64, 4)]  # (bn, stages)


def tiles(head):
    """The tiles of ``head`` that fit sm90's shared memory, the policy's first."""
    out = [_flash90.tile_for(head)]
    for bn, stages in SHAPES:
        try:
            t = _flash90.Tile90(head, bn, stages)
        except ValueError:
            continue
        if t not in out:
            out.append(t)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, nargs="+", default=list(_flash90.HEAD_SIZES))
    args = ap.parse_args()
    sm = int(cupy.cuda.Device().compute_capability)
    if sm != _flash90.SM:
        sys.exit(f"compute capability {sm // 10}.{sm % 10}: the sm90a kernel needs 9.0")
    print(f"{'case':22s} {'H':>4s} {'bn':>4s} {'st':>3s} {'Q':>2s} {'ms':>8s} {'TFLOP/s':>8s} "
          f"{'policy/this':>11s}")
    for name, (B, q, ctx) in CASES.items():
        for H in args.heads:
            p, a = case(B, q, ctx, H=H)
            device = a["query"].data.device_id
            run = (a["query"], a["key_cache"], a["value_cache"], a["cumulative_sequence_length"],
                   a["past_seqlens"], a["block_table"], a["out"])
            flops = causal_flops(B, q, ctx, 32, H)
            policy = None
            for tile in tiles(H):
                step = fk.ForwardStep(p, device, sm, tile, 1)
                t = ms(lambda: step.run(*run))
                policy = policy or t
                print(f"{name:22s} {H:4d} {tile.bn:4d} {tile.stages:3d} {tile.q_buffers:2d} "
                      f"{t:8.4f} {flops / t / 1e9:8.1f} {policy / t:11.3f}", flush=True)
            del a


if __name__ == "__main__":
    main()
