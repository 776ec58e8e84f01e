"""CUDA launch limits: kernels whose grid grows with the rows stride over
them, and every launch is checked against the device's limits first.

CUDA launches at most 65535 blocks in grid y.  ``fg_bias_act_grad`` (64 rows
a block) and the own GEMM (64-row tiles) put the rows on grid y, so past
~4.19 M rows they need more blocks than a launch can have: their wrappers
cap grid y at ``_module.MAX_GRID_Y`` and the kernels loop over the row
blocks.  The tests lower ``MAX_GRID_Y`` to 2 or 3 -- a device whose grid y
stops there, enforced by the launch check, which reads the same constant --
so shapes of a few hundred rows reach the loop; the results must match the
float64 reference and be bitwise those of the uncapped launch (the
partial-sum layout does not depend on the grid).
"""
import numpy as np
import pytest

from fastgrad import ops, reference
from fastgrad.kernels.cpu.activations import CODES

from conftest import ACTIVATIONS, DTYPES, assert_close, rtol_of, to_numpy


def _ids(values):
    return [np.dtype(v).name for v in values]


@pytest.fixture
def mod(kc):
    from fastgrad.kernels.cuda import _module
    return _module


# (rows, cols, grid y limit): row blocks of 64 > the limit, with and without
# a remainder, odd column counts over one and several 32-column blocks.
GRAD_SHAPES = [(453, 37, 3), (129, 5, 2), (385, 1, 3), (64 * 4, 33, 2)]


