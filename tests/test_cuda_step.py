"""fastgrad.TrainStep and the optimizers on CUDA: no host sync inside a step.

On CUDA the step count, the hyper-parameter row (learning rate, bias
corrections) and the skip decision live on the device; StepStats arrive by
an asynchronous copy and fill themselves when read.  These tests run the
same training on both devices with updates skipped while the host is
several steps ahead of the device, and compare every StepStats field, the
returned losses and the parameters.

On the host emulator (tools/cuda_emulator) ``EMU_EVENT_LAG`` makes the
device look busy, so records are still in flight when the next steps are
queued, and the emulator counts device-to-host waits: a training loop must
cause none.  On a GPU the lag is real and the sync count is not checked.
Marked ``cuda``.
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad.schedules import warmup_cosine_decay as warmup_cosine

from conftest import assert_close, to_numpy

pytestmark = pytest.mark.cuda

SIZES = [12, 24, 24, 5]


@pytest.fixture
def lagging(cp, monkeypatch):
    """Emulator: events complete 12 events late (3 training steps: each
    queues 3 uploads and 1 record); returns a function giving the number of
    host waits so far (None on a GPU).  Set EMU_EVENT_LAG higher to make
    the host run into its rings' limits (16 uploads, 16 records) and wait."""
    monkeypatch.setenv("EMU_EVENT_LAG", "12")
    if not getattr(cp, "__emulated__", False):
        return lambda: None
    import fakecupy
    return lambda: fakecupy.stats["syncs"]


def _pair(opt_cls=fg.Adam, **opt_kw):
    steps = []
    for dev in ("cpu", "cuda"):
        m = fg.MLP(SIZES, activation="tanh", device=dev, seed=4)
        steps.append(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt_cls(m, **opt_kw)))
    return steps


def _batches(rng, n, bad=(), B=32):
    """n batches; those in ``bad`` hold a NaN (their update must be skipped)."""
    out = []
    for t in range(n):
        x = rng.standard_normal((B, SIZES[0])).astype(np.float32)
        if t in bad:
            x[3, 2] = np.nan
        out.append((x, rng.integers(0, SIZES[-1], B)))
    return out


def _same_stats(sg, sc, t):
    assert (sg.step, sg.skipped, sg.clipped) == (sc.step, sc.skipped, sc.clipped), f"step {t}"
    assert sg.lr == sc.lr, f"lr at step {t}"
    if not sc.skipped:
        assert_close(sg.grad_norm, sc.grad_norm, np.float64, rtol=1e-4, what=f"norm {t}")
        assert_close(sg.layer_norms, sc.layer_norms, np.float64, rtol=1e-4,
                     what=f"layer norms {t}")
    else:
        assert sg.clip_scale == sc.clip_scale == 0.0


@pytest.mark.parametrize("labels_on_device", [False, True])
@pytest.mark.parametrize("lag", [12, 80])
def test_skips_in_flight_match_cpu_without_a_sync(cuda_be, rng, lagging, monkeypatch, lag,
                                                  labels_on_device):
    """Adam (bias corrections) + warmup-cosine schedule + clipping, NaN
    batches at updates 3, 4 and 17: the device picks the right learning rate
    and bias corrections although the host queued the later steps before
    knowing of the skips.  (lag 80: the host waits when its rings are full.)"""
    monkeypatch.setenv("EMU_EVENT_LAG", str(lag))
    if lag > 12:
        lagging = lambda: None          # noqa: E731  (waits expected: the rings are full)
    cpu, gpu = _pair(lr=warmup_cosine(3e-2, warmup_steps=5, decay_steps=30), clip_norm=0.5)
    data = _batches(rng, 30, bad={3, 4, 17})
    dev_data = [(cuda_be.to_device(x), cuda_be.to_device(y)) for x, y in data]
    syncs0 = lagging()
    losses, stats = [], []
    for (x, y), (xd, yd) in zip(data, dev_data):
        losses.append(gpu(xd, yd) if labels_on_device else gpu(x, y))
        stats.append(gpu.stats)
    if syncs0 is not None:
        assert lagging() == syncs0, "a CUDA training step waited for the device"
        assert not stats[-1].ready        # the emulated device is still ~10 steps behind
    assert cuda_be.is_array(losses[0]) and losses[0].shape == ()
    for t, (x, y) in enumerate(data):
        lc = cpu(x, y)
        _same_stats(stats[t], cpu.stats, t)
        if t not in (3, 4, 17):
            assert_close(float(losses[t]), lc, np.float32, rtol=1e-4, what=f"loss {t}")
        else:
            assert np.isnan(float(losses[t]))
    assert gpu.opt.step_count == cpu.opt.step_count == 27
    assert gpu.opt.n_skipped == cpu.opt.n_skipped == 3
    assert gpu.opt.n_calls == cpu.opt.n_calls == 30
    assert gpu.opt.lr == cpu.opt.lr
    assert_close(gpu.model.params, to_numpy(cpu.model.params), np.float32, rtol=1e-3,
                 what="params after 30 steps")


