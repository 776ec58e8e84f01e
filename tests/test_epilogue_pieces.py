"""The epilogue pieces at work (fastgrad/epilogue.py; formerly the
"explosion toolkit", issue 9): residual blocks, dropout, batch/layer norm and
weight norm in layers and models -- against fastgrad.reference and PyTorch,
gradients against central differences, TrainStep against the layer path,
and checkpoints.  Models with every piece run on every device (the
``device`` fixture) against a float64 NumPy twin of the layer path and a
float64 CPU layer-path trajectory; the fused step is also replayed from a
CUDA graph.  Their kernels are tested in test_epilogue_kernels.py, the
table itself in test_epilogue.py."""
import importlib.util
import json

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import epilogue, reference

from conftest import ACTIVATIONS, assert_close, to_numpy, torch_activation


def _torch():
    return pytest.importorskip(
        "torch", reason="PyTorch parity test: torch is not installed (pip install 'fastgrad[peers]')")


# --- against PyTorch ------------------------------------------------------------

@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_residual_block_matches_torch(rng, act, p):
    """y = x + dropout(act(Linear(x))) in torch, with fastgrad's mask applied
    by hand (nn.Dropout draws its own), forward and gradients to 1e-10."""
    torch = _torch()
    nn = torch.nn
    B, n = 6, 9
    model = fg.Sequential([fg.Residual(fg.Dense(n, n, activation=act, dropout=p)),
                           fg.Dense(n, 4, activation=None)], dtype="float64", seed=4)
    x = rng.standard_normal((B, n))
    dy = rng.standard_normal((B, 4))
    c = model.dropout_step
    y = model.forward(x)
    dx = model.backward(dy)
    mask = torch.tensor(reference.dropout_mask(model._mask_seed, 0, c, (B, n), p)
                        if p else np.ones((B, n)))

    lin0, lin1 = nn.Linear(n, n, dtype=torch.float64), nn.Linear(n, 4, dtype=torch.float64)
    with torch.no_grad():
        for lin, layer in ((lin0, model.layers[0]), (lin1, model.layers[1])):
            lin.weight.copy_(torch.tensor(layer.W.T))
            lin.bias.copy_(torch.tensor(layer.b))
    f = torch_activation(act)
    xt = torch.tensor(x, requires_grad=True)
    h = xt + f(lin0(xt)) * mask / (1 - p)
    yt = lin1(h)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.layers[0].dW, lin0.weight.grad.numpy().T, rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(model.layers[0].db, lin0.bias.grad.numpy(), rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(model.layers[1].dW, lin1.weight.grad.numpy().T, rtol=1e-10,
                               atol=1e-12)


def test_dropout_rate_matches_torch_statistics():
    """Same rate and scaling as nn.Dropout: the mean of a dropped unit
    vector stays 1 in expectation and kept units equal 1 / (1 - p)."""
    torch = _torch()
    p = 0.3
    model = fg.Sequential([fg.Dense(1, 200000, activation=None, init="zeros", dropout=p)],
                          dtype="float64")
    model.layers[0].b[...] = 1.0
    y = model.forward(np.ones((1, 1)))
    t = torch.nn.Dropout(p)(torch.ones(1, 200000, dtype=torch.float64)).numpy()
    assert set(np.unique(y)) == set(np.unique(t)) == {0.0, 1.0 / (1 - p)}
    assert abs(y.mean() - 1.0) < 4 * np.sqrt(p / (1 - p) / 200000)


# --- gradients against central differences ------------------------------------------

def _fd_check(model, x, target, h=1e-5):
    """Analytic gradients (one training forward at a fixed counter) against
    finite differences of the same forward (the counter reset every time,
    so every evaluation draws the same masks).  Five-point differences: the
    O(h^2) truncation error of plain central differences shows at 1e-6
    relative through a normalisation's curvature."""
    loss_fn = fg.MSE()
    c = model.dropout_step

    def loss_at():
        model.dropout_step = c
        return loss_fn(model.forward(x), target)[0]

    def diff(arr, idx):
        v0 = arr[idx]
        f = []
        for k in (2, 1, -1, -2):
            arr[idx] = v0 + k * h
            f.append(loss_at())
        arr[idx] = v0
        return (8 * (f[1] - f[2]) - (f[0] - f[3])) / (12 * h)

    model.dropout_step = c
    value, dy = loss_fn(model.forward(x), target)
    dx = model.backward(dy).copy()
    grads = model.grads.copy()
    fd = np.array([diff(model.params, i) for i in range(model.params.size)])
    fdx = np.empty_like(x)
    for idx in np.ndindex(*x.shape):
        fdx[idx] = diff(x, idx)
    # The difference quotient carries the loss's rounding: a few ulps of the
    # loss over h (about 1e-9 here), which a gradient under 1e-3 reaches.
    rounding = 64 * np.finfo(np.float64).eps * abs(float(value)) / h
    for g, ref, what in ((grads, fd, "dparams"), (dx, fdx, "dx")):
        err = (np.abs(g - ref) - rounding) / np.maximum(np.abs(g) + np.abs(ref), 1e-3)
        assert err.max() < 1e-6, f"{what}: max relative error {err.max():.3g}"
    assert np.abs(grads).max() > 0


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_residual_gradcheck(rng, act):
    model = fg.Sequential([fg.Dense(3, 4, activation=act),
                           fg.Residual(fg.Dense(4, 4, activation=act)),
                           fg.Dense(4, 2, activation=None)], dtype="float64", seed=1)
    for _ in range(100):
        # Finite differences straddling a kink (relu, leaky_relu at 0) are
        # wrong by the jump (about 1 draw in 800 here): draw again.
        model.params[...] = rng.standard_normal(model.n_params) * 0.7
        x = rng.standard_normal((5, 3))
        z0 = x @ model.layers[0].W + model.layers[0].b
        h0 = reference.activation(z0, act)
        z1 = h0 @ model.layers[1].W + model.layers[1].b
        if min(np.abs(z0).min(), np.abs(z1).min()) > 1e-3:
            break
    _fd_check(model, x, rng.standard_normal((5, 2)))


@pytest.mark.parametrize("act", ["tanh", "gelu", "elu"])
@pytest.mark.parametrize("residual", [False, True])
def test_dropout_gradcheck(rng, act, residual):
    hidden = fg.Dense(4, 4, activation=act, dropout=0.4)
    model = fg.Sequential([fg.Dense(3, 4, activation=act, dropout=0.3),
                           fg.Residual(hidden) if residual else hidden,
                           fg.Dense(4, 2, activation=None)], dtype="float64", seed=2)
    model.params[...] = rng.standard_normal(model.n_params) * 0.7
    model.dropout_step = int(rng.integers(100))
    _fd_check(model, rng.standard_normal((6, 3)), rng.standard_normal((6, 2)))


@pytest.mark.parametrize("pieces", [{}, {"dropout": 0.3}, {"norm": "layer"}, {"norm": "batch"},
                                    {"weight_norm": True}])
def test_residual_first_layer_gradcheck(rng, pieces):
    """A residual block as the first layer: the driver's backward makes its
    dL/dx from the dz and the skip gradient it left in its delta strides."""
    model = fg.Sequential([fg.Residual(fg.Dense(4, 4, activation="tanh", **pieces)),
                           fg.Dense(4, 2, activation=None)], dtype="float64", seed=3)
    model.params[...] = rng.standard_normal(model.n_params) * 0.7
    model.dropout_step = int(rng.integers(100))
    _fd_check(model, rng.standard_normal((6, 4)), rng.standard_normal((6, 2)))


# --- modes, p = 0, bad input -----------------------------------------------------------

def test_train_eval_modes(rng):
    model = fg.MLP([5, 8, 8, 3], activation="relu", dropout=0.5, residual=True,
                   dtype="float64", seed=3)
    assert isinstance(model.layers[1], fg.Residual) and not model.layers[0].residual
    assert model.layers[1].layer.dropout == 0.5 and model.layers[2].dropout == 0.0
    x = rng.standard_normal((4, 5))
    assert model.training and model.dropout_step == 0
    y1, y2 = model.forward(x), model.forward(x)
    assert model.dropout_step == 2 and not np.array_equal(y1, y2)
    pred = model.predict(x)
    assert model.dropout_step == 2
    assert model.eval() is model and not model.training
    np.testing.assert_array_equal(model.forward(x), pred)
    assert model.dropout_step == 2
    model.train()
    model.dropout_step = 0
    np.testing.assert_array_equal(model.forward(x), y1)


def test_p_zero_is_bit_identical(rng):
    plain = fg.MLP([6, 9, 9, 3], activation="gelu", dtype="float32", seed=5)
    zero = fg.MLP([6, 9, 9, 3], activation="gelu", dtype="float32", seed=5, dropout=0.0)
    assert not zero.has_epilogue
    x = rng.standard_normal((7, 6)).astype(np.float32)
    y = rng.integers(0, 3, 7)
    np.testing.assert_array_equal(plain.forward(x), zero.forward(x))
    dy = rng.standard_normal((7, 3)).astype(np.float32)
    np.testing.assert_array_equal(plain.backward(dy), zero.backward(dy))
    np.testing.assert_array_equal(plain.grads, zero.grads)
    steps = [fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m)) for m in (plain, zero)]
    for _ in range(3):
        assert steps[0](x, y) == steps[1](x, y)
    np.testing.assert_array_equal(plain.params, zero.params)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), True, "0.5", None])
