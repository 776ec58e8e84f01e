"""PyTorch habits on models (callable, parameters, state dicts, zero_grad)
and fit's epoch callbacks (early stopping, checkpoints, lr on plateau)."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import callbacks as cbs
from fastgrad import schedules
from fastgrad.layers import StateDictError


def _epilogue_model(dtype="float64", seed=0):
    return fg.Sequential([
        fg.Dense(5, 8, activation="tanh", norm="batch", dropout=0.2),
        fg.Residual(fg.Dense(8, 8, activation="relu", norm="layer")),
        fg.Dense(8, 6, activation="gelu", weight_norm=True),
        fg.Dense(6, 3, activation=None)], dtype=dtype, seed=seed)


# --- model(x) ------------------------------------------------------------------

def test_call_follows_the_mode(rng):
    model = _epilogue_model()
    x = rng.standard_normal((7, 5))
    step0 = model.dropout_step
    y = model(x)                          # training: forward, masks drawn, cache kept
    assert model.dropout_step == step0 + 1
    model.backward(np.ones_like(y))       # works: the cache is the call's
    ref = _epilogue_model()
    ref.forward(x)
    assert np.array_equal(y, ref._run(ref._input(x), keep=False, counter=step0)[0])
    model.eval()
    rm = model.running_mean.copy()
    out = model(x)
    assert model.dropout_step == step0 + 1                 # eval: no masks drawn
    assert np.array_equal(out, model.predict(x))
    assert np.array_equal(model.running_mean, rm)          # eval: statistics untouched


def test_backward_after_an_eval_call_raises_not_the_earlier_batch(rng):
    """torch back-propagates the last call; model(x) in eval mode keeps
    nothing, so backward() raises (it returned the earlier forward's
    gradients).  An explicit predict() between forward and backward leaves
    the forward's, and forward() in eval mode back-propagates."""
    model = _epilogue_model()
    x, x2 = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    dy = rng.standard_normal((7, 3))
    model.forward(x)
    dx = model.backward(dy)
    model.predict(x2)
    assert np.array_equal(model.backward(dy), dx)
    model.eval()
    model(x2)
    with pytest.raises(RuntimeError, match="eval mode is predict"):
        model.backward(dy)
    model.forward(x2)
    assert not np.array_equal(model.backward(dy), dx)


def test_a_refused_training_forward_draws_no_dropout_step():
    """The counter moves only for a forward that ran: a refused one (batch
    norm on one sample) shifted every later dropout mask."""
    model = fg.MLP([3, 5, 2], norm="batch", dropout=0.2, dtype="float64", seed=0)
    with pytest.raises(ValueError, match="more than 1 sample"):
        model.forward(np.ones((1, 3)))
    assert model.dropout_step == 0
    model.forward(np.ones((4, 3)))
    assert model.dropout_step == 1


# --- parameters / named_parameters / state_dict ---------------------------------

def test_named_parameters_are_views_in_buffer_order():
    model = _epilogue_model()
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    assert names == ["layers.0.W", "layers.0.b", "layers.0.gamma", "layers.0.beta",
                     "layers.1.W", "layers.1.b", "layers.1.gamma", "layers.1.beta",
                     "layers.2.v", "layers.2.b", "layers.2.g",
                     "layers.3.W", "layers.3.b"]
    # they tile the flat buffer exactly, in order, and share its memory
    assert sum(a.size for _, a in named) == model.n_params
    flat = np.concatenate([a.ravel() for _, a in named])
    assert np.array_equal(flat, model.params)
    for _, a in named:
        assert np.shares_memory(a, model.params)
    params = list(model.parameters())
    assert all(p is a for p, (_, a) in zip(params, named))
    params[0][0, 0] = 42.0
    assert model.layers[0].W[0, 0] == 42.0
    assert [n for n, _ in model.named_buffers()] == ["layers.0.running_mean",
                                                     "layers.0.running_var"]


