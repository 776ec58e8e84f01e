"""Weight normalisation (Salimans & Kingma 2016): ``W = g v / ||v||`` per
output unit, i.e. per column of the ``(n_in, n_out)`` weight.

The parameters are ``v`` (where a plain layer keeps ``W``) and ``g`` (the
last ``n_out`` entries of the layer); the effective ``W`` is recomputed
into a scratch buffer before each forward.  Backward turns ``dW`` (the
GEMM's gradient of the effective weight) into

    dg_j = sum_i dW_ij v_ij / ||v_j||
    dv   = (g_j / ||v_j||) dW - (g_j dg_j / ||v_j||^2) v

in two passes.  Separate from the plain kernels so plain models never
compile it.
"""
import math

from numba import njit

from ._jit import INLINE, JIT_ROWS


@njit(**dict(JIT_ROWS, **INLINE))
def _column_dots(x, y, out):
    # out[j] = sum_i x[i, j] y[i, j], added row by row (vectorises across
    # columns)
    n_in, n_out = x.shape
    for j in range(n_out):
        out[j] = 0.0
    for i in range(n_in):
        for j in range(n_out):
            out[j] += x[i, j] * y[i, j]


@njit(**JIT_ROWS)
def weight_norm_forward(v, g, W, inv_norm):
    """``W = v * g / ||v||`` column-wise; ``inv_norm`` (float64, n_out)
    receives ``1 / ||v_j||`` for backward.  Row-major loops: the column
    sums accumulate along rows, which vectorises across columns."""
    n_in, n_out = v.shape
    _column_dots(v, v, inv_norm)
    for j in range(n_out):
        inv_norm[j] = 1.0 / math.sqrt(inv_norm[j])
    for i in range(n_in):
        for j in range(n_out):
            W[i, j] = v[i, j] * (g[j] * inv_norm[j])


@njit(**JIT_ROWS)
def weight_norm_backward(v, g, inv_norm, dW, dv, dg):
    """``dv`` and ``dg`` from ``dW`` = dL/dW of the effective weight."""
    n_in, n_out = v.shape
    _column_dots(dW, v, dg)
    for j in range(n_out):
        dg[j] = dg[j] * inv_norm[j]
    for i in range(n_in):
        for j in range(n_out):
            a = g[j] * inv_norm[j]
            dv[i, j] = a * dW[i, j] - (a * dg[j] * inv_norm[j]) * v[i, j]