def test_bad_dropout_rate(p):
    with pytest.raises(ValueError, match="dropout"):
        fg.Dense(3, 3, dropout=p)
    with pytest.raises(ValueError, match="dropout"):
        fg.MLP([3, 3, 2], dropout=p)


def test_bad_residual():
    with pytest.raises(ValueError, match="n_in == n_out"):
        fg.Residual(fg.Dense(3, 4))
    with pytest.raises(TypeError):
        fg.Residual("dense")
    d = fg.Dense(3, 3)
    fg.Residual(d)
    with pytest.raises(ValueError, match="already"):
        fg.Residual(d)
    with pytest.raises(ValueError, match="residual"):
        fg.MLP([3, 4, 5, 2], residual=True)
    inner = fg.Dense(3, 3)
    block = fg.Residual(inner)
    with pytest.raises(ValueError, match="twice"):
        fg.Sequential([block, inner])
    with pytest.raises(ValueError, match="pass the Residual"):
        fg.Sequential([inner])


def test_residual_model_refuses_to_torch():
    _torch()                       # to_torch needs PyTorch before it looks at the layers
    m = fg.MLP([3, 4, 4, 2], residual=True)
    if importlib.util.find_spec("torch") is not None:
        # to_torch expresses residual blocks (fastgrad.interop.ResidualBlock)
        assert type(m.to_torch()[2]).__name__ == "ResidualBlock"


# --- TrainStep ----------------------------------------------------------------------

@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse"])
def test_trainstep_equals_layer_path(rng, act, loss):
    sizes = [5, 7, 7, 7, 3]
    pairs = []
    for _ in range(2):
        m = fg.MLP(sizes, activation=act, dtype="float64", seed=6, dropout=0.3, residual=True)
        pairs.append((m, fg.Adam(m, lr=1e-2, clip_norm=0.5)))
    (m1, o1), (m2, o2) = pairs
    loss_fn = fg.SoftmaxCrossEntropy() if loss == "softmax_cross_entropy" else fg.MSE()
    step = fg.TrainStep(m2, loss_fn, o2)
    for k in range(20):
        if k == 15:                      # eval-mode steps: no dropout, no counter
            m1.eval()
            m2.eval()
        x = rng.standard_normal((9, sizes[0])) * 2
        y = (rng.integers(0, 3, 9) if loss == "softmax_cross_entropy"
             else rng.standard_normal((9, 3)))
        out = m1.forward(x)
        l1, dy = loss_fn(out, y)
        m1.backward(dy, input_grad=False)
        s1 = o1.step()
        l2 = step(x, y)
        np.testing.assert_allclose(l2, l1, rtol=1e-12)
        np.testing.assert_allclose(step.stats.grad_norm, s1.grad_norm, rtol=1e-12)
    assert m1.dropout_step == m2.dropout_step == 15
    np.testing.assert_allclose(m2.params, m1.params, rtol=1e-12,
                               atol=1e-12 * np.abs(m1.params).max())


