"""Vectorisable transcendentals for float32 and float64.

Without Intel SVML (which the pip llvmlite cannot use), ``np.exp`` or
``np.tanh`` inside a loop compiles to a scalar libm call (~14 ns per
element).  The versions below are branch-free (select-based) polynomials
that LLVM vectorises.  float32: maximum errors tested against float64 over
the whole float32 range (log1p over [0, 1], the range it serves).  float64
(what gradient checks and PyTorch parity run on): ``exp``, ``expm1``,
``log1p`` and ``tanh`` within 1 ulp of the exact result (glibc's bound),
tested against 80-bit long double over their whole domain; ``erfc``,
``gelu`` and ``gelu_grad`` (the exact GELU and its derivative) float64 are
still libm (tests/test_mathfn.py).

Each function (``exp``, ``expm1``, ``log1p``, ``tanh``, ``erfc``, ``gelu``,
``gelu_grad``, and ``like`` for typed constants) is a Numba *intrinsic*: it
emits its LLVM IR straight into the calling loop.  Written as inlined
``@njit``/overload functions instead, every call site had to be typed again,
and the activation kernels took over 10 s to compile cold; as intrinsics
their typing is a table lookup.  The IR performs exactly the operations of
the formulas in the comments, in that order, without fast-math flags, so NaN
and Inf propagate and results are reproducible.  One exception: the float32
polynomials and exp's argument reduction multiply-add through
``llvm.fmuladd``, one FMA (one rounding) on a CPU that has it and a multiply
then an add on one that does not, which Numba's target decides.  Their
results are the same on every run of one host; a host without FMA may differ
from one with it in the last bit or two, both within the bounds tested
(tests/test_mathfn.py checks both builds).  FMA halves a Horner step's
dependent operations: the float32 activation passes run 1.1-1.5x faster
(bench/RESULTS.md).  The float64 functions keep separate operations, which
their 1-ulp analysis assumes.  exp's and expm1's final scaling by 2**n is
one instruction (``vscalef``) where the target has AVX-512F and a few
integer operations elsewhere: the same values either way, each rounded
once.
"""
import functools
import math

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
I32 = ir.IntType(32)


def _c(value):
    return ir.Constant(F32, float(np.float32(value)))


def _call(builder, name, fty, *args):
    fn = cgutils.get_or_insert_function(builder.module, fty, name)
    return builder.call(fn, args)


def _f32_intrinsic(builder, name, x):
    """llvm.<name>.f32 (floor, fabs): vectorisable, no libm call."""
    return _call(builder, f"llvm.{name}.f32", ir.FunctionType(F32, [F32]), x)


def _libm64(builder, name, x):
    d = ir.DoubleType()
    return _call(builder, name, ir.FunctionType(d, [d]), x)


def _fmuladd(builder, a, b, c):
    # a * b + c, one FMA where the host has it (one rounding), else mul, add
    return _call(builder, "llvm.fmuladd.f32", ir.FunctionType(F32, [F32, F32, F32]), a, b, c)


def _horner(builder, x, coeffs):
    p = _c(coeffs[0])
    for c in coeffs[1:]:
        p = _fmuladd(builder, p, x, _c(c))
    return p


def _select_lt(builder, a, b, if_true, if_false):
    return builder.select(builder.fcmp_ordered("<", a, b), if_true, if_false)


def _pow2(builder, n):
    # 2**n for an integral float32 n in [-126, 127], built in the exponent bits
    bits = builder.shl(builder.add(builder.fptosi(n, I32), ir.Constant(I32, 127)),
                       ir.Constant(I32, 23))
    return builder.bitcast(bits, F32)


@functools.cache
def _scalef():
    """Whether Numba's target has AVX-512F, whose ``vscalefps/pd`` computes
    y 2**n (rounded once, subnormal and overflowing results included) in one
    instruction: there :func:`_ldexp` is a vector operation, elsewhere LLVM
    makes it a libm call per element, and the exponent bits are built by hand
    instead.  Numba keys its disk cache on the same target features."""
    from numba.core.registry import cpu_target
    features = cpu_target.target_context.codegen().magic_tuple()[2]
    return "+avx512f" in features.split(",")


def _ldexp(builder, y, n):
    # y 2**n for an integral float n (llvm.ldexp, vectorised to vscalef)
    fty = ir.FunctionType(y.type, [y.type, I32])
    return _call(builder, f"llvm.ldexp.{'f32' if y.type == F32 else 'f64'}.i32", fty, y,
                 builder.fptosi(n, I32))


