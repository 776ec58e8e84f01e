"""Device-array helpers of the CUDA backend (``arrays.cu``).

The CUDA path's array operations besides its GEMMs and fused kernels --
an in-place add, a copy, a copy on a device-side flag, a row gather -- as
fastgrad's own launches, so that the backend's contact with CuPy is
allocation, kernel launch, GEMM and streams (the host emulator fakes only
that surface).  Operands are C-contiguous device arrays of one dtype:
float32, float64, int64 or int32.  Nothing waits for the device.
"""
import cupy
import numpy as np

from . import _module as _m

__all__ = ["add_into", "copy_into", "copy_if", "gather_rows", "DTYPES"]

_FILE = "arrays.cu"
DTYPES = _m.ARRAY_CTYPES        # dtype -> the C type its kernels are instantiated for


def _ctype(*arrays):
    dt = arrays[0].dtype
    for a in arrays:
        if not isinstance(a, cupy.ndarray):
            raise TypeError(f"expected a CuPy array, got {type(a).__name__}")
        if a.dtype != dt:
            raise TypeError(f"operands of one dtype expected, got {dt} and {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError("C-contiguous operands expected")
    try:
        return DTYPES[np.dtype(dt)]
    except KeyError:
        raise TypeError(f"CUDA array helpers take {', '.join(map(str, DTYPES))}; "
                        f"got {dt}") from None


def _same_size(dst, src, name):
    if dst.shape != src.shape:
        raise ValueError(f"{name}: shapes {dst.shape} and {src.shape} differ")


def add_into(dst, src):
    """``dst += src`` in place; returns ``dst``."""
    _same_size(dst, src, "add_into")
    t = _ctype(dst, src)
    _m.launch_elementwise(_FILE, f"fg_add_into<{t}>", dst.size, (dst, src, _m.i64(dst.size)))
    return dst


def copy_into(dst, src):
    """``dst[...] = src`` (a launch, so a captured graph replays it); returns ``dst``."""
    _same_size(dst, src, "copy_into")
    t = _ctype(dst, src)
    _m.launch_elementwise(_FILE, f"fg_copy_into<{t}>", dst.size, (dst, src, _m.i64(dst.size)))
    return dst


def copy_if(dst, src, flag):
    """``dst[...] = src`` when the device float64 ``flag`` (one element) is
    nonzero, else nothing: the host never reads the decision."""
    _same_size(dst, src, "copy_if")
    t = _ctype(dst, src)
    if flag.dtype != np.float64 or flag.size != 1:
        raise TypeError("copy_if: flag must be one float64 element")
    _m.launch_elementwise(_FILE, f"fg_copy_if<{t}>", dst.size,
                          (dst, src, flag, _m.i64(dst.size)))
    return dst


def gather_rows(src, idx, out):
    """``out[r] = src[idx[r]]`` for the rows of ``out`` (numpy.take along
    axis 0 into ``out``); ``idx`` a device int64 array of ``len(out)``
    indices in ``[0, len(src))`` -- an index outside leaves its row of
    ``out`` unwritten.  Returns ``out``."""
    t = _ctype(src, out)
    if not isinstance(idx, cupy.ndarray) or idx.dtype != np.int64 or idx.ndim != 1 \
            or not idx.flags.c_contiguous:
        raise TypeError("gather_rows: idx must be a C-contiguous 1-D int64 CuPy array")
    if idx.shape[0] != out.shape[0] or src.shape[1:] != out.shape[1:]:
        raise ValueError(f"gather_rows: {idx.shape[0]} indices of rows {src.shape[1:]} into "
                         f"out of shape {out.shape}")
    row = int(np.prod(src.shape[1:], dtype=np.int64))
    _m.launch_elementwise(_FILE, f"fg_gather_rows<{t}>", out.size,
                          (src, idx, out, _m.i64(out.shape[0]), _m.i64(row),
                           _m.i64(src.shape[0])))
    return out
