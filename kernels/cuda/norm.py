"""LayerNorm and BatchNorm1d inside the dense layer on the GPU: twins of
``fastgrad.kernels.cpu.norm`` (same names, constants, argument order and
in-place rules).

forward, after the GEMM ``y = x @ W`` (cuBLAS), in place on ``y``:
  pass A  the statistics of ``t = y + b`` (float64, shifted by the first
          value of each row / column), read-only on ``y``: one launch for
          layer norm (a block per row), two for batch norm in training
          (column tiles, then one thread a column, which also moves the
          running statistics), one for batch norm in eval;
  pass B  ``xhat``, ``u = gamma xhat + beta``, ``f(u)``, dropout, residual.
backward:
  pass 1  ``t = da * mask * scale * f'`` into ``dz`` with ``dgamma``,
          ``dbeta`` (and the per-row sums ``r1``, ``r2`` for layer norm);
  pass 2  ``dz`` through the normalisation, in place, with ``db``.

Every sum is float64 in a fixed order (see ``blocks``): the same bits on
every run.  Nothing returns to the host: the statistics and the running
statistics stay in device memory.  Batches of more than 64 rows take
float64 scratch for the column partials from ``work`` (optional, see
``work_size``) or CuPy's stream-ordered pool.
"""
import cupy
import numpy as np

from ..spec import BATCH, LAYER, NO_NORM
from ..spec import NORM_EPS as EPS, NORM_KINDS as KINDS, NORM_MOMENTUM as MOMENTUM
from . import _module as _m
from .blocks import col_partials, col_partials_size, drop_args, finish_col_sums, null

__all__ = ["NO_NORM", "LAYER", "BATCH", "KINDS", "EPS", "MOMENTUM", "norm_forward_epilogue",
           "norm_backward_epilogue", "work_size"]

_FILE = "norm.cu"


def work_size(rows, cols):
    """float64 scratch elements the passes below may take from ``work``
    (two column sums; 0 when one row block of 64 covers the batch)."""
    return col_partials_size(rows, cols, 2)


def _scratch(a, size):
    """``a`` when it is float64 device scratch of >= ``size`` elements (the
    caller's acc, r1, r2), else a pool buffer: a host array handed over by
    a device-agnostic caller costs an allocation, not an error."""
    if isinstance(a, cupy.ndarray) and a.dtype == np.float64 and a.size >= size:
        return a
    return cupy.empty(size, np.float64)


def _check_kind(kind):
    if int(kind) not in (LAYER, BATCH):
        raise ValueError(f"norm kind must be LAYER ({LAYER}) or BATCH ({BATCH}), got {kind!r}")
    return int(kind)


def _statistics(y, b, mean, rstd, acc, run_mean, run_var, kind, batch_stats, work):
    """Pass A: mean and rstd (dtype of y) of t = y + b; y is not written."""
    rows, cols = y.shape
    t = _m.ctype(y.dtype)
    if kind == LAYER:
        k = _m.kernel(_FILE, f"fg_layer_stats<{t}>")
        k((rows,), (_m.RED_THREADS,), (y, b, mean, rstd, _m.i64(cols), _m.f64(EPS)))
    elif batch_stats:
        grid, block = _m.col_grid(rows, cols)
        nblk = grid[1]
        # one row block: its two rows of partials fit the caller's acc (2n)
        part = _scratch(acc, 2 * cols) if nblk == 1 else col_partials(rows, cols, 2, work)
        kp = _m.kernel(_FILE, f"fg_batch_stats_partial<{t}>")
        kp(grid, block, (y, b, part, _m.i64(rows), _m.i64(cols)))
        kf = _m.kernel(_FILE, f"fg_batch_stats<{t}>")
        kf((_m.cover(cols),), (_m.THREADS,),
           (part, _m.i64(nblk), y, b, mean, rstd, run_mean, run_var, _m.i64(rows),
            _m.i64(cols), _m.f64(EPS), _m.f64(MOMENTUM)))
    else:
        k = _m.kernel(_FILE, f"fg_batch_eval_stats<{t}>")
        k((_m.cover(cols),), (_m.THREADS,),
          (run_mean, run_var, mean, rstd, _m.i64(cols), _m.f64(EPS)))