_EXP_COEFFS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
               1.6666665459e-1, 5.0000001201e-1)
# float32's ln 2 split in two for the Cody-Waite reduction r = x - n ln2:
# n * _LN2_HI_32 is exact, _LN2_HI_32 - _LN2_LO_NEG_32 is ln 2 beyond float32's precision
_LN2_HI_32 = 0.693359375
_LN2_LO_NEG_32 = 2.12194440e-4


def _round_log2(builder, x):
    # n = round(x / ln 2), as a float32
    return _f32_intrinsic(builder, "floor", _fmuladd(builder, x, _c(1.4426950408889634),
                                                     _c(0.5)))


def _expm1_reduced(builder, r):
    # exp(r) - 1 = r + r^2 p(r) for |r| <= ln2/2: r leads, so the sum keeps
    # its relative accuracy near 0
    return _fmuladd(builder, builder.fmul(_horner(builder, r, _EXP_COEFFS), r), r, r)


def _times_pow2(builder, y, n):
    # y 2**n for an integral n in [-252, 254], rounded once: results near
    # overflow and in the subnormal range come out right
    if _scalef():
        return _ldexp(builder, y, n)
    # 2**n applied in two halves: y 2**half is exact, the second product rounds
    half = _f32_intrinsic(builder, "floor", builder.fmul(n, _c(0.5)))
    return builder.fmul(builder.fmul(y, _pow2(builder, half)),
                        _pow2(builder, builder.fsub(n, half)))


def _exp_f32(builder, x):
    # Cody-Waite: x = n ln2 + r, |r| <= ln2/2, exp(r) = 1 + r + r^2 p(r).
    # 2**n is applied rounding once (_times_pow2), so that results near
    # overflow and in the subnormal range come out right; beyond them (x
    # outside [-104, 89]) the product over/underflows to inf/0 by itself.
    # Max rel error ~2 ulp.
    xc = _select_lt(builder, x, _c(-104.0), _c(-104.0), x)
    xc = _select_lt(builder, _c(89.0), xc, _c(89.0), xc)
    n = _round_log2(builder, xc)
    r = _fmuladd(builder, n, _c(-_LN2_HI_32), xc)
    r = _fmuladd(builder, n, _c(_LN2_LO_NEG_32), r)
    p = builder.fadd(_expm1_reduced(builder, r), _c(1.0))
    y = _times_pow2(builder, p, n)
    return builder.select(builder.fcmp_unordered("uno", x, x), x, y)   # NaN in, NaN out


def _expm1_f32(builder, x):
    # One path for every x: x = n ln2 + r as in _exp_f32, q = expm1(r) =
    # r + r^2 p(r) (relative accuracy: r is a sum's leading term), then
    # expm1(x) = 2^n q + (2^n - 1), where 2^n - 1 is exact for the n that
    # matter (|n| <= 24) and one FMA rounds.  Below -30 the result is -1
    # (e^-30 is under half an ulp of 1); from n = 25 the -1 is below an ulp
    # and 2^n (q + 1) is formed by vscalef, or as 2^(n-1) (q + 1) 2 so that
    # 2^127 is the largest power built: results up to float32's max come
    # out right.
    xc = _select_lt(builder, x, _c(-30.0), _c(-30.0), x)
    xc = _select_lt(builder, _c(89.0), xc, _c(89.0), xc)
    n = _round_log2(builder, xc)
    r = _fmuladd(builder, n, _c(-_LN2_HI_32), xc)
    r = _fmuladd(builder, n, _c(_LN2_LO_NEG_32), r)
    q = _expm1_reduced(builder, r)
    if _scalef():
        scale = _ldexp(builder, _c(1.0), n)
        big = _ldexp(builder, builder.fadd(q, _c(1.0)), n)
    else:
        half_scale = _pow2(builder, builder.fsub(n, _c(1.0)))
        scale = builder.fmul(half_scale, _c(2.0))
        big = builder.fmul(builder.fmul(half_scale, builder.fadd(q, _c(1.0))), _c(2.0))
    small = _fmuladd(builder, scale, q, builder.fsub(scale, _c(1.0)))
    y = _select_lt(builder, _c(24.5), n, big, small)
    # +-0 in, +-0 out (the reduction's n * ln2_lo adds +0 to -0); NaN in, NaN out
    y = builder.select(builder.fcmp_ordered("==", x, _c(0.0)), x, y)
    return builder.select(builder.fcmp_unordered("uno", x, x), x, y)


