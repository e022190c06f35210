"""One-byte KV caches (docs/semantics.md, "Quantized caches"): int8 and float8_e4m3fn caches
with k_scale / v_scale, per tensor and per channel, on the NumPy reference against the naive
loop; the quantisation rule itself; the argument checks; and the GPU backends refusing them by
name until their kernels take them.
"""
import dataclasses
import re

import ml_dtypes
import numpy as np
import pytest

import cupy_paged as cpg
from cupy_paged import _quant
from cupy_paged.backends import BACKENDS

try:
    from .optional_cases import quantized_cases
    from .paged_cases import check_against_naive, make_inputs, seed_of
    from .test_optional_inputs import problem_of
    from .test_validation import call, make_case
except ImportError:
    from optional_cases import quantized_cases
    from paged_cases import check_against_naive, make_inputs, seed_of
    from test_optional_inputs import problem_of
    from test_validation import call, make_case

CASES = quantized_cases()
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_naive(case):
    seed = seed_of(case.name)
    inp = make_inputs(case, np.random.default_rng(seed))
    args = list(inp.args)
    args[3], args[4] = args[3].copy(), args[4].copy()
    out = cpg.paged_attention(*args, **inp.kwargs)          # NumPy: the reference, checked
    check_against_naive(inp, out, args[3], args[4], case.dtype, f"[{case.name} seed={seed}]")


def test_int8_rounds_half_to_even_and_saturates():
    x = np.array([[[0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0, 126.6]]])    # (1, 1, 8)
    q = _quant.quantize(x, np.array([1.0], np.float32), "int8", np.int8)
    assert q.tolist() == [[[0, 2, 2, 0, -2, 127, -128, 127]]]


def test_e4m3_saturates_instead_of_nan():
    x = np.array([[[1000.0, -1000.0, 448.0, 0.3, np.inf]]])
    q = _quant.quantize(x, np.array([1.0], np.float32), "float8_e4m3fn", E4M3)
    assert q.astype(np.float32).tolist() == [[[448.0, -448.0, 448.0, 0.3125, 448.0]]]


def test_per_channel_scales_apply_per_kv_head_and_channel():
    scale = np.arange(1, 2 * 1 * 8 + 1, dtype=np.float32).reshape(2, 1, 8) / 8
    x = np.ones((3, 2, 8))
    q = _quant.quantize(x * scale[:, 0, :], scale, "int8", np.int8)
    assert (q == 1).all()
    np.testing.assert_allclose(_quant.dequantize(q, scale, np.float64), x * scale[:, 0, :])


def _quantized(kw, kind="int8", which=("key_cache", "value_cache"), shape=(1,)):
    kw = dict(kw)
    for name, scale in (("key_cache", "k_scale"), ("value_cache", "v_scale")):
        if name in which:
            kw[name] = np.zeros(kw[name].shape, np.int8 if kind == "int8" else E4M3)
            kw[scale] = np.full(shape, 0.05, np.float32)
    return kw


@pytest.mark.parametrize("change, exc, message", [
    (lambda kw: dict(_quantized(kw), k_scale=None), ValueError,
     "k_scale: a int8 key_cache needs its scale"),
    (lambda kw: dict(kw, k_scale=np.ones(1, np.float32)), TypeError,
     "key_cache: with k_scale given, expected a one-byte cache dtype (int8, float8_e4m3fn), "
     "got float32"),
    (lambda kw: dict(_quantized(kw), v_scale=np.ones(1, np.float64)), TypeError,
     "v_scale: expected dtype float32, got float64"),
    (lambda kw: dict(_quantized(kw), k_scale=np.ones((2, 16), np.float32)), ValueError,
     "k_scale: expected shape (1,) (per tensor) or (kv_num_heads, 1, head_size) = (2, 1, 16) "
     "(per channel), got (2, 16)"),
    (lambda kw: dict(_quantized(kw), k_scale=np.zeros(1, np.float32)), ValueError,
     "k_scale: every scale must be finite and > 0, got 0.0 at flat index 0"),
    (lambda kw: dict(_quantized(kw, shape=(2, 1, 16)),
                     v_scale=np.full((2, 1, 16), np.nan, np.float32)), ValueError,
     "v_scale: every scale must be finite and > 0, got nan"),
    (lambda kw: dict(_quantized(kw, which=("key_cache",)),
                     value_cache=np.zeros((3, 4, 2, 16), np.float32)), ValueError,
     "value_cache: expected the shape of key_cache (10, 4, 2, 16), got (3, 4, 2, 16)"),
])
def test_rejected(change, exc, message):
    kw = change(make_case(seed=21))
    before = kw["key_cache"].copy(), kw["value_cache"].copy()
    with pytest.raises(exc, match=re.escape(message)):
        call(kw)
    np.testing.assert_array_equal(kw["key_cache"], before[0])
    np.testing.assert_array_equal(kw["value_cache"], before[1])