def norm_forward_epilogue(y, b, x, xhat, fz, gamma, beta, mean, rstd, acc, run_mean, run_var,
                          kind, batch_stats, act, alpha, drop, key, thresh, scale, residual,
                          work=None, counter=None):
    """Passes A and B over the GEMM output ``y`` (in place).

    ``mean``/``rstd`` (the model dtype) receive the statistics used: length
    B for layer norm, n_out for batch norm.  ``acc``: float64 scratch of
    >= 2 n_out (batch norm's column sums when the batch fits one row block
    of 64).  ``batch_stats``: batch norm normalises with (and updates the
    float64 running statistics ``run_mean``/``run_var`` from) this batch;
    False: with the running statistics.  ``fz`` is written for a residual
    block only; ``x`` is read for a residual block only.  ``counter``:
    the dropout step in device memory (``blocks.drop_args``).
    """
    kind = _check_kind(kind)
    rows, cols = y.shape
    n = rows * cols
    if n == 0:
        return
    _statistics(y, b, mean, rstd, acc, run_mean, run_var, kind, batch_stats, work)
    _m.launch_elementwise(
        _FILE, f"fg_norm_fwd<{_m.ctype(y.dtype)}, {int(act)}>", n,
        (y, b, x, xhat, fz, gamma, beta, mean, rstd, _m.i64(rows), _m.i64(cols),
         _m.flag(kind == LAYER), _m.f64(alpha), *drop_args(drop, key, thresh, scale, counter),
         _m.flag(residual)))


def norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta, r1, r2, kind,
                           batch_stats, act, alpha, drop, key, thresh, scale, residual,
                           work=None, counter=None):
    """Passes 1 and 2: ``dz = dL/d(x W + b)`` from ``da = dL/dy``, with
    ``db``, ``dgamma``, ``dbeta``.

    ``fz`` holds f(u) for a residual block and the forward's output ``y``
    otherwise (as in ``blocks.block_backward_epilogue``).  ``r1``, ``r2``:
    float64 scratch of length B (layer norm's row sums; unused otherwise).
    ``dz`` may be ``da`` unless the block is residual.  ``counter``: as in
    :func:`norm_forward_epilogue`.
    """
    kind = _check_kind(kind)
    rows, cols = da.shape
    if cols == 0:
        return
    t = _m.ctype(da.dtype)
    grid, block = _m.col_grid(rows, cols)
    nblk = grid[1]
    part = col_partials(rows, cols, 2, work)
    k1 = _m.kernel(_FILE, f"fg_norm_grad_unit<{t}, {int(act)}>")
    k1(grid, block, (da, fz, xhat, gamma, beta, dz, null(part), dgamma, dbeta, _m.i64(rows),
                     _m.i64(cols), _m.f64(alpha),
                     *drop_args(drop, key, thresh, scale, counter),
                     _m.flag(residual)))
    if part is not None:
        finish_col_sums(_FILE, part, nblk, 0, dgamma)
        finish_col_sums(_FILE, part, nblk, 1, dbeta)
    row1 = row2 = None                  # layer norm's row sums (never read otherwise)
    if kind == LAYER and rows > 0:
        row1, row2 = _scratch(r1, rows), _scratch(r2, rows)
        kr = _m.kernel(_FILE, f"fg_layer_grad_rows<{t}>")
        kr((rows,), (_m.RED_THREADS,), (dz, xhat, gamma, row1, row2, _m.i64(cols)))
    # pass 2 reuses the partials buffer: the launches above have read it
    k2 = _m.kernel(_FILE, f"fg_norm_grad_input<{t}>")
    k2(grid, block, (dz, xhat, gamma, rstd, dgamma, dbeta, null(row1), null(row2), null(part), db,
                     _m.i64(rows), _m.i64(cols), np.int32(kind), _m.flag(batch_stats)))
    if part is not None:
        finish_col_sums(_FILE, part, nblk, 0, db)
