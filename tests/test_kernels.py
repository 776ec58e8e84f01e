"""Every kernel, on every device, against fastgrad.reference (plain NumPy float64).

Bodies are device-agnostic: inputs are drawn with NumPy, moved to the
device's array module, and results come back through ``to_numpy``.
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import device as fg_device
from fastgrad import ops, reference
from fastgrad.kernels.cpu.activations import CODES

from conftest import (ACTIVATIONS, DTYPES, LOSSES, WIDTHS, assert_close,
                      dense_inputs, rtol_of, to_numpy)

BATCHES = (1, 7)


def _fwd_atol(z, dtype):
    """Absolute tolerance of f(z): float32 activations are evaluated in
    float32 (e.g. gelu = z/2 (1 + tanh(.)) cancels for z << 0), so their
    absolute error grows with |z|, not with |f(z)|."""
    return rtol_of(dtype) * max(1.0, float(np.abs(z).max()))


def _bwd_atols(x, W, z, da, dtype):
    """Absolute tolerances of (dW, db, dx).  f' is read from the output a
    (DESIGN.md), which in float32 carries an error of ~ulp(1) * (1 + |z|)
    (1 - a*a for tanh, a + alpha for elu ...): so dz's error is relative
    to |da| (1 + |z|), and dW, db, dx's to the sums of those terms."""
    x, W, da = (np.abs(np.asarray(t, np.float64)) for t in (x, W, da))
    d = da * (1.0 + np.abs(z))
    r = rtol_of(dtype)
    return (r * float((x.T @ d).max()), r * float(d.sum(axis=0).max()),
            r * float((d @ W.T).max()))


def _ids(values):
    return [np.dtype(v).name if isinstance(v, type) else str(v) for v in values]


# --- dense layer -------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_forward_backward(device, xp, rng, activation, width, batch, dtype):
    x, W, b = dense_inputs(rng, batch, width, width, dtype)
    z_ref, a_ref = reference.dense_forward(x, W, b, activation)
    a, z = ops.dense_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b), activation)
    assert a.dtype == np.dtype(dtype) and a.shape == (batch, width)
    assert fg_device.device_of(a) == device
    assert_close(a, a_ref, dtype, atol=_fwd_atol(z_ref, dtype), what=f"{activation} forward a")
    if CODES[activation] in ops.NEEDS_Z:
        assert_close(z, z_ref, dtype, what="forward z")
    else:
        assert z is None

    da = rng.standard_normal((batch, width)).astype(dtype)
    dW_ref, db_ref, dx_ref = reference.dense_backward(x, W, z_ref, da, activation)
    dW, db, dx = ops.dense_backward(xp.asarray(x), xp.asarray(W), a, z, xp.asarray(da),
                                    activation)
    atol = _bwd_atols(x, W, z_ref, da, dtype)
    assert_close(dW, dW_ref, dtype, atol=atol[0], what=f"{activation} dW")
    assert_close(db, db_ref, dtype, atol=atol[1], what=f"{activation} db")
    assert_close(dx, dx_ref, dtype, atol=atol[2], what=f"{activation} dx")

    dW2, db2, dx2 = ops.dense_backward(xp.asarray(x), xp.asarray(W), a, z, xp.asarray(da),
                                       activation, need_dx=False)
    assert dx2 is None
    np.testing.assert_array_equal(to_numpy(dW2), to_numpy(dW))
    np.testing.assert_array_equal(to_numpy(db2), to_numpy(db))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1000, 1), (3, 17, 1000), (129, 3, 1), (1000, 1, 17)])
