"""The rows of one benchmark case and how one row is measured: which of ours and which peers
run (``impl_specs``, grouped by phase), the background FlashInfer compile, the measurement of
one row with its output check (``measure``), and its one-line progress report."""
from __future__ import annotations

import sys
import time
import traceback

from . import report


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


PHASES = ("SDPA", "paged", "ours", "FlexAttention")


def start_flashinfer_warmup(args, case_list):
    """Start FlashInfer's JIT compile in a background thread for the wrapper kinds the run
    will use (peers_paged.start_warmup); logs whether it started."""
    from . import peers_paged as PP
    kinds = sorted({k for c in case_list for n, k in PP.specs_for(c, args.peers)
                    if k in PP.FLASHINFER_KINDS})
    if kinds and case_list:
        c = case_list[0]
        started = PP.start_warmup(kinds, c.num_heads, c.kv_num_heads, c.head_size, c.dtype)
        _log(f"FlashInfer JIT warm-up ({', '.join(kinds)}): "
             + ("compiling in the background" if started else "not started (not importable)"))


def impl_specs(args, case, meta, sets, peers):
    """{phase: [(name, kind, builder)]}: SDPA peers, paged peers, ours, then FlexAttention.

    SDPA first, so a crash of one of our backends in development (a sticky CUDA error fails
    every later row of the process) cannot take the peer numbers with it; the paged peers
    (FlashInfer, cuDNN page tables) next, while FlashInfer's background compile has had the
    SDPA rows' time; flex last, since its compiles take the most time and the budget cuts there.
    """
    from . import peers_paged as PP
    specs = {ph: [] for ph in PHASES}
    for be in ("flash", "efficient", "cudnn"):
        if f"sdpa-{be}" not in args.peers:
            continue
        specs["SDPA"].append((f"sdpa:{be}", "peer",
                              lambda be=be: peers.build_sdpa(be, case, meta, sets, False)))
        if not args.no_gather_timed:
            specs["SDPA"].append((f"sdpa:{be}+gather", "peer",
                                  lambda be=be: peers.build_sdpa(be, case, meta, sets, True)))
    for b in args.backends:
        if b == "flash-sm80":
            specs["ours"].append(("ours:flash-sm80", "ours",
                                  lambda: peers.build_ours("flash", case, meta, sets,
                                                           kernel="sm80")))
        elif b != "mea-attn":
            specs["ours"].append((f"ours:{b}", "ours",
                                  lambda b=b: peers.build_ours(b, case, meta, sets)))
        if args.sinks and b == "flash":   # the backends that take head_sink (info lists them)
            specs["ours"].append((f"ours:{b}+sink", "ours",
                                  lambda b=b: peers.build_ours(b, case, meta, sets, sink=True)))
    if "mea" in args.backends or "mea-attn" in args.backends:
        specs["ours"].append(("ours:mea-attn", "ours",
                              lambda: peers.build_mea_attention_only(case, meta, sets)))
    for name, pk in PP.specs_for(case, args.peers):
        build = ((lambda: PP.build_cudnn(case, meta, sets)) if pk == "cudnn" else
                 (lambda pk=pk: PP.build_flashinfer(pk, case, meta, sets)))
        specs["paged"].append((name, "peer", build))
    if "flex" in args.peers:
        specs["FlexAttention"].append(
            ("flex:paged", "peer", lambda: peers.build_flex(case, meta, sets)))
    return specs


def measure(torch, timing, peers, unsupported, case, name, kind, build, sets, ref, tkw):
    rec = {"case": case.name, "block_size": case.block_size, "impl": name, "kind": kind}
    t0 = time.time()
    try:
        impl = build()
        rec["notes"] = list(impl.notes)
        if kind == "ours":
            for s in sets:
                s.out.fill_(float("nan"))          # poison: every element must be written
        outputs = impl.fn(0)
        torch.cuda.synchronize()
        if ref:
            rec["check"] = peers.check(impl, outputs, impl.ref if impl.ref is not None else ref)
            if kind == "ours":
                rec["check"]["all_written"] = bool(torch.isfinite(sets[0].out).all())
                rec["check"]["ok"] &= rec["check"]["all_written"]
        del outputs
        rec.update(timing.bench(impl.fn, len(sets), **tkw))
        rec["status"] = "ok"
    except unsupported as exc:
        rec.update(status="unsupported", reason=str(exc))
    except Exception as exc:
        tb = traceback.format_exception_only(type(exc), exc)
        rec.update(status="failed", reason="".join(tb).strip()[:4000])
        try:
            torch.cuda.synchronize()
        except Exception as sticky:   # a sticky CUDA error: later rows will fail too
            rec["reason"] += f" [after: {type(sticky).__name__}: {sticky}]"
    rec["wall_s"] = round(time.time() - t0, 2)
    return rec


def progress(rec):
    if rec["status"] == "ok":
        chk = rec.get("check")
        c = "" if not chk else (f" check {'ok' if chk['ok'] else 'FAILED'} "
                                f"(rel err {chk['rel_err']:.1e})")
        reps = rec.get("repeat_ms") or []
        rep = f", timings {'/'.join(f'{x:.4f}' for x in reps)}" if len(reps) > 1 else ""
        return (f"  {rec['impl']:<22} {rec['ms']:.4f} ms (p25 {rec['p25_ms']:.4f}, "
                f"p75 {rec['p75_ms']:.4f}, n={rec['runs']}{rep}){c} "
                f"[{rec.get('wall_s', 0)} s]")
    why = report.short_reason(rec.get("reason"), rec["impl"], 160)
    return f"  {rec['impl']:<22} {rec['status']}: {why} [{rec.get('wall_s', 0)} s]"
