"""``gemm(a, b, out)``: out = a @ b through the kernels' BLAS library.

The address of the Fortran routine is read at each call from the variable
``kernels/gemm_library.py`` owns (SciPy's BLAS unless ``fastgrad.set_blas``
chose another), so the kernels stay cacheable and the library can change
between steps.  The calls are the ones Numba's ``np.dot`` makes: out's
transpose, column-major (``gemm(op(b), op(a))``), and ``gemv`` when ``a``
is one row or ``b`` one column, so with SciPy's BLAS the results are those
of ``np.dot``.

``a`` and ``b`` are 2-D, each with rows of unit stride (C-contiguous, or
a block of columns of one) or columns of unit stride (a transpose: ``x.T``
reaches the BLAS as a flag, not a copy); ``out`` has rows of unit stride.
Anything else raises ValueError, as a dimension beyond the BLAS's 32-bit
integers does.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..gemm_library import SYMBOLS
from ._jit import INNER

_I8 = ir.IntType(8)
_I32 = ir.IntType(32)
_N, _T = ord("n"), ord("t")
_INT_MAX = 2147483647


def _blas_call(routine, dtype, flags, constants):
    """An intrinsic's codegen calling the Fortran ``routine`` (the dtype's
    letter prepended) with its arguments passed by reference.  The
    intrinsic's first argument only carries the dtype and is not passed;
    then ``flags`` flag characters; then intp values passed as int32, but
    the ones typed ``types.voidptr`` (data addresses), passed as pointers;
    alpha 1 and beta 0 are inserted at the positions ``constants`` names."""
    symbol = SYMBOLS[("s" if dtype == types.float32 else "d") + routine]

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(dtype)

        def on_stack(value):
            slot = cgutils.alloca_once(builder, value.type)
            builder.store(value, slot)
            return slot

        values = []
        for position, (value, kind) in enumerate(zip(args[1:], signature.args[1:])):
            if position < flags:
                values.append(on_stack(builder.trunc(value, _I8)))
            elif kind == types.voidptr:
                values.append(builder.bitcast(value, fty.as_pointer()))
            else:
                values.append(on_stack(builder.trunc(value, _I32)))
        for position, constant in constants:
            values.insert(position, on_stack(ir.Constant(fty, constant)))
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in values])
        variable = builder.module.globals.get(symbol)
        if variable is None:
            variable = ir.GlobalVariable(builder.module, _I8.as_pointer(), symbol)
            variable.linkage = "external"
        builder.call(builder.bitcast(builder.load(variable), fnty.as_pointer()), values)
        return context.get_dummy_value()
    return codegen


@intrinsic
def _address(typingctx, address):
    """An intp address as a ``void *``."""
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(types.intp), codegen


@intrinsic
def _fortran_gemm(typingctx, zero, trans_b, trans_a, n, m, k, b, ldb, a, lda, c, ldc):
    """Column-major c (n x m) = op(b) op(a): ?gemm(tb, ta, n, m, k, 1, b, ldb,
    a, lda, 0, c, ldc), for ``zero``'s dtype (a, b, c: data addresses)."""
    if zero not in (types.float32, types.float64):
        return None
    i, p = types.intp, types.voidptr
    sig = types.void(zero, i, i, i, i, i, p, i, p, i, p, i)
    return sig, _blas_call("gemm", zero, 2, [(5, 1.0), (10, 0.0)])


@intrinsic
def _fortran_gemv(typingctx, zero, trans, rows, cols, a, lda, x, incx, y, incy):
    """Column-major y = op(a) x: ?gemv(t, rows, cols, 1, a, lda, x, incx, 0, y,
    incy), for ``zero``'s dtype (a, x, y: data addresses)."""
    if zero not in (types.float32, types.float64):
        return None
    i, p = types.intp, types.voidptr
    sig = types.void(zero, i, i, i, p, i, p, i, p, i)
    return sig, _blas_call("gemv", zero, 1, [(3, 1.0), (8, 0.0)])


