"""Benchmark cupy_paged's GPU backends against torch and paged peers, same data, same process.

    python -m cupy_paged bench [--case NAME ...] [--block-size 16 ...] [--backends flash,mea]
                               [--peers sdpa-flash,sdpa-efficient,sdpa-cudnn,flex,
                                        flashinfer-fa2,flashinfer-fa3,flashinfer-decode,
                                        flashinfer-decode-tc,cudnn-paged]
                               [--out DIR] [--quick] [--time-budget S] [--sinks] [--list]

(``python benchmarks/run.py`` in a source checkout runs this same module.)

Per case (cases.py) it prints FLOPs and minimum bytes beside their formulas and the floors
(bytes / measured copy bandwidth, FLOPs / measured fp16 matrix-product rate), times our
backends (a backend that refuses records its UnsupportedError text instead of a time) and the
peers (peers.py), checks a few output rows of each against a float32 recomputation, and writes
<out>/<card-slug>.json (every number) and <card-slug>.md (the Markdown table). The table comes
last. Our backends and the peers run on one CUDA stream: a torch stream that CuPy
uses through cupy.cuda.ExternalStream, timed with torch CUDA events (timing.py).

Order: every case's ours + SDPA rows first, then FlexAttention (compiles) while the time budget
lasts (--quick: 200 s unless --time-budget says otherwise); the JSON is rewritten after every
case, so a run cut short still leaves its numbers.

--sinks adds the row ours:flash+sink (the same call with a head_sink of N logits, checked
against a sink reference) beside ours:flash, so a run measures what sinks cost.

--out defaults to benchmarks/results when this package sits in a source checkout (beside
pyproject.toml and benchmarks/run.py), and to ./bench-results in the current directory when it
is installed (a wheel has no benchmarks/ folder).

--list prints the cases and their two numbers and needs neither torch nor a GPU.

Paged peers (peers_paged.py), on our paged caches in place: flashinfer-fa2 / flashinfer-fa3
(BatchPrefillWithPagedKVCacheWrapper, prefill and mixed cases; fa3 also on the decodes),
flashinfer-decode / flashinfer-decode-tc (BatchDecodeWithPagedKVCacheWrapper,
use_tensor_cores False / True; decode cases) and cudnn-paged (cudnn-frontend sdpa with page
tables). They are in the --peers default when their package is importable; named explicitly
without it, they give 'unsupported' rows. They run after the SDPA rows and before ours.
FlashInfer JIT-compiles its kernels (~90 s for all four kinds): a background thread starts
that at the beginning of the run (a tiny plan + run per wrapper kind), so the compile overlaps
the copy/matmul measurements and the SDPA rows; the FlashInfer builders wait for it. On the
GPU machine, with the trimmed packages of the checkout's .peers/site (carry .peers):

    export PYTHONPATH=$PWD/.peers/site:$PYTHONPATH
    export FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=14 FLASHINFER_NVCC_THREADS=1 \
           FLASHINFER_WORKSPACE_BASE=/tmp/fi_ws
    python -m cupy_paged bench --quick
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
import traceback
from pathlib import Path

from . import cases as C
from . import report
from .rows import PHASES, impl_specs, measure, progress, start_flashinfer_warmup

# the names run.main's helpers had before they moved to rows.py (tests and scripts use them)
_impl_specs, _measure, _progress = impl_specs, measure, progress
_start_flashinfer_warmup = start_flashinfer_warmup

INSTALLED_OUT = "bench-results"   # relative: the current directory at write time


def default_out(root=None):
    """The --out default: <root>/benchmarks/results for a source checkout, else INSTALLED_OUT.

    ``root`` is the folder holding the ``cupy_paged`` package (default: this one's). It counts
    as a checkout when it has pyproject.toml and benchmarks/run.py, so an installed package
    (site-packages has neither) never writes beside itself.
    """
    root = Path(__file__).resolve().parents[2] if root is None else Path(root)
    if (root / "pyproject.toml").is_file() and (root / "benchmarks" / "run.py").is_file():
        return str(root / "benchmarks" / "results")
    return INSTALLED_OUT


DEFAULT_OUT = default_out()
TORCH_PEERS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex")
PAGED_PEERS = {"flashinfer-fa2": "flashinfer", "flashinfer-fa3": "flashinfer",
               "flashinfer-decode": "flashinfer", "flashinfer-decode-tc": "flashinfer",
               "cudnn-paged": "cudnn"}          # peer -> the package it needs
ALL_PEERS = TORCH_PEERS + tuple(PAGED_PEERS)


def default_peers():
    """The --peers default: the torch peers, plus each paged peer whose package is found
    (importlib.util.find_spec: nothing is imported)."""
    import importlib.util

    def found(pkg):
        try:
            return importlib.util.find_spec(pkg) is not None
        except (ImportError, ValueError):
            return False
    return TORCH_PEERS + tuple(p for p, pkg in PAGED_PEERS.items() if found(pkg))
# mea-attn: mea's attention kernel alone; flash-sm80: flash with its sm80 kernel family forced
# (on 9.0 the policy runs the sm90a kernel for prefill-shaped cases: the two side by side)
OUR_BACKENDS = ("flash", "flash-sm80", "mea", "mea-attn")
QUICK_BUDGET_S = 200.0
H100_FP16_DENSE = 800e12     # fallback when the matrix product is not measured


def parse_args(argv=None, prog="benchmarks/run.py"):
    """The command line as a Namespace; lists are split and checked (argparse exits on error)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", dest="cases", action="extend", nargs="+", choices=list(C.CASES),
                   metavar="NAME", help=f"cases to run (default all: {', '.join(C.CASES)})")
    p.add_argument("--block-size", dest="block_sizes", action="extend", nargs="+", type=int,
                   metavar="N", help="block sizes (default 16; prefill_8x2048 also 256)")
    p.add_argument("--backends", default="flash,mea",
                   help="our backends, comma-separated (default flash,mea)")
    p.add_argument("--peers", default=",".join(default_peers()),
                   help=f"peers, comma-separated from {','.join(ALL_PEERS)}; '' for none "
                        "(default: the torch peers and the paged peers whose package is "
                        "importable: %(default)s)")
    p.add_argument("--no-gather-timed", action="store_true",
                   help="skip the SDPA rows that time the paged->dense gather")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="folder for <card>.json and <card>.md (default %(default)s: "
                        "benchmarks/results in a source checkout, ./bench-results in the "
                        "current directory when installed)")
    p.add_argument("--quick", action="store_true",
                   help="fewer timed runs, and a 200 s budget for starting new peers")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new peer is started (rows say 'skipped')")
    p.add_argument("--no-check", action="store_true", help="skip the output-row check")
    p.add_argument("--sinks", action="store_true",
                   help="also time flash with a head_sink (row ours:flash+sink), to measure "
                        "what sinks cost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="also draw the results as a bar chart (matplotlib) into PATH")
    p.add_argument("--list", action="store_true",
                   help="print the cases with their FLOPs and bytes; no GPU needed")
    args = p.parse_args(argv)
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in args.backends if b not in OUR_BACKENDS]
    if unknown:
        p.error(f"--backends: expected some of {', '.join(OUR_BACKENDS)}, got {unknown} "
                "(mea also adds mea-attn, its attention kernel timed alone)")
    args.peers = [x for x in args.peers.split(",") if x]
    bad = [x for x in args.peers if x not in ALL_PEERS]
    if bad:
        p.error(f"unknown peer(s) {bad}; known: {', '.join(ALL_PEERS)}")
    if args.time_budget is None and args.quick:
        args.time_budget = QUICK_BUDGET_S
    return args


