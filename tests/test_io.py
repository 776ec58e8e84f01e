"""Checkpoints: fastgrad.io.save / load.

Round trips of model + every optimizer, bitwise resumption in a new process,
atomicity under SIGKILL, refusal of bad files, and PyTorch readability.
"""
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import fastgrad as fg
from fastgrad import schedules
from fastgrad.io import FORMAT_VERSION, load, save

DTYPES = ("float32", "float64")

OPTIMIZERS = {
    "adam_amsgrad": lambda m: fg.Adam(m, lr=schedules.warmup_cosine_decay(1e-2, 3, 30),
                                      betas=(0.8, 0.99), eps=1e-7, weight_decay=1e-3,
                                      amsgrad=True, clip_norm=1.0),
    "adamw": lambda m: fg.AdamW(m, lr=schedules.exponential_decay(1e-2, 0.5, 10),
                                weight_decay=0.05, clip_value=0.5),
    "sgd_nesterov": lambda m: fg.SGD(m, lr=schedules.step_decay(0.1, 4, 0.5), momentum=0.9,
                                     nesterov=True, weight_decay=1e-4, clip_norm=2.0),
    "sgd_plain": lambda m: fg.SGD(m, lr=0.05),
    "rmsprop_centered": lambda m: fg.RMSprop(m, lr=schedules.cosine_decay(1e-2, 20, 0.1),
                                             alpha=0.9, momentum=0.5, centered=True,
                                             skip_nonfinite=False),
}


def _model(dtype, seed=0):
    return fg.MLP([6, 9, 7, 3], activation="elu", alpha=0.7, init="xavier_uniform",
                  dtype=dtype, seed=seed)


def _data(rng, dtype, n=8):
    return rng.standard_normal((n, 6)).astype(dtype), rng.integers(0, 3, n)


def _trained(dtype, opt_name, rng, steps=3):
    model = _model(dtype, seed=int(rng.integers(1 << 30)))
    opt = OPTIMIZERS[opt_name](model)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    for _ in range(steps):
        step(*_data(rng, dtype))
    return model, opt


# --- (a) round trips ------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_round_trip_model_and_optimizer(tmp_path, rng, dtype, opt_name):
    model, opt = _trained(dtype, opt_name, rng)
    path = tmp_path / "run.fgz"
    save(path, model, opt)
    model2, opt2 = load(path)

    assert type(model2) is type(model) and type(opt2) is type(opt)
    assert model2.dtype == model.dtype and model2.seed == model.seed
    assert model2.sizes == model.sizes
    for a, b in zip(model.layers, model2.layers):
        assert (a.activation, a.alpha, a.init, a.code) == (b.activation, b.alpha, b.init, b.code)
    assert model2.params.dtype == model.params.dtype
    np.testing.assert_array_equal(model2.params, model.params)
    assert np.shares_memory(model2.layers[1].W, model2.params)

    assert opt2.hyper == opt.hyper
    assert opt2.lr_schedule == opt.lr_schedule
    assert (opt2.step_count, opt2.n_calls, opt2.n_skipped) == (opt.step_count, opt.n_calls,
                                                               opt.n_skipped)
    assert sorted(opt2.state) == sorted(opt.state)
    for name in opt.state:
        assert opt2.state[name].dtype == opt.state[name].dtype
        np.testing.assert_array_equal(opt2.state[name], opt.state[name])

    # Both continue identically.
    x, y = _data(rng, dtype)
    for m, o in ((model, opt), (model2, opt2)):
        fg.TrainStep(m, fg.SoftmaxCrossEntropy(), o)(x, y)
    np.testing.assert_array_equal(model2.params, model.params)


def test_model_only_and_sequential(tmp_path, rng):
    model = fg.Sequential([fg.Dense(4, 5, activation="leaky_relu", alpha=0.3, init="he_uniform"),
                           fg.Dense(5, 2, activation="gelu", init="zeros")],
                          dtype="float64", seed=11)
    model.params[...] = rng.standard_normal(model.n_params)
    save(str(tmp_path / "m.safetensors"), model)
    model2, opt2 = load(tmp_path / "m.safetensors", device="cpu")
    assert opt2 is None
    assert type(model2) is fg.Sequential and model2.seed == 11
    x = rng.standard_normal((3, 4))
    np.testing.assert_array_equal(model2.predict(x), model.predict(x))


