"""TrainStep.run_epoch: a whole epoch in compiled chunks of steps.

Every test compares against the per-step loop ``step(x, y)`` over the same
batches in the same order: parameters, optimizer state and counters must be
BITWISE equal (the chunk runs the very step code), and the per-step results
equal the StepStats the loop returned.
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad.errors import NonFiniteGradientError
from fastgrad.kernels.cpu import step as kstep

N_IN, N_OUT = 7, 5


def _data(rng, n, loss, dtype=np.float32):
    X = rng.standard_normal((n, N_IN)).astype(dtype)
    if loss == "softmax_cross_entropy":
        Y = rng.integers(0, N_OUT, n)
    elif loss == "mse":
        Y = rng.standard_normal((n, N_OUT)).astype(dtype)
    else:
        Y = (rng.random((n, N_OUT)) < 0.5).astype(dtype)
    return X, Y


LOSS_FNS = {"softmax_cross_entropy": fg.SoftmaxCrossEntropy, "mse": fg.MSE,
            "bce_with_logits": fg.BCEWithLogits}


def _pair(make_opt, loss="softmax_cross_entropy", dtype="float32", **model_kw):
    """Two identical TrainSteps: one for run_epoch, one for the per-step loop."""
    steps = []
    for _ in range(2):
        m = fg.MLP([N_IN, 13, 13, N_OUT], activation="tanh", dtype=dtype, seed=3, **model_kw)
        steps.append(fg.TrainStep(m, LOSS_FNS[loss](), make_opt(m)))
    return steps


def _loop(step, X, Y, order, batch_size, drop_last=False):
    """The per-step reference: returns the (loss, StepStats) of every step."""
    out = []
    n = len(order) - (len(order) % batch_size if drop_last else 0)
    for lo in range(0, n, batch_size):
        idx = order[lo:lo + batch_size]
        loss = step(X[idx], Y[idx])
        out.append((loss, step.stats))
    return out


def _assert_same(epoch_step, res, loop_step, ref):
    np.testing.assert_array_equal(epoch_step.model.params, loop_step.model.params)
    for name, buf in loop_step.opt.state.items():
        np.testing.assert_array_equal(epoch_step.opt.state[name], buf, err_msg=name)
    assert epoch_step.opt.step_count == loop_step.opt.step_count
    assert epoch_step.opt.n_skipped == loop_step.opt.n_skipped
    assert epoch_step.model.dropout_step == loop_step.model.dropout_step
    assert epoch_step.stats == loop_step.stats
    assert len(res["loss"]) == len(ref)
    for j, (loss, st) in enumerate(ref):
        got = fg.step._stats_of(res, j)
        # repr: NaN (a skipped step's norm) equal to NaN; every digit of a float.
        assert (repr(float(res["loss"][j])), repr(got)) == (repr(loss), repr(st)), j


@pytest.mark.parametrize("loss", sorted(LOSS_FNS))
def test_bitwise_as_the_per_step_loop_every_loss(rng, loss):
    """Adam with clipping and a schedule; 203 samples in batches of 32 (the
    last one of 11)."""
    X, Y = _data(rng, 203, loss)
    make = lambda m: fg.Adam(m, lr=fg.schedules.exponential_decay(1e-2, 0.5, 3),
                             clip_norm=0.05)
    a, b = _pair(make, loss)
    order = rng.permutation(203)
    res = a.run_epoch(X, Y, 32, shuffle=order)
    ref = _loop(b, X, Y, order, 32)
    _assert_same(a, res, b, ref)
    assert res["clipped"].any(), "the test should clip"
    assert list(res["step"]) == list(range(1, 8))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sgd_momentum_several_epochs_and_chunks(rng, dtype, monkeypatch):
    """SGD with Nesterov momentum and value clipping over three epochs, with
    chunks forced small so that an epoch spans many calls."""
    X, Y = _data(rng, 150, "mse", dtype)
    make = lambda m: fg.SGD(m, lr=0.05, momentum=0.9, nesterov=True, clip_value=0.1)
    a, b = _pair(make, "mse", dtype)
    monkeypatch.setattr(fg.TrainStep, "progress_interval", 0.0)   # one step per chunk
    calls = []
    res = ref = None
    for epoch in range(3):
        order = rng.permutation(150)
        res = a.run_epoch(X, Y, 16, shuffle=order,
                          callback=lambda done, total, r: calls.append((done, total, len(r["loss"]))))
        ref = _loop(b, X, Y, order, 16)
    _assert_same(a, res, b, ref)
    assert calls[-10:] == [(d, 10, d) for d in range(1, 11)]


def test_nan_batch_is_skipped_and_the_schedule_follows(rng):
    """A NaN sample in the middle: that step is skipped, the step count does
    not advance, so the next update reuses the skipped one's learning rate
    and bias correction, exactly as the per-step loop."""
    X, Y = _data(rng, 96, "softmax_cross_entropy")
    X[40, 2] = np.nan                       # batch 2 of 16 samples, whatever the order
    make = lambda m: fg.Adam(m, lr=fg.schedules.exponential_decay(1e-2, 0.5, 1), clip_norm=1.0)
    a, b = _pair(make)
    order = np.arange(96)
    res = a.run_epoch(X, Y, 16, shuffle=order)
    ref = _loop(b, X, Y, order, 16)
    _assert_same(a, res, b, ref)
    assert list(res["skipped"]) == [False, False, True, False, False, False]
    assert list(res["step"]) == [1, 2, 2, 3, 4, 5]
    assert res["lr"][2] == res["lr"][3] == 1e-2 * 0.5 ** 2
    assert a.opt.n_skipped == 1 and np.isfinite(a.model.params).all()


def test_nan_batch_raises_in_raise_mode(rng):
    X, Y = _data(rng, 64, "softmax_cross_entropy")
    X[40, 0] = np.inf
    make = lambda m: fg.SGD(m, lr=0.1, skip_nonfinite=False)
    a, b = _pair(make)
    seen = []
    with pytest.raises(NonFiniteGradientError):
        a.run_epoch(X, Y, 16, shuffle=False, callback=lambda d, t, r: seen.append(d))
    with pytest.raises(NonFiniteGradientError):
        _loop(b, X, Y, np.arange(64), 16)
    np.testing.assert_array_equal(a.model.params, b.model.params)
    assert a.opt.step_count == b.opt.step_count == 2 and a.opt.n_skipped == 1
    assert a.stats == b.stats and a.opt.last_stats.skipped and b.opt.last_stats.skipped
    assert seen and seen[-1] == 2


def test_dropout_counter_and_eval_mode(rng):
    """A plain model's training step advances model.dropout_step once per
    applied update; in eval mode not at all."""
    X, Y = _data(rng, 50, "softmax_cross_entropy")
    a, b = _pair(lambda m: fg.Adam(m))
    a.run_epoch(X, Y, 8, shuffle=False)
    assert a.model.dropout_step == 7
    a.model.eval()
    a.run_epoch(X, Y, 8, shuffle=False)
    assert a.model.dropout_step == 7 and a.opt.step_count == 14


EPILOGUE = [dict(dropout=0.2), dict(norm="batch", residual=True, dropout=0.1),
           dict(norm="layer", weight_norm=True)]
EPILOGUE_IDS = ["dropout", "batchnorm-residual-dropout", "layernorm-weightnorm"]


@pytest.mark.parametrize("kw", EPILOGUE, ids=EPILOGUE_IDS)
def test_epilogue_models_bitwise_with_a_skipped_step(rng, kw):
    """Models with epilogue pieces run compiled epochs too: the same dropout masks (the
    counter advances per applied step), batch-norm running statistics
    (restored after the skipped step) and parameters as the per-step loop;
    then an epoch in eval mode (no dropout, running statistics)."""
    X, Y = _data(rng, 70, "softmax_cross_entropy")
    X[20, 1] = np.nan                       # batch 1 of 16 in this order: skipped
    a, b = _pair(lambda m: fg.AdamW(m, lr=1e-2, clip_norm=1.0), **kw)
    assert a._fused_epoch
    order = np.arange(70)
    res = a.run_epoch(X, Y, 16, shuffle=order)
    ref = _loop(b, X, Y, order, 16)
    _assert_same(a, res, b, ref)
    assert list(res["skipped"]) == [False, True, False, False, False]
    np.testing.assert_array_equal(a.model.running_mean, b.model.running_mean)
    np.testing.assert_array_equal(a.model.running_var, b.model.running_var)
    X[20, 1] = 0.0
    for s in (a, b):
        s.model.eval()
    order = rng.permutation(70)
    res = a.run_epoch(X, Y, 16, shuffle=order)
    ref = _loop(b, X, Y, order, 16)
    _assert_same(a, res, b, ref)


@pytest.mark.parametrize("loss", [fg.SoftmaxCrossEntropy(),
                                  fg.SoftmaxCrossEntropy(label_smoothing=0.1)])
def test_batch_norm_batch_of_one_raises_before_any_step(rng, loss):
    # the looped epoch (a loss with options) too: it raised at the last batch
    X, Y = _data(rng, 33, "softmax_cross_entropy")
    m = fg.MLP([N_IN, 6, N_OUT], seed=0, norm="batch")
    step = fg.TrainStep(m, loss, fg.SGD(m, lr=0.1))
    before = step.model.params.copy()
    for run in (lambda: step.run_epoch(X, Y, 16, shuffle=False),     # 16 + 16 + 1
                lambda: fg.fit(step, X, Y, batch_size=16, progress=False)):
        with pytest.raises(ValueError, match="batch of 1"):
            run()
        np.testing.assert_array_equal(step.model.params, before)
        assert step.opt.step_count == 0
    res = step.run_epoch(X, Y, 16, shuffle=False, drop_last=True)
    assert len(res["loss"]) == 2


def test_loss_with_options_loops(rng):
    X, Y = _data(rng, 40, "softmax_cross_entropy")
    steps = []
    for _ in range(2):
        m = fg.MLP([N_IN, 6, N_OUT], seed=0)
        steps.append(fg.TrainStep(m, fg.SoftmaxCrossEntropy(label_smoothing=0.1), fg.Adam(m)))
    res = steps[0].run_epoch(X, Y, 16, shuffle=False)
    ref = _loop(steps[1], X, Y, np.arange(40), 16)
    _assert_same(steps[0], res, steps[1], ref)


def test_shuffle_seed_and_drop_last(rng):
    X, Y = _data(rng, 45, "softmax_cross_entropy")
    a, b = _pair(lambda m: fg.SGD(m, lr=0.1))
    res = a.run_epoch(X, Y, 10, seed=5, drop_last=True)
    ref = _loop(b, X, Y, np.random.default_rng(5).permutation(45), 10, drop_last=True)
    _assert_same(a, res, b, ref)
    assert len(res["loss"]) == 4
    # A Generator gives a new permutation each call, reproducible from its seed.
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    a.run_epoch(X, Y, 10, seed=g1)
    a.run_epoch(X, Y, 10, seed=g1)
    for _ in range(2):
        _loop(b, X, Y, g2.permutation(45), 10)
    np.testing.assert_array_equal(a.model.params, b.model.params)
    # Fewer samples than a batch with drop_last: no step at all.
    res = a.run_epoch(X[:5], Y[:5], 10, drop_last=True)
    assert res["loss"].shape == (0,) and res["layer_norms"].shape == (0, 3)


def test_bad_inputs_raise_before_any_step(rng):
    X, Y = _data(rng, 30, "softmax_cross_entropy")
    step = _pair(lambda m: fg.Adam(m))[0]
    before = step.model.params.copy()
    bad_labels = Y.copy()
    bad_labels[-1] = N_OUT                          # only the last batch is bad
    cases = [
        (ValueError, "labels", dict(Y=bad_labels)),
        (ValueError, "shape", dict(X=X[:, :3])),
        (ValueError, "samples", dict(Y=Y[:-1])),
        (ValueError, "batch_size", dict(batch_size=0)),
        (ValueError, "batch_size", dict(batch_size=2.0)),
        (ValueError, r"\[0, 30\)", dict(shuffle=np.array([0, 30]))),
        (TypeError, "shuffle", dict(shuffle=np.array([0.5]))),
        (TypeError, "callback", dict(callback=3)),
        (ValueError, "empty", dict(X=X[:0], Y=Y[:0])),
    ]
    for exc, match, kw in cases:
        args = dict(X=X, Y=Y, batch_size=8)
        args.update(kw)
        with pytest.raises(exc, match=match):
            step.run_epoch(args.pop("X"), args.pop("Y"), args.pop("batch_size"), **args)
    np.testing.assert_array_equal(step.model.params, before)
    assert step.opt.step_count == 0 and step.stats is None
    reg = _pair(lambda m: fg.Adam(m), "mse")[0]
    with pytest.raises(ValueError, match="target"):
        reg.run_epoch(X, np.zeros((30, N_OUT + 1)), 8)


@pytest.mark.parametrize("loss", [fg.SoftmaxCrossEntropy(label_smoothing=0.1),
                                  fg.SoftmaxCrossEntropy(ignore_index=2),
                                  fg.SoftmaxCrossEntropy(reduction="sum")],
                         ids=["smoothing", "ignore-index", "sum"])
def test_bad_last_batch_raises_before_any_step_on_every_path(rng, loss):
    # losses with options and fit's per-step loop checked per batch only:
    # the last batch's bad label raised after four steps had trained
    X, Y = _data(rng, 30, "softmax_cross_entropy")
    bad = Y.copy()
    bad[-1] = N_OUT
    m = fg.MLP([N_IN, 6, N_OUT], seed=0, dropout=0.2)
    step = fg.TrainStep(m, loss, fg.Adam(m))
    before = m.params.copy()
    for fused_epochs in (True, False):
        step.fused_epochs = fused_epochs
        for run in (lambda: step.run_epoch(X, bad, 8),
                    lambda: fg.fit(step, X, bad, batch_size=8, progress=False)):
            with pytest.raises(ValueError, match="labels|target"):
                run()
    np.testing.assert_array_equal(m.params, before)
    assert step.opt.step_count == 0 and m.dropout_step == 0


def test_a_refused_batch_on_the_layer_path_changes_nothing(rng):
    # a loss with options sees the labels after the forward: the running
    # statistics and the dropout counter moved before its refusal
    X, Y = _data(rng, 16, "softmax_cross_entropy")
    m = fg.MLP([N_IN, 6, N_OUT], seed=0, norm="batch", dropout=0.2)
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(label_smoothing=0.1), fg.Adam(m))
    Y[3] = N_OUT
    state = (m.running_mean.copy(), m.running_var.copy(), m.dropout_step)
    for call in (step, step.gradients):
        with pytest.raises(ValueError, match="labels"):
            call(X, Y)
        np.testing.assert_array_equal(m.running_mean, state[0])
        np.testing.assert_array_equal(m.running_var, state[1])
        assert m.dropout_step == state[2] and step.opt.step_count == 0


def test_hyper_parameter_change_between_epochs(rng):
    """The rows are filled from the optimizer at each chunk: a new lr (or
    clip_norm) set between two calls applies from the next step."""
    X, Y = _data(rng, 40, "softmax_cross_entropy")
    a, b = _pair(lambda m: fg.Adam(m, lr=1e-3))
    for s in (a, b):
        s.opt.lr = 5e-2
        s.opt.clip_norm = 0.01
    res = a.run_epoch(X, Y, 8, shuffle=False)
    ref = _loop(b, X, Y, np.arange(40), 8)
    _assert_same(a, res, b, ref)
    assert (res["lr"] == 5e-2).all() and res["clipped"].all()


@pytest.mark.parametrize("kw", [{}, dict(dropout=0.1, norm="batch")], ids=["plain", "epilogue"])
def test_fit_uses_run_epoch_and_keeps_its_history(rng, kw):
    """fit's history, per-step callbacks and parameters are those of its
    per-step loop (fused_epochs=False), bit for bit."""
    X, Y = _data(rng, 130, "softmax_cross_entropy")
    runs = []
    for fused in (True, False):
        step = _pair(lambda m: fg.Adam(m, lr=1e-2, clip_norm=0.5), **kw)[0]
        step.fused_epochs = fused
        seen = []
        hist = fg.fit(step, X, Y, epochs=3, batch_size=32, seed=4, progress=False,
                      validation_data=(X, Y),
                      callbacks=[lambda k, loss, st: seen.append((k, loss, st))])
        runs.append((hist, seen, step.model.params.copy(), step.stats))
    assert runs[0][0] == runs[1][0]
    assert [k for k, _, _ in runs[0][1]] == list(range(15))
    assert runs[0][1] == runs[1][1]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])
    assert runs[0][3] == runs[1][3]


def test_chunk_kernel_allocates_nothing_per_step(rng):
    """The compiled chunk allocates nothing (Numba's allocation counters):
    a 10-step chunk allocates as much as a 1-step one."""
    from numba.core.runtime import _nrt_python, rtsys
    X, Y = _data(rng, 80, "softmax_cross_entropy")
    step = _pair(lambda m: fg.Adam(m, clip_norm=1.0))[0]
    step.run_epoch(X, Y, 8, shuffle=False)           # compiled, buffers made
    captured = {}
    real = kstep.train_steps

    def spy(*args):
        captured["args"] = args
        return real(*args)
    step._kernels = type("K", (), {"train_steps": staticmethod(spy),
                                   "SERVED_FEATURES": kstep.SERVED_FEATURES,
                                   "pass_team": step._kernels.pass_team,
                                   "TEAM": step._kernels.TEAM})
    step.run_epoch(X, Y, 8, shuffle=False)
    args = list(captured["args"])
    _nrt_python.memsys_enable_stats()
    try:
        def allocs(n):
            # steps 0..n-1 of the epoch, into fresh result arrays
            args[4], args[5] = 0, n
            args[-5:] = [np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool),
                         np.zeros((n, 3))]
            a0 = rtsys.get_allocation_stats().alloc
            real(*args)
            return rtsys.get_allocation_stats().alloc - a0
        assert allocs(10) == allocs(1)
    finally:
        _nrt_python.memsys_disable_stats()


@pytest.mark.cuda
def test_cuda_run_epoch_matches_cpu(cp, rng):
    """On CUDA run_epoch is a loop over the step: the same API and results
    (float32, to rounding) as the CPU's compiled epoch."""
    X, Y = _data(rng, 90, "softmax_cross_entropy")
    out = []
    for dev in ("cpu", "cuda"):
        m = fg.MLP([N_IN, 13, N_OUT], activation="tanh", seed=3, device=dev)
        step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m, lr=1e-2, clip_norm=0.5))
        seen = []
        res = step.run_epoch(X, Y, 16, seed=2, callback=lambda d, t, r: seen.append(d))
        out.append((res, step))
        assert seen[-1] == 6 and step.opt.step_count == 6
    (rc, sc), (rg, sg) = out
    for key in ("step", "skipped", "clipped", "lr"):
        np.testing.assert_array_equal(rg[key], rc[key], err_msg=key)
    np.testing.assert_allclose(rg["loss"], rc["loss"], rtol=1e-4)
    np.testing.assert_allclose(rg["layer_norms"], rc["layer_norms"], rtol=1e-4)
    np.testing.assert_allclose(cp.asnumpy(sg.model.params), sc.model.params, rtol=1e-3,
                               atol=1e-5)
    with pytest.raises(ValueError, match="labels"):
        sg.run_epoch(X, np.full(90, N_OUT), 16)


def test_one_compiled_signature_for_read_only_and_writable_data(rng):
    """A read-only dataset (np.load(mmap_mode="r"), broadcast views) runs the
    same compiled epoch as a writable one: no second compile."""
    X, Y = _data(rng, 40, "softmax_cross_entropy")
    a, b = _pair(lambda m: fg.SGD(m, lr=0.1))
    a.run_epoch(X, Y, 8, shuffle=False)
    n_sigs = len(kstep.train_steps.signatures)
    Xr, Yr = X.copy(), Y.copy()
    Xr.flags.writeable = Yr.flags.writeable = False
    a.run_epoch(Xr, Yr, 8, shuffle=False)
    assert len(kstep.train_steps.signatures) == n_sigs
    for _ in range(2):
        _loop(b, X, Y, np.arange(40), 8)
    np.testing.assert_array_equal(a.model.params, b.model.params)
