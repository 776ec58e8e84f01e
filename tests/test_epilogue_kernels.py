"""The epilogue pieces' kernels (``kernels/{cpu,cuda}/blocks``, ``norm``,
``wnorm``) on every device against fastgrad.reference: the counter-based
dropout mask, the dropout / residual block, layer and batch norm, weight
norm, and sums that give the same bits run after run.

The dropout mask is compared bit for bit: every device drops exactly the
units the reference drops.  Other tolerances: conftest.RTOL (float32 1e-5,
float64 1e-12), with absolute tolerances scaled by the magnitudes of the
terms that a sum or a product adds up (a column sum that cancels to ~0 is
compared to the size of its terms, not to itself).  Layers, models and the
fused step with these pieces are tested in test_epilogue_pieces.py.
"""
import numpy as np
import pytest

from fastgrad import ops, reference
from fastgrad.backend import backend_for
from fastgrad.kernels.spec import BATCH, LAYER

from conftest import ACTIVATIONS, DTYPES, assert_close, dense_inputs, rtol_of, to_numpy

# (B, n): B in {1, 3, 17, 130} (130 spans three of CUDA's row blocks of the
# column sums, 17 one), n in {1, 5, 129} (129 spans five column tiles of 32).
SHAPES = [(1, 5), (3, 1), (17, 129), (130, 5), (130, 129)]
MASK_SHAPES = [(1, 1), (3, 5), (17, 129), (130, 129), (1000, 1000)]
WN_SHAPES = [(1, 1), (3, 5), (17, 129), (130, 5), (129, 17)]      # (n_in, n_out)
# (dtype, dropout rate, residual): every pair of their values, each with
# every activation, shape and norm mode (the tail of dropout and skip is the
# same code after every activation; the dtype picks the compiled variant)
EPILOGUES = [(np.float32, 0.0, False), (np.float32, 0.3, True),
             (np.float64, 0.0, True), (np.float64, 0.5, False)]
_EPILOGUE_IDS = [f"{np.dtype(t).name}-" + (f"p{p}" if p else "nodrop") + ("-res" if r else "")
                 for t, p, r in EPILOGUES]


def _ids(values):
    return [np.dtype(v).name if isinstance(v, type) else
            "x".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values]


def _kernels(device, activation=None):
    """(backend, blocks, norm, wnorm) of ``device``: the twins' modules."""
    be = backend_for(device)
    codes = () if activation is None else (ops.resolve_activation(activation)[0],)
    return (be, *be.epilogue_kernels(codes))


def _dropout(rng, blocks, p):
    """(key, thresh, scale, kept) of a random (seed, layer, counter) at rate
    ``p``: the kernels' arguments and the reference keep-mask as a function
    of the shape (all kept when p = 0; the key is a real one either way)."""
    seed, layer, counter = int(rng.integers(2 ** 63)), int(rng.integers(8)), int(rng.integers(999))
    key = reference.dropout_key(seed, layer, counter)
    assert int(blocks.dropout_key(seed, layer, counter)) == key

    def kept(shape):
        return reference.dropout_mask(seed, layer, counter, shape, p) != 0

    return np.uint64(key), blocks.dropout_threshold(p), 1.0 / (1.0 - p), kept


def _check_dropped(y, x, kept, residual, what):
    """The units the mask drops are exactly 0 (x for a residual block: the
    skip path).  (Kept units are compared with a tolerance by the caller;
    they may be 0 where f underflows, e.g. gelu(-5) with the CPU's float32
    polynomial tanh.)"""
    y = to_numpy(y)
    want = np.broadcast_to(x[~kept] if residual else 0, y[~kept].shape)
    assert np.array_equal(y[~kept], want), f"{what}: a dropped unit is kept"


