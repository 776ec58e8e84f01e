"""Maximum error of the float32 approximations in fastgrad.kernels.cpu.mathfn
against float64 NumPy, over the whole float32 line (a strided sweep of every
bit pattern plus exhaustive sweeps of the binades where the error peaks),
and the float64 versions against libm."""
import numpy as np
import pytest
from numba import njit

from fastgrad.kernels.cpu import mathfn

F32 = np.finfo(np.float32)


@njit(error_model="numpy")   # no cache: it would not see edits of mathfn.py
def _apply(x, out, which):
    for i in range(x.size):
        if which == 0:
            out[i] = mathfn.exp(x[i])
        elif which == 1:
            out[i] = mathfn.expm1(x[i])
        elif which == 2:
            out[i] = mathfn.log1p(x[i])
        elif which == 3:
            out[i] = mathfn.tanh(x[i])
        else:
            out[i] = mathfn.erfc(x[i])


def _erfc64(x):
    from scipy.special import erfc          # SciPy: a dependency (Numba's BLAS)
    return erfc(x)


WHICH = {"exp": 0, "expm1": 1, "log1p": 2, "tanh": 3, "erfc": 4}
REF = {"exp": np.exp, "expm1": np.expm1, "log1p": np.log1p, "tanh": np.tanh, "erfc": _erfc64}


def run(name, x):
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    _apply(x, out, WHICH[name])
    return out


def ref(name, x):
    with np.errstate(over="ignore"):
        return REF[name](x.astype(np.float64))


def sweep():
    """Every 4099th float32 bit pattern (both signs, ~1M values) + specials."""
    bits = np.arange(0, 2 ** 32, 4099, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    specials = np.array([0.0, -0.0, F32.smallest_subnormal, -F32.smallest_subnormal,
                         F32.tiny, -F32.tiny, F32.max, -F32.max, 1.0, -1.0,
                         np.inf, -np.inf], np.float32)
    return np.concatenate([x[~np.isnan(x)], specials])


def binade(lo):
    """Every float32 in [lo, 2 lo) (lo > 0), 2**23 values."""
    b0 = np.float32(lo).view(np.uint32)
    return np.arange(b0, b0 + 2 ** 23, dtype=np.uint32).view(np.float32)


def rel_err(got, want):
    return np.abs(got.astype(np.float64) - want) / np.abs(want)


# --- exp -----------------------------------------------------------------------

def test_exp_float32_whole_range():
    x = np.concatenate([sweep(), binade(np.float32(0.5)), binade(np.float32(16.0))])
    got, want = run("exp", x), ref("exp", x)
    normal = (want >= F32.tiny) & (want <= F32.max)
    assert rel_err(got[normal], want[normal]).max() <= 2e-7
    # subnormal results: within 2 units of the smallest subnormal
    sub = want < F32.tiny
    assert (np.abs(got[sub] - want[sub]) <= 2 * float(F32.smallest_subnormal)).all()
    # overflow exactly where float32 rounding of the true value overflows
    with np.errstate(over="ignore"):
        want32 = want.astype(np.float32)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want32))
    assert (got >= 0).all()


def test_exp_float32_overflow_and_underflow_edges():
    x = np.arange(np.float32(88.0).view(np.uint32), np.float32(89.5).view(np.uint32),
                  dtype=np.uint32).view(np.float32)
    got = run("exp", x)
    with np.errstate(over="ignore"):
        want32 = ref("exp", x).astype(np.float32)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want32))
    fin = np.isfinite(want32)
    assert rel_err(got[fin], want32[fin].astype(np.float64)).max() <= 2.5e-7
    y = run("exp", np.array([-103.0, -104.0, -110.0, -1e30, -np.inf], np.float32))
    assert y[0] > 0 and (y[2:] == 0).all()


# --- expm1 ---------------------------------------------------------------------

def test_expm1_float32_whole_range():
    x = np.concatenate([sweep(), binade(np.float32(0.25)), -binade(np.float32(0.25)),
                        binade(np.float32(0.125))])
    x = x[x <= 88.0]                      # expm1 overflows like exp above
    got, want = run("expm1", x), ref("expm1", x)
    nz = want != 0
    err = rel_err(got[nz], want[nz])
    assert err.max() <= 3e-7, f"max rel err {err.max():.3g} at x={x[nz][err.argmax()]!r}"
    assert (got[~nz] == 0).all()
    assert run("expm1", np.array([-np.inf], np.float32))[0] == -1.0


# --- log1p (valid on [0, 1], where every caller uses it) -----------------------

