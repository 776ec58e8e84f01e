"""Maximum error of the approximations in fastgrad.kernels.cpu.mathfn: the
float32 ones against float64 NumPy, over the whole float32 line (a strided
sweep of every bit pattern plus exhaustive sweeps of the binades where the
error peaks); the float64 ones in ulps against x87 80-bit long double
(dense random sweeps of the whole domain plus the hard regions)."""
import json
import math
import os
import pathlib
import platform
import subprocess
import sys

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
        elif which == 4:
            out[i] = mathfn.erfc(x[i])
        elif which == 5:
            out[i] = mathfn.gelu(x[i])
        else:
            out[i] = mathfn.gelu_grad(x[i])


def _erfc64(x):
    from scipy.special import erfc          # SciPy: a dependency (Numba's BLAS)
    return erfc(x)


WHICH = {"exp": 0, "expm1": 1, "log1p": 2, "tanh": 3, "erfc": 4, "gelu": 5, "gelu_grad": 6}
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


def check_overflow_edge(name):
    # every float32 in [88, 89.5): inf exactly where float32's rounding of
    # the exact result overflows, and within 2.5e-7 below it
    x = np.arange(np.float32(88.0).view(np.uint32), np.float32(89.5).view(np.uint32),
                  dtype=np.uint32).view(np.float32)
    got = run(name, x)
    with np.errstate(over="ignore"):
        want32 = ref(name, x).astype(np.float32)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want32))
    fin = np.isfinite(want32)
    assert rel_err(got[fin], want32[fin].astype(np.float64)).max() <= 2.5e-7


def test_exp_float32_overflow_and_underflow_edges():
    check_overflow_edge("exp")
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
    # measured 1.14e-7 with FMA, 1.16e-7 without (one path, 2^n q + 2^n - 1;
    # exp(x) - 1 beside a Taylor series read 2.8e-7)
    assert err.max() <= 1.5e-7, f"max rel err {err.max():.3g} at x={x[nz][err.argmax()]!r}"
    assert (got[~nz] == 0).all()
    assert run("expm1", np.array([-np.inf], np.float32))[0] == -1.0


def test_expm1_float32_edges():
    # overflow as exp's, -1 far below 0, the zeros' signs kept
    check_overflow_edge("expm1")
    y = run("expm1", np.array([-17.0, -30.0, -1e30, np.inf, -0.0, 0.0, -1e-40], np.float32))
    assert (y[:3] == -1).all() and y[3] == np.inf
    assert np.signbit(y[4]) and y[4] == 0 and not np.signbit(y[5]) and y[5] == 0
    assert y[6] == np.float32(-1e-40)


# --- log1p (valid on [0, 1], where every caller uses it) -----------------------

def test_log1p_float32_on_unit_interval():
    x = np.concatenate([binade(np.float32(0.5)), binade(np.float32(0.25)),
                        sweep(), np.array([1.0], np.float32)])
    x = x[(x >= 0) & (x <= 1)]
    got, want = run("log1p", x), ref("log1p", x)
    normal = want >= F32.tiny
    err = rel_err(got[normal], want[normal])
    # measured 1.48e-7 with FMA, 1.83e-7 without (u P(u); 2 atanh(u / (2 + u)) read 2.21e-7)
    assert err.max() <= 2e-7, f"max rel err {err.max():.3g} at u={x[normal][err.argmax()]!r}"
    # subnormal u (softplus feeds it exp(-|z|)): as exact as float32 allows
    assert (np.abs(got[~normal] - want[~normal]) <= float(F32.smallest_subnormal)).all()
    assert run("log1p", np.array([0.0], np.float32))[0] == 0


# --- tanh ----------------------------------------------------------------------

TANH_WORST = np.float32(5.827876)      # largest error found by an exhaustive sweep of [4, 8)


def test_tanh_float32_whole_range():
    """Documented in mathfn.py: max abs error 4.1e-7 with separate multiplies
    and adds, reached at x = 5.827876 (found by an exhaustive sweep of
    [4, 8)), where the rational approximation evaluated in float32 rounds
    worst; 2.9e-7 with FMA (at 5.126039); the bound asserted is 4.2e-7."""
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