def describe_cases(case_list):
    """The per-case formula block (also printed by --list)."""
    lines = [f"FLOPs     = {C.FLOPS_FORMULA}   (causal counted once)",
             f"min bytes = {C.BYTES_FORMULA}   (K/V read once per kv head + Q + out + new K/V"
             + " written)"]
    for c in case_list:
        lines.append(f"{c.label}: B={c.batch} T={c.num_tokens} N={c.num_heads} "
                     f"Nkv={c.kv_num_heads} H={c.head_size} {c.dtype} blocks={c.num_blocks}")
        lines.append(f"    FLOPs = {c.flops_formula()}")
        lines.append(f"    bytes = {c.bytes_formula()}")
    return "\n".join(lines)


def _log(*a):
    print(*a, flush=True)


def main(argv=None, prog="benchmarks/run.py"):
    """Run the harness on ``argv`` (None: sys.argv[1:]); ``prog`` names it in --help."""
    args = parse_args(argv, prog)
    case_list = C.plan(args.cases, args.block_sizes)
    if args.list:
        _log(describe_cases(case_list))
        return 0
    return run(args, case_list)


# --- the GPU run ---------------------------------------------------------------------------
def _environment(torch, cupy):
    import cupy_paged
    props = torch.cuda.get_device_properties(0)
    env = {
        "card": props.name, "slug": report.slug(props.name),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sm": f"{props.major}{props.minor}", "multiprocessors": props.multi_processor_count,
        "l2_bytes": int(getattr(props, "L2_cache_size", 50 * 2 ** 20)),
        "memory_bytes": int(props.total_memory),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": _try(torch.backends.cudnn.version), "cupy": cupy.__version__,
        "cupy_paged": cupy_paged.__version__, "python": sys.version.split()[0],
    }
    env["cuda_driver"] = _try(cupy.cuda.runtime.driverGetVersion)
    env["triton"] = _try(lambda: __import__("triton").__version__)
    return env


