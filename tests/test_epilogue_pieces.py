"""The epilogue pieces at work (fastgrad/epilogue.py; formerly the
"explosion toolkit", issue 9): residual blocks, dropout, batch/layer norm and
weight norm -- their kernels against fastgrad.reference and PyTorch,
gradients against central differences, the counter-based mask, TrainStep
equality and checkpoints.  The table itself is tested in test_epilogue.py."""
import importlib.util
import json

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import ops, reference
from fastgrad.kernels.cpu import blocks

from conftest import ACTIVATIONS, assert_close, dense_inputs, torch_activation



def _torch():
    return pytest.importorskip(
        "torch", reason="PyTorch parity test: torch is not installed (pip install 'fastgrad[peers]')")


def _run_block(x, W, b, act, alpha, p, residual, key, dy):
    """The block kernels on NumPy inputs: (z, fz, y, dW, db, dx)."""
    B, n = x.shape[0], W.shape[1]
    dt = x.dtype
    z, fz, y = (np.empty((B, n), dt) for _ in range(3))
    code, alpha = fg.ops.resolve_activation(act, alpha)
    drop = p > 0
    thresh = blocks.dropout_threshold(p)
    scale = 1.0 / (1.0 - p)
    blocks.block_forward(x, W, b, z, fz, y, code, alpha, drop, np.uint64(key), thresh, scale,
                         residual)
    da = dy.astype(dt).copy()
    dz = np.empty_like(da)
    dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    # what the forward kept of f: fz for a residual block, else the output
    kept_f = fz if residual else y
    blocks.block_backward(x, W, kept_f, z, da, dz, dW, db, dx, code, alpha, drop,
                          np.uint64(key), thresh, scale, residual, True)
    return z, fz, y, dW, db, dx


# --- kernels against the float64 reference -----------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("p,residual", [(0.0, True), (0.3, False), (0.5, True)])
def test_block_matches_reference(rng, dtype, act, p, residual):
    B, n = 7, 17
    x, W, b = dense_inputs(rng, B, n, n, dtype)
    dy = rng.standard_normal((B, n))
    seed, layer, counter = int(rng.integers(2 ** 62)), 2, int(rng.integers(1000))
    key = reference.dropout_key(seed, layer, counter)
    assert int(blocks.dropout_key(seed, layer, counter)) == key
    mask = reference.dropout_mask(seed, layer, counter, (B, n), p) if p else None
    z, fz, y, dW, db, dx = _run_block(x, W, b, act, None, p, residual, key, dy)
    rz, rf, ry = reference.block_forward(x, W, b, act, mask=mask, p=p, residual=residual)
    rdW, rdb, rdx = reference.block_backward(x, W, rz, dy, act, mask=mask, p=p,
                                             residual=residual)
    checks = [(y, ry, "y"), (dW, rdW, "dW"), (db, rdb, "db"), (dx, rdx, "dx")]
    if residual:                         # only residual blocks keep f(z) apart
        checks.append((fz, rf, "f(z)"))
    if ops.needs_z(ops.resolve_activation(act)[0]):      # the activations that keep z
        checks.append((z, rz, "z"))
    for got, ref, what in checks:
        assert_close(got, ref, dtype, what=what)


def test_mask_kernel_matches_reference(rng):
    seed, layer, counter, p = int(rng.integers(2 ** 63)), 3, 41, 0.37
    out = np.empty((33, 65))
    blocks.dropout_mask(np.uint64(blocks.dropout_key(seed, layer, counter)),
                        blocks.dropout_threshold(p), out)
    np.testing.assert_array_equal(out, reference.dropout_mask(seed, layer, counter, out.shape, p))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_over_a_million_draws(p):
    n = 1000 * 1000
    out = np.empty((1000, 1000))
    blocks.dropout_mask(np.uint64(blocks.dropout_key(12345, 0, 7)), blocks.dropout_threshold(p),
                        out)
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(out.mean() - (1 - p)) < 4 * sigma, (out.mean(), 1 - p, sigma)
    # different layers and counters draw different masks
    other = np.empty_like(out)
    blocks.dropout_mask(np.uint64(blocks.dropout_key(12345, 1, 7)), blocks.dropout_threshold(p),
                        other)
    assert (other != out).mean() > 0.5 * 2 * p * (1 - p)


