"""Boundary checks of ``cupy_paged.paged_attention`` on NumPy input (spec: "Errors").

Each rejected case mutates one thing in a valid baseline made by ``make_case`` and checks the
exception type and that the message names the argument (and, where practical, the actual value,
e.g. the shape tuple as Python prints it). Conventions under test: TypeError for a wrong dtype,
a non-bool flag or a non-array argument, ValueError for everything else; every check (data
checks included) runs before anything is written. The buffer checks (read-only, aliasing) are
in test_buffers.py.
"""
import math
import re

import numpy as np
import pytest

import cupy_paged as cpg

# The baseline: B=3 sequences with q_len (3, 0, 5) and past (2, 7, 0), N=4, Nkv=2, H=16,
# block_size 4, 3 block-table columns (capacity 12 positions), 10 physical blocks, float32.
B, N, NKV, H, BS, M, NB = 3, 4, 2, 16, 4, 3, 10
Q_LENS, PAST = (3, 0, 5), (2, 7, 0)
T = sum(Q_LENS)
TABLE = ((5, 2, -1), (7, 0, -1), (9, 3, 8))  # blocks 1, 4, 6 are spare
COS_ROWS, HALF = 16, 4                       # rotary: max_pos 16, R = 8 < H

POSITIONAL = ("query", "key", "value", "key_cache", "value_cache",
              "cumulative_sequence_length", "past_seqlens", "block_table",
              "cos_cache", "sin_cache")


def make_case(*, dtype=np.float32, num_heads=N, kv_num_heads=NKV, head_size=H,
              q_lens=Q_LENS, past=PAST, table=TABLE, num_blocks=NB, block_size=BS,
              rotary=False, cos_rows=COS_ROWS, half=HALF, packed=False, seed=0):
    """All arguments of one valid call, as a dict keyed by the signature's names."""
    rng = np.random.default_rng(seed)
    n_tok = sum(q_lens)

    def rand(*shape):
        return rng.standard_normal(shape).astype(dtype)

    kw = {}
    if packed:
        kw["query"] = rand(n_tok, (num_heads + 2 * kv_num_heads) * head_size)
        kw["key"] = kw["value"] = None
    else:
        kw["query"] = rand(n_tok, num_heads * head_size)
        kw["key"] = rand(n_tok, kv_num_heads * head_size)
        kw["value"] = rand(n_tok, kv_num_heads * head_size)
    kw["key_cache"] = rand(num_blocks, block_size, kv_num_heads, head_size)
    kw["value_cache"] = rand(num_blocks, block_size, kv_num_heads, head_size)
    kw["cumulative_sequence_length"] = np.array((0,) + tuple(np.cumsum(q_lens)), np.int32)
    kw["past_seqlens"] = np.array(past, np.int32)
    kw["block_table"] = np.array(table, np.int32).reshape(len(q_lens), -1)
    if rotary:
        angle = np.arange(cos_rows)[:, None] * 0.3 / (1.0 + np.arange(half))[None, :]
        kw["cos_cache"] = np.cos(angle).astype(dtype)
        kw["sin_cache"] = np.sin(angle).astype(dtype)
        kw["do_rotary"] = True
    else:
        kw["cos_cache"] = kw["sin_cache"] = None
    kw["num_heads"] = num_heads
    kw["kv_num_heads"] = kv_num_heads
    return kw


def call(kw):
    """Array arguments positionally (in signature order), attributes by keyword."""
    args = [kw[name] for name in POSITIONAL]
    rest = {k: v for k, v in kw.items() if k not in POSITIONAL}
    return cpg.paged_attention(*args, **rest)


def all_of(*patterns):
    """A regex that matches when every pattern occurs somewhere in the message."""
    return "(?s)^" + "".join(f"(?=.*(?:{p}))" for p in patterns)


def shape(*dims):
    """The shape as Python prints a tuple: (8, 4, 16), (2,)."""
    return re.escape(str(tuple(dims)))


# Argument names as whole words, so `key` does not match `key_cache` and `num_heads` does not
# match `kv_num_heads`.
def arg(name):
    return rf"\b{name}\b"


def setter(**changes):
    """mutate(kw): each change is a constant or a function of the current value."""
    def mutate(kw):
        for name, change in changes.items():
            kw[name] = change(kw.get(name)) if callable(change) else change
    return mutate


