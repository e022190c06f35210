"""GPU timing with CUDA events on torch's current stream (which CuPy is made to share).

Import only on a machine with torch and a GPU; nothing in CI imports this module.

``bench(fn, n_sets)`` times ``fn(i)`` (i = which input set; the caller rotates) as follows:
warm-up (>= `warmup_runs` calls and >= `warmup_ms`), then N timed calls with an event pair
around each, N = clamp(min_time_ms / estimate, min_runs, max_runs), median reported. The
timed calls go in chunks, each behind a ``torch.cuda._sleep`` on the stream long enough for
the host to enqueue the whole chunk, so each event pair measures device time rather than
the host's launch pace (a call whose host work is slower than its device work would
otherwise be timed at the host's pace).
"""
from __future__ import annotations

import statistics
import time

import torch

QUICK = {"warmup_runs": 2, "warmup_ms": 10.0, "min_runs": 10, "min_time_ms": 60.0,
         "max_runs": 200, "repeats": 1}
FULL = {"warmup_runs": 5, "warmup_ms": 50.0, "min_runs": 30, "min_time_ms": 300.0,
        "max_runs": 2000, "repeats": 2}


def _sleep_for(ms):
    """Queue a device-side spin of about `ms` milliseconds (no-op where unavailable)."""
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None or ms <= 0:
        return
    # ~1.7-2.0 GHz SM clocks on H100/H200; over-sleeping only costs wall time
    sleep(int(ms * 2.0e6))


def bench(fn, n_sets=1, *, repeats=1, **kw):
    """Median device time of fn(i) in ms over `repeats` independent timings, runs pooled.

    Returns {"ms", "min_ms", "p25_ms", "p75_ms", "mean_ms", "runs", "host_ms",
    "repeat_ms"}: repeat_ms holds each timing's own median, so the spread between two
    timings of the same thing is on record (METHOD: a difference smaller than it is noise).
    """
    parts = [_bench_once(fn, n_sets, **kw) for _ in range(max(1, repeats))]
    times = sorted(t for p in parts for t in p.pop("times"))
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"ms": statistics.median(times), "min_ms": times[0], "p25_ms": q[0],
            "p75_ms": q[2], "mean_ms": statistics.fmean(times), "runs": len(times),
            "host_ms": parts[0]["host_ms"], "repeat_ms": [p["ms"] for p in parts]}


def _bench_once(fn, n_sets=1, *, warmup_runs=5, warmup_ms=50.0, min_runs=30,
                min_time_ms=300.0, max_runs=2000, sleep_budget_ms=20.0):
    """One timing: warm-up, then the timed runs; {"ms", "host_ms", "times"}."""
    sync = torch.cuda.synchronize
    # warm-up: compiles, plans, allocator growth
    sync()
    t_start, n, host = time.perf_counter(), 0, []
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dev = []
    while n < warmup_runs or (time.perf_counter() - t_start) * 1e3 < warmup_ms:
        e0.record()
        h0 = time.perf_counter()
        fn(n % n_sets)
        host.append(time.perf_counter() - h0)
        e1.record()
        sync()
        dev.append(e0.elapsed_time(e1))
        n += 1
        if n >= 1000:
            break
    est_ms = max(statistics.median(dev[1:] or dev), 1e-4)
    host_ms = 1e3 * statistics.median(host[1:] or host)
    runs = int(min(max_runs, max(min_runs, -(-min_time_ms // est_ms))))

    # chunks sized so that the host enqueues a chunk well within the device-side sleep
    chunk = max(1, min(runs, int(0.5 * sleep_budget_ms / max(host_ms, 1e-3))))
    times = []
    i = 0
    while len(times) < runs:
        k = min(chunk, runs - len(times))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(k)]
        _sleep_for(min(sleep_budget_ms, 1.5 * k * host_ms + 0.5))
        for s, e in zip(starts, ends):
            s.record()
            fn(i % n_sets)
            e.record()
            i += 1
        sync()
        times.extend(s.elapsed_time(e) for s, e in zip(starts, ends))
    return {"ms": statistics.median(times), "host_ms": host_ms, "times": times}


def copy_bandwidth(nbytes=1 << 30, **kw):
    """Device-to-device copy rate in bytes/s, counting bytes read + written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    dst = torch.empty_like(src)
    r = bench(lambda i, src=src, dst=dst: dst.copy_(src), 1, **kw)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_per_s": 2 * nbytes / (r["ms"] * 1e-3), "nbytes": nbytes, **r}


def matmul_rate(n=8192, dtype=torch.float16, **kw):
    """Dense n x n x n matrix product rate in FLOP/s on random data (the compute ceiling)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    c = torch.empty(n, n, device="cuda", dtype=dtype)
    r = bench(lambda i, a=a, b=b, c=c: torch.mm(a, b, out=c), 1, **kw)
    del a, b, c
    torch.cuda.empty_cache()
    return {"flops_per_s": 2 * n ** 3 / (r["ms"] * 1e-3), "n": n, "dtype": str(dtype), **r}