@pytest.mark.cuda
@pytest.mark.parametrize("with_db", [True, False], ids=["db", "no_db"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("rows,cols,max_y", GRAD_SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_grad_strides_over_row_blocks(cuda_be, kc, mod, rng, monkeypatch, activation,
                                               rows, cols, max_y, dtype, with_db):
    code = CODES[activation]
    alpha = ops.resolve_activation(activation)[1]
    z = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
    a = reference.activation(z, activation, alpha).astype(dtype)
    da = rng.standard_normal((rows, cols)).astype(dtype)
    dz_ref = da.astype(np.float64) * reference.activation_grad(z, activation, alpha)
    zg, ag, dag = cuda_be.to_device(z), cuda_be.to_device(a), cuda_be.to_device(da)

    def run():
        dz = cuda_be.alloc((rows, cols), dtype, fill=np.nan)
        db = cuda_be.alloc(cols, dtype, fill=np.nan) if with_db else None
        kc.bias_act_grad(dag, ag, zg, dz, db, code, alpha)
        return to_numpy(dz), None if db is None else to_numpy(db)

    dz_full, db_full = run()                  # one block per row block
    monkeypatch.setattr(mod, "MAX_GRID_Y", max_y)
    dz, db = run()                            # max_y blocks loop over them
    d_atol = rtol_of(dtype) * float((np.abs(da) * (1 + np.abs(z))).max())
    assert_close(dz, dz_ref, dtype, atol=d_atol, what=f"{activation} dz vs reference")
    np.testing.assert_array_equal(dz, dz_full)
    if with_db:
        db_atol = rtol_of(dtype) * float((np.abs(da) * (1 + np.abs(z))).sum(axis=0).max())
        assert_close(db, dz_ref.sum(axis=0), dtype, atol=db_atol,
                     what=f"{activation} db vs reference")
        np.testing.assert_array_equal(db, db_full)
    # in place (dz is da), with a caller's partials buffer
    dai = cuda_be.to_device(da)
    db2 = cuda_be.alloc(cols, dtype) if with_db else None
    shape = kc.activations.grad_partials_shape(rows, cols) if with_db else None
    work = None if shape is None else cuda_be.alloc(shape, dtype, fill=np.nan)
    kc.bias_act_grad(dai, ag, zg, dai, db2, code, alpha, work=work)
    np.testing.assert_array_equal(to_numpy(dai), dz)
    if with_db:
        np.testing.assert_array_equal(to_numpy(db2), db)


GEMM_SHAPES = [(327, 19, 65, 3), (129, 1, 3, 2), (200, 33, 17, 2)]    # M, K, N, grid y limit


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("M,K,N,max_y", GEMM_SHAPES)
def test_own_gemm_strides_over_row_tiles(cuda_be, mod, rng, monkeypatch, M, K, N, max_y, dtype):
    """a @ b, a.T @ b and a @ b.T with more 64-row tiles than grid y allows."""
    from fastgrad.kernels.cuda.gemm import gemm
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 1e-13
    cases = {"a @ b": (cuda_be.to_device(a), cuda_be.to_device(b)),
             "a.T @ b": (cuda_be.to_device(a.T.copy()).T, cuda_be.to_device(b)),
             "a @ b.T": (cuda_be.to_device(a), cuda_be.to_device(b.T.copy()).T)}
    full = {}
    for what, (ad, bd) in cases.items():
        full[what] = to_numpy(gemm(ad, bd, cuda_be.alloc((M, N), dtype, fill=np.nan)))
    monkeypatch.setattr(mod, "MAX_GRID_Y", max_y)
    for what, (ad, bd) in cases.items():
        out = to_numpy(gemm(ad, bd, cuda_be.alloc((M, N), dtype, fill=np.nan)))
        np.testing.assert_allclose(out, ref, rtol=tol, atol=tol * np.sqrt(K) * 4, err_msg=what)
        np.testing.assert_array_equal(out, full[what], err_msg=what)


# --- the launch check ------------------------------------------------------------------

class _Spy:
    """Stands in for a compiled kernel: records the launches that reach it."""

    def __init__(self):
        self.launches = []
        self.attribute = "of the kernel"

    def __call__(self, grid, block, args, **kwargs):
        self.launches.append((grid, block, args, kwargs))


BAD_LAUNCHES = [
    ((2**31,), (256,), "grid x must be in \\[1, 2147483647\\], got 2147483648"),
    ((1, 65536), (256,), "grid y must be in \\[1, 65535\\], got 65536"),
    ((1, 1, 65536), (256,), "grid z must be in \\[1, 65535\\], got 65536"),
    ((0,), (256,), "grid x must be in \\[1, 2147483647\\], got 0"),
    ((4, 0), (32, 8), "grid y must be in \\[1, 65535\\], got 0"),
    ((1,), (1025,), "block x must be in \\[1, 1024\\], got 1025"),
    ((1,), (1, 1025), "block y must be in \\[1, 1024\\], got 1025"),
    ((1,), (1, 1, 65), "block z must be in \\[1, 64\\], got 65"),
    ((1,), (0,), "block x must be in \\[1, 1024\\], got 0"),
    ((1,), (32, 33), "at most 1024 threads, got 32 x 33 x 1 = 1056"),
    ((1,), (16, 16, 8), "at most 1024 threads, got 16 x 16 x 8 = 2048"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("grid,block,message", BAD_LAUNCHES)
def test_launch_check_refuses_before_launching(cuda_be, mod, grid, block, message):
    spy = _Spy()
    k = mod.CheckedKernel(spy, "fg_spy<float, 1>")
    with pytest.raises(ValueError, match=message) as info:
        k(grid, block, ())
    assert "fg_spy<float, 1>" in str(info.value)
    assert spy.launches == []


@pytest.mark.cuda
def test_launch_check_passes_the_limits_themselves(cuda_be, mod):
    spy = _Spy()
    k = mod.CheckedKernel(spy, "fg_spy")
    ok = [((2**31 - 1, 65535, 65535), (1024,)), ((1,), (1, 1024)), ((1,), (16, 1, 64)),
          ((7,), (256,)), ((np.int64(5),), (np.int32(256),))]
    for grid, block in ok:
        k(grid, block, ("x",), shared_mem=0)
    assert [(g, b) for g, b, _, _ in spy.launches] == ok
    assert spy.launches[0][2:] == (("x",), {"shared_mem": 0})
    assert k.attribute == "of the kernel"         # other attributes pass through
    with pytest.raises(ValueError, match="1 to 3 components"):
        k((1, 1, 1, 1), (32,), ())
    # CuPy's Function.__call__ takes tuples only (tuple grid, tuple block)
    for grid, block, what in ((7, (256,), "grid"), ((7,), 256, "block"),
                              ([3, 2], (32, 8), "grid"), ((3,), [32, 8], "block")):
        with pytest.raises(TypeError, match=f"Argument '{what}' has incorrect type"):
            k(grid, block, ())
    assert len(spy.launches) == len(ok)


@pytest.mark.cuda
def test_every_loaded_kernel_is_checked(cuda_be, mod):
    """kernel() hands out checked kernels: an oversized grid of a real
    kernel raises the clear error (the arguments are never looked at)."""
    k = mod.kernel("activations.cu", "fg_colsum<float>")
    assert isinstance(k, mod.CheckedKernel)
    with pytest.raises(ValueError, match=r"fg_colsum<float>.*grid y must be in \[1, 65535\]"):
        k((1, 70000), (256,), ())


@pytest.mark.cuda
def test_grids_growing_with_rows_elsewhere_fail_clearly(cuda_be, mod, monkeypatch):
    """The kernels that are not grid-stride in y refuse clearly past the
    limit: the column-sum passes (col_grid) and the per-layer norm (one
    row of blocks per layer)."""
    from fastgrad.kernels.cuda import blocks, reduce
    monkeypatch.setattr(mod, "MAX_GRID_Y", 2)
    with pytest.raises(ValueError, match="column sums over 129 rows: at most 128 supported"):
        blocks.col_partials_size(129, 5)
    g = cuda_be.alloc(10, np.float32, fill=1)
    offsets = np.array([0, 2, 4, 6, 10], np.int64)          # 4 layers on grid y
    with pytest.raises(ValueError, match=r"fg_seg_sumsq_partial<float>.*grid y .* got 4"):
        reduce.layer_sumsq(g, offsets, cuda_be.alloc(4, np.float64))


@pytest.mark.cuda
def test_wrappers_cap_grid_y_at_the_real_limit(cuda_be, kc, mod, monkeypatch):
    """Shapes past 65535 row blocks (4194305 rows): the launches the
    wrappers ask for stay inside CUDA's limits (recorded, not run: the
    emulator would take hours over 65535 blocks)."""
    from fastgrad.kernels.cuda.gemm import gemm
    spy = _Spy()
    monkeypatch.setattr(mod, "kernel", lambda filename, name: mod.CheckedKernel(spy, name))
    rows = 65535 * 64 + 1
    x = cuda_be.alloc((rows, 1), np.float32, fill=0)
    kc.bias_act_grad(x, x, x, x, cuda_be.alloc(1, np.float32, fill=0), CODES["relu"], 0.0)
    gemm(x, cuda_be.alloc((1, 3), np.float32, fill=0),
         cuda_be.alloc((rows, 3), np.float32, fill=0))
    grids = [g for g, _, _, _ in spy.launches]
    assert grids == [(1, 65535), (1,), (1, 65535)]       # grad, its column sums, GEMM


@pytest.mark.cuda
def test_checked_kernel_copies(cuda_be, mod):
    import copy
    k = mod.CheckedKernel(_Spy(), "fg_spy")
    k2 = copy.copy(k)
    assert k2.name == "fg_spy" and k2.attribute == "of the kernel"