def test_dense_rectangular(device, xp, rng, shape, dtype):
    batch, n_in, n_out = shape
    x, W, b = dense_inputs(rng, batch, n_in, n_out, dtype)
    z_ref, a_ref = reference.dense_forward(x, W, b, "tanh")
    a, _ = ops.dense_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b), "tanh")
    assert_close(a, a_ref, dtype, atol=_fwd_atol(z_ref, dtype), what="forward")
    da = rng.standard_normal(a_ref.shape).astype(dtype)
    ref = reference.dense_backward(x, W, z_ref, da, "tanh")
    got = ops.dense_backward(xp.asarray(x), xp.asarray(W), a, None, xp.asarray(da), "tanh")
    for g, r, tol, name in zip(got, ref, _bwd_atols(x, W, z_ref, da, dtype), ("dW", "db", "dx")):
        assert_close(g, r, dtype, atol=tol, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("activation,alpha", [("leaky_relu", 0.2), ("leaky_relu", 0.0),
                                              ("elu", 0.5), ("elu", 2.0)])
def test_activation_alpha(device, xp, rng, activation, alpha, dtype):
    x, W, b = dense_inputs(rng, 5, 17, 9, dtype)
    z_ref, a_ref = reference.dense_forward(x, W, b, activation, alpha)
    a, z = ops.dense_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b), activation, alpha)
    assert_close(a, a_ref, dtype, atol=_fwd_atol(z_ref, dtype), what="forward")
    da = rng.standard_normal(a_ref.shape).astype(dtype)
    ref = reference.dense_backward(x, W, z_ref, da, activation, alpha)
    got = ops.dense_backward(xp.asarray(x), xp.asarray(W), a, z, xp.asarray(da), activation, alpha)
    for g, r, tol, name in zip(got, ref, _bwd_atols(x, W, z_ref, da, dtype), ("dW", "db", "dx")):
        assert_close(g, r, dtype, atol=tol, what=name)
    # the default alpha differs, so the result must too (alpha is really used)
    a_default, _ = ops.dense_forward(xp.asarray(x), xp.asarray(W), xp.asarray(b), activation)
    if (z_ref < 0).any():
        assert not np.array_equal(to_numpy(a_default), to_numpy(a))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dense_kernels_direct_in_place(device, rng, activation, dtype):
    """The raw kernels with the aliasing ops/layers rely on: ``z is a`` in the
    forward (one GEMM into a, one in-place pass) and ``dz is da`` in the
    backward; dx untouched when need_dx is False."""
    xp, k = fg_device.array_module(device), fg_device.kernels(device)
    code, alpha = ops.resolve_activation(activation)
    x, W, b = dense_inputs(rng, 4, 17, 3, dtype)
    z_ref, a_ref = reference.dense_forward(x, W, b, activation)
    xd, Wd, bd = xp.asarray(x), xp.asarray(W), xp.asarray(b)
    a = xp.full((4, 3), np.nan, dtype)
    z = xp.full((4, 3), np.nan, dtype) if code in ops.NEEDS_Z else a
    k.dense_forward(xd, Wd, bd, z, a, code, alpha)
    assert_close(a, a_ref, dtype, atol=_fwd_atol(z_ref, dtype), what="a")
    if z is not a:
        assert_close(z, z_ref, dtype, what="z")

    da_np = rng.standard_normal((4, 3)).astype(dtype)
    da = xp.asarray(da_np.copy())
    dW, db = xp.full(Wd.shape, np.nan, dtype), xp.full(bd.shape, np.nan, dtype)
    dx_sentinel = xp.full((4, 17), 7.0, dtype)
    k.dense_backward(xd, Wd, a, z, da, da, dW, db, dx_sentinel, code, alpha, False)
    dW_ref, db_ref, dx_ref = reference.dense_backward(x, W, z_ref, da_np, activation)
    dz_ref = da_np * reference.activation_grad(z_ref, activation)
    tol = _bwd_atols(x, W, z_ref, da_np, dtype)
    assert_close(da, dz_ref, dtype, atol=rtol_of(dtype) * float(
        (np.abs(da_np) * (1 + np.abs(z_ref))).max()), what="dz written in place over da")
    assert_close(dW, dW_ref, dtype, atol=tol[0], what="dW")
    assert_close(db, db_ref, dtype, atol=tol[1], what="db")
    assert (to_numpy(dx_sentinel) == 7.0).all(), "need_dx=False must not touch dx"

    da = xp.asarray(da_np.copy())
    dx = xp.full((4, 17), np.nan, dtype)
    k.dense_backward(xd, Wd, a, z, da, da, dW, db, dx, code, alpha, True)
    assert_close(dx, dx_ref, dtype, atol=tol[2], what="dx")