def _grad_terms(activation, alpha, pre, da, kept, scale):
    """|da * mask * scale| times the size of f'(pre).

    That is 1 + |pre| for gelu, gelu_tanh and silu, whose derivatives are
    sums of terms of that size that cancel near pre = -0.75 (gelu) and -1.28
    (silu), where a float32 libm or polynomial tanh / exp differs from the
    exact value by far more than rtol relative to the small result.  The
    other derivatives are read from the output f (tanh: 1 - f^2), which
    carries f's absolute error (up to ~3e-7 in float32: the CPU's polynomial
    tanh / exp) times |df'/df| <= 2: |f'| floored at 0.1 (0.1 rtol)."""
    if activation in ("gelu", "gelu_tanh", "silu"):
        d = 1.0 + np.abs(pre)
    else:
        d = np.maximum(np.abs(reference.activation_grad(pre, activation, alpha)), 0.1)
    return np.maximum(np.abs(da * np.where(kept, scale, 0.0)) * d, 1e-300)


# --- the dropout mask ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=_ids(MASK_SHAPES))
def test_dropout_mask_is_the_reference_mask(device, rng, shape, dtype):
    """The mask is a function of (seed, layer, counter, element) alone: each
    device's is the reference's bit for bit, for keys of all 64 bits, p = 0
    (keep all) and p = 1 (drop all); and the block forward's epilogue zeroes
    exactly the masked units."""
    be, blocks, _, _ = _kernels(device)
    identity = ops.resolve_activation("identity")[0]
    cases = [(0, 0, 0, 0.5), (12345, 1, 7, 0.1),      # the second's key is >= 2**63
             (2 ** 63 - 1, 9, 2 ** 40, 0.9),
             (int(rng.integers(2 ** 63)), 3, 41, 0.37), (int(rng.integers(2 ** 63)), 0, 1, 1e-3),
             (77, 2, 3, 0.0), (78, 2, 3, 1.0)]
    for seed, layer, counter, p in cases:
        what = f"seed {seed} layer {layer} counter {counter} p {p}"
        key = reference.dropout_key(seed, layer, counter)
        assert int(blocks.dropout_key(seed, layer, counter)) == key, f"{what}: key"
        thresh = blocks.dropout_threshold(p)
        want = reference.dropout_mask(seed, layer, counter, shape, p)
        out = be.alloc(shape, dtype)
        blocks.dropout_mask(np.uint64(key), thresh, out)
        np.testing.assert_array_equal(to_numpy(out), want, err_msg=what)
        if p == 1.0 or shape[0] > 130:
            continue
        # identity of ones: y is the scale where kept and 0 where dropped
        y, unused = be.alloc(shape, dtype, fill=1), be.alloc(shape, dtype, fill=0)
        scale = 1.0 / (1.0 - p)
        blocks.block_forward_epilogue(y, be.alloc(shape[1], dtype, fill=0), unused, unused, unused,
                                      identity, 0.0, True, np.uint64(key), thresh, scale, False)
        assert not to_numpy(unused).any(), "z or fz written by a non-gelu, non-residual layer"
        _check_dropped(y, None, want != 0, False, what)
        assert_close(y, want * scale, dtype, what=f"{what}: kept units")


# --- dropout / residual blocks ---------------------------------------------------------

def _block_forward(be, blocks, x, W, b, code, alpha, drop, key, thresh, scale, residual):
    """(y, z, fz) of blocks.block_forward, fz as backward takes it: f(z) for
    a residual block, else the output y (the forward writes fz only when
    residual)."""
    y = be.alloc((x.shape[0], W.shape[1]), x.dtype)
    z, fz = be.alloc(y.shape, y.dtype, fill=0), be.alloc(y.shape, y.dtype, fill=0)
    blocks.block_forward(x, W, b, z, fz, y, code, alpha, drop, key, thresh, scale, residual)
    return y, z, fz if residual else y


def _block_backward(be, blocks, x, W, fz, z, da, code, alpha, drop, key, thresh, scale,
                    residual):
    """(dz, dW, db, dx) of blocks.block_backward; dz is da itself unless residual."""
    da = da.copy()
    dz = be.alloc(da.shape, da.dtype) if residual else da
    dW, db = be.alloc(W.shape, W.dtype), be.alloc(W.shape[1], W.dtype)
    dx = be.alloc(x.shape, x.dtype)
    blocks.block_backward(x, W, fz, z, da, dz, dW, db, dx, code, alpha, drop, key, thresh, scale,
                          residual, True)
    return dz, dW, db, dx


