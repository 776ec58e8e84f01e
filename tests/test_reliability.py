"""Reliability under misuse, threads, failing ranks and hostile environments
(issue 16): no memory corruption, no poisoned state, no hung job.

Sections: optimizer attribute writes; threads; what a skipped step leaves
unchanged; model buffers that cannot be rebound; the bounded buffer cache;
checkpoint checksums and stray temporary files; the Numba cache; MPI jobs
whose ranks fail or disagree.
"""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastgrad as fg

SIZES = [5, 16, 16, 3]


def _data(rng, batch=12, sizes=SIZES):
    return rng.standard_normal((batch, sizes[0])), rng.integers(0, sizes[-1], batch)


def _train(opt_factory, set_after=None, n_steps=6, seed=0, **model_kw):
    """Train a float64 MLP for n_steps; ``set_after`` (name, value) is
    written to the optimizer after construction.  Returns (model, opt)."""
    model = fg.MLP(SIZES, dtype="float64", seed=seed, **model_kw)
    opt = opt_factory(model)
    if set_after is not None:
        setattr(opt, *set_after)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    rng = np.random.default_rng(7)
    for _ in range(n_steps):
        step(*_data(rng))
    return model, opt


# -- 1. optimizer attribute writes -------------------------------------------------

# (class, constructor arguments, attribute, value written after construction)
WRITES = [
    (fg.SGD, dict(lr=0.1), "momentum", 0.9),
    (fg.SGD, dict(lr=0.1, momentum=0.9), "nesterov", True),
    (fg.SGD, dict(lr=0.1, momentum=0.9), "dampening", 0.25),
    (fg.SGD, dict(lr=0.1), "weight_decay", 0.1),
    (fg.Adam, dict(lr=1e-2), "amsgrad", True),
    (fg.Adam, dict(lr=1e-2), "betas", (0.5, 0.9)),
    (fg.Adam, dict(lr=1e-2), "eps", 1e-3),
    (fg.AdamW, dict(lr=1e-2, amsgrad=True), "amsgrad", False),
    (fg.RMSprop, dict(lr=1e-2), "centered", True),
    (fg.RMSprop, dict(lr=1e-2), "momentum", 0.5),
    (fg.RMSprop, dict(lr=1e-2, momentum=0.5), "momentum", 0.0),
    (fg.RMSprop, dict(lr=1e-2), "alpha", 0.5),
    (fg.Adam, dict(lr=1e-2), "clip_norm", 0.01),
    (fg.Adam, dict(lr=1e-2, clip_norm=0.01), "clip_norm", None),
    (fg.SGD, dict(lr=0.1), "clip_value", 1e-3),
]


@pytest.mark.parametrize("cls,kw,name,value", WRITES,
                         ids=[f"{c.__name__}.{n}={v}" for c, _, n, v in WRITES])
def test_hyper_parameter_written_after_construction_takes_effect(cls, kw, name, value):
    """Setting a hyper-parameter after construction trains exactly as
    passing it to the constructor (state buffers it needs start at zero),
    and the checkpoint reports it."""
    ma, oa = _train(lambda m: cls(m, **kw), set_after=(name, value))
    mb, ob = _train(lambda m: cls(m, **dict(kw, **{name: value})))
    assert getattr(oa, name) == getattr(ob, name)
    assert oa.params.tobytes() == ob.params.tobytes()
    assert sorted(oa.state) == sorted(ob.state)
    for k in oa.state:
        assert oa.state[k].tobytes() == ob.state[k].tobytes()
    want = list(value) if isinstance(value, tuple) else value
    assert oa.state_dict()["hyper"][name] == want
    if name == "clip_norm" and value is not None:
        assert oa.last_stats.clipped


def test_state_buffers_follow_the_flags_and_stay_full_length():
    model = fg.MLP(SIZES, dtype="float64")
    opt = fg.RMSprop(model)
    assert set(opt.state) == {"square_avg"}
    opt.centered, opt.momentum = True, 0.9
    assert set(opt.state) == {"square_avg", "grad_avg", "momentum_buffer"}
    assert all(b.shape == model.params.shape for b in opt.state.values())
    opt.momentum = 0.0
    assert set(opt.state) == {"square_avg", "grad_avg"}


def test_hyper_parameter_write_round_trips_through_a_checkpoint(tmp_path):
    model, opt = _train(lambda m: fg.Adam(m, lr=1e-2), set_after=("amsgrad", True))
    fg.save(tmp_path / "c.fgz", model, opt)
    model2, opt2 = fg.load(tmp_path / "c.fgz")
    assert opt2.amsgrad is True and opt2.hyper == opt.hyper
    assert opt2.state["max_exp_avg_sq"].tobytes() == opt.state["max_exp_avg_sq"].tobytes()


