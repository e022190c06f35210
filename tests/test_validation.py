"""Valid calls of ``cupy_paged.paged_attention`` on NumPy input, and the shared test helpers.

``make_case`` builds one valid call (``call`` makes it); ``setter``, ``arg``, ``shape``, ``all_of``
and ``case`` describe a mutation of it and the error expected (other test modules import them).
Tested here: the baseline and its variants run, boundary values are accepted, the host-side bound
hints (max_seqlen_q, max_seqlen_k, total_kv_tokens) and their limits, and the off values of
softcap and local_window_size (ORT's). The rejected cases are in test_validation_rejected.py, the
cached static checks in test_validation_cache.py, the buffer checks in test_buffers.py.
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