# log1p(u) = u P(u) on [0, 1]: P a degree-9 least-squares fit of
# log1p(u) / u (weighted for relative error), 1.5e-7 relative at most with
# FMA, 1.8e-7 without (tests/test_mathfn.py); no division (the
# 2 atanh(u / (2 + u)) form took one a value)
_LOG1P_P = (-0.0031639994122087955, 0.019487686455249786, -0.05626952648162842,
            0.10532950609922409, -0.15263274312019348, 0.19661018252372742,
            -0.24951167404651642, 0.33329665660858154, -0.49999889731407166, 1.0)


def _log1p_f32(builder, u):
    # Valid (and used) for u in [0, 1] only: softplus's log1p(exp(-|z|))
    return builder.fmul(u, _horner(builder, u, _LOG1P_P))


_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
           5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
           4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
           4.89352518554385e-03)
_TANH_CLAMP = 7.90531110763549805          # tanh(x) == +-1 in float32 beyond


def _tanh_f32(builder, x):
    # Rational minimax approximation x p(x^2) / q(x^2) as used by Eigen and
    # XLA, on x clamped to +-7.905; max abs error 4.1e-7 with separate
    # multiplies and adds (worst at x = 5.827876), 2.9e-7 with FMA (at
    # 5.126039; tests/test_mathfn.py).  Near 0 the quotient loses relative
    # accuracy (~2 ulp), so |x| < 1/16 uses the odd Taylor series
    # x (1 - x^2/3 + 2x^4/15), exact to float32 there.  Beyond the clamp the
    # result is +-1 by a select on the clamp's own compares: the quotient
    # rounds to +-1 there without FMA but to 1 - 4 ulp with it.
    below = builder.fcmp_ordered("<", x, _c(-_TANH_CLAMP))
    above = builder.fcmp_ordered("<", _c(_TANH_CLAMP), x)
    xc = builder.select(above, _c(_TANH_CLAMP), builder.select(below, _c(-_TANH_CLAMP), x))
    x2 = builder.fmul(xc, xc)
    y = builder.fdiv(builder.fmul(_horner(builder, x2, _TANH_P), xc), _horner(builder, x2, _TANH_Q))
    xs2 = builder.fmul(x, x)
    taylor = builder.fmul(x, _horner(builder, xs2, (2.0 / 15.0, -1.0 / 3.0, 1.0)))
    y = _select_lt(builder, _f32_intrinsic(builder, "fabs", x), _c(0.0625), taylor, y)
    return builder.select(above, _c(1.0), builder.select(below, _c(-1.0), y))


def _exp_f32_sum(builder, hi, lo):
    # exp(hi + lo) for hi exact (it carries the magnitude) and |lo| < 2: the
    # Cody-Waite reduction of _exp_f32 with lo added after n ln2_hi is taken
    # from hi, so the rounding of hi + lo (ulp(100) = 7.6e-6 relative at the
    # end) never enters.  Arguments only in [-122, 0] (erfc's -x^2, GELU's
    # -z^2 / 2, both clamped): no clamp here, 2**n by _times_pow2 as in
    # _exp_f32 for the subnormal results.
    n = _round_log2(builder, builder.fadd(hi, lo))
    r = _fmuladd(builder, n, _c(-_LN2_HI_32), hi)
    r = builder.fadd(r, lo)
    r = _fmuladd(builder, n, _c(_LN2_LO_NEG_32), r)
    return _times_pow2(builder, builder.fadd(_expm1_reduced(builder, r), _c(1.0)), n)


def _split_square(builder, a):
    # a^2 = ah^2 + d for a >= 0: ah keeps a's top 12 significand bits, so
    # ah^2 is exact in float32, and d = (a - ah)(a + ah) is small
    bits = builder.and_(builder.bitcast(a, I32), ir.Constant(I32, -(1 << 12)))
    ah = builder.bitcast(bits, F32)
    return ah, builder.fmul(builder.fsub(a, ah), builder.fadd(a, ah))


