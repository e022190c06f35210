"""Run-to-run determinism: the same call on the same GPU with the same backend gives the same
bits, output and caches (README.md, "Determinism", states the guarantee).

flash is run with split-KV forced off (num_splits 1) and on (2, 5, 16: some splits then get no
key tile at all) through the plan option ``PlanOptions(num_splits=...)``, and with its own plan;
mea as it is. Between repeats the call's memory is disturbed: another call of a different shape
runs first (it reuses and dirties CuPy's pool blocks and flash's per-stream split workspace)
and the caller's ``out`` holds different garbage each time. One repeat runs in a fresh process
(new CUDA context, pool and module loads) and must give the same sha256.
Split on and off are NOT expected to agree bit for bit (the float32 sums differ in order); each
is checked against the reference instead.
"""
import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from .gpu_parity import OUT_TOL, host_dtype
    from .paged_cases import Case, make_inputs, rel_err
except ImportError:
    from gpu_parity import OUT_TOL, host_dtype
    from paged_cases import Case, make_inputs, rel_err

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "long_decode_gqa": Case("long_decode_gqa", lens=((1, 3000), (1, 777), (1, 1500)), N=32,
                            Nkv=8, H=128, bs=16, rotary="neox"),
    "chunk_window_softcap": Case("chunk_window_softcap", lens=((40, 600), (3, 2000), (0, 9)),
                                 N=6, Nkv=2, H=64, bs=5, W=700, softcap=30.0, scale=0.05,
                                 holes=2),
    "prefill_packed_h256": Case("prefill_packed_h256", lens=((300, 0), (77, 128)), N=8, Nkv=4,
                                H=256, bs=32, packed=True, rotary="gptj", R=128),
}
SPLITS = [None, 1, 2, 5, 16]        # None: the library's own plan
REPEATS = 3


def forced_splits(splits):
    """The plan options that force flash's split count to ``splits`` (None: the plan's own)."""
    from cupy_paged import PlanOptions

    return None if splits is None else PlanOptions(num_splits=splits)


@functools.cache
def _inputs(name, dtype):
    """(inputs, low-precision host args) of a case; cached, never written to."""
    case = CASES[name]
    inp = make_inputs(dataclasses.replace(case, dtype="float32"),
                      np.random.default_rng(hash_seed(name)))
    lowp = host_dtype(dtype)
    low = [x.astype(lowp) if x is not None and x.dtype.kind == "f" else x for x in inp.args]
    return inp, low


def hash_seed(name):
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def run_once(name, dtype, backend, splits, out_fill=np.nan):
    """(out, key_cache, value_cache) as host uint16 bit patterns, from fresh device copies."""
    import cupy

    import cupy_paged

    inp, low = _inputs(name, dtype)
    dev = [None if x is None else cupy.asarray(x) for x in low]
    T, N, H = low[0].shape[0], inp.kwargs["num_heads"], low[3].shape[3]
    out = cupy.full((T, N * H), out_fill, dtype=host_dtype(dtype))
    cupy_paged.paged_attention(*dev, **inp.kwargs, backend=backend, out=out,
                               options=forced_splits(splits))
    return tuple(cupy.asnumpy(x).view(np.uint16) for x in (out, dev[3], dev[4]))


def digest(bits):
    h = hashlib.sha256()
    for b in bits:
        h.update(np.ascontiguousarray(b).tobytes())
    return h.hexdigest()


def _disturb(dtype):
    """A different call first: dirties pool blocks and the flash split workspace."""
    run_once("prefill_packed_h256", dtype, "flash", 7, out_fill=3.0)
    run_once("chunk_window_softcap", dtype, "mea", None, out_fill=-2.0)


VARIANTS = [("flash", s) for s in SPLITS] + [("mea", None)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend,splits", VARIANTS,
                         ids=[f"{b}-splits{s}" if s else b for b, s in VARIANTS])
def test_repeats_are_bit_identical(backend, splits, name, dtype):
    from cupy_paged.reference import paged_attention_reference

    first = run_once(name, dtype, backend, splits)
    for r in range(1, REPEATS):
        _disturb(dtype)
        again = run_once(name, dtype, backend, splits, out_fill=(np.nan, 1e4, -0.0)[r % 3])
        for what, a, b in zip(("out", "key_cache", "value_cache"), again, first):
            assert np.array_equal(a, b), \
                f"{name} [{backend}, splits={splits}, {dtype}] repeat {r}: {what} differs " \
                f"in {int(np.count_nonzero(a != b))} elements"
    # correct too (otherwise a constant output would be "deterministic")
    inp, low = _inputs(name, dtype)
    host = [x.astype(np.float32) if x is not None and x.dtype.kind == "f" else x for x in low]
    ref = paged_attention_reference(*host, **inp.kwargs)
    got = first[0].view(host_dtype(dtype)).astype(np.float32)
    assert rel_err(got, ref) <= OUT_TOL[dtype]


_CHILD = """
import sys
sys.path[:0] = [{tests!r}, {repo!r}]
from test_determinism_gpu import digest, run_once
print("DIGEST", digest(run_once({name!r}, {dtype!r}, {backend!r}, {splits!r})))
"""


@pytest.mark.gpu
@pytest.mark.parametrize("backend,splits", [("flash", None), ("flash", 5), ("mea", None)])
def test_fresh_process_gives_the_same_bits(backend, splits):
    name, dtype = "long_decode_gqa", "bfloat16"
    here = digest(run_once(name, dtype, backend, splits))
    code = _CHILD.format(tests=str(Path(__file__).parent), repo=str(REPO), name=name,
                         dtype=dtype, backend=backend, splits=splits)
    env = {**os.environ, "CUPY_PAGED_QUIET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("DIGEST ")]
    assert line and line[-1].split()[1] == here, proc.stdout[-2000:]
