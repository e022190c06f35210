"""The latent (MLA) cache layout (docs/semantics.md, "Latent (MLA) layout"):
``kv_cache_layout="latent"`` with one cached latent head whose first ``v_head_size`` channels
are V. The reference against the naive per-token loop (H = 576, Hv = 512, rope on the last 64
channels, and everything that composes), the layout against equivalent standard-layout calls,
one test per validation rule, failing calls that change nothing, and the GPU backends refusing
it by name (``python -m cupy_paged info`` lists the reference alone).
"""
import dataclasses
import re

import ml_dtypes
import numpy as np
import pytest

import cupy_paged as cpg
from cupy_paged import _validate, info
from cupy_paged.backends import BACKENDS, UnsupportedError, choose_backend

try:
    from .optional_cases import MLA_SCALE, latent_cases, make_latent_inputs
    from .paged_cases import KROT_TOL, OUT_TOL, bits, empty_rows, rel_err, seed_of, written_slots
    from .naive_paged_attention import naive_paged_attention
    from .test_validation import POSITIONAL, call, make_case
except ImportError:
    from optional_cases import MLA_SCALE, latent_cases, make_latent_inputs
    from paged_cases import KROT_TOL, OUT_TOL, bits, empty_rows, rel_err, seed_of, written_slots
    from naive_paged_attention import naive_paged_attention
    from test_validation import POSITIONAL, call, make_case

CASES = latent_cases()
RUNS = [pytest.param(case, dtype, id=f"{case.name}-{dtype}")
        for case in CASES for dtype in case.dtypes]


def check_latent_against_naive(inp, out, kc, dtype, tag):
    """out (T, N*Hv) and the written key cache kc against the naive loop; the slots the call
    must not write are unchanged."""
    exp, exp_kc, exp_vc = naive_paged_attention(*inp.args, **inp.kwargs)
    assert exp_vc is None, f"{tag}: naive bug"
    query, key_cache = inp.args[0], inp.args[3]
    N, Hv = inp.kwargs["num_heads"], inp.kwargs["v_head_size"]
    assert out.shape == (query.shape[0], N * Hv), f"{tag}: out shape {out.shape}"
    assert out.dtype == query.dtype and np.isfinite(out).all(), tag
    err = rel_err(out, exp)
    assert err <= OUT_TOL[dtype], f"{tag}: relative output error {err:.3e} > {OUT_TOL[dtype]}"
    for t in empty_rows(inp):
        assert np.all(out[t] == 0), f"{tag}: row {t} sees no key but is not 0"
    mask = written_slots(inp)
    changed = np.argwhere((bits(kc) != bits(key_cache)).any(axis=(2, 3)) & ~mask)
    assert changed.size == 0, f"{tag}: key_cache changed at unwritten {changed[:5].tolist()}"
    if inp.kwargs["do_rotary"] or inp.kwargs.get("q_norm_weight") is not None:
        if str(kc.dtype) in ("int8", "float8_e4m3fn"):        # float64: the same arithmetic
            np.testing.assert_array_equal(bits(kc[mask]), bits(exp_kc[mask]), err_msg=tag)
        else:
            rtol, atol = KROT_TOL[dtype]
            np.testing.assert_allclose(kc[mask].astype(np.float64),
                                       exp_kc[mask].astype(np.float64), rtol=rtol, atol=atol,
                                       err_msg=tag)
    else:
        np.testing.assert_array_equal(bits(kc[mask]), bits(exp_kc[mask]), err_msg=tag)


def _run(inp, dtype, api):
    args = list(inp.args)
    args[3] = args[3].copy()
    if api:
        out = cpg.paged_attention(*args, **inp.kwargs)
    else:
        out = cpg.paged_attention_reference(*args, **inp.kwargs, compute_dtype=np.dtype(dtype))
    return out, args[3]


