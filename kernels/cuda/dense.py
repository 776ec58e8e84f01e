"""Fused dense layer on the GPU: twin of ``fastgrad.kernels.cpu.dense``.

forward:  z = x @ W (cuBLAS through ``cupy.matmul(..., out=z)``), then ONE
          pass: z += b, a = f(z)
backward: ONE pass dz = da * f'(a) summing db, then dW = x^T dz and
          dx = dz W^T (cuBLAS; the transposes are F-ordered views that reach
          cuBLAS as transpose flags, not copies; dx skipped for the first layer).

float32 GEMMs use cuBLAS's float32 compute type unless ``CUPY_TF32=1`` is
set (TF32 would break the 1e-5 CPU/GPU agreement the tests ask for).
"""
import cupy

from .activations import bias_act, bias_act_grad

__all__ = ["dense_forward", "dense_backward"]


def dense_forward(x, W, b, z, a, act, alpha):
    """a = f(x @ W + b); ``z`` receives the pre-activation (``z is a`` when
    the derivative does not need it: one GEMM into ``a`` and one pass)."""
    cupy.matmul(x, W, out=z)
    bias_act(z, b, a, act, alpha)


def dense_backward(x, W, a, z, da, dz, dW, db, dx, act, alpha, need_dx, work=None):
    """Gradients of a = f(x @ W + b) given da = dL/da.

    Writes ``dz`` (may be ``da`` itself), ``dW``, ``db`` and, when
    ``need_dx``, ``dx``.  ``work``: optional bias-gradient scratch
    (``activations.grad_partials_shape``).
    """
    bias_act_grad(da, a, z, dz, db, act, alpha, work)
    cupy.matmul(x.T, dz, out=dW)
    if need_dx:
        cupy.matmul(dz, W.T, out=dx)