@njit(**INNER)
def _operand(rows, cols, s0, s1, itemsize):
    """(flag, leading dimension) of a row-major operand of ``rows`` x
    ``cols`` and byte strides ``s0``, ``s1`` read column-major: rows of unit
    stride as they are ("n": the read is the operand's transpose), columns
    of unit stride transposed back ("t"); (0, 0) for any other layout."""
    if cols == 1 or s1 == itemsize:
        if rows == 1:
            return _N, max(cols, 1)
        if s0 % itemsize == 0 and s0 >= cols * itemsize:
            return _N, s0 // itemsize
    if rows == 1 or s0 == itemsize:
        if cols == 1:
            return _T, max(rows, 1)
        if s1 % itemsize == 0 and s1 >= rows * itemsize:
            return _T, s1 // itemsize
    return 0, 0


@njit(**INNER)
def _increment(stride, length, itemsize):
    """A vector's BLAS increment: its stride in elements (1 when its length
    leaves the stride unused); 0 when the stride is not a positive whole
    number of elements."""
    if length == 1:
        return 1
    if stride <= 0 or stride % itemsize != 0:
        return 0
    return stride // itemsize


@njit(**INNER)
def _matrix_vector(zero, matrix, rows, cols, s0, s1, x, x_stride, y, y_stride, itemsize):
    """y = matrix @ x through ?gemv (``matrix`` rows x cols of byte strides
    s0, s1; x and y vectors of the given byte strides; all addresses)."""
    trans, ld = _operand(rows, cols, s0, s1, itemsize)
    inc_x = _increment(x_stride, cols, itemsize)
    inc_y = _increment(y_stride, rows, itemsize)
    if trans == 0 or inc_x == 0 or inc_y == 0 or ld > _INT_MAX:
        raise ValueError("gemm: an operand's layout is not one BLAS reads")
    if trans == _N:             # the read is matrix^T (cols x rows)
        _fortran_gemv(zero, _T, cols, rows, _address(matrix), ld, _address(x), inc_x,
                      _address(y), inc_y)
    else:                       # the read is matrix (rows x cols)
        _fortran_gemv(zero, _N, rows, cols, _address(matrix), ld, _address(x), inc_x,
                      _address(y), inc_y)


@njit(**INNER)
def _gemm_at(zero, itemsize, m, k, n, a, a0, a1, b, b0, b1, out, out0, out1):
    """out = a @ b for ``m x k`` a, ``k x n`` b and ``m x n`` out given by
    their data addresses and byte strides (m, n, k all positive; ``zero``
    a value of their dtype, ``itemsize`` its size).  Every layout's logic
    in one compiled function of integers: each operand layout the kernels
    pass then compiles only :func:`gemm`'s few lines, not this again."""
    if max(m, n, k) > _INT_MAX:
        raise ValueError("gemm: a dimension beyond the BLAS's 32-bit integers")
    if n == 1:          # a column: out[:, 0] = a @ b[:, 0]
        _matrix_vector(zero, a, m, k, a0, a1, b, b0, out, out0, itemsize)
        return
    if m == 1:          # a row: out[0] = a[0] @ b, i.e. out^T = b^T a^T
        _matrix_vector(zero, b, n, k, b1, b0, a, a1, out, out1, itemsize)
        return
    trans_a, lda = _operand(m, k, a0, a1, itemsize)
    trans_b, ldb = _operand(k, n, b0, b1, itemsize)
    trans_c, ldc = _operand(m, n, out0, out1, itemsize)
    if trans_a == 0 or trans_b == 0 or trans_c != _N or max(lda, ldb, ldc) > _INT_MAX:
        raise ValueError("gemm: an operand's layout is not one BLAS reads")
    _fortran_gemm(zero, trans_b, trans_a, n, m, k, _address(b), ldb, _address(a), lda,
                  _address(out), ldc)


@njit(**INNER)
def gemm(a, b, out):
    """out = a @ b (see the module's docstring for the layouts)."""
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k or out.shape[0] != m or out.shape[1] != n:
        raise ValueError("gemm: shapes do not match")
    if m == 0 or n == 0:
        return
    if k == 0:
        out[:] = 0
        return
    _gemm_at(out.dtype.type(0), out.itemsize, m, k, n, a.ctypes.data, a.strides[0], a.strides[1],
             b.ctypes.data, b.strides[0], b.strides[1], out.ctypes.data, out.strides[0],
             out.strides[1])
