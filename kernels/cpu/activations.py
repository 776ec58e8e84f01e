"""Activation functions: one scalar function (and derivative) per activation,
and the fused elementwise passes of the dense layer.

An activation is an integer code (``CODES``).  Each kernel below branches on
the code ONCE, outside its loops, and each branch runs the one generic loop
with that activation's scalar function inlined into it: the compiled loop
bodies are branch-free and vectorised, one per activation, and one compiled
kernel per dtype serves every activation (a small, generic on-disk cache).

Derivatives are written in terms of the saved output ``a`` (all activations
but gelu and silu) or the pre-activation ``z`` (gelu, silu), as DESIGN.md's
data layout asks.
NaN propagates through every forward (relu(NaN) is NaN, as in PyTorch), so the
non-finite guards downstream see it.
"""
import numpy as np
from numba import njit

from . import mathfn
from ._jit import INLINE, JIT

IDENTITY, RELU, LEAKY_RELU, ELU, SIGMOID, TANH, SOFTPLUS, GELU, SILU = range(9)
CODES = {
    "identity": IDENTITY, "relu": RELU, "leaky_relu": LEAKY_RELU, "elu": ELU,
    "sigmoid": SIGMOID, "tanh": TANH, "softplus": SOFTPLUS, "gelu": GELU,
    "silu": SILU,
}
DEFAULT_ALPHA = {"leaky_relu": 0.01, "elu": 1.0}
NEEDS_Z = frozenset([GELU, SILU])   # derivative needs the pre-activation

_GELU_K = 0.7978845608028654      # sqrt(2 / pi)
_GELU_C = 0.044715

like = mathfn.like


# --- forward: f(z) ------------------------------------------------------------

@njit(**INLINE)
def identity(z, alpha):
    return z


@njit(**INLINE)
def relu(z, alpha):
    return like(z, 0.0) if z < like(z, 0.0) else z


@njit(**INLINE)
def leaky_relu(z, alpha):
    return like(z, alpha) * z if z < like(z, 0.0) else z


@njit(**INLINE)
def elu(z, alpha):
    return like(z, alpha) * mathfn.expm1(z) if z <= like(z, 0.0) else z


@njit(**INLINE)
def sigmoid(z, alpha):
    one = like(z, 1.0)
    return one / (one + mathfn.exp(-z))


@njit(**INLINE)
def tanh(z, alpha):
    return mathfn.tanh(z)


@njit(**INLINE)
def softplus(z, alpha):
    # log(1 + e^z) = max(z, 0) + log1p(e^-|z|): finite for any finite z
    zero = like(z, 0.0)
    return (z if z > zero else zero) + mathfn.log1p(mathfn.exp(-abs(z)))


@njit(**INLINE)
def gelu(z, alpha):
    # tanh approximation: 0.5 z (1 + tanh(k (z + c z^3)))
    inner = like(z, _GELU_K) * (z + like(z, _GELU_C) * z * z * z)
    return like(z, 0.5) * z * (like(z, 1.0) + mathfn.tanh(inner))


@njit(**INLINE)
def silu(z, alpha):
    # z sigmoid(z), with sigmoid(z) = e / (1 + e) for z < 0 (e = exp(-|z|)):
    # exp never overflows, and z << 0 keeps its tiny value instead of -0.
    one = like(z, 1.0)
    e = mathfn.exp(-abs(z))
    return z * ((one if z >= like(z, 0.0) else e) / (one + e))


@njit(**INLINE)
def needs_z(act):
    """True for the activations whose derivative reads ``z`` (``NEEDS_Z``)."""
    return act == GELU or act == SILU


# --- derivative: f'(z) from the output a (and z for gelu, silu) ----------------

@njit(**INLINE)
def d_identity(a, z, alpha):
    return like(a, 1.0)


@njit(**INLINE)
def d_relu(a, z, alpha):
    return like(a, 1.0) if a > like(a, 0.0) else like(a, 0.0)


@njit(**INLINE)
def d_leaky_relu(a, z, alpha):
    return like(a, 1.0) if a > like(a, 0.0) else like(a, alpha)


@njit(**INLINE)
def d_elu(a, z, alpha):
    return like(a, 1.0) if a > like(a, 0.0) else a + like(a, alpha)


@njit(**INLINE)
def d_sigmoid(a, z, alpha):
    return a * (like(a, 1.0) - a)


@njit(**INLINE)
def d_tanh(a, z, alpha):
    return like(a, 1.0) - a * a


@njit(**INLINE)
def d_softplus(a, z, alpha):
    return -mathfn.expm1(-a)        # sigmoid(z) = 1 - e^-a, exact for small a


@njit(**INLINE)
def d_gelu(a, z, alpha):
    # 0.5 (1 + t) + 0.5 z (1 - t^2) k (1 + 3 c z^2).  (1 - t^2) multiplies z
    # first, so a saturated unit gives 0 rather than inf * 0 for |z| to 1e6.
    one, half, k, c = like(z, 1.0), like(z, 0.5), like(z, _GELU_K), like(z, _GELU_C)
    t = mathfn.tanh(k * (z + c * z * z * z))
    return half * (one + t) + ((half * (one - t * t)) * z) * (k * (one + like(z, 3.0) * c * z * z))