def test_state_dict_round_trip(rng):
    a, b = _epilogue_model(seed=1), _epilogue_model(seed=2)
    x = rng.standard_normal((9, 5))
    a(x)                                   # moves the running statistics
    sd = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert np.shares_memory(sd["layers.0.W"], a.params)            # views, as torch
    res = b.load_state_dict(sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    assert np.array_equal(a.params, b.params)
    assert np.array_equal(a.running_mean, b.running_mean)
    assert np.array_equal(a.running_var, b.running_var)
    a.eval(), b.eval()
    assert np.array_equal(a(x), b(x))      # weight norm's W refreshed from v, g
    # float32 arrays into a float64 model (and back) convert
    c = _epilogue_model(dtype="float32", seed=3)
    c.load_state_dict({k: v.astype(np.float32) for k, v in sd.items()})
    np.testing.assert_allclose(c.params, a.params.astype(np.float32))


def test_state_dict_snapshot_survives_training(rng):
    model = fg.MLP([4, 6, 3], dtype="float64", seed=0)
    snap = {k: v.copy() for k, v in model.state_dict().items()}
    opt = fg.Adam(model, lr=0.1)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    step(rng.standard_normal((8, 4)), rng.integers(0, 3, 8))
    assert not np.array_equal(model.layers[0].W, snap["layers.0.W"])
    model.load_state_dict(snap)
    assert np.array_equal(model.layers[0].W, snap["layers.0.W"])


def test_load_state_dict_strict_and_not(rng):
    model = _epilogue_model()
    before = model.params.copy()
    sd = {k: v.copy() + 1.0 for k, v in model.state_dict().items()}
    del sd["layers.1.gamma"]
    sd["layers.9.W"] = np.zeros(3)
    sd["extra"] = np.zeros(1)
    with pytest.raises(StateDictError) as info:
        model.load_state_dict(sd)
    msg = str(info.value)
    assert 'Missing key(s) in state_dict: "layers.1.gamma"' in msg
    assert 'Unexpected key(s) in state_dict: "layers.9.W", "extra"' in msg
    assert isinstance(info.value, ValueError) and isinstance(info.value, RuntimeError)
    assert np.array_equal(model.params, before)            # nothing copied
    res = model.load_state_dict(sd, strict=False)
    assert res.missing_keys == ["layers.1.gamma"]
    assert res.unexpected_keys == ["layers.9.W", "extra"]
    assert np.array_equal(model.layers[1].gamma, before[model.layer_offsets[1] + 72:][:8])
    np.testing.assert_array_equal(model.layers[0].b, 1.0)


@pytest.mark.parametrize("bad, exc, match", [
    ({"layers.0.W": np.zeros((8, 5))}, StateDictError, r"size mismatch for layers.0.W.*\(8, 5\).*\(5, 8\)"),
    ({"layers.0.b": np.array(["a"] * 8)}, StateDictError, "real numbers"),
    ([("layers.0.b", np.zeros(8))], TypeError, "mapping"),
])
def test_load_state_dict_bad_values(bad, exc, match):
    model = _epilogue_model()
    before = model.params.copy()
    with pytest.raises(exc, match=match):
        model.load_state_dict(bad, strict=False)
    assert np.array_equal(model.params, before)


def test_state_dict_matches_torch_twin(rng):
    torch = pytest.importorskip("torch")
    model = fg.MLP([5, 7, 3], norm="batch", dtype="float64", seed=4)
    model(rng.standard_normal((6, 5)))
    tsd = model.to_torch().state_dict()
    sd = model.state_dict()
    np.testing.assert_array_equal(sd["layers.0.W"], tsd["0.weight"].numpy().T)
    np.testing.assert_array_equal(sd["layers.0.running_var"], tsd["1.running_var"].numpy())
    # torch tensors load directly
    other = fg.MLP([5, 7, 3], norm="batch", dtype="float64", seed=5)
    other.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()})
    assert np.array_equal(other.params, model.params)


def test_zero_grad(rng):
    model = fg.MLP([3, 4, 2], dtype="float64")
    model(rng.standard_normal((2, 3)))
    model.backward(np.ones((2, 2)))
    assert model.grads.any()
    model.zero_grad()
    assert not model.grads.any()
    model.grads[:] = 1
    model.zero_grad(set_to_none=False)
    assert not model.grads.any()


