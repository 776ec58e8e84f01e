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


def _blas_call(routine, dtype, arrays):
    """An intrinsic's typing and codegen calling the Fortran ``routine``
    (the dtype's letter prepended) with its arguments passed by reference:
    ``arrays`` names the positions of the array arguments (their data
    pointers are passed), the others are intp values passed as int32,
    except the leading flag characters; alpha 1 and beta 0 are inserted
    where ``routine`` takes them."""
    symbol = SYMBOLS[("s" if dtype == types.float32 else "d") + routine]

    def codegen(context, builder, signature, args):
        fty = context.get_value_type(dtype)

        def on_stack(value):
            slot = cgutils.alloca_once(builder, value.type)
            builder.store(value, slot)
            return slot

        flags, values = arrays[0], []
        for position, (value, kind) in enumerate(zip(args, signature.args)):
            if position < flags:
                values.append(on_stack(builder.trunc(value, _I8)))
            elif isinstance(kind, types.Array):
                data = context.make_array(kind)(context, builder, value).data
                values.append(builder.bitcast(data, fty.as_pointer()))
            else:
                values.append(on_stack(builder.trunc(value, _I32)))
        for position, constant in arrays[1]:
            values.insert(position, on_stack(ir.Constant(fty, constant)))
        fnty = ir.FunctionType(ir.VoidType(), [v.type for v in values])
        variable = builder.module.globals.get(symbol)
        if variable is None:
            variable = ir.GlobalVariable(builder.module, _I8.as_pointer(), symbol)
            variable.linkage = "external"
        builder.call(builder.bitcast(builder.load(variable), fnty.as_pointer()), values)
        return context.get_dummy_value()
    return codegen


def _same_float(*arrays):
    dtype = arrays[0].dtype
    return dtype in (types.float32, types.float64) and all(a.dtype == dtype for a in arrays)


@intrinsic
def _fortran_gemm(typingctx, trans_b, trans_a, n, m, k, b, ldb, a, lda, c, ldc):
    """Column-major c (n x m) = op(b) op(a): ?gemm(tb, ta, n, m, k, 1, b, ldb,
    a, lda, 0, c, ldc)."""
    if not _same_float(c, a, b):
        return None
    sig = types.void(types.intp, types.intp, types.intp, types.intp, types.intp, b,
                     types.intp, a, types.intp, c, types.intp)
    return sig, _blas_call("gemm", c.dtype, (2, [(5, 1.0), (10, 0.0)]))


@intrinsic
def _fortran_gemv(typingctx, trans, rows, cols, a, lda, x, incx, y, incy):
    """Column-major y = op(a) x: ?gemv(t, rows, cols, 1, a, lda, x, incx, 0, y,
    incy)."""
    if not _same_float(y, a, x):
        return None
    sig = types.void(types.intp, types.intp, types.intp, a, types.intp, x, types.intp, y,
                     types.intp)
    return sig, _blas_call("gemv", y.dtype, (1, [(3, 1.0), (8, 0.0)]))


@njit(**INNER)
def _operand(x, cols, itemsize):
    """(flag, leading dimension) of a row-major operand of ``cols`` columns
    read column-major: rows of unit stride as they are ("n": the read is
    the operand's transpose), columns of unit stride transposed back ("t");
    (0, 0) for any other layout."""
    rows = x.shape[0]
    s0, s1 = x.strides
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
def _matrix_vector(matrix, x, x_stride, y, y_stride, itemsize):
    """y = matrix @ x through ?gemv, x and y vectors of the given strides."""
    rows, cols = matrix.shape
    trans, ld = _operand(matrix, cols, itemsize)
    inc_x = _increment(x_stride, cols, itemsize)
    inc_y = _increment(y_stride, rows, itemsize)
    if trans == 0 or inc_x == 0 or inc_y == 0 or ld > _INT_MAX:
        raise ValueError("gemm: an operand's layout is not one BLAS reads")
    if trans == _N:             # the read is matrix^T (cols x rows)
        _fortran_gemv(_T, cols, rows, matrix, ld, x, inc_x, y, inc_y)
    else:                       # the read is matrix (rows x cols)
        _fortran_gemv(_N, rows, cols, matrix, ld, x, inc_x, y, inc_y)


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
    if max(m, n, k) > _INT_MAX:
        raise ValueError("gemm: a dimension beyond the BLAS's 32-bit integers")
    itemsize = out.itemsize
    if n == 1:          # a column: out[:, 0] = a @ b[:, 0]
        _matrix_vector(a, b, b.strides[0], out, out.strides[0], itemsize)
        return
    if m == 1:          # a row: out[0] = a[0] @ b, i.e. out^T = b^T a^T
        _matrix_vector(b.T, a, a.strides[1], out, out.strides[1], itemsize)
        return
    trans_a, lda = _operand(a, k, itemsize)
    trans_b, ldb = _operand(b, n, itemsize)
    trans_c, ldc = _operand(out, n, itemsize)
    if trans_a == 0 or trans_b == 0 or trans_c != _N or max(lda, ldb, ldc) > _INT_MAX:
        raise ValueError("gemm: an operand's layout is not one BLAS reads")
    _fortran_gemm(trans_b, trans_a, n, m, k, b, ldb, a, lda, out, ldc)