# erfc(x) = t exp(-x^2) R(t), t = 1 / (1 + x/2): R(t) = erfcx(x) / t, a
# least-squares fit reweighted towards minimax relative error (2.4e-8) over
# t in [1/6.5, 1] (x in [0, 11]; erfc underflows float32 from 10.1).
# exp(-x^2) is a factor of its own, which GELU's derivative shares with phi.
_ERFCX_R = (0.00943814218044281, -0.1082078069448471, 0.3946283459663391,
            -0.625907838344574, 0.38610562682151794, -0.08035442233085632,
            0.21968287229537964, 0.239817813038826, 0.28272661566734314,
            0.2820706367492676)
_SQRT1_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _erfc_times(builder, ax, e):
    # erfc(ax) = t R(t) e for ax in [0, 11], given e = exp(-ax^2)
    t = builder.fdiv(_c(1.0), builder.fadd(_c(1.0), builder.fmul(_c(0.5), ax)))
    return builder.fmul(builder.fmul(t, _horner(builder, t, _ERFCX_R)), e)


def _erfc_f32(builder, x):
    # In float32 the exponent -x^2 (down to ~-121) would lose ~60 ulp to its
    # own rounding, so x is split as x = xh + xl with xh holding 12 bits:
    # xh^2 is exact and exp(-x^2) = exp(-xh^2 - (x - xh)(x + xh)) is ONE exp
    # of an exact part plus a small one (_exp_f32_sum).  erfc(x) = 2 -
    # erfc(-x) for x < 0.  The clamp at 11 (erfc is 0 in float32 from 10.1)
    # keeps inf out of (x - xh)(x + xh).
    ax = _f32_intrinsic(builder, "fabs", x)
    ax = _select_lt(builder, _c(11.0), ax, _c(11.0), ax)
    xh, d = _split_square(builder, ax)
    e = _exp_f32_sum(builder, builder.fneg(builder.fmul(xh, xh)), builder.fneg(d))
    y = _erfc_times(builder, ax, e)
    y = _select_lt(builder, x, _c(0.0), builder.fsub(_c(2.0), y), y)
    return builder.select(builder.fcmp_unordered("uno", x, x), x, y)   # NaN in, NaN out


def _half_erfc_and_gauss_f32(builder, z):
    # (erfc(|z|/sqrt 2) / 2, e = exp(-z^2/2)) with ONE exp: z split as in
    # _erfc_f32 (zh^2 / 2 exact, the rest a small part), so e carries no
    # rounding of z^2 or of z/sqrt 2.  Beyond |z| = 11 sqrt 2, e underflows
    # to 0.
    az = _f32_intrinsic(builder, "fabs", z)
    az = _select_lt(builder, _c(15.556349), az, _c(15.556349), az)
    zh, d = _split_square(builder, az)
    e = _exp_f32_sum(builder, builder.fmul(_c(-0.5), builder.fmul(zh, zh)),
                     builder.fmul(_c(-0.5), d))
    half_erfc = builder.fmul(_c(0.5), _erfc_times(builder, builder.fmul(az, _c(_SQRT1_2)), e))
    return half_erfc, e


def _phi_cdf_f32(builder, z, half_erfc):
    # Phi(z) = erfc(-z/sqrt 2) / 2: the half erfc of |z|, or 1 minus it
    return _select_lt(builder, _c(0.0), z, builder.fsub(_c(1.0), half_erfc), half_erfc)


def _gelu_f32(builder, z):
    # z Phi(z): Phi within a few ulp down to where it underflows (the form
    # 0.5 z erfc(-z/sqrt 2) rounded z/sqrt 2 first: 43 ulp at z = -6, 190
    # near -13); -inf gives NaN (-inf * 0), as before
    half_erfc, _ = _half_erfc_and_gauss_f32(builder, z)
    return builder.fmul(z, _phi_cdf_f32(builder, z, half_erfc))


def _gelu_grad_f32(builder, z):
    # GELU's derivative Phi(z) + z phi(z), sharing the one exp:
    # sqrt(2 pi) phi(z) = e
    half_erfc, e = _half_erfc_and_gauss_f32(builder, z)
    y = builder.fadd(_phi_cdf_f32(builder, z, half_erfc),
                     builder.fmul(z, builder.fmul(_c(_INV_SQRT_2PI), e)))
    return builder.select(builder.fcmp_unordered("uno", z, z), z, y)   # NaN in, NaN out


