"""PagedKVCache in the latent (MLA) layout (docs/semantics.md, "Latent (MLA) layout"):
``layout="latent"`` allocates the key cache alone, ``attention_kwargs`` hands the call
``value_cache=None, kv_cache_layout="latent", v_head_size=Hv``, and ``gather`` reads V back as
the leading Hv channels of the cached key (dequantised for a one-byte cache). Calls through
the class are checked against direct ``paged_attention`` calls on the same arrays; one test per
constructor rule.
"""
import re

import numpy as np
import pytest

import cupy_paged as cpg
from cupy_paged.cache import PagedKVCache

MLA_SCALE = 192 ** -0.5        # DeepSeek-V3's softmax scale (Hv != H needs an explicit one)


def latent_cache(num_blocks=12, block_size=4, H=576, Hv=512, **kw):
    return PagedKVCache(num_blocks, block_size, kv_num_heads=1, head_size=H, layout="latent",
                        v_head_size=Hv, **kw)


# --------------------------------------------------------------------------- allocation

@pytest.mark.parametrize("dtype", [np.float16, np.float32, "int8", "float8_e4m3fn"])
def test_latent_allocates_the_key_cache_alone(dtype):
    scale = 0.05 if dtype in ("int8", "float8_e4m3fn") else None
    cache = latent_cache(dtype=dtype, scale=scale)
    assert cache.layout == "latent" and cache.latent
    assert cache.v_head_size == 512 and cache.head_size == 576 and cache.kv_num_heads == 1
    assert isinstance(cache.key_cache, np.ndarray)
    assert cache.key_cache.shape == (12, 4, 1, 576) and cache.key_cache.dtype == np.dtype(dtype)
    assert not cache.key_cache.astype(np.float32).any()
    assert cache.value_cache is None and cache.v_scale is None
    if scale is None:
        assert cache.k_scale is None
    else:
        assert cache.k_scale.shape == (1,) and cache.k_scale.dtype == np.float32
        assert float(cache.k_scale[0]) == np.float32(0.05)


def test_latent_v_head_size_none_is_head_size_and_standard_reports_head_size():
    full = PagedKVCache(4, 2, 1, 64, layout="latent")
    assert full.v_head_size == 64 and full.value_cache is None
    for v_head_size in (None, 64):
        std = PagedKVCache(4, 2, 2, 64, v_head_size=v_head_size)
        assert std.layout == "standard" and not std.latent and std.v_head_size == 64
        assert std.value_cache.shape == std.key_cache.shape == (4, 2, 2, 64)


def test_latent_repr_and_html_name_the_layout():
    cache = latent_cache()
    cache.begin_step({cache.add_sequence(): 5})
    assert "layout='latent', v_head_size=512" in repr(cache)
    assert "latent layout (key cache only, v_head_size=512)" in cache._repr_html_()
    assert "latent" not in repr(PagedKVCache(4, 2, 2, 8))
    assert "latent" not in PagedKVCache(4, 2, 2, 8)._repr_html_()


# --------------------------------------------------------------------------- one test per rule

def _args(**changes):
    args = dict(num_blocks=4, block_size=2, kv_num_heads=1, head_size=576, layout="latent",
                v_head_size=512)
    args.update(changes)
    return args