@njit(**INLINE)
def d_silu(a, z, alpha):
    # s (1 + z (1 - s)), s = sigmoid(z).  1 - s = 1 / (1 + e) for z < 0 and
    # e / (1 + e) for z >= 0 (e = exp(-|z|)): neither side cancels.
    one = like(z, 1.0)
    e = mathfn.exp(-abs(z))
    pos = z >= like(z, 0.0)
    d = one + e
    s = (one if pos else e) / d
    return s * (one + z * ((e if pos else one) / d))


# --- the fused passes -----------------------------------------------------------
#
# The loops run in place on ONE array: LLVM vectorises a loop over two array
# arguments only behind a run-time check that they do not overlap, and called
# in place through two arguments that check fails and the scalar fallback
# runs, 4-8x slower (measured: bias+relu over 256x1024 float32, 143 us through
# two arguments, 18.5 us through one).

@njit(**JIT)
def _copy(src, dst):
    # An explicit loop, not ``dst[:] = src``: Numba's slice assignment drags
    # in the formatting of its shape-mismatch message, seconds of compile time.
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, j] = src[i, j]


@njit(**INLINE)
def _bias_act_loop(y, b, alpha, f):
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[i, j] = f(y[i, j] + b[j], alpha)


@njit(**INLINE)
def _grad_loop(g, a, z, db, alpha, df):
    db[:] = 0
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            t = g[i, j] * df(a[i, j], z[i, j], alpha)
            g[i, j] = t
            db[j] += t


@njit(**INLINE)
def _bias_act_keep_z(z, b, out, alpha, f):
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            t = z[i, j] + b[j]
            z[i, j] = t
            out[i, j] = f(t, alpha)


@njit(**JIT)
def bias_act(z, b, out, act, alpha):
    """One pass: ``z += b`` (row-broadcast bias), ``out = f(z)``.

    2-D C-contiguous arrays.  ``out`` may be ``z`` itself (the dense forward
    runs in place on the GEMM's output); a separate ``out`` keeps ``z`` for
    activations whose derivative needs it (gelu, silu).
    """
    y, bias = z, b
    if out.ctypes.data != z.ctypes.data:
        if act == GELU:
            _bias_act_keep_z(z, b, out, alpha, gelu)
            return
        if act == SILU:
            _bias_act_keep_z(z, b, out, alpha, silu)
            return
        for i in range(z.shape[0]):         # rare: z kept though not needed
            for j in range(z.shape[1]):
                z[i, j] += b[j]
        _copy(z, out)
        y, bias = out, np.zeros_like(b)
    if act == IDENTITY:
        _bias_act_loop(y, bias, alpha, identity)
    elif act == RELU:
        _bias_act_loop(y, bias, alpha, relu)
    elif act == LEAKY_RELU:
        _bias_act_loop(y, bias, alpha, leaky_relu)
    elif act == ELU:
        _bias_act_loop(y, bias, alpha, elu)
    elif act == SIGMOID:
        _bias_act_loop(y, bias, alpha, sigmoid)
    elif act == TANH:
        _bias_act_loop(y, bias, alpha, tanh)
    elif act == SOFTPLUS:
        _bias_act_loop(y, bias, alpha, softplus)
    elif act == SILU:
        _bias_act_loop(y, bias, alpha, silu)
    else:
        _bias_act_loop(y, bias, alpha, gelu)


@njit(**JIT)
def bias_act_grad(da, a, z, dz, db, act, alpha):
    """One pass: ``dz = da * f'`` (from ``a``, or ``z`` for gelu, silu) and
    ``db = dz.sum(axis=0)``.  ``dz`` may be ``da`` itself (one pass); a
    separate ``dz`` costs a copy first."""
    if dz.ctypes.data != da.ctypes.data:
        _copy(da, dz)
    if act == IDENTITY:
        _grad_loop(dz, a, z, db, alpha, d_identity)
    elif act == RELU:
        _grad_loop(dz, a, z, db, alpha, d_relu)
    elif act == LEAKY_RELU:
        _grad_loop(dz, a, z, db, alpha, d_leaky_relu)
    elif act == ELU:
        _grad_loop(dz, a, z, db, alpha, d_elu)
    elif act == SIGMOID:
        _grad_loop(dz, a, z, db, alpha, d_sigmoid)
    elif act == TANH:
        _grad_loop(dz, a, z, db, alpha, d_tanh)
    elif act == SOFTPLUS:
        _grad_loop(dz, a, z, db, alpha, d_softplus)
    elif act == SILU:
        _grad_loop(dz, a, z, db, alpha, d_silu)
    else:
        _grad_loop(dz, a, z, db, alpha, d_gelu)


@njit(**JIT)
def activation_forward(z, out, act, alpha):
    """out = f(z) elementwise on 2-D C-contiguous arrays (``z`` is kept)."""
    _copy(z, out)
    bias_act(out, np.zeros(z.shape[1], z.dtype), out, act, alpha)


@njit(**JIT)
def activation_backward(da, a, z, dz, act, alpha):
    """dz = da * f'(z), with f' read from the output ``a`` (``z`` for gelu, silu)."""
    bias_act_grad(da, a, z, dz, np.empty(da.shape[1], da.dtype), act, alpha)