# --- float64 ---------------------------------------------------------------
#
# Each float64 function below is within 1 ulp of the exact result (glibc's
# bound for these functions; tests/test_mathfn.py measures the maximum error
# against x87 80-bit long double over the whole domain).  To get there, the
# error-prone steps keep a double-double (hi, lo) value until the last
# rounding: the reduced argument r = x - k ln2 and exp(r) - 1, so that the one
# rounding that matters is the final one (0.5 ulp) plus small terms.
# Integers are moved in and out of doubles with the 2**52 trick (an integral
# double added to 1.5 * 2**52 holds it in its low mantissa bits): AVX2 has no
# vector double <-> int64 conversion, and LLVM would scalarise fptosi/sitofp.

F64 = ir.DoubleType()
I64 = ir.IntType(64)

_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931467056274414      # ln 2 rounded to 21 bits: k * _LN2_HI is exact
_LN2_LO = 4.749325039031787e-07   # ln 2 - _LN2_HI
_SHIFT = 6755399441055744.0       # 1.5 * 2**52
_SQRT_HALF_BITS = 0x3FE6A09E667F3BCD
# exp(r) = 1 + r + r^2/2 + r^3 q(r): Taylor to r^14, truncation < 1e-18 for |r| <= ln2/2
_EXP_TAYLOR_64 = tuple(1.0 / math.factorial(n) for n in range(14, 1, -1))
# 2 atanh(s) = 2s + s R(s^2), R = sum 2 s^2n / (2n + 1) to s^22 (|s| <= 0.172)
_ATANH_SERIES_64 = tuple(2.0 / (2 * n + 1) for n in range(11, 0, -1))


def _d(value):
    return ir.Constant(F64, float(value))


def _f64_intrinsic(builder, name, x):
    return _call(builder, f"llvm.{name}.f64", ir.FunctionType(F64, [F64]), x)


def _horner64(builder, x, coeffs):
    p = _d(coeffs[0])
    for c in coeffs[1:]:
        p = builder.fadd(builder.fmul(p, x), _d(c))
    return p


def _clamp64(builder, x, lo, hi):
    x = _select_lt(builder, x, _d(lo), _d(lo), x)
    return _select_lt(builder, _d(hi), x, _d(hi), x)


def _two_sum(builder, a, b):
    # s + err == a + b exactly (Knuth; no condition on the magnitudes)
    s = builder.fadd(a, b)
    bb = builder.fsub(s, a)
    err = builder.fadd(builder.fsub(a, builder.fsub(s, bb)), builder.fsub(b, bb))
    return s, err


def _fast_two_sum(builder, a, b):
    # s + err == a + b exactly, given |a| >= |b| (Dekker)
    s = builder.fadd(a, b)
    return s, builder.fadd(builder.fsub(a, s), b)


def _split(builder, a):
    # a == hi + lo with 26-bit halves (Veltkamp), for exact products
    c = builder.fmul(_d(134217729.0), a)
    hi = builder.fsub(c, builder.fsub(c, a))
    return hi, builder.fsub(a, hi)


def _two_prod_err(builder, a, b, p):
    # a * b - p exactly, for p = fl(a * b) (Dekker; no FMA needed)
    ah, al = _split(builder, a)
    bh, bl = _split(builder, b)
    e = builder.fsub(builder.fmul(ah, bh), p)
    e = builder.fadd(e, builder.fmul(ah, bl))
    e = builder.fadd(e, builder.fmul(al, bh))
    return builder.fadd(e, builder.fmul(al, bl))


def _pow2_64(builder, n):
    # 2**n for an integral double n in [-1022, 1023], built in the exponent bits
    t = builder.bitcast(builder.fadd(n, _d(_SHIFT + 1023.0)), I64)
    return builder.bitcast(builder.shl(t, ir.Constant(I64, 52)), F64)


def _scale64(builder, y, k):
    # y * 2**k for integral k in [-1100, 1100], rounded once: results near
    # overflow and in the subnormal range come out right
    if _scalef():
        return _ldexp(builder, y, k)
    # in two halves: y 2**half is exact, the second product rounds
    half = _f64_intrinsic(builder, "floor", builder.fmul(k, _d(0.5)))
    return builder.fmul(builder.fmul(y, _pow2_64(builder, half)),
                        _pow2_64(builder, builder.fsub(k, half)))