@pytest.mark.parametrize("case, dtype", RUNS)
def test_reference_matches_naive(case, dtype):
    case = dataclasses.replace(case, base=dataclasses.replace(case.base, dtype=dtype))
    seed = seed_of(case.name)
    inp = make_latent_inputs(case, np.random.default_rng(seed))
    out, kc = _run(inp, dtype, api=False)
    check_latent_against_naive(inp, out, kc, dtype, f"[{case.name} {dtype} seed={seed}]")


@pytest.mark.parametrize("case", CASES[::3], ids=lambda c: c.name)
def test_api_on_numpy_matches_naive(case):
    inp = make_latent_inputs(case, np.random.default_rng(seed_of(case.name)))
    out, kc = _run(inp, "float64", api=True)
    check_latent_against_naive(inp, out, kc, "float64", case.name)


# ---------------------------------------------------------------- against the standard layout

def latent_kw(*, H=576, Hv=512, N=8, dtype=np.float64, seed=0, rotary=False, q_lens=(3, 0, 5),
              **changes):
    """A valid latent call (make_case's metadata: T = 8, block_size 4, 10 blocks), as a dict
    for ``call``; rotary: rope on channels [Hv, H) (rotary_offset = Hv)."""
    kw = make_case(dtype=dtype, num_heads=N, kv_num_heads=1, head_size=H, seed=seed,
                   rotary=rotary, half=(H - Hv) // 2, q_lens=q_lens)
    kw.update(value=None, value_cache=None, kv_cache_layout="latent", v_head_size=Hv,
              scale=MLA_SCALE)
    if rotary:
        kw["rotary_offset"] = Hv
    kw.update(changes)
    return kw


def _copy_caches(kw):
    return dict(kw, **{n: kw[n].copy() for n in ("key_cache", "value_cache")
                       if kw.get(n) is not None})


@pytest.mark.parametrize("quant", ["", "int8"])
def test_full_width_v_equals_the_standard_call_with_value_key(quant):
    """v_head_size = head_size: the latent call is the standard call with Nkv = 1,
    value = key and value_cache = key_cache (a copy), bit for bit, caches included."""
    kw = latent_kw(Hv=576, scale=0.0, seed=1)
    if quant:
        kw["key_cache"] = np.random.default_rng(2).integers(-128, 128, kw["key_cache"].shape,
                                                             dtype=np.int8)
        kw["k_scale"] = np.full((1, 1, 576), 0.03, np.float32)
    lat = _copy_caches(kw)
    out = call(lat)
    std = dict(_copy_caches(kw), value=kw["key"], kv_cache_layout="standard",
               v_head_size=None, value_cache=kw["key_cache"].copy())
    if quant:
        std["v_scale"] = kw["k_scale"]
    np.testing.assert_array_equal(out, call(std))
    np.testing.assert_array_equal(lat["key_cache"], std["key_cache"])
    np.testing.assert_array_equal(std["value_cache"], std["key_cache"])


@pytest.mark.parametrize("rotary", [False, True], ids=["plain", "rope-512"])
def test_narrow_v_equals_the_standard_call_on_zero_padded_values(rotary):
    """Hv < H: the standard layout cannot hold a narrower V, but it can hold V padded with
    zeros: value = key and value_cache = key_cache with channels [Hv, H) zeroed. Its output's
    first Hv channels per head are the latent output, the rest 0. With rope on [Hv, H) only
    (DeepSeek's rotary_offset = 512), rotating the key leaves V as it was."""
    kw = latent_kw(seed=3, rotary=rotary)
    lat = _copy_caches(kw)
    out = call(lat)
    padded_v = kw["key"].copy()
    padded_v[:, 512:] = 0
    padded_cache = kw["key_cache"].copy()
    padded_cache[..., 512:] = 0
    std = dict(_copy_caches(kw), value=padded_v, value_cache=padded_cache,
               kv_cache_layout="standard", v_head_size=None)
    wide = call(std).reshape(-1, 8, 576)
    np.testing.assert_allclose(out.reshape(-1, 8, 512), wide[..., :512], rtol=1e-12, atol=1e-14)
    assert not wide[..., 512:].any()
    np.testing.assert_array_equal(lat["key_cache"], std["key_cache"])


def test_v_is_read_back_from_the_key_cache():
    """Sequence 0 (rows 0-2; past 2, in block 5): bumping channels [0, Hv) of its cached
    position 0 (its K and its V at once) changes its rows and no other sequence's."""
    kw = latent_kw(seed=4)
    base = call(_copy_caches(kw))
    bumped = _copy_caches(kw)
    bumped["key_cache"][5, 0, 0, :512] += 1.0
    got = call(bumped)
    assert np.abs(got[:3] - base[:3]).max() > 1e-6
    np.testing.assert_array_equal(got[3:], base[3:])


def test_v_head_size_none_is_head_size_and_standard_takes_head_size():
    kw = latent_kw(Hv=576, scale=0.0, seed=5)
    a = call(_copy_caches(kw))
    b = call(_copy_caches(dict(kw, v_head_size=None)))
    np.testing.assert_array_equal(a, b)
    std = make_case(dtype=np.float64, seed=6)
    np.testing.assert_array_equal(call(_copy_caches(dict(std, v_head_size=16))),
                                  call(_copy_caches(std)))


def test_plan_runs_latent_calls_and_no_tokens_is_legal():
    kw = latent_kw(seed=7, rotary=True)
    args = [kw[n] for n in POSITIONAL]
    rest = {k: v for k, v in kw.items() if k not in POSITIONAL}
    p = cpg.plan(*args, **rest)
    assert p.backend == "reference"
    expected = call(_copy_caches(kw))
    np.testing.assert_array_equal(p(*args[:3], args[3].copy(), *args[4:]), expected)
    empty = latent_kw(seed=8, q_lens=(0, 0, 0))
    before = empty["key_cache"].copy()
    assert call(empty).shape == (0, 8 * 512)
    np.testing.assert_array_equal(empty["key_cache"], before)


# ---------------------------------------------------------------- one test per rule

H, HV, N = 576, 512, 8
T = 8


def _one_byte(kw, kind=np.int8, scale_shape=(1,)):
    return dict(kw, key_cache=np.zeros(kw["key_cache"].shape, kind),
                k_scale=np.full(scale_shape, 0.05, np.float32))


RULES = [
    ("layout-unknown", dict(kv_cache_layout="paged"), ValueError,
     "kv_cache_layout: expected one of 'standard', 'latent', got 'paged'"),
    ("layout-none", dict(kv_cache_layout=None), ValueError,
     "kv_cache_layout: expected one of 'standard', 'latent', got None"),
    ("kv-heads-not-1", lambda kw: dict(kw, kv_num_heads=2), ValueError,
     "kv_num_heads: kv_cache_layout='latent' caches one latent head per token, expected 1, "
     "got 2"),
    ("value-given", lambda kw: dict(kw, value=kw["key"].copy()), ValueError,
     f"value: expected None with kv_cache_layout='latent' (V is the leading v_head_size "
     f"channels of the cached key), got an array of shape ({T}, {H})"),
    ("value-cache-given", lambda kw: dict(kw, value_cache=kw["key_cache"].copy()), ValueError,
     "value_cache: expected None with kv_cache_layout='latent' (the latent layout has one "
     f"cache, key_cache; V is read from it), got an array of shape (10, 4, 1, {H})"),
    ("v-scale-given", lambda kw: dict(_one_byte(kw), v_scale=np.ones(1, np.float32)),
     ValueError, "v_scale: expected None with kv_cache_layout='latent' (V is read from the key "
                 "cache and dequantised with k_scale), got an array of shape (1,)"),
    ("packed", lambda kw: dict(kw, key=None, query=np.zeros((T, (N + 2) * H))), ValueError,
     "key, value: both None (a packed QKV query) with kv_cache_layout='latent'"),
    ("v-head-size-not-multiple-of-8", dict(v_head_size=500), ValueError,
     "v_head_size: expected a positive multiple of 8, got 500"),
    ("v-head-size-zero", dict(v_head_size=0), ValueError,
     "v_head_size: expected a positive multiple of 8, got 0"),
    ("v-head-size-negative", dict(v_head_size=-8), ValueError,
     "v_head_size: expected a positive multiple of 8, got -8"),
    ("v-head-size-above-head-size", dict(v_head_size=584), ValueError,
     f"v_head_size: V is the leading channels of the cached key, expected at most head_size = "
     f"{H}, got 584"),
    ("v-head-size-float", dict(v_head_size=512.0), ValueError,
     "v_head_size: expected an integer, got 512.0"),
    ("v-head-size-bool", dict(v_head_size=True), ValueError,
     "v_head_size: expected an integer, got True"),
    ("scale-default-with-narrow-v", dict(scale=0.0), ValueError,
     f"scale: with v_head_size = {HV} != head_size = {H} pass the softmax scale explicitly"),
    ("out-shape", lambda kw: dict(kw, out=np.zeros((T, N * H))), ValueError,
     f"out: expected shape ({T}, {N * HV}) = (T, num_heads * v_head_size), got ({T}, {N * H})"),
    ("key-shape", lambda kw: dict(kw, key=np.zeros((T, 2 * H))), ValueError,
     f"key: expected shape ({T}, {H}) = (T, kv_num_heads * head_size), got ({T}, {2 * H})"),
    ("k-scale-shape", lambda kw: _one_byte(kw, scale_shape=(1, 1, HV)), ValueError,
     f"k_scale: expected shape (1,) (per tensor) or (kv_num_heads, 1, head_size) = (1, 1, {H}) "
     f"(per channel), got (1, 1, {HV})"),
    ("k-cache-one-byte-without-scale", lambda kw: dict(_one_byte(kw), k_scale=None),
     ValueError, "k_scale: a int8 key_cache needs its scale"),
    ("k-norm-shape", lambda kw: dict(kw, q_norm_weight=np.ones(H), k_norm_weight=np.ones(HV)),
     ValueError, f"k_norm_weight: expected shape (head_size,) = ({H},), got ({HV},)"),
    ("rotary-past-head-size", lambda kw: dict(latent_kw(rotary=True), rotary_offset=520),
     ValueError, f"rotary_offset: channels [520, 520 + rotary_dim = 584) reach past head_size = "
                 f"{H}"),
    ("non-causal-window", dict(is_causal=False, local_window_size=3), ValueError,
     "local_window_size: 3 with is_causal=False is not defined here"),
]


@pytest.mark.parametrize("change, exc, message",
                         [pytest.param(c, e, m, id=i) for i, c, e, m in RULES])
def test_rejected(change, exc, message):
    kw = latent_kw(seed=9)
    kw = change(kw) if callable(change) else dict(kw, **change)
    before = {n: kw[n].copy() for n in ("key_cache", "value_cache") if kw.get(n) is not None}
    with pytest.raises(exc, match=re.escape(message)):
        call(kw)
    for name, old in before.items():
        np.testing.assert_array_equal(kw[name], old, err_msg=f"{name} written")


def test_standard_layout_refuses_another_v_head_size():
    with pytest.raises(ValueError, match=re.escape(
            "v_head_size: the standard layout's V has head_size channels; expected None or "
            "head_size = 16, got 8")):
        call(dict(make_case(seed=10), v_head_size=8))


@pytest.mark.parametrize("name", ["key_cache", "value_cache"])
def test_standard_layout_refuses_a_missing_cache(name):
    with pytest.raises(TypeError, match=re.escape(
            f"{name}: expected an array (num_blocks, block_size, kv_num_heads, head_size), "
            "got None")):
        call(dict(make_case(seed=11), **{name: None}))


def test_standard_layout_still_refuses_value_none_with_key():
    with pytest.raises(ValueError, match=re.escape("value: is None but key is given")):
        call(dict(make_case(seed=12), value=None))


LATE = [   # data checks, which run after every static check and before any write
    pytest.param(dict(past_seqlens=np.array([2, 7, -1], np.int32)), id="past-negative"),
    pytest.param(dict(block_table=np.array([[5, 2, -1], [7, 0, -1], [9, 3, 10]], np.int32)),
                 id="block-id"),
    pytest.param(dict(past_seqlens=np.array([2, 7, 8], np.int32)), id="capacity"),
    pytest.param(dict(slot_mapping=np.full(T, 40, np.int32)), id="slot-out-of-range"),
    pytest.param(dict(key_cache=np.zeros((10, 4, 1, H), np.int8),
                      k_scale=np.zeros(1, np.float32)), id="k-scale-zero"),
    pytest.param(dict(key_cache=np.zeros((10, 4, 1, H), ml_dtypes.float8_e4m3fn),
                      k_scale=np.full((1, 1, H), np.nan, np.float32)), id="k-scale-nan"),
    pytest.param(dict(backend="flash"), id="flash-on-numpy"),
]


@pytest.mark.parametrize("change", LATE)
def test_failing_call_leaves_the_cache_and_out_untouched(change):
    kw = dict(latent_kw(seed=13), out=np.full((T, N * HV), 7.0), **change)
    before = {n: kw[n].copy() for n in ("key_cache", "out")}
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        call(kw)
    for name, old in before.items():
        np.testing.assert_array_equal(kw[name], old, err_msg=f"{name} changed")


# ---------------------------------------------------------------- who takes it

def latent_problem(dtype=np.float16, H_=64, Hv=32, **changes):
    """The Problem of a latent call (make_case's shapes, N = 4, H = 64, Hv = 32)."""
    kw = latent_kw(H=H_, Hv=Hv, N=4, dtype=dtype, seed=14, **changes)
    a = {n: kw.get(n) for n in POSITIONAL + ("out",)}
    attrs = {k: v for k, v in kw.items() if k not in POSITIONAL}
    attrs.setdefault("softcap", 0.0)
    attrs.setdefault("local_window_size", -1)
    attrs.setdefault("do_rotary", False)
    attrs.setdefault("rotary_interleaved", False)
    return _validate.check_arguments(a, **attrs)


def test_problem_records_the_layout_and_v_head_size():
    p = latent_problem()
    assert p.latent and p.kv_cache_layout == "latent"
    assert p.v_head_size == p.value_head_size == 32 and p.head_size == 64
    standard = _validate.Problem(**{**{f: getattr(p, f) for f in (
        "num_tokens", "batch", "num_heads", "kv_num_heads", "head_size", "block_size",
        "num_blocks", "max_blocks", "packed", "dtype", "scale", "softcap", "window",
        "do_rotary", "rotary_interleaved", "rotary_dim", "cos_rows")}})
    assert not standard.latent and standard.value_head_size == 64


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gpu_backends_refuse_latent_by_name_the_reference_takes_it(dtype):
    problem = latent_problem(dtype)
    assert BACKENDS["reference"].capabilities.reasons(problem, "numpy", None) == []
    for name in ("flash", "mea"):
        why = BACKENDS[name].capabilities.reasons(problem, "cupy", 90)
        assert "latent is not supported" in why
        if dtype == np.float16:
            assert why == ["latent is not supported"]      # the one reason: the layout
    with pytest.raises(UnsupportedError, match=r"(?s)flash: .*latent is not supported.*"
                                               r"mea: .*latent is not supported"):
        choose_backend("auto", problem, "cupy", 90)


def test_info_lists_the_reference_alone_for_latent():
    assert info.features()["latent"] == ["reference"]
