"""The kernels' GEMM (kernels/cpu/gemm.py) against the float64 reference and
Numba's np.dot, on every layout the kernels pass, odd and degenerate sizes;
its refusals; and the library address it reads at each call."""
import ctypes

import numpy as np
import pytest
from numba import njit, types

from fastgrad.kernels import gemm_library
from fastgrad.kernels.cpu import gemm as gemm_module
from fastgrad.kernels.cpu.gemm import gemm


@njit
def _gemm(a, b, out):
    gemm(a, b, out)


@njit
def _numba_dot(a, b, out):
    np.dot(a, b, out)


def _operand(rng, rows, cols, dtype, layout):
    """A rows x cols operand: "C" contiguous, "T" the transpose of a
    C-contiguous array, "block" a block of columns of a wider C array."""
    if layout == "T":
        return rng.standard_normal((cols, rows)).astype(dtype).T
    if layout == "block":
        return rng.standard_normal((rows, cols + 3)).astype(dtype)[:, 1:cols + 1]
    return rng.standard_normal((rows, cols)).astype(dtype)


SIZES = [(1, 1, 1), (1, 9, 3), (7, 13, 1), (5, 1, 6), (1, 7, 1), (33, 17, 65), (64, 128, 31)]
LAYOUTS = ["C", "T", "block"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,n", SIZES)
def test_gemm_matches_the_float64_reference_and_numba_dot(rng, dtype, m, k, n):
    tol = 1e-5 if dtype == np.float32 else 1e-13
    for layout_a in LAYOUTS:
        for layout_b in LAYOUTS:
            a = _operand(rng, m, k, dtype, layout_a)
            b = _operand(rng, k, n, dtype, layout_b)
            out = np.full((m, n), np.nan, dtype)
            _gemm(a, b, out)
            want = a.astype(np.float64) @ b.astype(np.float64)
            scale = np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64)
            assert np.all(np.abs(out - want) <= tol * scale), (layout_a, layout_b)
            if layout_a != "block" and layout_b != "block" and not (m == 1 and n == 1):
                # the calls of Numba's np.dot (which takes no column blocks
                # and takes dot for a single value): bitwise its results
                dot = np.empty_like(out)
                _numba_dot(a, b, dot)
                np.testing.assert_array_equal(out, dot)


def test_gemm_writes_a_block_of_columns_of_out(rng):
    a, b = _operand(rng, 9, 5, np.float32, "C"), _operand(rng, 5, 4, np.float32, "T")
    wide = np.full((9, 7), 7.0, np.float32)
    _gemm(a, b, wide[:, 2:6])
    np.testing.assert_allclose(wide[:, 2:6], a @ b, rtol=1e-5)
    assert np.all(wide[:, :2] == 7.0) and np.all(wide[:, 6:] == 7.0)


@pytest.mark.parametrize("m,k,n", [(0, 3, 4), (3, 0, 4), (3, 4, 0)])
def test_gemm_of_empty_operands(m, k, n):
    out = np.full((m, n), np.nan, np.float32)
    _gemm(np.ones((m, k), np.float32), np.ones((k, n), np.float32), out)
    assert np.all(out == 0)


def test_gemm_refuses_layouts_and_shapes_blas_cannot_read():
    a = np.ones((6, 8), np.float32)
    with pytest.raises(ValueError, match="layout"):
        _gemm(a[:, ::2], np.ones((4, 3), np.float32), np.empty((6, 3), np.float32))
    with pytest.raises(ValueError, match="layout"):
        _gemm(a, np.ones((8, 3), np.float32), np.empty((3, 6), np.float32).T)
    with pytest.raises(ValueError, match="shapes"):
        _gemm(a, np.ones((7, 3), np.float32), np.empty((6, 3), np.float32))
    with pytest.raises(ValueError, match="shapes"):
        _gemm(a, np.ones((8, 3), np.float32), np.empty((6, 4), np.float32))


def test_every_layout_shares_one_compiled_gemm_core(rng):
    """gemm's logic is compiled once per dtype, whatever the operands'
    layouts (each layout compiles only gemm's few lines: a cold first step
    compiled the whole of it for each of its three, ~0.6 s)."""
    for layout_a in LAYOUTS:
        for layout_b in LAYOUTS:
            a = _operand(rng, 6, 5, np.float32, layout_a)
            b = _operand(rng, 5, 4, np.float32, layout_b)
            out = np.empty((6, 4), np.float32)
            _gemm(a, b, out)
            np.testing.assert_allclose(out, a @ b, rtol=1e-5)
    core = [sig for sig in gemm_module._gemm_at.signatures if sig[0] == types.float32]
    assert len(core) == 1, core


def test_gemm_reads_the_library_address_at_each_call(rng):
    """A compiled kernel follows gemm_library.set_gemm: point sgemm at a
    Fortran-convention stand-in that records its arguments, then back."""
    seen = []
    c_int_p, c_float_p = ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_float)
    prototype = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, c_int_p, c_int_p,
                                 c_int_p, c_float_p, c_float_p, c_int_p, c_float_p, c_int_p,
                                 c_float_p, c_float_p, c_int_p)

    def stand_in(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        seen.append((ta[:1], tb[:1], m[0], n[0], k[0], lda[0], ldb[0], ldc[0]))
        for i in range(m[0] * n[0]):
            c[i] = 42.0

    callback = prototype(stand_in)
    before = gemm_library.gemm_addresses()
    x, w = _operand(rng, 5, 3, np.float32, "C"), _operand(rng, 3, 4, np.float32, "T")
    out = np.empty((5, 4), np.float32)
    try:
        gemm_library.set_gemm(dict(before, sgemm=ctypes.cast(callback, ctypes.c_void_p).value))
        _gemm(x, w, out)
    finally:
        gemm_library.set_gemm(before)
    # out^T = w^T x^T column-major: w (a transpose) read back with "t"
    assert seen == [(b"t", b"n", 4, 5, 3, 3, 3, 4)]
    assert np.all(out == 42.0)
    _gemm(x, w, out)
    np.testing.assert_allclose(out, x @ w, rtol=1e-5)
    assert len(seen) == 1


def test_set_gemm_refuses_a_missing_routine():
    with pytest.raises(ValueError, match="sgemv"):
        gemm_library.set_gemm({"sgemm": 1, "dgemm": 1, "dgemv": 1})
