"""Run one benchmark case through one of our backends a few times, for a profiler to attach.

    CUPY_PAGED_LINEINFO=1 ncu --clock-control none -k regex:flash_fwd --launch-skip 2 \
        --launch-count 1 --set full -o prefill python benchmarks/profile_case.py \
        --case prefill_8x2048 --backend flash

Times nothing itself: the calls are those ``benchmarks/run.py`` times (``peers.build_ours``,
or ``peers.build_mea_attention_only`` for ``--backend mea-attn``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):      # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import cases as C  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", required=True, choices=list(C.CASES))
    p.add_argument("--block-size", type=int, default=C.DEFAULT_BLOCK_SIZE)
    p.add_argument("--backend", default="flash", choices=("flash", "mea", "mea-attn"))
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from benchmarks import peers

    case = C.make_case(args.case, args.block_size)
    meta = C.build_metadata(case)
    sets = peers.make_sets(case, meta, 1)
    build = (peers.build_mea_attention_only if args.backend == "mea-attn"
             else lambda c, m, s: peers.build_ours(args.backend, c, m, s))
    impl = build(case, meta, sets)
    for _ in range(args.calls):
        impl.fn(0)
    torch.cuda.synchronize()
    print(f"{args.case} bs={args.block_size} {impl.name}: {args.calls} calls done")


if __name__ == "__main__":
    main()
