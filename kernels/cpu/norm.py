"""LayerNorm and BatchNorm1d inside the dense layer.

A normalised layer is ``nn.Sequential(nn.Linear, norm, act)`` (then dropout
and the residual add, as in ``blocks``):

forward, after the GEMM ``y = x @ W``:
  pass A: ``y += b`` and, in the same pass, the statistics the norm needs
          (per column for batch norm in training, per row for layer norm),
          shifted by the first value of each column / row so that the
          one-pass variance does not cancel catastrophically;
  pass B: ``xhat = (y - mean) * rstd``, ``u = gamma xhat + beta``,
          ``f = act(u)``, dropout, residual -- one pass, keeping xhat, u and f.
backward:
  pass 1: ``du = da * mask * scale * f'(f, u)``, summing dgamma, dbeta (and
          per-row sums for layer norm);
  pass 2: ``dz`` through the normalisation, summing the Linear's db.
Batch norm in eval mode normalises with the running statistics and has no
batch coupling in backward.  Training batch norm updates the running mean
and the unbiased running variance with momentum 0.1, as PyTorch does.

Separate from the plain kernels so that plain models never compile it.
"""
import math

import numpy as np
from numba import njit

from . import activations as A
from ._jit import INLINE, JIT
from .blocks import _keep
from .mathfn import like

NO_NORM, LAYER, BATCH = 0, 1, 2
KINDS = {None: NO_NORM, "layer": LAYER, "batch": BATCH}
EPS = 1e-5
MOMENTUM = 0.1


@njit(**INLINE)
def _stats(y, b, mean, rstd, run_mean, run_var, kind, batch_stats, momentum, eps):
    """Pass A: y += b with the statistics of the normalisation."""
    B, n = y.shape
    if kind == LAYER:
        for i in range(B):
            k = y[i, 0] + b[0]
            s = 0.0
            s2 = 0.0
            for j in range(n):
                t = y[i, j] + b[j]
                y[i, j] = t
                d = t - k
                s += d
                s2 += d * d
            m = s / n
            var = max(s2 / n - m * m, 0.0)
            mean[i] = k + m
            rstd[i] = 1.0 / math.sqrt(var + eps)
    elif batch_stats:
        # Row 0 (with its bias) is the shift; mean/rstd hold the sums of the
        # shifted values and their squares until the end (no scratch array).
        for j in range(n):
            y[0, j] += b[j]
            mean[j] = 0.0
            rstd[j] = 0.0
        for i in range(1, B):
            for j in range(n):
                t = y[i, j] + b[j]
                y[i, j] = t
                d = np.float64(t) - np.float64(y[0, j])
                mean[j] += d
                rstd[j] += d * d
        for j in range(n):
            m = mean[j] / B
            var = max(rstd[j] / B - m * m, 0.0)
            mu = np.float64(y[0, j]) + m
            mean[j] = mu
            rstd[j] = 1.0 / math.sqrt(var + eps)
            run_mean[j] = (1.0 - momentum) * run_mean[j] + momentum * mu
            run_var[j] = (1.0 - momentum) * run_var[j] + momentum * (var * B / (B - 1))
    else:
        for i in range(B):
            for j in range(n):
                y[i, j] += b[j]
        for j in range(n):
            mean[j] = run_mean[j]
            rstd[j] = 1.0 / math.sqrt(run_var[j] + eps)


@njit(**INLINE)
def _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, per_row, alpha, f, drop, key,
               thresh, scale, residual):
    B, n = y.shape
    for i in range(B):
        for j in range(n):
            if per_row:
                m, r = mean[i], rstd[i]
            else:
                m, r = mean[j], rstd[j]
            t = y[i, j]
            xh = (t - like(t, m)) * like(t, r)
            xhat[i, j] = xh
            v = gamma[j] * xh + beta[j]
            u[i, j] = v
            v = f(v, alpha)
            fz[i, j] = v
            if drop:
                v = v * like(v, scale) if _keep(key, i * n + j, thresh) else like(v, 0.0)
            if residual:
                v = v + x[i, j]
            y[i, j] = v