def _exp_reduced64(builder, x):
    """(k, p_hi, p_lo): exp(x) = 2**k (1 + p_hi + p_lo), |p| < 0.42, for a
    finite x with |x| < 750; p_hi + p_lo carries ~2**-60 relative error."""
    k = _f64_intrinsic(builder, "floor", builder.fadd(builder.fmul(x, _d(_LOG2E)), _d(0.5)))
    hi = builder.fsub(x, builder.fmul(k, _d(_LN2_HI)))       # exact (Sterbenz)
    r, e = _two_sum(builder, hi, builder.fneg(builder.fmul(k, _d(_LN2_LO))))
    # exp(r + e) - 1 = r + r^2/2 + r^3 q(r) + e (1 + r) to first order in e;
    # r + r^2/2 is summed exactly (r^2 by Dekker's product): their roundings
    # would cost up to 0.4 ulp where expm1 cancels (x just above ln2/2)
    q = _horner64(builder, r, _EXP_TAYLOR_64[:-1])
    rr = builder.fmul(r, r)
    rr_err = _two_prod_err(builder, r, r, rr)
    half_rr = builder.fmul(rr, _d(0.5))                       # exact
    p_hi, p_lo = _fast_two_sum(builder, r, half_rr)           # |r^2/2| < |r| / 5
    tail = builder.fadd(builder.fmul(builder.fmul(rr, r), q), builder.fadd(e, builder.fmul(e, r)))
    p_lo = builder.fadd(p_lo, builder.fadd(builder.fmul(rr_err, _d(0.5)), tail))
    return k, p_hi, p_lo


def _nan_passes(builder, x, y):
    return builder.select(builder.fcmp_unordered("uno", x, x), x, y)


def _zero_passes(builder, x, y):
    # +-0 in, the same zero out (the formulas would lose the sign of -0)
    return builder.select(builder.fcmp_ordered("==", x, _d(0.0)), x, y)


def _exp_f64(builder, x):
    # x outside [-746, 710] under/overflows to 0/inf by the scaling itself
    k, p_hi, p_lo = _exp_reduced64(builder, _clamp64(builder, x, -746.0, 710.0))
    s, err = _fast_two_sum(builder, _d(1.0), p_hi)
    y = builder.fadd(s, builder.fadd(err, p_lo))
    return _nan_passes(builder, x, _scale64(builder, y, k))


def _expm1_parts64(builder, x):
    """(k, y_hi, y_lo): exp(x) - 1 = 2**k (y_hi + y_lo) for x in [-40, 710],
    as 2**k ((1 - 2**-k) + p): the constant 1 - 2**-k and p added exactly."""
    k, p_hi, p_lo = _exp_reduced64(builder, x)
    # 2**-k past 2**-1000 only adds far below the rounding of 1 + p
    kc = _select_lt(builder, _d(1000.0), k, _d(1000.0), k)
    c_hi, c_lo = _two_sum(builder, _d(1.0), builder.fneg(_pow2_64(builder, builder.fneg(kc))))
    s, err = _two_sum(builder, c_hi, p_hi)
    return k, s, builder.fadd(err, builder.fadd(c_lo, p_lo))


def _expm1_f64(builder, x):
    # below -40, exp(x) - 1 rounds to -1, which the clamped argument gives
    k, y_hi, y_lo = _expm1_parts64(builder, _clamp64(builder, x, -40.0, 710.0))
    y = _scale64(builder, builder.fadd(y_hi, y_lo), k)
    return _nan_passes(builder, x, _zero_passes(builder, x, y))


def _tanh_f64(builder, x):
    # tanh|x| = E / (E + 2), E = expm1(2|x|) kept double-double; the quotient
    # is corrected by its exact remainder, so only the last addition rounds.
    # tanh(x) rounds to +-1 from |x| = 19.1 on: |x| is clamped to 22.
    ax = _clamp64(builder, _f64_intrinsic(builder, "fabs", x), 0.0, 22.0)
    k, e_hi, e_lo = _expm1_parts64(builder, builder.fmul(ax, _d(2.0)))
    e_hi, e_lo = _fast_two_sum(builder, e_hi, e_lo)
    scale = _pow2_64(builder, k)                              # k <= 64: exact
    e_hi, e_lo = builder.fmul(e_hi, scale), builder.fmul(e_lo, scale)
    d_hi, d_err = _two_sum(builder, e_hi, _d(2.0))
    d_lo = builder.fadd(d_err, e_lo)
    q = builder.fdiv(e_hi, d_hi)
    qd = builder.fmul(q, d_hi)
    rem = builder.fsub(builder.fsub(e_hi, qd), _two_prod_err(builder, q, d_hi, qd))
    corr = builder.fdiv(builder.fsub(builder.fadd(rem, e_lo), builder.fmul(q, d_lo)), d_hi)
    y = builder.fadd(q, corr)
    y = _select_lt(builder, x, _d(0.0), builder.fneg(y), y)
    return _nan_passes(builder, x, _zero_passes(builder, x, y))