# The polynomials use llvm.fmuladd: one FMA where the CPU has it (this
# host's build), a multiply and an add where it does not.  The float32 checks
# above run again on code built for a CPU without FMA (Numba's "generic"),
# in a process of its own (the target is chosen when Numba starts).
_WITHOUT_FMA = """
import inspect, sys
import numba, numpy as np
sys.path.insert(0, sys.argv[1])
import test_mathfn as t
assert numba.config.CPU_NAME == "generic" and not numba.config.CPU_FEATURES
ran = []
for name in sorted(dir(t)):
    test = getattr(t, name)
    if name.startswith("test_") and "float32" in name and not inspect.signature(test).parameters:
        test()
        ran.append(name)
assert len(ran) >= 7, ran
x = np.array([t.TANH_WORST], np.float32)
print(abs(float(t.run("tanh", x)[0]) - float(t.ref("tanh", x)[0])))
"""


def _in_new_process(code, arg, **env_vars):
    """stdout of ``code`` run with ``arg`` in a new Python process, whose
    Numba target is the host's unless ``env_vars`` name one (the target is
    chosen when Numba starts)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES")}
    env.update(env_vars)
    run_ = subprocess.run([sys.executable, "-c", code, str(arg)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert run_.returncode == 0, run_.stderr[-3000:]
    return run_.stdout


def test_float32_bounds_hold_without_fma(tmp_path):
    out = _in_new_process(_WITHOUT_FMA, pathlib.Path(__file__).parent,
                          NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    # the worst case of the build without FMA is there: it really ran unfused
    assert 4.0e-7 < float(out.split()[-1]) <= 4.2e-7


# exp's and expm1's scaling by 2**n: one vscalef where the target has
# AVX-512F; elsewhere LLVM would make llvm.ldexp a libm call per element, so
# the exponent bits are built there.  Both builds run here, each in a process
# of its own (the target is chosen when Numba starts): the host's and one for
# an AVX2 core (which this host runs too).  Their loops' assembly, and their
# values on the same inputs, bitwise.
_SCALING = """
import json, sys
import numpy as np
from numba import njit
from fastgrad.kernels.cpu import mathfn
rng = np.random.default_rng(5)
special = [0.0, -0.0, np.inf, -np.inf, np.nan]
inputs = {
    "float32": np.concatenate([np.linspace(-110, 95, 200001), special]).astype(np.float32),
    "float64": np.concatenate([np.linspace(-760, 720, 200001), np.linspace(-45, 45, 100001),
                               special])}
inputs["float32"] = np.concatenate([inputs["float32"], rng.integers(
    0, 2**32, 200000, dtype=np.uint64).astype(np.uint32).view(np.float32)])
inputs["float64"] = np.concatenate([inputs["float64"], rng.integers(
    0, 2**63, 200000, dtype=np.uint64).view(np.float64)])
vscalef, calls, values = [], [], {}
for dtype in ("float32", "float64"):
    for name in ("exp", "expm1"):
        f = getattr(mathfn, name)
        def body(x, out):
            for i in range(x.shape[0]):
                out[i] = f(x[i])
        x = inputs[dtype]
        out = np.empty_like(x)
        njit(error_model="numpy")(body)(x, out)
        values[name + "_" + dtype] = out
        # the loop alone, without the wrappers' calls
        loop = njit(error_model="numpy", no_cpython_wrapper=True, no_cfunc_wrapper=True)(body)
        loop.compile(f"void({dtype}[::1], {dtype}[::1])")
        asm = loop.inspect_asm(loop.signatures[0])
        vscalef.append(asm.count("vscalef"))
        calls.append(asm.count("call"))
