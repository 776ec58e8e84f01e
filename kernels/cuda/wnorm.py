"""Weight normalisation on the GPU: twin of ``fastgrad.kernels.cpu.wnorm``.

``W = g v / ||v||`` per column of the ``(n_in, n_out)`` weight; backward

    dg_j = sum_i dW_ij v_ij / ||v_j||
    dv   = (g_j / ||v_j||) dW - (g_j dg_j / ||v_j||^2) v

Three launches each way: the column sums (float64, deterministic, as in
``blocks``), a per-column finish, an elementwise pass.  The partials take
``work`` (optional, ``work_size`` float64 elements) or a buffer from CuPy's
stream-ordered pool.  Nothing waits for the device.
"""
import cupy
import numpy as np

from . import _module as _m

__all__ = ["weight_norm_forward", "weight_norm_backward", "work_size"]

_FILE = "wnorm.cu"


def work_size(n_in, n_out):
    """float64 scratch elements of either pass (one partial per row block
    of 64 and column)."""
    return _m.col_grid(n_in, n_out)[0][1] * int(n_out)


def _column_dots(a, b, work):
    """Launch the partial sums of a * b per column; returns (part, nblk)."""
    rows, cols = a.shape
    grid, block = _m.col_grid(rows, cols)
    size = grid[1] * cols
    part = cupy.empty(size, np.float64) if work is None else work
    if part.dtype != np.float64 or part.size < size:
        raise ValueError(f"work: need {size} float64 elements, got {part.size} of {part.dtype}")
    k = _m.kernel(_FILE, f"fg_coldot_partial<{_m.ctype(a.dtype)}>")
    k(grid, block, (a, b, part, _m.i64(rows), _m.i64(cols)))
    return part, grid[1]


def weight_norm_forward(v, g, W, inv_norm, work=None):
    """``W = v * g / ||v||`` column-wise; ``inv_norm`` (float64, n_out)
    receives ``1 / ||v_j||`` for backward."""
    rows, cols = v.shape
    if cols == 0:
        return
    part, nblk = _column_dots(v, v, work)
    kn = _m.kernel(_FILE, "fg_wn_inv_norm<double>")
    kn((_m.cover(cols),), (_m.THREADS,), (part, _m.i64(nblk), _m.i64(cols), inv_norm))
    n = rows * cols
    _m.launch_elementwise(_FILE, f"fg_wn_apply<{_m.ctype(v.dtype)}>", n,
                          (v, g, inv_norm, W, _m.i64(n), _m.i64(cols)))


def weight_norm_backward(v, g, inv_norm, dW, dv, dg, work=None):
    """``dv`` and ``dg`` from ``dW`` = dL/dW of the effective weight."""
    rows, cols = v.shape
    if cols == 0:
        return
    t = _m.ctype(v.dtype)
    part, nblk = _column_dots(dW, v, work)
    kg = _m.kernel(_FILE, f"fg_wn_dg<{t}>")
    kg((_m.cover(cols),), (_m.THREADS,), (part, _m.i64(nblk), _m.i64(cols), inv_norm, dg))
    n = rows * cols
    _m.launch_elementwise(_FILE, f"fg_wn_grad<{t}>", n,
                          (v, g, inv_norm, dW, dg, dv, _m.i64(n), _m.i64(cols)))
