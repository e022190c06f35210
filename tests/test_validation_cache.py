"""The static argument checks are cached by argument signature (``_validate.check_arguments``).

A signature that passed must not let a different one through (bool head counts, strided views);
the same signature returns the same Problem, and numpy bool flags become Python bools in it.
"""
import numpy as np
import pytest

try:
    from .test_validation import N, NKV, POSITIONAL, _runs, call, make_case
except ImportError:
    from test_validation import N, NKV, POSITIONAL, _runs, call, make_case


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

