"""Vectorisable float32 transcendentals, exact libm for float64.

Without Intel SVML, ``np.exp`` or ``np.tanh`` inside a loop compiles to a
scalar libm call (~14 ns per element).  The float32 versions below are
branch-free polynomials that LLVM vectorises; their maximum errors are tested
against float64 over the whole float32 range (tests/test_mathfn.py).  float64
keeps libm: float64 is what gradient checks and PyTorch parity run on.

Each function (``exp``, ``expm1``, ``log1p``, ``tanh``, ``erfc``, and ``like`` for
typed constants) is a Numba *intrinsic*: it emits its LLVM IR straight into
the calling loop.  Written as inlined ``@njit``/overload functions instead,
every call site had to be typed again, and the activation kernels took over
10 s to compile cold; as intrinsics their typing is a table lookup.  The IR
performs exactly the operations of the formulas in the comments, in that
order, without fast-math flags, so NaN and Inf propagate and results are
reproducible.
"""
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


def _horner(builder, x, coeffs):
    p = _c(coeffs[0])
    for c in coeffs[1:]:
        p = builder.fadd(builder.fmul(p, x), _c(c))
    return p


def _select_lt(builder, a, b, if_true, if_false):
    return builder.select(builder.fcmp_ordered("<", a, b), if_true, if_false)


def _pow2(builder, n):
    # 2**n for an integral float32 n in [-126, 127], built in the exponent bits
    bits = builder.shl(builder.add(builder.fptosi(n, I32), ir.Constant(I32, 127)),
                       ir.Constant(I32, 23))
    return builder.bitcast(bits, F32)


_EXP_COEFFS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
               1.6666665459e-1, 5.0000001201e-1)


def _exp_f32(builder, x):
    # Cody-Waite: x = n ln2 + r, |r| <= ln2/2, exp(r) = 1 + r + r^2 p(r).
    # 2**n is applied in two halves so that results near overflow and in the
    # subnormal range come out right; beyond them (x outside [-104, 89]) the
    # product over/underflows to inf/0 by itself.  Max rel error ~2 ulp.
    xc = _select_lt(builder, x, _c(-104.0), _c(-104.0), x)
    xc = _select_lt(builder, _c(89.0), xc, _c(89.0), xc)
    n = _f32_intrinsic(builder, "floor",
                       builder.fadd(builder.fmul(xc, _c(1.4426950408889634)), _c(0.5)))
    r = builder.fsub(xc, builder.fmul(n, _c(0.693359375)))     # ln 2 split in two:
    r = builder.fsub(r, builder.fmul(n, _c(-2.12194440e-4)))   # n * hi is exact
    p = _horner(builder, r, _EXP_COEFFS)
    p = builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), _c(1.0))
    half = _f32_intrinsic(builder, "floor", builder.fmul(n, _c(0.5)))
    y = builder.fmul(builder.fmul(p, _pow2(builder, half)),
                     _pow2(builder, builder.fsub(n, half)))
    return builder.select(builder.fcmp_unordered("uno", x, x), x, y)   # NaN in, NaN out


_EXPM1_TAYLOR = (1.3888889e-3, 8.3333338e-3, 4.1666668e-2, 1.6666667e-1, 0.5, 1.0)


def _expm1_f32(builder, x):
    # exp(x) - 1 loses all relative accuracy near 0; there the Taylor series
    # x (1 + x/2 + x^2/6 + ... + x^5/720) is exact to float32 (|x| < 1/4).
    small = builder.fmul(x, _horner(builder, x, _EXPM1_TAYLOR))
    big = builder.fsub(_exp_f32(builder, x), _c(1.0))
    return _select_lt(builder, _f32_intrinsic(builder, "fabs", x), _c(0.25), small, big)


_LOG1P_SERIES = tuple(1.0 / k for k in (13, 11, 9, 7, 5, 3, 1))


def _log1p_f32(builder, u):
    # log(1 + u) = 2 atanh(s), s = u / (2 + u).  Valid (and used) for u in
    # [0, 1]: there s <= 1/3 and the odd series to s**13 is exact to float32.
    s = builder.fdiv(u, builder.fadd(_c(2.0), u))
    p = _horner(builder, builder.fmul(s, s), _LOG1P_SERIES)
    return builder.fmul(builder.fmul(_c(2.0), s), p)


_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
           5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
           4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03,
           4.89352518554385e-03)
_TANH_CLAMP = 7.90531110763549805          # tanh(x) == +-1 in float32 beyond