def test_pytorch_style_loop_matches_train_step(rng):
    """model(x) / loss / backward / opt.step() is the TrainStep trajectory."""
    x, y = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)
    a = fg.MLP([6, 10, 3], dtype="float64", seed=7)
    b = fg.MLP([6, 10, 3], dtype="float64", seed=7)
    opt_a, opt_b = fg.Adam(a, lr=1e-2, clip_norm=1.0), fg.Adam(b, lr=1e-2, clip_norm=1.0)
    step = fg.TrainStep(b, fg.SoftmaxCrossEntropy(), opt_b)
    loss_fn = fg.SoftmaxCrossEntropy()
    for _ in range(3):
        a.zero_grad()
        loss, dy = loss_fn(a(x), y)
        a.backward(dy)
        opt_a.step()
        assert loss == pytest.approx(step(x, y), rel=1e-12)
    np.testing.assert_allclose(a.params, b.params, rtol=1e-12, atol=1e-15)


# --- fit callbacks -----------------------------------------------------------------

def _data(rng, n=96):
    x = rng.standard_normal((n, 4))
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    return x, y


def _fit_setup(lr=0.05, seed=0):
    model = fg.MLP([4, 8, 2], dtype="float64", seed=seed)
    opt = fg.Adam(model, lr=lr)
    return model, opt, fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)


class _Recorder(cbs.Callback):
    def __init__(self):
        self.params, self.begun, self.ended = [], False, False

    def on_train_begin(self, step, history):
        self.begun = True

    def on_epoch_end(self, epoch, history, step):
        self.params.append(step.model.params.copy())

    def on_train_end(self, step, history):
        self.ended = True


def test_early_stopping_restores_best_weights(rng):
    x, y = _data(rng)
    xv, yv = _data(rng, 40)
    # lr large enough that validation loss gets worse at some point
    model, opt, step = _fit_setup(lr=0.5)
    rec = _Recorder()
    es = cbs.EarlyStopping(monitor="val_loss", patience=1)
    hist = fg.fit(step, x, y, epochs=30, batch_size=8, progress=False,
                  validation_data=(xv, yv), callbacks=[rec, es])
    vl = hist["val_loss"]
    assert rec.begun and rec.ended
    assert es.best == min(vl) and es.best_epoch == int(np.argmin(vl))
    if es.stopped_epoch is not None:
        assert len(vl) == es.stopped_epoch + 1 < 30
        assert len(vl) - 1 - es.best_epoch == 1              # patience 1: one bad epoch (Keras)
    assert np.array_equal(model.params, rec.params[es.best_epoch])
    assert fg.evaluate(model, step.loss_fn, xv, yv)["loss"] == pytest.approx(es.best, rel=1e-12)


def test_early_stopping_patience_zero_and_max_mode(rng):
    x, y = _data(rng)
    model, opt, step = _fit_setup(lr=0.0)                    # nothing moves: no improvement
    es = cbs.EarlyStopping(monitor="val_accuracy", patience=0)
    assert es.mode == "max"
    hist = fg.fit(step, x, y, epochs=10, batch_size=16, progress=False,
                  validation_data=(x, y), callbacks=[es])
    assert len(hist["val_accuracy"]) == 2 and es.stopped_epoch == 1 and es.best_epoch == 0


@pytest.mark.parametrize("patience", [1, 2, 3])
def test_early_stopping_counts_patience_as_keras(patience):
    """Keras stops after ``patience`` epochs without improvement (its
    ``wait >= patience``); this stopped one epoch later."""
    es = cbs.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=False)
    history = {"val_loss": []}
    es.on_train_begin(None, history)
    values = [1.0, 0.5] + [0.7] * 10
    for epoch, v in enumerate(values):
        history["val_loss"].append(v)
        if es.on_epoch_end(epoch, history, None):
            break
    assert es.best_epoch == 1 and es.stopped_epoch == 1 + patience


def _keras_early_stop(values, mode, patience, min_delta, baseline, start_from_epoch):
    """Keras 3's EarlyStopping rule, restated: (stopped epoch or None, best epoch)."""
    better = (lambda a, b: a - min_delta > b) if mode == "max" else \
        (lambda a, b: a + min_delta < b)
    best, best_epoch, wait = None, None, 0
    for epoch, v in enumerate(values):
        if epoch < start_from_epoch:
            continue
        wait += 1
        if best is None or better(v, best):
            best, best_epoch = v, epoch
            if baseline is None or better(v, baseline):
                wait = 0
            continue
        if wait >= patience and epoch > 0:
            return epoch, best_epoch
    return None, best_epoch


