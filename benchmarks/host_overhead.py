"""Host time per ``paged_attention`` call (Python side, launches included), on a decode step
small enough that the GPU finishes each call before the host issues the next.

    python benchmarks/host_overhead.py [--backend flash] [--calls 2000] [--repeats 5]

Prints microseconds per call with and without host-side bounds (the median of --repeats timed
loops, with their range), and the top functions of a
profile of the hinted call (what to trim next).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np


def step_arguments():
    """The decode step's (arrays, attributes): B = 8 sequences of 101 keys, N 32, Nkv 8, H 128,
    block 16, fp16 on the current GPU; arrays in ``paged_attention``'s argument order (cos and
    sin None), attributes with the host bounds."""
    import cupy

    rng = np.random.default_rng(0)
    B, N, Nkv, H, bs, past = 8, 32, 8, 128, 16, 100
    blocks = B * ((past + 1 + bs - 1) // bs)
    f16 = cupy.float16
    q = cupy.asarray(rng.standard_normal((B, N * H)), dtype=f16)
    arrays = {
        "query": q,
        "key": cupy.asarray(rng.standard_normal((B, Nkv * H)), dtype=f16),
        "value": cupy.asarray(rng.standard_normal((B, Nkv * H)), dtype=f16),
        "key_cache": cupy.asarray(rng.standard_normal((blocks, bs, Nkv, H)), dtype=f16),
        "value_cache": cupy.asarray(rng.standard_normal((blocks, bs, Nkv, H)), dtype=f16),
        "cumulative_sequence_length": cupy.arange(B + 1, dtype=cupy.int32),
        "past_seqlens": cupy.full(B, past, dtype=cupy.int32),
        "block_table": cupy.asarray(rng.permutation(blocks).reshape(B, -1), dtype=cupy.int32),
        "cos_cache": None, "sin_cache": None, "out": cupy.empty_like(q)}
    attributes = dict(num_heads=N, kv_num_heads=Nkv, max_seqlen_q=1, max_seqlen_k=past + 1,
                      total_kv_tokens=B * (past + 1))
    return arrays, attributes


def make_call(backend, hinted):
    import cupy_paged

    arrays, attributes = step_arguments()
    if not hinted:
        for bound in ("max_seqlen_q", "max_seqlen_k", "total_kv_tokens"):
            del attributes[bound]
    positional = [arrays[n] for n in list(arrays)[:10]]

    def call():
        cupy_paged.paged_attention(*positional, backend=backend, out=arrays["out"],
                                   **attributes)
    return call


def per_call_us(call, calls):
    import cupy
    for _ in range(50):
        call()
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - start
    cupy.cuda.Device().synchronize()
    return host / calls * 1e6


def launch_cost(calls=5000):
    """Host microseconds of one CuPy RawKernel launch with 1, 10 and 27 arguments (pointers
    first, then int32 scalars): the floor under each of our launches."""
    import cupy

    for n in (1, 10, 27):
        params = ", ".join(f"int* p{i}" if i < 9 else f"int s{i}" for i in range(n))
        kernel = cupy.RawKernel(f'extern "C" __global__ void k({params}) {{}}', "k")
        buf = cupy.zeros(1, dtype=cupy.int32)
        args = tuple(buf if i < 9 else np.int32(i) for i in range(n))
        kernel((1,), (32,), args)
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            kernel((1,), (32,), args)
        us = (time.perf_counter() - start) / calls * 1e6
        cupy.cuda.Device().synchronize()
        print(f"RawKernel launch, {n} arguments: {us:.1f} us")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", default="flash")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5,
                   help="timed loops of --calls calls each; the median is reported (a busy "
                        "host core slows a whole loop: the spread says so)")
    args = p.parse_args(argv)
    for hinted in (True, False):
        call = make_call(args.backend, hinted)
        runs = sorted(per_call_us(call, args.calls) for _ in range(args.repeats))
        print(f"{args.backend} decode B=8, host bounds {'given' if hinted else 'not given'}: "
              f"{runs[len(runs) // 2]:.1f} us per call (host side, launches included; median "
              f"of {len(runs)} loops of {args.calls}, {runs[0]:.1f}-{runs[-1]:.1f})")
    launch_cost()
    call = make_call(args.backend, True)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        call()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
