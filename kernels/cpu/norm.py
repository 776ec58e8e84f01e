"""LayerNorm and BatchNorm1d inside the dense layer.

A normalised layer is ``nn.Sequential(nn.Linear, norm, act)`` (then dropout
and the residual add, as in ``blocks``):

forward, after the GEMM ``y = x @ W``:
  pass A: the statistics of ``t = y + b`` the norm needs (per column for
          batch norm in training, per row for layer norm; none in eval),
          reading y only, in float64, shifted by the first value of each
          column / row so that the one-pass variance does not cancel;
  pass B: row by row, ``xhat = (y + b - mean) * rstd`` (kept), then
          ``u = gamma xhat + beta``, ``f = act(u)``, then dropout and the
          residual add, over the same row while it is in L1 -- one pass
          over memory (the split keeps the compiled code small: blocks).
backward:
  pass 1: ``du = da * mask * scale * f'(f, u)``, summing dgamma, dbeta and
          the per-row sums layer norm needs;
  pass 2: ``dz`` through the normalisation, summing the Linear's db.
Only ``xhat`` is kept beside the output: ``u`` is recomputed from it where
needed (the derivatives that read z), and ``f`` is read from the output as in
``blocks`` (kept separately for a residual block only).  Each extra kept
array is a cold buffer written per layer, which dominated the layer's cost.

The statistics used (``mean``, ``rstd``) are stored in the model's dtype:
the elementwise passes then run at the dtype's full SIMD width.  Batch norm
in eval mode normalises with the running statistics and has no batch
coupling in backward.  Training batch norm updates the running mean and the
unbiased running variance with momentum 0.1, as PyTorch does.

Separate from the plain kernels so that plain models never compile it.
"""
import math

import numpy as np
from numba import njit

from . import activations as A
from ._jit import INLINE, JIT_ROWS
from .blocks import _drop_add_row, _grad_rows_in
from .mathfn import like

from ..spec import BATCH, LAYER, NO_NORM  # noqa: E402  (shared with the CUDA twin)
from ..spec import NORM_EPS as EPS, NORM_KINDS as KINDS, NORM_MOMENTUM as MOMENTUM  # noqa: E402
_ROWS = 16          # rows summed in the dtype before the float64 batch sums


@njit(**INLINE)
def _stats(y, b, xhat, mean, rstd, acc, run_mean, run_var, kind, batch_stats, momentum, eps):
    """Pass A: the statistics of ``t = y + b`` (read only: pass B adds b
    again, the same rounding).  ``acc``: float64 scratch for batch norm's
    column sums; row 0 of ``xhat`` holds batch norm's shift until pass B."""
    B, n = y.shape
    if kind == LAYER:
        for i in range(B):
            k = y[i, 0] + b[0]
            s = 0.0
            s2 = 0.0
            for j in range(n):
                d = (y[i, j] + b[j]) - k
                s += d
                s2 += d * d
            m = s / n
            var = max(s2 / n - m * m, 0.0)
            mean[i] = k + m
            rstd[i] = 1.0 / math.sqrt(var + eps)
    elif batch_stats:
        # Row 0 (with its bias) is the shift; acc holds the float64 sums of
        # the shifted values and of their squares.  Blocks of _ROWS rows are
        # summed first in the dtype, in mean/rstd (free until the end): the
        # inner loop then runs at the dtype's SIMD width without conversions.
        k = xhat[0]
        s1, s2 = acc[:n], acc[n:2 * n]
        for j in range(n):
            k[j] = y[0, j] + b[j]
            s1[j] = 0.0
            s2[j] = 0.0
        for i0 in range(1, B, _ROWS):
            for j in range(n):
                mean[j] = 0
                rstd[j] = 0
            for i in range(i0, min(i0 + _ROWS, B)):
                for j in range(n):
                    d = (y[i, j] + b[j]) - k[j]
                    mean[j] += d
                    rstd[j] += d * d
            for j in range(n):
                s1[j] += mean[j]
                s2[j] += rstd[j]
        for j in range(n):
            m = s1[j] / B
            var = max(s2[j] / B - m * m, 0.0)
            mu = np.float64(k[j]) + m
            mean[j] = mu
            rstd[j] = 1.0 / math.sqrt(var + eps)
            run_mean[j] = (1.0 - momentum) * run_mean[j] + momentum * mu
            run_var[j] = (1.0 - momentum) * run_var[j] + momentum * (var * B / (B - 1))
    else:
        for j in range(n):
            mean[j] = run_mean[j]
            rstd[j] = 1.0 / math.sqrt(run_var[j] + eps)


@njit(**INLINE)
def _normalise_row(y, b, xhat, mean, rstd, i, per_row):
    # The per-row / per-column choice is made per row, outside the loops.
    n = y.shape[1]
    if per_row:
        m, r = mean[i], rstd[i]
        for j in range(n):
            xhat[i, j] = ((y[i, j] + b[j]) - m) * r
    else:
        for j in range(n):
            xhat[i, j] = ((y[i, j] + b[j]) - mean[j]) * rstd[j]


@njit(**INLINE)
def _affine_act_row(y, xhat, gamma, beta, i, alpha, f):
    for j in range(y.shape[1]):
        y[i, j] = f(gamma[j] * xhat[i, j] + beta[j], alpha)