def test_early_stopping_baseline_and_start_epoch_as_keras():
    rng = np.random.default_rng(7)
    for trial in range(400):
        mode = ("min", "max")[trial % 2]
        patience, start = int(rng.integers(0, 4)), int(rng.integers(0, 3))
        baseline = None if trial % 3 == 0 else float(rng.uniform(0.2, 0.8))
        min_delta = float(rng.choice([0.0, 0.05]))
        values = [float(v) for v in rng.uniform(0, 1, 12)]
        es = cbs.EarlyStopping("val_loss", mode=mode, patience=patience, min_delta=min_delta,
                               restore_best_weights=False, baseline=baseline,
                               start_from_epoch=start)
        history = {"val_loss": []}
        es.on_train_begin(None, history)
        for epoch, v in enumerate(values):
            history["val_loss"].append(v)
            if es.on_epoch_end(epoch, history, None):
                break
        want = _keras_early_stop(values, mode, patience, min_delta, baseline, start)
        assert (es.stopped_epoch, es.best_epoch) == want, (values, mode, patience, baseline)
    with pytest.raises(ValueError, match="start_from_epoch"):
        cbs.EarlyStopping(start_from_epoch=-1)
    with pytest.raises(ValueError, match="baseline"):
        cbs.EarlyStopping(baseline=float("nan"))


def test_validation_split_holds_out_the_last_samples_as_keras(rng):
    x, y = _data(rng, 50)
    split_at = int(np.floor(50 * (1 - 0.3)))                 # Keras: floor, last samples
    model, opt, step = _fit_setup()
    a = fg.fit(step, x, y, epochs=3, batch_size=8, progress=False, validation_split=0.3)
    params_a = model.params.copy()
    model, opt, step = _fit_setup()
    b = fg.fit(step, x[:split_at], y[:split_at], epochs=3, batch_size=8, progress=False,
               validation_data=(x[split_at:], y[split_at:]))
    assert a == b and np.array_equal(model.params, params_a)
    c = fg.fit(step, x, y, epochs=1, progress=False, validation_split=0.3,
               validation_data=(x[:5], y[:5]))                # validation_data wins
    assert c["val_loss"][0] == pytest.approx(fg.evaluate(model, step.loss_fn, x[:5],
                                                         y[:5])["loss"], rel=1e-3)
    w0 = model.params.copy()
    for bad in (1.0, -0.1, "0.2", True):
        with pytest.raises(ValueError, match="validation_split"):
            fg.fit(step, x, y, epochs=1, progress=False, validation_split=bad)
    with pytest.raises(ValueError, match="no training samples"):
        fg.fit(step, x[:1], y[:1], epochs=1, progress=False, validation_split=0.5)
    with pytest.raises(ValueError, match="no validation samples"):
        fg.fit(step, x, y, epochs=1, progress=False, validation_split=1e-17)
    assert np.array_equal(model.params, w0)


def test_a_last_checkpoint_holds_its_epochs_weights_before_the_restore(rng, tmp_path):
    """EarlyStopping's restore runs after the other callbacks' ends: the
    checkpoint saved at the end is the last epoch's model and optimizer,
    whichever order the callbacks are listed in (it held the best epoch's
    weights under the last epoch's name and optimizer state)."""
    x, y = _data(rng)
    xv, yv = _data(rng, 40)
    for order in (0, 1):
        model, opt, step = _fit_setup(lr=0.5)
        rec = _Recorder()
        es = cbs.EarlyStopping(monitor="val_loss", patience=1)
        ck = cbs.ModelCheckpoint(str(tmp_path / f"o{order}-{{epoch:03d}}.fgz"), every=50)
        cbs_list = [es, ck] if order == 0 else [ck, es]
        hist = fg.fit(step, x, y, epochs=30, batch_size=8, progress=False,
                      validation_data=(xv, yv), callbacks=[rec] + cbs_list)
        last = len(hist["val_loss"])
        assert es.stopped_epoch == last - 1 and es.best_epoch < last - 1    # a restore
        assert ck.saved[-1].endswith(f"o{order}-{last:03d}.fgz")
        m, o = fg.load(ck.saved[-1])
        np.testing.assert_array_equal(m.params, rec.params[last - 1])
        assert o.step_count == opt.step_count
        np.testing.assert_array_equal(model.params, rec.params[es.best_epoch])


