"""Activation functions: scalar forward and derivative, and elementwise kernels.

An activation is an integer code (``CODES``).  Every kernel branches on the
code ONCE, outside its loops: each branch calls the same inlined loop with the
code as a compile-time constant, so LLVM folds the scalar ``if`` chain away and
each loop body is branch-free and vectorised.  One compiled function per dtype
serves every activation, which keeps the on-disk cache small and generic.

Derivatives are written in terms of the saved output ``a`` (all activations but
gelu) or the pre-activation ``z`` (gelu), as DESIGN.md's data layout asks.
NaN propagates through every forward (relu(NaN) is NaN, as in PyTorch), so the
non-finite guards downstream see it.
"""
import numpy as np
from numba import njit

from . import mathfn
from ._jit import INLINE, JIT

IDENTITY, RELU, LEAKY_RELU, ELU, SIGMOID, TANH, SOFTPLUS, GELU = range(8)
CODES = {
    "identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "elu": ELU,
    "sigmoid": SIGMOID, "tanh": TANH, "softplus": SOFTPLUS, "gelu": GELU,
}
DEFAULT_ALPHA = {"leaky_relu": 0.01, "elu": 1.0}
NEEDS_Z = frozenset([GELU])       # derivative needs the pre-activation

_GELU_K = 0.7978845608028654      # sqrt(2 / pi)
_GELU_C = 0.044715

like = mathfn.like


@njit(**INLINE)
def act_scalar(z, act, alpha):
    """f(z) for activation code ``act`` (a compile-time constant in kernels)."""
    zero, one = like(z, 0.0), like(z, 1.0)
    if act == IDENTITY:
        return z
    if act == RELU:
        return zero if z < zero else z
    if act == LEAKY_RELU:
        return like(z, alpha) * z if z < zero else z
    if act == ELU:
        return like(z, alpha) * mathfn.expm1(z) if z <= zero else z
    if act == SIGMOID:
        return one / (one + mathfn.exp(-z))
    if act == TANH:
        return mathfn.tanh(z)
    if act == SOFTPLUS:
        # log(1 + e^z) = max(z, 0) + log1p(e^-|z|): finite for any finite z
        return (z if z > zero else zero) + mathfn.log1p(mathfn.exp(-abs(z)))
    # GELU, tanh approximation
    inner = like(z, _GELU_K) * (z + like(z, _GELU_C) * z * z * z)
    return like(z, 0.5) * z * (one + mathfn.tanh(inner))


@njit(**INLINE)
def act_derivative(a, z, act, alpha):
    """f'(z) from the output ``a`` (and ``z``, read only for gelu)."""
    zero, one = like(a, 0.0), like(a, 1.0)
    if act == IDENTITY:
        return one
    if act == RELU:
        return one if a > zero else zero
    if act == LEAKY_RELU:
        return one if a > zero else like(a, alpha)
    if act == ELU:
        return one if a > zero else a + like(a, alpha)
    if act == SIGMOID:
        return a * (one - a)
    if act == TANH:
        return one - a * a
    if act == SOFTPLUS:
        return -mathfn.expm1(-a)        # sigmoid(z) = 1 - e^-a, exact for small a
    # GELU: 0.5 (1 + t) + 0.5 z (1 - t^2) k (1 + 3 c z^2).  (1 - t^2) multiplies
    # z first, so a saturated unit gives 0 rather than inf * 0 for |z| to 1e6.
    half, k, c = like(z, 0.5), like(z, _GELU_K), like(z, _GELU_C)
    t = mathfn.tanh(k * (z + c * z * z * z))
    return half * (one + t) + ((half * (one - t * t)) * z) * (k * (one + like(z, 3.0) * c * z * z))


# --- fused elementwise passes (each inlined with a constant code) ----------
#
# Each loop comes in an in-place form that touches ONE array.  LLVM vectorises
# a loop over two array arguments only behind a run-time check that they do
# not overlap; called in place (the same array twice) that check fails and
# the scalar fallback runs, 4-8x slower (measured: bias+relu over 256x1024
# float32, 143 us in place through two arguments, 18.5 us through one).