@pytest.mark.parametrize("dtype,p,residual", EPILOGUES, ids=_EPILOGUE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_block_matches_reference(device, rng, activation, shape, dtype, p, residual):
    B, n = shape
    be, blocks, _, _ = _kernels(device, activation)
    code, alpha = ops.resolve_activation(activation)
    drop = p > 0
    x, W, b = dense_inputs(rng, B, n if residual else 7, n, dtype)     # exact GEMM
    key, thresh, scale, kept_of = _dropout(rng, blocks, p)
    kept = kept_of((B, n))
    mask = kept.astype(np.float64) if drop else None
    args = (code, alpha, drop, key, thresh, scale, residual)
    y, z, fz = _block_forward(be, blocks, *(be.to_device(a) for a in (x, W, b)), *args)
    rz, rf, ry = reference.block_forward(x, W, b, activation, alpha, mask=mask, p=p,
                                         residual=residual)
    r = rtol_of(dtype)
    atol = r * max(1.0, float(np.abs(rz).max()) + (float(np.abs(x).max()) if residual else 0))
    assert_close(y, ry, dtype, atol=atol, what=f"{activation} y")
    if ops.needs_z(code):                   # only the activations that read z keep it
        assert_close(z, rz, dtype, what="z")
    if residual:                            # only residual blocks keep f(z) apart
        assert_close(fz, rf, dtype, atol=atol, what="f(z)")
    if drop:
        _check_dropped(y, x, kept, residual, activation)

    # backward from the device's own forward state
    da = rng.standard_normal((B, n)).astype(dtype)
    dz, dW, db, dx = _block_backward(be, blocks, *(be.to_device(a) for a in (x, W)), fz, z,
                                     be.to_device(da), *args)
    rdz = da * (mask * scale if drop else 1.0) * reference.activation_grad(rz, activation, alpha)
    rdW, rdb, rdx = reference.block_backward(x, W, rz, da, activation, alpha, mask=mask, p=p,
                                             residual=residual)
    dza = _grad_terms(activation, alpha, rz, da, kept, scale)
    assert_close(dz, rdz, dtype, atol=r * dza.max(), what=f"{activation} dz")
    assert_close(db, rdb, dtype, atol=r * dza.sum(axis=0).max(), what="db")
    assert_close(dW, rdW, dtype, atol=r * (np.abs(x).T @ dza).max(), what="dW")
    dxa = dza @ np.abs(W).T + (np.abs(da) if residual else 0)
    assert_close(dx, rdx, dtype, atol=r * dxa.max(), what="dx")
    assert not to_numpy(dz)[~kept].any(), "a dropped unit passed gradient"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_over_a_million_draws(p):
    """The mask keeps 1 - p of the units, and different layers and counters
    draw different masks (a property of the hash: every device draws the
    reference's mask, test_dropout_mask_is_the_reference_mask)."""
    _, blocks, _, _ = _kernels("cpu")
    n = 1000 * 1000
    out = np.empty((1000, 1000))
    blocks.dropout_mask(np.uint64(blocks.dropout_key(12345, 0, 7)), blocks.dropout_threshold(p),
                        out)
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(out.mean() - (1 - p)) < 4 * sigma, (out.mean(), 1 - p, sigma)
    other = np.empty_like(out)
    blocks.dropout_mask(np.uint64(blocks.dropout_key(12345, 1, 7)), blocks.dropout_threshold(p),
                        other)
    assert (other != out).mean() > 0.5 * 2 * p * (1 - p)


def test_backward_regenerates_the_forward_mask(device, rng):
    """Identity activation, dy = 1: the backward's dz is mask * scale exactly,
    so db counts the kept units the forward let through."""
    B, n, p = 64, 33, 0.4
    be, blocks, _, _ = _kernels(device, "identity")
    code, alpha = ops.resolve_activation("identity")
    x, W, b = (rng.standard_normal(s) for s in ((B, n), (n, n), (n,)))
    key = np.uint64(blocks.dropout_key(99, 1, 5))
    args = (code, alpha, True, key, blocks.dropout_threshold(p), 1.0 / (1.0 - p), False)
    xd, Wd = be.to_device(x), be.to_device(W)
    y, z, fz = _block_forward(be, blocks, xd, Wd, be.to_device(b), *args)
    dz, dW, db, dx = _block_backward(be, blocks, xd, Wd, fz, z, be.alloc((B, n), x.dtype, fill=1),
                                     *args)
    y = to_numpy(y)
    kept = y != 0
    assert 0.4 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], (x @ W + b)[kept] / (1 - p), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(to_numpy(dz), kept / (1 - p))
    np.testing.assert_allclose(to_numpy(db), kept.sum(axis=0) / (1 - p), rtol=1e-14)
    np.testing.assert_allclose(to_numpy(dW), x.T @ (kept / (1 - p)), rtol=1e-12, atol=1e-12)