@njit(**JIT)
def norm_forward_epilogue(y, b, x, xhat, u, fz, gamma, beta, mean, rstd, run_mean, run_var,
                          kind, batch_stats, act, alpha, drop, key, thresh, scale, residual):
    """Passes A and B over the GEMM output ``y`` (in place).

    ``mean``/``rstd`` (float64) receive the statistics used: length B for
    layer norm, n_out for batch norm.  ``batch_stats``: batch norm normalises
    with (and updates the running statistics from) this batch; False: with
    ``run_mean``/``run_var``.
    """
    _stats(y, b, mean, rstd, run_mean, run_var, kind, batch_stats, MOMENTUM, EPS)
    pr = kind == LAYER
    if act == A.IDENTITY:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.identity, drop, key,
                   thresh, scale, residual)
    elif act == A.RELU:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.relu, drop, key,
                   thresh, scale, residual)
    elif act == A.LEAKY_RELU:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.leaky_relu, drop,
                   key, thresh, scale, residual)
    elif act == A.ELU:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.elu, drop, key,
                   thresh, scale, residual)
    elif act == A.SIGMOID:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.sigmoid, drop, key,
                   thresh, scale, residual)
    elif act == A.TANH:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.tanh, drop, key,
                   thresh, scale, residual)
    elif act == A.SOFTPLUS:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.softplus, drop, key,
                   thresh, scale, residual)
    else:
        _norm_loop(y, x, xhat, u, fz, gamma, beta, mean, rstd, pr, alpha, A.gelu, drop, key,
                   thresh, scale, residual)


@njit(**INLINE)
def _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, per_row, alpha, df, drop, key,
             thresh, scale):
    B, n = da.shape
    for j in range(n):
        dgamma[j] = 0
        dbeta[j] = 0
    for i in range(B):
        s1 = 0.0
        s2 = 0.0
        for j in range(n):
            g = da[i, j]
            if drop:
                g = g * like(g, scale) if _keep(key, i * n + j, thresh) else like(g, 0.0)
            t = g * df(fz[i, j], u[i, j], alpha)
            dz[i, j] = t
            dgamma[j] += t * xhat[i, j]
            dbeta[j] += t
            if per_row:
                gx = t * gamma[j]
                s1 += gx
                s2 += gx * xhat[i, j]
        if per_row:
            r1[i] = s1
            r2[i] = s2


@njit(**JIT)
def norm_backward_epilogue(da, fz, u, xhat, gamma, rstd, dz, db, dgamma, dbeta, r1, r2, kind,
                           batch_stats, act, alpha, drop, key, thresh, scale):
    """Passes 1 and 2: ``dz = dL/d(x W + b)`` from ``da = dL/dy``, with db,
    dgamma, dbeta.  ``r1``, ``r2``: float64 scratch of length B (layer norm).
    ``dz`` may be ``da`` unless the block is residual."""
    pr = kind == LAYER
    if act == A.IDENTITY:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_identity,
                 drop, key, thresh, scale)
    elif act == A.RELU:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_relu,
                 drop, key, thresh, scale)
    elif act == A.LEAKY_RELU:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_leaky_relu,
                 drop, key, thresh, scale)
    elif act == A.ELU:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_elu,
                 drop, key, thresh, scale)
    elif act == A.SIGMOID:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_sigmoid,
                 drop, key, thresh, scale)
    elif act == A.TANH:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_tanh,
                 drop, key, thresh, scale)
    elif act == A.SOFTPLUS:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_softplus,
                 drop, key, thresh, scale)
    else:
        _du_loop(da, fz, u, xhat, gamma, dz, dgamma, dbeta, r1, r2, pr, alpha, A.d_gelu,
                 drop, key, thresh, scale)
    B, n = dz.shape
    for j in range(n):
        db[j] = 0
    for i in range(B):
        for j in range(n):
            t = dz[i, j]
            if pr:
                # rstd (dxhat - mean_j dxhat - xhat mean_j(dxhat xhat))
                v = rstd[i] * (gamma[j] * t - (r1[i] + xhat[i, j] * r2[i]) / n)
            elif batch_stats:
                # per column, with sum_i dxhat = gamma dbeta, sum_i dxhat xhat = gamma dgamma
                v = rstd[j] * gamma[j] * (t - (dbeta[j] + xhat[i, j] * dgamma[j]) / B)
            else:
                v = rstd[j] * gamma[j] * t
            w = like(t, v)
            dz[i, j] = w
            db[j] += w
