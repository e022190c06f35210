"""Oracle tests: the NumPy reference (and the public API on NumPy) against a naive loop.

Every case draws fresh random data from a seed derived from its test id (printed on failure),
poisons both caches with random values, and checks: the output by relative error
||out - naive|| / ||naive||, rows that see no key exactly 0, the written cache slots against the
naive ones, and every other cache element bit-identical to before.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cupy_paged.reference import paged_attention_reference

try:
    from .naive_paged_attention import naive_paged_attention
    from .paged_cases import (Case, bits, build_cases, check_against_naive, empty_rows,
                              make_inputs, rel_err, seed_of)
except ImportError:
    from naive_paged_attention import naive_paged_attention
    from paged_cases import (Case, bits, build_cases, check_against_naive, empty_rows,
                             make_inputs, rel_err, seed_of)


def run_impl(inp, api, dtype):
    args = list(inp.args)
    args[3], args[4] = args[3].copy(), args[4].copy()
    if api:
        import cupy_paged
        out = cupy_paged.paged_attention(*args, **inp.kwargs, backend="reference")
    else:
        out = paged_attention_reference(*args, **inp.kwargs, compute_dtype=np.dtype(dtype))
    return out, args[3], args[4]


CASES = build_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_matches_naive(case):
    seed = seed_of(case.name)
    inp = make_inputs(case, np.random.default_rng(seed))
    out, kc, vc = run_impl(inp, case.api, case.dtype)
    tag = f"[{case} seed={seed} (q_len, past)={list(zip(inp.q_lens, inp.pasts))}]"
    check_against_naive(inp, out, kc, vc, case.dtype, tag)


# ----------------------------------------------------------------------------- the oracle itself
def test_naive_hand_computed():
    """One old key e0 (value 1s), one new query 2*e0 with key 0 (value 3s), H = 8, scale 1/sqrt(8)."""
    H = 8
    kc = np.zeros((2, 2, 1, H))
    vc = np.zeros((2, 2, 1, H))
    kc[1, 0, 0, 0] = 1.0
    vc[1, 0, 0, :] = 1.0
    q = np.zeros((1, H))
    q[0, 0] = 2.0
    k = np.zeros((1, H))
    v = np.full((1, H), 3.0)
    table = np.array([[1, -1]], dtype=np.int32)
    args = (q, k, v, kc, vc, np.array([0, 1], np.int32), np.array([1], np.int32), table)
    out, nkc, nvc = naive_paged_attention(*args, num_heads=1, kv_num_heads=1)
    w0 = math.exp(2 / math.sqrt(8)) / (math.exp(2 / math.sqrt(8)) + 1)
    assert np.allclose(out, w0 * 1 + (1 - w0) * 3, rtol=1e-15)
    assert np.all(nvc[1, 1, 0] == 3.0) and np.all(nkc[1, 1, 0] == 0.0)
    assert np.all(vc[1, 1] == 0) and kc.sum() == 1.0   # the naive works on copies
    # softcap 0.5 then window 1: the capped logit is 0.5 tanh(1.414/0.5); W = 1 sees itself only
    out, _, _ = naive_paged_attention(*args, num_heads=1, kv_num_heads=1, softcap=0.5)
    s0 = 0.5 * math.tanh(2 / math.sqrt(8) / 0.5)
    w0 = math.exp(s0) / (math.exp(s0) + 1)
    assert np.allclose(out, w0 + 3 * (1 - w0), rtol=1e-15)
    out, _, _ = naive_paged_attention(*args, num_heads=1, kv_num_heads=1, local_window_size=1)
    assert np.all(out == 3.0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_naive_rotary_hand(interleaved):
    """H = 8, R = 4: NeoX pairs (0,2), (1,3); GPT-J pairs (0,1), (2,3); channels 4..7 pass."""
    x = np.arange(1.0, 9.0)[None, :]                 # channels 1..8
    cos = np.array([[9.0, 9.0], [2.0, 3.0]])         # row 1 is position 1
    sin = np.array([[9.0, 9.0], [5.0, 7.0]])
    kc = np.zeros((1, 2, 1, 8))
    args = (x, x.copy(), x.copy(), kc, kc.copy(), np.array([0, 1], np.int32),
            np.array([1], np.int32), np.array([[0]], np.int32), cos, sin)
    _, nkc, nvc = naive_paged_attention(*args, num_heads=1, kv_num_heads=1, do_rotary=True,
                                        rotary_interleaved=interleaved)
    if interleaved:   # y0 = 1*2 - 2*5, y1 = 2*2 + 1*5, y2 = 3*3 - 4*7, y3 = 4*3 + 3*7
        want = [-8, 9, -19, 33, 5, 6, 7, 8]
    else:             # y0 = 1*2 - 3*5, y2 = 3*2 + 1*5, y1 = 2*3 - 4*7, y3 = 4*3 + 2*7
        want = [-13, -22, 11, 26, 5, 6, 7, 8]
    assert nkc[0, 1, 0].tolist() == want
    assert nvc[0, 1, 0].tolist() == x[0].tolist()   # V is never rotated
    assert np.all(nkc[0, 0] == 0)


def dense_attention(q, k, v, past, N, Nkv, scale, softcap, W, cos, sin, interleaved, old_k, old_v):
    """Vectorised dense causal attention for one sequence held contiguously: no paging at all."""
    T, H = q.shape[0], old_k.shape[-1]
    G = N // Nkv
    q = q.reshape(T, N, H).copy()
    k = k.reshape(T, Nkv, H).copy()
    if cos is not None:
        half = cos.shape[1]
        c, s = cos[past:past + T, None, :], sin[past:past + T, None, :]
        for x in (q, k):
            if interleaved:
                a, b = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
                x[..., 0:2 * half:2], x[..., 1:2 * half:2] = a * c - b * s, b * c + a * s
            else:
                a, b = x[..., :half].copy(), x[..., half:2 * half].copy()
                x[..., :half], x[..., half:2 * half] = a * c - b * s, b * c + a * s
    keys = np.concatenate([old_k, k])                # (past + T, Nkv, H)
    vals = np.concatenate([old_v, v.reshape(T, Nkv, H)])
    keys, vals = np.repeat(keys, G, axis=1), np.repeat(vals, G, axis=1)
    s = np.einsum("tnh,knh->ntk", q, keys) * (scale or 1 / math.sqrt(H))
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    pos, kpos = past + np.arange(T)[:, None], np.arange(past + T)[None, :]
    allowed = (kpos <= pos) & ((kpos > pos - W) if W > 0 else True)
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("ntk,knh->tnh", p, vals).reshape(T, N * H)


@pytest.mark.parametrize("rotary,W,softcap,N,Nkv,past", [
    ("none", -1, 0.0, 4, 4, 0), ("neox", -1, 0.0, 4, 2, 9), ("gptj", 3, 0.0, 6, 2, 5),
    ("neox", 100, 3.0, 3, 1, 17), ("gptj", 1, 50.0, 8, 4, 0), ("none", 4, 0.7, 2, 1, 30)])
def test_naive_matches_dense(rotary, W, softcap, N, Nkv, past):
    rng = np.random.default_rng(seed_of(f"dense{rotary}{W}{softcap}{N}{past}"))
    T, H, bs = 7, 16, 64
    q, k, v = (rng.standard_normal((T, n * H)) for n in (N, Nkv, Nkv))
    kc = rng.standard_normal((1, bs, Nkv, H))
    vc = rng.standard_normal((1, bs, Nkv, H))
    cos = sin = None
    if rotary != "none":
        cos, sin = rng.uniform(-1, 1, (2, past + T, 6))
    out, _, _ = naive_paged_attention(
        q, k, v, kc, vc, np.array([0, T], np.int32), np.array([past], np.int32),
        np.array([[0]], np.int32), cos, sin, num_heads=N, kv_num_heads=Nkv, scale=0.3,
        softcap=softcap, local_window_size=W, do_rotary=rotary != "none",
        rotary_interleaved=rotary == "gptj")
    want = dense_attention(q, k, v, past, N, Nkv, 0.3, softcap, W, cos, sin, rotary == "gptj",
                           kc[0, :past], vc[0, :past])
    assert rel_err(out, want) < 1e-13


# ----------------------------------------------------------------------------- properties
def _call_reference(args, kwargs):
    args = list(args)
    args[3], args[4] = args[3].copy(), args[4].copy()
    out = paged_attention_reference(*args, **kwargs, compute_dtype=np.float64)
    return out, args[3], args[4]


def test_qlen0_sequences_have_no_rows():
    """T counts only real tokens: dropping the q_len-0 sequences changes nothing."""
    case = Case("qlen0-drop", lens=((0, 5), (3, 2), (0, 0), (4, 9), (0, 30)), bs=3,
                rotary="neox", W=6)
    inp = make_inputs(case, np.random.default_rng(seed_of(case.name)))
    out, kc, vc = _call_reference(inp.args, inp.kwargs)
    assert out.shape == (7, case.N * case.H)
    keep = [b for b, q in enumerate(inp.q_lens) if q > 0]
    q, k, v, kc0, vc0, cum, past, table, cos, sin = inp.args
    lens = np.array(inp.q_lens)[keep]
    small = (q, k, v, kc0, vc0, np.concatenate([[0], np.cumsum(lens)]).astype(np.int32),
             past[keep], table[keep], cos, sin)
    out2, kc2, vc2 = _call_reference(small, inp.kwargs)
    assert rel_err(out2, out) <= 1e-14
    assert np.array_equal(bits(kc2), bits(kc)) and np.array_equal(bits(vc2), bits(vc))


@pytest.mark.parametrize("W", [-1, 1])
def test_row_seeing_no_key_is_exactly_zero(W):
    """Positions 6, 7 sit in an unmapped block: not written; with W = 1 they see no key."""
    case = Case("no-key", lens=((3, 6), (2, 1)), bs=4, W=W, rotary="gptj")
    inp = make_inputs(case, np.random.default_rng(seed_of(case.name)))
    table = inp.args[7]
    table[0, :3] = [0, -1, 1]
    table[1, :] = -1                                   # a whole row unmapped: rows 3, 4 are 0
    out, kc, vc = _call_reference(inp.args, inp.kwargs)
    zero = [0, 1, 3, 4] if W == 1 else [3, 4]
    assert sorted(empty_rows(inp)) == zero
    assert np.all(out[zero] == 0) and np.all(np.abs(out[2]) > 0)
    check_against_naive(inp, out, kc, vc, "float64", f"[{case}]")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_api_fills_out_argument(dtype):
    import cupy_paged
    case = Case("api-out", mode="chunk", bs=3, rotary="neox", dtype=dtype, W=5)
    inp = make_inputs(case, np.random.default_rng(seed_of(case.name + dtype)))
    args = list(inp.args)
    args[3], args[4] = args[3].copy(), args[4].copy()
    buf = np.full((args[0].shape[0], case.N * case.H), np.nan, dtype=dtype)
    got = cupy_paged.paged_attention(*args, **inp.kwargs, backend="reference", out=buf)
    assert got is buf or np.shares_memory(got, buf)
    check_against_naive(inp, buf, args[3], args[4], dtype, f"[{case}]")


@st.composite
def random_cases(draw):
    nkv = draw(st.integers(1, 3))
    B = draw(st.integers(1, 4))
    lens = tuple((draw(st.integers(0, 4)), draw(st.integers(0, 12))) for _ in range(B))
    rotary = draw(st.sampled_from(["none", "neox", "gptj"]))
    H = draw(st.sampled_from([8, 16]))
    return Case(
        "hyp", lens=lens, N=nkv * draw(st.integers(1, 3)), Nkv=nkv, H=H,
        bs=draw(st.sampled_from([1, 2, 3, 5, 8])), packed=draw(st.booleans()), rotary=rotary,
        R=draw(st.sampled_from([0, 2, H // 2])), W=draw(st.sampled_from([-1, 0, 1, 2, 4, 100])),
        softcap=draw(st.sampled_from([0.0, 0.5, 20.0])), scale=draw(st.sampled_from([0.0, 0.7])),
        q_gain=draw(st.sampled_from([1.0, 6.0])), share=draw(st.integers(0, 1)),
        holes=draw(st.integers(0, 2)), spare=draw(st.integers(0, 3)),
        extra_cols=draw(st.integers(0, 2)))


@settings(max_examples=50, deadline=None)
@given(case=random_cases(), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_matches_naive(case, seed):
    inp = make_inputs(case, np.random.default_rng(seed))
    out, kc, vc = run_impl(inp, False, "float64")
    check_against_naive(inp, out, kc, vc, "float64", f"[{case} seed={seed}]")


@settings(max_examples=50, deadline=None)
@given(case=random_cases(), seed=st.integers(0, 2**32 - 1))
def test_hypothesis_block_relabelling_is_invisible(case, seed):
    """Renaming physical blocks (table and caches together) permutes the caches, nothing more."""
    rng = np.random.default_rng(seed)
    inp = make_inputs(case, rng)
    out, kc, vc = _call_reference(inp.args, inp.kwargs)
    args = list(inp.args)
    perm = rng.permutation(args[3].shape[0])          # old block i becomes perm[i]
    inv = np.argsort(perm)
    args[3], args[4] = args[3][inv], args[4][inv]
    args[7] = np.where(args[7] >= 0, perm[np.maximum(args[7], 0)], -1).astype(np.int32)
    out2, kc2, vc2 = _call_reference(args, inp.kwargs)
    assert rel_err(out2, out) <= 1e-14, f"[{case} seed={seed}]"
    assert np.array_equal(bits(kc2[perm]), bits(kc)) and np.array_equal(bits(vc2[perm]), bits(vc))


@pytest.mark.parametrize("T", [0, 3])
def test_zero_block_cache_all_unmapped(T):
    """num_blocks = 0 is legal when every table entry is -1: nothing written, every row 0."""
    kc = np.zeros((0, 4, 2, 8))
    q, k = np.ones((T, 32)), np.ones((T, 16))
    args = (q, k, k, kc, kc.copy(), np.array([0, T], np.int32), np.array([5], np.int32),
            np.full((1, 3), -1, np.int32))
    out, _, _ = _call_reference(args, dict(num_heads=4, kv_num_heads=2))
    assert out.shape == (T, 32) and np.all(out == 0)


def test_empty_batch():
    """B = 0: cum = [0], no rows, caches untouched."""
    kc = np.random.default_rng(0).standard_normal((2, 4, 1, 8))
    args = (np.ones((0, 8)), np.ones((0, 8)), np.ones((0, 8)), kc, kc.copy(),
            np.zeros(1, np.int32), np.zeros(0, np.int32), np.zeros((0, 2), np.int32))
    out, kc2, vc2 = _call_reference(args, dict(num_heads=1, kv_num_heads=1))
    assert out.shape == (0, 8) and np.array_equal(kc2, kc) and np.array_equal(vc2, kc)