BAD_WRITES = [
    (fg.Adam, "amsgrad", "False", TypeError, "amsgrad must be True or False"),
    (fg.Adam, "amsgrad", 1, TypeError, "amsgrad must be True or False"),
    (fg.RMSprop, "centered", "yes", TypeError, "centered must be True or False"),
    (fg.SGD, "nesterov", True, ValueError, "Nesterov momentum requires"),
    (fg.SGD, "momentum", -0.5, ValueError, "momentum must be"),
    (fg.SGD, "momentum", np.float64("nan"), ValueError, "momentum must be"),
    (fg.SGD, "dampening", float("nan"), ValueError, "dampening must be in"),
    (fg.SGD, "dampening", -0.1, ValueError, "dampening must be in"),
    (fg.SGD, "dampening", 1.5, ValueError, "dampening must be in"),
    (fg.SGD, "dampening", "0", TypeError, "dampening must be a real number"),
    (fg.Adam, "clip_norm", "1.0", TypeError, "clip_norm must be a real number"),
    (fg.Adam, "clip_norm", -1.0, ValueError, "clip_norm must be > 0"),
    (fg.Adam, "clip_value", float("nan"), ValueError, "clip_value must be > 0"),
    (fg.Adam, "betas", 0.9, TypeError, r"betas must be a pair \(beta1, beta2\)"),
    (fg.Adam, "betas", (0.9,), TypeError, r"betas must be a pair \(beta1, beta2\)"),
    (fg.Adam, "betas", (0.9, "0.99"), TypeError, "beta2 must be a real number"),
    (fg.Adam, "betas", (0.9, 1.0), ValueError, r"beta2 must be in \[0, 1\)"),
    (fg.Adam, "eps", np.float32("nan"), ValueError, "eps must be a finite number"),
    (fg.RMSprop, "alpha", 1.5, ValueError, r"alpha must be in \[0, 1\]"),
    (fg.Adam, "skip_nonfinite", "no", TypeError, "skip_nonfinite must be True or False"),
]


@pytest.mark.parametrize("cls,name,value,exc,match", BAD_WRITES,
                         ids=[f"{c.__name__}.{n}={v!r}" for c, n, v, *_ in BAD_WRITES])
def test_bad_hyper_parameter_is_refused_and_changes_nothing(cls, name, value, exc, match):
    model = fg.MLP(SIZES, dtype="float64")
    opt = cls(model, lr=0.1)
    before = (opt.hyper, sorted(opt.state))
    with pytest.raises(exc, match=match):
        setattr(opt, name, value)
    assert (opt.hyper, sorted(opt.state)) == before
    # the same value is refused by the constructor, with the same message
    with pytest.raises(exc, match=match):
        cls(fg.MLP(SIZES, dtype="float64"), lr=0.1, **{name: value})


@pytest.mark.parametrize("name", ["params", "grads", "layer_offsets", "state", "device",
                                  "kind", "rule", "state_names"])
def test_structural_optimizer_attributes_are_read_only(name):
    opt = fg.Adam(fg.MLP(SIZES, dtype="float64"))
    before = getattr(opt, name)
    with pytest.raises(AttributeError, match=name):
        setattr(opt, name, np.zeros(1))
    after = getattr(opt, name)
    assert after is before or np.array_equal(after, before)
    assert fg.Adam.kind == "adam" and fg.SGD.state_names == ("momentum_buffer",)


def test_state_entries_cannot_be_replaced_but_are_writable_in_place():
    model = fg.MLP(SIZES, dtype="float64")
    opt = fg.Adam(model)
    with pytest.raises(TypeError, match="cannot be replaced"):
        opt.state["exp_avg"] = np.zeros(1)
    with pytest.raises(TypeError, match="cannot be replaced"):
        del opt.state["exp_avg_sq"]
    opt.state["exp_avg"][...] = 0.5
    assert np.all(opt.state["exp_avg"] == 0.5) and opt.state["exp_avg"].size == model.n_params


def test_layer_offsets_written_in_place_cannot_reach_the_kernel():
    """The optimizer and TrainStep index with the optimizer's own copy of the
    layer boundaries, the layer path with the model's; both public views
    are read-only."""
    rng = np.random.default_rng(8)
    model = fg.MLP(SIZES, dtype="float64", seed=0)
    opt = fg.Adam(model, lr=1e-2)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    with pytest.raises(ValueError, match="read-only"):
        opt.layer_offsets[1] = 10 ** 9
    with pytest.raises(ValueError, match="read-only"):
        model.layer_offsets[1] = 10 ** 9
    x, y = _data(rng)
    step(x, y)
    opt.step()
    model.forward(x)
    model.backward(np.ones((x.shape[0], SIZES[-1])))
    assert np.isfinite(model.params).all() and opt.step_count == 2
    assert np.isfinite(model.grads).all()


def test_step_count_write_is_validated():
    opt = fg.Adam(fg.MLP(SIZES, dtype="float64"))
    for bad in (-1, 1.5, "3", True, 2 ** 62):
        with pytest.raises(ValueError, match="step_count"):
            opt.step_count = bad
    opt.step_count = 4
    assert opt.step_count == 4


def test_dropout_step_write_is_validated():
    """Masks are drawn from the counter in int64: a float or a value past
    2**62 was taken (1.5 drew the masks of 1)."""
    model = fg.MLP(SIZES, dtype="float64", dropout=0.5)
    for bad in (-1, 1.5, "3", True, 2 ** 62, None):
        with pytest.raises(ValueError, match="dropout_step"):
            model.dropout_step = bad
    model.dropout_step = np.int64(7)
    assert model.dropout_step == 7 and type(model.dropout_step) is int


def test_evaluate_checks_its_arguments():
    model = fg.MLP(SIZES, dtype="float64")
    loss = fg.SoftmaxCrossEntropy()
    x, y = _data(np.random.default_rng(0))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            fg.evaluate(model, loss, x, y, batch_size=bad)
    with pytest.raises(ValueError, match="same number of samples"):
        fg.evaluate(model, loss, x[:0], y[:0])
    with pytest.raises(ValueError, match="same number of samples"):
        fg.evaluate(model, loss, x, y[:-1])
    assert set(fg.evaluate(model, loss, x, y, batch_size=5)) == {"loss", "accuracy"}