def _log1p_f64(builder, u):
    # 1 + u = up + c exactly (up = fl(1 + u)); up = 2**k m, m in [sqrt(1/2),
    # sqrt 2), f = m - 1 exact; log1p(u) = k ln2 + log(1 + f) + c / up with
    # log(1 + f) = f - f^2/2 + s (f^2/2 + R(s^2)), s = f / (2 + f).  The sum
    # k ln2_hi + f - f^2/2 is kept exact (f^2 by Dekker's product), so the
    # only large rounding is the last one.
    one = _d(1.0)
    up = builder.fadd(one, u)
    c = _select_lt(builder, up, _d(2.0),
                   builder.fsub(u, builder.fsub(up, one)),
                   builder.fsub(one, builder.fsub(up, u)))
    c = builder.fdiv(c, up)
    bits = builder.bitcast(up, I64)
    # k + 1024 = (bits - bits(sqrt 1/2) + 1024 << 52) >> 52, unsigned for up > 0
    t = builder.add(builder.sub(bits, ir.Constant(I64, _SQRT_HALF_BITS)),
                    ir.Constant(I64, 1024 << 52))
    k_biased = builder.lshr(t, ir.Constant(I64, 52))
    m_bits = builder.sub(bits, builder.shl(builder.sub(k_biased, ir.Constant(I64, 1024)),
                                           ir.Constant(I64, 52)))
    f = builder.fsub(builder.bitcast(m_bits, F64), one)
    k = builder.fsub(builder.bitcast(builder.or_(k_biased, ir.Constant(I64, 0x4330000000000000)),
                                     F64), _d(4503599627370496.0 + 1024.0))
    ff = builder.fmul(f, f)
    hfsq = builder.fmul(_d(0.5), ff)                          # exact
    hfsq_lo = builder.fmul(_d(0.5), _two_prod_err(builder, f, f, ff))
    s = builder.fdiv(f, builder.fadd(_d(2.0), f))
    z = builder.fmul(s, s)
    r = builder.fmul(z, _horner64(builder, z, _ATANH_SERIES_64))
    small = builder.fadd(builder.fmul(s, builder.fadd(hfsq, r)),
                         builder.fadd(builder.fmul(k, _d(_LN2_LO)), c))
    big, big_err = _two_sum(builder, builder.fmul(k, _d(_LN2_HI)), f)
    big, err2 = _two_sum(builder, big, builder.fneg(hfsq))
    lo = builder.fadd(builder.fadd(big_err, err2), builder.fsub(small, hfsq_lo))
    y = builder.fadd(big, lo)
    # u = -1: -inf; u < -1: NaN; u = inf: inf; +-0 keeps its sign
    y = builder.select(builder.fcmp_ordered("==", u, _d(-1.0)), _d(-math.inf), y)
    y = _select_lt(builder, u, _d(-1.0), _d(math.nan), y)
    y = builder.select(builder.fcmp_ordered("==", u, _d(math.inf)), u, y)
    return _nan_passes(builder, u, _zero_passes(builder, u, y))


def _unary(f32_codegen, f64_codegen, name, doc):
    """An intrinsic computing ``f32_codegen`` on float32 and ``f64_codegen``
    on float64 (``None``: libm's ``name``)."""
    def typer(typingctx, x):
        if x == types.float32:
            def codegen(context, builder, signature, args):
                return f32_codegen(builder, args[0])
        elif x == types.float64:
            def codegen(context, builder, signature, args):
                if f64_codegen is None:
                    return _libm64(builder, name, args[0])
                return f64_codegen(builder, args[0])
        else:
            return None
        return x(x), codegen
    typer.__name__ = name
    typer.__doc__ = doc
    return intrinsic(typer)


