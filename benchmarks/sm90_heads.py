"""The sm90a flash kernel against the sm80 kernel, forward kernel alone (CUDA events), on the
shapes the policy chooses between them for: causal prefill of B sequences of q_len tokens (no
past) for each padded head size, a long single prefill, and 512-token chunks behind a 3072-token
past; fp16, N 32, Nkv 8, block 16, shuffled block table. One split (the sm90a kernel's only
mode). Prints one line per (case, head): milliseconds and TFLOP/s of each kernel, and the ratio
sm80 / sm90a (> 1: the sm90a kernel is faster); then the sm90a kernel with ping-pong consumers
(Tile90.pingpong) and with one CTA per work unit (Tile90(persistent=False); the default tile is
persistent), each with its ratio to the default sm90a tile (> 1: faster than the default).

    python benchmarks/sm90_heads.py          (compute capability 9.0 only)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from benchmarks.kernel_times import case, ms  # noqa: E402
from cupy_paged.backends import _flash90  # noqa: E402
from cupy_paged.backends import _flash_kernels as fk  # noqa: E402
from cupy_paged.backends import _flash_policy as policy  # noqa: E402

CASES = {"prefill_8x2048": (8, 2048, 2048), "prefill_1x16384": (1, 16384, 16384),
         "chunks_4x512_at_3072": (4, 512, 3584)}  # (B, q_len, past + q_len)
HEADS = (64, 96, 128, 192, 256)


def causal_flops(B, q_len, ctx, N, H):
    """4 N H x (visible keys summed over the new tokens): QK^T and PV, causal bottom-right."""
    past = ctx - q_len
    keys = B * (q_len * past + q_len * (q_len + 1) // 2)
    return 4 * N * H * keys


def main():
    sm = int(cupy.cuda.Device().compute_capability)
    if sm != _flash90.SM:
        sys.exit(f"compute capability {sm // 10}.{sm % 10}: the sm90a kernel needs 9.0")
    print(f"{'case':22s} {'H':>4s} {'sm90a ms':>9s} {'TFLOP/s':>8s} {'sm80 ms':>9s} "
          f"{'TFLOP/s':>8s} {'sm80/sm90a':>10s} {'pp ms':>8s} {'TFLOP/s':>8s} {'sm90a/pp':>8s} "
          f"{'unit ms':>8s} {'TFLOP/s':>8s} {'sm90a/unit':>10s}")
    for name, (B, q, ctx) in CASES.items():
        for H in HEADS:
            p, a = case(B, q, ctx, H=H)
            device = a["query"].data.device_id
            args = (a["query"], a["key_cache"], a["value_cache"],
                    a["cumulative_sequence_length"], a["past_seqlens"], a["block_table"],
                    a["out"])
            new = fk.ForwardStep(p, device, sm, _flash90.tile_for(H), 1)
            old = fk.ForwardStep(p, device, sm, policy.problem_tile(p, sm, sm90=False), 1)
            pp = fk.ForwardStep(p, device, sm, _flash90.tile_for(H, pingpong=True), 1)
            t_new, t_old = ms(lambda: new.run(*args)), ms(lambda: old.run(*args))
            unit = fk.ForwardStep(p, device, sm, _flash90.tile_for(H, persistent=False), 1)
            t_pp, t_unit = ms(lambda: pp.run(*args)), ms(lambda: unit.run(*args))
            flops = causal_flops(B, q, ctx, 32, H)
            print(f"{name:22s} {H:4d} {t_new:9.4f} {flops / t_new / 1e9:8.1f} {t_old:9.4f} "
                  f"{flops / t_old / 1e9:8.1f} {t_old / t_new:10.3f} {t_pp:8.4f} "
                  f"{flops / t_pp / 1e9:8.1f} {t_new / t_pp:8.3f} {t_unit:8.4f} "
                  f"{flops / t_unit / 1e9:8.1f} {t_new / t_unit:10.3f}", flush=True)
            del a


if __name__ == "__main__":
    main()