def test_log1p_float32_on_unit_interval():
    x = np.concatenate([binade(np.float32(0.5)), binade(np.float32(0.25)),
                        sweep(), np.array([1.0], np.float32)])
    x = x[(x >= 0) & (x <= 1)]
    got, want = run("log1p", x), ref("log1p", x)
    normal = want >= F32.tiny
    err = rel_err(got[normal], want[normal])
    assert err.max() <= 3e-7, f"max rel err {err.max():.3g} at u={x[normal][err.argmax()]!r}"
    # subnormal u (softplus feeds it exp(-|z|)): as exact as float32 allows
    assert (np.abs(got[~normal] - want[~normal]) <= float(F32.smallest_subnormal)).all()
    assert run("log1p", np.array([0.0], np.float32))[0] == 0


# --- tanh ----------------------------------------------------------------------

TANH_WORST = np.float32(5.827876)      # largest error found by an exhaustive sweep of [4, 8)


def test_tanh_float32_whole_range():
    """Documented in mathfn.py: max abs error 4.1e-7, reached at x = 5.827876
    (found by an exhaustive sweep of [4, 8)), where the rational approximation
    evaluated in float32 rounds worst; the bound asserted is 4.2e-7."""
    x = np.concatenate([sweep(), binade(np.float32(2.0)), binade(np.float32(4.0)),
                        -binade(np.float32(0.5)), np.array([TANH_WORST], np.float32)])
    got, want = run("tanh", x), ref("tanh", x)
    err = np.abs(got - want)
    assert err.max() <= 4.2e-7, f"max abs err {err.max():.3g} at x={x[err.argmax()]!r}"
    assert (np.abs(got) <= 1).all()
    np.testing.assert_array_equal(np.sign(got), np.sign(x))
    small = np.abs(x) < 1e-3
    assert rel_err(got[small & (x != 0)], want[small & (x != 0)]).max() <= 2e-7


def test_tanh_float32_saturates_exactly():
    got = run("tanh", np.array([8.0, 20.0, 1e30, np.inf, -8.0, -1e30, -np.inf], np.float32))
    np.testing.assert_array_equal(got, [1, 1, 1, 1, -1, -1, -1])


# --- special values --------------------------------------------------------------

@pytest.mark.parametrize("name", ["exp", "expm1", "log1p", "tanh"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_propagates(name, dtype):
    got = run(name, np.array([np.nan, 0.5, np.nan], dtype))
    assert np.isnan(got[[0, 2]]).all() and np.isfinite(got[1])


@pytest.mark.parametrize("name", ["exp", "expm1", "tanh"])
def test_signed_zero_and_infinities(name):
    got = run(name, np.array([0.0, -0.0, np.inf, -np.inf], np.float32))
    want = ref(name, np.array([0.0, -0.0, np.inf, -np.inf], np.float32))
    np.testing.assert_array_equal(got, want.astype(np.float32))
    if name != "exp":
        assert not np.signbit(got[0]) and np.signbit(got[1]), "sign of zero lost"


@pytest.mark.parametrize("name", ["exp", "expm1", "log1p", "tanh"])
def test_float32_stays_float32_and_float64_is_libm(name, rng):
    x32 = rng.uniform(0, 1, 1000).astype(np.float32)
    assert run(name, x32).dtype == np.float32
    x64 = np.concatenate([rng.uniform(-30, 30, 1000), rng.uniform(0, 1, 100)])
    if name == "log1p":
        x64 = np.abs(x64)
    got = run(name, x64)
    np.testing.assert_allclose(got, REF[name](x64), rtol=1e-15, atol=0)


# --- erfc (exact GELU's Phi) ----------------------------------------------------------

ERFC_MAX_ULP = 7.0     # measured 6.50 (every float32 in [0.5, 8) and a strided sweep)


def _ulps(got, want):
    """|got - want| in units of the float32 spacing at want."""
    return np.abs(got.astype(np.float64) - want) / np.spacing(want.astype(np.float32)).astype(np.float64)


def test_erfc_float32_max_error_whole_range():
    """Every result that is a normal float32 within ERFC_MAX_ULP ulp of
    float64 erfc, over the strided sweep of all float32 plus every float32
    of the binades around the peak; subnormal results (x > 9.2) within
    2 ** -149 * 8; erfc(+-inf) = 0, 2 and NaN passes."""
    x = np.concatenate([sweep(), binade(0.5), binade(1.0), binade(2.0), binade(4.0)])
    got, want = run("erfc", x), ref("erfc", x)
    normal = want >= F32.tiny
    assert _ulps(got[normal], want[normal]).max() <= ERFC_MAX_ULP
    assert np.abs(got[~normal] - want[~normal]).max() <= 8 * F32.smallest_subnormal
    assert np.all((got >= 0) & (got <= 2))
    special = run("erfc", np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32))
    assert special[0] == 0 and special[1] == 2 and np.isnan(special[2])
    assert special[3] == 1 and special[4] == 1


def test_erfc_float64_is_libm(rng):
    x = np.concatenate([rng.standard_normal(10000) * 4, [0.0, 1e-300, 27.0, -27.0, 40.0]])
    np.testing.assert_array_equal(run("erfc", x), np.vectorize(__import__("math").erfc)(x))
