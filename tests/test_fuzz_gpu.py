"""GPU differential fuzz: flash and mea against the NumPy reference, and flash against mea.

The configs come from ``fuzz_strategies.py`` (the strategy the CPU fuzz runs against the naive
loop), on fp16/bf16 CuPy arrays: inputs are drawn in float32 and rounded once to the GPU dtype;
the reference runs in float32 on the rounded values. Per example: the output is poisoned with
NaN before the call; checked are the relative error (tests/gpu_parity.py's budget: fp16 2e-3,
bf16 1.6e-2), rows that see no key exactly 0, cache slots outside the written ones
bit-identical, written V bit-exact, written K bit-exact (rotated: within one rounding). The
flash-vs-mea oracle needs no reference, so its contexts run longer (split-KV, many key tiles);
the two outputs must agree within twice the budget and the caches bit for bit (one prologue).

Head sizes are limited to 8..64 and 128 so few variants compile (flash pads to 64 / 128, mea
takes its h64 / h128 tiles). Environment:
  CUPY_PAGED_FUZZ_EXAMPLES   examples per test (default 1000)
  CUPY_PAGED_FUZZ_SEED       hypothesis seed (default 0: the same examples every run)
  CUPY_PAGED_FUZZ_SHRINK=1   stop at the first mismatch and let hypothesis shrink it (default:
                             run every example, count the mismatches, fail at the end listing
                             them as reproducible ``FuzzConfig(...) seed=...`` lines)
  CUPY_PAGED_FUZZ_RESULTS    "1": write tests/results/fuzz_gpu.json; any other value: that path
A summary line per test is printed at the end of the module (visible without ``-s``).
"""
import collections
import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

try:
    from .fuzz_strategies import build_inputs, describe, fuzz_configs, host_bounds
    from .gpu_parity import K_RTOL, OUT_TOL, host_dtype
    from .paged_cases import bits, empty_rows, rel_err, written_slots
except ImportError:
    from fuzz_strategies import build_inputs, describe, fuzz_configs, host_bounds
    from gpu_parity import K_RTOL, OUT_TOL, host_dtype
    from paged_cases import bits, empty_rows, rel_err, written_slots

EXAMPLES = int(os.environ.get("CUPY_PAGED_FUZZ_EXAMPLES", "1000"))
SEED = int(os.environ.get("CUPY_PAGED_FUZZ_SEED", "0"))
SHRINK = os.environ.get("CUPY_PAGED_FUZZ_SHRINK", "0") not in ("", "0")
RESULTS = os.environ.get("CUPY_PAGED_FUZZ_RESULTS", "")
MAX_LISTED = 20            # failures kept verbatim per test

GPU_HEADS = (8, 16, 24, 32, 40, 64, 128)
_COMMON = {"head_sizes": GPU_HEADS, "dtypes": ("float16", "bfloat16"), "max_batch": 8,
           "max_kv_heads": 4, "groups": (1, 2, 3, 4, 8), "max_heads": 16,
           "block_sizes": (1, 3, 5, 8, 16, 24, 32, 64, 256), "windows": (2, 300),
           "bounded_logits": True}
REF_CONFIGS = fuzz_configs(small_q=6, max_q=64, small_past=24, max_past=320, **_COMMON)
CROSS_CONFIGS = fuzz_configs(small_q=6, max_q=96, small_past=200, max_past=2500, **_COMMON)
# Without CUPY_PAGED_FUZZ_SHRINK nothing is shrunk: a mismatch is tallied and the run goes on,
# and a CUDA error (sticky: the context is gone) ends the run at once.
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                phases=list(Phase) if SHRINK else [Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example])


@dataclasses.dataclass
class Tally:
    name: str
    examples: int = 0
    mismatches: int = 0
    split_kv_calls: int = 0       # flash calls whose plan split the keys (counted, not forced)
    seconds: float = 0.0
    dtypes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    failures: list = dataclasses.field(default_factory=list)

    def line(self):
        splits = (f"{self.split_kv_calls} flash calls with split-KV, "
                  if "flash" in self.name else "")
        return (f"fuzz {self.name}: {self.examples} examples, {self.mismatches} mismatches, "
                f"{splits}dtypes {dict(self.dtypes)}, {self.seconds:.1f} s (seed {SEED})")