def test_fit_checks_validation_data_before_training(rng):
    """Bad validation data is refused before the first step, naming it (it
    failed after an epoch had trained, with messages from evaluate)."""
    x, y = _data(rng)
    bad = [((x[:, :3], y), "validation_data X"), ((x,), "pair"), ("xy", "pair"),
           ((x, y[:10]), "expected shape"), ((x, y + 5), "validation_data Y")]
    for data, match in bad:
        model, opt, step = _fit_setup()
        before = model.params.copy()
        with pytest.raises(ValueError, match=match):
            fg.fit(step, x, y, epochs=1, batch_size=16, progress=False, validation_data=data)
        assert np.array_equal(model.params, before) and opt.step_count == 0
    model, opt, step = _fit_setup()
    ignored = np.where(rng.random(len(y)) < 0.3, -100, y)      # ignore_index is allowed
    hist = fg.fit(step, x, y, epochs=1, batch_size=16, progress=False,
                  validation_data=(x, ignored))
    assert np.isfinite(hist["val_loss"][0])


def test_checkpoint_names_hold_the_epochs_figures_as_keras(rng, tmp_path):
    """Keras's "w-{epoch:02d}-{val_loss:.3f}" pattern works (it raised a bare
    KeyError after the first epoch); a field the history lacks is refused
    before training, naming what the pattern may hold."""
    x, y = _data(rng)
    model, opt, step = _fit_setup()
    ck = cbs.ModelCheckpoint(str(tmp_path / "w-{epoch:02d}-{val_loss:.3f}.fgz"))
    hist = fg.fit(step, x, y, epochs=2, batch_size=16, progress=False, validation_data=(x, y),
                  callbacks=[ck])
    assert [p.rsplit("/", 1)[-1] for p in ck.saved] == [
        f"w-{e + 1:02d}-{hist['val_loss'][e]:.3f}.fgz" for e in range(2)]
    for pattern in ("ck/{run}/w.fgz", "w-{val_loss:.3f}.fgz"):     # no validation data
        model, opt, step = _fit_setup()
        with pytest.raises(ValueError, match="history keys"):
            fg.fit(step, x, y, epochs=1, progress=False,
                   callbacks=[cbs.ModelCheckpoint(str(tmp_path / pattern))])
        assert opt.step_count == 0


def test_checkpoint_every_n_epochs(rng, tmp_path):
    x, y = _data(rng)
    model, opt, step = _fit_setup()
    rec = _Recorder()
    ck = cbs.ModelCheckpoint(str(tmp_path / "run-{epoch:02d}.fgz"), every=2)
    fg.fit(step, x, y, epochs=5, batch_size=16, progress=False, callbacks=[rec, ck])
    assert [p.rsplit("/", 1)[-1] for p in ck.saved] == ["run-02.fgz", "run-04.fgz", "run-05.fgz"]
    m2, o2 = fg.load(tmp_path / "run-04.fgz")
    assert np.array_equal(m2.params, rec.params[3]) and o2.step_count == 4 * 6
    m5, _ = fg.load(tmp_path / "run-05.fgz")
    assert np.array_equal(m5.params, model.params)


def test_reduce_lr_on_plateau_callback(rng):
    x, y = _data(rng)
    model = fg.MLP([4, 8, 2], dtype="float64", seed=0)
    sched = schedules.ReduceLROnPlateau(0.05, patience=0, factor=0.5)
    opt = fg.Adam(model, lr=sched)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    cb = cbs.ReduceLROnPlateau(monitor="loss")
    rec = []
    hist = fg.fit(step, x, y, epochs=6, batch_size=96, progress=False, shuffle=False,
                  callbacks=[cb, lambda k, loss, st: rec.append(st.lr)])
    # a torch-style replay of the same metric sequence gives the same lrs
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(1))
    topt = torch.optim.SGD([p], lr=0.05)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, patience=0, factor=0.5)
    want = []
    for loss in hist["loss"]:
        want.append(topt.param_groups[0]["lr"])
        tsched.step(loss)
    np.testing.assert_allclose(rec, want, rtol=1e-12)
    assert cb.reductions == [e for e in range(5) if want[e + 1] < want[e]]


