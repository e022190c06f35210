"""head_sink (ONNX Runtime's sink logits, docs/semantics.md "Head sinks"): one logit per query
head that joins every row's softmax denominator and contributes no value.

The NumPy reference against the naive per-token loop, the argument checks, which backends
take it, and on the GPU the flash backend against the reference (one split and split-KV,
prefill / decode tiles) with the mea backend refusing it by name.
"""
import dataclasses
import re
import zlib

import numpy as np
import pytest

import cupy_paged as cpg
from cupy_paged.backends import BACKENDS, UnsupportedError, choose_backend

try:
    from .optional_cases import sink_cases
    from .gpu_parity import check_backend
    from .paged_cases import Case, make_inputs
    from .test_optional_inputs import problem_of
    from .test_validation import call, make_case
except ImportError:
    from optional_cases import sink_cases
    from gpu_parity import check_backend
    from paged_cases import Case, make_inputs
    from test_optional_inputs import problem_of
    from test_validation import call, make_case

SINK_CASES = sink_cases()


# ---------------------------------------------------------------- the reference
# (against the naive loop: tests/test_optional_inputs.py, over sink_cases() too)

def test_sink_of_minus_infinity_is_no_sink():
    kw = make_case(dtype=np.float64, seed=3)
    base = call(dict(kw, key_cache=kw["key_cache"].copy(), value_cache=kw["value_cache"].copy()))
    sink = np.full(kw["num_heads"], -np.inf)
    got = call(dict(kw, head_sink=sink))
    np.testing.assert_allclose(got, base, rtol=1e-13, atol=1e-15)


def test_a_dominating_sink_takes_the_whole_row():
    """A sink far above every logit takes (nearly) all the weight: the output goes to 0."""
    kw = make_case(dtype=np.float64, seed=4)
    out = call(dict(kw, head_sink=np.full(kw["num_heads"], 200.0)))
    assert np.abs(out).max() < 1e-60


def test_sink_lowers_every_weight_by_the_same_factor():
    """With a sink, each row is the no-sink row times Z / (Z + e^sink), Z its partition sum."""
    rng = np.random.default_rng(5)
    kw = make_case(dtype=np.float64, seed=5)
    base = call(dict(kw, key_cache=kw["key_cache"].copy(), value_cache=kw["value_cache"].copy()))
    sink = rng.standard_normal(kw["num_heads"])
    got = call(dict(kw, head_sink=sink))
    N, H = kw["num_heads"], kw["key_cache"].shape[3]
    ratio = got.reshape(-1, N, H) / np.where(base == 0, 1, base).reshape(-1, N, H)
    seen = np.abs(base.reshape(-1, N, H)).max(axis=-1) > 0
    per_row = ratio[seen]
    assert np.all((per_row > 0) & (per_row < 1)), "a sink only shrinks a row"
    np.testing.assert_allclose(per_row, np.broadcast_to(per_row[:, :1], per_row.shape),
                               rtol=1e-9)


# ---------------------------------------------------------------- checks and envelope

def test_head_sink_shape_and_dtype_are_checked():
    kw = make_case(seed=6)
    N = kw["num_heads"]
    with pytest.raises(ValueError, match=re.escape(f"head_sink: expected shape (num_heads,) "
                                                   f"= ({N},), got ({N + 1},)")):
        call(dict(kw, head_sink=np.zeros(N + 1, np.float32)))
    with pytest.raises(TypeError, match=re.escape("head_sink: expected dtype float32 (the "
                                                  "dtype of query), got float64")):
        call(dict(kw, head_sink=np.zeros(N, np.float64)))
    with pytest.raises(ValueError, match=re.escape(f"head_sink: expected shape (num_heads,) "
                                                   f"= ({N},), got (1, {N})")):
        call(dict(kw, head_sink=np.zeros((1, N), np.float32)))


def test_flash_and_reference_take_sinks_mea_says_it_does_not():
    problem = problem_of(np.float16, head_sink=np.zeros(4, np.float16))
    assert problem.head_sink and not problem_of(np.float16).head_sink
    assert BACKENDS["flash"].capabilities.reasons(problem, "cupy", 90) == []
    assert BACKENDS["reference"].capabilities.reasons(problem, "numpy", None) == []
    assert BACKENDS["mea"].capabilities.reasons(problem, "cupy", 90) == [
        "head_sink is not supported"]
    assert choose_backend("auto", problem, "cupy", 90).name == "flash"
    with pytest.raises(UnsupportedError, match="mea: head_sink is not supported"):
        choose_backend("auto", problem, "cupy", 75)      # flash needs sm80; mea cannot


# ---------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: c.name)
def test_flash_matches_reference(case, dtype):
    rng = np.random.default_rng(zlib.crc32(f"{case.name}-{dtype}".encode()))
    check_backend(case, rng, "flash", dtype)


LONG = Case("sink-split-kv", sink=1.0, lens=((1, 4000), (3, 1500), (1, 0), (2, 900)), N=8,
            Nkv=2, H=128, bs=16, holes=2)
PREFILL = Case("sink-prefill-gqa8", sink=2.0, lens=((300, 0), (120, 500)), N=16, Nkv=2,
               H=64, bs=32, softcap=30.0)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 3, 20])
@pytest.mark.parametrize("case", [LONG, PREFILL], ids=lambda c: c.name)
def test_flash_split_kv_adds_the_sink_once(case, splits):
    rng = np.random.default_rng(zlib.crc32(f"{case.name}-{splits}".encode()))
    check_backend(case, rng, "flash", "bfloat16", options=cpg.PlanOptions(num_splits=splits))


@pytest.mark.gpu
def test_mea_refuses_a_sink_by_name():
    import cupy

    inp = make_inputs(dataclasses.replace(SINK_CASES[0], dtype="float16"),
                      np.random.default_rng(8))
    dev = [None if x is None else cupy.asarray(x) for x in inp.args]
    kwargs = dict(inp.kwargs, head_sink=cupy.asarray(inp.kwargs["head_sink"]))
    with pytest.raises(UnsupportedError, match="mea: head_sink is not supported"):
        cpg.paged_attention(*dev, **kwargs, backend="mea")