def _tanh_f32(builder, x):
    # Rational minimax approximation x p(x^2) / q(x^2) as used by Eigen and
    # XLA, on x clamped to +-7.905; max abs error 4.1e-7 (float32 rounding of
    # the evaluation; worst at x = 5.827876, see tests/test_mathfn.py).  Near
    # 0 the quotient loses relative accuracy (~2 ulp), so |x| < 1/16 uses the
    # odd Taylor series x (1 - x^2/3 + 2x^4/15), exact to float32 there.
    xc = _select_lt(builder, x, _c(-_TANH_CLAMP), _c(-_TANH_CLAMP), x)
    xc = _select_lt(builder, _c(_TANH_CLAMP), xc, _c(_TANH_CLAMP), xc)
    x2 = builder.fmul(xc, xc)
    y = builder.fdiv(builder.fmul(_horner(builder, x2, _TANH_P), xc), _horner(builder, x2, _TANH_Q))
    xs2 = builder.fmul(x, x)
    taylor = builder.fmul(x, _horner(builder, xs2, (2.0 / 15.0, -1.0 / 3.0, 1.0)))
    return _select_lt(builder, _f32_intrinsic(builder, "fabs", x), _c(0.0625), taylor, y)


# Numerical Recipes' erfcc (Chebyshev fit): erfc(x) = t exp(-x^2 + P(t)),
# t = 1 / (1 + |x|/2), fractional error < 1.2e-7 for every x >= 0.
_ERFC_P = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
           0.09678418, 0.37409196, 1.00002368, -1.26551223)


def _exp_f32_sum(builder, hi, lo):
    # exp(hi + lo) for hi exact (it carries the magnitude) and |lo| < 2: the
    # Cody-Waite reduction of _exp_f32 with lo added after n ln2_hi is taken
    # from hi, so the rounding of hi + lo (ulp(100) = 7.6e-6 relative at the
    # end) never enters.  Arguments only in [-124, 3] (erfc): no clamp, 2**n
    # in two halves as in _exp_f32 for the subnormal results.
    s = builder.fadd(hi, lo)
    n = _f32_intrinsic(builder, "floor",
                       builder.fadd(builder.fmul(s, _c(1.4426950408889634)), _c(0.5)))
    r = builder.fsub(hi, builder.fmul(n, _c(0.693359375)))
    r = builder.fadd(r, lo)
    r = builder.fsub(r, builder.fmul(n, _c(-2.12194440e-4)))
    p = _horner(builder, r, _EXP_COEFFS)
    p = builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), _c(1.0))
    half = _f32_intrinsic(builder, "floor", builder.fmul(n, _c(0.5)))
    return builder.fmul(builder.fmul(p, _pow2(builder, half)),
                        _pow2(builder, builder.fsub(n, half)))


def _erfc_f32(builder, x):
    # In float32 the exponent -x^2 (up to ~-100) would lose ~50 ulp to its
    # own rounding, so x is split as x = xh + xl with xh holding 12 bits:
    # xh^2 is exact, and exp(-x^2 + P(t)) = exp(-xh^2 + (P(t) - (x - xh)(x + xh)))
    # is ONE exp of an exact part plus a small one (_exp_f32_sum).
    # erfc(x) = 2 - erfc(-x) for x < 0.  Max error 6.5 ulp over the normal
    # range (tests/test_mathfn.py).  |x| > 11 gives 0 (or 2) as erfc
    # underflows from 10.1; the clamp keeps inf out of (x - xh)(x + xh).
    ax = _f32_intrinsic(builder, "fabs", x)
    ax = _select_lt(builder, _c(11.0), ax, _c(11.0), ax)
    t = builder.fdiv(_c(1.0), builder.fadd(_c(1.0), builder.fmul(_c(0.5), ax)))
    bits = builder.and_(builder.bitcast(ax, I32), ir.Constant(I32, -(1 << 12)))
    xh = builder.bitcast(bits, F32)
    d = builder.fmul(builder.fsub(ax, xh), builder.fadd(ax, xh))
    e = _exp_f32_sum(builder, builder.fneg(builder.fmul(xh, xh)),
                     builder.fsub(_horner(builder, t, _ERFC_P), d))
    y = builder.fmul(t, e)
    y = _select_lt(builder, x, _c(0.0), builder.fsub(_c(2.0), y), y)
    return builder.select(builder.fcmp_unordered("uno", x, x), x, y)   # NaN in, NaN out


def _unary(f32_codegen, libm_name, doc):
    """An intrinsic computing ``f32_codegen`` on float32 and libm on float64."""
    def typer(typingctx, x):
        if x == types.float32:
            def codegen(context, builder, signature, args):
                return f32_codegen(builder, args[0])
        elif x == types.float64:
            def codegen(context, builder, signature, args):
                return _libm64(builder, libm_name, args[0])
        else:
            return None
        return x(x), codegen
    typer.__name__ = libm_name
    typer.__doc__ = doc
    return intrinsic(typer)


exp = _unary(_exp_f32, "exp", "exp(x); vectorisable polynomial for float32, libm for float64.")
expm1 = _unary(_expm1_f32, "expm1", "exp(x) - 1, accurate near 0.")
log1p = _unary(_log1p_f32, "log1p",
               "log(1 + u); the float32 version assumes u in [0, 1] (all callers).")
tanh = _unary(_tanh_f32, "tanh", "tanh(x); rational approximation for float32, libm for float64.")
erfc = _unary(_erfc_f32, "erfc", "1 - erf(x) without cancellation; Chebyshev fit for float32, "
              "libm for float64.")


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


__all__ = ["exp", "expm1", "log1p", "tanh", "erfc", "like"]
del math