def test_sgd_dampening_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng()
    p0, grads = rng.standard_normal(11), rng.standard_normal((5, 11))
    p = p0.copy()
    g = np.zeros_like(p)
    opt = fg.SGD([(p, g)], lr=0.1, momentum=0.9, dampening=0.3)
    tp = torch.tensor(p0, requires_grad=True)
    topt = torch.optim.SGD([tp], lr=0.1, momentum=0.9, dampening=0.3)
    for gk in grads:
        g[...] = gk
        opt.step()
        tp.grad = torch.tensor(gk)
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-13, atol=1e-15)


# -- 2. threads ----------------------------------------------------------------------

def _hammer(fns, n_rounds):
    """Run every fn n_rounds times, each in its own thread, all at once."""
    errors = []
    barrier = threading.Barrier(len(fns))

    def run(fn):
        try:
            barrier.wait()
            for _ in range(n_rounds):
                fn()
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors


@pytest.mark.slow
def test_train_step_shared_by_two_threads_never_writes_nan():
    """One thread trains on finite batches, the other on NaN batches, on the
    same TrainStep.  The NaN steps must all be skipped: no NaN may reach the
    parameters or the Adam moments (the kernels release the GIL, so without
    the lock the NaN thread's gradient landed between the other thread's
    finiteness check and its update)."""
    rng = np.random.default_rng(0)
    sizes = [64, 256, 256, 10]
    model = fg.MLP(sizes, seed=0)
    opt = fg.Adam(model, lr=1e-3)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    x, y = _data(rng, 256, sizes)
    x_nan = x.copy()
    x_nan[3, 5] = np.nan
    step(x, y)
    step(x_nan, y)                   # compiled before the threads start
    n = 100
    _hammer([lambda: step(x, y), lambda: step(x_nan, y)], n)
    assert np.isfinite(model.params).all()
    assert all(np.isfinite(b).all() for b in opt.state.values())
    assert opt.step_count == n + 1 and opt.n_skipped == n + 1


def test_optimizer_and_layer_path_from_threads_serialise():
    """A hand-written loop (forward, backward, opt.step) on NaN data in one
    thread and a TrainStep on finite data in another: every call runs whole,
    so a NaN gradient is never applied.  (Between the hand loop's backward
    and its opt.step the other thread may run a whole step and leave its
    finite gradient, which the hand's update then applies: a race of the
    user's loop, not a torn update; so the skips are not counted per call.)"""
    rng = np.random.default_rng(1)
    model = fg.MLP(SIZES, dtype="float64", seed=0)
    opt = fg.SGD(model, lr=0.01, momentum=0.9)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    loss_fn = fg.SoftmaxCrossEntropy()
    x, y = _data(rng, 32)
    x_nan = np.full_like(x, np.nan)

    def hand():
        out = model.forward(x_nan)
        _, dy = loss_fn(out, y)
        model.backward(dy)
        stats = opt.step()
        assert stats.skipped or np.isfinite(stats.grad_norm)

    _hammer([lambda: step(x, y), hand], 50)
    assert np.isfinite(model.params).all() and np.isfinite(opt.state["momentum_buffer"]).all()
    assert opt.step_count + opt.n_skipped == 100 and opt.step_count >= 50


def test_writers_and_readers_wait_for_a_step(tmp_path):
    """What a step reads or writes takes the model's lock: held by a step
    (here by a thread holding it), these wait instead of writing into the
    parameters between a step's forward and its update, or reading one
    update's parameters with another's state (a checkpoint saved while
    another thread trained was torn or failed its own checksum; eval(), a
    counter or a hyper-parameter written during an epoch's chunk was
    undone or half applied)."""
    model = fg.MLP(SIZES, dtype="float64", seed=0)
    opt = fg.SGD(model, lr=0.1)
    new = {k: v * 0.5 for k, v in model.state_dict().items()}

    def set_(obj, name, value):
        setattr(obj, name, value)
    for call in (lambda: model.load_state_dict(new), model.zero_grad, opt.zero_grad,
                 model.eval, lambda: set_(model, "dropout_step", 3),
                 lambda: set_(opt, "step_count", 2), lambda: set_(opt, "lr", 0.05),
                 opt.state_dict, lambda: fg.save(tmp_path / "x.fgz", model, opt)):
        held, release = threading.Event(), threading.Event()

        def hold():
            with model._lock:
                held.set()
                release.wait(30)
        holder = threading.Thread(target=hold)
        holder.start()
        held.wait()
        done = threading.Event()
        caller = threading.Thread(target=lambda: (call(), done.set()))
        caller.start()
        assert not done.wait(0.3), "ran while a step held the model"
        release.set()
        holder.join()
        caller.join()
        assert done.is_set()
    np.testing.assert_array_equal(model.params, np.concatenate(
        [new[k].ravel() for k, _ in model.named_parameters()]))


