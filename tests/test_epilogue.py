"""The epilogue pieces' table (fastgrad/epilogue.py) agrees with what reads
it and with what it does not own: the kernels' layout, the checkpoints, the
compiled step's flags, the reference and torch; and checkpoints written
before the table existed load as they were."""
import importlib.util
import itertools
import json
import os

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import epilogue, reference
from fastgrad.kernels.layout import layer_size, layer_slots
from fastgrad.kernels.spec import NORM_KINDS

DATA = os.path.join(os.path.dirname(__file__), "data")


def _settings(norm=None, weight_norm=False, dropout=0.0, residual=False,
              activation="relu", alpha=None):
    return {"norm": norm, "weight_norm": weight_norm, "dropout": dropout,
            "residual": residual, "activation": activation, "alpha": alpha}


def _every_piece_model(dtype="float64"):
    return fg.Sequential([
        fg.Dense(5, 6, activation="gelu", norm="batch", weight_norm=True, dropout=0.1),
        fg.Residual(fg.Dense(6, 6, activation="elu", alpha=0.5, norm="layer", dropout=0.2)),
        fg.Dense(6, 3, activation=None)], dtype=dtype, seed=3)


@pytest.mark.parametrize("norm, weight_norm",
                         list(itertools.product([None, "layer", "batch"], [False, True])))
def test_declared_slots_are_the_kernels_layout(rng, norm, weight_norm):
    n_in, n_out, offset = (int(v) for v in rng.integers(1, 50, 3))
    slots = epilogue.param_slots(_settings(norm, weight_norm), n_in, n_out, offset)
    starts = {slot.name: (start, stop) for slot, start, stop in slots}
    w, b, gamma, beta, g, end = layer_slots(offset, n_in, n_out, norm is not None, weight_norm)
    assert starts.pop("v" if weight_norm else "W") == (w, b)
    assert starts.pop("b") == (b, gamma)
    if norm:
        assert starts.pop("gamma") == (gamma, beta)
        assert starts.pop("beta") == (beta, g)
    if weight_norm:
        assert starts.pop("g") == (g, end)
    assert starts == {}
    assert slots[-1][2] == end
    assert epilogue.layer_size(_settings(norm, weight_norm), n_in, n_out) == layer_size(
        n_in, n_out, norm is not None, weight_norm)


def test_layer_views_and_state_dict_follow_the_slots():
    model = _every_piece_model()
    model.params[...] = np.arange(model.n_params)
    for i, layer in enumerate(model.layers):
        off = int(model.layer_offsets[i])
        for slot, start, stop in epilogue.param_slots(layer, layer.n_in, layer.n_out, off):
            np.testing.assert_array_equal(getattr(layer, slot.name).ravel(),
                                          np.arange(start, stop))
            assert getattr(layer, slot.grad).shape == getattr(layer, slot.name).shape
    names = list(model.state_dict())
    assert names == ["layers.0.v", "layers.0.b", "layers.0.gamma", "layers.0.beta",
                     "layers.0.g", "layers.1.W", "layers.1.b", "layers.1.gamma",
                     "layers.1.beta", "layers.2.W", "layers.2.b",
                     "layers.0.running_mean", "layers.0.running_var"]


def test_checkpoint_fields_are_the_declared_fields(tmp_path):
    from safetensors import safe_open
    model = _every_piece_model()
    fg.save(tmp_path / "m.fgz", model)
    with safe_open(str(tmp_path / "m.fgz"), "np") as f:
        doc = json.loads(f.metadata()["fastgrad"])
        tensors = set(f.keys())
    for entry, layer in zip(doc["model"]["layers"], model.layers):
        assert set(entry) == {"n_in", "n_out", "init"} | set(epilogue.FIELD_NAMES)
        assert {k: entry[k] for k in epilogue.FIELD_NAMES} == epilogue.config_of(layer)
    buffers = {b.name for p in epilogue.PIECES for b in p.buffers}
    assert buffers <= tensors