def test_plain_model_never_compiles_toolkit_code(per_model_copies):
    """A plain model's step driver is compiled with every layer feature off
    (tests/test_kernel_copies.py checks its compiled code)."""
    m = fg.MLP([4, 5, 3], dtype="float32")
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m))
    step(np.ones((2, 4), np.float32), [0, 1])
    assert not step._blocks and step._kernels.SERVED_FEATURES == ()
    assert m.dropout_step == 1


# --- checkpoints ------------------------------------------------------------------------

def _train(step, rng_seed, n, start=0):
    rng = np.random.default_rng(rng_seed)
    batches = [(rng.standard_normal((8, 5)), rng.integers(0, 3, 8)) for _ in range(start + n)]
    for x, y in batches[start:]:
        step(x, y)


def test_checkpoint_round_trip_and_bitwise_resume(tmp_path):
    def make():
        m = fg.MLP([5, 6, 6, 3], activation="relu", dropout=0.3, residual=True, seed=11)
        return m, fg.Adam(m, lr=1e-2, clip_norm=1.0)

    m_ref, o_ref = make()
    _train(fg.TrainStep(m_ref, fg.SoftmaxCrossEntropy(), o_ref), 0, 10)

    m, o = make()
    _train(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), o), 0, 6)
    fg.save(tmp_path / "run.fgz", m, o)
    m2, o2 = fg.load(tmp_path / "run.fgz")
    assert m2.dropout_step == 6 and m2._mask_seed == m._mask_seed and m2.training
    assert isinstance(m2.layers[1], fg.Residual)
    assert [l.dropout for l in m2.layers] == [0.3, 0.3, 0.0]
    assert [l.residual for l in m2.layers] == [False, True, False]
    np.testing.assert_array_equal(m2.params, m.params)
    _train(fg.TrainStep(m2, fg.SoftmaxCrossEntropy(), o2), 0, 4, start=6)
    np.testing.assert_array_equal(m2.params, m_ref.params)


def test_old_checkpoint_without_new_fields_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    m = fg.MLP([3, 4, 2], seed=2)
    fg.save(tmp_path / "new.fgz", m)
    with safe_open(str(tmp_path / "new.fgz"), framework="np") as f:
        meta = json.loads(f.metadata()["fastgrad"])
        params = f.get_tensor("params")
    for key in ("dropout_step", "mask_seed", "training"):
        del meta["model"][key]
    for layer in meta["model"]["layers"]:
        del layer["dropout"], layer["residual"]
    meta["format_version"] = 1          # as written before these fields (and gelu_tanh)
    save_file({"params": params}, str(tmp_path / "old.fgz"),
              metadata={"fastgrad": json.dumps(meta)})
    m2, _ = fg.load(tmp_path / "old.fgz")
    assert not m2.has_epilogue and m2.dropout_step == 0 and m2.training
    np.testing.assert_array_equal(m2.params, m.params)


@pytest.mark.parametrize("field,value,match", [
    ("dropout", 1.0, "dropout"), ("dropout", True, "dropout"), ("residual", 1, "residual"),
])
def test_bad_checkpoint_fields(tmp_path, field, value, match):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    m = fg.MLP([3, 4, 2], seed=2)
    fg.save(tmp_path / "a.fgz", m)
    with safe_open(str(tmp_path / "a.fgz"), framework="np") as f:
        meta = json.loads(f.metadata()["fastgrad"])
        params = f.get_tensor("params")
    meta["model"]["layers"][0][field] = value
    save_file({"params": params}, str(tmp_path / "b.fgz"),
              metadata={"fastgrad": json.dumps(meta)})
    with pytest.raises(ValueError, match=match):
        fg.load(tmp_path / "b.fgz")


# --- LayerNorm and BatchNorm1d ------------------------------------------------------

def _norm_model(kind, act, dtype="float64", residual=False, dropout=0.0, seed=0, device=None):
    first = fg.Dense(5, 6, activation=act, norm=kind, dropout=dropout)
    hidden = fg.Dense(6, 6, activation=act, norm=kind)
    return fg.Sequential([first, fg.Residual(hidden) if residual else hidden,
                          fg.Dense(6, 3, activation=None)], dtype=dtype, seed=seed, device=device)


