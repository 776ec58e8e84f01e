"""Residual blocks and inverted dropout: the extended dense layer.

forward:  y = x @ W (BLAS), then ONE pass:
          z = y + b, f = act(z) (z kept for needs-z activations only, f for a residual
          block only), y = f * mask / (1 - p) (dropout, training only),
          y += x (residual)
backward: ONE pass dz = da * mask / (1 - p) * f'(f, z) summing db (the
          mask is regenerated, never stored), GEMMs dW = x^T dz and
          dx = dz W^T, then dx += da for a residual block (the skip path).

Backward reads ``f`` from the block's own output ``y`` unless the block is
residual: there ``y = f`` without dropout, and ``y = f / (1 - p)`` where
dropout kept the unit (a dropped unit's gradient is 0 whatever ``f`` is), so
``f = y (1 - p)`` to rounding.  Keeping a separate copy of ``f`` would cost
a write of a cold buffer per layer -- measured as most of the layer's
overhead over a plain one.  A residual block's output ``x + f`` cannot give
``f`` back accurately, so it keeps ``f``.

The dropout mask is counter-based: element ``e`` of layer ``l`` at dropout
step ``c`` of a model seeded ``s`` draws the splitmix64 stream seeded with
``key(s, l, c)`` at position ``e``; it keeps the unit iff the top 53 bits,
read as ``u = bits / 2**53``, satisfy ``u >= p``.  The comparison runs on
integers (``bits >= ceil(p * 2**53)``, exact since ``p * 2**53`` is exact in
float64), so the loop needs no int-to-float conversion.

These kernels are separate from ``activations``/``dense``/``step`` on
purpose: plain models never compile them, so the plain step's cold compile
time does not grow.  Every function keeps the twin-friendly style of the
other kernels (arrays and scalars only, outputs passed in).
"""
import numpy as np
from numba import njit

from . import activations as A
from ._jit import INLINE, JIT_ROWS
from ..spec import dropout_threshold  # noqa: F401  (re-exported: the twins share it)
from .gemm import gemm
from .mathfn import like

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_MASK64 = (1 << 64) - 1


@njit(**INLINE)
def _fin(z):
    # splitmix64's finalizer: a bijection of uint64 with full avalanche
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@njit(**INLINE)
def _keep(key, e, thresh):
    # bits of element e of the stream seeded ``key``: fin(key + (e + 1) * golden)
    # np.uint64 casts throughout: in Numba int64 + uint64 is a float64.
    k = np.uint64(key) + (np.uint64(e) + np.uint64(1)) * _GOLDEN
    return (_fin(k) >> _S11) >= np.uint64(thresh)


@njit(**JIT_ROWS)
def dropout_key(seed, layer, counter):
    """The key of the mask of ``layer`` at dropout step ``counter`` (returned
    to Python as an int; pass it on as ``np.uint64``)."""
    k = _fin(np.uint64(seed) + _GOLDEN)
    k = _fin((k ^ np.uint64(layer)) + _GOLDEN)
    return _fin((k ^ np.uint64(counter)) + _GOLDEN)




@njit(**JIT_ROWS)
def dropout_mask(key, thresh, out):
    """out[i, j] = 1 where the unit is kept, else 0 (a test and debugging aid)."""
    n = out.shape[1]
    for i in range(out.shape[0]):
        for j in range(n):
            out[i, j] = 1.0 if _keep(key, i * n + j, thresh) else 0.0


# --- the fused passes -------------------------------------------------------------
#
# Each pass walks the rows; per row, the activation loop and then the
# dropout / residual loop run back to back while the row is in L1, so the
# pass still reads and writes the array once.  Splitting them keeps the
# compiled code small: the eight activation loops carry no dropout or
# residual code, and the mask hash is compiled into one loop, not one per
# activation (the block step's cold compile had grown from 24 s to 39 s
# with both fused into every activation variant).

@njit(**INLINE)
def _act_row(y, b, z, i, alpha, f, keep_z):
    # keep_z is a constant at every call site (True only for the
    # activations whose derivatives read z), so the store folds away for the other activations.
    for j in range(y.shape[1]):
        t = y[i, j] + b[j]
        if keep_z:
            z[i, j] = t
        y[i, j] = f(t, alpha)


_act_row_ladder = A.ladder(_act_row, "y, b, z, i, act, alpha", "y, b, z, i, alpha, {f}, {keep_z}")


@njit(**INLINE)
def _drop_add_row(y, x, fz, i, drop, key, thresh, scale, residual):
    """Row i of y holds f: keep it in fz (residual), apply the mask, add the
    skip.  ``residual`` must be a constant at the call site: a runtime flag
    around the fz store compiled to AVX-512 masked stores, which on AMD Zen 4
    take a microcode assist per store into never-written pages even when
    masked off (20x slower when fz was a fresh, untouched buffer)."""
    n = y.shape[1]
    base = i * n
    for j in range(n):
        v = y[i, j]
        if residual:
            fz[i, j] = v
        if drop:
            v = v * like(v, scale) if _keep(key, base + j, thresh) else like(v, 0.0)
        if residual:
            v = v + x[i, j]
        y[i, j] = v