RULES = [
    ("layout-unknown", dict(layout="paged"), ValueError,
     "layout: expected one of 'standard', 'latent', got 'paged'"),
    ("layout-none", dict(layout=None), ValueError,
     "layout: expected one of 'standard', 'latent', got None"),
    ("layout-kv-cache-layout-spelling", dict(layout="MLA"), ValueError,
     "layout: expected one of 'standard', 'latent', got 'MLA'"),
    ("kv-heads-not-1", dict(kv_num_heads=2), ValueError,
     "kv_num_heads: layout='latent' caches one latent head per token, expected 1, got 2"),
    ("v-head-size-not-multiple-of-8", dict(v_head_size=500), ValueError,
     "v_head_size: expected a positive multiple of 8, got 500"),
    ("v-head-size-zero", dict(v_head_size=0), ValueError,
     "v_head_size: expected a positive multiple of 8, got 0"),
    ("v-head-size-negative", dict(v_head_size=-8), ValueError,
     "v_head_size: expected a positive multiple of 8, got -8"),
    ("v-head-size-above-head-size", dict(v_head_size=584), ValueError,
     "v_head_size: V is the leading channels of the cached key, expected at most "
     "head_size = 576, got 584"),
    ("v-head-size-float", dict(v_head_size=512.0), TypeError,
     "v_head_size must be an integer or None (got float 512.0)"),
    ("v-head-size-bool", dict(v_head_size=True), TypeError,
     "v_head_size must be an integer or None (got bool True)"),
    ("standard-narrow-v", dict(layout="standard", kv_num_heads=2, v_head_size=512), ValueError,
     "v_head_size: the standard layout's V has head_size channels; expected None or "
     "head_size = 576, got 512 (a narrower V needs layout='latent')"),
    ("latent-scale-pair", dict(dtype="int8", scale=(0.1, 0.1)), ValueError,
     "scale: a latent int8 cache has one cache, key_cache, and needs its scale alone (a "
     "number or a (1, 1, head_size) = (1, 1, 576) array; V is dequantised with it), got a "
     "tuple of 2 items"),
    ("latent-one-byte-without-scale", dict(dtype="float8_e4m3fn"), ValueError,
     "scale: a latent float8_e4m3fn cache has one cache, key_cache, and needs its scale "
     "alone"),
    ("latent-scale-shape", dict(dtype="int8", scale=np.ones((1, 1, 512))), ValueError,
     "scale: k_scale must be a number or of shape (kv_num_heads, 1, head_size) = "
     "(1, 1, 576), got (1, 1, 512)"),
    ("latent-scale-zero", dict(dtype="int8", scale=0.0), ValueError,
     "k_scale: every scale must be finite"),
    ("latent-float-cache-with-scale", dict(dtype=np.float16, scale=0.1), ValueError,
     "scale: only a one-byte cache"),
]


@pytest.mark.parametrize("changes, exc, message",
                         [pytest.param(c, e, m, id=i) for i, c, e, m in RULES])
