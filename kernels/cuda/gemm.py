"""fastgrad's own GEMM (``gemm.cu``): the GEMM of a training step that is
captured in a CUDA graph, where CuPy's cuBLAS calls are refused
(cupy/cupy#6290).  ``cupy.matmul`` (cuBLAS) stays the GEMM of eager steps.

``gemm(a, b, out)`` writes ``out = a @ b`` for 2-D arrays of one float
dtype, each operand C-contiguous or the transpose of a C-contiguous array
(the training step's ``h``, ``W``, ``h.T``, ``dz`` and ``W.T``); ``out``
C-contiguous.  Deterministic (fixed summation order); not bitwise equal to
cuBLAS, whose order differs.
"""
import numpy as np

from . import _module as _m

__all__ = ["gemm"]

_FILE = "gemm.cu"
_TILE = 64                  # gemm.cu fg::GEMM_M == fg::GEMM_N
_THREADS = 256              # gemm.cu fg::GEMM_THREADS


def _operand(x, name):
    """(transposed, leading dimension) of a row-major operand."""
    if x.flags.c_contiguous:
        return 0, x.shape[1]
    if x.flags.f_contiguous:          # x.T is C-contiguous
        return 1, x.shape[0]
    raise ValueError(f"gemm: {name} must be C-contiguous or a transpose of such an array")


def gemm(a, b, out):
    """``out = a @ b`` (see the module docstring); returns ``out``."""
    (M, K), (K2, N) = a.shape, b.shape
    if K != K2 or out.shape != (M, N):
        raise ValueError(f"gemm: shapes {a.shape} @ {b.shape} -> {out.shape}")
    if not (a.dtype == b.dtype == out.dtype) or not out.flags.c_contiguous:
        raise ValueError("gemm: operands of one dtype and a C-contiguous output expected")
    ta, lda = _operand(a, "a")
    tb, ldb = _operand(b, "b")
    if tb and ta:
        raise ValueError("gemm: a.T @ b.T is not instantiated")
    if M == 0 or N == 0:
        return out
    if K == 0:
        out.fill(0)
        return out
    k = _m.kernel(_FILE, f"fg_gemm<{_m.ctype(out.dtype)}, {ta}, {tb}>")
    # grid y is capped (CUDA's limit): the kernel strides over the row tiles
    k((-(-N // _TILE), min(-(-M // _TILE), _m.MAX_GRID_Y)), (_THREADS,),
      (a, b, out, _m.i64(M), _m.i64(N), _m.i64(K), _m.i64(lda), _m.i64(ldb), _m.i64(N)))
    return out