def test_ctrl_c_during_load_state_dict_lands_after_the_copy(python_sigint):
    """A Ctrl-C during model.load_state_dict (EarlyStopping's restore) left
    some arrays loaded and others not; it lands once all are copied and the
    weight-normalised layers' W is made from them."""
    import signal
    model = fg.Sequential([fg.Dense(4, 5, activation="tanh", weight_norm=True),
                           fg.Dense(5, 2, activation=None, weight_norm=True)],
                          dtype="float64", seed=0)
    new = {k: v * 0.5 + 0.1 for k, v in model.state_dict().items()}
    want = fg.Sequential([fg.Dense(4, 5, activation="tanh", weight_norm=True),
                          fg.Dense(5, 2, activation=None, weight_norm=True)],
                         dtype="float64", seed=0)
    want.load_state_dict(new)
    refresh = model._refresh_weight_norm

    def interrupted_refresh():
        signal.raise_signal(signal.SIGINT)
        refresh()
    model._refresh_weight_norm = interrupted_refresh
    with pytest.raises(KeyboardInterrupt):
        model.load_state_dict(new)
    for got, ref in zip(model.layers, want.layers):
        np.testing.assert_array_equal(got.W, ref.W)


def test_train_step_fields_and_loss_options_are_fixed():
    """The step's buffers, plan and kernels are made for its model, loss
    and optimizer: rebinding them raised nothing and then segfaulted (a
    smaller model's optimizer) or went on with the old loss; a loss option
    written later reached fit's validation and not the training step."""
    model = fg.MLP(SIZES, dtype="float64", seed=0)
    loss = fg.SoftmaxCrossEntropy()
    step = fg.TrainStep(model, loss, fg.SGD(model, lr=0.1))
    other = fg.MLP([5, 3], dtype="float64")
    for name, value in (("opt", fg.SGD(other)), ("model", other),
                        ("loss_fn", fg.SoftmaxCrossEntropy(label_smoothing=0.1))):
        before = getattr(step, name)
        with pytest.raises(AttributeError, match=f"step.{name} is fixed"):
            setattr(step, name, value)
        assert getattr(step, name) is before
    for name, value in (("label_smoothing", 0.5), ("weight", np.ones(3)),
                        ("reduction", "sum"), ("ignore_index", 1)):
        with pytest.raises(AttributeError, match=f"SoftmaxCrossEntropy.{name} is fixed"):
            setattr(loss, name, value)
    assert loss.options == {}
    with pytest.raises(AttributeError, match="pos_weight is fixed"):
        fg.BCEWithLogits(pos_weight=2.0).pos_weight = 3.0
    with pytest.raises(AttributeError, match="reduction is fixed"):
        fg.MSE().reduction = "sum"
    rng = np.random.default_rng(3)
    step(*_data(rng))
    assert np.isfinite(model.params).all()