def noncontig(a):
    """A C-non-contiguous view with a's shape and values (every other element of a wider array)."""
    wide = np.empty(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    wide[..., ::2] = a
    view = wide[..., ::2]
    assert view.shape == a.shape and not view.flags.c_contiguous
    return view


def f64(a):
    return a.astype(np.float64)


ROT = {"rotary": True}
PACKED = {"packed": True}
VE, TE = ValueError, TypeError


def case(id, mutate, exc, *patterns, base=None):
    return pytest.param(mutate, exc, patterns, base or {}, id=id)


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
    case("scale-negative", setter(scale=-1.0), VE, arg("scale"), r"-1"),
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


# ---- valid calls run ----------------------------------------------------------------------------

def _runs(kw, dtype=np.float32, rows=T):
    res = call(kw)
    assert isinstance(res, np.ndarray)
    assert res.shape == (rows, N * H) and res.dtype == dtype
    assert np.isfinite(res).all()
    return res


def test_baseline_runs():
    _runs(make_case())


def test_baseline_with_out_writes_out():
    kw = make_case()
    expected = call(make_case())
    kw["out"] = np.full((T, N * H), np.nan, np.float32)
    res = _runs(kw)
    assert np.shares_memory(res, kw["out"])
    np.testing.assert_allclose(kw["out"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("base", [PACKED, ROT, {"dtype": np.float16}, {"dtype": np.float64}],
                         ids=["packed", "rotary", "float16", "float64"])
def test_variant_runs(base):
    _runs(make_case(**base), dtype=base.get("dtype", np.float32))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("validate", [False, True])
def test_backend_names_accepted(backend, validate):
    kw = make_case()
    kw.update(backend=backend, validate=validate)
    _runs(kw)


def test_no_tokens():
    kw = make_case(q_lens=(0, 0, 0))
    _runs(kw, rows=0)


@pytest.mark.parametrize("mutate, base", [
    pytest.param(setter(past_seqlens=np.array([2, 7, 7], np.int32)), {},
                 id="past+q_len-exactly-capacity"),
    # The spec bounds the positions of new tokens; a sequence with q_len 0 has none, so its
    # past may exceed the table (an idle slot of a decode batch): nothing reads or writes it.
    pytest.param(setter(past_seqlens=np.array([2, 13, 0], np.int32)), {},
                 id="q_len-0-past-beyond-capacity"),
    pytest.param(setter(block_table=np.array([[5, -1, -1], [-1, -1, -1], [9, 3, 8]], np.int32)),
                 {}, id="unmapped-blocks-in-used-columns"),
    pytest.param(setter(cos_cache=lambda a: a[:7].copy(), sin_cache=lambda a: a[:7].copy()),
                 ROT, id="cos-rows-exactly-enough"),
    pytest.param(setter(cos_cache=np.ones((COS_ROWS, H // 2), np.float32),
                        sin_cache=np.zeros((COS_ROWS, H // 2), np.float32)),
                 ROT, id="rotary_dim-equals-H"),
    pytest.param(setter(scale=0.0, softcap=-1.0, local_window_size=0), {}, id="off-values"),
    pytest.param(setter(scale=0.5, softcap=30.0, local_window_size=2), {}, id="on-values"),
    pytest.param(setter(num_heads=np.int64(4), kv_num_heads=np.int32(2)), {},
                 id="numpy-int-head-counts"),
    pytest.param(setter(do_rotary=np.True_, rotary_interleaved=np.True_), ROT,
                 id="numpy-bool-flags"),
])
def test_boundary_values_accepted(mutate, base):
    kw = make_case(**base)
    mutate(kw)
    _runs(kw)


def test_cos_sin_without_do_rotary_are_ignored():
    plain_kw = make_case()
    plain = call(plain_kw)
    kw = make_case(rotary=True)   # same seed: same q, k, v and caches
    kw["do_rotary"] = False
    res = _runs(kw)
    np.testing.assert_array_equal(res, plain)
    for n in ("key_cache", "value_cache"):
        np.testing.assert_array_equal(kw[n], plain_kw[n], err_msg=f"{n}: K was rotated")


def test_scale_zero_means_inverse_sqrt_head_size():
    a = call(make_case())
    kw = make_case()
    kw["scale"] = 1.0 / math.sqrt(H)
    np.testing.assert_allclose(call(kw), a, rtol=1e-6, atol=1e-6)


# Host-side bounds (q_lens 3, 0, 5; past 2, 7, 0: max q_len 5, max past+q_len 7, total 17).
@pytest.mark.parametrize("name, value, match", [
    ("max_seqlen_q", 4, r"max_seqlen_q: the metadata needs 5, more than the bound 4"),
    ("max_seqlen_k", 6, r"max_seqlen_k: the metadata needs 7, more than the bound 6"),
    ("total_kv_tokens", 16, r"total_kv_tokens: the metadata needs 17, more than the bound 16"),
    ("max_seqlen_q", -1, r"max_seqlen_q: expected None or an integer >= 0, got -1"),
    ("total_kv_tokens", 2.5, r"total_kv_tokens: expected an integer, got 2.5"),
])
def test_rejected_bound_hints(name, value, match):
    kw = make_case()
    kw[name] = value
    with pytest.raises(ValueError, match=match):
        call(kw)


def test_exact_bound_hints_accepted():
    kw = make_case()
    kw.update(max_seqlen_q=5, max_seqlen_k=7, total_kv_tokens=17)
    _runs(kw)


# The static checks are cached by argument signature: a signature that passed must not let a
# different one through.
def test_cached_signature_does_not_admit_bool_head_counts():
    kw = make_case(kv_num_heads=1)
    _runs(kw)                                    # kv_num_heads=1 passes and is cached
    kw["kv_num_heads"] = True                    # True == 1 and hash(True) == hash(1)
    with pytest.raises(ValueError, match=r"kv_num_heads: expected an integer, got True"):
        call(kw)


def test_cached_signature_does_not_admit_a_strided_view():
    kw = make_case()
    _runs(kw)
    wide = np.zeros((kw["query"].shape[0], 2 * kw["query"].shape[1]), np.float32)
    wide[:, ::2] = kw["query"]
    kw["query"] = wide[:, ::2]                   # same shape and dtype, other strides
    with pytest.raises(ValueError, match=r"query: must be C-contiguous"):
        call(kw)


def test_cached_signature_returns_the_same_problem():
    from cupy_paged import _validate

    kw = make_case()
    arrays = {name: kw[name] for name in POSITIONAL}
    arrays["out"] = None
    attrs = dict(num_heads=N, kv_num_heads=NKV, scale=0.0, softcap=0.0, local_window_size=-1,
                 do_rotary=False, rotary_interleaved=False)
    first = _validate.check_arguments(arrays, **attrs)
    assert _validate.check_arguments(arrays, **attrs) is first
    assert _validate.check_arguments(arrays, **dict(attrs, softcap=2.0)).softcap == 2.0


def test_numpy_bool_flags_become_python_bools_in_the_problem():
    from cupy_paged import _validate

    kw = make_case(rotary=True)
    arrays = {name: kw[name] for name in POSITIONAL}
    arrays["out"] = None
    problem = _validate.check_arguments(
        arrays, num_heads=N, kv_num_heads=NKV, scale=0.0, softcap=0.0, local_window_size=-1,
        do_rotary=np.True_, rotary_interleaved=np.False_)
    assert (problem.do_rotary, problem.rotary_interleaved) == (True, False)
    assert type(problem.do_rotary) is bool and type(problem.rotary_interleaved) is bool


# ---- off values follow ORT: softcap <= 0 and local_window_size <= 0 mean off -----------------

@pytest.mark.parametrize("seed", range(3))
def test_softcap_at_or_below_zero_is_off(seed):
    rng = np.random.default_rng(seed)
    off = call(make_case(seed=seed))                    # the default, softcap=0.0
    for softcap in (-0.0, -float(rng.uniform(1e-3, 1.0)), -float(rng.uniform(1.0, 1e4))):
        kw = make_case(seed=seed)
        kw["softcap"] = softcap
        np.testing.assert_array_equal(call(kw), off, err_msg=f"softcap={softcap}")
    kw = make_case(seed=seed)
    kw["softcap"] = float(rng.uniform(0.05, 0.2))       # a positive cap changes the output
    assert not np.allclose(call(kw), off, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("seed", range(3))
def test_local_window_at_or_below_zero_is_off(seed):
    rng = np.random.default_rng(seed)
    off = call(make_case(seed=seed))                    # the default, local_window_size=-1
    for window in (0, -2, -int(rng.integers(3, 1 << 40))):
        kw = make_case(seed=seed)
        kw["local_window_size"] = window
        np.testing.assert_array_equal(call(kw), off, err_msg=f"local_window_size={window}")
    kw = make_case(seed=seed)
    kw["local_window_size"] = 1                         # each query sees only itself
    assert not np.allclose(call(kw), off, rtol=1e-3, atol=1e-3)
