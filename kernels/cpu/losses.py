"""Losses: the mean loss and its gradient, in one pass over the predictions.

Each returns the loss as a float64 (accumulated in float64) and writes the
gradient of the mean loss into ``grad`` (which may alias the input).
"""
import numpy as np
from numba import njit

from . import mathfn
from ._jit import INLINE, INNER, JIT, JIT_ROWS
from .reduce import sq_diff_sum, sum64

like = mathfn.like
# A loop that sums in float64 as it goes stays scalar (LLVM may not reorder
# the additions), so each kernel below splits its work: the elementwise parts
# (exp, log1p, the gradient) run in loops of their own, which vectorise, and
# the float64 terms are added by a sum of its own that may reassociate
# (``reduce.sum64``, ``reduce.sq_diff_sum``: why they may reassociate is
# stated there; bench/RESULTS.md, "Losses at vector speed").
# Elements per chunk of the split loops: the chunk's scratch stays in L1.
# BCE allocates that scratch (two CHUNK-long arrays) per call of
# bce_with_logits or bce_units (once per share a team member claims): the one
# allocation of the fused step (tests/test_step.py checks the cross-entropy
# step allocates nothing).
CHUNK = 512


@njit(**INLINE)
def _max8(a, n):
    """The largest of ``a[:n]`` (n >= 1) over eight running maxima: one is a
    chain of dependent compares.  A maximum is exact, so the grouping does
    not change it; a NaN makes the caller's sum NaN whichever chain holds it."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = a[0]
    k = 0
    while k + 8 <= n:
        m0 = max(m0, a[k])
        m1 = max(m1, a[k + 1])
        m2 = max(m2, a[k + 2])
        m3 = max(m3, a[k + 3])
        m4 = max(m4, a[k + 4])
        m5 = max(m5, a[k + 5])
        m6 = max(m6, a[k + 6])
        m7 = max(m7, a[k + 7])
        k += 8
    while k < n:
        m0 = max(m0, a[k])
        k += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


# Each default loss is a sum of units' float64 sums, added in unit order:
# cross-entropy's units are runs of rows, MSE's and BCE's chunks of CHUNK
# elements.  The kernels below add them as they go; a thread team
# (kernels/cpu/pass_team.py) computes the units in shares, keeps each sum
# and adds them in the same order, so both give the same loss and gradient.


@njit(**INLINE)
def ce_unit_rows(classes):
    """Rows per cross-entropy unit: as many whole rows as fit in CHUNK
    logits (512 // classes), or one row of more than CHUNK."""
    return max(1, CHUNK // max(classes, 1))


@njit(**INNER)
def _ce_unit(logits, labels, grad, r0, r1):
    """Rows ``r0 .. r1 - 1`` of :func:`softmax_cross_entropy`: their
    gradient into ``grad``; returns the sum of their losses.

    Three passes over the rows' ``grad`` (in cache): per row the max m,
    and l - m into ``grad``; exp over the rows in one loop (a loop per row
    left every row a scalar remainder of up to 7 costly exps); per row the
    sum and the scale.  Stable for logits of any finite size: the largest
    shifted logit is 0, so the sum lies in [1, n_classes].
    """
    B, C = logits.shape
    inv_b = 1.0 / B
    shifted = 0.0        # sum of (x_label - m): the loss is sum(log s) minus it
    for i in range(r0, r1):
        row, g = logits[i], grad[i]
        m = _max8(row, C)
        # read before the loop below overwrites it when grad aliases logits
        shifted += np.float64(row[labels[i]]) - np.float64(m)
        for j in range(C):
            g[j] = row[j] - m
    block = grad.reshape(B * C)[r0 * C:r1 * C]
    for k in range(block.shape[0]):          # a view: a loop from 0 vectorises
        block[k] = mathfn.exp(block[k])
    logs = 0.0
    for i in range(r0, r1):
        g = grad[i]
        # The sum in float64: near-certain rows have s = 1 + tiny, and a
        # float32 sum would round the tiny part away (the loss, log s, then
        # off by ~6e-8 absolute: large against a loss of 1e-4).
        s = sum64(g)
        logs += np.log(s)                     # one scalar log per row
        y = labels[i]
        e_lab = np.float64(g[y])
        scale = like(g[0], inv_b / s)
        for j in range(C):
            g[j] *= scale
        # The label's (p - 1) / B as -(s - e) / (s B) in float64: p - 1 in
        # the dtype cancels when p is near 1 (float32: 1e-3 relative error
        # for p = 0.99993).
        g[y] = -((s - e_lab) / s) * inv_b
    return logs - shifted


@njit(**INLINE)
def ce_units(logits, labels, grad, sums, u0, u1, first):
    """Cross-entropy units ``u0 .. u1 - 1``: unit u's sum into
    ``sums[u - first]``, its rows' gradient into ``grad``."""
    B = logits.shape[0]
    rows = ce_unit_rows(logits.shape[1])
    for u in range(u0, u1):
        sums[u - first] = _ce_unit(logits, labels, grad, u * rows, min(B, (u + 1) * rows))


@njit(**JIT)
def softmax_cross_entropy(logits, labels, grad):
    """Mean softmax cross-entropy over rows, integer ``labels``
    (:func:`_ce_unit`, by units of :func:`ce_unit_rows` rows)."""
    B = logits.shape[0]
    rows = ce_unit_rows(logits.shape[1])
    total = 0.0
    for r0 in range(0, B, rows):
        total += _ce_unit(logits, labels, grad, r0, min(B, r0 + rows))
    return total / B


@njit(**INNER)
def _mse_unit(pf, tf, gf, lo, two_over_n):
    # In L1: the chunk's sum in vector lanes, then its gradient (gf may
    # alias pf), so that the inputs are read from memory once.
    p, t, g = pf[lo:lo + CHUNK], tf[lo:lo + CHUNK], gf[lo:lo + CHUNK]
    total = sq_diff_sum(p, t)
    for k in range(p.shape[0]):          # views: a loop from 0 vectorises
        g[k] = two_over_n * (p[k] - t[k])
    return total


@njit(**INLINE)
def mse_units(pred, target, grad, sums, u0, u1, first):
    """MSE chunks ``u0 .. u1 - 1``: chunk u's sum into ``sums[u - first]``."""
    pf, tf, gf = pred.reshape(pred.size), target.reshape(target.size), grad.reshape(grad.size)
    two_over_n = like(pf[0], 2.0 / pf.size)
    for u in range(u0, u1):
        sums[u - first] = _mse_unit(pf, tf, gf, u * CHUNK, two_over_n)


@njit(**JIT)
def mse(pred, target, grad):
    """Mean of (pred - target)^2 over all elements (torch.nn.MSELoss), by
    chunks of CHUNK elements."""
    pf, tf, gf = pred.reshape(pred.size), target.reshape(target.size), grad.reshape(grad.size)
    n = pf.size
    two_over_n = like(pf[0], 2.0 / n)
    total = 0.0
    for lo in range(0, n, CHUNK):
        total += _mse_unit(pf, tf, gf, lo, two_over_n)
    return total / n


@njit(**INNER)
def _bce_unit(xf, tf, gf, lo, inv_n, ebuf, terms):
    zero, one = like(xf[0], 0.0), like(xf[0], 1.0)
    m = min(CHUNK, xf.size - lo)
    x, t, g, e = xf[lo:lo + m], tf[lo:lo + m], gf[lo:lo + m], ebuf[:m]
    for k in range(m):
        e[k] = mathfn.exp(-abs(x[k]))                        # in (0, 1]
    for k in range(m):
        terms[k] = np.float64(max(x[k], zero) - x[k] * t[k] + mathfn.log1p(e[k]))
    for k in range(m):                  # g may alias x: x[k] is read first
        num = one if x[k] >= zero else e[k]
        g[k] = (num / (one + e[k]) - t[k]) * inv_n
    return sum64(terms[:m])


@njit(**INLINE)
def bce_units(logits, target, grad, sums, u0, u1, first):
    """BCE chunks ``u0 .. u1 - 1``: chunk u's sum into ``sums[u - first]``."""
    xf, tf, gf = logits.reshape(logits.size), target.reshape(target.size), grad.reshape(grad.size)
    inv_n = like(xf[0], 1.0 / xf.size)
    ebuf = np.empty(CHUNK, xf.dtype)
    terms = np.empty(CHUNK)
    for u in range(u0, u1):
        sums[u - first] = _bce_unit(xf, tf, gf, u * CHUNK, inv_n, ebuf, terms)


@njit(**JIT)
def bce_with_logits(logits, target, grad):
    """Mean binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss), by
    chunks of CHUNK elements.

    loss = max(x, 0) - x t + log1p(exp(-|x|)), grad = (sigmoid(x) - t) / n;
    both finite for any finite logit.
    """
    xf, tf, gf = logits.reshape(logits.size), target.reshape(target.size), grad.reshape(grad.size)
    n = xf.size
    inv_n = like(xf[0], 1.0 / n)
    ebuf = np.empty(CHUNK, xf.dtype)
    terms = np.empty(CHUNK)
    total = 0.0
    for lo in range(0, n, CHUNK):
        total += _bce_unit(xf, tf, gf, lo, inv_n, ebuf, terms)
    return total / n


@njit(**INLINE)
def ce_count(logits):
    """(units, the divisor of their sum) of a cross-entropy over ``logits``."""
    B = logits.shape[0]
    rows = ce_unit_rows(logits.shape[1])
    return (B + rows - 1) // rows, B


@njit(**INLINE)
def chunk_count(out):
    """(units, the divisor of their sum) of MSE or BCE over ``out``."""
    return (out.size + CHUNK - 1) // CHUNK, out.size


# --- losses with PyTorch's options --------------------------------------------
# The kernels above are the default losses (mean, no options) that the
# training steps fuse; the ones below add torch's options and are used when
# an option is set.  ``reduction``: NONE, MEAN or SUM.  Each writes the
# per-row (cross-entropy) or per-element loss into a float64 ``terms`` array,
# the gradient of the reduced loss into ``grad`` (for NONE: of the sum of the
# terms, i.e. each term's own gradient) and returns the reduced loss (NONE:
# the sum).

NONE, MEAN, SUM = range(3)
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}


@njit(**JIT)
def cross_entropy_weight_sum(labels, weight, ignore_index):
    """Sum of ``weight[label]`` over the rows not ignored: the divisor of
    torch's weighted mean (the number of such rows for unit weights)."""
    d = 0.0
    for i in range(labels.shape[0]):
        if labels[i] != ignore_index:
            d += weight[labels[i]]
    return d


@njit(**JIT_ROWS)
def softmax_cross_entropy_ex(logits, labels, weight, ignore_index, smoothing, reduction,
                             grad, terms):
    """Softmax cross-entropy with class ``weight``, ``ignore_index`` and
    ``label_smoothing`` (torch.nn.functional.cross_entropy).

    With ``e = smoothing / C`` and ``-log p_c = log s - (x_c - max)``, a row
    of label y costs ``(1 - smoothing) w_y (-log p_y) + e sum_c w_c (-log p_c)``;
    its gradient is ``A p_c - a_c`` with ``a_c`` the coefficient of
    ``-log p_c`` and ``A = sum_c a_c``.  Rows whose label is ``ignore_index``
    cost 0 and get a zero gradient.  MEAN divides by the sum of ``w_y`` over
    the rows kept (torch's weighted mean, NaN when every row is ignored).
    ``weight`` is float64 (C,): ones for no weights.  ``grad`` may alias
    ``logits``.
    """
    B, C = logits.shape
    w_all = 0.0
    for c in range(C):
        w_all += weight[c]
    gscale = 1.0
    denom = 1.0
    if reduction == MEAN:
        denom = cross_entropy_weight_sum(labels, weight, ignore_index)
        gscale = 1.0 / denom
    eps_c = smoothing / C
    total = 0.0
    for i in range(B):
        row, g = logits[i], grad[i]
        y = labels[i]
        if y == ignore_index:
            for j in range(C):
                g[j] = 0
            terms[i] = 0.0
            continue
        m = row[0]
        for j in range(1, C):
            m = max(m, row[j])
        x_lab = row[y]                          # read before grad (maybe logits) is written
        wz = 0.0                                # sum_c w_c (x_c - max), for the smoothing
        if smoothing != 0.0:                    # (a -inf logit: -inf, and 0 * -inf is NaN)
            for j in range(C):
                wz += weight[j] * np.float64(row[j] - m)
        for j in range(C):
            g[j] = mathfn.exp(row[j] - m)
        s = 0.0
        for j in range(C):
            s += np.float64(g[j])
        log_s = np.log(s)
        w_y = weight[y]
        nll = log_s - (np.float64(x_lab) - np.float64(m))
        li = (1.0 - smoothing) * w_y * nll
        if smoothing != 0.0:
            li += eps_c * (w_all * log_s - wz)
        terms[i] = li
        total += li
        a_y = (1.0 - smoothing) * w_y + eps_c * w_y
        A = (1.0 - smoothing) * w_y + eps_c * w_all
        for j in range(C):
            g[j] = (A * (np.float64(g[j]) / s) - eps_c * weight[j]) * gscale
        # The label's term as -a_y (1 - p_y) + (A - a_y) p_y with 1 - p_y =
        # (s - e_y) / s in float64: A p_y - a_y cancels when p_y is near 1.
        e_lab = np.float64(mathfn.exp(x_lab - m))
        g[y] = (-a_y * ((s - e_lab) / s) + (A - a_y) * (e_lab / s)) * gscale
    if reduction == MEAN:
        return total / denom
    return total


@njit(**JIT)
def bce_with_logits_ex(logits, target, pos_weight, reduction, grad, terms):
    """Binary cross-entropy on logits with ``pos_weight`` (float64, one per
    column, ones for none; torch.nn.functional.binary_cross_entropy_with_logits).

    ``l = (1 - t) x + (1 + (pw - 1) t) softplus(-x)``,
    ``dl/dx = (1 + (pw - 1) t) sigmoid(x) - pw t`` (torch's form: exact
    where ``t = 0``); 2-D ``(rows, cols)`` inputs, ``terms`` of the same
    shape.
    """
    R, C = logits.shape
    zero, one = like(logits[0, 0], 0.0), like(logits[0, 0], 1.0)
    n = R * C
    gscale = like(logits[0, 0], 1.0 / n if reduction == MEAN else 1.0)
    ebuf = np.empty(C, logits.dtype)
    total = 0.0
    for i in range(R):
        x, t, g, li = logits[i], target[i], grad[i], terms[i]
        for j in range(C):
            ebuf[j] = mathfn.exp(-abs(x[j]))                           # in (0, 1]
        for j in range(C):
            lw = one + (like(x[j], pos_weight[j]) - one) * t[j]
            sp_neg = mathfn.log1p(ebuf[j]) + max(-x[j], zero)         # softplus(-x)
            li[j] = np.float64((one - t[j]) * x[j]) + np.float64(lw) * np.float64(sp_neg)
        for j in range(C):                  # g may alias x: x[j] is read first
            pw = like(x[j], pos_weight[j])
            lw = one + (pw - one) * t[j]
            num = one if x[j] >= zero else ebuf[j]
            g[j] = (lw * (num / (one + ebuf[j])) - pw * t[j]) * gscale
        for j in range(C):
            total += li[j]
    if reduction == MEAN:
        return total / n
    return total


@njit(**JIT)
def mse_ex(pred, target, reduction, grad, terms):
    """Squared error with a reduction (torch.nn.functional.mse_loss)."""
    pf, tf, gf = pred.reshape(pred.size), target.reshape(target.size), grad.reshape(grad.size)
    tt = terms.reshape(terms.size)
    n = pf.size
    two = like(pf[0], 2.0 / n if reduction == MEAN else 2.0)
    total = 0.0
    for i in range(n):
        d = pf[i] - tf[i]
        sq = np.float64(d) * np.float64(d)
        tt[i] = sq
        total += sq
        gf[i] = two * d
    if reduction == MEAN:
        return total / n
    return total
