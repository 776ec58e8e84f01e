"""Losses: the mean loss and its gradient, in one pass over the predictions.

Each returns the loss as a float64 (accumulated in float64) and writes the
gradient of the mean loss into ``grad`` (which may alias the input).
"""
import numpy as np
from numba import njit

from . import mathfn
from ._jit import JIT

like = mathfn.like


@njit(**JIT)
def softmax_cross_entropy(logits, labels, grad):
    """Mean softmax cross-entropy over rows, integer ``labels``.

    Per row (in cache): max, then exp(l - max) into ``grad`` while summing,
    then the scale.  Stable for logits of any finite size: the largest
    shifted logit is 0, so the sum lies in [1, n_classes].
    """
    B, C = logits.shape
    inv_b = 1.0 / B
    total = 0.0
    for i in range(B):
        row, g = logits[i], grad[i]
        m = row[0]
        for j in range(1, C):
            m = max(m, row[j])
        # read the label's logit before the loop below overwrites it when
        # grad aliases logits
        x_lab = row[labels[i]]
        x_label = np.float64(x_lab)
        # The sum in float64: near-certain rows have s = 1 + tiny, and a
        # float32 sum would round the tiny part away (the loss, log s, then
        # off by ~6e-8 absolute: large against a loss of 1e-4).
        s = 0.0
        for j in range(C):
            e = mathfn.exp(row[j] - m)
            g[j] = e
            s += np.float64(e)
        total += np.log(s) - (x_label - np.float64(m))   # one scalar log per row
        scale = like(m, inv_b / s)
        for j in range(C):
            g[j] *= scale
        # The label's (p - 1) / B as -(s - e) / (s B) in float64: p - 1 in
        # the dtype cancels when p is near 1 (float32: 1e-3 relative error
        # for p = 0.99993).  e is recomputed exactly as the loop drew it.
        e_lab = np.float64(mathfn.exp(x_lab - m))
        g[labels[i]] = -((s - e_lab) / s) * inv_b
    return total / B


@njit(**JIT)
def mse(pred, target, grad):
    """Mean of (pred - target)^2 over all elements (torch.nn.MSELoss)."""
    pf, tf, gf = pred.reshape(pred.size), target.reshape(target.size), grad.reshape(grad.size)
    two_over_n = like(pf[0], 2.0 / pf.size)
    total = 0.0
    for i in range(pf.size):
        d = pf[i] - tf[i]
        total += np.float64(d) * np.float64(d)
        gf[i] = two_over_n * d
    return total / pf.size


@njit(**JIT)
def bce_with_logits(logits, target, grad):
    """Mean binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss).

    loss = max(x, 0) - x t + log1p(exp(-|x|)), grad = (sigmoid(x) - t) / n;
    both finite for any finite logit.
    """
    xf, tf, gf = logits.reshape(logits.size), target.reshape(target.size), grad.reshape(grad.size)
    zero, one = like(xf[0], 0.0), like(xf[0], 1.0)
    inv_n = like(xf[0], 1.0 / xf.size)
    total = 0.0
    for i in range(xf.size):
        x, t = xf[i], tf[i]
        e = mathfn.exp(-abs(x))                    # in (0, 1]
        total += np.float64((x if x > zero else zero) - x * t + mathfn.log1p(e))
        sig = one / (one + e) if x >= zero else e / (one + e)
        gf[i] = (sig - t) * inv_n
    return total / xf.size
