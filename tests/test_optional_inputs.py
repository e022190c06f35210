"""The optional inputs beyond opset 1 that the NumPy reference honours (docs/semantics.md,
"Optional inputs"): slot_mapping, QK-norm (q_norm_weight / k_norm_weight / qk_norm_epsilon)
and rotary_offset. The reference against the naive per-token loop, alone and combined; their
argument and value checks; and the GPU backends refusing each by name until their kernels take
it (``python -m cupy_paged info`` lists who takes what).
"""
import dataclasses
import re

import numpy as np
import pytest

import cupy_paged as cpg
from cupy_paged import _validate
from cupy_paged.backends import BACKENDS, UnsupportedError, choose_backend

try:
    from .optional_cases import optional_input_cases, sink_cases
    from .paged_cases import check_against_naive, make_inputs, seed_of
    from .test_validation import call, make_case
except ImportError:
    from optional_cases import optional_input_cases, sink_cases
    from paged_cases import check_against_naive, make_inputs, seed_of
    from test_validation import call, make_case

CASES = optional_input_cases() + sink_cases()     # head_sink's GPU tests: test_head_sink.py


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_naive(case, dtype):
    case = dataclasses.replace(case, dtype=dtype)
    seed = seed_of(case.name)
    inp = make_inputs(case, np.random.default_rng(seed))
    args = list(inp.args)
    args[3], args[4] = args[3].copy(), args[4].copy()
    out = cpg.paged_attention_reference(*args, **inp.kwargs, compute_dtype=np.dtype(dtype))
    check_against_naive(inp, out, args[3], args[4], dtype, f"[{case.name} seed={seed}]")


@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: c.name)
def test_api_on_numpy_matches_naive(case):
    inp = make_inputs(case, np.random.default_rng(seed_of(case.name)))
    args = list(inp.args)
    args[3], args[4] = args[3].copy(), args[4].copy()
    out = cpg.paged_attention(*args, **inp.kwargs)
    check_against_naive(inp, out, args[3], args[4], case.dtype, case.name)