def test_constructor_rule(changes, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        PagedKVCache(**_args(**changes))


def test_attention_kwargs_wants_the_step_metadata():
    cache = latent_cache()
    cache.begin_step({cache.add_sequence(): 1})
    with pytest.raises(TypeError, match="step must be the StepMetadata begin_step returned "
                                        r"\(got dict\)"):
        cache.attention_kwargs({}, None, None)


# --------------------------------------------------------------------------- calls through it

def _direct(cache, step, q, k, kc, **model):
    """The same call with every argument spelled out, on a copy of the key cache."""
    out = cpg.paged_attention(
        q, k, None, kc, None, step.cumulative_sequence_length, step.past_seqlens,
        step.block_table, num_heads=model.pop("num_heads"), kv_num_heads=1,
        kv_cache_layout="latent", v_head_size=cache.v_head_size, k_scale=cache.k_scale,
        **model)
    return out, kc


SHAPES = [pytest.param(576, 512, True, id="deepseek-576-512-rope"),
          pytest.param(64, 32, False, id="64-32"),
          pytest.param(64, 64, False, id="full-width-v")]


@pytest.mark.parametrize("H, Hv, rope", SHAPES)
def test_call_through_the_class_matches_a_direct_call(H, Hv, rope):
    """Prefill then decode steps (with a sequence sitting one out and a fork) through
    ``attention_kwargs``; each equals the direct latent call bit for bit, outputs and cache."""
    N, rng = 4, np.random.default_rng(H + Hv)
    cache = latent_cache(num_blocks=16, block_size=4, H=H, Hv=Hv, dtype=np.float64,
                         allocation="random", seed=1)
    model = dict(num_heads=N, scale=MLA_SCALE if Hv != H else 0.0)
    if rope:
        cos, sin = cpg.rotary_cache(max_pos=64, rotary_dim=H - Hv, dtype=np.float64)
        model.update(cos_cache=cos, sin_cache=sin, do_rotary=True, rotary_offset=Hv)
    a, b = cache.add_sequence(), cache.add_sequence()
    plan = [{a: 6, b: 3}, {a: 1, b: 1}, {a: 0, b: 5}, "fork", {a: 1, b: 1, "child": 2}]
    child = None
    for counts in plan:
        if counts == "fork":
            child = cache.fork(a)
            continue
        counts = {child if s == "child" else s: n for s, n in counts.items()}
        step = cache.begin_step(counts)
        T = step.num_tokens
        q = rng.standard_normal((T, N * H))
        k = rng.standard_normal((T, H))
        kw = cache.attention_kwargs(step, q, k)
        assert kw["value"] is None and kw["value_cache"] is None and kw["v_scale"] is None
        assert kw["kv_cache_layout"] == "latent" and kw["v_head_size"] == Hv
        assert kw["kv_num_heads"] == 1 and kw["key_cache"] is cache.key_cache
        expected, kc = _direct(cache, step, q, k, cache.key_cache.copy(), **dict(model))
        out = cpg.paged_attention(**kw, **model)
        assert out.shape == (T, N * Hv)
        np.testing.assert_array_equal(out, expected)
        np.testing.assert_array_equal(cache.key_cache, kc)
        if not rope:       # nothing rotates the key: the cache holds k as given
            start = 0
            for sid, n in counts.items():
                keys, values = cache.gather(sid)
                np.testing.assert_array_equal(keys[len(keys) - n:, 0], k[start:start + n])
                start += n


def test_call_matches_dense_attention_over_gathered_keys_and_values():
    """One decode row per sequence against softmax(scale q K^T) V with (K, V) from gather."""
    N, H, Hv, rng = 2, 64, 32, np.random.default_rng(5)
    cache = latent_cache(num_blocks=8, block_size=4, H=H, Hv=Hv, dtype=np.float64)
    sids = [cache.add_sequence() for _ in range(2)]
    step = cache.begin_step({sids[0]: 7, sids[1]: 2})
    cpg.paged_attention(**cache.attention_kwargs(step, rng.standard_normal((9, N * H)),
                                                 rng.standard_normal((9, H))),
                        num_heads=N, scale=0.3)
    step = cache.begin_step({s: 1 for s in sids})
    q = rng.standard_normal((2, N * H))
    out = cpg.paged_attention(**cache.attention_kwargs(step, q, rng.standard_normal((2, H))),
                              num_heads=N, scale=0.3)
    for row, sid in enumerate(sids):
        keys, values = cache.gather(sid)
        logits = 0.3 * q[row].reshape(N, H) @ keys[:, 0].T            # (N, length)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        np.testing.assert_allclose(out[row].reshape(N, Hv), p @ values[:, 0], rtol=1e-12)


def test_gather_values_are_a_copy_of_the_leading_key_channels():
    cache = latent_cache(num_blocks=6, block_size=3, H=64, Hv=40, dtype=np.float32)
    rng = np.random.default_rng(2)
    cache.key_cache[...] = rng.standard_normal(cache.key_cache.shape)
    sid = cache.add_sequence()
    cache.begin_step({sid: 8})
    keys, values = cache.gather(sid)
    assert keys.shape == (8, 1, 64) and values.shape == (8, 1, 40)
    assert keys.dtype == values.dtype == np.float32
    blocks = cache.blocks_of(sid)
    np.testing.assert_array_equal(keys, cache.key_cache[blocks].reshape(-1, 1, 64)[:8])
    np.testing.assert_array_equal(values, keys[..., :40])
    assert values.flags.c_contiguous and not np.shares_memory(values, keys)
    values[...] = 0
    assert cache.gather(sid)[1].any(), "gather's values alias the cache"


def test_fork_copies_the_partial_block_of_the_key_cache():
    cache = latent_cache(num_blocks=4, block_size=4, H=64, Hv=32, dtype=np.float32)
    parent = cache.add_sequence()
    cache.begin_step({parent: 6})
    cache.key_cache[...] = np.random.default_rng(3).standard_normal(cache.key_cache.shape)
    child = cache.fork(parent)
    assert cache.blocks_of(child)[0] == cache.blocks_of(parent)[0]
    assert cache.blocks_of(child)[1] != cache.blocks_of(parent)[1]
    for got, want in zip(cache.gather(child), cache.gather(parent)):
        np.testing.assert_array_equal(got, want)
    assert cache.value_cache is None


# --------------------------------------------------------------------------- one-byte caches

@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
def test_quantized_latent_cache(dtype, per_channel):
    """k_scale alone goes to the call; it equals the direct call; gather dequantises the keys
    with it and V is their leading Hv channels, within the quantisation step of the keys
    written."""
    N, H, Hv, rng = 4, 64, 32, np.random.default_rng(11)
    scale = np.linspace(0.01, 0.04, H, dtype=np.float32).reshape(1, 1, H) if per_channel \
        else 0.02
    cache = latent_cache(num_blocks=8, block_size=4, H=H, Hv=Hv, dtype=dtype, scale=scale)
    assert cache.key_cache.dtype == np.dtype(dtype) and cache.v_scale is None
    assert cache.k_scale.shape == ((1, 1, H) if per_channel else (1,))
    sid = cache.add_sequence()
    step = cache.begin_step({sid: 6})
    q = rng.standard_normal((6, N * H)).astype(np.float32)
    k = (0.5 * rng.standard_normal((6, H))).astype(np.float32)   # inside the int8 range
    kw = cache.attention_kwargs(step, q, k)
    assert kw["k_scale"] is cache.k_scale and kw["v_scale"] is None
    expected, kc = _direct(cache, step, q, k, cache.key_cache.copy(), num_heads=N,
                           scale=MLA_SCALE)
    out = cpg.paged_attention(**kw, num_heads=N, scale=MLA_SCALE)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(cache.key_cache.view(np.uint8), kc.view(np.uint8))

    keys, values = cache.gather(sid)
    assert keys.dtype == values.dtype == np.float32
    s = cache.k_scale if not per_channel else cache.k_scale[:, 0, :]
    raw = cache.key_cache[cache.blocks_of(sid)].reshape(-1, 1, H)[:6]
    np.testing.assert_array_equal(keys, raw.astype(np.float32) * s)
    np.testing.assert_array_equal(values, keys[..., :Hv])
    step_k = np.broadcast_to(np.asarray(s).reshape(-1), (H,))
    tol = 0.5 * step_k if dtype == "int8" else 0.07 * np.abs(k).max() + step_k
    assert (np.abs(keys[:, 0] - k) <= tol).all()


# --------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_cupy_latent_cache_allocates_and_gathers():
    cupy = pytest.importorskip("cupy")
    cache = latent_cache(num_blocks=6, block_size=4, H=64, Hv=32, xp=cupy, dtype="int8",
                         scale=0.5)
    assert isinstance(cache.key_cache, cupy.ndarray) and cache.value_cache is None
    assert isinstance(cache.k_scale, cupy.ndarray)
    sid = cache.add_sequence()
    cache.begin_step({sid: 5})
    cache.key_cache[...] = 2
    keys, values = cache.gather(sid)
    assert isinstance(values, cupy.ndarray) and values.shape == (5, 1, 32)
    assert (values.get() == 1.0).all() and (keys.get() == 1.0).all()