def test_loaded_weight_norm_layers_hold_their_effective_weight(tmp_path, rng):
    """layer.W of a weight-normalised layer is g v / ||v|| of the loaded
    parameters, as after load_state_dict (it read NaN)."""
    model = fg.MLP([4, 5, 3], activation="tanh", weight_norm=True, dtype="float64", seed=0)
    model.params[...] = rng.standard_normal(model.n_params)
    save(str(tmp_path / "wn.fgz"), model)
    loaded, _ = load(tmp_path / "wn.fgz")
    for layer in loaded.layers:
        v, g = layer.v.astype(np.float64), layer.g.astype(np.float64)
        np.testing.assert_allclose(layer.W, g * v / np.linalg.norm(v, axis=0), rtol=1e-12)


def test_save_overwrites_atomically_and_leaves_no_temp(tmp_path):
    model = _model("float32")
    path = tmp_path / "ckpt.fgz"
    for v in (1.0, 2.0):
        model.params[...] = v
        save(path, model)
    assert os.listdir(tmp_path) == ["ckpt.fgz"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    assert np.all(load(path)[0].params == 2.0)


def test_save_into_a_missing_directory_names_the_path(tmp_path):
    model = fg.MLP([3, 2], seed=0)
    target = tmp_path / "nodir" / "x.fgz"
    with pytest.raises(FileNotFoundError, match="cannot save .*x.fgz.*no directory"):
        save(target, model)
    assert not (tmp_path / "nodir").exists()


def test_save_refuses_wrong_arguments(tmp_path):
    model, other = _model("float32"), _model("float32")
    with pytest.raises(TypeError, match="fastgrad Sequential"):
        save(tmp_path / "x", object())
    with pytest.raises(ValueError, match="built on this model"):
        save(tmp_path / "x", model, fg.Adam(other))
    with pytest.raises(TypeError, match="fastgrad optimizer"):
        save(tmp_path / "x", model, "adam")
    assert not os.listdir(tmp_path)


# --- (b) resuming in a new process is bitwise identical -----------------------------

_RESUME = textwrap.dedent("""
    import sys
    import numpy as np
    import fastgrad as fg
    from fastgrad.io import load, save
    {batches}
    path, out = sys.argv[1], sys.argv[2]
    model, opt = load(path)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    for x, y in _batches(model.dtype)[20:]:
        step(x, y)
    save(out, model, opt)
""")


# One source for the batch sequence, run here and in the child process.
_BATCHES = """
def _batches(dtype, n=40, seed=1234):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((16, 10)).astype(dtype), rng.integers(0, 4, 16))
            for _ in range(n)]
"""
_ns = {"np": np}
exec(_BATCHES, _ns)
_batches = _ns["_batches"]


def _fresh(dtype):
    model = fg.MLP([10, 32, 32, 4], activation="tanh", dtype=dtype, seed=5)
    opt = fg.AdamW(model, lr=schedules.warmup_cosine_decay(3e-2, 5, 40), amsgrad=True,
                   clip_norm=0.5)
    return model, opt, fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)