# --- layer norm / batch norm -----------------------------------------------------------

# mode: (kind, batch statistics); "batch_eval" normalises with the running ones
MODES = {"layer": (LAYER, True), "batch": (BATCH, True), "batch_eval": (BATCH, False)}
_KIND_NAMES = {LAYER: "layer", BATCH: "batch"}


def _norm_inputs(rng, B, n, dtype):
    """(y0, b, x, gamma, beta, running mean, running var): a GEMM output with
    an offset (the shifted one-pass variance's case), the skip input x."""
    y0 = (rng.standard_normal((B, n)) * 2 + 3).astype(dtype)
    b = rng.uniform(-1, 1, n).astype(dtype)
    x = rng.standard_normal((B, n)).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, n).astype(dtype)
    beta = rng.uniform(-0.5, 0.5, n).astype(dtype)
    run_mean = rng.standard_normal(n)
    run_var = rng.uniform(0.5, 2.0, n)
    return y0, b, x, gamma, beta, run_mean, run_var


def _norm_forward(be, norm, y0, b, x, gamma, beta, run_mean, run_var, kind, batch_stats, *args):
    """Everything norm.norm_forward_epilogue writes, as a dict."""
    B, n = y0.shape
    y = y0.copy()
    # fz: written when residual only
    xhat, fz = be.alloc(y.shape, y.dtype), be.alloc(y.shape, y.dtype, fill=0)
    ns = B if kind == LAYER else n
    mean, rstd = be.alloc(ns, y.dtype), be.alloc(ns, y.dtype)
    acc = be.alloc(2 * n, np.float64)
    rm, rv = run_mean.copy(), run_var.copy()
    norm.norm_forward_epilogue(y, b, x, xhat, fz, gamma, beta, mean, rstd, acc, rm, rv, kind,
                               batch_stats, *args)
    return dict(y=y, xhat=xhat, fz=fz, mean=mean, rstd=rstd, run_mean=rm, run_var=rv)


def _norm_backward(be, norm, da, fz, xhat, gamma, beta, rstd, kind, batch_stats, *args):
    """(dz, db, dgamma, dbeta) of norm.norm_backward_epilogue; dz is da
    unless residual."""
    B, n = da.shape
    residual = args[-1]
    da = da.copy()
    dz = be.alloc(da.shape, da.dtype) if residual else da
    db, dgamma, dbeta = (be.alloc(n, da.dtype) for _ in range(3))
    r1, r2 = be.alloc(B, np.float64), be.alloc(B, np.float64)
    norm.norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta, r1, r2,
                                kind, batch_stats, *args)
    return dz, db, dgamma, dbeta


def _norm_backward_scales(activation, alpha, kind, batch_stats, da, kept, scale, xhat, gamma,
                          beta, rstd):
    """Magnitudes of the backward's terms: (column sums of pass 1, dz, db)."""
    xh = np.asarray(xhat, np.float64)
    g = np.abs(np.asarray(gamma, np.float64))
    rs = np.abs(np.asarray(rstd, np.float64))
    u = np.asarray(gamma, np.float64) * xh + beta
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


