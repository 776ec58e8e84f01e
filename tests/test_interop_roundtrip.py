"""Lossless torch round trip: ``from_torch(model.to_torch())`` is the same
model bit for bit, for every kind of layer fastgrad builds; the torch twin
computes the same function (float64 forward parity, train and eval)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch parity needs PyTorch (pip install 'fastgrad[peers]')")
nn = torch.nn

import fastgrad as fg                                   # noqa: E402
from fastgrad.interop import from_torch, to_torch      # noqa: E402

DTYPES = ("float32", "float64")


def _models(dtype, seed):
    kw = dict(dtype=dtype, seed=seed)
    return {
        "plain": fg.MLP([7, 9, 4], activation="elu", alpha=0.7, **kw),
        "gelu": fg.MLP([5, 8, 8, 3], activation="gelu", **kw),
        "batch_norm": fg.MLP([6, 10, 10, 3], norm="batch", **kw),
        "layer_norm": fg.MLP([6, 10, 3], activation="tanh", norm="layer", **kw),
        "dropout": fg.MLP([6, 10, 10, 2], dropout=0.3, **kw),
        "weight_norm": fg.MLP([6, 10, 3], activation="softplus", weight_norm=True, **kw),
        "residual": fg.MLP([6, 8, 8, 8, 3], residual=True, activation="leaky_relu", **kw),
        "everything": fg.Sequential([
            fg.Dense(5, 8, activation="gelu", norm="layer", weight_norm=True),
            fg.Residual(fg.Dense(8, 8, activation="relu", norm="batch", dropout=0.2)),
            fg.Residual(fg.Dense(8, 8, activation="sigmoid", weight_norm=True, dropout=0.1)),
            fg.Dense(8, 8, activation=None, dropout=0.25),
            fg.Dense(8, 3, activation=None)], **kw),
    }


def _perturb(model, rng):
    """Non-default gamma, beta, g and running statistics, so a round trip
    that dropped any of them would show."""
    for layer in model.layers:
        if layer.norm:
            layer.gamma[...] = rng.uniform(0.5, 1.5, layer.n_out)
            layer.beta[...] = rng.uniform(-0.5, 0.5, layer.n_out)
        if layer.norm == "batch":
            layer.running_mean[...] = rng.standard_normal(layer.n_out)
            layer.running_var[...] = rng.uniform(0.2, 3.0, layer.n_out)
        if layer.weight_norm:
            layer.g[...] = rng.uniform(0.5, 2.0, layer.n_out)
    model._refresh_weight_norm()


def _same_model(a, b):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        for attr in ("n_in", "n_out", "activation", "alpha", "dropout", "norm", "weight_norm",
                     "residual"):
            assert getattr(la, attr) == getattr(lb, attr), attr
        assert type(la) is type(lb)
    assert a.dtype == b.dtype and a.training == b.training
    assert a.params.tobytes() == b.params.tobytes()
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].tobytes() == sb[k].tobytes(), k


NAMES = sorted(_models("float64", 0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bitwise(rng, dtype, name):
    model = _models(dtype, int(rng.integers(1 << 30)))[name]
    _perturb(model, rng)
    if dtype == "float32":
        # torch keeps running statistics in the module's dtype
        for layer in model.layers:
            if layer.norm == "batch":
                layer.running_mean[...] = layer.running_mean.astype(np.float32)
                layer.running_var[...] = layer.running_var.astype(np.float32)
    for mode in (True, False):
        model.train(mode)
        back = from_torch(model.to_torch())
        _same_model(model, back)


@pytest.mark.parametrize("name", NAMES)
def test_torch_twin_forward_parity_float64(rng, name):
    model = _models("float64", int(rng.integers(1 << 30)))[name]
    _perturb(model, rng)
    tm = to_torch(model.eval())
    assert not tm.training
    x = rng.standard_normal((11, model.sizes[0]))
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(x), ref, rtol=1e-12, atol=1e-12)
    if not any(l.dropout for l in model.layers):
        # training mode: batch statistics, running statistics updated alike
        model.train()
        tm.train()
        out = model(x)
        with torch.no_grad():
            ref = tm(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
        back = from_torch(tm)
        for a, b in zip(model.layers, back.layers):
            if a.norm == "batch":
                np.testing.assert_allclose(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-15)
                np.testing.assert_allclose(a.running_var, b.running_var, rtol=1e-12, atol=1e-15)


def test_from_torch_reads_torch_spellings(rng):
    torch.manual_seed(int(rng.integers(1 << 30)))
    wn_new = nn.utils.parametrizations.weight_norm(nn.Linear(6, 8), dim=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # the old weight_norm is deprecated
        wn_old = nn.utils.weight_norm(nn.Linear(8, 8), dim=0)
    bn = nn.BatchNorm1d(8)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    seq = nn.Sequential(
        wn_new, nn.LayerNorm(8), nn.GELU(approximate="tanh"), nn.Dropout(0.1),
        fg.interop.ResidualBlock(nn.Sequential(wn_old, bn, nn.ReLU())),
        nn.Sequential(nn.Linear(8, 8), nn.Identity(), nn.Dropout(0.0)),
        nn.Linear(8, 3)).double().eval()
    model = from_torch(seq)
    assert [l.weight_norm for l in model.layers] == [True, True, False, False]
    assert [l.norm for l in model.layers] == ["layer", "batch", None, None]
    assert [l.residual for l in model.layers] == [False, True, False, False]
    assert model.layers[0].dropout == 0.1 and not model.training
    x = rng.standard_normal((9, 6))
    with torch.no_grad():
        ref = seq(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(model(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, match", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, eps=1e-3)), "BatchNorm1d"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, affine=False)), "BatchNorm1d"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False)),
     "LayerNorm"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4)), "directly follow"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(5)), "normalises 5"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2), nn.ReLU()), "before dropout"),
    (lambda: nn.Sequential(fg.interop.ResidualBlock(nn.Linear(3, 4))), "square"),
    (lambda: nn.Sequential(fg.interop.ResidualBlock(
        nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)))), "exactly one"),
    (lambda: nn.Sequential(fg.interop.ResidualBlock(nn.Linear(3, 3)), nn.ReLU()),
     "follows a residual block"),
    (lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4), dim=1)),
     "dim=0"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Mish()), "Mish"),   # silu is supported now
])
def test_from_torch_refuses(bad, match):
    with pytest.raises(ValueError, match=match):
        from_torch(bad())