def test_a_scale_may_not_alias_a_cache():
    kw = _quantized(make_case(seed=22))
    kw["k_scale"] = kw["value_cache"].reshape(-1)[:4].view(np.float32)
    with pytest.raises(ValueError,
                       match=r"value_cache: expected memory of its own .*shared with k_scale"):
        call(kw)


def test_gpu_backends_refuse_one_byte_caches_by_name():
    problem = problem_of(k_scale=np.ones(1, np.float32), key_cache=np.zeros((10, 4, 2, 16),
                                                                             np.int8))
    assert problem.quantized_cache and problem.k_cache_dtype == "int8"
    assert problem.v_cache_dtype == ""
    assert BACKENDS["reference"].capabilities.reasons(problem, "numpy", None) == []
    for name in ("flash", "mea"):
        assert "quantized_cache is not supported" in BACKENDS[name].capabilities.reasons(
            problem, "cupy", 90)


def test_float64_case_compare_is_exact_for_the_written_slots():
    """The naive loop and the reference quantise the same float64 values the same way."""
    case = dataclasses.replace(CASES[0], dtype="float64")
    inp = make_inputs(case, np.random.default_rng(5))
    args = list(inp.args)
    args[3], args[4] = args[3].copy(), args[4].copy()
    cpg.paged_attention(*args, **inp.kwargs)
    from naive_paged_attention import naive_paged_attention
    _, kc, vc = naive_paged_attention(*inp.args, **inp.kwargs)
    np.testing.assert_array_equal(args[3], kc)
    np.testing.assert_array_equal(args[4], vc)


@pytest.mark.parametrize("dtype, scale", [("int8", 0.03), ("float8_e4m3fn", (0.02, 0.05))])
def test_paged_kv_cache_holds_one_byte_and_round_trips(dtype, scale):
    """PagedKVCache(dtype=<one byte>, scale=...) saves half of an fp16 cache; a call writes
    quantised keys and gather() gives them back dequantised, within half a step of each."""
    kv, H, rng = 2, 16, np.random.default_rng(23)
    cache = cpg.PagedKVCache(num_blocks=8, block_size=4, kv_num_heads=kv, head_size=H,
                             dtype=dtype, scale=scale)
    fp16 = cpg.PagedKVCache(num_blocks=8, block_size=4, kv_num_heads=kv, head_size=H,
                            dtype=np.float16)
    assert cache.key_cache.nbytes * 2 == fp16.key_cache.nbytes
    sid = cache.add_sequence()
    step = cache.begin_step({sid: 6})
    k = 0.5 * rng.standard_normal((6, kv * H))      # inside the int8 range: no saturation
    out = cpg.paged_attention(
        rng.standard_normal((6, 4 * H)), k, rng.standard_normal((6, kv * H)),
        cache.key_cache, cache.value_cache, step.cumulative_sequence_length, step.past_seqlens,
        step.block_table, num_heads=4, kv_num_heads=kv, k_scale=cache.k_scale,
        v_scale=cache.v_scale)
    assert np.isfinite(out).all()
    keys, _ = cache.gather(sid)
    assert keys.dtype == np.float32
    step_k = float(cache.k_scale[0])
    tol = 0.5 * step_k if dtype == "int8" else 0.07 * np.abs(k).max() + step_k
    assert np.abs(keys.reshape(6, kv * H) - k).max() <= tol


def test_paged_kv_cache_scale_rules():
    with pytest.raises(ValueError, match=re.escape("scale: a int8 cache needs its scale")):
        cpg.PagedKVCache(8, 4, 2, 16, dtype="int8")
    with pytest.raises(ValueError, match=re.escape("scale: only a one-byte cache")):
        cpg.PagedKVCache(8, 4, 2, 16, dtype=np.float16, scale=1.0)
    with pytest.raises(ValueError, match=re.escape("k_scale: every scale must be finite")):
        cpg.PagedKVCache(8, 4, 2, 16, dtype="int8", scale=0.0)
    with pytest.raises(ValueError, match=re.escape("scale: v_scale must be a number or of "
                                                   "shape (kv_num_heads, 1, head_size)")):
        cpg.PagedKVCache(8, 4, 2, 16, dtype="int8", scale=(1.0, np.ones((2, 16))))