@pytest.mark.parametrize("kind", ["layer", "batch"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_norm_matches_torch(rng, kind, training, act):
    """Linear -> LayerNorm / BatchNorm1d -> act, twice, then Linear: forward,
    every gradient and the running statistics against torch to 1e-10."""
    torch = _torch()
    model = _norm_model(kind, act)
    model.params[...] = rng.standard_normal(model.n_params)
    model.running_mean[...] = rng.standard_normal(model.running_mean.size)
    model.running_var[...] = rng.uniform(0.5, 2.0, model.running_var.size)
    seq = model.to_torch()          # softplus: torch's threshold 20 on both sides
    model.train(training)
    seq.train(training)
    x = rng.standard_normal((7, 5)) * 3 + 1
    dy = rng.standard_normal((7, 3))
    y = model.forward(x)
    dx = model.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = seq(xt)
    yt.backward(torch.tensor(dy))
    close = dict(rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(y, yt.detach().numpy(), **close)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **close)
    lins = [m for m in seq if isinstance(m, torch.nn.Linear)]
    norms = [m for m in seq if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm))]
    for layer, lin in zip(model.layers, lins):
        np.testing.assert_allclose(layer.dW, lin.weight.grad.numpy().T, **close)
        np.testing.assert_allclose(layer.db, lin.bias.grad.numpy(), **close)
    for layer, nm in zip(model.layers, norms):
        np.testing.assert_allclose(layer.dgamma, nm.weight.grad.numpy(), **close)
        np.testing.assert_allclose(layer.dbeta, nm.bias.grad.numpy(), **close)
        if kind == "batch":
            np.testing.assert_allclose(layer.running_mean, nm.running_mean.numpy(), **close)
            np.testing.assert_allclose(layer.running_var, nm.running_var.numpy(), **close)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["layer", "batch"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
def test_norm_layer_matches_reference(rng, dtype, kind, training, act):
    B, n_in, n = 9, 17, 13
    layer = fg.Dense(n_in, n, activation=act, norm=kind)
    model = fg.Sequential([layer], dtype=dtype)
    model.params[...] = rng.standard_normal(model.n_params).astype(dtype)
    rm0 = rng.standard_normal(n)
    rv0 = rng.uniform(0.5, 2.0, n)
    model.running_mean[...], model.running_var[...] = rm0, rv0
    model.train(training)
    x = rng.standard_normal((B, n_in)).astype(dtype)
    dy = rng.standard_normal((B, n)).astype(dtype)
    y = model.forward(x)
    dx = model.backward(dy)
    W, b, g, be = (np.asarray(t, np.float64) for t in (layer.W, layer.b, layer.gamma, layer.beta))
    z = x.astype(np.float64) @ W + b
    xhat, u, rstd, rm, rv = reference.norm_forward(z, kind, g, be, rm0, rv0,
                                                   training=training or kind == "layer")
    ry = reference.activation(u, act)
    du = dy * reference.activation_grad(u, act)
    dz, dg, dbe = reference.norm_backward(du, xhat, rstd, g, kind,
                                          training=training or kind == "layer")
    assert_close(y, ry, dtype, what="y")
    assert_close(dx, dz @ W.T, dtype, what="dx")
    assert_close(layer.dW, x.T.astype(np.float64) @ dz, dtype, what="dW")
    assert_close(layer.dgamma, dg, dtype, what="dgamma")
    assert_close(layer.dbeta, dbe, dtype, what="dbeta")
    if kind == "batch":
        np.testing.assert_allclose(layer.running_mean, rm, rtol=1e-5 if dtype == np.float32
                                   else 1e-12, atol=1e-6)
        np.testing.assert_allclose(layer.running_var, rv, rtol=1e-5 if dtype == np.float32
                                   else 1e-12, atol=1e-6)


@pytest.mark.parametrize("kind", ["layer", "batch"])
@pytest.mark.parametrize("act", ["tanh", "gelu", "softplus"])
def test_norm_gradcheck(rng, kind, act):
    model = _norm_model(kind, act, residual=True, dropout=0.3, seed=1)
    model.params[...] = rng.standard_normal(model.n_params) * 0.7
    _fd_check(model, rng.standard_normal((6, 5)), rng.standard_normal((6, 3)))


def test_batch_norm_batch_of_one():
    model = _norm_model("batch", "relu")
    step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.1))
    x, y = np.ones((1, 5)), np.ones((1, 3))
    with pytest.raises(ValueError, match="batch of 1"):
        model.forward(x)
    with pytest.raises(ValueError, match="batch of 1"):
        step(x, y)
    model.predict(x)
    model.eval()
    model.forward(x)
    step(x, y)
    layer_norm = _norm_model("layer", "relu")
    layer_norm.forward(x)


def test_bad_norm():
    with pytest.raises(ValueError, match="norm"):
        fg.Dense(3, 3, norm="group")
    with pytest.raises(ValueError, match="norm"):
        fg.MLP([3, 4, 2], norm="instance")
    m = fg.MLP([3, 4, 4, 2], norm="layer")
    assert [l.norm for l in m.layers] == ["layer", "layer", None]
    assert m.n_params == 3 * 4 + 4 * 3 + 4 * 4 + 4 * 3 + 4 * 2 + 2


@pytest.mark.parametrize("kinds", [("batch", "layer"), ("layer", "batch")])
def test_trainstep_with_norms_equals_layer_path(rng, kinds):
    def make():
        m = fg.Sequential([fg.Dense(5, 7, activation="tanh", norm=kinds[0], dropout=0.2),
                           fg.Residual(fg.Dense(7, 7, activation="gelu", norm=kinds[1],
                                                dropout=0.3)),
                           fg.Residual(fg.Dense(7, 7, activation="relu")),
                           fg.Dense(7, 3, activation=None)], dtype="float64", seed=3)
        return m, fg.Adam(m, lr=1e-2, clip_norm=0.5)
    (m1, o1), (m2, o2) = make(), make()
    loss_fn = fg.SoftmaxCrossEntropy()
    step = fg.TrainStep(m2, loss_fn, o2)
    for k in range(20):
        if k == 15:
            m1.eval()
            m2.eval()
        x, y = rng.standard_normal((9, 5)) * 2, rng.integers(0, 3, 9)
        l1, dy = loss_fn(m1.forward(x), y)
        m1.backward(dy, input_grad=False)
        o1.step()
        np.testing.assert_allclose(step(x, y), l1, rtol=1e-12)
    np.testing.assert_allclose(m2.params, m1.params, rtol=1e-12,
                               atol=1e-12 * np.abs(m1.params).max())
    np.testing.assert_allclose(m2.running_var, m1.running_var, rtol=1e-12)
    np.testing.assert_allclose(m2.running_mean, m1.running_mean, rtol=1e-12, atol=1e-14)