@njit(**INLINE)
def _load_row(src, dst, i, drop, key, thresh, scale):
    # dst[i] = src[i] (* mask * scale: the forward's mask, regenerated)
    n = src.shape[1]
    base = i * n
    for j in range(n):
        v = src[i, j]
        if drop:
            v = v * like(v, scale) if _keep(key, base + j, thresh) else like(v, 0.0)
        dst[i, j] = v


@njit(**INLINE)
def _grad_rows_in(da, dz, i, drop, key, thresh, scale):
    """Row i of the incoming gradient, masked, into dz, which the activation
    loop then updates in place.  A loop reading da and writing dz does not
    vectorise when they are the same array (LLVM's runtime alias check
    fails), so the in-place case passes dz alone."""
    if dz.ctypes.data != da.ctypes.data:
        _load_row(da, dz, i, drop, key, thresh, scale)
    elif drop:
        _load_row(dz, dz, i, True, key, thresh, scale)


@njit(**INLINE)
def _grad_row(dz, fz, z, db, i, alpha, df, unscale):
    for j in range(dz.shape[1]):
        g = dz[i, j]
        t = g * df(fz[i, j] * like(g, unscale), z[i, j], alpha)
        dz[i, j] = t
        db[j] += t


_grad_row_ladder = A.ladder(_grad_row, "dz, fz, z, db, i, act, alpha, u",
                            "dz, fz, z, db, i, alpha, {df}, u")


@njit(**JIT_ROWS)
def block_forward_epilogue(y, b, x, z, fz, act, alpha, drop, key, thresh, scale, residual):
    """One pass over the GEMM output ``y`` (in place): ``z = y + b`` (kept
    for needs-z activations only, whose derivatives read it), ``f = f(z)`` (kept in ``fz``
    for a residual block only), ``y = f * mask * scale`` when ``drop``,
    ``y += x`` when ``residual``.  ``z`` and ``fz`` must not be ``y``;
    ``x`` is read only for a residual block."""
    for i in range(y.shape[0]):
        _act_row_ladder(y, b, z, i, act, alpha)
        if residual:
            _drop_add_row(y, x, fz, i, drop, key, thresh, scale, True)
        elif drop:
            _drop_add_row(y, x, fz, i, True, key, thresh, scale, False)


@njit(**JIT_ROWS)
def block_backward_epilogue(da, fz, z, dz, db, act, alpha, drop, key, thresh, scale,
                            residual):
    """One pass: ``dz = da * mask * scale * f'(f, z)`` (the mask regenerated
    from ``key``) and ``db = dz.sum(axis=0)``.

    ``fz`` is what the forward kept of ``f``: ``f`` itself for a residual
    block, otherwise the block's output ``y`` (``f`` divided by ``1 - p``
    where dropout kept the unit; see the module notes).  ``dz`` must not be
    ``da`` when the block is residual: the skip gradient still needs ``da``."""
    u = 1.0 / scale if drop and not residual else 1.0
    for j in range(dz.shape[1]):
        db[j] = 0
    for i in range(dz.shape[0]):
        _grad_rows_in(da, dz, i, drop, key, thresh, scale)
        _grad_row_ladder(dz, fz, z, db, i, act, alpha, u)


@njit(**INLINE)
def _add_into(dst, src):
    # dst += src over 2-D arrays of the same shape (the residual skip gradient)
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] += src[i, j]


@njit(**JIT_ROWS)
def block_forward(x, W, b, z, fz, y, act, alpha, drop, key, thresh, scale, residual):
    """y = dropout(f(x @ W + b)) (+ x for a residual block); keeps z (``NEEDS_Z``)
    and fz (residual)."""
    gemm(x, W, y)
    block_forward_epilogue(y, b, x, z, fz, act, alpha, drop, key, thresh, scale, residual)


@njit(**JIT_ROWS)
def block_backward(x, W, fz, z, da, dz, dW, db, dx, act, alpha, drop, key, thresh, scale,
                   residual, need_dx):
    """Gradients of :func:`block_forward` given ``da = dL/dy``.

    ``fz``: as in :func:`block_backward_epilogue` (the forward's ``y`` unless
    residual).  Writes ``dz`` (a separate array from ``da`` for a residual
    block), ``dW``, ``db`` and, when
    ``need_dx``, ``dx = dz W^T (+ da for a residual block)``.
    """
    block_backward_epilogue(da, fz, z, dz, db, act, alpha, drop, key, thresh, scale, residual)
    gemm(x.T, dz, dW)
    if need_dx:
        gemm(dz, W.T, dx)
        if residual:
            _add_into(dx, da)