# --- activations ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", [(1,), (3, 17), (1, 1000), (2, 3, 129)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_forward_backward(device, xp, rng, activation, shape, dtype):
    z = (rng.standard_normal(shape) * 4).astype(dtype)
    a_ref = reference.activation(z, activation)
    a = ops.activation_forward(xp.asarray(z), activation)
    assert a.shape == z.shape and a.dtype == np.dtype(dtype)
    assert_close(a, a_ref, dtype, atol=_fwd_atol(z, dtype), what=f"{activation} forward")
    da = rng.standard_normal(shape).astype(dtype)
    dz = ops.activation_backward(xp.asarray(da), a, xp.asarray(z), activation)
    assert dz.shape == z.shape
    # f' is read from the kernel's output a (DESIGN.md), so in float32 it
    # carries an absolute error of ~ulp(1) (e.g. elu: a + alpha cancels for
    # z << 0): the absolute tolerance scales with |da|, not with |dz|.
    assert_close(dz, da * reference.activation_grad(z, activation), dtype,
                 atol=rtol_of(dtype) * float((np.abs(da) * (1 + np.abs(z))).max()),
                 what=f"{activation} backward")


def test_activation_keeps_a_0d_shape(device, xp):
    """"Any shape" includes a 0-d array (it came back with shape (1,))."""
    a = ops.activation_forward(xp.asarray(np.float32(0.5)), "tanh")
    assert a.shape == () and float(to_numpy(a)) == pytest.approx(np.tanh(0.5), rel=1e-6)
    d = ops.activation_backward(xp.asarray(1.0), xp.asarray(0.5), None, "sigmoid")
    assert d.shape == () and float(to_numpy(d)) == 0.25


def test_softplus_follows_torchs_threshold(device, xp, rng):
    """softplus is torch's nn.Softplus(beta=1, threshold=20): z itself and a
    derivative of 1 above 20 (exact log(1 + e^z) differs there by up to
    2.1e-9, which a float64 model exported to torch would show)."""
    torch = pytest.importorskip("torch")
    z = np.concatenate([[19.5, 20.0 - 1e-12, 20.0, 20.0 + 1e-12, 20.5, 25.0, 700.0],
                        rng.uniform(15.0, 25.0, 33)])
    a = to_numpy(ops.activation_forward(xp.asarray(z), "softplus"))
    zt = torch.tensor(z, requires_grad=True)
    at = torch.nn.functional.softplus(zt)
    at.sum().backward()
    above = z > 20.0
    assert np.array_equal(a[above], z[above])
    np.testing.assert_allclose(a, at.detach().numpy(), rtol=4e-16, atol=0)
    dz = to_numpy(ops.activation_backward(xp.asarray(np.ones_like(z)), xp.asarray(a),
                                          xp.asarray(z), "softplus"))
    assert (dz[above] == 1.0).all()
    # the derivative is read from a: z in (20 - 2.1e-9, 20] gives a > 20 too,
    # and there 1 where torch has sigmoid(z) = 1 - 2.1e-9
    window = (z > 20.0 - 2.1e-9) & ~above
    np.testing.assert_allclose(dz[~window], zt.grad.numpy()[~window], rtol=1e-15, atol=0)
    np.testing.assert_allclose(dz[window], zt.grad.numpy()[window], rtol=2.1e-9, atol=0)


_TORCH_F = {"identity": lambda t: t * 1.0, "relu": "relu", "leaky_relu": "leaky_relu",
            "elu": "elu", "sigmoid": "sigmoid", "tanh": "tanh", "softplus": "softplus",
            "gelu": "gelu", "gelu_tanh": lambda t: torch_f().gelu(t, approximate="tanh"),
            "silu": "silu"}


def torch_f():
    return pytest.importorskip("torch").nn.functional


@pytest.mark.parametrize("activation", sorted(_TORCH_F))
def test_nan_inputs_pass_gradients_as_torch(xp, activation):
    # relu's derivative at a NaN output was 0 and elu's NaN, where torch
    # (whose test is "<= 0") passes the incoming gradient on
    torch = pytest.importorskip("torch")
    z = np.array([np.nan, -1.5, 0.0, 0.5, 2.0])
    f = _TORCH_F[activation]
    f = getattr(torch_f(), f) if isinstance(f, str) else f
    zt = torch.tensor(z, requires_grad=True)
    at = f(zt)
    at.backward(torch.full_like(zt, 0.75))
    a = ops.activation_forward(xp.asarray(z), activation)
    dz = to_numpy(ops.activation_backward(xp.asarray(np.full_like(z, 0.75)), a, xp.asarray(z),
                                          activation))
    np.testing.assert_allclose(to_numpy(a), at.detach().numpy(), rtol=1e-15, atol=1e-300)
    np.testing.assert_allclose(dz, zt.grad.numpy(), rtol=1e-15, atol=1e-300)