def _cupy_stream(cupy, torch_stream):
    """A CuPy stream object on torch_stream's CUDA stream (same pointer, not a copy)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            try:
                return from_external(torch_stream)
            except Exception:
                pass
        return cupy.cuda.ExternalStream(int(torch_stream.cuda_stream))


def _try(f):
    """f() or None when it raises (optional facts about the machine)."""
    try:
        return f()
    except Exception:
        return None


def run(args, case_list):
    """The GPU run: time every case's rows and write the JSON and Markdown; an exit code."""
    t_start = time.time()
    try:
        import torch
    except ImportError as exc:
        _log(f"torch is needed for the GPU run ({exc}); --list works without it")
        return 2
    if not torch.cuda.is_available():
        _log("no CUDA GPU visible to torch; --list works without one")
        return 2
    import cupy

    from . import peers, timing
    from cupy_paged import UnsupportedError

    tkw = dict(timing.QUICK if args.quick else timing.FULL)
    env = _environment(torch, cupy)
    deadline = t_start + args.time_budget if args.time_budget else None
    doc = dict(env, argv=sys.argv[1:], quick=bool(args.quick), timing=tkw,
               method={
                   "timing": "CUDA events around each call on one torch stream shared with "
                             "CuPy (ExternalStream); warm-up first; median of the runs; each "
                             "timed chunk queued behind torch.cuda._sleep so host launch pace "
                             "does not enter the events",
                   "rates": "TFLOP/s and GB/s use the case's FLOPs and minimum bytes for "
                            "every row",
                   "ratio": "peer rows: ms(fastest of ours) / ms(peer)",
                   "vs_fastest": "our rows: ms(ours) / ms(fastest peer row of the same case "
                                 "and block size, +gather rows included); fastest_peer "
                                 "names it",
                   "ours": "paged_attention(..., backend=b, out=preallocated); includes the "
                           "prologue (new K/V written to the caches); no rotary",
                   "inputs": "random fp16 (never zeros); block tables a random permutation "
                             "of exactly the needed blocks; input sets rotated when one set "
                             "is under 2x L2",
               }, formulas={"flops": C.FLOPS_FORMULA, "bytes": C.BYTES_FORMULA},
               cases=[], results=[])

    def save():
        case_nums = {(c["name"], c["block_size"]): c for c in doc["cases"]}
        report.finalize(doc["results"], case_nums)
        doc["markdown"] = report.markdown_table(
            doc["results"], title=f"{env['card']}, {env['date'][:10]}, torch {env['torch']}, "
                                  f"copy {doc.get('copy_gbps', 0):.0f} GB/s")
        return report.write(doc, args.out)

    stream = torch.cuda.Stream()
    cp_stream = _cupy_stream(cupy, stream)
    doc["stream"] = {"torch": int(stream.cuda_stream), "cupy": int(cp_stream.ptr),
                     "shared": int(stream.cuda_stream) == int(cp_stream.ptr)}
    with torch.cuda.stream(stream), cp_stream:
        _log(f"{env['card']} (sm{env['sm']}, L2 {env['l2_bytes'] / 2**20:.0f} MiB); torch "
             f"{env['torch']}, cupy {env['cupy']}, cupy_paged {env['cupy_paged']}; one stream "
             f"shared by torch and CuPy: {doc['stream']['shared']}")
        _start_flashinfer_warmup(args, case_list)
        copy = timing.copy_bandwidth(**tkw)
        mm = timing.matmul_rate(**tkw)
        doc["copy"], doc["matmul"] = copy, mm
        doc["copy_gbps"] = copy["bytes_per_s"] / 1e9
        doc["matmul_tflops"] = mm["flops_per_s"] / 1e12
        _log(f"device copy {doc['copy_gbps']:.0f} GB/s (read + written, "
             f"{copy['nbytes'] >> 20} MiB); fp16 {mm['n']}^3 matmul "
             f"{doc['matmul_tflops']:.0f} TFLOP/s")
        _log(describe_cases(case_list))
        for c in case_list:
            d = c.describe()
            d["mem_floor_ms"], d["compute_floor_ms"], d["floor_ms"] = c.floors_ms(
                copy["bytes_per_s"], mm["flops_per_s"] or H100_FP16_DENSE)
            d["n_input_sets"] = C.n_input_sets(c.min_bytes(), env["l2_bytes"])
            doc["cases"].append(d)
        _log(report.floors_table(doc["cases"]))

        wanted = {"SDPA": any(x.startswith("sdpa") for x in args.peers),
                  "paged": any(x in PAGED_PEERS for x in args.peers),
                  "ours": bool(args.backends), "FlexAttention": "flex" in args.peers}
        for phase in PHASES:
            if not wanted[phase]:
                continue
            for c, d in zip(case_list, doc["cases"]):
                sets = specs = None
                try:
                    if phase == "FlexAttention" and deadline and time.time() > deadline:
                        rec = {"case": c.name, "block_size": c.block_size,
                               "impl": "flex:paged", "kind": "peer", "status": "skipped",
                               "reason": f"time budget ({args.time_budget:.0f} s) spent"}
                        doc["results"].append(rec)
                        _log(f"{c.label}:\n" + _progress(rec))
                        continue
                    meta = C.build_metadata(c, seed=args.seed)
                    sets = peers.make_sets(c, meta, d["n_input_sets"], seed=args.seed)
                    specs = _impl_specs(args, c, meta, sets, peers)[phase]
                    _log(f"{c.label} ({phase}, {d['n_input_sets']} input set(s)):")
                    ref = (None if args.no_check else
                           peers.reference_rows(c, meta, sets[0], C.sample_rows(c)))
                    for name, kind, build in specs:
                        if deadline and time.time() > deadline and kind == "peer":
                            rec = {"case": c.name, "block_size": c.block_size, "impl": name,
                                   "kind": kind, "status": "skipped",
                                   "reason": f"time budget ({args.time_budget:.0f} s) spent"}
                        else:
                            rec = _measure(torch, timing, peers, UnsupportedError, c, name,
                                           kind, build, sets, ref, tkw)
                        doc["results"].append(rec)
                        _log(_progress(rec))
                except Exception as exc:   # setup of the case itself failed
                    rec = {"case": c.name, "block_size": c.block_size, "impl": "(setup)",
                           "kind": "peer", "status": "failed",
                           "reason": "".join(traceback.format_exception_only(
                               type(exc), exc)).strip()[:4000]}
                    doc["results"].append(rec)
                    _log(_progress(dict(rec, wall_s=0)))
                finally:
                    if sets is not None:
                        peers.drop_dense(sets)
                    del sets, specs
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    cupy.get_default_memory_pool().free_all_blocks()
                    save()

    # table order: by case, ours first, then the peers in the order they ran
    order = {(c.name, c.block_size): i for i, c in enumerate(case_list)}
    doc["results"].sort(key=lambda r: (order.get((r["case"], r["block_size"]), 0),
                                       r["kind"] != "ours"))
    doc["wall_s"] = round(time.time() - t_start, 1)
    json_path, md_path = save()
    _log(f"\nwrote {json_path} and {md_path} ({doc['wall_s']} s)")
    _log(f"copy {doc['copy_gbps']:.0f} GB/s, matmul {doc['matmul_tflops']:.0f} TFLOP/s; "
         "ours/peer = ms(fastest of ours) / ms(peer); ours/fastest = ms(ours) / ms(fastest "
         "peer of the case, named in the cell)\n")
    _log(report.text_table(doc["results"]))
    if args.plot:
        from . import plot
        _log(f"chart: {plot.plot(doc, args.plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