@njit(**INLINE)
def _bias_act_loop(z, b, out, act, alpha, inplace):
    if inplace:
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                z[i, j] = act_scalar(z[i, j] + b[j], act, alpha)
    else:
        for i in range(z.shape[0]):
            for j in range(z.shape[1]):
                t = z[i, j] + b[j]
                z[i, j] = t
                out[i, j] = act_scalar(t, act, alpha)


@njit(**INLINE)
def _bias_act_grad_loop(da, a, z, dz, db, act, alpha, inplace):
    db[:] = 0
    if inplace:
        for i in range(da.shape[0]):
            for j in range(da.shape[1]):
                g = da[i, j] * act_derivative(a[i, j], z[i, j], act, alpha)
                da[i, j] = g
                db[j] += g
    else:
        for i in range(da.shape[0]):
            for j in range(da.shape[1]):
                g = da[i, j] * act_derivative(a[i, j], z[i, j], act, alpha)
                dz[i, j] = g
                db[j] += g


@njit(**JIT)
def bias_act(z, b, out, act, alpha):
    """One pass: ``z += b`` (row-broadcast bias), ``out = f(z)``.

    2-D C-contiguous arrays.  ``out`` may be ``z`` itself (the dense forward
    runs in place on the GEMM's output); a separate ``out`` keeps ``z`` for
    activations whose derivative needs it (gelu).
    """
    inplace = out.ctypes.data == z.ctypes.data
    if act == IDENTITY:
        _bias_act_loop(z, b, out, IDENTITY, alpha, inplace)
    elif act == RELU:
        _bias_act_loop(z, b, out, RELU, alpha, inplace)
    elif act == LEAKY_RELU:
        _bias_act_loop(z, b, out, LEAKY_RELU, alpha, inplace)
    elif act == ELU:
        _bias_act_loop(z, b, out, ELU, alpha, inplace)
    elif act == SIGMOID:
        _bias_act_loop(z, b, out, SIGMOID, alpha, inplace)
    elif act == TANH:
        _bias_act_loop(z, b, out, TANH, alpha, inplace)
    elif act == SOFTPLUS:
        _bias_act_loop(z, b, out, SOFTPLUS, alpha, inplace)
    else:
        _bias_act_loop(z, b, out, GELU, alpha, inplace)


@njit(**JIT)
def bias_act_grad(da, a, z, dz, db, act, alpha):
    """One pass: ``dz = da * f'`` (from ``a``, or ``z`` for gelu) and
    ``db = dz.sum(axis=0)``.  ``dz`` may be ``da`` itself."""
    inplace = dz.ctypes.data == da.ctypes.data
    if act == IDENTITY:
        _bias_act_grad_loop(da, a, z, dz, db, IDENTITY, alpha, inplace)
    elif act == RELU:
        _bias_act_grad_loop(da, a, z, dz, db, RELU, alpha, inplace)
    elif act == LEAKY_RELU:
        _bias_act_grad_loop(da, a, z, dz, db, LEAKY_RELU, alpha, inplace)
    elif act == ELU:
        _bias_act_grad_loop(da, a, z, dz, db, ELU, alpha, inplace)
    elif act == SIGMOID:
        _bias_act_grad_loop(da, a, z, dz, db, SIGMOID, alpha, inplace)
    elif act == TANH:
        _bias_act_grad_loop(da, a, z, dz, db, TANH, alpha, inplace)
    elif act == SOFTPLUS:
        _bias_act_grad_loop(da, a, z, dz, db, SOFTPLUS, alpha, inplace)
    else:
        _bias_act_grad_loop(da, a, z, dz, db, GELU, alpha, inplace)


@njit(**JIT)
def activation_forward(z, out, act, alpha):
    """out = f(z) elementwise on 2-D C-contiguous arrays (``z`` is kept)."""
    out[:] = z
    bias_act(out, np.zeros(z.shape[1], z.dtype), out, act, alpha)


@njit(**JIT)
def activation_backward(da, a, z, dz, act, alpha):
    """dz = da * f'(z), with f' read from the output ``a`` (``z`` for gelu)."""
    bias_act_grad(da, a, z, dz, np.empty(da.shape[1], da.dtype), act, alpha)