def test_norm_checkpoint_round_trip(device, tmp_path, rng):
    """A model with batch norm, dropout and a residual block, trained on the
    device, comes back from its checkpoint on the device with the same
    parameters, running statistics and dropout step."""
    m = _norm_model("batch", "relu", residual=True, dropout=0.1, device=device)
    be = m.backend
    opt = fg.Adam(m)
    step = fg.TrainStep(m, fg.MSE(), opt)
    for _ in range(3):
        step(rng.standard_normal((5, 5)), rng.standard_normal((5, 3)))
    fg.save(tmp_path / "n.fgz", m, opt)
    m2, o2 = fg.load(tmp_path / "n.fgz", device=device)
    assert m2.device == device
    assert [l.norm for l in m2.layers] == ["batch", "batch", None]
    assert m2.dropout_step == m.dropout_step == 3 and m2._mask_seed == m._mask_seed
    np.testing.assert_array_equal(to_numpy(m2.params), to_numpy(m.params))
    np.testing.assert_array_equal(to_numpy(m2.running_mean), to_numpy(m.running_mean))
    np.testing.assert_array_equal(to_numpy(m2.running_var), to_numpy(m.running_var))
    x = be.to_device(rng.standard_normal((4, 5)))
    np.testing.assert_array_equal(to_numpy(m2.predict(x)), to_numpy(m.predict(x)))
    ln = _norm_model("layer", "tanh", device=device)
    fg.save(tmp_path / "l.fgz", ln)
    ln2, _ = fg.load(tmp_path / "l.fgz", device=device)
    np.testing.assert_array_equal(to_numpy(ln2.predict(x)), to_numpy(ln.predict(x)))


# --- weight normalisation -------------------------------------------------------------