@pytest.mark.parametrize("rule", [fg.SGD, fg.RMSprop, fg.AdamW])
def test_layer_path_step_stats_match_cpu(cuda_be, rng, lagging, rule):
    """opt.step() after model.backward on CUDA: the same lazy StepStats
    (SGD's first-update flag and every rule's step count on the device)."""
    kw = {"momentum": 0.9} if rule is not fg.AdamW else {}
    models, opts = [], []
    for dev in ("cpu", "cuda"):
        m = fg.MLP(SIZES, activation="relu", device=dev, seed=1)
        models.append(m)
        opts.append(rule(m, lr=1e-2, clip_norm=1.0, **kw))
    loss_fn = fg.SoftmaxCrossEntropy()
    pending = []
    for t, (x, y) in enumerate(_batches(rng, 12, bad={0, 5})):
        for m, opt in zip(models, opts):
            out = m.forward(x)
            _, grad = loss_fn(out, m._xp.asarray(y))
            m.backward(grad, input_grad=False)
            pending.append(opt.step())
    for t in range(12):
        _same_stats(pending[2 * t + 1], pending[2 * t], t)
    assert opts[1].step_count == opts[0].step_count == 10
    assert_close(models[1].params, to_numpy(models[0].params), np.float32, rtol=1e-4,
                 what="params")


def test_bad_device_labels_skip_and_raise_when_read(cuda_be, rng, lagging):
    """Device labels are range-checked by the loss kernel, not read back:
    the update is skipped on the device and ValueError comes when the step's
    record is read; parameters, moments and the step count stay as they were."""
    _, gpu = _pair(lr=1e-2)
    x, y = _batches(rng, 1)[0]
    gpu(x, y)
    before = to_numpy(gpu.model.params).copy()
    moments = {k: to_numpy(v).copy() for k, v in gpu.opt.state.items()}
    bad = y.copy()
    bad[7] = SIZES[-1]
    gpu(cuda_be.to_device(x), cuda_be.to_device(bad))
    with pytest.raises(ValueError, match="class index outside"):
        gpu.stats.grad_norm
    st = gpu.stats
    assert st.skipped and st.step == 1              # filled, readable again
    np.testing.assert_array_equal(to_numpy(gpu.model.params), before)
    for k, v in gpu.opt.state.items():
        np.testing.assert_array_equal(to_numpy(v), moments[k])
    assert gpu.opt.step_count == 1 and gpu.opt.n_skipped == 0
    gpu(x, y)                                       # training goes on
    assert gpu.stats.step == 2 and not gpu.stats.skipped
    # Host labels are still checked on the host, before anything runs.
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 5\)"):
        gpu(x, bad)


def test_raise_mode_raises_at_the_failing_call(cuda_be, rng, lagging):
    _, gpu = _pair(lr=1e-2, skip_nonfinite=False)
    data = _batches(rng, 3, bad={1})
    gpu(*data[0])
    before = to_numpy(gpu.model.params).copy()
    with pytest.raises(fg.optim.NonFiniteGradientError):
        gpu(*data[1])
    np.testing.assert_array_equal(to_numpy(gpu.model.params), before)
    gpu(*data[2])
    assert gpu.opt.step_count == 2


def test_counters_and_state_dict_in_flight(cuda_be, rng, lagging):
    """Setting step_count or loading a state dict while updates are in
    flight lets them finish first and then moves the device count too:
    resuming gives the same updates as an uninterrupted run."""
    data = _batches(rng, 12, bad={2})
    ref, run = _pair(lr=warmup_cosine(3e-2, warmup_steps=4, decay_steps=12))[1], None
    for x, y in data:
        ref(x, y)
    run = _pair(lr=warmup_cosine(3e-2, warmup_steps=4, decay_steps=12))[1]
    for x, y in data[:6]:
        run(x, y)
    sd = run.opt.state_dict()                       # waits for the six updates
    assert sd["step"] == 5 and sd["n_skipped"] == 1 and sd["n_calls"] == 6
    params = to_numpy(run.model.params).copy()
    fresh = fg.MLP(SIZES, activation="tanh", device="cuda", seed=4)
    fresh.params[...] = cuda_be.to_device(params)
    opt = fg.Adam(fresh, lr=warmup_cosine(3e-2, warmup_steps=4, decay_steps=12))
    opt.load_state_dict(sd)
    resumed = fg.TrainStep(fresh, fg.SoftmaxCrossEntropy(), opt)
    for x, y in data[6:]:
        resumed(x, y)
    assert resumed.stats.step == ref.stats.step == 11
    np.testing.assert_array_equal(to_numpy(fresh.params), to_numpy(ref.model.params))
    # step_count = k moves the device's count: the next update is k's.
    run.opt.step_count = 0
    run(*data[0])
    assert run.stats.step == 1 and run.stats.lr == ref.opt.lr_schedule(0)