def _interrupted(kernel):
    """``kernel`` with a SIGINT delivered as it returns: a Ctrl-C pressed
    while a compiled step ran (Python raises it at its first chance after
    the kernel returns)."""
    import signal

    def run(*args, **kw):
        out = kernel(*args, **kw)
        signal.raise_signal(signal.SIGINT)
        return out
    return run


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test, and the hold made to look
    for it again: a job a non-interactive shell starts in the background
    inherits SIGINT ignored, and Python then installs no handler (nor does
    the hold, which only goes in front of a Python one)."""
    import signal

    from fastgrad import interrupts
    hold = interrupts._hold
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    hold.installed, hold.previous = None, None
    yield
    signal.signal(signal.SIGINT, old)
    hold.installed, hold.previous = None, None


@pytest.mark.parametrize("path", ["step", "layer_path", "run_epoch"])
def test_ctrl_c_lands_after_the_book_keeping(monkeypatch, python_sigint, path):
    """Ctrl-C during a step raises KeyboardInterrupt once the step is
    counted: before, an update interrupted between its kernel and the
    book-keeping was applied but not counted (Adam's bias correction one
    step behind, the dropout counter reused).  The interrupted run equals
    an uninterrupted one of as many steps as it counted."""
    rng = np.random.default_rng(5)
    x, y = _data(rng, 24)

    def build():
        model = fg.MLP(SIZES, dtype="float64", seed=0, dropout=0.2)
        opt = fg.Adam(model, lr=1e-2)
        return model, opt, fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)

    def one_step(model, opt, step, i):
        xb, yb = x[8 * i:8 * i + 8], y[8 * i:8 * i + 8]
        if path == "layer_path":
            model.backward(fg.SoftmaxCrossEntropy()(model.forward(xb), yb)[1])
            opt.step()
        else:
            step(xb, yb)

    model, opt, step = build()
    if path == "layer_path":
        chosen = opt._chosen_update
        monkeypatch.setattr(opt, "_chosen_update", lambda: _interrupted(chosen()))
    else:
        name = "train_steps" if path == "run_epoch" else "train_step"
        monkeypatch.setattr(step._kernels, name, _interrupted(getattr(step._kernels, name)))
    with pytest.raises(KeyboardInterrupt):
        if path == "run_epoch":
            step.run_epoch(x, y, batch_size=8, shuffle=False)
        else:
            one_step(model, opt, step, 0)
    monkeypatch.undo()
    n = opt.step_count
    assert n >= 1 and model.dropout_step == n
    if path != "layer_path":        # run_epoch left step.stats at its last callback's step
        assert step.stats.step == n
    ref_model, ref_opt, ref_step = build()
    for i in range(n):
        one_step(ref_model, ref_opt, ref_step, i)
    np.testing.assert_array_equal(model.params, ref_model.params)
    np.testing.assert_array_equal(opt.state["exp_avg"], ref_opt.state["exp_avg"])
    # outside a step, Ctrl-C is Python's own again
    import signal
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        sum(range(10))


# -- 3. a skipped step changes nothing ---------------------------------------------------

MODELS = {
    "plain": dict(),
    "dropout": dict(dropout=0.3),
    "batch_norm": dict(norm="batch"),
    "batch_norm_dropout_residual": dict(norm="batch", dropout=0.2, residual=True),
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("opt_name", ["adam", "sgd", "rmsprop"])
def test_skipped_step_changes_nothing(kind, opt_name):
    rng = np.random.default_rng(2)
    model = fg.MLP(SIZES, dtype="float64", seed=0, **MODELS[kind])
    opt = {"adam": lambda: fg.Adam(model, lr=1e-2, amsgrad=True),
           "sgd": lambda: fg.SGD(model, lr=0.1, momentum=0.9),
           "rmsprop": lambda: fg.RMSprop(model, momentum=0.5, centered=True)}[opt_name]()
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    for _ in range(3):
        step(*_data(rng))
    x, y = _data(rng)
    x[4, 2] = np.nan
    params = model.params.copy()
    state = {k: v.copy() for k, v in opt.state.items()}
    counts = (opt.step_count, opt.n_skipped)
    running = (model.running_mean.copy(), model.running_var.copy())
    counter = model.dropout_step
    step(x, y)
    assert step.stats.skipped
    # each thing a step changes, checked one by one
    assert model.params.tobytes() == params.tobytes(), "parameters"
    assert all(opt.state[k].tobytes() == v.tobytes() for k, v in state.items()), "moments"
    assert (opt.step_count, opt.n_skipped) == (counts[0], counts[1] + 1), "step count"
    assert model.running_mean.tobytes() == running[0].tobytes(), "running mean"
    assert model.running_var.tobytes() == running[1].tobytes(), "running variance"
    assert model.dropout_step == counter, "dropout counter"
    # so eval predictions stay finite after the NaN batch
    model.eval()
    assert np.isfinite(model.predict(_data(rng)[0])).all()


@pytest.mark.parametrize("loss_options", [False, True], ids=["plain-loss", "loss-options"])
def test_skipped_step_leaves_batch_norm_on_every_device(device, loss_options):
    """The layer path (CUDA models with batch norm; any model whose loss has
    options) restores the running statistics after a skipped update too: on
    CUDA by a select on the device's skip flag, without a host wait."""
    from fastgrad.device import array_module
    xp = array_module(device)
    rng = np.random.default_rng(5)
    model = fg.MLP(SIZES, dtype="float64", seed=0, norm="batch", device=device)
    loss = (fg.SoftmaxCrossEntropy(label_smoothing=0.1) if loss_options
            else fg.SoftmaxCrossEntropy())
    step = fg.TrainStep(model, loss, fg.Adam(model, lr=1e-2))
    for _ in range(2):
        x, y = _data(rng)
        step(xp.asarray(x), y)
    x, y = _data(rng)
    x[4, 2] = np.nan
    running = (to_host(model.running_mean), to_host(model.running_var))
    counter = model.dropout_step
    step(xp.asarray(x), y)
    assert step.stats.skipped
    assert to_host(model.running_mean).tobytes() == running[0].tobytes(), "running mean"
    assert to_host(model.running_var).tobytes() == running[1].tobytes(), "running variance"
    if device == "cpu":
        assert model.dropout_step == counter, "dropout counter"
    model.eval()
    assert np.isfinite(to_host(model.predict(xp.asarray(_data(rng)[0])))).all()


def to_host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.array(a)


def test_skipped_step_then_retry_draws_the_same_masks():
    """After a skipped step, the next step draws the masks the skipped one
    would have drawn: a run with a NaN batch inserted equals one without."""
    rng = np.random.default_rng(3)
    batches = [_data(rng) for _ in range(4)]
    bad = (np.full_like(batches[0][0], np.nan), batches[0][1])
    runs = []
    for insert in (False, True):
        model = fg.MLP(SIZES, dtype="float64", seed=0, dropout=0.3, norm="batch")
        step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-2))
        for i, b in enumerate(batches):
            if insert and i == 2:
                step(*bad)
            step(*b)
        runs.append((model.params.copy(), model.running_mean.copy()))
    assert runs[0][0].tobytes() == runs[1][0].tobytes()
    assert runs[0][1].tobytes() == runs[1][1].tobytes()


# -- 8. model buffers cannot be rebound ------------------------------------------------------

@pytest.mark.parametrize("name", ["params", "grads", "layer_offsets", "running_mean",
                                  "running_var"])
def test_model_buffers_cannot_be_replaced(name):
    model = fg.MLP(SIZES, dtype="float64", norm="batch")
    before = getattr(model, name)
    with pytest.raises(AttributeError, match=f"model.{name} cannot be replaced"):
        setattr(model, name, before.copy())
    if name == "layer_offsets":             # a fresh read-only view each time
        assert getattr(model, name).base is before.base
    else:
        assert getattr(model, name) is before


@pytest.mark.parametrize("name", ["W", "b", "dW", "db", "gamma", "running_mean"])
def test_layer_arrays_cannot_be_replaced(name):
    model = fg.MLP([4, 4, 4, 2], dtype="float64", norm="batch", residual=True)
    for layer in model.layers[:2]:           # a Dense and a Residual
        before = getattr(layer, name)
        with pytest.raises(AttributeError, match=f"layer.{name} cannot be replaced"):
            setattr(layer, name, before.copy())
        assert getattr(layer, name) is before


@pytest.mark.parametrize("name,value", [
    ("activation", "tanh"), ("activation", "bogus"), ("alpha", 0.5), ("dropout", 0.5),
    ("dropout", 5.0), ("norm", "layer"), ("norm", None), ("residual", True),
    ("residual", False), ("weight_norm", True), ("n_in", 5), ("n_out", 9), ("code", 99)])