# (7, 3) and (257, 129) straddle the CUDA kernels' block and grid sizes
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (130, 17), (3, 1000), (257, 129)])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bias_act_kernels(device, rng, activation, shape, dtype):
    """The raw epilogue kernels: ``bias_act`` out of place (z kept) and in
    place, ``bias_act_grad`` (dz and the bias gradient db, also with dz
    written over da), ``activation_forward`` / ``activation_backward``."""
    xp, k = fg_device.array_module(device), fg_device.kernels(device)
    code, alpha = ops.resolve_activation(activation)
    n = shape[1]
    z0 = (rng.standard_normal(shape) * 3).astype(dtype)
    b = rng.uniform(-1, 1, n).astype(dtype)
    da = rng.standard_normal(shape).astype(dtype)
    z_ref = z0.astype(np.float64) + b
    a_ref = reference.activation(z_ref, activation, alpha)
    fwd_atol = _fwd_atol(z_ref, dtype)
    z, bd = xp.array(z0), xp.asarray(b)      # copies: the kernels write z
    a = xp.full(shape, np.nan, dtype)
    k.bias_act(z, bd, a, code, alpha)
    in_place = xp.array(z0)
    k.bias_act(in_place, bd, in_place, code, alpha)
    assert_close(a, a_ref, dtype, atol=fwd_atol, what=f"{activation} a")
    assert_close(in_place, a_ref, dtype, atol=fwd_atol, what=f"{activation} a in place")
    assert_close(z, z_ref, dtype, what="z = z + b kept")

    dz_ref = da.astype(np.float64) * reference.activation_grad(z_ref, activation, alpha)
    scale = np.abs(da) * (1 + np.abs(z_ref))
    dz_atol = rtol_of(dtype) * float(scale.max())
    db_atol = rtol_of(dtype) * float(scale.sum(axis=0).max())
    dz, db = xp.full(shape, np.nan, dtype), xp.full(n, np.nan, dtype)
    k.bias_act_grad(xp.array(da), a, z, dz, db, code, alpha)
    assert_close(dz, dz_ref, dtype, atol=dz_atol, what=f"{activation} dz")
    assert_close(db, dz_ref.sum(axis=0), dtype, atol=db_atol, what=f"{activation} db")
    over = xp.array(da)
    db2 = xp.full(n, np.nan, dtype)
    k.bias_act_grad(over, a, z, over, db2, code, alpha)
    np.testing.assert_array_equal(to_numpy(over), to_numpy(dz))
    np.testing.assert_array_equal(to_numpy(db2), to_numpy(db))

    out = xp.full(shape, np.nan, dtype)
    k.activation_forward(xp.asarray(z_ref.astype(dtype)), out, code, alpha)
    assert_close(out, a_ref, dtype, atol=fwd_atol, what="activation_forward")
    dz3 = xp.full(shape, np.nan, dtype)
    k.activation_backward(xp.array(da), a, z, dz3, code, alpha)
    np.testing.assert_array_equal(to_numpy(dz3), to_numpy(dz))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_forward_keeps_float_dtype(device, xp, activation):
    z = np.linspace(-3, 3, 12).reshape(3, 4)
    assert ops.activation_forward(xp.asarray(z), activation).dtype == np.float64
    assert ops.activation_forward(xp.asarray(z.astype(np.float32)), activation).dtype == np.float32
    out = ops.activation_forward(xp.asarray(z.astype(np.int64)), activation)
    assert out.dtype == np.float32
    assert_close(out, reference.activation(z.astype(np.int64), activation), np.float32)


# --- losses ----------------------------------------------------------------------

def _loss_inputs(rng, name, batch, width, dtype):
    pred = (rng.standard_normal((batch, width)) * 3).astype(dtype)
    if name == "softmax_cross_entropy":
        target = rng.integers(0, width, batch)
    elif name == "mse":
        target = rng.standard_normal((batch, width)).astype(dtype)
    else:
        target = rng.uniform(0, 1, (batch, width)).astype(dtype)
        target[rng.uniform(size=target.shape) < 0.3] = 0.0
        target[rng.uniform(size=target.shape) < 0.3] = 1.0
    return pred, target


