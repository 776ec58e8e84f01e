"""Residual blocks and inverted dropout: the extended dense layer.

forward:  y = x @ W (BLAS), then ONE pass:
          z = y + b, f = act(z), keep f (and z for gelu),
          y = f * mask / (1 - p)   (dropout, training only)
          y += x                   (residual)
backward: ONE pass dz = da * mask / (1 - p) * f'(f, z) summing db (the
          mask is regenerated, never stored), GEMMs dW = x^T dz and
          dx = dz W^T, then dx += da for a residual block (the skip path).

The dropout mask is counter-based: element ``e`` of layer ``l`` at dropout
step ``c`` of a model seeded ``s`` draws the splitmix64 stream seeded with
``key(s, l, c)`` at position ``e``; it keeps the unit iff the top 53 bits,
read as ``u = bits / 2**53``, satisfy ``u >= p``.  The comparison runs on
integers (``bits >= ceil(p * 2**53)``, exact since ``p * 2**53`` is exact in
float64), so the loop needs no int-to-float conversion.

These kernels are separate from ``activations``/``dense``/``step`` on
purpose: plain models never compile them, so the plain step's cold compile
time does not grow.  Every function keeps the twin-friendly style of the
other kernels (arrays and scalars only, outputs passed in).
"""
import math

import numpy as np
from numba import njit

from . import activations as A
from ._jit import INLINE, JIT
from .mathfn import like

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_MASK64 = (1 << 64) - 1


@njit(**INLINE)
def _fin(z):
    # splitmix64's finalizer: a bijection of uint64 with full avalanche
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@njit(**INLINE)
def _keep(key, e, thresh):
    # bits of element e of the stream seeded ``key``: fin(key + (e + 1) * golden)
    # np.uint64 casts throughout: in Numba int64 + uint64 is a float64.
    k = np.uint64(key) + (np.uint64(e) + np.uint64(1)) * _GOLDEN
    return (_fin(k) >> _S11) >= np.uint64(thresh)


@njit(**JIT)
def dropout_key(seed, layer, counter):
    """The key of the mask of ``layer`` at dropout step ``counter`` (returned
    to Python as an int; pass it on as ``np.uint64``)."""
    k = _fin(np.uint64(seed) + _GOLDEN)
    k = _fin((k ^ np.uint64(layer)) + _GOLDEN)
    return _fin((k ^ np.uint64(counter)) + _GOLDEN)


def dropout_threshold(p):
    """uint64 threshold on the 53 drawn bits: keep iff bits >= it (0: keep all)."""
    return np.uint64(math.ceil(float(p) * 2.0 ** 53))


@njit(**JIT)
def dropout_mask(key, thresh, out):
    """out[i, j] = 1 where the unit is kept, else 0 (a test and debugging aid)."""
    n = out.shape[1]
    for i in range(out.shape[0]):
        for j in range(n):
            out[i, j] = 1.0 if _keep(key, i * n + j, thresh) else 0.0


# --- the fused passes -------------------------------------------------------------

@njit(**INLINE)
def _fwd_loop(y, b, x, z, fz, alpha, f, drop, key, thresh, scale, residual, keep_z):
    # keep_z is a constant at every call site (only gelu's derivative reads
    # z), so the store folds away for the other activations.
    n = y.shape[1]
    for i in range(y.shape[0]):
        for j in range(n):
            t = y[i, j] + b[j]
            if keep_z:
                z[i, j] = t
            v = f(t, alpha)
            fz[i, j] = v
            if drop:
                v = v * like(v, scale) if _keep(key, i * n + j, thresh) else like(v, 0.0)
            if residual:
                v = v + x[i, j]
            y[i, j] = v


@njit(**INLINE)
def _bwd_loop(da, fz, z, dz, db, alpha, df, drop, key, thresh, scale):
    n = da.shape[1]
    for j in range(n):
        db[j] = 0
    for i in range(da.shape[0]):
        for j in range(n):
            g = da[i, j]
            if drop:
                g = g * like(g, scale) if _keep(key, i * n + j, thresh) else like(g, 0.0)
            t = g * df(fz[i, j], z[i, j], alpha)
            dz[i, j] = t
            db[j] += t


