"""Fused dense layer: BLAS GEMM plus one elementwise pass each way.

forward:  z = x @ W (BLAS), then ONE pass: z += b, a = f(z)
backward: ONE pass dz = da * f'(a) (f'(z) when it needs z) summing db,
          then dW = x^T dz and dx = dz W^T (BLAS; dx skipped for the first
          layer).

The activation passes are compiled into these kernels' disk cache, which
Numba keys on this file only: a change to activations.py alone leaves a
stale entry here (DESIGN.md, Numba notes) -- touch this file with it.

The GEMMs call the kernels' BLAS library (``gemm.py``: SciPy's unless
``fastgrad.set_blas`` chose another); a transposed operand (``x.T``)
reaches it as a transpose flag, not as a copy.
"""
from numba import njit

from ._jit import JIT
from .activations import bias_act, bias_act_grad
from .gemm import gemm


@njit(**JIT)
def dense_forward(x, W, b, z, a, act, alpha):
    """a = f(x @ W + b).

    ``z`` receives the pre-activation.  Pass ``z is a`` (the same array) when
    the derivative does not need z: then the whole layer is one GEMM into
    ``a`` and one in-place pass.
    """
    gemm(x, W, z)
    bias_act(z, b, a, act, alpha)


@njit(**JIT)
def dense_backward(x, W, a, z, da, dz, dW, db, dx, act, alpha, need_dx):
    """Gradients of a = f(x @ W + b) given da = dL/da.

    Writes ``dz`` (may be ``da`` itself), ``dW``, ``db`` and, when
    ``need_dx``, ``dx``; with ``need_dx`` False ``dx`` is not touched.
    """
    bias_act_grad(da, a, z, dz, db, act, alpha)
    gemm(x.T, dz, dW)
    if need_dx:
        gemm(dz, W.T, dx)