def test_layer_settings_are_fixed_once_placed(name, value):
    """The buffers, plans and compiled steps are laid out for a layer's
    settings: a write after placement was read by some paths and not by
    others (a norm added to the last layer wrote past model.grads; a
    residual on a widening layer read past the input).  Writing the same
    value is allowed; the model still trains."""
    rng = np.random.default_rng()
    model = fg.MLP([4, 4, 4, 3], dtype="float64", norm="batch", residual=True, dropout=0.25,
                   seed=0)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))
    x, y = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    step(x, y)
    for layer in (model.layers[0], model.layers[1], model.layers[1].layer, model.layers[2]):
        before = getattr(layer, name)
        if before == value and type(before) is type(value):
            continue
        with pytest.raises(AttributeError, match=f"layer.{name} is fixed"):
            setattr(layer, name, value)
        assert getattr(layer, name) == before
        setattr(layer, name, before)            # the same value: allowed
    step(x, y)
    model.backward(np.ones((8, 3))) if model.forward(x) is not None else None
    assert np.isfinite(model.params).all() and np.isfinite(model.grads).all()
    # an unplaced layer takes any write (Residual's own construction sets one)
    free = fg.Dense(3, 3)
    free.activation = "tanh"
    assert free.activation == "tanh"


def test_in_place_parameter_writes_reach_every_path():
    """The supported way (write into model.params) changes what predict,
    the layers' views and the TrainStep see."""
    rng = np.random.default_rng(4)
    model = fg.MLP(SIZES, dtype="float64")
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.SGD(model, lr=0.1))
    new = rng.standard_normal(model.n_params)
    model.params[...] = new
    assert np.array_equal(model.layers[0].W.ravel(), new[:SIZES[0] * SIZES[1]])
    x, y = _data(rng)
    ref = fg.MLP(SIZES, dtype="float64")
    ref.params[...] = new
    np.testing.assert_array_equal(model.predict(x), ref.predict(x))
    step(x, y)
    assert not np.array_equal(model.params, new)


# -- 9. the bounded buffer cache -----------------------------------------------------------

def test_buffer_cache_keeps_the_most_recent_batch_sizes_only():
    rng = np.random.default_rng(5)
    model = fg.MLP(SIZES, dtype="float64", seed=0)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-2))
    ref_model = fg.MLP(SIZES, dtype="float64", seed=0)
    ref = fg.TrainStep(ref_model, fg.SoftmaxCrossEntropy(), fg.Adam(ref_model, lr=1e-2))
    ref.max_cached_batch_sizes = 1000
    limit = fg.TrainStep.max_cached_batch_sizes
    sizes = list(range(1, limit + 5)) + [1, 2, limit + 4, 3]
    for B in sizes:
        x, y = _data(rng, B)
        assert step(x, y) == ref(x, y)
        assert len(step._buffers) <= limit
    assert list(step._buffers)[-3:] == [2, limit + 4, 3]    # least recently used first
    assert len(ref._buffers) == limit + 4
    assert model.params.tobytes() == ref_model.params.tobytes()
    step.max_cached_batch_sizes = 2
    step(*_data(rng, 7))
    assert list(step._buffers) == [3, 7]


# -- 6. checkpoints: checksums and stray temporary files -----------------------------------

def _saved(tmp_path, name="c.fgz"):
    rng = np.random.default_rng(6)
    model = fg.MLP(SIZES, dtype="float64", norm="batch")
    opt = fg.Adam(model, lr=1e-2)
    fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)(*_data(rng))
    path = tmp_path / name
    fg.save(path, model, opt)
    return path, model, opt


@pytest.mark.parametrize("where", ["params", "opt.exp_avg", "running_var"])
def test_flipped_byte_in_tensor_data_is_refused(tmp_path, where):
    from safetensors import safe_open
    path, _, _ = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    header_len = 8 + int.from_bytes(data[:8], "little")
    with safe_open(str(path), framework="np") as f:
        names = sorted(f.keys())
    # find the tensor's bytes from the safetensors header's offsets
    header = json.loads(bytes(data[8:header_len]))
    lo, hi = header[where]["data_offsets"]
    assert where in names
    data[header_len + (lo + hi) // 2] ^= 0x10      # one bit of one float
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"tensor '{where}' does not match its checksum"):
        fg.load(path)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """Files written before checksums existed load as before."""
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open
    path, model, opt = _saved(tmp_path)
    with safe_open(str(path), framework="np") as f:
        meta = f.metadata()
    doc = json.loads(meta["fastgrad"])
    del doc["checksums"]
    old = tmp_path / "old.fgz"
    save_file(load_file(str(path)), str(old), metadata={"fastgrad": json.dumps(doc)})
    model2, opt2 = fg.load(old)
    assert model2.params.tobytes() == model.params.tobytes()
    assert opt2.state["exp_avg"].tobytes() == opt.state["exp_avg"].tobytes()