def test_fit_on_cuda_matches_cpu(cuda_be, rng, lagging):
    X = rng.standard_normal((200, SIZES[0])).astype(np.float32)
    Y = (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)
    hist = []
    for step in _pair(lr=1e-2, clip_norm=1.0):
        hist.append(fg.fit(step, X, Y, epochs=2, batch_size=32, progress=False,
                           validation_data=(X[:50], Y[:50])))
    for key in hist[0]:
        assert_close(np.asarray(hist[1][key], float), np.asarray(hist[0][key], float),
                     np.float32, rtol=1e-4, what=key)


def test_step_stats_are_read_only(cuda_be, rng, lagging):
    _, gpu = _pair()
    gpu(*_batches(rng, 1)[0])
    with pytest.raises(AttributeError):
        gpu.stats.step = 3
    assert gpu.stats == gpu.opt.last_stats and "grad_norm=" in repr(gpu.stats)
    gpu(*_batches(rng, 1)[0])
    import pickle
    assert pickle.loads(pickle.dumps(gpu.stats)) == gpu.stats     # a pending one too


def test_fit_on_a_dataset_on_the_gpu(cuda_be, rng, lagging):
    """fit with CuPy X, Y gathers batches on the device: the same history
    and parameters as fit with the NumPy dataset, and no wait inside an
    epoch (records are read once, at its end)."""
    X = rng.standard_normal((150, SIZES[0])).astype(np.float32)
    Y = rng.integers(0, SIZES[-1], 150)
    runs = []
    for data in ((X, Y), (cuda_be.to_device(X), cuda_be.to_device(Y))):
        step = _pair(lr=1e-2, clip_norm=1.0)[1]
        syncs = []

        def cb(k, loss, st):
            syncs.append(lagging())
        hist = fg.fit(step, *data, epochs=1, batch_size=32, progress=False, callbacks=[cb])
        runs.append((hist, to_numpy(step.model.params)))
        if syncs[0] is not None:
            assert len(set(syncs)) == 1, "a step inside the epoch waited for the device"
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    cpu = fg.MLP(SIZES, device="cpu")
    with pytest.raises(TypeError, match="CUDA array but the model is on cpu"):
        fg.fit(fg.TrainStep(cpu, fg.SoftmaxCrossEntropy(), fg.Adam(cpu)), cuda_be.to_device(X), Y)