def test_plateau_callback_mode_follows_the_monitor(rng):
    # val_accuracy rises when training goes well: a "min" schedule fed it cut
    # the lr at every improvement (Keras's mode="auto" reads it as "max")
    x, y = _data(rng)
    model = fg.MLP([4, 8, 2], dtype="float64", seed=0)
    w0 = model.params.copy()
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(),
                        fg.Adam(model, lr=schedules.ReduceLROnPlateau(0.05, patience=0)))
    with pytest.raises(ValueError, match="mode='max'"):
        fg.fit(step, x, y, epochs=2, progress=False, validation_data=(x, y),
               callbacks=[cbs.ReduceLROnPlateau("val_accuracy")])
    assert np.array_equal(model.params, w0)                 # refused before any step
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(
        model, lr=schedules.ReduceLROnPlateau(0.05, mode="max", patience=0)))
    cb = cbs.ReduceLROnPlateau("val_accuracy")
    hist = fg.fit(step, x, y, epochs=4, progress=False, validation_data=(x, y), callbacks=[cb])
    best = np.maximum.accumulate(hist["val_accuracy"])
    # cut only after an epoch that did not raise the best accuracy
    assert all(best[e] == best[e - 1] for e in cb.reductions if e > 0)
    with pytest.raises(ValueError, match="mode"):
        cbs.ReduceLROnPlateau(mode="up")


def test_callbacks_refuse_what_cannot_work(rng):
    x, y = _data(rng, 16)
    model, opt, step = _fit_setup()
    w0 = model.params.copy()
    with pytest.raises(ValueError, match="val_loss.*validation_data"):
        fg.fit(step, x, y, epochs=2, progress=False, callbacks=[cbs.EarlyStopping()])
    with pytest.raises(ValueError, match="schedules.ReduceLROnPlateau"):
        fg.fit(step, x, y, epochs=2, progress=False, callbacks=[cbs.ReduceLROnPlateau("loss")])
    assert np.array_equal(model.params, w0)                 # refused before any step
    with pytest.raises(ValueError, match="patience"):
        cbs.EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="mode"):
        cbs.EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="every"):
        cbs.ModelCheckpoint("x.fgz", every=0)


def test_callbacks_any_iterable_or_none(rng):
    """Callbacks given as a generator reach their epoch hooks (they were read
    twice: the second pass found none), None means none, as Keras's
    ``fit(callbacks=None)``; what is neither kind is refused before a step."""
    x, y = _data(rng, 16)
    model, opt, step = _fit_setup(lr=0.0)
    # lr 0: the epochs' losses differ only by the shuffled sum's rounding
    rec, es = _Recorder(), cbs.EarlyStopping(monitor="loss", patience=0, min_delta=1e-9)
    hist = fg.fit(step, x, y, epochs=5, batch_size=8, progress=False,
                  callbacks=(cb for cb in [rec, es]))
    assert rec.begun and rec.ended and len(rec.params) == 2
    assert es.stopped_epoch == 1 and len(hist["loss"]) == 2
    assert len(fg.fit(step, x, y, epochs=2, progress=False, callbacks=None)["loss"]) == 2
    w0 = model.params.copy()
    with pytest.raises(TypeError, match="neither a per-step callable nor an epoch callback"):
        fg.fit(step, x, y, epochs=1, progress=False, callbacks=[object()])
    assert np.array_equal(model.params, w0)


def test_callbacks_take_numpy_integers():
    assert cbs.EarlyStopping(patience=np.int64(3)).patience == 3
    assert cbs.ModelCheckpoint("x.fgz", every=np.int32(2)).every == 2
    with pytest.raises(ValueError, match="patience"):
        cbs.EarlyStopping(patience=2.0)


def test_progress_bar_shows_validation(rng, monkeypatch):
    pytest.importorskip("tqdm")
    from fastgrad import step as step_mod
    shown = []

    class Bar:
        def update(self, n):
            pass

        def set_postfix(self, **kw):
            shown.append(kw)

        def close(self):
            pass

    monkeypatch.setattr(step_mod, "_progress_bar", lambda *a: Bar())
    x, y = _data(rng, 32)
    model, opt, step = _fit_setup()
    fg.fit(step, x, y, epochs=2, batch_size=4, validation_data=(x, y))
    assert any("val_loss" in kw and "val_accuracy" in kw for kw in shown)
    # the per-step postfix of the second epoch keeps the first epoch's validation
    assert "val_loss" in shown[-2] and "steps_s" in shown[-2]