@pytest.mark.parametrize("dtype,p,residual", EPILOGUES, ids=_EPILOGUE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids(SHAPES))
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_norm_matches_reference(device, rng, activation, mode, shape, dtype, p, residual):
    """Normalise (+ b), affine, activation, dropout, skip: the forward's
    statistics, output, running statistics, and every gradient."""
    kind, batch_stats = MODES[mode]
    B, n = shape
    if mode == "batch" and B == 1:
        pytest.skip("batch norm in training needs more than one row")
    be, blocks, norm, _ = _kernels(device, activation)
    code, alpha = ops.resolve_activation(activation)
    drop = p > 0
    inputs = _norm_inputs(rng, B, n, dtype)
    y0, b, x, gamma, beta, run_mean, run_var = inputs
    key, thresh, scale, kept_of = _dropout(rng, blocks, p)
    kept = kept_of((B, n))
    args = (kind, batch_stats, code, alpha, drop, key, thresh, scale, residual)
    out = _norm_forward(be, norm, *(be.to_device(a) for a in inputs), *args)

    z = y0.astype(np.float64) + b
    training = batch_stats or kind == LAYER
    rxhat, u, rrstd, rrm, rrv = reference.norm_forward(z, _KIND_NAMES[kind], gamma, beta,
                                                       run_mean, run_var, training=training)
    if kind == LAYER:
        rmean = z.mean(axis=1)
    else:
        rmean = z.mean(axis=0) if batch_stats else run_mean
    rf = reference.activation(u, activation, alpha)
    ry = rf * np.where(kept, scale, 0.0) if drop else rf
    if residual:
        ry = ry + x
    r = rtol_of(dtype)
    assert_close(out["mean"], rmean, dtype, what=f"{mode} mean")
    assert_close(out["rstd"], np.ravel(rrstd), dtype, what=f"{mode} rstd")
    assert_close(out["xhat"], rxhat, dtype, what=f"{mode} xhat")
    atol = r * max(1.0, 2.0 * float(np.abs(rxhat).max())
                   + (float(np.abs(x).max()) if residual else 0.0))
    assert_close(out["y"], ry, dtype, atol=atol, what=f"{mode} {activation} y")
    if residual:
        assert_close(out["fz"], rf, dtype, atol=atol, what="f(u)")
    else:
        assert not to_numpy(out["fz"]).any(), "fz written by a non-residual layer"
    if mode == "batch":
        # (1 - m) run_mean + m mean can cancel: its error scales with the terms
        # (seed 2078064497: -4.56e-5 from terms of a few tenths, 2.2e-8 off)
        assert_close(out["run_mean"], rrm, dtype,
                     atol=r * float((np.abs(run_mean) + np.abs(rmean)).max()),
                     what="running mean")
        assert_close(out["run_var"], rrv, dtype, what="running var")
    else:                                   # untouched
        np.testing.assert_array_equal(to_numpy(out["run_mean"]), run_mean)
        np.testing.assert_array_equal(to_numpy(out["run_var"]), run_var)
    if drop:
        _check_dropped(out["y"], x, kept, residual, f"{mode} {activation}")

    # backward from the device's own forward state
    fz = out["fz"] if residual else out["y"]
    da = rng.standard_normal((B, n)).astype(dtype)
    dz, db, dgamma, dbeta = _norm_backward(be, norm, be.to_device(da), fz, out["xhat"],
                                           *(be.to_device(a) for a in (gamma, beta)),
                                           out["rstd"], *args)
    du = da * (np.where(kept, scale, 0.0) if drop else 1.0) * reference.activation_grad(
        u, activation, alpha)
    rdz, rdgamma, rdbeta = reference.norm_backward(du, rxhat, rrstd, gamma, _KIND_NAMES[kind],
                                                   training=training)
    cols, dz_mag, db_mag = _norm_backward_scales(activation, alpha, kind, batch_stats, da, kept,
                                                 scale, rxhat, gamma, beta, np.ravel(rrstd))
    assert_close(dgamma, rdgamma, dtype, atol=r * cols, what=f"{mode} {activation} dgamma")
    assert_close(dbeta, rdbeta, dtype, atol=r * cols, what=f"{mode} {activation} dbeta")
    assert_close(dz, rdz, dtype, atol=r * dz_mag, what=f"{mode} {activation} dz")
    assert_close(db, rdz.sum(axis=0), dtype, atol=r * db_mag, what=f"{mode} {activation} db")