@pytest.mark.parametrize("field", [f for f in epilogue.FIELDS])
def test_a_file_without_a_field_loads_as_the_declared_default(tmp_path, field):
    from safetensors import safe_open
    from safetensors.numpy import save_file
    model = fg.MLP([4, 4, 4, 2], activation="tanh", seed=1, dtype="float64")
    fg.save(tmp_path / "m.fgz", model)
    with safe_open(str(tmp_path / "m.fgz"), "np") as f:
        doc = json.loads(f.metadata()["fastgrad"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for entry in doc["model"]["layers"]:
        del entry[field.name]
    doc.pop("checksums")
    save_file(tensors, str(tmp_path / "old.fgz"), metadata={"fastgrad": json.dumps(doc)})
    if field.absent is epilogue.REQUIRED:
        with pytest.raises(ValueError, match=f"missing field '{field.name}'"):
            fg.load(tmp_path / "old.fgz")
    else:
        loaded, _ = fg.load(tmp_path / "old.fgz")
        assert all(getattr(layer, field.name) == field.absent for layer in loaded.layers)


def test_old_names_load_as_what_they_meant():
    old = epilogue.upgrade(_settings(activation="gelu"), version=1)
    assert old["activation"] == "gelu_tanh"
    assert epilogue.upgrade(_settings(activation="gelu"), version=2)["activation"] == "gelu"


def test_a_checkpoint_with_every_piece_written_before_the_table_loads(rng):
    """tests/data/every_piece.fgz was written by fastgrad before the
    epilogue table (tests/data/make_every_piece.py), with its outputs."""
    want = np.load(os.path.join(DATA, "every_piece.npz"))
    model, opt = fg.load(os.path.join(DATA, "every_piece.fgz"), device="cpu")
    assert [epilogue.config_of(layer)["residual"] for layer in model.layers] == [
        False, True, True, False]
    assert (model.layers[0].norm, model.layers[1].norm) == ("batch", "layer")
    np.testing.assert_array_equal(model.params, want["params"])
    np.testing.assert_array_equal(model.running_mean, want["running_mean"])
    np.testing.assert_array_equal(model.running_var, want["running_var"])
    np.testing.assert_array_equal(opt.state["exp_avg"], want["exp_avg"])
    np.testing.assert_allclose(model.forward(want["x"]), want["train_out"], rtol=1e-12,
                               atol=1e-14)
    model.eval()
    np.testing.assert_allclose(model.predict(want["x"]), want["eval_out"], rtol=1e-12,
                               atol=1e-14)


def test_plan_flags_are_what_the_step_reads():
    model = _every_piece_model()
    flags = epilogue.plan_flags(model.layers)
    np.testing.assert_array_equal(flags["norms"], [NORM_KINDS["batch"], NORM_KINDS["layer"],
                                                   NORM_KINDS[None]])
    np.testing.assert_array_equal(flags["drops"], [0.1, 0.2, 0.0])
    np.testing.assert_array_equal(flags["residual"], [0, 1, 0])
    np.testing.assert_array_equal(flags["wn"], [1, 0, 0])
    np.testing.assert_array_equal(flags["codes"], [layer.code for layer in model.layers])
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))
    # the compiled step's per-layer arrays (fastgrad/step.py) hold the same values
    for name, attr in (("drops", "_drops"), ("residual", "_residual"), ("norms", "_norms"),
                       ("wn", "_wn"), ("codes", "_codes")):
        np.testing.assert_array_equal(np.asarray(getattr(step, attr)), flags[name])
    # and its driver is compiled for the pieces the model uses
    assert fg.step.layer_features(model) == {"dropout", "norm", "residual", "weight_norm"}
    assert epilogue.used_pieces([fg.Dense(3, 4)]) == frozenset()


def test_every_piece_points_at_its_reference_and_torch_modules():
    for p in epilogue.PIECES:
        assert p.reference and all(callable(getattr(reference, f)) for f in p.reference), p.name
        assert p.torch.place in ("linear", "after", "wrap")
        assert callable(p.torch.to_torch)
        assert p.torch.read is not None or p.torch.place == "wrap"
    if importlib.util.find_spec("torch") is None:
        return
    import torch
    for p in epilogue.PIECES:
        for name in p.torch.modules:
            if name.startswith(("fastgrad.", "torch.")):
                mod, _, attr = name.rpartition(".")
                assert hasattr(importlib.import_module(mod), attr), name
            else:
                assert hasattr(torch.nn, name), name


def test_unknown_pieces_and_settings_raise():
    with pytest.raises(ValueError, match="unknown epilogue piece 'spline'"):
        epilogue.piece("spline")
    with pytest.raises(ValueError, match="unknown epilogue setting"):
        epilogue.check_config(dict(_settings(), spline=True), 3, 3)
    with pytest.raises(ValueError, match="norm must be None"):
        epilogue.check_config(_settings(norm="group"), 3, 3)
    with pytest.raises(ValueError, match="n_in == n_out"):
        epilogue.check_config(_settings(residual=True), 3, 4)
    with pytest.raises(ValueError, match="weight_norm"):
        epilogue.check_config(_settings(weight_norm=1), 3, 3)
    with pytest.raises(KeyError):
        epilogue.check_config({"norm": None}, 3, 3)    # every piece's fields are needed


def test_has_epilogue_and_its_old_name():
    plain = fg.MLP([3, 4, 2], activation="gelu")
    assert not plain.has_epilogue and not plain.extended
    for kw in ({"dropout": 0.1}, {"norm": "layer"}, {"weight_norm": True}):
        layer = fg.Dense(3, 3, **kw)
        assert layer.has_epilogue and layer.extended and epilogue.has_epilogue(layer)
    block = fg.Residual(fg.Dense(3, 3))
    assert block.has_epilogue and block.extended
    assert fg.Sequential([block, fg.Dense(3, 2)]).has_epilogue


def test_residual_is_a_dense_with_the_residual_piece():
    import copy
    import pickle
    inner = fg.Dense(4, 4, activation="tanh", dropout=0.1)
    block = fg.Residual(inner)
    assert "__getattr__" not in vars(fg.Residual)          # no proxy
    assert isinstance(block, fg.Residual) and isinstance(block, fg.Dense)
    assert block.layer is inner and block.residual and inner.residual
    assert repr(block) == f"Residual({inner!r})"
    block.init = "zeros"                                   # writes reach the wrapped Dense
    assert inner.init == "zeros"
    inner.alpha = 0.25                                     # and back
    assert block.alpha == 0.25
    for twin in (copy.deepcopy(block), pickle.loads(pickle.dumps(block))):
        assert type(twin) is fg.Residual and twin.layer is not inner
        assert vars(twin) is vars(twin.layer) and repr(twin) == repr(block)
    model = fg.Sequential([block, fg.Dense(4, 2)], dtype="float64")
    assert model.layers[0] is block and block.W is inner.W and block.dW is inner.dW
    assert [name for name, _ in model.named_parameters()][:2] == ["layers.0.W", "layers.0.b"]
    with pytest.raises(AttributeError, match="cannot be replaced"):
        block.W = np.zeros((4, 4))
    with pytest.raises(ValueError, match="already"):
        fg.Residual(block)
