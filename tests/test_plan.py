"""The public plan API on the host (NumPy arrays run the reference): ``cupy_paged.plan`` gives
the plan ``paged_attention`` makes for the same signature, says which backend and why, runs
calls of that signature and refuses others; options a backend does not take are named."""
import numpy as np
import pytest

import cupy_paged as cpg
from cupy_paged import backends
from cupy_paged.backends.plan import DEFAULT_OPTIONS, PlanOptions


def _arrays(rng, T=5, B=2, N=4, Nkv=2, H=16, bs=4, blocks=8):
    q = rng.standard_normal((T, N * H)).astype(np.float32)
    k = rng.standard_normal((T, Nkv * H)).astype(np.float32)
    v = rng.standard_normal((T, Nkv * H)).astype(np.float32)
    kc = rng.standard_normal((blocks, bs, Nkv, H)).astype(np.float32)
    vc = rng.standard_normal((blocks, bs, Nkv, H)).astype(np.float32)
    cum = np.array([0, 3, T], dtype=np.int32)
    past = np.array([2, 5], dtype=np.int32)
    table = np.array([[0, 1, 2, 3], [4, 5, 6, 7]], dtype=np.int32)
    return [q, k, v, kc, vc, cum, past, table]


def test_plan_runs_the_call_paged_attention_runs():
    rng = np.random.default_rng(0)
    args = _arrays(rng)
    p = cpg.plan(*args, num_heads=4, kv_num_heads=2, softcap=3.0)
    assert p.backend == "reference" and "reference" in p.reason and p.launches == ()
    mine = [a.copy() for a in args]
    theirs = [a.copy() for a in args]
    got = p(*mine)
    want = cpg.paged_attention(*theirs, num_heads=4, kv_num_heads=2, softcap=3.0)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mine[3], theirs[3])      # the caches were written alike
    assert "AttentionPlan reference" in repr(p)


def test_a_plan_refuses_arrays_of_another_signature():
    rng = np.random.default_rng(1)
    p = cpg.plan(*_arrays(rng), num_heads=4, kv_num_heads=2)
    other = _arrays(rng, T=6)
    other[5] = np.array([0, 3, 6], dtype=np.int32)
    with pytest.raises(ValueError, match="these arrays differ from it"):
        p(*other)


def test_paged_attention_reuses_one_plan_per_signature():
    rng = np.random.default_rng(2)
    args = _arrays(rng)
    cpg.paged_attention(*args, num_heads=4, kv_num_heads=2)
    before = dict(backends._PLANS)
    cpg.paged_attention(*_arrays(rng), num_heads=4, kv_num_heads=2)
    assert backends._PLANS == before                        # found, not made again
    made = cpg.plan(*args, num_heads=4, kv_num_heads=2)
    assert any(made._plan is held for _, held in backends._PLANS.values())


@pytest.mark.parametrize("option", [dict(tile="x"), dict(num_splits=2),
                                    dict(programmatic=True), dict(arch_tag=75)])
def test_an_option_the_backend_does_not_take_is_named(option):
    rng = np.random.default_rng(3)
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"options.{name}: the reference backend does not"):
        cpg.paged_attention(*_arrays(rng), num_heads=4, kv_num_heads=2,
                            options=PlanOptions(**option))


def test_plan_options_are_values():
    assert PlanOptions() == DEFAULT_OPTIONS and hash(PlanOptions(num_splits=3)) == hash(
        PlanOptions(num_splits=3))
    with pytest.raises(ValueError, match="options.arch_tag: the flash backend does not take"):
        PlanOptions(arch_tag=75).check("flash", ("tile", "num_splits", "programmatic"))
