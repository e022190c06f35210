"""Differential fuzz of the NumPy reference (through ``cupy_paged.paged_attention`` on NumPy
arrays) against the naive per-token loop of ``naive_paged_attention.py``, over random valid
calls drawn by ``fuzz_strategies.py``: B = 0 and q_len-0 sequences, GQA/MQA, any H % 8 == 0,
block sizes 1 and non-powers of two, shuffled tables with holes, -1 or garbage padding and
read-only blocks aliased across and within rows, partial NeoX/GPT-J rotary, packed QKV, window,
softcap, custom scale, host bounds, float32/float64/float16.

CI budget: derandomized (a fixed example sequence: never flaky, same on every run) and about
half a minute on two cores. ``CUPY_PAGED_FUZZ_CPU_EXAMPLES`` overrides the example count for a
longer local run (derandomize still fixes the sequence; change the count to see new examples).
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupy_paged
from cupy_paged.reference import paged_attention_reference

try:
    from . import sampled_attention as sa
    from .fuzz_strategies import build_inputs, describe, fuzz_configs, host_bounds
    from .naive_paged_attention import naive_paged_attention
    from .paged_cases import bits, check_against_naive, rel_err
except ImportError:
    import sampled_attention as sa
    from fuzz_strategies import build_inputs, describe, fuzz_configs, host_bounds
    from naive_paged_attention import naive_paged_attention
    from paged_cases import bits, check_against_naive, rel_err

EXAMPLES = int(os.environ.get("CUPY_PAGED_FUZZ_CPU_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The naive loop is Python per (token, head, key): small shapes keep an example ~10 ms.
CPU_CONFIGS = fuzz_configs(head_sizes=(8, 16, 24, 40), dtypes=("float32", "float64", "float16"),
                           max_batch=6, small_q=4, max_q=10, small_past=12, max_past=40)
SEEDS = st.integers(0, 2**32 - 1)


@FUZZ
@given(cfg=CPU_CONFIGS, seed=SEEDS, use_out=st.booleans())
def test_reference_matches_naive(cfg, seed, use_out):
    inp = build_inputs(cfg, np.random.default_rng(seed))
    args = list(inp.args)
    args[3], args[4] = args[3].copy(), args[4].copy()       # inp keeps the originals
    T, N, H = args[0].shape[0], cfg.N, cfg.H
    out = np.full((T, N * H), np.nan, dtype=cfg.dtype) if use_out else None
    got = cupy_paged.paged_attention(*args, **inp.kwargs, **host_bounds(cfg, inp), out=out)
    if use_out:
        assert got is out
    check_against_naive(inp, got, args[3], args[4], cfg.dtype, f"[{describe(cfg, seed)}]")


# The same strategy with larger lengths: properties that need no naive loop.
WIDE_CONFIGS = fuzz_configs(head_sizes=(8, 16, 64), dtypes=("float64",), max_batch=6,
                            small_q=6, max_q=40, small_past=30, max_past=200,
                            groups=(1, 2, 4, 8), max_heads=16, block_sizes=(1, 3, 7, 16, 64))


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 10))
@given(cfg=WIDE_CONFIGS, seed=SEEDS, data=st.data())
def test_sequence_order_is_invisible(cfg, seed, data):
    """Reordering the sequences of a batch (their rows, past lengths and table rows together)
    reorders the output rows and leaves the caches bit-identical: sequences never see each
    other, and read-only aliased blocks are only read."""
    inp = build_inputs(cfg, np.random.default_rng(seed))
    q, k, v, kc, vc, cum, past, table, cos, sin = inp.args
    B = len(inp.q_lens)
    perm = np.array(data.draw(st.permutations(range(B))), dtype=np.int64)
    rows = [np.arange(cum[b], cum[b + 1]) for b in range(B)]
    order = np.concatenate([rows[b] for b in perm] + [np.zeros(0, np.int64)]).astype(np.int64)
    lens = np.array(inp.q_lens, dtype=np.int64)[perm]
    cum2 = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    kc1, vc1, kc2, vc2 = kc.copy(), vc.copy(), kc.copy(), vc.copy()
    out1 = paged_attention_reference(q, k, v, kc1, vc1, cum, past, table, cos, sin,
                                     **inp.kwargs, compute_dtype=np.float64)
    out2 = paged_attention_reference(q[order], None if k is None else k[order],
                                     None if v is None else v[order], kc2, vc2, cum2,
                                     past[perm], table[perm], cos, sin, **inp.kwargs,
                                     compute_dtype=np.float64)
    assert rel_err(out2, out1[order]) <= 1e-13, describe(cfg, seed)
    assert np.array_equal(bits(kc2), bits(kc1)) and np.array_equal(bits(vc2), bits(vc1))


@settings(FUZZ, max_examples=max(EXAMPLES // 6, 10))
@given(cfg=WIDE_CONFIGS, seed=SEEDS)
def test_sampled_attention_helper_matches_reference(cfg, seed):
    """tests/sampled_attention.py (the scale tests' oracle for sampled rows) agrees with the
    reference on every row, from the caches the reference wrote."""
    inp = build_inputs(cfg, np.random.default_rng(seed))
    q, k, v, kc, vc, cum, past, table, cos, sin = inp.args
    kc, vc = kc.copy(), vc.copy()
    ref = paged_attention_reference(q, k, v, kc, vc, cum, past, table, cos, sin, **inp.kwargs,
                                    compute_dtype=np.float64)
    N, H = cfg.N, cfg.H
    for b, (q_len, p0) in enumerate(zip(inp.q_lens, inp.pasts)):
        if q_len == 0:
            continue
        rows = q[cum[b]:cum[b + 1], :N * H].reshape(q_len, N, H).astype(np.float32)
        pos = np.arange(p0, p0 + q_len)
        if cfg.rotary != "none":
            rows = sa.rotate(np, rows, cos[pos], sin[pos], cfg.rotary == "gptj")
        keys, values, mapped = sa.sequence_keys(np, kc, vc, table[b], p0 + q_len)
        got = sa.attention_rows(np, rows, pos, keys, values, mapped, scale=cfg.scale,
                                softcap=cfg.softcap, window=cfg.W, chunk=3)
        want = ref[cum[b]:cum[b + 1]]
        assert rel_err(got, want) <= 2e-5, f"sequence {b}: {describe(cfg, seed)}"
        assert np.all(got[np.all(want == 0, axis=1)] == 0)


def test_nan_in_an_unread_block_does_not_leak_through_unmapped_positions():
    """Block 0 is used by no sequence and holds NaN; the sequence's first block is -1. The
    GPU backends zero unmapped keys (flash's zero-fill loads, mea's gather); so must the
    reference: positions in unmapped blocks take no part in the call (spec step 4)."""
    kc = np.zeros((2, 2, 1, 8))
    vc = np.zeros((2, 2, 1, 8))
    kc[0] = vc[0] = np.nan
    kc[1], vc[1] = 1.0, 2.0
    q = np.ones((1, 8))
    args = (q, q.copy(), q.copy(), kc, vc, np.array([0, 1], np.int32),
            np.array([3], np.int32), np.array([[-1, 1]], np.int32))
    want, _, _ = naive_paged_attention(*args, num_heads=1, kv_num_heads=1)
    got = cupy_paged.paged_attention(*args, num_heads=1, kv_num_heads=1)
    assert np.isfinite(got).all() and rel_err(got, want) <= 1e-12