@pytest.fixture(scope="module")
def tallies(request):
    """Collects each test's Tally; prints the summary lines and writes the JSON at the end."""
    found = []
    yield found
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is not None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            for t in found:
                reporter.write_line(t.line())
    if RESULTS and found:
        import cupy
        path = Path(__file__).parent / "results" / "fuzz_gpu.json" if RESULTS == "1" \
            else Path(RESULTS)
        path.parent.mkdir(parents=True, exist_ok=True)
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        path.write_text(json.dumps({
            "device": props["name"].decode(), "examples_requested": EXAMPLES, "seed": SEED,
            "date": time.strftime("%Y-%m-%d"),
            "tests": [dict(dataclasses.asdict(t), dtypes=dict(t.dtypes)) for t in found]},
            indent=1))


@pytest.fixture(scope="module")
def split_counter():
    """Counts flash calls whose plan split the keys (wraps the plan's forward step; nothing
    forced)."""
    from cupy_paged.backends._flash_kernels import ForwardStep

    original, count = ForwardStep.__call__, collections.Counter()

    def counting(self, call):
        count["split"] += self.splits > 1
        return original(self, call)

    ForwardStep.__call__ = counting
    yield count
    ForwardStep.__call__ = original


def _device_inputs(cfg, example_seed):
    """(inp in float32, lowp dtype, low-precision host args, their float32 copies, CuPy args)."""
    import cupy

    inp = build_inputs(cfg, np.random.default_rng(example_seed), "float32")
    lowp = host_dtype(cfg.dtype)
    low = [x.astype(lowp) if x is not None and x.dtype.kind == "f" else x for x in inp.args]
    host32 = [x.astype(np.float32) if x is not None and x.dtype.kind == "f" else x for x in low]
    dev = [None if x is None else cupy.asarray(x) for x in low]
    return inp, lowp, low, host32, dev


def _run(backend, dev, inp, lowp, bounds, validate):
    """One call on fresh copies of the caches, output poisoned with NaN; host copies back."""
    import cupy

    import cupy_paged

    args = list(dev)
    args[3], args[4] = args[3].copy(), args[4].copy()
    T, N, H = args[0].shape[0], inp.kwargs["num_heads"], args[3].shape[3]
    out = cupy.full((T, N * H), np.nan, dtype=lowp)
    got = cupy_paged.paged_attention(*args, **inp.kwargs, **bounds, backend=backend, out=out,
                                     validate=validate)
    assert got is out, "out= was not returned"
    check_errors = getattr(cupy_paged, "check_errors", None)
    if check_errors is not None:        # the metadata guard must not stop a valid call
        check_errors()
    return (cupy.asnumpy(out).astype(np.float32), cupy.asnumpy(args[3]),
            cupy.asnumpy(args[4]))


def _check_output(tag, got, ref, inp, tol):
    assert np.isfinite(got).all(), f"{tag}: NaN/inf in the output (an unwritten row?)"
    err = rel_err(got, ref)
    assert err <= tol, f"{tag}: relative error {err:.3e} > {tol}"
    bad = [t for t in empty_rows(inp) if np.any(got[t] != 0)]
    assert not bad, f"{tag}: rows {bad[:5]} see no key but are not 0"