def test_state_dict_on_every_device(device, rng):
    from conftest import to_numpy
    from fastgrad import device as fgd
    xp = fgd.array_module(device)
    a = _epilogue_model(seed=1)                                  # on the CPU
    a(rng.standard_normal((6, 5)))
    m = fg.Sequential([fg.Dense(5, 8, activation="tanh", norm="batch", dropout=0.2),
                       fg.Residual(fg.Dense(8, 8, activation="relu", norm="layer")),
                       fg.Dense(8, 6, activation="gelu", weight_norm=True),
                       fg.Dense(6, 3, activation=None)], dtype="float64", device=device)
    m.load_state_dict(a.state_dict())                           # host arrays in
    sd = m.state_dict()
    assert all(type(v) is xp.ndarray for v in sd.values())
    assert np.array_equal(to_numpy(m.params), a.params)
    assert np.array_equal(to_numpy(m.running_var), a.running_var)
    x = rng.standard_normal((4, 5))
    a.eval(), m.eval()
    np.testing.assert_allclose(to_numpy(m(xp.asarray(x))), a(x), rtol=1e-12, atol=1e-14)


# --- labels of torch's default ignore_index -----------------------------------------

def test_default_cross_entropy_skips_rows_labelled_minus_100_as_torch(rng):
    # nn.CrossEntropyLoss() ignores -100 labels; the compiled step's loss
    # keeps every row, so it refused them ("class indices must lie in ...")
    torch = pytest.importorskip("torch")
    model = fg.MLP([5, 9, 4], activation="tanh", dtype="float64", seed=3)
    tmodel = model.to_torch()
    topt = torch.optim.Adam(tmodel.parameters(), lr=1e-2)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-2))
    for t in range(4):
        x = rng.standard_normal((6, 5))
        y = rng.integers(0, 4, 6)
        y[[t, 5]] = -100
        loss = step(x, y)
        topt.zero_grad()
        tloss = torch.nn.functional.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y))
        tloss.backward()
        topt.step()
        assert loss == pytest.approx(float(tloss.detach()), rel=1e-12)
    np.testing.assert_allclose(model.params, fg.from_torch(tmodel).params, rtol=1e-10,
                               atol=1e-12)
    with torch.no_grad():
        want = float(torch.nn.functional.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y)))
    assert step.gradients(x, y) == pytest.approx(want, rel=1e-12)
    y[0] = -5                               # out of range and not ignore_index: refused
    with pytest.raises(ValueError, match="class indices"):
        step(x, y)


def test_epochs_with_ignored_rows_run_step_by_step(rng):
    X, Y = rng.standard_normal((30, 5)), rng.integers(0, 4, 30)
    Y[::4] = -100
    runs = []
    for how in ("run_epoch", "loop", "fit"):
        model = fg.MLP([5, 9, 4], dtype="float64", seed=3)
        step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))
        if how == "run_epoch":
            losses = step.run_epoch(X, Y, 8, shuffle=False)["loss"]
        elif how == "loop":
            losses = [step(X[i:i + 8], Y[i:i + 8]) for i in range(0, 30, 8)]
        else:
            fg.fit(step, X, Y, epochs=1, batch_size=8, shuffle=False, progress=False)
            losses = None
        runs.append((model.params.copy(), losses))
    assert runs[0][0].tobytes() == runs[1][0].tobytes() == runs[2][0].tobytes()
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    Y[3] = 4                                # checked before any step
    model = fg.MLP([5, 9, 4], dtype="float64", seed=3)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))
    with pytest.raises(ValueError, match="class indices"):
        step.run_epoch(X, Y, 8)
    assert step.opt.step_count == 0


# --- copies ---------------------------------------------------------------------