@njit(**JIT)
def block_forward_epilogue(y, b, x, z, fz, act, alpha, drop, key, thresh, scale, residual):
    """One pass over the GEMM output ``y`` (in place): ``z = y + b`` (kept
    for gelu only, whose derivative reads it), ``fz = f(z)``, ``y = fz * mask * scale`` when ``drop``, ``y += x`` when
    ``residual``.  ``z`` and ``fz`` are separate arrays (kept for backward);
    ``x`` is read only for a residual block."""
    s = scale
    if act == A.IDENTITY:
        _fwd_loop(y, b, x, z, fz, alpha, A.identity, drop, key, thresh, s, residual, False)
    elif act == A.RELU:
        _fwd_loop(y, b, x, z, fz, alpha, A.relu, drop, key, thresh, s, residual, False)
    elif act == A.LEAKY_RELU:
        _fwd_loop(y, b, x, z, fz, alpha, A.leaky_relu, drop, key, thresh, s, residual, False)
    elif act == A.ELU:
        _fwd_loop(y, b, x, z, fz, alpha, A.elu, drop, key, thresh, s, residual, False)
    elif act == A.SIGMOID:
        _fwd_loop(y, b, x, z, fz, alpha, A.sigmoid, drop, key, thresh, s, residual, False)
    elif act == A.TANH:
        _fwd_loop(y, b, x, z, fz, alpha, A.tanh, drop, key, thresh, s, residual, False)
    elif act == A.SOFTPLUS:
        _fwd_loop(y, b, x, z, fz, alpha, A.softplus, drop, key, thresh, s, residual, False)
    else:
        _fwd_loop(y, b, x, z, fz, alpha, A.gelu, drop, key, thresh, s, residual, True)


@njit(**JIT)
def block_backward_epilogue(da, fz, z, dz, db, act, alpha, drop, key, thresh, scale):
    """One pass: ``dz = da * mask * scale * f'(fz, z)`` (the mask regenerated
    from ``key``) and ``db = dz.sum(axis=0)``.  ``dz`` must not be ``da``
    when the block is residual: the skip gradient still needs ``da``."""
    s = scale
    if act == A.IDENTITY:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_identity, drop, key, thresh, s)
    elif act == A.RELU:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_relu, drop, key, thresh, s)
    elif act == A.LEAKY_RELU:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_leaky_relu, drop, key, thresh, s)
    elif act == A.ELU:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_elu, drop, key, thresh, s)
    elif act == A.SIGMOID:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_sigmoid, drop, key, thresh, s)
    elif act == A.TANH:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_tanh, drop, key, thresh, s)
    elif act == A.SOFTPLUS:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_softplus, drop, key, thresh, s)
    else:
        _bwd_loop(da, fz, z, dz, db, alpha, A.d_gelu, drop, key, thresh, s)


@njit(**INLINE)
def _add_into(dst, src):
    # dst += src over 2-D arrays of the same shape (the residual skip gradient)
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] += src[i, j]


@njit(**JIT)
def block_forward(x, W, b, z, fz, y, act, alpha, drop, key, thresh, scale, residual):
    """y = dropout(f(x @ W + b)) (+ x for a residual block); keeps z and fz."""
    np.dot(x, W, y)
    block_forward_epilogue(y, b, x, z, fz, act, alpha, drop, key, thresh, scale, residual)


@njit(**JIT)
def block_backward(x, W, fz, z, da, dz, dW, db, dx, act, alpha, drop, key, thresh, scale,
                   residual, need_dx):
    """Gradients of :func:`block_forward` given ``da = dL/dy``.

    Writes ``dz`` (a separate array from ``da``), ``dW``, ``db`` and, when
    ``need_dx``, ``dx = dz W^T (+ da for a residual block)``.
    """
    block_backward_epilogue(da, fz, z, dz, db, act, alpha, drop, key, thresh, scale)
    np.dot(x.T, dz, dW)
    if need_dx:
        np.dot(dz, W.T, dx)
        if residual:
            _add_into(dx, da)
