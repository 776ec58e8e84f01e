"""Vectorisable float32 transcendentals, exact libm for float64.

Without Intel SVML, ``np.exp`` or ``np.tanh`` inside a loop compiles to a
scalar libm call (~14 ns per element).  The float32 versions below are
branch-free polynomials that LLVM vectorises; their maximum errors are tested
against float64 over the whole float32 range (tests/test_mathfn.py).  float64
keeps libm: float64 is what gradient checks and PyTorch parity run on.

Each public function (``exp``, ``expm1``, ``log1p``, ``tanh``) is a Numba
overload picked by argument type at compile time, so kernels call one name
for both precisions.
"""
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload, register_jitable



@intrinsic
def _int32_as_float32(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32 (no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)          # ln 2 split in two: exact product with n
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_HI = np.float32(89.0)                 # exp overflows float32 above ~88.72
_EXP_LO = np.float32(-104.0)               # and underflows to 0 below ~-103.97


@register_jitable(inline="always")
def _pow2_f32(n):
    # 2**n for an integral float32 n in [-126, 127], built in the exponent bits.
    return _int32_as_float32((np.int32(n) + np.int32(127)) << np.int32(23))


@register_jitable(inline="always")
def _exp_f32(x):
    # Cody-Waite: x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6 polynomial.
    # 2**n is applied in two halves so that results near overflow and in the
    # subnormal range come out right; beyond them the product over/underflows
    # to inf/0 by itself.  Max rel error ~2 ulp.
    xc = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI
    r = r - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    half = np.floor(n * np.float32(0.5))
    y = p * _pow2_f32(half) * _pow2_f32(n - half)
    if x != x:
        y = x
    return y


@register_jitable(inline="always")
def _expm1_f32(x):
    # exp(x) - 1 loses all relative accuracy near 0; use Taylor there.
    small = x * (np.float32(1.0) + x * (np.float32(0.5) + x * (
        np.float32(1.6666667e-1) + x * (np.float32(4.1666668e-2) + x * (
            np.float32(8.3333338e-3) + x * np.float32(1.3888889e-3))))))
    big = _exp_f32(x) - np.float32(1.0)
    return small if abs(x) < np.float32(0.25) else big


@register_jitable(inline="always")
def _log1p_f32(u):
    # log(1 + u) = 2 atanh(s), s = u / (2 + u).  Valid (and used) for u in
    # [0, 1]: there s <= 1/3 and the odd series to s**13 is exact to float32.
    s = u / (np.float32(2.0) + u)
    s2 = s * s
    p = np.float32(1.0 / 13.0)
    p = p * s2 + np.float32(1.0 / 11.0)
    p = p * s2 + np.float32(1.0 / 9.0)
    p = p * s2 + np.float32(1.0 / 7.0)
    p = p * s2 + np.float32(1.0 / 5.0)
    p = p * s2 + np.float32(1.0 / 3.0)
    p = p * s2 + np.float32(1.0)
    return np.float32(2.0) * s * p


_TANH_CLAMP = np.float32(7.90531110763549805)   # tanh(x) == +-1 in float32 beyond


@register_jitable(inline="always")
def _tanh_f32(x):
    # Rational minimax approximation p(x)/q(x) (odd/even), as used by Eigen
    # and XLA; max abs error 4.1e-7 over the whole float32 line (float32
    # rounding of the evaluation; worst at x = 5.827876, see tests/test_mathfn.py).
    xc = min(max(x, -_TANH_CLAMP), _TANH_CLAMP)
    x2 = xc * xc
    p = np.float32(-2.76076847742355e-16)
    p = p * x2 + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    p = p * xc
    q = np.float32(1.19825839466702e-06)
    q = q * x2 + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    y = p / q
    # Near 0 the quotient loses relative accuracy (~2 ulp); the odd Taylor
    # series x (1 - x^2/3 + 2x^4/15) is exact to float32 there (next term
    # 17x^7/315 is < 4e-9 relative for |x| < 1/16).
    x2s = x * x
    taylor = x * (np.float32(1.0) + x2s * (np.float32(-1.0 / 3.0) + x2s * np.float32(2.0 / 15.0)))
    if abs(x) < np.float32(0.0625):
        y = taylor
    return y


def exp(x):
    """exp(x); vectorisable polynomial for float32, libm for float64."""


def expm1(x):
    """exp(x) - 1, accurate near 0."""


def log1p(x):
    """log(1 + u); the float32 version assumes u in [0, 1] (all callers)."""


def tanh(x):
    """tanh(x); rational approximation for float32, libm for float64."""


def _by_precision(f32_impl, f64_impl):
    def typer(x):
        if x == types.float32:
            return f32_impl
        if isinstance(x, types.Float):
            return f64_impl
        return None
    return typer


overload(exp, inline="always")(_by_precision(lambda x: _exp_f32(x), lambda x: np.exp(x)))
overload(expm1, inline="always")(_by_precision(lambda x: _expm1_f32(x), lambda x: np.expm1(x)))
overload(log1p, inline="always")(_by_precision(lambda x: _log1p_f32(x), lambda x: np.log1p(x)))
overload(tanh, inline="always")(_by_precision(lambda x: _tanh_f32(x), lambda x: np.tanh(x)))


def like(x, value):
    """``value`` as a scalar of ``x``'s float type.

    A Python float literal is float64 in Numba and would silently promote a
    float32 kernel to float64 (half the SIMD width, and a different result).
    """


def _like_typer(x, value):
    if x == types.float32:
        return lambda x, value: np.float32(value)
    if isinstance(x, types.Float):
        return lambda x, value: np.float64(value)
    return None


overload(like, inline="always")(_like_typer)