def test_gpu_targets_script_runs(cuda_be, tmp_path):
    """bench/gpu_targets.py (the first GPU session's measurements) runs its
    miniature sizes end to end and writes every section."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "bench" / "gpu_targets.py"
    spec = importlib.util.spec_from_file_location("gpu_targets", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--json", str(tmp_path / "t.json")]) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert len(res["adam"]) == 1 and len(res["forward"]) == 1 and len(res["step"]) == 3
    assert res["forward"][0]["rel_error_vs_float64"] < 1e-5


def test_cuda_graph_step_matches_cpu(cuda_be, rng, lagging):
    """TrainStep(cuda_graph=True): captured on its second call (fastgrad's
    own GEMM), replayed afterwards with each step's hp row chosen on the
    device -- the same stats and parameters as the CPU, skips in flight
    included, and no wait for the device after the capture."""
    steps = []
    for dev, graph in (("cpu", False), ("cuda", True)):
        m = fg.MLP(SIZES, activation="tanh", device=dev, seed=4)
        opt = fg.Adam(m, lr=warmup_cosine(3e-2, warmup_steps=5, decay_steps=30), clip_norm=0.5)
        steps.append(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt, cuda_graph=graph))
    cpu, gpu = steps
    data = _batches(rng, 24, bad={3, 4, 15})
    stats = []
    for t, (x, y) in enumerate(data):
        if t == 2:
            syncs0 = lagging()
        gpu(x, y)
        stats.append(gpu.stats)
    if syncs0 is not None:
        assert lagging() == syncs0, "a graphed step waited for the device"
    (graphed,) = gpu._graphs.values()
    assert graphed.graph is not None, graphed.fallback_reason
    for t, (x, y) in enumerate(data):
        cpu(x, y)
        _same_stats(stats[t], cpu.stats, t)
    assert gpu.opt.step_count == cpu.opt.step_count == 21
    assert_close(gpu.model.params, to_numpy(cpu.model.params), np.float32, rtol=1e-3,
                 what="params after 24 steps")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        fg.TrainStep(cpu.model, fg.SoftmaxCrossEntropy(), cpu.opt, cuda_graph=True)


@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_cuda_graph_regression_losses(cuda_be, rng, lagging, loss):
    """cuda_graph=True with target losses, targets on the host and on the
    device: the eager CUDA step's numbers (different GEMM, so to rounding)."""
    loss_fn = fg.MSE() if loss == "mse" else fg.BCEWithLogits()
    steps = []
    for graph in (False, True):
        m = fg.MLP(SIZES, activation="relu", device="cuda", seed=2)
        steps.append(fg.TrainStep(m, loss_fn, fg.SGD(m, lr=0.05, momentum=0.9, clip_norm=1.0),
                                  cuda_graph=graph))
    for t in range(6):
        x = rng.standard_normal((16, SIZES[0])).astype(np.float32)
        y = rng.uniform(0, 1, (16, SIZES[-1])).astype(np.float32)
        if t % 2:
            x, y = cuda_be.to_device(x), cuda_be.to_device(y)
        le, lg = (float(s(x, y)) for s in steps)
        assert_close(lg, le, np.float32, rtol=1e-4, what=f"loss {t}")
        _same_stats(steps[1].stats, steps[0].stats, t)
    assert all(g.graph is not None for g in steps[1]._graphs.values())
    assert_close(steps[1].model.params, to_numpy(steps[0].model.params), np.float32,
                 rtol=1e-4, what="params")


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_toolkit_model_steps_without_a_sync(cuda_be, rng, lagging, cuda_graph):
    """A model with every toolkit feature (batch norm, dropout, residual
    blocks, weight norm) runs the fused CUDA step: no wait for the device
    per step (no loss read-back; the skip decision settles the dropout step
    and the running statistics on the device), eagerly or replayed from a
    graph, with skips in flight -- and the CPU's stats, parameters, running
    statistics and dropout step once read."""
    steps = []
    for dev in ("cpu", "cuda"):
        m = fg.MLP(SIZES, activation="tanh", device=dev, seed=4, norm="batch", dropout=0.2,
                   residual=True, weight_norm=True)
        # SGD: the bias before a batch norm has a gradient of rounding noise,
        # which Adam would turn into +-lr steps
        opt = fg.SGD(m, lr=warmup_cosine(3e-2, warmup_steps=3, decay_steps=20), momentum=0.9,
                     clip_norm=0.5)
        steps.append(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt,
                                  cuda_graph=cuda_graph and dev == "cuda"))
    cpu, gpu = steps
    data = _batches(rng, 10, bad={3, 6})
    losses, stats = [], []
    for t, (x, y) in enumerate(data):
        if t == 2:                      # after the eager call and the capture
            syncs0 = lagging()
        losses.append(gpu(x, y))
        stats.append(gpu.stats)
    if syncs0 is not None:
        assert lagging() == syncs0, "a fused toolkit step waited for the device"
        assert not stats[-1].ready
    if cuda_graph:
        (graphed,) = gpu._graphs.values()
        assert graphed.graph is not None, graphed.fallback_reason
    for t, (x, y) in enumerate(data):
        lc = cpu(x, y)
        _same_stats(stats[t], cpu.stats, t)
        if t not in (3, 6):
            assert_close(float(losses[t]), lc, np.float32, rtol=1e-4, what=f"loss {t}")
    assert gpu.model.dropout_step == cpu.model.dropout_step == 8
    assert gpu.opt.step_count == cpu.opt.step_count == 8
    assert_close(gpu.model.params, to_numpy(cpu.model.params), np.float32, rtol=1e-3,
                 what="params after 10 steps")
    assert_close(gpu.model.running_mean, cpu.model.running_mean, np.float32, rtol=1e-3,
                 what="running mean")


def test_unknown_loss_code_raises(cuda_be):
    """The CUDA step's loss dispatch (shared by the plain and toolkit steps)
    refuses a code it does not know instead of running some loss."""
    from fastgrad.kernels.cuda import step as kstep
    from fastgrad.kernels.spec import LOSS_CODES
    ws = kstep.Workspace(4, np.array([3, 5]), np.array([0, 20]), LOSS_CODES["mse"], np.float32)
    h = cuda_be.alloc((4, 5), np.float32, fill=0)
    with pytest.raises(ValueError, match="unknown loss code 7"):
        kstep.loss_and_grad(7, h, cuda_be.alloc(4, np.int64, fill=0), h,
                            cuda_be.alloc(h.shape, h.dtype), ws)
    loss = kstep.loss_and_grad(LOSS_CODES["mse"], h, None,
                               cuda_be.alloc((4, 5), np.float32, fill=1),
                               cuda_be.alloc(h.shape, h.dtype), ws)
    assert float(loss[0]) == 1.0          # ws.loss: a 1-element view of the step record
