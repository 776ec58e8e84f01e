"""Residual blocks and inverted dropout on the GPU: twins of
``fastgrad.kernels.cpu.blocks`` (same names, argument order and in-place rules).

forward:  y = x @ W (cuBLAS), then ONE pass in place on y: + b, activation,
          dropout, + x for a residual block.
backward: ONE pass dz = da * mask * scale * f' summing db, then cuBLAS
          dW = x^T dz and dx = dz W^T (+ da for a residual block).

The mask is drawn by the CPU's counter-based hash on 64-bit integers
(``blocks.cuh``), so both devices drop exactly the same units for the same
key.  ``dropout_key`` and ``dropout_threshold`` come from ``kernels/spec.py``
(the CPU's compiled ``dropout_key`` gives the same keys): they are host scalars, passed to the kernels by value.
The fused step passes instead the layer's key and a device counter
(``counter=``, see ``drop_args``): its dropout step lives on the device.

Column sums (db here, the norms' sums in ``norm``) are deterministic: float64
within row blocks of 64 in a fixed tree, then the blocks' partials in order
(no atomics).  Batches of more than 64 rows need float64 scratch for the
partials: ``work`` (``col_partials_size`` elements) or, without it, CuPy's
stream-ordered pool (no sync, but not capturable in a CUDA graph).  Nothing
here waits for the device.
"""
import cupy
import numpy as np

from ..spec import dropout_key, dropout_threshold
from . import _module as _m
from .arrays import add_into

__all__ = ["dropout_key", "dropout_threshold", "dropout_mask", "block_forward_epilogue",
           "block_backward_epilogue", "block_forward", "block_backward", "col_partials_size"]

_FILE = "blocks.cu"


# --- column sums (shared with norm.py) -------------------------------------------------

def col_partials_size(rows, cols, n_sums=1):
    """float64 scratch elements of ``n_sums`` column sums over ``rows`` rows
    (0 when one row block covers them: the sums go straight to their outputs)."""
    nblk = _m.col_grid(rows, cols)[0][1]
    return 0 if nblk == 1 else n_sums * nblk * int(cols)


def col_partials(rows, cols, n_sums, work):
    """The partials buffer of a column-sum pass: None for one row block, else
    ``work`` or a pool buffer of ``col_partials_size`` float64 elements."""
    size = col_partials_size(rows, cols, n_sums)
    if size == 0:
        return None
    if work is None:
        return cupy.empty(size, np.float64)
    if work.dtype != np.float64 or work.size < size:
        raise ValueError(f"work: need {size} float64 elements, got {work.size} of {work.dtype}")
    return work


def finish_col_sums(filename, part, nblk, slot, out):
    """out = the in-order sum of the ``nblk`` row-block partials of sum
    ``slot`` in ``part`` (``fg_colsum_cast`` of ``filename``), in out's dtype."""
    cols = out.size
    k = _m.kernel(filename, f"fg_colsum_cast<{_m.ctype(out.dtype)}>")
    k((_m.cover(cols),), (_m.THREADS,),
      (part[slot * nblk * cols:], _m.i64(nblk), _m.i64(cols), out))


def null(a):
    """``a``, or a null pointer argument for None."""
    return _m.NULL if a is None else a


def drop_args(drop, key, thresh, scale, counter=None):
    """The kernels' trailing dropout arguments (flag, key, counter, threshold,
    scale).  ``counter``: None (``key`` is the step's key), or a 1-element
    int64 device array holding the dropout step, ``key`` being then the
    layer's key (``spec.dropout_layer_key``): the fused step's masks follow
    a counter the device advances."""
    if counter is not None and (counter.dtype != np.int64 or counter.size != 1):
        raise ValueError(f"counter: a 1-element int64 device array, got {counter.size} "
                         f"of {counter.dtype}")
    return _m.flag(drop), _m.u64(key), null(counter), _m.u64(thresh), _m.f64(scale)


# --- dropout --------------------------------------------------------------------------

def dropout_mask(key, thresh, out):
    """out[i, j] = 1 where the unit is kept, else 0 (the CPU's mask, bit for bit)."""
    n = out.size
    _m.launch_elementwise(_FILE, f"fg_dropout_mask<{_m.ctype(out.dtype)}>", n,
                          (out, _m.i64(n), _m.u64(key), _m.u64(thresh)))


# --- the fused passes -----------------------------------------------------------------

def block_forward_epilogue(y, b, x, z, fz, act, alpha, drop, key, thresh, scale, residual,
                           counter=None):
    """One pass over the GEMM output ``y`` (in place): ``t = y + b``, ``z = t``
    (needs-z activations only), ``fz = f(t)`` (residual blocks only: any other layer's fz
    may be ``y`` itself), ``y = fz * mask * scale`` when ``drop``, ``y += x``
    when ``residual`` (``x`` is read only then).  ``counter``: see
    :func:`drop_args`."""
    rows, cols = y.shape
    _m.launch_elementwise(
        _FILE, f"fg_block_fwd<{_m.ctype(y.dtype)}, {int(act)}>", rows * cols,
        (y, b, x, z, fz, _m.i64(rows), _m.i64(cols), _m.f64(alpha),
         *drop_args(drop, key, thresh, scale, counter), _m.flag(residual)))


def block_backward_epilogue(da, fz, z, dz, db, act, alpha, drop, key, thresh, scale, residual,
                            work=None, counter=None):
    """One pass: ``dz = g * f'(f, z)`` with ``g = da * mask * scale`` (0 where
    dropped; the mask regenerated from ``key``) and ``db = dz.sum(axis=0)``.

    ``fz`` holds f(z) for a residual block and the forward's output ``y``
    otherwise (f = y / scale where kept).  ``dz`` may be ``da`` unless the
    block is residual (the skip gradient still needs ``da``).  ``work``:
    optional float64 scratch of ``col_partials_size(*da.shape)`` elements;
    ``counter``: see :func:`drop_args`.
    """
    rows, cols = da.shape
    if cols == 0:
        return
    part = col_partials(rows, cols, 1, work)
    grid, block = _m.col_grid(rows, cols)
    k = _m.kernel(_FILE, f"fg_block_grad<{_m.ctype(da.dtype)}, {int(act)}>")
    k(grid, block, (da, fz, z, dz, null(part), db, _m.i64(rows), _m.i64(cols), _m.f64(alpha),
                    *drop_args(drop, key, thresh, scale, counter), _m.flag(residual)))
    if part is not None:
        finish_col_sums(_FILE, part, grid[1], 0, db)


def block_forward(x, W, b, z, fz, y, act, alpha, drop, key, thresh, scale, residual):
    """y = dropout(f(x @ W + b)) (+ x for a residual block); keeps z and fz."""
    cupy.matmul(x, W, out=y)
    block_forward_epilogue(y, b, x, z, fz, act, alpha, drop, key, thresh, scale, residual)


def block_backward(x, W, fz, z, da, dz, dW, db, dx, act, alpha, drop, key, thresh, scale,
                   residual, need_dx, work=None):
    """Gradients of :func:`block_forward` given ``da = dL/dy``.

    Writes ``dz``, ``dW``, ``db`` and, when ``need_dx``,
    ``dx = dz W^T (+ da for a residual block)``.
    """
    block_backward_epilogue(da, fz, z, dz, db, act, alpha, drop, key, thresh, scale, residual,
                            work)
    cupy.matmul(x.T, dz, out=dW)
    if need_dx:
        cupy.matmul(dz, W.T, out=dx)
        if residual:
            add_into(dx, da)