# --- weight normalisation --------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", WN_SHAPES, ids=_ids(WN_SHAPES))
def test_weight_norm_matches_reference(device, rng, shape, dtype):
    n_in, n_out = shape
    be, _, _, wnorm = _kernels(device)
    v = rng.standard_normal(shape).astype(dtype)
    g = rng.uniform(0.5, 2.0, n_out).astype(dtype)
    vd, gd = be.to_device(v), be.to_device(g)
    W, inv = be.alloc(shape, dtype), be.alloc(n_out, np.float64)
    wnorm.weight_norm_forward(vd, gd, W, inv)
    r = rtol_of(dtype)
    rinv = 1.0 / np.sqrt((v.astype(np.float64) ** 2).sum(axis=0))
    assert_close(inv, rinv, dtype, what="1/||v||")
    assert_close(W, reference.weight_norm(v, g), dtype, what="W")

    dW = rng.standard_normal(shape).astype(dtype)
    dv, dg = be.alloc(shape, dtype), be.alloc(n_out, dtype)
    wnorm.weight_norm_backward(vd, gd, inv, be.to_device(dW), dv, dg)
    rdv, rdg = reference.weight_norm_backward(v, g, dW)
    terms = np.abs(dW.astype(np.float64) * v)
    assert_close(dg, rdg, dtype, atol=r * (terms.sum(axis=0) * rinv).max(), what="dg")
    a = np.abs(g * rinv)
    dv_mag = a * np.abs(dW) + (a * np.abs(rdg) * rinv) * np.abs(v)
    assert_close(dv, rdv, dtype, atol=r * dv_mag.max(), what="dv")


# --- determinism ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_sums_are_deterministic(device, rng, dtype):
    """Two runs on the same inputs give the same bits: fixed-order sums (on
    CUDA over several row blocks and column tiles, no atomics) and no read of
    scratch that a pass did not write first."""
    B, n = 257, 129
    be, blocks, norm, wnorm = _kernels(device, "tanh")
    code, alpha = ops.resolve_activation("tanh")
    key, thresh, scale, _ = _dropout(rng, blocks, 0.3)
    x, W, b = (be.to_device(a) for a in dense_inputs(rng, B, n, n, dtype))
    da = be.to_device(rng.standard_normal((B, n)).astype(dtype))
    inputs = [be.to_device(a) for a in _norm_inputs(rng, B, n, dtype)]
    runs = []
    for _ in range(2):
        out = []
        bargs = (code, alpha, True, key, thresh, scale, True)
        y, z, fz = _block_forward(be, blocks, x, W, b, *bargs)
        out += [y, *_block_backward(be, blocks, x, W, fz, z, da, *bargs)]
        for kind, batch_stats in MODES.values():
            nargs = (kind, batch_stats, code, alpha, True, key, thresh, scale, True)
            f = _norm_forward(be, norm, *inputs, *nargs)
            out += list(f.values())
            out += _norm_backward(be, norm, da, f["fz"], f["xhat"], inputs[3], inputs[4],
                                  f["rstd"], *nargs)
        W2, inv = be.alloc(W.shape, W.dtype), be.alloc(n, np.float64)
        wnorm.weight_norm_forward(W, b, W2, inv)
        dv, dg = be.alloc(W.shape, W.dtype), be.alloc(b.shape, b.dtype)
        wnorm.weight_norm_backward(W, b, inv, da[:n], dv, dg)
        out += [W2, inv, dv, dg]
        runs.append([to_numpy(a) for a in out])
    for i, (a1, a2) in enumerate(zip(*runs)):
        assert np.array_equal(a1, a2, equal_nan=True), f"output {i} differs between runs"