def _grad_atol(name, pred, target, grad_ref, dtype):
    """Each gradient element is a difference of terms of size ~max(1, |pred|,
    |target|) over the divisor (rows for cross-entropy, elements else): its
    rounding scales with them, not with a difference that cancels to ~0
    (bce at sigmoid(x) ~ target: 1 ulp of 1/n against a 4e-5 result)."""
    terms = max(1.0, float(np.abs(pred).max()), float(np.abs(target).max()))
    divisor = pred.shape[0] if name == "softmax_cross_entropy" else pred.size
    return rtol_of(dtype) * max(float(np.abs(grad_ref).max()), 2 * terms / divisor)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("name", LOSSES)
def test_loss(device, xp, rng, name, width, batch, dtype):
    pred, target = _loss_inputs(rng, name, batch, width, dtype)
    loss_ref, grad_ref = reference.LOSSES[name](pred, target)
    loss, grad = getattr(ops, name)(xp.asarray(pred), xp.asarray(target))
    assert isinstance(loss, float)
    assert grad.shape == pred.shape and grad.dtype == np.dtype(dtype)
    assert_close(loss, loss_ref, dtype, what=f"{name} loss")
    assert_close(grad, grad_ref, dtype, atol=_grad_atol(name, pred, target, grad_ref, dtype),
                 what=f"{name} grad")
    # the loss objects call the same kernels
    cls = {"softmax_cross_entropy": fg.SoftmaxCrossEntropy, "mse": fg.MSE,
           "bce_with_logits": fg.BCEWithLogits}[name]
    loss2, grad2 = cls()(xp.asarray(pred), xp.asarray(target))
    assert loss2 == loss
    np.testing.assert_array_equal(to_numpy(grad2), to_numpy(grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1), (6, 5), (300, 3), (33, 1000)])
@pytest.mark.parametrize("name", LOSSES)
def test_loss_kernels_direct_in_place(device, rng, name, shape, dtype):
    """The raw loss kernels, into a separate gradient and written over their
    input; on CUDA the loss stays on the device (a float64 0-d array: the
    step reads it only when asked)."""
    xp, k = fg_device.array_module(device), fg_device.kernels(device)
    pred, target = _loss_inputs(rng, name, *shape, dtype)
    loss_ref, grad_ref = reference.LOSSES[name](pred, target)
    tgt = xp.asarray(target.astype(np.int64) if name == "softmax_cross_entropy" else target)
    grad = xp.full(shape, np.nan, dtype)
    loss = getattr(k, name)(xp.array(pred), tgt, grad)
    if device == "cuda":
        assert isinstance(loss, xp.ndarray) and loss.dtype == np.float64 and loss.ndim == 0
    assert_close(float(loss), loss_ref, dtype, what="loss")
    assert_close(grad, grad_ref, dtype, atol=_grad_atol(name, pred, target, grad_ref, dtype),
                 what="grad")
    buf = xp.asarray(pred.copy())
    assert float(getattr(k, name)(buf, tgt, buf)) == float(loss)
    np.testing.assert_array_equal(to_numpy(buf), to_numpy(grad))


def test_softmax_cross_entropy_known_value(device, xp):
    # uniform logits: loss = log(C), grad = (1/C - onehot) / B
    logits = xp.zeros((2, 4), np.float64)
    loss, grad = ops.softmax_cross_entropy(logits, xp.asarray([0, 3]))
    assert loss == pytest.approx(np.log(4), rel=1e-15)
    expect = np.full((2, 4), 0.25)
    expect[0, 0] -= 1
    expect[1, 3] -= 1
    np.testing.assert_allclose(to_numpy(grad), expect / 2, rtol=1e-15)


# --- numerical safety --------------------------------------------------------------

