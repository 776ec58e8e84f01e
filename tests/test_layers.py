"""MLP / Sequential / Dense: gradients against float64 central differences,
the flat parameter buffer, initializers and seeds."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import reference

from conftest import ACTIVATIONS, LOSSES, assert_close, to_numpy

LOSS_CLS = {"softmax_cross_entropy": fg.SoftmaxCrossEntropy, "mse": fg.MSE,
            "bce_with_logits": fg.BCEWithLogits}


def _target(rng, loss, batch, n_out):
    if loss == "softmax_cross_entropy":
        return rng.integers(0, n_out, batch)
    if loss == "mse":
        return rng.standard_normal((batch, n_out))
    return rng.uniform(0, 1, (batch, n_out))


def _ref_layers(model):
    return [(to_numpy(l.W).astype(np.float64), to_numpy(l.b).astype(np.float64),
             l.activation, l.alpha) for l in model.layers]


# --- gradients against central differences ---------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_gradients_match_finite_differences(device, xp, rng, activation, loss):
    sizes, batch = [4, 5, 3], 3
    model = fg.MLP(sizes, activation=activation, init="xavier_normal", dtype="float64",
                   device=device, seed=int(rng.integers(2 ** 31)))
    # Redraw the rare point where every relu unit of a layer is off for the
    # whole batch: its true gradients are zero and the check below would be vacuous.
    for _ in range(100):
        model.params[...] = xp.asarray(rng.standard_normal(model.n_params) * 0.7)
        x = rng.standard_normal((batch, sizes[0]))
        h = x
        for W, b, _act, _alpha in _ref_layers(model)[:-1]:
            h = np.maximum(h @ W + b, 0.0)
            if not h.any():
                break
        else:
            break
    target = _target(rng, loss, batch, sizes[-1])
    loss_fn = LOSS_CLS[loss]()

    y = model.forward(xp.asarray(x))
    value, dy = loss_fn(y, xp.asarray(target))
    dx = to_numpy(model.backward(dy))
    grads = to_numpy(model.grads).copy()

    def f(params=None, inp=x):
        return loss_fn(model.predict(xp.asarray(inp)), xp.asarray(target))[0]

    assert f() == value
    h = 1e-5
    p0 = to_numpy(model.params).copy()
    fd = np.empty_like(p0)
    for i in range(p0.size):
        for sgn, store in ((1, 0), (-1, 1)):
            p = p0.copy()
            p[i] += sgn * h
            model.params[...] = xp.asarray(p)
            if store == 0:
                fp = f()
            else:
                fm = f()
        fd[i] = (fp - fm) / (2 * h)
    model.params[...] = xp.asarray(p0)
    fdx = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        xpl, xmi = x.copy(), x.copy()
        xpl[idx] += h
        xmi[idx] -= h
        fdx[idx] = (f(inp=xpl) - f(inp=xmi)) / (2 * h)

    def check(g, ref, what):
        err = np.abs(g - ref) / np.maximum(np.abs(g) + np.abs(ref), 1e-3)
        assert err.max() < 1e-6, (f"{what}: max relative error {err.max():.3g} at "
                                  f"{np.unravel_index(err.argmax(), err.shape)}: "
                                  f"analytic {g.flat[err.argmax()]!r}, FD {ref.flat[err.argmax()]!r}")
    check(grads, fd, "dparams")
    check(dx, fdx, "dx")
    assert np.abs(grads).max() > 0 and np.abs(dx).max() > 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_matches_reference(device, xp, rng, activation, dtype):
    model = fg.MLP([17, 33, 9, 5], activation=activation, output_activation="sigmoid",
                   dtype=dtype, device=device, seed=3)
    x = rng.standard_normal((6, 17))
    layers = _ref_layers(model)
    cache = reference.mlp_forward(x.astype(dtype), layers)
    y = model.forward(xp.asarray(x))
    assert y.dtype == np.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-12
    assert_close(y, cache[-1][2], dtype, rtol=tol, atol=tol)
    dy = rng.standard_normal(y.shape)
    grads, dx_ref = reference.mlp_backward(cache, layers, dy)
    dx = model.backward(xp.asarray(dy))
    assert_close(dx, dx_ref, dtype, rtol=10 * tol, atol=10 * tol, what="dx")
    for layer, (dW, db) in zip(model.layers, grads):
        assert_close(layer.dW, dW, dtype, rtol=10 * tol, atol=10 * tol, what="dW")
        assert_close(layer.db, db, dtype, rtol=10 * tol, atol=10 * tol, what="db")


# --- backward semantics --------------------------------------------------------------

def test_backward_overwrites_by_default_and_accumulate_adds(device, xp, rng):
    model = fg.MLP([6, 8, 4], activation="tanh", dtype="float64", device=device, seed=1)
    x, dy = xp.asarray(rng.standard_normal((5, 6))), xp.asarray(rng.standard_normal((5, 4)))
    model.forward(x)
    dx1 = to_numpy(model.backward(dy)).copy()
    g1 = to_numpy(model.grads).copy()
    assert np.abs(g1).max() > 0
    dx2 = to_numpy(model.backward(dy))
    np.testing.assert_array_equal(to_numpy(model.grads), g1)       # overwritten, not added
    np.testing.assert_array_equal(dx2, dx1)
    dx3 = to_numpy(model.backward(dy, accumulate=True))
    np.testing.assert_allclose(to_numpy(model.grads), 2 * g1, rtol=1e-15)
    np.testing.assert_array_equal(dx3, dx1)                         # dx is never accumulated
    model.zero_grad()
    assert not to_numpy(model.grads).any()
    model.backward(dy, accumulate=True)
    np.testing.assert_array_equal(to_numpy(model.grads), g1)


def test_backward_input_grad_false(device, xp, rng):
    model = fg.MLP([6, 8, 4], activation="gelu", dtype="float64", device=device)
    x, dy = xp.asarray(rng.standard_normal((5, 6))), xp.asarray(rng.standard_normal((5, 4)))
    model.forward(x)
    model.backward(dy)
    g = to_numpy(model.grads).copy()
    assert model.backward(dy, input_grad=False) is None
    np.testing.assert_array_equal(to_numpy(model.grads), g)


def test_backward_leaves_dy_untouched(device, xp, rng):
    model = fg.MLP([3, 4, 2], activation="sigmoid", output_activation="tanh",
                   dtype="float32", device=device)
    model.forward(xp.asarray(rng.standard_normal((2, 3)).astype(np.float32)))
    dy = xp.asarray(rng.standard_normal((2, 2)).astype(np.float32))
    before = to_numpy(dy).copy()
    model.backward(dy)
    np.testing.assert_array_equal(to_numpy(dy), before)


def test_predict_equals_forward_and_keeps_nothing(device, xp, rng):
    model = fg.MLP([5, 7, 3], activation="gelu", device=device)
    x1 = xp.asarray(rng.standard_normal((4, 5)).astype(np.float32))
    x2 = xp.asarray(rng.standard_normal((4, 5)).astype(np.float32))
    p = model.predict(x1)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward(xp.ones((4, 3), np.float32))    # predict kept nothing to differentiate
    y = model.forward(x1)
    np.testing.assert_array_equal(to_numpy(p), to_numpy(y))
    dy = xp.asarray(rng.standard_normal((4, 3)).astype(np.float32))
    model.backward(dy)
    g = to_numpy(model.grads).copy()
    model.predict(x2)                                   # must not replace forward's cache
    model.backward(dy)
    np.testing.assert_array_equal(to_numpy(model.grads), g)
    np.testing.assert_array_equal(to_numpy(model.predict(x1)), to_numpy(y))


def test_layer_path_runs_the_step_driver(device, xp, rng):
    """model.forward / backward are the device's step driver without its
    loss and update: a driver for the model's pieces, then the one of the
    model's TrainStep (whose helpers that step compiled), with the same
    results."""
    model = fg.MLP([5, 7, 3], activation="tanh", dropout=0.2, device=device, dtype="float64")
    driver = model._layer_driver()[0]
    assert "dropout" in driver.SERVED_FEATURES and hasattr(driver, "backward")
    x = xp.asarray(rng.standard_normal((4, 5)))
    dy = xp.asarray(rng.standard_normal((4, 3)))
    model.dropout_step = 7
    y1, dx1 = to_numpy(model.forward(x)), to_numpy(model.backward(dy))
    step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.1))
    assert model._layer_driver()[0] is step._kernels
    model.dropout_step = 7
    y2, dx2 = to_numpy(model.forward(x)), to_numpy(model.backward(dy))
    np.testing.assert_array_equal(y2, y1)
    np.testing.assert_array_equal(dx2, dx1)


# --- flat buffer, views ----------------------------------------------------------------

def test_params_and_grads_are_views(device, xp):
    model = fg.MLP([4, 6, 3, 2], device=device, seed=0)
    assert model.params.ndim == 1 and model.params.flags.c_contiguous
    assert model.params.shape == model.grads.shape == (4 * 6 + 6 + 6 * 3 + 3 + 3 * 2 + 2,)
    assert model.n_params == model.params.size
    offs = list(model.layer_offsets)
    assert offs[0] == 0 and offs[-1] == model.n_params and len(offs) == 4
    for i, layer in enumerate(model.layers):
        seg = to_numpy(model.params[offs[i]:offs[i + 1]])
        np.testing.assert_array_equal(seg, np.concatenate([to_numpy(layer.W).ravel(),
                                                           to_numpy(layer.b)]))
        assert layer.W.shape == (layer.n_in, layer.n_out) and layer.b.shape == (layer.n_out,)
        assert layer.dW.shape == layer.W.shape and layer.db.shape == layer.b.shape
    # writing through a view changes the flat buffer, and vice versa
    model.layers[1].W[2, 1] = 42.0
    assert float(model.params[offs[1] + 2 * 3 + 1]) == 42.0
    model.layers[2].b[1] = -7.0
    assert float(model.params[offs[3] - 1]) == -7.0
    model.params[offs[1]] = 5.0
    assert float(model.layers[1].W[0, 0]) == 5.0
    model.layers[0].db[:] = 3.0
    assert (to_numpy(model.grads[offs[1] - 6:offs[1]]) == 3.0).all()
    model.grads[offs[2]] = 9.0
    assert float(model.layers[2].dW[0, 0]) == 9.0
    # forward sees a change made through the flat buffer
    x = xp.ones((1, 4), np.float32)
    y0 = to_numpy(model.predict(x)).copy()
    # (the user's own arithmetic on the flat buffer: on the host here, the
    # emulated CuPy offers none)
    be = model.backend
    model.params[offs[3] - 2:] = be.to_device(to_numpy(model.params[offs[3] - 2:]) + 1.0)
    np.testing.assert_allclose(to_numpy(model.predict(x)), y0 + 1.0, rtol=1e-6)


def test_sequential_of_dense(device, rng):
    layers = [fg.Dense(3, 5, activation="elu", alpha=0.5, init="xavier_uniform"),
              fg.Dense(5, 2, activation=None, init="zeros")]
    model = fg.Sequential(layers, dtype="float64", device=device, seed=7)
    assert model.sizes == [3, 5, 2]
    assert model.layers[0].alpha == 0.5 and model.layers[1].activation == "identity"
    assert not to_numpy(model.layers[1].W).any() and not to_numpy(model.layers[0].b).any()
    mlp = fg.MLP([3, 5, 2], activation="elu", alpha=0.5, init="xavier_uniform",
                 dtype="float64", device=device, seed=7)
    np.testing.assert_array_equal(to_numpy(mlp.layers[0].W), to_numpy(model.layers[0].W))
    assert "Dense(3, 5" in repr(model)


# --- initializers and seeds ------------------------------------------------------------

@pytest.mark.parametrize("init", ["xavier_uniform", "xavier_normal", "he_uniform",
                                  "he_normal", "zeros"])
def test_initializer_statistics(device, init):
    n_in, n_out = 400, 300
    model = fg.MLP([n_in, n_out], init=init, dtype="float64", device=device, seed=11)
    W = to_numpy(model.layers[0].W)
    assert not to_numpy(model.layers[0].b).any(), "biases start at zero"
    glorot_lim = np.sqrt(6 / (n_in + n_out))
    he_lim = np.sqrt(6 / n_in)
    expect_std = {"xavier_uniform": glorot_lim / np.sqrt(3),
                  "xavier_normal": np.sqrt(2 / (n_in + n_out)),
                  "he_uniform": he_lim / np.sqrt(3),
                  "he_normal": np.sqrt(2 / n_in), "zeros": 0.0}[init]
    if init == "zeros":
        assert not W.any()
        return
    assert W.std() == pytest.approx(expect_std, rel=0.02)
    assert abs(W.mean()) < 0.02 * expect_std
    if init.endswith("uniform"):
        lim = glorot_lim if init.startswith("xavier") else he_lim
        assert np.abs(W).max() <= lim
        assert np.abs(W).max() > 0.99 * lim
    else:
        assert np.abs(W).max() > 3.5 * expect_std          # tails of a normal, not a uniform
        kurt = np.mean((W / W.std()) ** 4)
        assert kurt == pytest.approx(3.0, abs=0.1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_seed_reproducible(device, dtype):
    a = fg.MLP([7, 9, 4], init="he_uniform", dtype=dtype, device=device, seed=123)
    b = fg.MLP([7, 9, 4], init="he_uniform", dtype=dtype, device=device, seed=123)
    c = fg.MLP([7, 9, 4], init="he_uniform", dtype=dtype, device=device, seed=124)
    np.testing.assert_array_equal(to_numpy(a.params), to_numpy(b.params))
    assert not np.array_equal(to_numpy(a.params), to_numpy(c.params))
    assert a.params.dtype == np.dtype(dtype)
    # layers are initialised from different draws
    assert not np.array_equal(to_numpy(a.layers[0].W)[:4, :4], to_numpy(a.layers[1].W)[:4, :4])


@pytest.mark.cuda
def test_cuda_model_reads_a_strided_device_input(cuda_be):
    """A column slice of a device array reaches the kernels as a C-ordered
    copy (``cupy.asarray(order="C")`` copies, as the emulator now does too:
    it handed the slice through, and a residual first layer read it as if
    contiguous)."""
    big = np.random.default_rng().standard_normal((5, 8)).astype(np.float32)

    def build(device):
        return fg.Sequential([fg.Residual(fg.Dense(4, 4, activation="relu")),
                              fg.Dense(4, 2)], device=device, seed=0)
    got = cuda_be.to_host(build("cuda").predict(cuda_be.to_device(big)[:, 1:5]))
    want = build("cpu").predict(np.ascontiguousarray(big[:, 1:5]))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_settings_written_before_placement_are_checked_and_take_effect(rng):
    # the kernels kept the constructor's activation code (relu ran where
    # repr and to_torch said tanh); dropout=1.5 was taken
    d = fg.Dense(4, 3, activation="relu")
    d.activation = "tanh"
    assert (d.code, d.alpha) == (fg.kernels.cpu.activations.CODES["tanh"], 0.0)
    model = fg.Sequential([d], dtype="float64", seed=0)
    x = rng.standard_normal((6, 4))
    np.testing.assert_allclose(model.predict(x), np.tanh(x @ d.W + d.b), rtol=1e-13)
    e = fg.Dense(3, 3, activation="relu")
    e.activation = "elu"                          # its default alpha, not relu's
    assert e.alpha == 1.0
    e.alpha = 0.5
    assert e.alpha == 0.5
    with pytest.raises(ValueError, match="dropout"):
        e.dropout = 1.5
    with pytest.raises(ValueError, match="norm"):
        e.norm = "group"
    with pytest.raises(AttributeError, match="fixed"):
        e.n_out = 4
    assert (e.dropout, e.norm) == (0.0, None)     # a refused write changes nothing


def test_constructor_and_mode_arguments_are_checked():
    with pytest.raises(ValueError, match="norm"):
        fg.MLP([3, 2], norm="foo")               # no hidden layer: it was never looked at
    with pytest.raises(TypeError, match="alpha must be a number"):
        fg.Dense(3, 3, activation="leaky_relu", alpha="0.1")
    model = fg.MLP([3, 4, 2], seed=0)
    with pytest.raises(ValueError, match="boolean"):
        model.train("no")                         # torch's message; it trained on
    assert model.train(False) is model and not model.training


def test_a_torch_tensor_that_requires_grad_is_read_as_its_values():
    torch = pytest.importorskip("torch")
    model = fg.MLP([3, 4, 2], dtype="float64", seed=0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    np.testing.assert_array_equal(model.predict(x), model.predict(x.detach().numpy()))