@pytest.mark.parametrize("dtype", DTYPES)
def test_resume_in_new_process_is_bitwise_identical(tmp_path, dtype):
    batches = _batches(np.dtype(dtype))
    model, opt, step = _fresh(dtype)
    for x, y in batches:
        step(x, y)

    model2, opt2, step2 = _fresh(dtype)
    for x, y in batches[:20]:
        step2(x, y)
    half, final = tmp_path / "half.fgz", tmp_path / "final.fgz"
    save(half, model2, opt2)
    code = _RESUME.replace("{batches}", _BATCHES.strip())
    res = subprocess.run([sys.executable, "-c", code, str(half), str(final)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    model3, opt3 = load(final)
    assert opt3.step_count == opt.step_count == 40
    assert model3.params.tobytes() == model.params.tobytes()
    for name in opt.state:
        assert opt3.state[name].tobytes() == opt.state[name].tobytes()


# --- (c) SIGKILL in the middle of saves ------------------------------------------------

_SAVER = textwrap.dedent("""
    import sys
    import numpy as np
    import fastgrad as fg
    from fastgrad.io import save
    path, start = sys.argv[1], int(sys.argv[2])
    model = fg.MLP([512, 512, 512, 512], dtype="float32", init="zeros")   # ~0.8M params, 3 MB
    opt = fg.Adam(model)
    i = start
    while True:
        model.params[...] = i            # every tensor encodes the save number
        opt.state["exp_avg"][...] = i
        opt.state["exp_avg_sq"][...] = i
        opt.step_count = i
        save(path, model, opt)
        print(i, flush=True)
        i += 1
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_resume_after_momentum_turned_on_mid_run_is_exact(tmp_path):
    """SGD's buffer made when momentum is turned on mid-run takes the raw
    gradient at its first update: the checkpoint keeps where that update
    lies (``since``), before and after it, so a resumed run is the
    uninterrupted one bitwise."""
    rng = np.random.default_rng()
    X = rng.standard_normal((32, 4)).astype(np.float32)
    Y = rng.integers(0, 3, 32)
    on_at = int(rng.integers(1, 4))

    def run(save_after):
        m = fg.MLP([4, 8, 3], seed=0)
        o = fg.SGD(m, lr=0.1, dampening=0.5)
        st = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), o)
        for i in range(6):
            if i == on_at:
                o.momentum = 0.9
            if i == save_after:
                path = str(tmp_path / f"c{save_after}.fgz")
                save(path, m, o)
                m, o = load(path)
                st = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), o)
            st(X, Y)
        return m.params.copy()

    whole = run(None)
    for save_after in (on_at, on_at + 1, on_at + 2):
        np.testing.assert_array_equal(run(save_after), whole, err_msg=str(save_after))


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.fgz"
    rnd = random.Random(os.environ.get("FASTGRAD_TEST_SEED", time.time_ns()))
    start = 1
    for kill in range(5):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()      # at least one save of this run is done
            assert first, proc.stderr.read()
            time.sleep(rnd.uniform(0.0, 0.25))
            proc.send_signal(signal.SIGKILL)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        done = [int(s) for s in (first + rest).split()]
        last = done[-1]
        model, opt = load(path)
        k = int(model.params[0])
        # The last reported save, or the one after it if the kill came between
        # its os.replace and its print.
        assert k in (last, last + 1), (k, last)
        assert np.all(model.params == k)
        assert np.all(opt.state["exp_avg"] == k) and np.all(opt.state["exp_avg_sq"] == k)
        assert opt.step_count == k
        stray = [f for f in os.listdir(tmp_path) if f != "ckpt.fgz"]
        assert all(f.startswith(".ckpt.fgz.") and f.endswith(".tmp") for f in stray), stray
        start = k + 1


# --- (d) bad files --------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    """A valid checkpoint: (path, tensors dict, metadata doc)."""
    model = _model("float32")
    opt = fg.Adam(model, lr=schedules.cosine_decay(1e-2, 10), amsgrad=True)
    opt.step_count = 3
    path = tmp_path / "good.fgz"
    save(path, model, opt)
    with safe_open(str(path), "np") as f:
        doc = json.loads(f.metadata()["fastgrad"])
    return path, load_file(str(path)), doc


def _write(path, tensors, doc=None, metadata=None):
    if metadata is None:
        metadata = {"fastgrad": doc if isinstance(doc, str) else json.dumps(doc)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _load_fails(path, match):
    with pytest.raises(ValueError, match=match) as info:
        load(path)
    assert "not a valid fastgrad checkpoint" in str(info.value)
    return info.value


@pytest.mark.parametrize("cut", [0, 4, 8, 20, 100, -100, -1])
def test_truncated_file(good, tmp_path, cut):
    path, _, _ = good
    data = path.read_bytes()
    bad = tmp_path / "cut.fgz"
    bad.write_bytes(data[:cut] if cut >= 0 else data[:len(data) + cut])
    _load_fails(bad, "safetensors")


def test_foreign_files(tmp_path, rng):
    noise = tmp_path / "noise.bin"
    noise.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _load_fails(noise, "safetensors")
    npz = tmp_path / "arrays.npz"
    np.savez(npz, params=np.zeros(10))
    _load_fails(npz, "safetensors")
    text = tmp_path / "ckpt.json"
    text.write_text('{"params": [1, 2, 3]}')
    _load_fails(text, "safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"params": np.zeros(10, np.float32)}, str(plain))
    _load_fails(plain, "no 'fastgrad' metadata")
    other = tmp_path / "other.safetensors"
    save_file({"params": np.zeros(10, np.float32)}, str(other), metadata={"format": "pt"})
    _load_fails(other, "no 'fastgrad' metadata")


def test_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nope.fgz")


def _set(doc, keys, value):
    d = doc
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value
    return doc


_DELETE = object()
L0 = ("model", "layers", 0)
HYPER = ("optimizer", "hyper")

CRAFTED = {
    "version_3": (("format_version",), 3, "format version 3 is not supported.*upgrade"),
    "version_0": (("format_version",), 0, "format version 0 is not supported"),
    "version_str": (("format_version",), "1", "format_version must be an integer"),
    "format_name": (("format",), "something-else", "metadata format"),
    "no_model": (("model",), _DELETE, "model: expected an object"),
    "model_list": (("model",), [1, 2], "model: expected an object"),
    "class": (("model", "class"), "os.system", "unknown model class"),
    "dtype": (("model", "dtype"), "float16", "unsupported dtype 'float16'"),
    "dtype_type": (("model", "dtype"), 32, "model.dtype: expected a string"),
    "seed": (("model", "seed"), "zero", "model.seed"),
    "layers_empty": (("model", "layers"), [], "expected 1 to"),
    "layers_type": (("model", "layers"), {"n_in": 6}, "model.layers: expected a list"),
    "layer_type": (L0, "dense", r"layers\[0\]: expected an object"),
    "n_in_str": (L0 + ("n_in",), "6", r"n_in: expected an integer"),
    "n_in_float": (L0 + ("n_in",), 6.0, r"n_in: expected an integer"),
    "n_in_bool": (L0 + ("n_in",), True, r"n_in: expected an integer"),
    "n_in_negative": (L0 + ("n_in",), -6, "must be a positive integer"),
    "n_out_zero": (L0 + ("n_out",), 0, "must be a positive integer"),
    "n_in_huge": (L0 + ("n_in",), 10 ** 15, "architecture has"),
    "n_in_enormous": (L0 + ("n_in",), 10 ** 40, "architecture has"),
    "chain": (("model", "layers", 1, "n_in"), 8, "does not match the previous"),
    "activation": (L0 + ("activation",), "swish", "unknown activation 'swish'"),
    "activation_type": (L0 + ("activation",), None, "activation: expected a string"),
    "alpha_type": (L0 + ("alpha",), "0.7", "alpha: expected"),
    "alpha_negative": (L0 + ("alpha",), -1.0, "alpha >= 0"),
    "alpha_inf": (L0 + ("alpha",), 1e999, "must be finite|non-standard"),
    "init": (L0 + ("init",), "orthogonal", "unknown initializer"),
    "missing_field": (L0 + ("init",), _DELETE, "missing field 'init'"),
    "opt_kind": (("optimizer", "kind"), "lamb", "unknown optimizer 'lamb'"),
    "opt_step": (("optimizer", "step"), -3, r"optimizer.step: must be in \[0"),
    # counters that would overflow int64 once training goes on from them
    "opt_step_huge": (("optimizer", "step"), 2 ** 70, r"optimizer.step: must be in \[0"),
    "dropout_step_huge": (("model", "dropout_step"), 2 ** 63 - 1, "dropout_step: must be in"),
    "opt_since": (("optimizer", "since"), [10 ** 6], "optimizer.since"),
    "plateau_state": (HYPER + ("lr",), {"kind": "reduce_on_plateau", "lr": 0.1,
                                       "state": {"scale": -3.0}},
                      "not a valid schedule.*scale must be in"),
    "opt_step_float": (("optimizer", "step"), 3.5, "optimizer.step: expected an integer"),
    "opt_state_names": (("optimizer", "state"), ["exp_avg"], "optimizer.state lists"),
    "opt_hyper_type": (HYPER, [1, 2], "hyper: expected an object"),
    "lr_str": (HYPER + ("lr",), "0.01", "hyper.lr"),
    "lr_schedule": (HYPER + ("lr",), {"kind": "import os"}, "not a valid schedule"),
    "lr_schedule_fields": (HYPER + ("lr",), {"kind": "cosine_decay", "lr0": [1], "decay_steps": 9},
                           "hyper.lr: not a valid schedule.*float"),
    "lr_schedule_missing": (HYPER + ("lr",), {"kind": "cosine_decay"},
                            "hyper.lr: not a valid schedule.*decay_steps"),
    "lr_negative": (HYPER + ("lr",), -1.0, "hyper.lr: .*finite number >= 0"),
    "betas": (HYPER + ("betas",), [0.9], "betas: expected two numbers"),
    "beta_range": (HYPER + ("betas",), [0.9, 1.5], "beta2 must be in"),
    "eps_str": (HYPER + ("eps",), "1e-8", "eps: expected a number"),
    "amsgrad_int": (HYPER + ("amsgrad",), 1, "amsgrad: expected a boolean"),
    "amsgrad_off": (HYPER + ("amsgrad",), False, "does not fit its hyper-parameters"),
    "hyper_extra": (HYPER + ("momentum",), 0.9, "do not match"),
    "hyper_missing": (HYPER + ("eps",), _DELETE, "do not match"),
    "clip_norm": (HYPER + ("clip_norm",), -1.0, "clip_norm must be > 0"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_metadata(good, tmp_path, case):
    path, tensors, doc = good
    keys, value, match = CRAFTED[case]
    bad = _write(tmp_path / "bad.fgz", tensors, _set(doc, keys, value))
    _load_fails(bad, match)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"format": NaN}', "non-standard number"),
    ("[" * 100_000 + "]" * 100_000, "nests too deeply|not valid JSON"),
])
def test_metadata_not_json(good, tmp_path, text, match):
    path, tensors, _ = good
    _load_fails(_write(tmp_path / "bad.fgz", tensors, text), match)


def test_deep_schedule_nesting(good, tmp_path):
    path, tensors, doc = good
    lr = {"kind": "constant", "value": 0.1}
    for _ in range(200):
        lr = {"kind": "join", "schedules": [lr, {"kind": "constant", "value": 0.1}],
              "boundaries": [1]}
    doc["optimizer"]["hyper"]["lr"] = lr
    _load_fails(_write(tmp_path / "bad.fgz", tensors, doc), "nests too deeply")


def test_tensors_inconsistent_with_architecture(good, tmp_path):
    path, tensors, doc = good
    bad = tmp_path / "bad.fgz"
    n = tensors["params"].size
    cases = [
        (dict(tensors, params=np.zeros(n + 1, np.float32)), r"shape \(%d,\)" % (n + 1)),
        (dict(tensors, params=np.zeros((n, 1), np.float32)), "shape"),
        (dict(tensors, params=np.zeros(n, np.float64)), "dtype F64, expected F32"),
        (dict(tensors, params=np.zeros(n, np.int32)), "dtype I32"),
        ({k: v for k, v in tensors.items() if k != "params"}, "do not match the expected"),
        (dict(tensors, extra=np.zeros(3, np.float32)), "do not match the expected"),
        (dict(tensors, **{"opt.exp_avg": np.zeros(n - 1, np.float32)}), "opt.exp_avg"),
        ({k: v for k, v in tensors.items() if k != "opt.max_exp_avg_sq"}, "optimizer.state"),
    ]
    for t, match in cases:
        _load_fails(_write(bad, t, doc), match)
    doc["optimizer"]["state"].append("square_avg")
    t = dict(tensors, **{"opt.square_avg": np.zeros(n, np.float32)})
    _load_fails(_write(bad, t, doc), "not states of 'adam'")


def test_random_corruption_never_escapes(good, tmp_path, rng):
    """Flipped bytes anywhere: either a valid load or a ValueError, nothing else."""
    path, _, _ = good
    data = bytearray(path.read_bytes())
    header_len = 8 + int.from_bytes(data[:8], "little")
    bad = tmp_path / "flip.fgz"
    for i in range(150):
        d = bytearray(data)
        hi = header_len if i % 3 else len(d)      # mostly the header
        for pos in rng.integers(0, hi, int(rng.integers(1, 4))):
            d[pos] = int(rng.integers(0, 256))
        bad.write_bytes(bytes(d))
        try:
            load(bad)
        except ValueError:
            pass


def test_version_constant():
    assert FORMAT_VERSION == 2


def _rewrite(path, out, edit):
    """Copy checkpoint ``path`` to ``out`` with its metadata doc edited."""
    with safe_open(str(path), "np") as f:
        doc = json.loads(f.metadata()["fastgrad"])
    edit(doc)
    return _write(out, load_file(str(path)), doc)


def test_version_1_gelu_loads_as_gelu_tanh(tmp_path, rng):
    """A version-1 file's "gelu" was the tanh approximation (fastgrad 0.1):
    it loads as gelu_tanh and predicts what it was trained to; a version-2
    file's "gelu" is the exact one."""
    model = fg.Sequential([fg.Dense(4, 6, activation="gelu_tanh"),
                           fg.Dense(6, 2, activation="gelu_tanh")], dtype="float64", seed=3)
    model.params[...] = rng.standard_normal(model.n_params)
    path = tmp_path / "new.fgz"
    save(path, model)

    def as_version_1(doc):            # what fastgrad 0.1 wrote for this model
        doc["format_version"] = 1
        for layer in doc["model"]["layers"]:
            assert layer["activation"] == "gelu_tanh"
            layer["activation"] = "gelu"
        doc.pop("checksums", None)    # the bytes are unchanged; keep the test to names

    old = _rewrite(path, tmp_path / "old.fgz", as_version_1)
    model1, _ = load(old, device="cpu")
    assert [l.activation for l in model1.layers] == ["gelu_tanh", "gelu_tanh"]
    x = rng.standard_normal((5, 4))
    np.testing.assert_array_equal(model1.predict(x), model.predict(x))

    exact = fg.Sequential([fg.Dense(4, 6, activation="gelu")], dtype="float64", seed=3)
    save(tmp_path / "exact.fgz", exact)
    with safe_open(str(tmp_path / "exact.fgz"), "np") as f:
        doc = json.loads(f.metadata()["fastgrad"])
    assert doc["format_version"] == 2 and doc["model"]["layers"][0]["activation"] == "gelu"
    assert load(tmp_path / "exact.fgz", device="cpu")[0].layers[0].activation == "gelu"


# --- (e) readable from PyTorch -------------------------------------------------------

def test_readable_by_safetensors_torch(tmp_path, rng):
    torch = pytest.importorskip(
        "torch", reason="PyTorch parity test: torch is not installed (pip install 'fastgrad[peers]')")
    from safetensors.torch import load_file as torch_load_file
    model, opt = _trained("float64", "adam_amsgrad", rng)
    path = tmp_path / "run.fgz"
    save(path, model, opt)
    tensors = torch_load_file(str(path))
    assert set(tensors) == {"params", "opt.exp_avg", "opt.exp_avg_sq", "opt.max_exp_avg_sq"}
    assert tensors["params"].dtype == torch.float64
    np.testing.assert_array_equal(tensors["params"].numpy(), model.params)
    for name, arr in opt.state.items():
        np.testing.assert_array_equal(tensors["opt." + name].numpy(), arr)
    # The first layer's W, as the module docstring documents the layout.
    lay = model.layers[0]
    W = tensors["params"][:lay.n_in * lay.n_out].reshape(lay.n_in, lay.n_out)
    np.testing.assert_array_equal(W.numpy(), lay.W)


@pytest.mark.cuda
def test_load_on_cuda(tmp_path, rng):
    cupy = pytest.importorskip("cupy")
    model = _model("float64")
    model.params[...] = rng.standard_normal(model.n_params)
    save(tmp_path / "m.fgz", model)
    model2, opt2 = load(tmp_path / "m.fgz", device="cuda")
    assert opt2 is None and isinstance(model2.params, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(model2.params), model.params)
    save(tmp_path / "back.fgz", model2)              # CUDA model -> file -> CPU
    np.testing.assert_array_equal(load(tmp_path / "back.fgz", device="cpu")[0].params,
                                  model.params)
    opt = fg.Adam(model)
    opt.state["exp_avg"][...] = rng.standard_normal(model.n_params)
    save(tmp_path / "mo.fgz", model, opt)
    model3, opt3 = load(tmp_path / "mo.fgz", device="cuda")     # optimizer state to the GPU
    assert isinstance(opt3.state["exp_avg"], cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(opt3.state["exp_avg"]), opt.state["exp_avg"])
