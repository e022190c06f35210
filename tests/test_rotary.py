"""rotary_cache: values against the float64 formula, shapes, dtypes, argument errors."""

import math

import numpy
import pytest

from cupy_paged.rotary import rotary_cache


def _direct(max_pos, rotary_dim, base):
    """cos/sin of p * base ** (-2i / R), one Python float64 at a time."""
    half = rotary_dim // 2
    cos = numpy.empty((max_pos, half))
    sin = numpy.empty((max_pos, half))
    for p in range(max_pos):
        for i in range(half):
            angle = p * base ** (-2.0 * i / rotary_dim)
            cos[p, i], sin[p, i] = math.cos(angle), math.sin(angle)
    return cos, sin


@pytest.mark.parametrize("max_pos, rotary_dim, base", [
    (1, 2, 10000.0), (17, 8, 10000.0), (64, 64, 10000.0), (300, 40, 500000.0), (5, 6, 2),
])
def test_float64_values_match_the_formula(max_pos, rotary_dim, base):
    cos, sin = rotary_cache(max_pos, rotary_dim, base=base, dtype=numpy.float64)
    want_cos, want_sin = _direct(max_pos, rotary_dim, base)
    # Same math in a different order (vectorised power): a few ulp of the angle, which for
    # positions up to 300 is ~1e-13 absolute.
    numpy.testing.assert_allclose(cos, want_cos, rtol=0, atol=1e-12)
    numpy.testing.assert_allclose(sin, want_sin, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32])
def test_low_precision_tables_are_the_float64_values_rounded_once(dtype):
    cos, sin = rotary_cache(100, 32, dtype=dtype)
    assert cos.dtype == sin.dtype == dtype
    assert cos.shape == sin.shape == (100, 16)
    assert cos.flags.c_contiguous and sin.flags.c_contiguous
    want_cos, want_sin = _direct(100, 32, 10000.0)
    numpy.testing.assert_array_equal(cos, want_cos.astype(dtype))
    numpy.testing.assert_array_equal(sin, want_sin.astype(dtype))


def test_position_zero_is_the_identity_and_column_zero_has_unit_frequency():
    cos, sin = rotary_cache(10, 16, dtype=numpy.float64, xp="numpy")
    assert (cos[0] == 1).all() and (sin[0] == 0).all()
    numpy.testing.assert_allclose(sin[:, 0], numpy.sin(numpy.arange(10)), atol=1e-15)


def test_default_dtype_and_module():
    cos, sin = rotary_cache(4, 8)
    assert isinstance(cos, numpy.ndarray) and cos.dtype == numpy.float16
    cos, _ = rotary_cache(4, 8, xp=numpy)
    assert isinstance(cos, numpy.ndarray)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(max_pos=0), ValueError, r"max_pos must be >= 1 \(got 0\)"),
    (dict(max_pos=4.0), TypeError, "max_pos must be an integer"),
    (dict(rotary_dim=7), ValueError, r"rotary_dim must be even \(got 7\)"),
    (dict(rotary_dim=0), ValueError, r"rotary_dim must be >= 1 \(got 0\)"),
    (dict(rotary_dim=True), TypeError, "rotary_dim must be an integer"),
    (dict(base=0.0), ValueError, "base must be a finite number > 0"),
    (dict(base=float("inf")), ValueError, "base must be a finite number > 0"),
    (dict(base="10000"), TypeError, "base must be a number"),
    (dict(dtype=numpy.int16), TypeError, "dtype must be a floating dtype"),
    (dict(dtype="not-a-dtype"), TypeError, "dtype must be a floating dtype"),
    (dict(xp="jax"), TypeError, "xp must be"),
])
def test_errors_name_the_argument(kwargs, error, pattern):
    args = dict(max_pos=8, rotary_dim=8)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        rotary_cache(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("xp_arg", ["cupy", "module"])
def test_cupy_tables_equal_the_numpy_ones(xp_arg):
    cupy = pytest.importorskip("cupy")
    xp = cupy if xp_arg == "module" else "cupy"
    cos, sin = rotary_cache(50, 64, xp=xp)
    assert isinstance(cos, cupy.ndarray) and cos.dtype == numpy.float16
    want_cos, want_sin = rotary_cache(50, 64)
    numpy.testing.assert_array_equal(cos.get(), want_cos)
    numpy.testing.assert_array_equal(sin.get(), want_sin)