_affine_act_ladder = A.ladder(_affine_act_row, "y, xhat, gamma, beta, i, act, alpha",
                              "y, xhat, gamma, beta, i, alpha, {f}")


@njit(**JIT_ROWS)
def norm_forward_epilogue(y, b, x, xhat, fz, gamma, beta, mean, rstd, acc, run_mean, run_var,
                          kind, batch_stats, act, alpha, drop, key, thresh, scale, residual):
    """Passes A and B over the GEMM output ``y`` (in place).

    ``mean``/``rstd`` (the dtype of ``y``) receive the statistics used:
    length B for layer norm, n_out for batch norm.  ``acc``: float64 scratch
    of length >= 2 n_out (batch norm in training).  ``batch_stats``: batch
    norm normalises with (and updates the float64 running statistics from)
    this batch; False: with ``run_mean``/``run_var``.  ``fz`` receives
    ``f(u)`` for a residual block only.
    """
    _stats(y, b, xhat, mean, rstd, acc, run_mean, run_var, kind, batch_stats, MOMENTUM, EPS)
    pr = kind == LAYER
    # Pass B row by row: normalise, affine + activation, then dropout and
    # the skip (blocks._drop_add_row, residual a constant there).
    for i in range(y.shape[0]):
        _normalise_row(y, b, xhat, mean, rstd, i, pr)
        _affine_act_ladder(y, xhat, gamma, beta, i, act, alpha)
        if residual:
            _drop_add_row(y, x, fz, i, drop, key, thresh, scale, True)
        elif drop:
            _drop_add_row(y, x, fz, i, True, key, thresh, scale, False)


@njit(**INLINE)
def _du_row(dz, fz, xhat, gamma, beta, dgamma, dbeta, i, alpha, df, unscale):
    for j in range(dz.shape[1]):
        g = dz[i, j]
        xh = xhat[i, j]
        # u is only read by the derivatives that need z (dead code for the others)
        u = gamma[j] * xh + beta[j]
        t = g * df(fz[i, j] * like(g, unscale), u, alpha)
        dz[i, j] = t
        dgamma[j] += t * xh
        dbeta[j] += t


_du_row_ladder = A.ladder(_du_row, "dz, fz, xhat, gamma, beta, dgamma, dbeta, i, act, alpha, us",
                          "dz, fz, xhat, gamma, beta, dgamma, dbeta, i, alpha, {df}, us")


@njit(**JIT_ROWS)
def norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta, r1, r2, kind,
                           batch_stats, act, alpha, drop, key, thresh, scale, residual):
    """Passes 1 and 2: ``dz = dL/d(x W + b)`` from ``da = dL/dy``, with db,
    dgamma, dbeta.  ``fz``: as in ``blocks.block_backward_epilogue`` (the
    forward's output ``y`` unless residual).  ``r1``, ``r2``: float64
    scratch of length B.  ``dz`` may be ``da`` unless the block is residual."""
    us = 1.0 / scale if drop and not residual else 1.0
    for j in range(dz.shape[1]):
        dgamma[j] = 0
        dbeta[j] = 0
    for i in range(dz.shape[0]):
        _grad_rows_in(da, dz, i, drop, key, thresh, scale)
        _du_row_ladder(dz, fz, xhat, gamma, beta, dgamma, dbeta, i, act, alpha, us)
    _dnorm(dz, xhat, gamma, rstd, db, dgamma, dbeta, r1, r2, kind, batch_stats)


@njit(**INLINE)
def _dnorm(dz, xhat, gamma, rstd, db, dgamma, dbeta, r1, r2, kind, batch_stats):
    # Pass 2, in place on dz.  The kind is chosen per row, outside the
    # vectorised loops; the per-row / per-column factors are computed once.
    B, n = dz.shape
    for j in range(n):
        db[j] = 0
    inv_b = 1.0 / B
    for i in range(B):
        if kind == LAYER:
            # rstd (dxhat - mean_j dxhat - xhat mean_j(dxhat xhat)), the row
            # sums in float64 over the row while it is in L1
            s1 = 0.0
            s2 = 0.0
            for j in range(n):
                gx = dz[i, j] * gamma[j]
                s1 += gx
                s2 += gx * xhat[i, j]
            r1[i] = s1
            r2[i] = s2
            t0 = dz[i, 0]
            r = like(t0, rstd[i])
            c1, c2 = like(t0, s1 / n), like(t0, s2 / n)
            for j in range(n):
                v = r * (gamma[j] * dz[i, j] - (c1 + xhat[i, j] * c2))
                dz[i, j] = v
                db[j] += v
        elif batch_stats:
            # per column, with sum_i dxhat = gamma dbeta, sum_i dxhat xhat = gamma dgamma
            ib = like(dz[i, 0], inv_b)
            for j in range(n):
                v = rstd[j] * gamma[j] * (dz[i, j] - (dbeta[j] + xhat[i, j] * dgamma[j]) * ib)
                dz[i, j] = v
                db[j] += v
        else:
            for j in range(n):
                v = rstd[j] * gamma[j] * dz[i, j]
                dz[i, j] = v
                db[j] += v