def check_against_reference(backend, cfg, example_seed, validate):
    from cupy_paged.reference import paged_attention_reference

    inp, lowp, low, host32, dev = _device_inputs(cfg, example_seed)
    ref_kc, ref_vc = host32[3].copy(), host32[4].copy()
    ref = paged_attention_reference(*host32[:3], ref_kc, ref_vc, *host32[5:], **inp.kwargs)
    got, kc, vc = _run(backend, dev, inp, lowp, host_bounds(cfg, inp), validate)
    tag = f"{backend} [{describe(cfg, example_seed)} validate={validate}]"
    _check_output(tag, got, ref, inp, OUT_TOL[cfg.dtype])
    mask = written_slots(inp)
    rotated = inp.kwargs["do_rotary"]
    for name, d, orig, want in (("key_cache", kc, low[3], ref_kc),
                                ("value_cache", vc, low[4], ref_vc)):
        assert (bits(d[~mask]) == bits(orig[~mask])).all(), \
            f"{tag}: {name} changed outside the written slots"
        if name == "value_cache" or not rotated:
            assert (bits(d[mask]) == bits(want[mask].astype(lowp))).all(), \
                f"{tag}: {name} written slots differ from the new tokens"
        else:
            tol = K_RTOL[cfg.dtype]
            assert np.allclose(d[mask].astype(np.float32), want[mask], rtol=tol, atol=tol), \
                f"{tag}: rotated K in the cache differs from the reference"


def check_flash_against_mea(cfg, example_seed, validate):
    inp, lowp, _, _, dev = _device_inputs(cfg, example_seed)
    bounds = host_bounds(cfg, inp)
    flash, fkc, fvc = _run("flash", dev, inp, lowp, bounds, validate)
    mea, mkc, mvc = _run("mea", dev, inp, lowp, bounds, validate)
    tag = f"flash vs mea [{describe(cfg, example_seed)} validate={validate}]"
    # each is within OUT_TOL of the exact result, so they are within twice that of each other
    _check_output(tag, flash, mea, inp, 2 * OUT_TOL[cfg.dtype])
    assert np.isfinite(mea).all(), f"{tag}: NaN/inf in mea's output"
    bad = [t for t in empty_rows(inp) if np.any(mea[t] != 0)]
    assert not bad, f"{tag}: mea's rows {bad[:5]} see no key but are not 0"
    assert (bits(fkc) == bits(mkc)).all() and (bits(fvc) == bits(mvc)).all(), \
        f"{tag}: the caches differ (both backends run the same prologue)"


def _fuzz(tally, configs, check, split_counter):
    """Runs ``check(cfg, seed, validate)`` over EXAMPLES drawn examples, tallying them."""
    splits_before = split_counter["split"]
    start = time.perf_counter()

    @FUZZ
    @given(cfg=configs, example_seed=st.integers(0, 2**32 - 1), validate=st.booleans())
    def body(cfg, example_seed, validate):
        tally.examples += 1
        tally.dtypes[cfg.dtype] += 1
        try:
            check(cfg, example_seed, validate)
        except Exception as exc:        # a crash on valid input is a mismatch too
            tally.mismatches += 1
            if len(tally.failures) < MAX_LISTED:
                tally.failures.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:2000])
            if SHRINK or _sticky_cuda_error(exc):
                raise

    try:
        seed(SEED)(body)()
    finally:
        tally.seconds = time.perf_counter() - start
        tally.split_kv_calls = split_counter["split"] - splits_before
    assert tally.mismatches == 0, tally.line() + "\n" + "\n".join(tally.failures)


def _sticky_cuda_error(exc):
    """A CUDA error after a launch (illegal address, misaligned access, ...) poisons the
    context: every later example would fail too, so the run stops at the first one."""
    return type(exc).__name__ in ("CUDARuntimeError", "CUDADriverError")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "mea"])
def test_fuzz_backend_against_reference(backend, tallies, split_counter):
    tally = Tally(f"{backend} vs reference")
    tallies.append(tally)
    _fuzz(tally, REF_CONFIGS,
          lambda cfg, s, v: check_against_reference(backend, cfg, s, v), split_counter)


@pytest.mark.gpu
def test_fuzz_flash_against_mea(tallies, split_counter):
    tally = Tally("flash vs mea")
    tallies.append(tally)
    _fuzz(tally, CROSS_CONFIGS, check_flash_against_mea, split_counter)
