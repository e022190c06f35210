"""Time the flash backend on benchmark cases with each candidate tile (and split count), the
SDPA FLASH peer and the device copy bandwidth measured in the same process.

    python benchmarks/tile_sweep.py --case prefill_8x2048 --tile 128,32,4,2 128,64,4,2 \
        [--splits 0 2 4] [--block-size 16 256] [--peers flash cudnn] [--tables shuffled ordered]

A tile is BM,BN,WARPS,STAGES[,KEY_WARPS[,SWIZZLE]] (``cupy_paged.Tile``), run through the plan
option ``cupy_paged.PlanOptions(tile=..., num_splits=...)``; --splits 0 is the planner's choice.
Every timed output row is checked against float32 torch first. For choosing the heuristic in
``_flash_tiles.tile_for``; `benchmarks/run.py` gives the reported numbers.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):      # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import cases as C  # noqa: E402


def _tile(fk, case, spec, arch):
    """A Tile from "BM,BN,WARPS,STAGES[,KEY_WARPS[,SWIZZLE]]" (SWIZZLE 0 or 1)."""
    bm, bn, warps, stages, *rest = map(int, spec.split(","))
    return fk.Tile(fk.padded_head(case.head_size), bm, bn, warps, stages, arch,
                   key_warps=rest[0] if rest else 1, swizzle=len(rest) > 1 and bool(rest[1]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", dest="cases", nargs="+", required=True, choices=list(C.CASES))
    p.add_argument("--block-size", dest="block_sizes", nargs="+", type=int,
                   default=[C.DEFAULT_BLOCK_SIZE])
    p.add_argument("--tile", dest="tiles", nargs="+", default=[],
                   help="BM,BN,WARPS,STAGES[,KEY_WARPS[,SWIZZLE]]; none: the heuristic's tile only")
    p.add_argument("--splits", nargs="+", type=int, default=[0])
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--peers", nargs="+", default=["flash"], choices=("flash", "cudnn"),
                   help="SDPA backends timed on the dense equivalent")
    p.add_argument("--tables", nargs="+", default=["shuffled"], choices=("shuffled", "ordered"),
                   help="block tables: shuffled (a server's) and/or in order (dense-like)")
    p.add_argument("--json", default=None, help="write the records here")
    args = p.parse_args(argv)

    import torch

    from benchmarks import peers, timing
    from cupy_paged import PlanOptions
    from cupy_paged.backends import _flash_tiles as fk

    tkw = dict(timing.QUICK)
    copy = timing.copy_bandwidth(**tkw)
    copy_gbps = copy["bytes_per_s"] / 1e9
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s", flush=True)
    records = []
    for name in args.cases:
        for bs, table in itertools.product(args.block_sizes, args.tables):
            case = C.make_case(name, bs)
            meta = C.build_metadata(case, shuffle=table == "shuffled")
            n_sets = C.n_input_sets(case.min_bytes(), 50 << 20)
            sets = peers.make_sets(case, meta, n_sets)
            ref = peers.reference_rows(case, meta, sets[0], C.sample_rows(case))
            flops, nbytes = case.flops(), case.min_bytes()
            for peer in [] if args.no_peer else args.peers:
                impl = peers.build_sdpa(peer, case, meta, sets, False)
                t = timing.bench(impl.fn, len(sets), **tkw)["ms"]
                _report(records, name, bs, f"sdpa:{peer}", table, t, flops, nbytes, None)
                peers.drop_dense(sets)
            sm = torch.cuda.get_device_capability()
            arch = fk.arch_class(10 * sm[0] + sm[1])
            tiles = [None] + [_tile(fk, case, s, arch) for s in args.tiles]
            for tile in tiles:
                for splits in args.splits:
                    options = PlanOptions(tile=tile, num_splits=splits or None)
                    label = "heuristic" if tile is None else (
                        f"m{tile.bm}n{tile.bn}w{tile.warps}k{tile.key_warps}s{tile.stages}"
                        f"{'x' if tile.swizzle else ''}")
                    label += f" splits={splits or 'plan'} {table}"
                    try:
                        impl = peers.build_ours("flash", case, meta, sets, options)
                        out = impl.fn(0)
                        torch.cuda.synchronize()
                        chk = peers.check(impl, out, ref)
                        t = timing.bench(impl.fn, len(sets), **tkw)["ms"]
                    except Exception as exc:  # a tile that does not fit: say so, go on
                        print(f"{name} bs={bs} {label}: {type(exc).__name__}: {exc}"[:300])
                        continue
                    _report(records, name, bs, "ours:flash", label, t, flops, nbytes, chk)
    if args.json:
        Path(args.json).write_text(json.dumps({"copy_gbps": copy_gbps,
                                               "records": records}, indent=1))


def _report(records, case, bs, impl, label, ms, flops, nbytes, chk):
    rec = {"case": case, "block_size": bs, "impl": impl, "tile": label, "ms": ms,
           "tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}
    if chk is not None:
        rec["rel_err"], rec["ok"] = chk["rel_err"], chk["ok"]
    records.append(rec)
    ok = "" if chk is None else f"  err {chk['rel_err']:.1e}{'' if chk['ok'] else ' FAIL'}"
    print(f"{case:16s} bs={bs:<4d} {impl:11s} {label:28s} {ms:8.4f} ms "
          f"{rec['tflops']:7.1f} TFLOP/s {rec['gbps']:7.0f} GB/s{ok}", flush=True)


if __name__ == "__main__":
    main()