def test_weight_norm_starts_at_the_drawn_weights():
    plain = fg.MLP([4, 6, 3], seed=9, dtype="float64")
    wn = fg.MLP([4, 6, 3], seed=9, dtype="float64", weight_norm=True)
    assert wn.n_params == plain.n_params + 6 + 3
    for a, b in zip(plain.layers, wn.layers):
        np.testing.assert_array_equal(b.v, a.W)
        np.testing.assert_allclose(b.W, a.W, rtol=1e-14)
    x = np.random.default_rng(0).standard_normal((5, 4))
    np.testing.assert_allclose(wn.predict(x), plain.predict(x), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_norm_matches_reference(rng, dtype):
    layer = fg.Dense(7, 5, activation="tanh", weight_norm=True)
    model = fg.Sequential([layer], dtype=dtype)
    model.params[...] = rng.standard_normal(model.n_params).astype(dtype)
    x = rng.standard_normal((6, 7)).astype(dtype)
    dy = rng.standard_normal((6, 5)).astype(dtype)
    y = model.forward(x)
    dx = model.backward(dy)
    W = reference.weight_norm(layer.v, layer.g)
    z, a = reference.dense_forward(x, W, layer.b, "tanh")
    dW, db, rdx = reference.dense_backward(x, W, z, dy, "tanh")
    dv, dg = reference.weight_norm_backward(layer.v, layer.g, dW)
    assert_close(y, a, dtype, what="y")
    assert_close(dx, rdx, dtype, what="dx")
    assert_close(layer.dv, dv, dtype, what="dv")
    assert_close(layer.dg, dg, dtype, what="dg")
    assert_close(layer.db, db, dtype, what="db")


def test_weight_norm_matches_torch(rng):
    torch = _torch()
    from torch.nn.utils.parametrizations import weight_norm
    model = fg.Sequential([fg.Dense(5, 6, activation="gelu", weight_norm=True),
                           fg.Dense(6, 3, activation=None, weight_norm=True)], dtype="float64")
    model.params[...] = rng.standard_normal(model.n_params)
    x, dy = rng.standard_normal((4, 5)), rng.standard_normal((4, 3))
    y = model.forward(x)
    model.backward(dy)
    lins = []
    for layer in model.layers:
        lin = weight_norm(torch.nn.Linear(layer.n_in, layer.n_out, dtype=torch.float64), dim=0)
        with torch.no_grad():
            lin.parametrizations.weight.original0.copy_(torch.tensor(layer.g[:, None]))
            lin.parametrizations.weight.original1.copy_(torch.tensor(layer.v.T))
            lin.bias.copy_(torch.tensor(layer.b))
        lins.append(lin)
    seq = torch.nn.Sequential(lins[0], torch.nn.GELU(), lins[1])     # exact, as fastgrad's gelu
    yt = seq(torch.tensor(x))
    yt.backward(torch.tensor(dy))
    close = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(y, yt.detach().numpy(), **close)
    for layer, lin in zip(model.layers, lins):
        pw = lin.parametrizations.weight
        np.testing.assert_allclose(layer.dg, pw.original0.grad.numpy()[:, 0], **close)
        np.testing.assert_allclose(layer.dv, pw.original1.grad.numpy().T, **close)
        np.testing.assert_allclose(layer.db, lin.bias.grad.numpy(), **close)


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_weight_norm_gradcheck(rng, act):
    model = fg.Sequential([fg.Dense(3, 4, activation=act, weight_norm=True, norm="layer"),
                           fg.Residual(fg.Dense(4, 4, activation=act, weight_norm=True,
                                                dropout=0.2)),
                           fg.Dense(4, 2, activation=None, weight_norm=True)],
                          dtype="float64", seed=2)
    model.params[...] = rng.standard_normal(model.n_params) * 0.7 + 0.1
    _fd_check(model, rng.standard_normal((5, 3)), rng.standard_normal((5, 2)))


def test_weight_norm_trainstep_and_checkpoint(rng, tmp_path):
    def make():
        m = fg.MLP([5, 7, 7, 3], activation="tanh", dtype="float64", seed=4, weight_norm=True,
                   residual=True, dropout=0.1)
        return m, fg.Adam(m, lr=1e-2, clip_norm=0.5)
    (m1, o1), (m2, o2) = make(), make()
    loss_fn = fg.SoftmaxCrossEntropy()
    step = fg.TrainStep(m2, loss_fn, o2)
    for _ in range(20):
        x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
        l1, dy = loss_fn(m1.forward(x), y)
        m1.backward(dy, input_grad=False)
        o1.step()
        np.testing.assert_allclose(step(x, y), l1, rtol=1e-12)
    np.testing.assert_allclose(m2.params, m1.params, rtol=1e-12,
                               atol=1e-12 * np.abs(m1.params).max())
    fg.save(tmp_path / "w.fgz", m2, o2)
    m3, _ = fg.load(tmp_path / "w.fgz")
    assert all(l.weight_norm for l in m3.layers)
    x = rng.standard_normal((3, 5))
    np.testing.assert_array_equal(m3.predict(x), m2.predict(x))
    with pytest.raises(ValueError, match="weight_norm"):
        fg.Dense(3, 3, weight_norm="yes")




# --- every piece on every device: the layer path against a float64 NumPy twin ----------

VARIANTS = {
    "batchnorm": dict(norm="batch"),
    "layernorm": dict(norm="layer"),
    "dropout": dict(dropout=0.2),
    "residual": dict(residual=True),
    "weight_norm": dict(weight_norm=True),
    "all": dict(norm="batch", dropout=0.1, residual=True, weight_norm=True),
}


def _f64(a):
    return np.asarray(to_numpy(a), np.float64)


def _numpy_forward(model, x, counter):
    """The float64 NumPy twin of ``model.forward(x)`` at dropout step
    ``counter`` (None: eval mode, no dropout), from the model's parameters
    and running statistics, which it reads and leaves alone.  Returns the
    output, what :func:`_numpy_backward` needs per layer, and the running
    mean and variance the forward leaves."""
    training = counter is not None
    run_mean, run_var = _f64(model.running_mean).copy(), _f64(model.running_var).copy()
    h, cache, col = np.asarray(x, np.float64), [], 0
    for l, layer in enumerate(model.layers):
        W = (reference.weight_norm(_f64(layer.v), _f64(layer.g)) if layer.weight_norm
             else _f64(layer.W))
        z = h @ W + _f64(layer.b)
        u, xhat, rstd = z, None, None
        if layer.norm:
            units = slice(col, col + layer.n_out)
            xhat, u, rstd, rm, rv = reference.norm_forward(
                z, layer.norm, _f64(layer.gamma), _f64(layer.beta), run_mean[units],
                run_var[units], training=training or layer.norm == "layer")
            if layer.norm == "batch" and training:
                run_mean[units], run_var[units] = rm, rv
        f = reference.activation(u, layer.activation, layer.alpha)
        scaled_mask = None
        if training and layer.dropout:
            scaled_mask = reference.dropout_mask(model._mask_seed, l, counter, f.shape,
                                                 layer.dropout) / (1.0 - layer.dropout)
        y = f if scaled_mask is None else f * scaled_mask
        cache.append((h, W, u, xhat, rstd, scaled_mask, training))
        h = y + h if layer.residual else y
        col += layer.n_out
    return h, cache, run_mean, run_var


def _numpy_backward(model, cache, dy):
    """(the flat gradient of ``model.params``, dL/dx) of the twin's forward."""
    grads = np.zeros(model.n_params)
    offsets = to_numpy(model.layer_offsets)
    d = np.asarray(dy, np.float64)
    for l in range(len(model.layers) - 1, -1, -1):
        layer, (h, W, u, xhat, rstd, scaled_mask, training) = model.layers[l], cache[l]
        df = d if scaled_mask is None else d * scaled_mask
        dz = df * reference.activation_grad(u, layer.activation, layer.alpha)
        slot_grads = {}
        if layer.norm:
            dz, slot_grads["gamma"], slot_grads["beta"] = reference.norm_backward(
                dz, xhat, rstd, _f64(layer.gamma), layer.norm,
                training=training or layer.norm == "layer")
        dW = h.T @ dz
        slot_grads["b"] = dz.sum(axis=0)
        if layer.weight_norm:
            slot_grads["v"], slot_grads["g"] = reference.weight_norm_backward(
                _f64(layer.v), _f64(layer.g), dW)
        else:
            slot_grads["W"] = dW
        for slot, start, stop in epilogue.param_slots(layer, layer.n_in, layer.n_out,
                                                      int(offsets[l])):
            grads[start:stop] = slot_grads.pop(slot.name).ravel()
        assert not slot_grads, f"layer {l}: gradients of no slot: {sorted(slot_grads)}"
        d = dz @ W.T + d if layer.residual else dz @ W.T
    return grads, d


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "silu"])
def test_layer_path_matches_numpy(device, rng, variant, act):
    """A float32 model's forward, every parameter's gradient, dL/dx and the
    running statistics, then its eval-mode predict, against the float64
    NumPy twin of the same weights and masks."""
    model = fg.MLP([12, 24, 24, 24, 5], activation=act, dtype="float32", device=device, seed=3,
                   **VARIANTS[variant])
    be = model.backend
    x = rng.standard_normal((32, 12)).astype(np.float32)
    dy = rng.standard_normal((32, 5)).astype(np.float32)
    want, cache, run_mean, run_var = _numpy_forward(model, x, model.dropout_step)
    out = model.forward(be.to_device(x))
    assert be.is_array(out)
    assert_close(out, want, np.float32, what="forward")
    dx = model.backward(be.to_device(dy))
    grads, want_dx = _numpy_backward(model, cache, dy)
    assert_close(model.grads, grads, np.float32, what="gradients")
    assert_close(dx, want_dx, np.float32, what="dL/dx")
    assert_close(model.running_mean, run_mean, np.float32, what="running mean")
    assert_close(model.running_var, run_var, np.float32, what="running var")
    model.eval()
    assert_close(model.predict(be.to_device(x)), _numpy_forward(model, x, None)[0], np.float32,
                 what="eval predict")


def test_layer_dropout_drops_the_reference_mask(device, rng):
    """Identity activation: a unit is 0 after dropout exactly where the
    reference mask of (seed, layer, dropout step) drops it, step after step."""
    model = fg.MLP([7, 40, 3], activation=None, dropout=0.5, seed=11, dtype="float64",
                   device=device)
    x = model.backend.to_device(rng.standard_normal((9, 7)))
    for step in range(3):                       # three steps: three masks
        model.forward(x)
        h = to_numpy(model._cache[1][0])        # input of layer 1 = output of layer 0
        mask = reference.dropout_mask(model._mask_seed, 0, step, h.shape, 0.5)
        np.testing.assert_array_equal(h == 0, mask == 0, err_msg=f"step {step}")
    assert model.dropout_step == 3


# --- every piece on every device: TrainStep against a float64 layer-path trajectory ------

