"""The explosion-toolkit CUDA kernels (``fastgrad.kernels.cuda`` blocks, norm,
wnorm) against their CPU twins on the same inputs.

Every test needs CuPy and a GPU (the ``cuda`` marker: skipped otherwise).
Tolerances: conftest.RTOL (float32 1e-5, float64 1e-12), with absolute
tolerances scaled by the magnitudes of the terms that a sum or a product
adds up (a column sum that cancels to ~0 is compared to the size of its
terms, not to itself).  The dropout mask is compared bit for bit: the GPU
must drop exactly the units the CPU drops.
"""
import numpy as np
import pytest

from fastgrad import ops, reference
from fastgrad.backend import backend_for
from fastgrad.kernels.cpu import blocks as cpu_blocks
from fastgrad.kernels.cpu import norm as cpu_norm
from fastgrad.kernels.cpu import wnorm as cpu_wnorm

from conftest import ACTIVATIONS, DTYPES, assert_close, dense_inputs, rtol_of, to_numpy

pytestmark = pytest.mark.cuda

LAYER, BATCH = cpu_norm.LAYER, cpu_norm.BATCH
# (B, n): B in {1, 3, 17, 130} (130 spans three row blocks of the column
# sums, 17 one), n in {1, 5, 129} (129 spans five column tiles of 32).
_CPU = backend_for("cpu")
SHAPES = [(1, 5), (3, 1), (17, 129), (130, 5), (130, 129)]
MASK_SHAPES = [(1, 1), (3, 5), (17, 129), (130, 129), (1000, 1000)]
WN_SHAPES = [(1, 1), (3, 5), (17, 129), (130, 5), (129, 17)]      # (n_in, n_out)
DROP_RESIDUAL = [(False, False), (True, False), (False, True), (True, True)]
_DR_IDS = [("drop" if d else "nodrop") + ("-res" if r else "") for d, r in DROP_RESIDUAL]
P_DROP = 0.3


