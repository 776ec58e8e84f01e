"""The fused dense layer on PyTorch's weight layout (``fastgrad.torch.FusedMLP``).

``torch.nn.Linear`` keeps ``weight`` as ``(n_out, n_in)``, the transpose of
fastgrad's ``W``.  These kernels take that layout as it is, so that a torch
module's parameters and gradients are used and written in place (no
transposed copies):

forward:  z = x @ weight.T (BLAS, the transpose as a flag), then ONE pass:
          z += b, a = f(z) (``activations.bias_act``, as ``dense.py``)
backward: ONE pass dz = da * f' summing db, then dweight = dz.T @ x and
          dx = dz @ weight (BLAS; both outputs C-contiguous, as Numba's
          ``gemm`` requires of its ``out``).

The block variants add inverted dropout and the residual skip with the
epilogues of ``blocks.py``, the norm variants LayerNorm / BatchNorm1d with
those of ``norm.py`` (same masks, same arithmetic as fastgrad's own layers).

As for ``dense.py``: the activation and block passes are compiled into this
file's disk cache entries, so a change to activations.py or blocks.py needs
this file touched.
"""
from numba import njit

from ._jit import JIT
from .activations import bias_act, bias_act_grad
from .gemm import gemm
from .blocks import _add_into, block_backward_epilogue, block_forward_epilogue
from .norm import norm_backward_epilogue, norm_forward_epilogue


@njit(**JIT)
def dense_forward_t(x, weight, b, z, a, act, alpha):
    """a = f(x @ weight.T + b); ``z`` gets the pre-activation (``z is a``
    when the derivative does not need it)."""
    gemm(x, weight.T, z)
    bias_act(z, b, a, act, alpha)


@njit(**JIT)
def dense_backward_t(x, weight, a, z, da, dz, dweight, db, dx, act, alpha, need_dx):
    """Gradients of a = f(x @ weight.T + b) given da: writes ``dz``,
    ``dweight`` (n_out, n_in), ``db`` and, when ``need_dx``, ``dx``."""
    bias_act_grad(da, a, z, dz, db, act, alpha)
    gemm(dz.T, x, dweight)
    if need_dx:
        gemm(dz, weight, dx)


@njit(**JIT)
def block_forward_t(x, weight, b, z, fz, y, act, alpha, drop, key, thresh, scale, residual):
    """y = dropout(f(x @ weight.T + b)) (+ x when ``residual``); arguments
    as ``blocks.block_forward``."""
    gemm(x, weight.T, y)
    block_forward_epilogue(y, b, x, z, fz, act, alpha, drop, key, thresh, scale, residual)


@njit(**JIT)
def block_backward_t(x, weight, fz, z, da, dz, dweight, db, dx, act, alpha, drop, key, thresh,
                     scale, residual, need_dx):
    """Gradients of :func:`block_forward_t`; arguments as
    ``blocks.block_backward`` with ``dweight`` (n_out, n_in)."""
    block_backward_epilogue(da, fz, z, dz, db, act, alpha, drop, key, thresh, scale, residual)
    gemm(dz.T, x, dweight)
    if need_dx:
        gemm(dz, weight, dx)
        if residual:
            _add_into(dx, da)


@njit(**JIT)
def norm_forward_t(x, weight, b, xhat, fz, y, gamma, beta, mean, rstd, acc, run_mean, run_var,
                   kind, batch_stats, act, alpha, drop, key, thresh, scale, residual):
    """y = dropout(f(norm(x @ weight.T + b))) (+ x); arguments as
    ``norm.norm_forward_epilogue`` after the GEMM."""
    gemm(x, weight.T, y)
    norm_forward_epilogue(y, b, x, xhat, fz, gamma, beta, mean, rstd, acc, run_mean, run_var,
                          kind, batch_stats, act, alpha, drop, key, thresh, scale, residual)


@njit(**JIT)
def norm_backward_t(x, weight, fz, xhat, gamma, beta, rstd, da, dz, dweight, db, dgamma, dbeta,
                    dx, r1, r2, kind, batch_stats, act, alpha, drop, key, thresh, scale,
                    residual, need_dx):
    """Gradients of :func:`norm_forward_t`; ``dz`` must not be ``da``."""
    norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta, r1, r2, kind,
                           batch_stats, act, alpha, drop, key, thresh, scale, residual)
    gemm(dz.T, x, dweight)
    if need_dx:
        gemm(dz, weight, dx)
        if residual:
            _add_into(dx, da)