# every piece alone and in combinations (residual blocks need equal widths:
# the hidden layers of FUSED_SIZES)
FUSED_VARIANTS = dict(VARIANTS, **{
    "layernorm+dropout": dict(norm="layer", dropout=0.3),
    "residual+dropout": dict(residual=True, dropout=0.25),
    "weight_norm+layernorm+residual": dict(weight_norm=True, norm="layer", residual=True),
    "batchnorm+dropout+weight_norm": dict(norm="batch", dropout=0.2, weight_norm=True),
})
FUSED_SIZES = (13, 19, 19, 7)
# per-step tolerances against the float64 trajectory: float32 rounding
# (CPU float32 transcendentals are polynomials, CUDA's libm) compounds
# over the steps
FUSED_TOL = {"float32": 2e-4, "float64": 1e-10}


class _LayerPath:
    """The float64 CPU twin of a TrainStep, trained by the layer path
    (forward, loss, backward, ``opt.step``): the reference trajectory.  A
    skipped update leaves no trace, as TrainStep's does: the dropout step
    and the running statistics are put back."""

    def __init__(self, model, loss_fn, opt):
        self.model, self.loss_fn, self.opt, self.stats = model, loss_fn, opt, None

    def gradients(self, x, y):
        loss, dy = self.loss_fn(self.model.forward(np.asarray(x, np.float64)), y)
        self.model.backward(dy, input_grad=False)
        return loss

    def __call__(self, x, y):
        m = self.model
        before = (m.dropout_step, m.running_mean.copy(), m.running_var.copy())
        loss = self.gradients(x, y)
        self.stats = self.opt.step()
        if self.stats.skipped:
            m.dropout_step = before[0]
            m.running_mean[...], m.running_var[...] = before[1:]
        return loss


def _step_and_reference(device, variant, dtype, cuda_graph=False, sizes=FUSED_SIZES, seed=5,
                        **opt_kw):
    """A TrainStep of a model on ``device`` and its float64 CPU layer-path
    twin (same seed: same dropout masks; the twin starts from the model's
    own, possibly float32, weights).  SGD with momentum: the bias before a
    batch norm has a gradient of rounding noise only, which Adam would turn
    into +-lr steps."""
    opt_kw = opt_kw or dict(lr=0.05, momentum=0.9, clip_norm=0.5)
    pieces = FUSED_VARIANTS[variant]
    model = fg.MLP(list(sizes), activation="tanh", dtype=dtype, device=device, seed=seed,
                   **pieces)
    twin = fg.MLP(list(sizes), activation="tanh", dtype="float64", device="cpu", seed=seed,
                  **pieces)
    twin.params[...] = to_numpy(model.params)
    assert twin._mask_seed == model._mask_seed
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, **opt_kw),
                        cuda_graph=cuda_graph)
    assert step._kernels is not None and not step._composed      # the fused step
    return step, _LayerPath(twin, fg.SoftmaxCrossEntropy(), fg.SGD(twin, **opt_kw))


def _batches(rng, n, dtype, bad=(), B=67, last=None, sizes=FUSED_SIZES):
    """n batches of B (67: over one of CUDA's row blocks of 64, so the column
    sums take their partials), the last one of ``last`` rows if given (an
    epoch's smaller last batch); those in ``bad`` hold a NaN."""
    out = []
    for t in range(n):
        rows = last if last is not None and t == n - 1 else B
        x = rng.standard_normal((rows, sizes[0])).astype(dtype)
        if t in bad:
            x[5 % rows, 3] = np.nan
        out.append((x, rng.integers(0, sizes[-1], rows)))
    return out


def _same_step(step, ref, loss, ref_loss, dtype, t, rtol=None):
    rtol = rtol or FUSED_TOL[dtype]
    got, want = step.stats, ref.stats
    assert (bool(got.skipped), int(got.step)) == (bool(want.skipped), int(want.step)), f"step {t}"
    if want.skipped:
        assert np.isnan(float(loss)) and np.isnan(ref_loss)
        return
    assert_close(float(loss), ref_loss, dtype, rtol=rtol, what=f"loss at step {t}")
    assert_close(got.grad_norm, want.grad_norm, dtype, rtol=rtol, what=f"grad norm {t}")
    assert_close(got.layer_norms, want.layer_norms, dtype, rtol=rtol, what=f"layer norms {t}")


def _same_state(step, ref, dtype, what="", rtol=None):
    rtol = rtol or FUSED_TOL[dtype]
    m, mr = step.model, ref.model
    assert_close(m.params, mr.params, dtype, rtol=rtol, what=f"params {what}")
    for name, want in ref.opt.state.items():
        assert_close(step.opt.state[name], want, dtype, rtol=rtol, what=f"{name} {what}")
    assert_close(m.running_mean, mr.running_mean, dtype, rtol=rtol, what=f"running mean {what}")
    assert_close(m.running_var, mr.running_var, dtype, rtol=rtol, what=f"running var {what}")
    assert m.dropout_step == mr.dropout_step, f"dropout step {what}"
    assert (step.opt.step_count, step.opt.n_skipped) == (ref.opt.step_count, ref.opt.n_skipped)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_train_steps_track_the_float64_layer_path(device, rng, variant):
    """20 float32 TrainSteps with SGD + momentum + clipping stay with the
    float64 layer path from the same start.  (SGD, not Adam: Adam's update
    of a near-zero gradient component is +-lr whatever its size, so
    rounding-level differences would show as lr-sized parameter
    differences.)"""
    sizes = (12, 24, 24, 24, 5)
    step, ref = _step_and_reference(device, variant, "float32", sizes=sizes, seed=3, lr=0.05,
                                    momentum=0.9, clip_norm=1.0)
    for t, (x, y) in enumerate(_batches(rng, 20, np.float32, B=32, sizes=sizes)):
        _same_step(step, ref, step(x, y), ref(x, y), "float32", t, rtol=1e-4)
    _same_state(step, ref, "float32", "after 20 steps", rtol=1e-3)