def _ids(values):
    return [np.dtype(v).name if isinstance(v, type) else
            "x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values]


def _dropout(rng, drop):
    """(key, thresh, scale) of a random (seed, layer, counter), p = P_DROP
    when ``drop`` (the key is a real one either way: unused without drop)."""
    seed, layer, counter = int(rng.integers(2 ** 63)), int(rng.integers(8)), int(rng.integers(999))
    p = P_DROP if drop else 0.0
    return (np.uint64(cpu_blocks.dropout_key(seed, layer, counter)),
            cpu_blocks.dropout_threshold(p), 1.0 / (1.0 - p))


def _kept(key, thresh, shape):
    """The CPU's keep-mask as booleans."""
    out = np.empty(shape)
    cpu_blocks.dropout_mask(key, thresh, out)
    return out != 0


def _check_dropped(y_gpu, y_cpu, x, kept, residual, what):
    """Both devices drop the units the mask drops: y is exactly 0 there (x
    for a residual block, the skip path).  (Kept units are compared with a
    tolerance by the caller; they may be 0 on one device only, where f
    underflows, e.g. gelu(-5) with the CPU's float32 polynomial tanh.)"""
    y_gpu = to_numpy(y_gpu)
    want = np.broadcast_to(x[~kept] if residual else 0, y_cpu[~kept].shape)
    assert np.array_equal(y_cpu[~kept], want), f"{what}: CPU keeps a dropped unit"
    assert np.array_equal(y_gpu[~kept], want), f"{what}: GPU keeps a dropped unit"


def _grad_terms(activation, alpha, pre, da, kept, scale):
    """|da * mask * scale| times the size of f'(pre): |f'| itself, or 1 + |pre|
    for gelu, gelu_tanh and silu, whose derivatives are sums of terms of that
    size that cancel near pre = -0.75 (gelu) and -1.28 (silu), where float32 libm and
    the CPU's polynomial tanh / exp then differ by far more than rtol
    relative to the small result."""
    if activation in ("gelu", "gelu_tanh", "silu"):
        d = 1.0 + np.abs(pre)
    else:
        d = np.abs(reference.activation_grad(pre, activation, alpha))
    return np.maximum(np.abs(da * np.where(kept, scale, 0.0)) * d, 1e-300)


# --- the dropout mask ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=_ids(MASK_SHAPES))
def test_dropout_mask_identical_on_both_devices(cuda_be, kc, rng, shape, dtype):
    """The GPU's mask is the CPU's bit for bit, for several (seed, layer,
    counter, p) -- keys of all 64 bits, p = 0 (keep all) and p = 1 (drop all)."""
    assert kc.dropout_threshold is cpu_blocks.dropout_threshold
    cases = [(0, 0, 0, 0.5), (12345, 1, 7, 0.1),      # the second's key is >= 2**63
             (2 ** 63 - 1, 9, 2 ** 40, 0.9),
             (int(rng.integers(2 ** 63)), 3, 41, 0.37), (int(rng.integers(2 ** 63)), 0, 1, 1e-3),
             (77, 2, 3, 0.0), (78, 2, 3, 1.0)]
    for seed, layer, counter, p in cases:
        assert int(kc.dropout_key(seed, layer, counter)) == int(cpu_blocks.dropout_key(seed, layer, counter))
        key = np.uint64(cpu_blocks.dropout_key(seed, layer, counter))
        thresh = cpu_blocks.dropout_threshold(p)
        out_c = np.empty(shape, dtype)
        cpu_blocks.dropout_mask(key, thresh, out_c)
        out_g = cuda_be.alloc(shape, dtype)
        kc.dropout_mask(key, thresh, out_g)
        what = f"seed {seed} layer {layer} counter {counter} p {p}"
        assert np.array_equal(to_numpy(out_g), out_c), f"{what}: masks differ"
        np.testing.assert_array_equal(
            out_c, reference.dropout_mask(seed, layer, counter, shape, p), err_msg=what)
        if p == 1.0 or shape[0] > 130:
            continue
        # the block forward zeroes exactly the masked units on both devices:
        # identity of ones, so y is scale where kept and 0 where dropped
        outs = []
        for be, k in ((_CPU, cpu_blocks), (cuda_be, kc)):
            # x, z, fz: not read
            y, unused = be.alloc(shape, dtype, fill=1), be.alloc(shape, dtype, fill=0)
            k.block_forward_epilogue(y, be.alloc(shape[1], dtype, fill=0), unused, unused, unused,
                                     0, 0.0, True, key, thresh, 1.0 / (1.0 - p), False)
            assert not to_numpy(unused).any(), "z or fz written by a non-gelu, non-residual layer"
            outs.append(to_numpy(y))
        assert np.array_equal(outs[0] == 0, out_c == 0), f"{what}: CPU forward vs its mask"
        assert np.array_equal(outs[1], outs[0]), f"{what}: forward outputs differ"


# --- dropout / residual blocks ---------------------------------------------------------

def _block_forward(be, k, x, W, b, code, alpha, drop, key, thresh, scale, residual):
    """(y, z, fz) of k.block_forward, fz as backward takes it: f(z) for a
    residual block, else the output y (the forward writes fz only when
    residual)."""
    y = be.alloc((x.shape[0], W.shape[1]), x.dtype)
    z, fz = be.alloc(y.shape, y.dtype, fill=0), be.alloc(y.shape, y.dtype, fill=0)
    k.block_forward(x, W, b, z, fz, y, code, alpha, drop, key, thresh, scale, residual)
    return y, z, fz if residual else y


def _block_backward(be, k, x, W, fz, z, da, code, alpha, drop, key, thresh, scale, residual):
    """(dz, dW, db, dx) of k.block_backward; dz is da itself unless residual."""
    da = da.copy()
    dz = be.alloc(da.shape, da.dtype) if residual else da
    dW, db = be.alloc(W.shape, W.dtype), be.alloc(W.shape[1], W.dtype)
    dx = be.alloc(x.shape, x.dtype)
    k.block_backward(x, W, fz, z, da, dz, dW, db, dx, code, alpha, drop, key, thresh, scale,
                     residual, True)
    return dz, dW, db, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("drop,residual", DROP_RESIDUAL, ids=_DR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_block_matches_cpu(cuda_be, kc, rng, activation, shape, drop, residual, dtype):
    B, n = shape
    code, alpha = ops.resolve_activation(activation)
    x, W, b = dense_inputs(rng, B, n if residual else 7, n, dtype)     # exact GEMM
    key, thresh, scale = _dropout(rng, drop)
    args = (code, alpha, drop, key, thresh, scale, residual)
    y_c, z_c, fz_c = _block_forward(_CPU, cpu_blocks, x, W, b, *args)
    y_g, z_g, fz_g = _block_forward(cuda_be, kc, *(cuda_be.to_device(a) for a in (x, W, b)), *args)
    r = rtol_of(dtype)
    t_ref = x.astype(np.float64) @ W + b
    atol = r * max(1.0, float(np.abs(t_ref).max()) + (float(np.abs(x).max()) if residual else 0))
    assert_close(y_g, y_c, dtype, atol=atol, what=f"{activation} y")
    if code in kc.NEEDS_Z:
        assert_close(z_g, z_c, dtype, what="z")
    if residual:
        assert_close(fz_g, fz_c, dtype, atol=atol, what="f(z)")
    if drop:
        _check_dropped(y_g, y_c, x, _kept(key, thresh, y_c.shape), residual, activation)

    # backward from the same (CPU) forward state on both devices
    da = rng.standard_normal((B, n)).astype(dtype)
    dz_c, dW_c, db_c, dx_c = _block_backward(_CPU, cpu_blocks, x, W, fz_c, z_c, da, *args)
    dz_g, dW_g, db_g, dx_g = _block_backward(cuda_be, kc, *(cuda_be.to_device(a) for a in
                                                         (x, W, fz_c, z_c, da)), *args)
    kept = _kept(key, thresh, da.shape) if drop else np.ones(da.shape, bool)
    dza = _grad_terms(activation, alpha, t_ref, da, kept, scale)
    assert_close(dz_g, dz_c, dtype, atol=r * dza.max(), what=f"{activation} dz")
    assert_close(db_g, db_c, dtype, atol=r * dza.sum(axis=0).max(), what="db")
    assert_close(dW_g, dW_c, dtype, atol=r * (np.abs(x).T @ dza).max(), what="dW")
    dxa = dza @ np.abs(W).T + (np.abs(da) if residual else 0)
    assert_close(dx_g, dx_c, dtype, atol=r * dxa.max(), what="dx")
    assert not to_numpy(dz_g)[~kept].any(), "a dropped unit passed gradient"


# --- layer norm / batch norm -----------------------------------------------------------

MODES = {"layer": (LAYER, True), "batch": (BATCH, True), "batch_eval": (BATCH, False)}


def _norm_inputs(rng, B, n, dtype):
    # a GEMM output with an offset (the shifted one-pass variance's case)
    y0 = (rng.standard_normal((B, n)) * 2 + 3).astype(dtype)
    b = rng.uniform(-1, 1, n).astype(dtype)
    x = rng.standard_normal((B, n)).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, n).astype(dtype)
    beta = rng.uniform(-0.5, 0.5, n).astype(dtype)
    run_mean = rng.standard_normal(n)
    run_var = rng.uniform(0.5, 2.0, n)
    return y0, b, x, gamma, beta, run_mean, run_var


def _norm_forward(be, k, y0, b, x, gamma, beta, run_mean, run_var, kind, batch_stats, *args):
    """Everything k.norm_forward_epilogue writes, as a dict."""
    B, n = y0.shape
    y = y0.copy()
    # fz: written when residual only
    xhat, fz = be.alloc(y.shape, y.dtype), be.alloc(y.shape, y.dtype, fill=0)
    ns = B if kind == LAYER else n
    mean, rstd = be.alloc(ns, y.dtype), be.alloc(ns, y.dtype)
    acc = be.alloc(2 * n, np.float64)
    rm, rv = run_mean.copy(), run_var.copy()
    k.norm_forward_epilogue(y, b, x, xhat, fz, gamma, beta, mean, rstd, acc, rm, rv, kind,
                            batch_stats, *args)
    return dict(y=y, xhat=xhat, fz=fz, mean=mean, rstd=rstd, run_mean=rm, run_var=rv)


def _norm_backward(be, k, da, fz, xhat, gamma, beta, rstd, kind, batch_stats, *args):
    """(dz, db, dgamma, dbeta) of k.norm_backward_epilogue; dz is da unless residual."""
    B, n = da.shape
    residual = args[-1]
    da = da.copy()
    dz = be.alloc(da.shape, da.dtype) if residual else da
    db, dgamma, dbeta = (be.alloc(n, da.dtype) for _ in range(3))
    r1, r2 = be.alloc(B, np.float64), be.alloc(B, np.float64)
    k.norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta, r1, r2, kind,
                             batch_stats, *args)
    return dz, db, dgamma, dbeta


