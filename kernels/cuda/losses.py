"""Losses on the GPU: twins of ``fastgrad.kernels.cpu.losses``.

Each writes the gradient of the mean loss into ``grad`` (which may alias the
input) and returns the mean loss as a 0-d float64 ``cupy.ndarray`` -- not a
host float, so nothing waits for the device; ``float(loss)`` (as
``fastgrad.ops`` does, outside a step) is the one sync.  The loss is
accumulated in float64 and reduced in a fixed order (per-row or per-block
terms into a float64 buffer, then one block sums them): two runs give the
same bits.  ``out`` and ``work`` (optional) are preallocated float64
buffers for the result (shape ``()`` or ``(1,)``) and the terms
(``work_size``); ``fastgrad.kernels.cuda.step`` passes them so that a
captured graph owns every buffer it touches.
"""
import cupy
import numpy as np

from . import _module as _m

__all__ = ["softmax_cross_entropy", "mse", "bce_with_logits", "work_size",
           "NONE", "MEAN", "SUM", "REDUCTIONS", "cross_entropy_weight_sum",
           "softmax_cross_entropy_ex", "bce_with_logits_ex", "mse_ex"]

_FILE = "losses.cu"
_ROWS_PER_BLOCK = 4        # warps (rows) per block of the softmax kernel


def work_size(kind, shape):
    """float64 scratch elements a loss over predictions of ``shape`` needs."""
    if kind == "softmax_cross_entropy":
        return int(shape[0])
    return _m.blocks(int(np.prod(shape)), _m.LOSS_MAX_BLOCKS)


def _out(out):
    return cupy.empty((), np.float64) if out is None else out


def _mean(terms, n_terms, out, div):
    k = _m.kernel(_FILE, "fg_mean<double>")
    k((1,), (_m.RED_THREADS,), (terms, _m.i64(n_terms), out, _m.f64(div)))
    return out


def softmax_cross_entropy(logits, labels, grad, out=None, work=None, status=None):
    """Mean softmax cross-entropy over rows, int64 ``labels``.

    One warp per row: max, exp(l - max) into ``grad`` while summing (warp
    butterflies, fixed order), log(s) per row in float64, then the scale.
    A label outside ``[0, cols)`` is not read through: its row's loss and
    gradient become NaN and ``status`` (a float64 device array of one
    element, optional) is set to 1.0 -- how a training step that does not
    read labels back learns of them (``fastgrad.ops`` checks on the host
    first).
    """
    rows, cols = logits.shape
    out = _out(out)
    row_loss = cupy.empty(rows, np.float64) if work is None else work
    k = _m.kernel(_FILE, f"fg_softmax_xent<{_m.ctype(logits.dtype)}>")
    k((-(-rows // _ROWS_PER_BLOCK),), (32 * _ROWS_PER_BLOCK,),
      (logits, labels, grad, row_loss, _m.i64(rows), _m.i64(cols),
       _m.scratch("status") if status is None else status))
    return _mean(row_loss, rows, out, rows)


def _elementwise(name, pred, target, grad, out, work):
    n = pred.size
    out = _out(out)
    nblk = _m.blocks(n, _m.LOSS_MAX_BLOCKS)
    partial = cupy.empty(nblk, np.float64) if work is None else work
    k = _m.kernel(_FILE, f"{name}<{_m.ctype(pred.dtype)}>")
    k((nblk,), (_m.RED_THREADS,), (pred, target, grad, partial, _m.i64(n)))
    return _mean(partial, nblk, out, n)


def mse(pred, target, grad, out=None, work=None):
    """Mean of (pred - target)^2 over all elements (torch.nn.MSELoss)."""
    return _elementwise("fg_mse", pred, target, grad, out, work)


def bce_with_logits(logits, target, grad, out=None, work=None):
    """Mean binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss)."""
    return _elementwise("fg_bce_with_logits", logits, target, grad, out, work)


# --- losses with PyTorch's options --------------------------------------------
# Twins of the *_ex kernels of kernels/cpu/losses.py (same names, arguments
# and codes).  Each writes float64 ``terms`` and the gradient of the reduced
# loss, and returns the reduced loss (NONE: the sum) as a 0-d float64 array.

NONE, MEAN, SUM = range(3)          # losses.cu RED_NONE, RED_MEAN, RED_SUM
REDUCTIONS = {"none": NONE, "mean": MEAN, "sum": SUM}


def cross_entropy_weight_sum(labels, weight, ignore_index, out=None):
    """Sum of ``weight[label]`` over the rows not ignored (0-d float64)."""
    out = _out(out)
    k = _m.kernel(_FILE, "fg_xent_weight_sum<double>")
    k((1,), (_m.RED_THREADS,), (labels, weight, _m.i64(labels.shape[0]), _m.i64(weight.shape[0]),
                                _m.i64(ignore_index), out))
    return out


def softmax_cross_entropy_ex(logits, labels, weight, ignore_index, smoothing, reduction, grad,
                             terms, out=None, status=None):
    """Cross-entropy with class ``weight`` (float64), ``ignore_index`` and
    label ``smoothing``; one warp per row.  The mean's divisor (summed
    weights of the kept rows) is computed and read on the device.  A label
    neither in range nor ignored gives its row NaN and raises ``status`` as
    :func:`softmax_cross_entropy` does."""
    rows, cols = logits.shape
    out = _out(out)
    denom = cross_entropy_weight_sum(labels, weight, ignore_index)
    k = _m.kernel(_FILE, f"fg_softmax_xent_ex<{_m.ctype(logits.dtype)}>")
    k((-(-rows // _ROWS_PER_BLOCK),), (32 * _ROWS_PER_BLOCK,),
      (logits, labels, weight, _m.i64(ignore_index), _m.f64(smoothing), np.int32(reduction),
       denom, grad, terms, _m.i64(rows), _m.i64(cols),
       _m.scratch("status") if status is None else status))
    if reduction == MEAN:
        _m.kernel(_FILE, "fg_sum_over<double>")((1,), (_m.RED_THREADS,),
                                                 (terms, _m.i64(rows), denom, out))
        return out
    return _mean(terms, rows, out, 1.0)


def bce_with_logits_ex(logits, target, pos_weight, reduction, grad, terms, out=None):
    """Binary cross-entropy on logits with ``pos_weight`` (float64, one per
    column) and a reduction."""
    n = logits.size
    out = _out(out)
    k = _m.kernel(_FILE, f"fg_bce_with_logits_ex<{_m.ctype(logits.dtype)}>")
    k((_m.blocks(n),), (_m.THREADS,),
      (logits, target, pos_weight, grad, terms, _m.i64(n), _m.i64(logits.shape[-1]),
       _m.f64(1.0 / n if reduction == MEAN else 1.0)))
    return _mean(terms, n, out, n if reduction == MEAN else 1.0)


def mse_ex(pred, target, reduction, grad, terms, out=None):
    """Squared error with a reduction."""
    n = pred.size
    out = _out(out)
    k = _m.kernel(_FILE, f"fg_mse_ex<{_m.ctype(pred.dtype)}>")
    k((_m.blocks(n),), (_m.THREADS,),
      (pred, target, grad, terms, _m.i64(n), _m.f64(2.0 / n if reduction == MEAN else 2.0)))
    return _mean(terms, n, out, n if reduction == MEAN else 1.0)