def test_backward_regenerates_the_forward_mask(rng):
    """Identity activation, dy = 1: the backward's dz is mask * scale exactly,
    so db counts the kept units the forward let through."""
    B, n, p = 64, 33, 0.4
    x = rng.standard_normal((B, n))
    W = rng.standard_normal((n, n))
    b = rng.standard_normal(n)
    key = blocks.dropout_key(99, 1, 5)
    z, fz, y, dW, db, dx = _run_block(x, W, b, "identity", None, p, False, key, np.ones((B, n)))
    kept = y != 0
    assert 0.4 < kept.mean() < 0.8
    np.testing.assert_allclose(y[kept], (x @ W + b)[kept] / (1 - p), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db, kept.sum(axis=0) / (1 - p), rtol=1e-14)
    np.testing.assert_allclose(dW, x.T @ (kept / (1 - p)), rtol=1e-12, atol=1e-12)


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
    for g, ref, what in ((grads, fd, "dparams"), (dx, fdx, "dx")):
        err = np.abs(g - ref) / np.maximum(np.abs(g) + np.abs(ref), 1e-3)
        assert err.max() < 1e-6, f"{what}: max relative error {err.max():.3g}"
    assert np.abs(grads).max() > 0


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_residual_gradcheck(rng, act):
    model = fg.Sequential([fg.Dense(3, 4, activation=act),
                           fg.Residual(fg.Dense(4, 4, activation=act)),
                           fg.Dense(4, 2, activation=None)], dtype="float64", seed=1)
    model.params[...] = rng.standard_normal(model.n_params) * 0.7
    _fd_check(model, rng.standard_normal((5, 3)), rng.standard_normal((5, 2)))


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


def test_trainstep_gradients_match_layer_path(rng):
    m1 = fg.MLP([4, 6, 6, 2], activation="tanh", dtype="float64", dropout=0.2, residual=True)
    m2 = fg.MLP([4, 6, 6, 2], activation="tanh", dtype="float64", dropout=0.2, residual=True)
    x, y = rng.standard_normal((5, 4)), rng.integers(0, 2, 5)
    step = fg.TrainStep(m2, fg.SoftmaxCrossEntropy(), fg.SGD(m2, lr=0.1))
    l2 = step.gradients(x, y)
    l1, dy = fg.SoftmaxCrossEntropy()(m1.forward(x), y)
    m1.backward(dy, input_grad=False)
    assert abs(l1 - l2) <= 1e-12 * abs(l1)
    np.testing.assert_allclose(m2.grads, m1.grads, rtol=1e-12, atol=1e-14)


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

def _norm_model(kind, act, dtype="float64", residual=False, dropout=0.0, seed=0):
    first = fg.Dense(5, 6, activation=act, norm=kind, dropout=dropout)
    hidden = fg.Dense(6, 6, activation=act, norm=kind)
    return fg.Sequential([first, fg.Residual(hidden) if residual else hidden,
                          fg.Dense(6, 3, activation=None)], dtype=dtype, seed=seed)


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
    seq = model.to_torch()
    for mod in seq:
        if isinstance(mod, torch.nn.Softplus):
            # torch's softplus is linear above its threshold (error e^-20 at
            # 20): fastgrad's is exact, so compare with the threshold off.
            mod.threshold = 1e9
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


def test_norm_checkpoint_round_trip(tmp_path, rng):
    m = _norm_model("batch", "relu")
    opt = fg.Adam(m)
    step = fg.TrainStep(m, fg.MSE(), opt)
    for _ in range(3):
        step(rng.standard_normal((5, 5)), rng.standard_normal((5, 3)))
    fg.save(tmp_path / "n.fgz", m, opt)
    m2, o2 = fg.load(tmp_path / "n.fgz")
    assert [l.norm for l in m2.layers] == ["batch", "batch", None]
    np.testing.assert_array_equal(m2.params, m.params)
    np.testing.assert_array_equal(m2.running_mean, m.running_mean)
    np.testing.assert_array_equal(m2.running_var, m.running_var)
    x = rng.standard_normal((4, 5))
    np.testing.assert_array_equal(m2.predict(x), m.predict(x))
    ln = _norm_model("layer", "tanh")
    fg.save(tmp_path / "l.fgz", ln)
    ln2, _ = fg.load(tmp_path / "l.fgz")
    np.testing.assert_array_equal(ln2.predict(x), ln.predict(x))


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


