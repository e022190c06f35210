"""Run one benchmark case through one of our backends a few times, for a profiler to attach.

    CUPY_PAGED_LINEINFO=1 ncu --clock-control none -k regex:flash_fwd --launch-skip 2 \
        --launch-count 1 --set full -o prefill python benchmarks/profile_case.py \
        --case prefill_8x2048 --backend flash

Times nothing itself: the calls are those ``benchmarks/run.py`` times (``peers.build_ours``,
``peers.build_mea_attention_only`` for ``--backend mea-attn``, and torch SDPA on the dense
equivalent for ``--backend sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn``, so one ncu
session can profile our kernel and the peer's on the same case). ``benchmarks/sass_profile.py``
summarises a report's per-instruction counters (``ncu -i REPORT --page source --csv
--print-source sass``).
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
    p.add_argument("--backend", default="flash",
                   choices=("flash", "mea", "mea-attn", "sdpa-flash", "sdpa-efficient",
                            "sdpa-cudnn"))
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from benchmarks import peers

    case = C.make_case(args.case, args.block_size)
    meta = C.build_metadata(case)
    sets = peers.make_sets(case, meta, 1)
    if args.backend == "mea-attn":
        build = peers.build_mea_attention_only
    elif args.backend.startswith("sdpa-"):
        build = lambda c, m, s: peers.build_sdpa(args.backend[5:], c, m, s, False)  # noqa: E731
    else:
        build = lambda c, m, s: peers.build_ours(args.backend, c, m, s)  # noqa: E731
    impl = build(case, meta, sets)
    for _ in range(args.calls):
        impl.fn(0)
    torch.cuda.synchronize()
    print(f"{args.case} bs={args.block_size} {impl.name}: {args.calls} calls done")


if __name__ == "__main__":
    main()