def test_save_removes_temporary_files_of_a_killed_save(tmp_path):
    from fastgrad import io as fg_io
    path, model, opt = _saved(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)            # that process has exited
    here = fg_io._host_tag()
    stale = tmp_path / f".c.fgz.{here}.{dead_pid}.0badc0de.tmp"
    live = tmp_path / f".c.fgz.{here}.{os.getppid()}.00c0ffee.tmp"   # a running process's
    other = tmp_path / f".d.fgz.{here}.{dead_pid}.0badc0de.tmp"       # another target's
    # another host's (ranks sharing a folder): its pid means nothing here, and
    # removing its live save's file made that save fail
    elsewhere = tmp_path / f".c.fgz.otherhost-1.{dead_pid}.0badc0de.tmp"
    for p in (stale, live, other, elsewhere):
        p.write_bytes(b"partial")
    fg.save(path, model, opt)
    assert not stale.exists()
    assert live.exists() and other.exists() and elsewhere.exists()
    fg.load(path)


def test_host_tags_are_short_and_tell_namespaces_apart(monkeypatch):
    # cut to 64 characters, a long host name lost the PID namespace (two
    # containers sharing it removed each other's live files) and left a
    # checkpoint's own name less room
    from fastgrad import io as fg_io
    monkeypatch.setattr(fg_io.socket, "gethostname", lambda: "h" * 62)
    tags = set()
    for ns in ("pid:[4026531836]", "pid:[4026532001]"):
        monkeypatch.setattr(fg_io.os, "readlink", lambda path, ns=ns: ns)
        tags.add(fg_io._host_tag())
    assert len(tags) == 2 and all(len(t) == 12 and t.isalnum() for t in tags)


# -- 5. the Numba cache ----------------------------------------------------------------------

# A few training steps through the layer path and an optimizer: small kernels,
# so that compiling them without a cache stays quick.
TRAIN_SCRIPT = """
import warnings
warnings.simplefilter("always")
import numpy as np
{prelude}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastgrad as fg
    from fastgrad.kernels.cpu import reduce
    model = fg.MLP([3, 4, 2], activation="tanh", dtype="float64", seed=0)
    opt = fg.SGD(model, lr=0.1)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    for _ in range(3):
        loss, dy = fg.SoftmaxCrossEntropy()(model.forward(x), y)
        model.backward(dy)
        opt.step()
ours = [str(w.message) for w in caught if "fastgrad" in str(w.message)]
print("WARNINGS", len(ours), ours)
print("PARAMS", model.params.sum().hex())
"""

NO_CACHE_PRELUDE = """
import numba.core.caching as caching
def read_only(self):
    # every candidate location refuses writes, as on a read-only file system
    # (simulated: the tests may run as root, whom permissions do not stop)
    raise PermissionError(30, "Read-only file system", self.get_cache_path())
caching._CacheLocator.ensure_cache_path = read_only
"""


def _run_script(code, env_extra, timeout=600):
    env = dict(os.environ, **env_extra)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
                 if line.startswith(("WARNINGS", "PARAMS")))
    return int(lines["WARNINGS"].split(" ", 1)[0]), lines["WARNINGS"], lines["PARAMS"]