@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_model_copies_as_a_torch_module_does(rng, how):
    # copy.deepcopy / pickle raised "cannot pickle 'module' object"; a
    # best-weights snapshot or an EMA copy is a deepcopy in torch
    import copy
    import pickle
    model = _epilogue_model()
    step = fg.TrainStep(model, fg.MSE(), fg.Adam(model, lr=1e-2))
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 3))
    step(x, y)
    model.forward(x)
    model.backward(np.ones((9, 3)))
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert type(twin) is type(model) and repr(twin) == repr(model)
    for name in ("params", "grads", "running_mean", "running_var"):
        assert getattr(twin, name).tobytes() == getattr(model, name).tobytes(), name
        assert not np.shares_memory(getattr(twin, name), getattr(model, name))
    assert (twin.dropout_step, twin._mask_seed, twin.training, twin.seed) == \
        (model.dropout_step, model._mask_seed, model.training, model.seed)
    # the copy computes what the model does, then trains on its own
    assert np.array_equal(twin.predict(x), model.predict(x))
    assert np.array_equal(twin.forward(x), model.forward(x))      # the same dropout masks
    before = model.params.copy()
    fg.TrainStep(twin, fg.MSE(), fg.Adam(twin, lr=1e-2))(x, y)
    assert np.array_equal(model.params, before) and not np.array_equal(twin.params, before)
    wn = model.layers[2]                    # weight-normalised: its effective W and dW
    assert twin.layers[2].W.tobytes() == wn.W.tobytes()
    assert twin.layers[2].dW.tobytes() == wn.dW.tobytes()
    mlp = fg.MLP([4, 6, 2], dropout=0.1, seed=5).eval()
    mlp2 = copy.deepcopy(mlp)
    assert type(mlp2) is fg.MLP and not mlp2.training
    assert np.array_equal(mlp2.predict(x[:, :4]), mlp.predict(x[:, :4]))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_optimizer_and_step_copy_and_train_on_as_the_original(rng, how):
    # "cannot pickle '_thread.RLock' object": torch's optimizers deepcopy;
    # the copies are bound to the copied model and train on bitwise
    import copy
    import pickle
    model = _epilogue_model()
    groups = [{"params": model.weights(), "lr": 0.02}, {"params": model.biases_and_norms()}]
    opt = fg.Adam(model, lr=fg.schedules.step_decay(0.01, 2), clip_norm=1.0,
                  param_groups=groups)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(label_smoothing=0.1), opt)
    x, y = rng.standard_normal((9, 5)), rng.integers(0, 3, 9)
    for _ in range(3):
        step(x, y)
    twin = copy.deepcopy(step) if how == "deepcopy" else pickle.loads(pickle.dumps(step))
    assert twin.model is not model and twin.opt is not opt
    assert twin.opt.params is twin.model.params and twin.opt.step_count == 3
    for _ in range(3):
        assert twin(x, y) == step(x, y)
    assert twin.model.params.tobytes() == model.params.tobytes()
    assert twin.opt.lr == opt.lr and twin.opt.state_dict()["groups"] == opt.state_dict()["groups"]
    # an optimizer over (param, grad) pairs copies its pairs, as torch's its tensors
    p, g = rng.standard_normal(4), rng.standard_normal(4)
    sgd = fg.SGD([(p, g)], lr=0.1, momentum=0.9)
    sgd.step()
    sgd2 = copy.deepcopy(sgd) if how == "deepcopy" else pickle.loads(pickle.dumps(sgd))
    sgd.step()
    sgd2.step()
    assert sgd2.params.tobytes() == p.tobytes() and sgd2._pairs[0][0] is not p


class _Net(fg.Sequential):
    def __init__(self, hidden):
        super().__init__([fg.Dense(3, hidden), fg.Dense(hidden, 2, activation=None)], seed=1)
        self.hidden = hidden


def test_a_subclass_copies_with_its_own_attributes():
    import copy
    import pickle
    net = _Net(5)
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert type(twin) is _Net and twin.hidden == 5
        assert twin.params.tobytes() == net.params.tobytes()


def test_weight_norm_layers_dW_is_the_effective_weights_gradient(rng, device):
    # it was np.empty_like's memory, never written
    from conftest import to_numpy
    model = fg.Sequential([fg.Dense(4, 3, activation="tanh", weight_norm=True),
                           fg.Dense(3, 2, activation=None, weight_norm=True)],
                          dtype="float64", seed=1, device=device)
    x = rng.standard_normal((5, 4))
    model.forward(x)
    model.backward(np.ones((5, 2)))
    plain = fg.Sequential([fg.Dense(4, 3, activation="tanh"), fg.Dense(3, 2, activation=None)],
                          dtype="float64", seed=1, device=device)
    for src, dst in zip(model.layers, plain.layers):
        dst.W[...] = src.W
        dst.b[...] = src.b
    plain.forward(x)
    plain.backward(np.ones((5, 2)))
    for wn, p in zip(model.layers, plain.layers):
        np.testing.assert_allclose(to_numpy(wn.dW), to_numpy(p.dW), rtol=1e-12, atol=1e-14)
