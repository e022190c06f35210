"""Host time of each stage of one small flash decode call (the step of host_overhead.py), each
timed alone in a loop: where the Python side of ``paged_attention`` spends its microseconds.

    python benchmarks/host_stages.py

Stages: adopt_arrays, check_arguments (signature cache hit), the plan lookup, the device
context, the capture check, each step of the plan alone (guard, prologue, forward launches),
the plan's whole run, the whole call, and a bare one-argument CuPy kernel launch for scale.
Launch stages include the driver's launch; the GPU is idle enough that none of them waits.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):      # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def per_call_us(fn, calls):
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    import cupy

    from benchmarks.host_overhead import make_call, step_arguments
    from cupy_paged import _validate, backends
    from cupy_paged._arrays import adopt_arrays
    from cupy_paged.backends import _capture
    from cupy_paged.backends.plan import DEFAULT_OPTIONS, Call

    named, attrs = step_arguments()
    attrs = dict(attrs, scale=0.0, softcap=0.0, local_window_size=-1, do_rotary=False,
                 rotary_interleaved=False)
    out = named["out"]
    adopted = adopt_arrays(named)
    problem = _validate.check_arguments(adopted.arrays, **attrs)
    sm, device = adopted.sm, adopted.device
    plan = backends.plan_for("flash", problem, "cupy", device, sm, DEFAULT_OPTIONS)
    guard, prologue, forward = plan.steps
    ptr = {n: 0 if x is None else x.data.ptr for n, x in adopted.arrays.items()}
    ptr["out"] = out.data.ptr
    call = Call(adopted.arrays, out, cupy.cuda.get_current_stream().ptr, ptr)
    guard(call)
    prologue(call)

    def context():
        with adopted.context():
            pass

    def capture_check():
        with _capture.keep_allocations(cupy):
            pass

    kernel = cupy.RawKernel('extern "C" __global__ void k(float* x) {}', "k")
    x = cupy.zeros(1, dtype=cupy.float32)
    stages = [
        ("adopt_arrays", lambda: adopt_arrays(named), 20000),
        ("check_arguments", lambda: _validate.check_arguments(adopted.arrays, **attrs), 20000),
        ("plan lookup", lambda: backends.plan_for("flash", problem, "cupy", device, sm,
                                                  DEFAULT_OPTIONS), 20000),
        ("device context", context, 20000),
        ("capture check", capture_check, 20000),
        ("guard (launch)", lambda: guard(call), 5000),
        ("prologue (launch)", lambda: prologue(call), 5000),
        ("forward (launch)", lambda: forward(call), 5000),
        ("plan run (guard + prologue + forward)", lambda: plan.run(adopted.arrays, out), 5000),
        ("whole call", make_call("flash", True), 5000),
        ("bare CuPy kernel, 1 argument", lambda: kernel((1,), (32,), (x,)), 5000),
    ]
    for name, fn, calls in stages:
        us = per_call_us(fn, calls)
        cupy.cuda.Device().synchronize()
        print(f"{name:34s} {us:6.2f} us")


if __name__ == "__main__":
    main()