exp = _unary(_exp_f32, _exp_f64, "exp", "exp(x); vectorisable polynomials.")
expm1 = _unary(_expm1_f32, _expm1_f64, "expm1", "exp(x) - 1, accurate near 0.")
log1p = _unary(_log1p_f32, _log1p_f64, "log1p",
               "log(1 + u); the float32 version assumes u in [0, 1] (all callers), "
               "the float64 one takes any u.")
tanh = _unary(_tanh_f32, _tanh_f64, "tanh", "tanh(x); vectorisable for float32 and float64.")
# In a float64 loop that cannot vectorise anyway (beside a libm call, or an
# ordered float sum), libm's table-driven exp is ~3x faster than the
# polynomial (measured 4.2 against 13 ns per element, sum of exp over 256K).
exp_in_scalar_loop = _unary(_exp_f32, None, "exp",
                            "exp(x); for float64 libm's, for loops that stay scalar anyway.")
erfc = _unary(_erfc_f32, None, "erfc", "1 - erf(x) without cancellation; t exp(-x^2) R(t) for "
              "float32, libm for float64.")


def _gelu_grad_f64(builder, z):
    # 0.5 erfc(-z / sqrt 2) + z (phi0 exp(-(0.5 z z))), libm's erfc and exp
    half = _d(0.5)
    cdf = builder.fmul(half, _libm64(builder, "erfc", builder.fmul(builder.fneg(z), _d(_SQRT1_2))))
    g = _libm64(builder, "exp", builder.fneg(builder.fmul(builder.fmul(half, z), z)))
    return builder.fadd(cdf, builder.fmul(z, builder.fmul(_d(_INV_SQRT_2PI), g)))


def _gelu_f64(builder, z):
    # 0.5 z erfc(-z / sqrt 2), libm's erfc
    return builder.fmul(builder.fmul(_d(0.5), z),
                        _libm64(builder, "erfc", builder.fmul(builder.fneg(z), _d(_SQRT1_2))))


gelu = _unary(_gelu_f32, _gelu_f64, "gelu",
              "z Phi(z) (the exact GELU): erfc and exp in one for float32, libm's erfc for "
              "float64.")
gelu_grad = _unary(_gelu_grad_f32, _gelu_grad_f64, "gelu_grad",
                   "Phi(z) + z phi(z) (exact GELU's derivative): one exp for float32, libm's "
                   "erfc and exp for float64.")


@intrinsic
def like(typingctx, x, value):
    """``value`` as a scalar of ``x``'s float type.

    A Python float literal is float64 in Numba and would silently promote a
    float32 kernel to float64 (half the SIMD width, and a different result);
    the cast of a constant folds away in LLVM.
    """
    if not isinstance(x, types.Float):
        return None
    sig = x(x, value)

    def codegen(context, builder, signature, args):
        return context.cast(builder, args[1], signature.args[1], signature.return_type)

    return sig, codegen


@intrinsic
def divide_by_invariant(typingctx, x, b, inv_b):
    """``x / b`` rounded as the division, for a divisor ``b`` the same in
    every iteration of a loop and ``inv_b = 1.0 / float64(b)`` computed
    once before it.

    float32: the float64 product ``x * inv_b`` rounded to float32, which is
    bitwise ``x / b`` and keeps the loop off the divider (a float32 division
    per element bounds Adam's update there; bench/RESULTS.md).  Why it is
    exact: ``inv_b`` and the product each round once in float64, so the
    product is within 2^-52 (relative) of x / b.  A quotient of two 24-bit
    significands is never a float32 rounding midpoint (x's odd part would
    hold the midpoint's odd 25-bit significand) and lies more than 2^-50
    (relative) from one, so the product rounds to the quotient's nearest
    float32 whenever that is a normal number (tests/test_mathfn.py checks
    every significand of x against a set of divisors).  Zero, Inf and NaN
    come out as from the division.  float64: the division itself (no wider
    type to multiply in).
    """
    if not (isinstance(x, types.Float) and b == x and inv_b == types.float64):
        return None

    def codegen(context, builder, signature, args):
        if x == types.float32:
            wide = builder.fpext(args[0], ir.DoubleType())
            return builder.fptrunc(builder.fmul(wide, args[2]), F32)
        return builder.fdiv(args[0], args[1])

    return x(x, b, inv_b), codegen


__all__ = ["exp", "expm1", "log1p", "tanh", "erfc", "gelu", "gelu_grad",
           "exp_in_scalar_loop", "like", "divide_by_invariant"]