def test_import_and_training_work_without_a_writable_cache(tmp_path):
    """No writable cache location: one warning, kernels compiled in memory,
    the same parameters as a cached run."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(home, 0o500)
    env = {"HOME": str(home), "NUMBA_CACHE_DIR": str(not_a_dir / "cache")}
    n, text, params = _run_script(TRAIN_SCRIPT.format(prelude=NO_CACHE_PRELUDE), env)
    assert n == 1 and "no writable Numba cache directory" in text, text
    n_ref, _, params_ref = _run_script(TRAIN_SCRIPT.format(prelude=""), {})
    assert n_ref == 0 and params == params_ref


@pytest.mark.slow
def test_corrupted_cache_entries_are_recompiled(tmp_path):
    cache = tmp_path / "numba_cache"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    script = TRAIN_SCRIPT.format(prelude="")
    n, _, params = _run_script(script, env)
    files = [p for p in cache.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert n == 0 and files
    for i, p in enumerate(files):                    # garbage, and truncated entries
        p.write_bytes(b"\x80\x05garbage" if i % 2 else p.read_bytes()[:7])
    n, text, params2 = _run_script(script, env)
    assert n == 1 and "unreadable Numba cache entry" in text, text
    assert params2 == params
    n, text, params3 = _run_script(script, env)     # written again: no warning now
    assert n == 0 and params3 == params, text


# Two copies of the kernels (a relu model's and a tanh model's) compile the
# same cached function; the script prints what relu's copy computes.
COPIES_SCRIPT = """
import fcntl, os, warnings
import numpy as np
import numba.core.caching as caching
locked = []
save = caching.IndexDataCacheFile.save
def probing_save(self, key, data):
    # another open file description cannot take the lock while a save runs
    fd = os.open(os.path.join(self._cache_path, "fastgrad.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        locked.append(False)
    except BlockingIOError:
        locked.append(True)
    finally:
        os.close(fd)
    return save(self, key, data)
caching.IndexDataCacheFile.save = probing_save
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from fastgrad import registry
    from fastgrad.kernels.spec import CODES
    z = np.linspace(-2.0, 2.0, 15).reshape(3, 5)
    for name in {names}:
        copy = registry.cpu_kernels(codes=[CODES[name]])
        out = z.copy()
        copy.activations.bias_act_step(out, np.zeros(5), out, CODES[name], 0.0)
ours = [str(w.message) for w in caught if "fastgrad" in str(w.message)]
print("WARNINGS", len(ours), ours)
print("PARAMS", out.tobytes().hex(), locked)
"""


def _poison_index(cache, function, victim, donor):
    """Point the index entry of ``victim``'s copy of ``function`` at the
    data of ``donor``'s copy: what two colliding unlocked saves leave."""
    import pickle
    [index] = cache.rglob(f"activations.{function}-*.nbi")
    with open(index, "rb") as fh:
        version = pickle.load(fh)
        stamp, overloads = pickle.loads(fh.read())
    [key] = [k for k in overloads if k[-1] == f"activations:{victim}"]
    [other] = [k for k in overloads if k[-1] == f"activations:{donor}"]
    overloads[key] = overloads[other]
    with open(index, "wb") as fh:
        pickle.dump(version, fh)
        fh.write(pickle.dumps((stamp, overloads)))


@pytest.mark.slow
def test_cache_saves_are_locked_and_another_copys_code_is_a_miss(tmp_path):
    from fastgrad.kernels.spec import CODES
    cache = tmp_path / "numba_cache"
    env = {"NUMBA_CACHE_DIR": str(cache)}
    n, text, both = _run_script(COPIES_SCRIPT.format(names=["tanh", "relu"]), env)
    assert n == 0 and both.endswith("[True, True]"), text + both   # saved under the lock
    relu = np.maximum(np.linspace(-2.0, 2.0, 15), 0.0).tobytes().hex()
    assert both.startswith(relu)
    # With tanh's copy loaded, relu's entry would run tanh's code.
    _poison_index(cache, "bias_act_step", CODES["relu"], CODES["tanh"])
    n, text, after = _run_script(COPIES_SCRIPT.format(names=["tanh", "relu"]), env)
    assert n == 1 and "held code compiled for" in text, text
    assert after == relu + " [True]"                # recompiled, and written over
    # The index was dropped: tanh's entry is compiled again, relu's loads.
    n, text, again = _run_script(COPIES_SCRIPT.format(names=["tanh", "relu"]), env)
    assert n == 0 and again == relu + " [True]", text + again
    n, text, again = _run_script(COPIES_SCRIPT.format(names=["relu", "tanh"]), env)
    out, saves = again.split(" ", 1)
    assert n == 0 and saves == "[]", text + again
    np.testing.assert_allclose(np.frombuffer(bytes.fromhex(out)),
                               np.tanh(np.linspace(-2.0, 2.0, 15)), rtol=1e-15, atol=0)


# A file system without flock (ENOSYS), and a tool that wraps Numba's save
# after fastgrad did (each kernel copy runs fastgrad's wrapper module again).
NO_FLOCK = """
import errno, fcntl
def no_flock(fd, op):
    raise OSError(errno.ENOSYS, "Function not implemented")
fcntl.flock = no_flock
"""
AWKWARD_LOCK_SCRIPT = """
import warnings
import numpy as np
{prelude}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastgrad
    import numba.core.caching as caching
    inner = caching.Cache.save_overload
    saves = []
    def counting_save(self, sig, data):
        saves.append(self._name)
        return inner(self, sig, data)
    caching.Cache.save_overload = counting_save
    from fastgrad import registry
    from fastgrad.kernels.spec import CODES
    copy = registry.cpu_kernels(codes=[CODES["relu"]])
    out = np.linspace(-2.0, 2.0, 15).reshape(3, 5)
    copy.activations.bias_act_step(out, np.zeros(5), out, CODES["relu"], 0.0)
ours = [str(w.message) for w in caught if "fastgrad" in str(w.message)]
print("WARNINGS", len(ours), ours)
print("PARAMS", out.tobytes().hex(), len(saves))
"""


@pytest.mark.parametrize("flock", [True, False], ids=["second_wrapper", "no_flock"])
def test_cache_saves_without_flock_or_under_a_second_wrapper(tmp_path, flock):
    """Where flock fails the save goes on unlocked (it raised ENOSYS out of
    every compile); a wrapper installed after fastgrad's no longer makes the
    next kernel copy wrap the save again (its second lock waited forever)."""
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba_cache"), "FASTGRAD_COMPILE_WORKER": "0"}
    script = AWKWARD_LOCK_SCRIPT.format(prelude="" if flock else NO_FLOCK)
    n, text, out = _run_script(script, env, timeout=120)
    relu = np.maximum(np.linspace(-2.0, 2.0, 15), 0.0).tobytes().hex()
    assert n == 0 and out == relu + " 1", text + out


# -- 4. MPI: a failing rank ends the job; mismatched datasets are refused ----------------------

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_distributed as TD  # noqa: E402  (its launcher and skip conditions)

# A rank's failure must end the job within this many seconds (the launcher's
# teardown included; the watchdog itself polls every 50 ms).
END_WITHIN_S = 30


@TD.needs_mpiexec
@pytest.mark.parametrize("how", ["exit0", "exit1", "kill"])
def test_a_rank_that_exits_or_is_killed_ends_the_job(tmp_path, how):
    import time
    proc = TD.run_worker(how, tmp_path, check=False)
    ended = time.time()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    stopped = float((tmp_path / f"{how}.npz.t").read_text())
    assert ended - stopped < END_WITHIN_S, out
    if how != "kill":
        assert "rank 1 of 2 ended (sys.exit or the end of its script) after" in out, out


@TD.needs_mpiexec
def test_a_rank_finishing_later_is_a_clean_end(tmp_path):
    proc = TD.run_worker("late", tmp_path, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@TD.needs_mpiexec
def test_ranks_with_datasets_of_different_lengths_are_refused(tmp_path):
    proc = TD.run_worker("short", tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 differs from rank 0 in len(X) 128 (rank 0: 133), len(Y) 128 (rank 0: 133)" in out, out
    assert "fit returned" not in out