SAFE = ("sigmoid", "softplus", "elu", "gelu", "gelu_tanh", "tanh", "silu")
EXTREMES = np.array([-1e6, -3e4, -1e3, -100.0, -88.8, -20.0, -1e-30, 0.0,
                     1e-30, 20.0, 88.8, 100.0, 1e3, 3e4, 1e6])


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("activation", SAFE)
def test_activation_finite_for_huge_inputs(device, xp, activation, dtype):
    z = EXTREMES.astype(dtype).reshape(3, 5)
    a = ops.activation_forward(xp.asarray(z), activation)
    assert np.isfinite(to_numpy(a)).all(), f"{activation}({z}) = {to_numpy(a)}"
    with np.errstate(all="ignore"):
        a_ref = reference.activation(z, activation)
        g_ref = reference.activation_grad(z, activation)
    assert_close(a, a_ref, dtype, rtol=10 * rtol_of(dtype), atol=1e-6,
                 what=f"{activation} forward")
    da = np.ones_like(z)
    dz = to_numpy(ops.activation_backward(xp.asarray(da), a, xp.asarray(z), activation))
    assert np.isfinite(dz).all(), f"{activation}' at {z} = {dz}"
    assert_close(dz, g_ref, dtype, rtol=10 * rtol_of(dtype), atol=1e-6,
                 what=f"{activation} backward")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_softmax_cross_entropy_huge_logits(device, xp, rng, dtype):
    logits = rng.choice([-3e4, 3e4, 0.0, 1.0], size=(6, 5)).astype(dtype)
    logits[0] = 3e4
    logits[1] = -3e4
    logits[2, :] = -3e4
    logits[2, 3] = 3e4
    labels = rng.integers(0, 5, 6)
    labels[2] = 0                          # a wrong, hugely confident row: loss 6e4
    loss_ref, grad_ref = reference.softmax_cross_entropy(logits, labels)
    loss, grad = ops.softmax_cross_entropy(xp.asarray(logits), xp.asarray(labels))
    assert np.isfinite(loss) and np.isfinite(to_numpy(grad)).all()
    assert_close(loss, loss_ref, dtype, what="loss")
    assert_close(grad, grad_ref, dtype, what="grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_bce_with_logits_huge_logits(device, xp, dtype):
    logits = np.array([[-1e6, -3e4, -100.0, 0.0, 100.0, 3e4, 1e6]], dtype)
    target = np.array([[1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0]], dtype)
    loss_ref, grad_ref = reference.bce_with_logits(logits, target)
    loss, grad = ops.bce_with_logits(xp.asarray(logits), xp.asarray(target))
    assert np.isfinite(loss) and np.isfinite(to_numpy(grad)).all()
    assert_close(loss, loss_ref, dtype, what="loss")
    assert_close(grad, grad_ref, dtype, what="grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_propagates_through_forward(device, xp, activation, dtype):
    z = np.array([[np.nan, 1.0, -1.0, np.nan]], dtype)
    a = to_numpy(ops.activation_forward(xp.asarray(z), activation))
    assert np.isnan(a[0, [0, 3]]).all(), f"{activation}(NaN) = {a}"
    assert np.isfinite(a[0, 1:3]).all()
    x = np.array([[np.nan, 1.0], [1.0, 1.0]], dtype)
    W = np.ones((2, 3), dtype)
    out, _ = ops.dense_forward(xp.asarray(x), xp.asarray(W), xp.zeros(3, dtype), activation)
    out = to_numpy(out)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("name", LOSSES)
def test_nan_propagates_through_loss(device, xp, rng, name, dtype):
    pred, target = _loss_inputs(rng, name, 3, 4, dtype)
    pred[1, 2] = np.nan
    loss, grad = getattr(ops, name)(xp.asarray(pred), xp.asarray(target))
    assert np.isnan(loss)
    assert np.isnan(to_numpy(grad)[1, 2])


def test_reference_sigmoid_is_accurate_in_both_tails():
    """The float64 oracle's sigmoid and its derivative hold to rounding for
    z << 0 too (0.5 (1 + tanh(z / 2)) had 1e-4 relative error at z = -30 and
    read 0 from z = -40, so tests could not see a kernel's tail errors)."""
    import math
    z = np.concatenate([np.linspace(-700.0, 700.0, 2001), [-40.0, -30.0, -1e-3, 0.0]])
    exact = np.array([1.0 / (1.0 + math.exp(-v)) for v in z])
    exact_grad = np.array([math.exp(-abs(v)) / (1.0 + math.exp(-abs(v))) ** 2 for v in z])
    f, df = reference.ACTIVATIONS["sigmoid"]
    np.testing.assert_allclose(f(z, None), exact, rtol=4e-16, atol=0)
    np.testing.assert_allclose(df(z, None), exact_grad, rtol=1e-15, atol=0)
