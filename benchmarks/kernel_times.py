"""GPU time of the prologue and of the flash forward kernel (+ combine) alone, each launched
30 times back to back between two CUDA events: prefill 8 x 2048, decode 4 x 32768 and four
512-token chunks at past 3072 (fp16, N 32, Nkv 8, H 128, block 16, shuffled table). Runs with
the code of the checkout it is started in (the plan-era steps, or the launchers before them),
so two commits' kernels can be compared in one device call:

    (cd <checkout> && python <this repo>/benchmarks/kernel_times.py <label>)
"""
import os
import sys

sys.path.insert(0, os.getcwd())

import cupy  # noqa: E402
import numpy as np  # noqa: E402

from cupy_paged import _validate  # noqa: E402
from cupy_paged.backends import _flash_kernels as fk  # noqa: E402
from cupy_paged.backends import _prologue  # noqa: E402

CASES = {"prefill_8x2048": (8, 2048, 2048), "decode_4x32768": (4, 1, 32768),
         "chunks_4x512_at_3072": (4, 512, 3584)}   # (B, q_len, past + q_len)


def case(B, q_len, ctx, bs=16, N=32, Nkv=8, H=128):
    """(Problem, CuPy arrays by argument name) of B sequences of q_len new tokens at ctx."""
    rng = cupy.random.default_rng(0)
    per = -(-ctx // bs)
    nb, T = B * per, B * q_len

    def draw(shape):
        return rng.standard_normal(shape, dtype=cupy.float32).astype(cupy.float16)

    table = np.random.default_rng(1).permutation(nb).reshape(B, per)
    a = {"query": draw((T, N * H)), "key": draw((T, Nkv * H)), "value": draw((T, Nkv * H)),
         "key_cache": draw((nb, bs, Nkv, H)), "value_cache": draw((nb, bs, Nkv, H)),
         "cumulative_sequence_length": cupy.arange(0, T + 1, q_len, dtype=cupy.int32),
         "past_seqlens": cupy.full(B, ctx - q_len, dtype=cupy.int32),
         "block_table": cupy.asarray(table, dtype=cupy.int32), "cos_cache": None,
         "sin_cache": None, "out": cupy.empty((T, N * H), cupy.float16)}
    p = _validate.check_arguments(
        a, num_heads=N, kv_num_heads=Nkv, scale=0.0, softcap=0.0, local_window_size=-1,
        do_rotary=False, rotary_interleaved=False, max_seqlen_q=q_len, max_seqlen_k=ctx,
        total_kv_tokens=B * ctx)
    return p, a


def ms(fn, n=30):
    """Milliseconds per call of ``fn``, n calls between two events after 5 warm-up calls."""
    for _ in range(5):
        fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(n):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / n


def main(label):
    sm = int(cupy.cuda.Device().compute_capability)
    for name, (B, q, ctx) in CASES.items():
        p, a = case(B, q, ctx)
        device = a["query"].data.device_id
        if hasattr(_prologue, "PrologueStep"):      # plan-era code: steps built once
            prologue = _prologue.PrologueStep(p, device)
            pro = ms(lambda: prologue.run(a))
        else:
            pro = ms(lambda: _prologue.run_prologue(p, a))
        args = (a["query"], a["key_cache"], a["value_cache"], a["cumulative_sequence_length"],
                a["past_seqlens"], a["block_table"], a["out"])
        if hasattr(fk, "ForwardStep"):
            forward = fk.ForwardStep(p, device, sm)
            fwd = ms(lambda: forward.run(*args))
        else:
            fwd = ms(lambda: fk.launch_flash(p, *args, sm))
        print(f"{label:5s} {name:26s} prologue {pro * 1000:8.1f} us  forward(+combine) "
              f"{fwd * 1000:8.1f} us")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "")
