"""Boundary checks of ``cupy_paged.paged_attention`` on NumPy input (spec: "Errors").

Each rejected case mutates one thing in a valid baseline made by ``make_case`` and checks the
exception type and that the message names the argument (and, where practical, the actual value,
e.g. the shape tuple as Python prints it). Conventions under test: TypeError for a wrong dtype,
a non-bool flag or a non-array argument, ValueError for everything else; every check (data
checks included) runs before anything is written. The buffer checks (read-only, aliasing) are
in test_buffers.py; the shared helpers in test_validation.py.
"""
import numpy as np
import pytest

import cupy_paged as cpg

try:
    from .test_validation import (
        B, BS, COS_ROWS, HALF, H, M, N, NB, NKV, PACKED, ROT, T, TE, VE, all_of, arg,
        call, case, f64, make_case, noncontig, setter, shape)
except ImportError:
    from test_validation import (
        B, BS, COS_ROWS, HALF, H, M, N, NB, NKV, PACKED, ROT, T, TE, VE, all_of, arg,
        call, case, f64, make_case, noncontig, setter, shape)


REJECTED = [
    # ---- rank of each array argument --------------------------------------------------------
    case("rank-query", setter(query=lambda a: a.reshape(T, N, H)), VE,
         arg("query"), shape(T, N, H)),
    case("rank-key", setter(key=lambda a: a.reshape(T, NKV, H)), VE,
         arg("key"), shape(T, NKV, H)),
    case("rank-value", setter(value=lambda a: a.reshape(T, NKV, H)), VE,
         arg("value"), shape(T, NKV, H)),
    case("rank-key_cache", setter(key_cache=lambda a: a.reshape(NB, BS, NKV * H)), VE,
         arg("key_cache"), shape(NB, BS, NKV * H)),
    case("rank-value_cache", setter(value_cache=lambda a: a.reshape(NB, BS, NKV * H)), VE,
         arg("value_cache"), shape(NB, BS, NKV * H)),
    case("rank-cumulative_sequence_length",
         setter(cumulative_sequence_length=lambda a: a.reshape(1, B + 1)), VE,
         arg("cumulative_sequence_length"), shape(1, B + 1)),
    case("rank-past_seqlens", setter(past_seqlens=lambda a: a.reshape(1, B)), VE,
         arg("past_seqlens"), shape(1, B)),
    case("rank-block_table-3", setter(block_table=lambda a: a.reshape(1, B, M)), VE,
         arg("block_table"), shape(1, B, M)),
    case("rank-block_table-1", setter(block_table=lambda a: a.reshape(-1)), VE,
         arg("block_table"), shape(B * M)),
    case("rank-cos_cache", setter(cos_cache=lambda a: a[None]), VE,
         arg("cos_cache"), shape(1, COS_ROWS, HALF), base=ROT),
    case("rank-sin_cache", setter(sin_cache=lambda a: a[None]), VE,
         arg("sin_cache"), shape(1, COS_ROWS, HALF), base=ROT),
    case("rank-out", setter(out=np.zeros((T, N, H), np.float32)), VE,
         arg("out"), shape(T, N, H)),

    # ---- query / key / value widths and rows --------------------------------------------------
    case("query-width-not-N*H", setter(query=np.zeros((T, N * H + 8), np.float32)), VE,
         arg("query"), shape(T, N * H + 8)),
    case("packed-width-not-multiple-of-N+2Nkv",
         setter(query=np.zeros((T, 130), np.float32)), VE,
         arg("query"), shape(T, 130), base=PACKED),
    case("packed-width-multiple-of-N+2Nkv-wrong-H",   # 64 = (4 + 2*2) * 8, but H is 16
         setter(query=np.zeros((T, 64), np.float32)), VE,
         arg("query"), shape(T, 64), base=PACKED),
    case("packed-width-twice",                        # a multiple of (N+2Nkv)*H, not equal
         setter(query=np.zeros((T, 2 * (N + 2 * NKV) * H), np.float32)), VE,
         arg("query"), shape(T, 2 * (N + 2 * NKV) * H), base=PACKED),
    case("key-without-value", setter(value=None), VE, arg("key"), arg("value")),
    case("value-without-key", setter(key=None), VE, arg("key"), arg("value")),
    case("key-width", setter(key=np.zeros((T, NKV * H + 8), np.float32)), VE,
         arg("key"), shape(T, NKV * H + 8)),
    case("value-width", setter(value=np.zeros((T, NKV * H + 8), np.float32)), VE,
         arg("value"), shape(T, NKV * H + 8)),
    case("key-rows-ne-T", setter(key=np.zeros((T + 1, NKV * H), np.float32)), VE,
         arg("key"), shape(T + 1, NKV * H)),
    case("value-rows-ne-T", setter(value=np.zeros((T - 1, NKV * H), np.float32)), VE,
         arg("value"), shape(T - 1, NKV * H)),

    # ---- head counts and head size -------------------------------------------------------------
    case("N-not-multiple-of-Nkv",
         setter(num_heads=3, query=np.zeros((T, 3 * H), np.float32)), VE,
         arg("num_heads"), r"\b3\b"),
    case("num_heads-zero", setter(num_heads=0), VE, arg("num_heads"), r"\b0\b"),
    case("num_heads-negative", setter(num_heads=-4), VE, arg("num_heads"), "-4"),
    case("kv_num_heads-zero", setter(kv_num_heads=0), VE, arg("kv_num_heads"), r"\b0\b"),
    case("kv_num_heads-negative", setter(kv_num_heads=-2), VE, arg("kv_num_heads"), "-2"),
    case("num_heads-float", setter(num_heads=4.0), VE, arg("num_heads"), r"4\.0"),
    case("kv_num_heads-float", setter(kv_num_heads=2.0), VE, arg("kv_num_heads"), r"2\.0"),
    case("num_heads-bool",            # True == 1 would otherwise be a valid N=1, Nkv=1 call
         setter(num_heads=True), VE, arg("num_heads"), "True",
         base={"num_heads": 1, "kv_num_heads": 1}),
    case("kv_num_heads-bool",         # True == 1 would otherwise be a valid N=4, Nkv=1 call
         setter(kv_num_heads=True), VE, arg("kv_num_heads"), "True",
         base={"kv_num_heads": 1}),
    case("head_size-not-multiple-of-8", setter(), VE,
         "key_cache|head_size", r"\b12\b", base={"head_size": 12}),
    case("cache-Nkv-mismatch",
         setter(key_cache=np.zeros((NB, BS, 3, H), np.float32),
                value_cache=np.zeros((NB, BS, 3, H), np.float32)), VE,
         "key_cache|kv_num_heads", shape(NB, BS, 3, H)),

    # ---- caches ---------------------------------------------------------------------------------
    case("caches-different-shape",
         setter(value_cache=np.zeros((NB + 1, BS, NKV, H), np.float32)), VE,
         arg("value_cache"), shape(NB + 1, BS, NKV, H)),
    case("caches-different-dtype", setter(value_cache=f64), TE,
         arg("value_cache"), "float64"),

    # ---- dtypes ---------------------------------------------------------------------------------
    case("query-float16-cache-float32", setter(query=lambda a: a.astype(np.float16)), TE,
         arg("query"), "float16"),
    case("key-dtype", setter(key=f64), TE, arg("key"), "float64"),
    case("value-dtype", setter(value=f64), TE, arg("value"), "float64"),
    case("caches-dtype-differ-from-query", setter(key_cache=f64, value_cache=f64), TE,
         "key_cache|value_cache|query", "float64"),
    case("cos-dtype", setter(cos_cache=f64), TE, arg("cos_cache"), "float64", base=ROT),
    case("sin-dtype", setter(sin_cache=f64), TE, "sin_cache|cos_cache", "float64", base=ROT),
    case("cos-sin-dtype-differ-from-query", setter(cos_cache=f64, sin_cache=f64), TE,
         arg("cos_cache"), "float64", base=ROT),
    case("query-not-float", setter(query=lambda a: a.astype(np.int32)), TE,
         arg("query"), "int32"),
    case("all-arrays-int",            # nothing float anywhere: the first array checked is named
         setter(**{n: (lambda a: a.astype(np.int32))
                   for n in ("query", "key", "value", "key_cache", "value_cache")}), TE,
         r"\bquery\b|\bkey_cache\b", "int32"),
    case("query-python-list", setter(query=lambda a: a.tolist()), TE, arg("query")),
    case("key_cache-python-list", setter(key_cache=lambda a: a.tolist()), TE,
         arg("key_cache")),
    case("block_table-python-list", setter(block_table=lambda a: a.tolist()), TE,
         arg("block_table")),

    # ---- metadata dtypes ------------------------------------------------------------------------
    *[case(f"{n}-int64", setter(**{n: lambda a: a.astype(np.int64)}), TE, arg(n), "int64")
      for n in ("cumulative_sequence_length", "past_seqlens", "block_table")],
    *[case(f"{n}-float32", setter(**{n: lambda a: a.astype(np.float32)}), TE, arg(n),
           "float32")
      for n in ("cumulative_sequence_length", "past_seqlens", "block_table")],

    # ---- metadata lengths -----------------------------------------------------------------------
    case("past_seqlens-shorter", setter(past_seqlens=lambda a: a[:2].copy()), VE,
         arg("past_seqlens"), shape(2)),
    case("past_seqlens-longer", setter(past_seqlens=np.zeros(4, np.int32)), VE,
         arg("past_seqlens"), shape(4)),
    case("block_table-fewer-rows", setter(block_table=lambda a: a[:2].copy()), VE,
         arg("block_table"), shape(2, M)),
    case("block_table-more-rows",
         setter(block_table=lambda a: np.concatenate([a, a[:1]])), VE,
         arg("block_table"), shape(4, M)),

    # ---- rotary tables --------------------------------------------------------------------------
    case("cos-without-sin", setter(sin_cache=None, do_rotary=False), VE,
         arg("cos_cache"), arg("sin_cache"), base=ROT),
    case("sin-without-cos", setter(cos_cache=None, do_rotary=False), VE,
         arg("cos_cache"), arg("sin_cache"), base=ROT),
    case("cos-without-sin-do_rotary", setter(sin_cache=None), VE,
         arg("cos_cache"), arg("sin_cache"), base=ROT),
    case("cos-sin-rows-differ", setter(sin_cache=lambda a: a[:-1].copy()), VE,
         "sin_cache|cos_cache", shape(COS_ROWS - 1, HALF), base=ROT),
    case("cos-sin-width-differ", setter(sin_cache=lambda a: a[:, :-1].copy()), VE,
         "sin_cache|cos_cache", shape(COS_ROWS, HALF - 1), base=ROT),
    case("rotary_dim-gt-H",             # R = 2 * 12 = 24 > H = 16
         setter(cos_cache=np.ones((COS_ROWS, 12), np.float32),
                sin_cache=np.zeros((COS_ROWS, 12), np.float32)), VE,
         arg("cos_cache"), r"\b24\b|" + shape(COS_ROWS, 12), base=ROT),
    case("do_rotary-without-cos-sin", setter(do_rotary=True), VE, "cos_cache|do_rotary"),

    # ---- contiguity -----------------------------------------------------------------------------
    *[case(f"noncontiguous-{n}", setter(**{n: noncontig}), VE, arg(n), "contiguous", base=ROT)
      for n in ("query", "key", "value", "value_cache", "cumulative_sequence_length",
                "past_seqlens", "cos_cache")],
    case("noncontiguous-key_cache-transposed",   # (NB, BS, H, Nkv) viewed as (NB, BS, Nkv, H)
         setter(key_cache=lambda a: np.ascontiguousarray(a.swapaxes(2, 3)).swapaxes(2, 3)), VE,
         arg("key_cache"), "contiguous"),
    case("noncontiguous-block_table-fortran", setter(block_table=np.asfortranarray), VE,
         arg("block_table"), "contiguous"),
    case("noncontiguous-out", setter(out=noncontig(np.zeros((T, N * H), np.float32))), VE,
         arg("out"), "contiguous"),

    # ---- data checks ----------------------------------------------------------------------------
    case("cum0-nonzero", setter(cumulative_sequence_length=np.array([1, 3, 3, 8], np.int32)), VE,
         arg("cumulative_sequence_length"), r"\b1\b"),
    case("cumB-lt-T", setter(cumulative_sequence_length=np.array([0, 3, 3, 7], np.int32)), VE,
         arg("cumulative_sequence_length"), r"\b7\b"),
    case("cumB-gt-T", setter(cumulative_sequence_length=np.array([0, 3, 3, 9], np.int32)), VE,
         arg("cumulative_sequence_length"), r"\b9\b"),
    case("cum-decreasing",
         setter(cumulative_sequence_length=np.array([0, 3, 2, 8], np.int32)), VE,
         arg("cumulative_sequence_length")),
    case("past-negative", setter(past_seqlens=np.array([2, 7, -1], np.int32)), VE,
         r"past_seqlens\[2\]", "-1"),
    case("block-id-lt-minus1-used-column",
         setter(block_table=np.array([[5, -2, -1], [7, 0, -1], [9, 3, 8]], np.int32)), VE,
         arg("block_table"), "-2"),
    case("block-id-eq-num_blocks-used-column",
         setter(block_table=np.array([[5, NB, -1], [7, 0, -1], [9, 3, 8]], np.int32)), VE,
         arg("block_table"), rf"\b{NB}\b"),
    case("block-id-too-large-unused-column",
         setter(block_table=np.array([[5, 2, 1000], [7, 0, -1], [9, 3, 8]], np.int32)), VE,
         arg("block_table"), r"\b1000\b"),
    case("block-id-lt-minus1-unused-column",
         setter(block_table=np.array([[5, 2, -1], [7, 0, -5], [9, 3, 8]], np.int32)), VE,
         arg("block_table"), "-5"),
    case("capacity-exceeded",           # 8 + 5 = 13 > 3 * 4
         setter(past_seqlens=np.array([2, 7, 8], np.int32)), VE,
         "past_seqlens|block_table", r"\b2\b", r"\b13\b|\b12\b"),
    case("positions-ge-cos-rows",       # sequences 0 and 2 reach position 4; 4 rows
         setter(cos_cache=lambda a: a[:4].copy(), sin_cache=lambda a: a[:4].copy()), VE,
         arg("cos_cache"), r"\b4\b", base=ROT),

    # ---- attributes -----------------------------------------------------------------------------
    case("backend-unknown", setter(backend="cuda"), VE, arg("backend"), "cuda"),
    case("scale-nan", setter(scale=float("nan")), VE, arg("scale"), "nan"),
    case("scale-inf", setter(scale=float("inf")), VE, arg("scale"), "inf"),
    case("scale-string", setter(scale="0.5"), VE, arg("scale"), "0.5"),
    case("softcap-nan", setter(softcap=float("nan")), VE, arg("softcap"), "nan"),
    case("softcap-inf", setter(softcap=float("-inf")), VE, arg("softcap"), "inf"),
    case("local_window_size-float", setter(local_window_size=1.5), VE,
         arg("local_window_size"), r"1\.5"),
    # ORT's flags are 0/1 integers; ours are bools, so "False" (truthy) never turns one on.
    *[case(f"{flag}-{label}", setter(**{flag: value}), TE, arg(flag), "bool", shown, base=ROT)
      for flag in ("do_rotary", "rotary_interleaved")
      for label, value, shown in (("int-1", 1, r"got 1 \(int\)"), ("int-0", 0, r"got 0 \(int\)"),
                                  ("string", "False", r"'False' \(str\)"),
                                  ("none", None, r"None \(NoneType\)"))],

    # ---- out ------------------------------------------------------------------------------------
    case("out-wrong-width", setter(out=np.zeros((T, N * H + 1), np.float32)), VE,
         arg("out"), shape(T, N * H + 1)),
    case("out-wrong-rows", setter(out=np.zeros((T + 1, N * H), np.float32)), VE,
         arg("out"), shape(T + 1, N * H)),
    case("out-dtype", setter(out=np.zeros((T, N * H), np.float64)), TE, arg("out"), "float64"),
    case("out-python-list", setter(out=[[0.0] * (N * H)] * T), TE, arg("out")),
]