def test_slot_mapping_that_repeats_the_table_changes_nothing():
    kw = make_case(dtype=np.float64, seed=11)
    plain = dict(kw, key_cache=kw["key_cache"].copy(), value_cache=kw["value_cache"].copy())
    out_plain = call(plain)
    cum, past, table, bs = (kw["cumulative_sequence_length"], kw["past_seqlens"],
                            kw["block_table"], kw["key_cache"].shape[1])
    slots = [int(table[b, p // bs]) * bs + p % bs if table[b, p // bs] >= 0 else -1
             for b in range(len(past)) for p in range(past[b], past[b] + cum[b + 1] - cum[b])]
    mapped = dict(kw, key_cache=kw["key_cache"].copy(), value_cache=kw["value_cache"].copy(),
                  slot_mapping=np.array(slots, np.int32))
    np.testing.assert_array_equal(call(mapped), out_plain)
    np.testing.assert_array_equal(mapped["key_cache"], plain["key_cache"])
    np.testing.assert_array_equal(mapped["value_cache"], plain["value_cache"])


def test_slot_minus_one_stores_nothing_but_the_query_attends():
    kw = make_case(dtype=np.float64, seed=12)
    before = kw["key_cache"].copy(), kw["value_cache"].copy()
    T = kw["query"].shape[0]
    out = call(dict(kw, slot_mapping=np.full(T, -1, np.int32)))
    np.testing.assert_array_equal(kw["key_cache"], before[0])
    np.testing.assert_array_equal(kw["value_cache"], before[1])
    assert np.isfinite(out).all()


def test_unit_norm_weights_normalise_every_head():
    """With weights 1, QK-norm makes every query head's RMS 1: scaling a query by 10 changes
    nothing."""
    kw = make_case(dtype=np.float64, seed=13)
    H = kw["key_cache"].shape[3]
    ones = np.ones(H)
    a = dict(kw, key_cache=kw["key_cache"].copy(), value_cache=kw["value_cache"].copy(),
             q_norm_weight=ones, k_norm_weight=ones, qk_norm_epsilon=1e-12)
    b = dict(a, query=kw["query"] * 10.0, key_cache=kw["key_cache"].copy(),
             value_cache=kw["value_cache"].copy())
    np.testing.assert_allclose(call(a), call(b), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- checks

N_, H_ = 4, 16     # make_case's num_heads and head_size (tests/test_validation.py)


@pytest.mark.parametrize("change, exc, message", [
    (dict(slot_mapping=np.zeros(3, np.int32)), ValueError,
     "slot_mapping: expected shape (T,), one slot per new token = (8,), got (3,)"),
    (dict(slot_mapping=np.zeros(8, np.int64)), TypeError,
     "slot_mapping: expected dtype int32, got int64"),
    (dict(slot_mapping=np.full(8, 40, np.int32)), ValueError,
     "slot_mapping[0] = 40: slots must lie in [-1, num_blocks * block_size = 10 * 4 = 40)"),
    (dict(slot_mapping=np.full(8, -2, np.int32)), ValueError, "slot_mapping[0] = -2"),
    (dict(q_norm_weight=np.ones(H_, np.float32)), ValueError,
     "k_norm_weight: is None but q_norm_weight is given; pass both or neither"),
    (dict(q_norm_weight=np.ones(8, np.float32), k_norm_weight=np.ones(8, np.float32)),
     ValueError, "q_norm_weight: expected shape (head_size,) = (16,), got (8,)"),
    (dict(q_norm_weight=np.ones(H_), k_norm_weight=np.ones(H_)), TypeError,
     "q_norm_weight: expected dtype float32 (the dtype of query), got float64"),
    (dict(qk_norm_epsilon=0.0), ValueError,
     "qk_norm_epsilon: expected a finite number > 0, got 0.0"),
    (dict(qk_norm_epsilon=float("nan")), ValueError, "qk_norm_epsilon: expected a finite"),
    (dict(rotary_offset=4), ValueError, "rotary_offset: expected a multiple of 8 >= 0, got 4"),
    (dict(rotary_offset=8), ValueError, "rotary_offset: 8 moves the rotated channels, but "
                                        "do_rotary is False"),
    (dict(rotary_offset=True), ValueError, "rotary_offset: expected an integer, got True"),
    (dict(is_causal=False, local_window_size=2), ValueError,
     "local_window_size: 2 with is_causal=False is not defined here"),
    (dict(is_causal=0), TypeError, "is_causal: expected a bool (True or False), got 0"),
])
def test_rejected(change, exc, message):
    kw = make_case(seed=14)
    assert kw["query"].shape[0] == 8 and kw["num_heads"] == N_
    before = kw["key_cache"].copy(), kw["value_cache"].copy()
    with pytest.raises(exc, match=re.escape(message)):
        call(dict(kw, **change))
    np.testing.assert_array_equal(kw["key_cache"], before[0])   # nothing written
    np.testing.assert_array_equal(kw["value_cache"], before[1])


def test_rotary_offset_must_leave_room_for_the_rotated_channels():
    kw = make_case(rotary=True, seed=15)          # R = 8, H = 16
    call(dict(kw, rotary_offset=8))               # channels [8, 16): fits
    with pytest.raises(ValueError, match=re.escape(
            "rotary_offset: channels [16, 16 + rotary_dim = 24) reach past head_size = 16")):
        call(dict(kw, rotary_offset=16))


# ---------------------------------------------------------------- who takes what

def problem_of(dtype=np.float32, **optional):
    """The Problem of make_case's call in ``dtype`` with the optional inputs given."""
    kw = make_case(seed=16, dtype=dtype)
    a = {name: kw.get(name) for name in ("query", "key", "value", "key_cache", "value_cache",
                                         "cumulative_sequence_length", "past_seqlens",
                                         "block_table", "cos_cache", "sin_cache", "out")}
    attrs = {k: optional.pop(k) for k in ("qk_norm_epsilon", "rotary_offset", "is_causal")
             if k in optional}
    scale = optional.pop("scale", 0.0)
    a.update(optional)
    return _validate.check_arguments(
        a, num_heads=kw["num_heads"], kv_num_heads=kw["kv_num_heads"], scale=scale, softcap=0.0,
        local_window_size=-1, do_rotary=False, rotary_interleaved=False, **attrs)


@pytest.mark.parametrize("feature, optional", [
    ("slot_mapping", dict(slot_mapping=np.zeros(8, np.int32))),
    ("qk_norm", dict(q_norm_weight=np.ones(16, np.float32),
                     k_norm_weight=np.ones(16, np.float32))),
    ("non_causal", dict(is_causal=False)),
    ("negative_scale", dict(scale=-0.5)),
])
def test_gpu_backends_refuse_by_name_the_reference_takes_it(feature, optional):
    problem = problem_of(**optional)
    assert getattr(problem, feature)
    assert BACKENDS["reference"].capabilities.reasons(problem, "numpy", None) == []
    for name in ("flash", "mea"):
        assert f"{feature} is not supported" in BACKENDS[name].capabilities.reasons(
            problem, "cupy", 90)
    with pytest.raises(UnsupportedError, match=rf"flash: .*{feature} is not supported"):
        choose_backend("auto", problem, "cupy", 90)


def test_info_lists_the_reference_for_every_new_input():
    from cupy_paged import info

    f = info.features()
    assert f["head_sink"] == ["flash", "reference"]
    assert f["slot_mapping"] == f["qk_norm"] == f["rotary_offset"] == ["reference"]
    assert f["non_causal"] == f["negative_scale"] == f["quantized_cache"] == ["reference"]


def test_non_causal_rows_see_the_whole_sequence():
    """is_causal=False: the first new token sees the last one, so changing the last token's
    value changes the first row's output (causal: it does not)."""
    kw = make_case(dtype=np.float64, seed=17)
    first, last = 0, int(kw["cumulative_sequence_length"][1]) - 1    # sequence 0's new rows
    outs = {}
    for causal in (True, False):
        for bump in (0.0, 5.0):
            v = kw["value"].copy()
            v[last] += bump
            args = dict(kw, value=v, key_cache=kw["key_cache"].copy(),
                        value_cache=kw["value_cache"].copy(), is_causal=causal)
            outs[causal, bump] = call(args)[first]
    np.testing.assert_array_equal(outs[True, 0.0], outs[True, 5.0])
    assert np.abs(outs[False, 0.0] - outs[False, 5.0]).max() > 1e-3


def test_negative_scale_flips_the_logits():
    """scale -s on q equals scale s on -q (ONNX Runtime takes any finite scale)."""
    kw = make_case(dtype=np.float64, seed=18)
    a = call(dict(kw, scale=-0.4, key_cache=kw["key_cache"].copy(),
                  value_cache=kw["value_cache"].copy()))
    b = call(dict(kw, scale=0.4, query=-kw["query"], key_cache=kw["key_cache"].copy(),
                  value_cache=kw["value_cache"].copy()))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