def _norm_backward_scales(activation, alpha, kind, batch_stats, da, kept, scale, xhat, gamma,
                          beta, rstd):
    """Magnitudes of the backward's terms: (columns sums of pass 1, dz, db)."""
    xh = xhat.astype(np.float64)
    g = np.abs(gamma.astype(np.float64))
    rs = np.abs(rstd.astype(np.float64))
    u = gamma.astype(np.float64) * xh + beta
    t = _grad_terms(activation, alpha, u, da, kept, scale)
    B, n = t.shape
    cols = (t * (1 + np.abs(xh))).sum(axis=0).max()
    if kind == LAYER:
        tg = t * g
        dz = rs[:, None] * (tg + (tg.sum(axis=1, keepdims=True)
                                  + np.abs(xh) * (tg * np.abs(xh)).sum(axis=1, keepdims=True)) / n)
    elif batch_stats:
        dz = rs * g * (t + (t.sum(axis=0) + np.abs(xh) * (t * np.abs(xh)).sum(axis=0)) / B)
    else:
        dz = rs * g * t
    return max(cols, 1e-300), max(dz.max(), 1e-300), max(dz.sum(axis=0).max(), 1e-300)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("drop,residual", DROP_RESIDUAL, ids=_DR_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_norm_matches_cpu(cuda_be, kc, rng, activation, mode, shape, drop, residual, dtype):
    kind, batch_stats = MODES[mode]
    B, n = shape
    if mode == "batch" and B == 1:
        pytest.skip("batch norm in training needs more than one row")
    code, alpha = ops.resolve_activation(activation)
    inputs = _norm_inputs(rng, B, n, dtype)
    key, thresh, scale = _dropout(rng, drop)
    args = (kind, batch_stats, code, alpha, drop, key, thresh, scale, residual)
    out_c = _norm_forward(_CPU, cpu_norm, *inputs, *args)
    out_g = _norm_forward(cuda_be, kc, *(cuda_be.to_device(a) for a in inputs), *args)
    r = rtol_of(dtype)
    for name in ("mean", "rstd", "xhat"):
        assert_close(out_g[name], out_c[name], dtype, what=f"{mode} {name}")
    x = inputs[2]
    atol = r * max(1.0, 2.0 * float(np.abs(out_c["xhat"]).max())
                   + (float(np.abs(x).max()) if residual else 0.0))
    assert_close(out_g["y"], out_c["y"], dtype, atol=atol, what=f"{mode} {activation} y")
    if residual:
        assert_close(out_g["fz"], out_c["fz"], dtype, atol=atol, what="f(u)")
    else:
        assert not to_numpy(out_g["fz"]).any(), "fz written by a non-residual layer"
    run_mean, run_var = inputs[5], inputs[6]
    if mode == "batch":
        assert_close(out_g["run_mean"], out_c["run_mean"], dtype, what="running mean")
        assert_close(out_g["run_var"], out_c["run_var"], dtype, what="running var")
    else:                                   # untouched on both devices
        assert np.array_equal(to_numpy(out_g["run_mean"]), run_mean)
        assert np.array_equal(to_numpy(out_g["run_var"]), run_var)
        assert np.array_equal(out_c["run_mean"], run_mean)
    kept = _kept(key, thresh, (B, n)) if drop else np.ones((B, n), bool)
    if drop:
        _check_dropped(out_g["y"], out_c["y"], x, kept, residual, f"{mode} {activation}")

    # backward from the same (CPU) forward state on both devices
    gamma, beta = inputs[3], inputs[4]
    fz = out_c["fz"] if residual else out_c["y"]
    state = (fz, out_c["xhat"], gamma, beta, out_c["rstd"])
    da = rng.standard_normal((B, n)).astype(dtype)
    dz_c, db_c, dg_c, dbt_c = _norm_backward(_CPU, cpu_norm, da, *state, *args)
    dz_g, db_g, dg_g, dbt_g = _norm_backward(cuda_be, kc, *(cuda_be.to_device(a)
                                                            for a in (da,) + state), *args)
    cols, dz_mag, db_mag = _norm_backward_scales(activation, alpha, kind, batch_stats, da, kept,
                                                 scale, out_c["xhat"], gamma, beta, out_c["rstd"])
    assert_close(dg_g, dg_c, dtype, atol=r * cols, what=f"{mode} {activation} dgamma")
    assert_close(dbt_g, dbt_c, dtype, atol=r * cols, what=f"{mode} {activation} dbeta")
    assert_close(dz_g, dz_c, dtype, atol=r * dz_mag, what=f"{mode} {activation} dz")
    assert_close(db_g, db_c, dtype, atol=r * db_mag, what=f"{mode} {activation} db")


# --- weight normalisation --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", WN_SHAPES, ids=_ids(WN_SHAPES))
def test_weight_norm_matches_cpu(cuda_be, kc, rng, shape, dtype):
    n_in, n_out = shape
    v = rng.standard_normal(shape).astype(dtype)
    g = rng.uniform(0.5, 2.0, n_out).astype(dtype)
    W_c, inv_c = np.empty_like(v), np.empty(n_out)
    cpu_wnorm.weight_norm_forward(v, g, W_c, inv_c)
    vg, gg = cuda_be.to_device(v), cuda_be.to_device(g)
    W_g, inv_g = cuda_be.alloc(vg.shape, vg.dtype), cuda_be.alloc(n_out, np.float64)
    kc.weight_norm_forward(vg, gg, W_g, inv_g)
    r = rtol_of(dtype)
    assert_close(inv_g, inv_c, dtype, what="1/||v||")
    assert_close(W_g, W_c, dtype, what="W")

    dW = rng.standard_normal(shape).astype(dtype)
    dv_c, dg_c = np.empty_like(v), np.empty_like(g)
    cpu_wnorm.weight_norm_backward(v, g, inv_c, dW, dv_c, dg_c)
    dv_g, dg_g = cuda_be.alloc(vg.shape, vg.dtype), cuda_be.alloc(gg.shape, gg.dtype)
    kc.weight_norm_backward(vg, gg, cuda_be.to_device(inv_c), cuda_be.to_device(dW), dv_g, dg_g)
    terms = np.abs(dW.astype(np.float64) * v)
    assert_close(dg_g, dg_c, dtype, atol=r * (terms.sum(axis=0) * inv_c).max(), what="dg")
    a = np.abs(g * inv_c)
    dv_mag = a * np.abs(dW) + (a * np.abs(dg_c) * inv_c) * np.abs(v)
    assert_close(dv_g, dv_c, dtype, atol=r * dv_mag.max(), what="dv")


# --- determinism ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_sums_are_deterministic(cuda_be, kc, rng, dtype):
    """Two runs on the same inputs give the same bits (fixed-order sums over
    several row blocks and column tiles, no atomics)."""
    B, n = 257, 129
    code, alpha = ops.resolve_activation("tanh")
    key, thresh, scale = _dropout(rng, True)
    x, W, b = (cuda_be.to_device(a) for a in dense_inputs(rng, B, n, n, dtype))
    da = cuda_be.to_device(rng.standard_normal((B, n)).astype(dtype))
    inputs = [cuda_be.to_device(a) for a in _norm_inputs(rng, B, n, dtype)]
    runs = []
    for _ in range(2):
        out = []
        bargs = (code, alpha, True, key, thresh, scale, True)
        y, z, fz = _block_forward(cuda_be, kc, x, W, b, *bargs)
        out += [y, *_block_backward(cuda_be, kc, x, W, fz, z, da, *bargs)]
        for kind, batch_stats in MODES.values():
            nargs = (kind, batch_stats, code, alpha, True, key, thresh, scale, True)
            f = _norm_forward(cuda_be, kc, *inputs, *nargs)
            out += list(f.values())
            out += _norm_backward(cuda_be, kc, da, f["fz"], f["xhat"], inputs[3], inputs[4],
                                  f["rstd"], *nargs)
        W2, inv = cuda_be.alloc(W.shape, W.dtype), cuda_be.alloc(n, np.float64)
        kc.weight_norm_forward(W, b, W2, inv)
        dv, dg = cuda_be.alloc(W.shape, W.dtype), cuda_be.alloc(b.shape, b.dtype)
        kc.weight_norm_backward(W, b, inv, da[:n], dv, dg)
        out += [W2, inv, dv, dg]
        runs.append([to_numpy(a) for a in out])
    for i, (a1, a2) in enumerate(zip(*runs)):
        assert np.array_equal(a1, a2, equal_nan=True), f"output {i} differs between runs"