@pytest.mark.parametrize("mutate, exc, patterns, base", REJECTED)
def test_rejected(mutate, exc, patterns, base):
    kw = make_case(**base)
    mutate(kw)
    with pytest.raises(exc, match=all_of(*patterns)):
        call(kw)


@pytest.mark.parametrize("backend", ["flash", "mea"])
def test_gpu_backend_on_numpy_is_unsupported(backend):
    kw = make_case()
    kw["backend"] = backend
    assert issubclass(cpg.UnsupportedError, RuntimeError)
    with pytest.raises(cpg.UnsupportedError, match="(?i)cupy|gpu"):
        call(kw)


# ---- a failing call changes nothing -------------------------------------------------------------

LATE_FAILURES = [   # data checks and the out check, which a careless implementation runs late
    pytest.param(setter(past_seqlens=np.array([2, 7, -1], np.int32)), {}, id="past-negative"),
    pytest.param(setter(block_table=np.array([[5, 2, -1], [7, 0, -1], [9, 3, NB]], np.int32)),
                 {}, id="block-id-last-entry"),
    pytest.param(setter(past_seqlens=np.array([2, 7, 8], np.int32)), {}, id="capacity"),
    pytest.param(setter(cumulative_sequence_length=np.array([0, 3, 3, 7], np.int32)), {},
                 id="cumB-ne-T"),
    pytest.param(setter(cos_cache=lambda a: a[:4].copy(), sin_cache=lambda a: a[:4].copy()),
                 ROT, id="cos-rows"),
    pytest.param(setter(backend="flash"), {}, id="flash-on-numpy"),
]


@pytest.mark.parametrize("mutate, base", LATE_FAILURES)
def test_failing_call_leaves_caches_and_out_untouched(mutate, base):
    kw = make_case(**base)
    kw["out"] = np.full((T, N * H), 7.0, np.float32)
    mutate(kw)
    before = {n: kw[n].copy() for n in ("key_cache", "value_cache", "out")}
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        call(kw)
    for n, old in before.items():
        np.testing.assert_array_equal(kw[n], old, err_msg=f"{n} changed by a failing call")