np.savez(sys.argv[1], **values)
print(json.dumps([mathfn._scalef(), vscalef, calls]))
"""

_AVX2 = dict(NUMBA_CPU_NAME="haswell",
             NUMBA_CPU_FEATURES="+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+popcnt,+sse4.2")


def _scaling_build(out, **env_vars):
    """(whether mathfn scales by vscalef, vscalef's count and the count of
    calls in each loop's assembly) from a new process, which writes the
    loops' values to ``out``; the target is the host's unless ``env_vars``
    name one."""
    return json.loads(_in_new_process(_SCALING, out, **env_vars).strip().splitlines()[-1])


_X86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 targets")


@_X86
def test_exp_builds_its_powers_of_two_without_avx512f(tmp_path):
    # an AVX2 core: no vscalef, and no libm call in the loops
    assert _scaling_build(tmp_path / "avx2.npz", NUMBA_CACHE_DIR=str(tmp_path),
                          **_AVX2) == [False, [0] * 4, [0] * 4]


@_X86
def test_exp_scales_by_one_vscalef_where_the_host_has_avx512f_to_the_same_values(tmp_path):
    import llvmlite.binding as ll
    if not ll.get_host_cpu_features().get("avx512f", False):
        pytest.skip("the host has no AVX-512F")
    scalef, vscalef, calls = _scaling_build(tmp_path / "host.npz",
                                            NUMBA_CACHE_DIR=str(tmp_path / "host"))
    assert scalef and min(vscalef) >= 1 and calls == [0] * 4, (vscalef, calls)
    _scaling_build(tmp_path / "avx2.npz", NUMBA_CACHE_DIR=str(tmp_path / "avx2"), **_AVX2)
    host, avx2 = np.load(tmp_path / "host.npz"), np.load(tmp_path / "avx2.npz")
    for name in host.files:
        bits = np.uint32 if host[name].dtype == np.float32 else np.uint64
        np.testing.assert_array_equal(host[name].view(bits), avx2[name].view(bits), err_msg=name)


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
def test_float32_stays_float32_and_float64_matches_numpy(name, rng):
    x32 = rng.uniform(0, 1, 1000).astype(np.float32)
    assert run(name, x32).dtype == np.float32
    x64 = np.concatenate([rng.uniform(-30, 30, 1000), rng.uniform(0, 1, 100)])
    if name == "log1p":
        x64 = np.abs(x64)
    got = run(name, x64)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, REF[name](x64), rtol=3e-16, atol=0)


# --- float64: within 1 ulp (glibc's bound) of the exact result -------------------

LD = np.longdouble
F64 = np.finfo(np.float64)
# measured maxima (2M points per region): exp 0.80 (subnormal results: the
# 2**k scaling rounds a second time), 0.53 elsewhere; expm1 0.63; log1p 0.67;
# tanh 0.58.  libm (glibc) measures 0.51, 0.85, 0.85 and 2.14 (tanh).
MAX_ULP_64 = {"exp": 0.85, "expm1": 0.7, "log1p": 0.75, "tanh": 0.65}

needs_long_double = pytest.mark.skipif(
    np.finfo(np.longdouble).nmant < 63,
    reason="the float64 reference needs an 80-bit (or wider) np.longdouble")


def ulps64(got, x, name):
    """|got - f(x)| in float64 ulps of the exact result, f in long double;
    the ulp is that of the binade of the exact value (below a power of two,
    the smaller one), 2**-1074 for subnormal and zero results."""
    with np.errstate(all="ignore"):
        want = REF[name](x.astype(LD))
        _, e = np.frexp(np.abs(want))
        ulp = np.ldexp(LD(1), np.maximum(e.astype(np.int64) - 53, -1074))
        return (np.abs(got.astype(LD) - want) / ulp).astype(np.float64), want


def edge(x0, n):
    """The n float64 values each side of x0."""
    b = np.float64(x0).view(np.int64)
    return np.arange(b - n, b + n, dtype=np.int64).view(np.float64)


def tiny(rng, n, lo=-323.0, hi=-3.0):
    """+-10**U(lo, hi): every binade down to the subnormals."""
    return np.sign(rng.standard_normal(n)) * 10.0 ** rng.uniform(lo, hi, n)


def domains64(name, rng, n=1_000_000):
    u = rng.uniform
    if name == "exp":
        return [u(-745.2, 709.8, n), u(-1, 1, n), tiny(rng, n), u(-746, -708, n),
                edge(np.log(F64.max), 5000), edge(-708.3964185322641, 5000),   # last normal
                edge(-745.1332191019412, 5000),                                 # -> 0
                edge(0.5 * np.log(2), 5000), edge(-0.5 * np.log(2), 5000)]
    if name == "expm1":
        return [u(-40, 709.8, n), u(-1, 1, n), tiny(rng, n), u(-50, -30, n),
                edge(np.log(F64.max), 5000), edge(0.5 * np.log(2), 5000),
                edge(-0.5 * np.log(2), 5000), edge(1.5 * np.log(2), 5000)]
    if name == "log1p":
        return [u(-1, 1, n), u(0, 1, n), 10.0 ** u(-323, 308.2, n), -10.0 ** u(-323, -1e-9, n),
                -1 + 10.0 ** u(-16, -1, n), edge(np.sqrt(2) - 1, 5000),
                edge(np.sqrt(0.5) - 1, 5000), edge(1.0, 5000), edge(F64.max, 5000)[:5000]]
    return [u(-25, 25, n), u(-1, 1, n), tiny(rng, n, hi=1.5), u(18, 23, n),
            edge(0.55, 5000), edge(-0.55, 5000)]


@needs_long_double
@pytest.mark.parametrize("name", ["exp", "expm1", "log1p", "tanh"])
def test_float64_within_1_ulp_whole_domain(name, rng):
    worst = 0.0
    for x in domains64(name, rng):
        x = x[~np.isnan(x)]
        got = run(name, x)
        err, want = ulps64(got, x, name)
        with np.errstate(over="ignore"):
            want64 = want.astype(np.float64)
        # overflow exactly where the rounded exact result overflows
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want64))
        fin = np.isfinite(want64)
        i = err[fin].argmax()
        assert err[fin][i] <= MAX_ULP_64[name], (
            f"{name}: {err[fin][i]:.3f} ulp at x={x[fin][i]!r}")
        worst = max(worst, err[fin][i])
    assert worst <= 1.0


@pytest.mark.parametrize("name,x,want", [
    ("exp", [0.0, -0.0, np.inf, -np.inf, 710.0, -746.0, 1e-320],
     [1, 1, np.inf, 0, np.inf, 0, 1]),
    ("expm1", [0.0, -0.0, np.inf, -np.inf, 710.0, -40.0, -1e300, 5e-324, -5e-324],
     [0.0, -0.0, np.inf, -1, np.inf, -1, -1, 5e-324, -5e-324]),
    ("log1p", [0.0, -0.0, np.inf, -1.0, -1.5, -np.inf, 5e-324, -5e-324, 1e308],
     [0.0, -0.0, np.inf, -np.inf, np.nan, np.nan, 5e-324, -5e-324, np.log(1e308)]),
    ("tanh", [0.0, -0.0, np.inf, -np.inf, 19.5, -30.0, 1e300, 5e-324, -5e-324],
     [0.0, -0.0, 1, -1, 1, -1, 1, 5e-324, -5e-324]),
])
def test_float64_special_values(name, x, want):
    got = run(name, np.array(x, np.float64))
    np.testing.assert_array_equal(got, np.array(want, np.float64))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(np.array(want, np.float64)))
    assert np.isnan(run(name, np.array([np.nan, -np.nan]))).all()


# --- erfc ---------------------------------------------------------------------------

# measured 6.10 with FMA, 6.62 without, over this test's points and every
# float32 in [8, 16) (t exp(-x^2) R(t); Numerical Recipes' t exp(-x^2 +
# P(t)), the form before, read 6.35 / 6.50)
ERFC_MAX_ULP = 7.0


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


# --- the exact GELU z Phi(z) and its derivative Phi(z) + z phi(z) ------------------

GELU_MAX_ULP = 8.0     # measured 6.3 (FMA) where Phi(z) is normal


def _gelu_points():
    """The strided sweep of all finite float32 and every float32 of the
    binades around GELU's zero crossing and its peak errors."""
    z = np.concatenate([sweep(), -binade(0.5), binade(0.5), -binade(4.0), -binade(8.0)])
    return z[np.isfinite(z)]


def test_gelu_float32_max_error_whole_range():
    """Within GELU_MAX_ULP ulp of z Phi(z) over the strided sweep of all
    float32 and every float32 of the binades where the error peaks, where
    Phi(z) is normal (z > -12.9); beyond, within 16 ulp, subnormal results
    within 2 ** -149 * 16 (the form 0.5 z erfc(-z / sqrt 2) read
    43 ulp at z = -6 and 190 near -13: z / sqrt 2 rounded first).
    gelu(-0) = -0, gelu(inf) = inf, gelu(-inf) = NaN (-inf * 0, as
    PyTorch's), NaN passes."""
    from scipy.special import ndtr
    z = _gelu_points()
    got = run("gelu", z)
    z64 = z.astype(np.float64)
    cdf = ndtr(z64)
    want = z64 * cdf
    with np.errstate(over="ignore"):         # the spacing at float32's largest
        err = _ulps(np.abs(got), np.abs(want))
    normal = np.abs(want) >= F32.tiny
    normal_cdf = cdf >= F32.tiny
    assert err[normal & normal_cdf].max() <= GELU_MAX_ULP
    assert err[normal & ~normal_cdf].max() <= 16
    assert np.abs(got[~normal] - want[~normal]).max() <= 16 * F32.smallest_subnormal
    assert np.all(np.signbit(got[got == 0]) == np.signbit(z[got == 0]))
    special = run("gelu", np.array([np.nan, np.inf, -np.inf, -0.0], np.float32))
    assert np.isnan(special[0]) and special[1] == np.inf and np.isnan(special[2])
    assert special[3] == 0 and np.signbit(special[3])


def test_gelu_float64_is_the_libm_formula(rng):
    import math
    z = np.concatenate([rng.standard_normal(10000) * 6, [0.0, -0.75, 38.0, -38.0, 1e150]])
    got = run("gelu", z)
    np.testing.assert_array_equal(got, [0.5 * v * math.erfc(-v * 0.7071067811865476) for v in z])


# --- GELU's derivative Phi(z) + z phi(z) -----------------------------------------

GELU_GRAD_MAX_ULP = 7.0     # measured 4.9 (FMA) where e = exp(-z^2/2) is normal


def test_gelu_grad_float32_max_error_whole_range():
    """Within GELU_GRAD_MAX_ULP ulp of Phi + |z| phi (the sum's condition:
    the two terms cancel near z = -0.75 and for z << 0) over the strided
    sweep of all float32 and every float32 of the binades around the zero
    crossing and the peak error, where exp(-z^2/2) is normal (|z| < 13.2);
    beyond, where it is subnormal, within 16 ulp, and subnormal results
    within 2 ** -149 * 16.  Saturates to 0 and 1; NaN passes."""
    from scipy.special import ndtr
    z = _gelu_points()
    got = run("gelu_grad", z)
    z64 = z.astype(np.float64)
    phi = np.exp(-0.5 * z64 * z64) / np.sqrt(2 * np.pi)
    want = ndtr(z64) + z64 * phi
    ulp = np.spacing((ndtr(z64) + np.abs(z64) * phi).astype(np.float32)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - want) / ulp
    normal_e = np.abs(z64) < 13.2
    assert err[normal_e].max() <= GELU_GRAD_MAX_ULP
    normal = np.abs(want) >= F32.tiny
    assert err[normal & ~normal_e].max() <= 16
    assert np.abs(got[~normal] - want[~normal]).max() <= 16 * F32.smallest_subnormal
    special = run("gelu_grad", np.array([np.nan, 0.0, -0.0, 1e30, -1e30], np.float32))
    assert np.isnan(special[0]) and special[1] == 0.5 and special[2] == 0.5
    assert special[3] == 1 and special[4] == 0


def test_gelu_grad_float64_is_the_libm_formula(rng):
    import math
    z = np.concatenate([rng.standard_normal(10000) * 6, [0.0, -0.75, 38.0, -38.0, 1e150]])
    got = run("gelu_grad", z)
    want = [0.5 * math.erfc(-v * 0.7071067811865476)
            + v * (0.3989422804014327 * math.exp(-(0.5 * v * v))) for v in z]
    np.testing.assert_array_equal(got, want)


def test_exp_in_scalar_loop_is_exp(rng):
    """float32: the same polynomial as exp; float64: libm (to rounding)."""
    @njit(error_model="numpy")
    def apply(x, out):
        for i in range(x.size):
            out[i] = mathfn.exp_in_scalar_loop(x[i])

    x32 = rng.uniform(-80, 80, 1001).astype(np.float32)
    out32 = np.empty_like(x32)
    apply(x32, out32)
    np.testing.assert_array_equal(out32, run("exp", x32))
    x64 = rng.uniform(-700, 700, 1001)
    out64 = np.empty_like(x64)
    apply(x64, out64)
    np.testing.assert_array_equal(out64, np.vectorize(__import__("math").exp)(x64))


# --- divide_by_invariant ---------------------------------------------------------

@njit(error_model="numpy")
def _divide_by_invariant(x, b, out):
    inv_b = 1.0 / np.float64(b)
    for i in range(x.size):
        out[i] = mathfn.divide_by_invariant(x[i], b, inv_b)


def _bias_correction_roots(betas=(0.999, 0.99, 0.9), steps=range(1, 9)):
    """Adam's float32 sqrt(1 - beta2**t): divisors the update uses."""
    return {np.float32(math.sqrt(1.0 - beta ** t)) for beta in betas for t in steps}


def test_divide_by_invariant_float32_is_the_division_for_every_significand(rng):
    """Every float32 significand of x over divisors Adam uses, fresh random
    ones and hard ones (all-ones significands, one, the largest below one),
    bitwise NumPy's float32 division.  The quotient's exponent does not enter
    the argument: the unit binade of x for all, a tiny and a huge one for
    some."""
    divisors = _bias_correction_roots() | set(rng.uniform(0.03, 1.0, 6).astype(np.float32))
    divisors |= {np.float32(1.0), np.float32(0.5), np.nextafter(np.float32(1), np.float32(0)),
                 np.float32(1.5) - np.float32(2.0 ** -23),
                 *((rng.integers(1 << 23, 1 << 24, 3) | 0xFFFF).astype(np.float32) / (1 << 24))}
    out = np.empty(2 ** 23, np.float32)
    some = sorted(divisors)[::8]
    for lo, bs in ((1.0, sorted(divisors)), (2.0 ** -100, some), (2.0 ** 100, some)):
        x = binade(lo)
        for b in bs:
            _divide_by_invariant(x, b, out)
            want = x / b
            bad = np.flatnonzero(out != want)
            assert bad.size == 0, (f"x={x[bad[0]]!r} / b={b!r}: {out[bad[0]]!r} against "
                                   f"{want[bad[0]]!r} ({bad.size} values)")


def test_divide_by_invariant_special_values_and_float64():
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, F32.max, 3.0], np.float32)
    for b in (np.float32(0.25), np.float32(1.0), np.float32(0.0), np.float32(np.inf)):
        out = np.empty_like(x)
        with np.errstate(all="ignore"):
            _divide_by_invariant(x, b, out)
            want = x / b
        np.testing.assert_array_equal(out, want)
        assert np.array_equal(np.signbit(out), np.signbit(want))
    # float64: the division itself
    x64 = np.random.default_rng(0).standard_normal(1001)
    out64 = np.empty_like(x64)
    _divide_by_invariant(x64, 0.3, out64)
    np.testing.assert_array_equal(out64, x64 / 0.3)