def _fused_steps(device, rng, variant, dtype, cuda_graph):
    """Five steps, the third on a non-finite batch (skipped: the dropout
    step and running statistics put back), the last on a smaller batch (its
    own buffers, and graph): losses, norms, skips, then parameters,
    optimizer state, running statistics and dropout step."""
    step, ref = _step_and_reference(device, variant, dtype, cuda_graph)
    for t, (x, y) in enumerate(_batches(rng, 5, dtype, bad={2}, last=29)):
        loss = step(x, y)
        if device == "cuda":
            assert step.model.backend.is_array(loss)        # read back only when asked
        _same_step(step, ref, loss, ref(x, y), dtype, t)
    _same_state(step, ref, dtype, "after 5 steps")
    assert ref.model.dropout_step == 4 and ref.opt.n_skipped == 1
    return step


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", sorted(FUSED_VARIANTS))
def test_fused_step_matches_the_layer_path(device, rng, variant, dtype):
    """The fused step of every piece and combination (CPU: the one step
    driver; CUDA: kernels/cuda/step.py) against the float64 layer
    path."""
    _fused_steps(device, rng, variant, dtype, cuda_graph=False)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", sorted(FUSED_VARIANTS))
def test_graphed_step_matches_the_layer_path(cuda_be, rng, variant, dtype):
    """The same, replayed from CUDA graphs: one per batch size."""
    step = _fused_steps("cuda", rng, variant, dtype, cuda_graph=True)
    assert sorted(key[0] for key in step._graphs) == [29, 67]
    assert step._graphs[max(step._graphs)].graph is not None      # B=67, replayed


def _modes_and_counter_changes(device, rng, cuda_graph):
    """Train, eval (no dropout, running statistics), train again with the
    dropout step set by hand, and a layer-path forward in between: the
    step's counter follows the host's each time, and every step matches the
    layer path."""
    step, ref = _step_and_reference(device, "batchnorm+dropout+weight_norm", "float64",
                                    cuda_graph, lr=0.05, momentum=0.9, clip_norm=1.0)
    for t, (x, y) in enumerate(_batches(rng, 9, "float64", bad={4})):
        for s in (step, ref):
            if t == 3:
                s.model.eval()
            if t == 5:
                s.model.train()
                s.model.dropout_step = 11
            if t == 7:
                s.model.forward(s.model.backend.to_device(x))    # advances the host counter
        _same_step(step, ref, step(x, y), ref(x, y), "float64", t)
    _same_state(step, ref, "float64", "after the mode changes")
    assert ref.model.dropout_step == 16
    return step


def test_fused_step_modes_and_counter_changes(device, rng):
    _modes_and_counter_changes(device, rng, cuda_graph=False)


@pytest.mark.cuda
def test_graphed_step_modes_and_counter_changes(cuda_be, rng):
    """The same from CUDA graphs: one per mode, each replayed."""
    step = _modes_and_counter_changes("cuda", rng, cuda_graph=True)
    assert sorted(key[-1] for key in step._graphs) == [False, True]
    assert all(g.graph is not None for g in step._graphs.values())


def test_trainstep_gradients_match_layer_path(device, rng):
    """TrainStep.gradients (forward and backward, no update) on a model
    with every piece gives the layer path's loss and gradients, before and
    after a fused step (whose dropout step may live on the device), and
    advances the dropout step."""
    step, ref = _step_and_reference(device, "all", "float64")
    for t, (x, y) in enumerate(_batches(rng, 3, "float64")):
        if t == 1:
            _same_step(step, ref, step(x, y), ref(x, y), "float64", t)
            continue
        loss, want = step.gradients(x, y), ref.gradients(x, y)
        assert_close(float(loss), want, np.float64, rtol=1e-10, what=f"loss {t}")
        assert_close(step.model.grads, ref.model.grads, np.float64, rtol=1e-10,
                     what=f"gradients {t}")
    assert step.model.dropout_step == ref.model.dropout_step == 3


def test_fused_step_drops_the_reference_mask(device, rng):
    """Identity layers at rate 0.5: the fused step's first layer output is 0
    exactly where the reference mask of its dropout step drops, read from
    the step's own buffer, a skipped step (which reuses its dropout step)
    included."""
    model = fg.MLP([7, 40, 3], activation=None, dropout=0.5, seed=11, dtype="float64",
                   device=device)
    step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.01))
    for t in range(4):
        x = rng.standard_normal((9, 7))
        if t == 1:
            x[0, 0] = np.nan
        counter = model.dropout_step
        step(x, rng.standard_normal((9, 3)))
        h = to_numpy(step._buffers[9][0])[:9 * 40].reshape(9, 40)
        mask = reference.dropout_mask(model._mask_seed, 0, counter, h.shape, 0.5)
        np.testing.assert_array_equal(h == 0, mask == 0, err_msg=f"step {t}")
        assert model.dropout_step == counter + (t != 1)
    assert model.dropout_step == 3


@pytest.mark.cuda
def test_graph_refuses_a_frozen_dropout_step(cuda_be):
    """A graphed step with dropout in training mode reads its dropout step
    from device memory; a host int would freeze one mask into every replay,
    so the graph class refuses it."""
    from fastgrad.kernels.cuda import step as cuda_step
    m = fg.MLP([4, 6, 2], dropout=0.5, device="cuda")
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.SGD(m, lr=0.1), cuda_graph=True)
    args, kw = step._driver_args(3, update=True)      # training mode: the plan drops
    assert kw["counter"] is not None
    update = (1, m.params[:0], m.params[:0], m.params[:0], step._layer_sq, 0.0, 0.0, 3)
    with pytest.raises(ValueError, match="freeze one mask"):
        cuda_step.GraphedTrainStep(step._loss_kind, *args, *update)
    # with the device counter it builds; in eval mode nothing drops
    cuda_step.GraphedTrainStep(step._loss_kind, *args, *update, counter=kw["counter"])
    m.eval()
    args, _ = step._driver_args(3, update=True)
    cuda_step.GraphedTrainStep(step._loss_kind, *args, *update)
