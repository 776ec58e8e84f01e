"""Activation epilogues on the GPU: twins of ``fastgrad.kernels.cpu.activations``.

Same names, argument order and in-place rules; arrays are C-contiguous
``cupy.ndarray``.  Every function only enqueues kernels on the current
stream: nothing waits for the device.  Sources: ``activations.cu``.
"""
import cupy

from ..spec import CODES, DEFAULT_ALPHA, NEEDS_Z
from . import _module as _m

__all__ = ["CODES", "DEFAULT_ALPHA", "NEEDS_Z", "bias_act", "bias_act_grad",
           "activation_forward", "activation_backward"]

_FILE = "activations.cu"


def _launch_bias_act(z, b, zout, out, act, alpha):
    rows, cols = z.shape
    _m.launch_elementwise(
        _FILE, f"fg_bias_act<{_m.ctype(z.dtype)}, {int(act)}>", rows * cols,
        (z, _m.NULL if b is None else b, _m.NULL if zout is None else zout, out,
         _m.i64(rows), _m.i64(cols), _m.f64(alpha)))


def bias_act(z, b, out, act, alpha):
    """One pass: ``z += b`` (row-broadcast bias), ``out = f(z)``.

    ``out`` may be ``z`` itself (in place on the GEMM's output); a separate
    ``out`` keeps ``z`` for activations whose derivative needs it (``NEEDS_Z``).
    """
    inplace = out.data.ptr == z.data.ptr
    _launch_bias_act(z, b, None if inplace else z, out, act, alpha)


def grad_partials_shape(rows, cols):
    """Shape of the bias-gradient scratch ``bias_act_grad`` needs for a
    ``(rows, cols)`` pass (None when the sums go straight into ``db``)."""
    nblk = -(-int(rows) // _m.GRAD_ROWS)
    return None if nblk <= 1 else (nblk, int(cols))


def bias_act_grad(da, a, z, dz, db, act, alpha, work=None):
    """One pass: ``dz = da * f'`` (from ``a``, or ``z`` when it needs z) and
    ``db = dz.sum(axis=0)``.  ``dz`` may be ``da`` itself.

    ``db`` is deterministic: rows are summed in blocks of 64 in a fixed tree,
    then the block sums in order (no atomics), so two runs give the same
    bits.  ``work`` (optional, ``grad_partials_shape`` elements of ``db``'s
    dtype) holds the block sums; without it they come from CuPy's pool
    (stream-ordered, no sync).  ``db=None`` skips the sums.
    """
    rows, cols = da.shape
    if rows * cols == 0:
        if db is not None:
            db[...] = 0
        return
    shape = grad_partials_shape(rows, cols) if db is not None else None
    if shape is None:
        target = db
    elif work is not None:
        target = work
    else:
        target = cupy.empty(shape, db.dtype)
    t = _m.ctype(da.dtype)
    k = _m.kernel(_FILE, f"fg_bias_act_grad<{t}, {int(act)}>")
    # grid y is capped (CUDA's limit): the kernel strides over the row blocks
    grid = (-(-cols // 32), min(-(-rows // _m.GRAD_ROWS), _m.MAX_GRID_Y))
    k(grid, (32, 8), (da, a, z, dz, _m.NULL if target is None else target,
                      _m.i64(rows), _m.i64(cols), _m.f64(alpha)))
    if shape is not None:
        ks = _m.kernel(_FILE, f"fg_colsum<{t}>")
        ks((-(-cols // _m.THREADS),), (_m.THREADS,),
           (target, db, _m.i64(shape[0]), _m.i64(cols)))


def activation_forward(z, out, act, alpha):
    """out = f(z) elementwise on 2-D C-contiguous arrays (``z`` is kept)."""
    _launch_bias_act(z, None, None, out, act, alpha)


def activation_backward(da, a, z, dz, act, alpha):
    """dz = da * f'(z), with f' read from the output ``a`` (``z`` when it needs z)."""
    bias_act_grad(da, a, z, dz, None, act, alpha)
