"""TrainStep on every device: the whole step in one compiled call equals the
layer-by-layer path; skips, counters, StepStats and fit follow a float64 CPU
run; and what only CUDA has (no host wait per step, device-side label
checks, datasets on the GPU, CUDA graphs)."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgrad as fg
from fastgrad.kernels.cpu import step as kstep
from fastgrad.losses import LOSSES
from fastgrad.schedules import warmup_cosine_decay as warmup_cosine

from conftest import ACTIVATIONS, OPTIMIZERS, RULES, assert_close, loss_targets, to_numpy



_targets = loss_targets


# one configuration per update rule (a rule missing here fails its test)
_OPTIMIZER_KW = {
    "adam": dict(lr=1e-2, clip_norm=0.5),
    "adamw": dict(lr=1e-2, weight_decay=0.1, clip_norm=0.3, clip_value=0.05, amsgrad=True),
    "sgd": dict(lr=0.1, momentum=0.9, nesterov=True, clip_norm=0.3),
    "rmsprop": dict(lr=1e-2, momentum=0.5, centered=True, clip_norm=1.0),
}


def _optimizer(name, model, **kw):
    return OPTIMIZERS[name](model, **_OPTIMIZER_KW[name], **kw)


def _pair(sizes, act, loss, opt, dtype, seed=3, device="cpu"):
    out = []
    for _ in range(2):
        m = fg.MLP(sizes, activation=act, output_activation=None, dtype=dtype, seed=seed,
                   device=device)
        out.append((m, _optimizer(opt, m)))
    return out


def _layerwise(model, loss_fn, opt, x, y):
    x, y = model.backend.to_device(x), model.backend.to_device(y)
    out = model.forward(x)
    loss, dy = loss_fn(out, y)
    model.backward(dy, input_grad=False)
    return loss, opt.step()


def _assert_same_stats(a, b, rtol):
    assert a.step == b.step and bool(a.skipped) == bool(b.skipped)
    assert bool(a.clipped) == bool(b.clipped)
    np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=rtol)
    np.testing.assert_allclose(a.clip_scale, b.clip_scale, rtol=rtol)
    np.testing.assert_allclose(a.layer_norms, b.layer_norms, rtol=rtol)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_step_equals_layer_path_float64(device, act, loss):
    rng = np.random.default_rng()
    sizes = [5, 7, 6, 3]
    (m1, o1), (m2, o2) = _pair(sizes, act, loss, "adam", "float64", device=device)
    loss_fn = LOSSES[loss]()
    step = fg.TrainStep(m2, loss_fn, o2)
    for _ in range(20):
        x = rng.standard_normal((9, sizes[0])) * 3
        y = _targets(loss, rng, 9, sizes[-1])
        l1, s1 = _layerwise(m1, loss_fn, o1, x, y)
        l2 = step(x, y)
        np.testing.assert_allclose(float(l2), float(l1), rtol=1e-12)
        _assert_same_stats(step.stats, s1, 1e-12)
    p1, p2 = to_numpy(m1.params), to_numpy(m2.params)
    np.testing.assert_allclose(p2, p1, rtol=1e-12, atol=1e-12 * np.abs(p1).max())


@pytest.mark.parametrize("opt", RULES)
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 1e-5)])
def test_step_every_optimizer(device, opt, dtype, rtol):
    rng = np.random.default_rng()
    sizes = [6, 17, 4]
    (m1, o1), (m2, o2) = _pair(sizes, "tanh", "softmax_cross_entropy", opt, dtype, device=device)
    loss_fn = fg.SoftmaxCrossEntropy()
    step = fg.TrainStep(m2, loss_fn, o2)
    clipped = 0
    for _ in range(20):
        x = (rng.standard_normal((8, sizes[0])) * 4).astype(dtype)
        y = rng.integers(0, sizes[-1], 8)
        _layerwise(m1, loss_fn, o1, x, y)
        step(x, y)
        clipped += step.stats.clipped
    assert clipped > 0, "the test must exercise clipping"
    p1, p2 = to_numpy(m1.params), to_numpy(m2.params)
    np.testing.assert_allclose(p2, p1, rtol=rtol, atol=rtol * np.abs(p1).max())
    assert o1.state_dict()["step"] == o2.state_dict()["step"] == 20


# Activations whose derivative jumps at 0: a hidden pre-activation within
# float32 rounding of 0 may take the other side of the kink than the float64
# reference does, and its unit's gradients differ by O(1), not by rounding.
_KINK_AT_ZERO = ("relu",)


def _hidden_preactivations_margin(x, params, sizes, offsets, act):
    """The smallest |pre-activation| of the hidden layers of a plain MLP
    (W then b per layer, as kernels/layout.py lays them), from
    fastgrad.reference's float64 forward."""
    layers = []
    for layer in range(len(sizes) - 1):
        n_in, n_out, o = sizes[layer], sizes[layer + 1], offsets[layer]
        ob = o + n_in * n_out
        layers.append((params[o:ob].reshape(n_in, n_out), params[ob:ob + n_out],
                       act if layer < len(sizes) - 2 else "identity", None))
    return min(float(np.abs(z).min()) for _, z, _ in fg.reference.mlp_forward(x, layers)[:-1])


def _flat_mlp(rng, sizes, act, dtype, batch, loss):
    """The flat arguments of the step kernels for an MLP, as NumPy arrays.

    In float32 with a kinked activation, the draw is repeated until no hidden
    pre-activation lies within 2e-5 of the kink (float32 rounding errs by
    ~1e-6 here), so the float64 reference takes the same side of it."""
    codes = np.array([fg.registry.get(act).code] * (len(sizes) - 2)
                     + [fg.registry.get("identity").code], np.int64)
    alphas = np.array([fg.ops.resolve_activation(act)[1]] * (len(sizes) - 2) + [0.0], np.float64)
    sizes = np.array(sizes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1] * sizes[1:] + sizes[1:])]).astype(np.int64)
    kinked = act in _KINK_AT_ZERO and np.dtype(dtype) != np.float64
    while True:
        params = (rng.standard_normal(offsets[-1]) * 0.3).astype(dtype)
        x = rng.standard_normal((batch, sizes[0])).astype(dtype)
        if not kinked or _hidden_preactivations_margin(x, params, sizes, offsets, act) > 2e-5:
            break
    labels = rng.integers(0, sizes[-1], batch).astype(np.int64)
    target = rng.uniform(0, 1, (batch, sizes[-1])).astype(dtype)
    if loss == kstep.CROSS_ENTROPY:
        target = np.zeros((0, 0), dtype)
    else:
        labels = np.zeros(0, np.int64)
    acts = np.zeros(batch * int(sizes[1:].sum()), dtype)
    zs = np.zeros_like(acts) if fg.registry.get(act).needs_z else acts
    delta = np.zeros(2 * batch * int(sizes[1:].max()), dtype)
    return x, labels, target, params, sizes, codes, alphas, offsets, acts, zs, delta


def _plain_plan(sizes, dtype):
    """The step drivers' plan arguments of a plain model of ``dtype``:
    (plan, fplan, run_mean, run_var)."""
    off = np.zeros(len(sizes) - 1)
    plan, fplan, _ = kstep.step_plan(sizes, 1, 0, off, off, off, off, dtype)
    return plan, fplan, np.zeros(0), np.zeros(0)


@pytest.mark.parametrize("loss", [kstep.CROSS_ENTROPY, kstep.MSE, kstep.BCE_WITH_LOGITS])
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "silu"])
def test_forward_backward_kernel_float32(device, rng, act, loss):
    """The device's float32 ``step.forward_backward`` (loss, activations,
    gradients) against the CPU kernel in float64 on the same inputs."""
    import importlib
    be = fg.backend.backend_for(device)
    kernel = importlib.import_module(be.kernels.__name__ + ".step").forward_backward
    args = _flat_mlp(rng, [20, 64, 130, 10], act, np.float32, 100, loss)
    x, labels, target, params, sizes, codes, alphas, offsets, acts, zs, delta = args
    wide = [a.astype(np.float64) for a in (x, target, params, acts, delta)]
    x64, t64, p64, a64, d64 = wide
    z64 = a64 if zs is acts else zs.astype(np.float64)
    g64 = np.zeros_like(p64)
    loss_ref = kstep.forward_backward(x64, labels, t64, loss, p64, g64, sizes, codes, alphas,
                                      offsets, a64, z64, d64, *_plain_plan(sizes, np.float64))
    dev, seen = [], {}
    for a in (x, labels, target, params, acts, zs, delta):   # zs may alias acts: keep it
        dev.append(seen.setdefault(id(a), be.to_device(a)))
    xd, ld, td, pd, ad, zd, dd = dev
    gd = be.alloc(params.shape, np.float32, fill=0)
    got = kernel(xd, ld, td, loss, pd, gd, sizes, codes, alphas, offsets, ad, zd, dd,
                 *_plain_plan(sizes, np.float32))
    assert_close(float(got), loss_ref, np.float32, what="loss")
    assert_close(ad, a64, np.float32, what="activations")
    assert_close(gd, g64, np.float32, what="gradients")


def test_deep_and_wide_shapes():
    rng = np.random.default_rng()
    sizes = [3] + [11] * 9 + [1, 129, 2]
    (m1, o1), (m2, o2) = _pair(sizes, "elu", "mse", "adam", "float64")
    loss_fn = fg.MSE()
    step = fg.TrainStep(m2, loss_fn, o2)
    for _ in range(5):
        x, y = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
        _layerwise(m1, loss_fn, o1, x, y)
        step(x, y)
    np.testing.assert_allclose(m2.params, m1.params, rtol=1e-12, atol=1e-14)


def test_batch_size_change_does_not_recompile():
    m = fg.MLP([4, 8, 3], dtype="float32")
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m))
    rng = np.random.default_rng()
    step(rng.standard_normal((16, 4)), rng.integers(0, 3, 16))
    n_sigs = len(kstep.train_step.signatures)
    for b in (16, 5, 1, 16):
        loss = step(rng.standard_normal((b, 4)), rng.integers(0, 3, b))
        assert np.isfinite(loss)
    assert len(kstep.train_step.signatures) == n_sigs
    assert sorted(step._buffers) == [1, 5, 16]


def test_schedule_enters_as_argument():
    m1 = fg.MLP([3, 5, 2], dtype="float64", seed=1)
    m2 = fg.MLP([3, 5, 2], dtype="float64", seed=1)
    sched = fg.schedules.exponential_decay(0.1, 0.5, 2)
    o1, o2 = fg.SGD(m1, lr=sched), fg.SGD(m2, lr=sched)
    step = fg.TrainStep(m2, fg.SoftmaxCrossEntropy(), o2)
    rng = np.random.default_rng()
    lrs = []
    for _ in range(6):
        x, y = rng.standard_normal((4, 3)), rng.integers(0, 2, 4)
        _layerwise(m1, fg.SoftmaxCrossEntropy(), o1, x, y)
        step(x, y)
        lrs.append(step.stats.lr)
    np.testing.assert_allclose(lrs, [0.1 * 0.5 ** (k / 2) for k in range(6)], rtol=1e-15)
    np.testing.assert_allclose(m2.params, m1.params, rtol=1e-12)


def test_nonfinite_step_is_skipped_and_reported():
    m = fg.MLP([3, 4, 2], dtype="float32")
    opt = fg.Adam(m, clip_norm=1.0)
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt)
    before = m.params.copy()
    x = np.array([[np.nan, 0, 0]], np.float32)
    step(x, [1])
    assert step.stats.skipped and not np.isfinite(step.stats.grad_norm)
    np.testing.assert_array_equal(m.params, before)
    assert opt.state_dict()["step"] == 0
    strict = fg.Adam(m, skip_nonfinite=False)
    with pytest.raises(fg.NonFiniteGradientError):
        fg.TrainStep(m, fg.SoftmaxCrossEntropy(), strict)(x, [1])


def _plain_gelu_model():
    return fg.MLP([20, 33, 33, 5], activation="gelu", dtype="float32")


def _every_piece_model():
    return fg.Sequential([fg.Dense(20, 33, activation="gelu", norm="batch", dropout=0.2,
                                   weight_norm=True),
                          fg.Residual(fg.Dense(33, 33, activation="relu", norm="layer",
                                               dropout=0.1)),
                          fg.Dense(33, 5, activation=None)], dtype="float32")


@pytest.mark.parametrize("make_model", [_plain_gelu_model, _every_piece_model],
                         ids=["plain", "epilogue"])
def test_steady_state_allocates_nothing(make_model):
    """Numba's runtime counters grow inside the step by nothing at all.

    Numba wraps each NumPy array argument in a runtime MemInfo when a compiled
    function is called from Python, which the counters see.  So the growth over
    100 steps is compared with that of a compiled no-op taking the very same
    arguments: any allocation inside the step (a temporary, a copy made for a
    transposed GEMM operand) would show as a difference.
    """
    from numba import njit
    from numba.core.runtime import _nrt_python, rtsys
    _nrt_python.memsys_enable_stats()

    @njit
    def noop(*args):
        return 0.0

    m = make_model()
    opt = fg.Adam(m, clip_norm=0.1)
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt)
    rng = np.random.default_rng()
    x, y = rng.standard_normal((16, 20)).astype(np.float32), rng.integers(0, 5, 16)
    step(x, y)
    x, labels, target = step._inputs(x, y)
    rule, s0, s1, s2, hp = opt._kernel_args()
    args = (x, labels, target, 0) + step._driver_args(16)[0] + (
        rule, s0, s1, s2, hp, step._layer_sq, 0.1, 0.0)
    noop(*args)

    def growth(fn, n=100):
        a = rtsys.get_allocation_stats()
        for _ in range(n):
            fn()
        b = rtsys.get_allocation_stats()
        return b.alloc - a.alloc, b.mi_alloc - a.mi_alloc

    base = growth(lambda: noop(*args))
    inner = growth(lambda: kstep.train_step(*args))
    assert inner == base, f"train_step allocates: {inner} vs call overhead {base}"


def test_fit_trains_and_reports():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    Y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    m = fg.MLP([6, 16, 2], seed=0)
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m, lr=1e-2, clip_norm=1.0))
    seen = []
    hist = fg.fit(step, X, Y, epochs=4, batch_size=64, seed=1, progress=False,
                  validation_data=(X, Y), callbacks=[lambda k, loss, st: seen.append(k)])
    assert len(hist["loss"]) == 4 and hist["loss"][-1] < hist["loss"][0]
    assert hist["val_accuracy"][-1] > 0.9
    assert seen == list(range(4 * 5))          # 300 / 64 -> 5 batches, the last of 44
    assert all(c >= 0 for c in hist["clipped"]) and hist["skipped"] == [0] * 4


@pytest.mark.parametrize("loss, fused", [(fg.SoftmaxCrossEntropy(), True),
                                         (fg.SoftmaxCrossEntropy(), False),
                                         (fg.SoftmaxCrossEntropy(reduction="sum"), False),
                                         (fg.MSE(), True),
                                         (fg.MSE(reduction="sum"), False),
                                         (fg.BCEWithLogits(reduction="sum"), False)])
def test_fit_epoch_loss_is_per_sample(loss, fused):
    # With lr 0 every batch sees the same parameters, so the epoch's loss is
    # the dataset's per-sample loss (evaluate's): a smaller last batch (10 =
    # 4 + 4 + 2) weighs by its size, a summed loss is divided by the samples.
    rng = np.random.default_rng(11)
    X = rng.standard_normal((10, 4))
    m = fg.MLP([4, 6, 3], dtype="float64", seed=2)
    Y = rng.integers(0, 3, 10) if loss.name == "softmax_cross_entropy" else \
        rng.standard_normal((10, 3))
    if loss.name == "bce_with_logits":
        Y = (Y > 0).astype(np.float64)
    step = fg.TrainStep(m, loss, fg.SGD(m, lr=0.0))
    step.fused_epochs = fused
    hist = fg.fit(step, X, Y, epochs=2, batch_size=4, seed=3, progress=False)
    want = fg.evaluate(m, loss, X, Y)["loss"]
    assert hist["loss"] == pytest.approx([want, want], rel=1e-12)
    if loss.name != "softmax_cross_entropy":
        # an elementwise loss's mean is over every element (3 outputs: a
        # summed MSE read 3x its mean)
        mean_loss = type(loss)()
        assert want == pytest.approx(float(mean_loss(m.predict(X), Y)[0]), rel=1e-12)


def test_fit_refuses_an_empty_dataset():
    m = fg.MLP([3, 2], seed=0)
    step = fg.TrainStep(m, fg.MSE(), fg.SGD(m, lr=0.1))
    with pytest.raises(ValueError, match="no samples"):
        fg.fit(step, np.zeros((0, 3), np.float32), np.zeros((0, 2), np.float32), progress=False)
    assert m.params.any() and not m.grads.any()


@pytest.mark.parametrize("fused", [True, False])
def test_fit_resumes_at_initial_epoch_as_the_uninterrupted_run(tmp_path, fused):
    # Keras's initial_epoch: a run saved after epoch 2 and resumed trains on
    # bitwise as the run that never stopped (shuffle order, dropout masks,
    # Adam's step count); before, the resumed fit repeated epoch 0's order
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((70, 6)), rng.integers(0, 3, 70)

    def run(epochs, model=None, opt=None, **kw):
        if model is None:
            model = fg.MLP([6, 16, 3], dtype="float64", dropout=0.2, seed=0)
            opt = fg.Adam(model, lr=1e-2, clip_norm=1.0)
        step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
        step.fused_epochs = fused
        seen = []
        hist = fg.fit(step, X, Y, epochs=epochs, batch_size=16, seed=4, progress=False,
                      callbacks=[lambda k, loss, st: seen.append(k)], **kw)
        return model, opt, hist, seen

    whole, _, hist, seen = run(4)
    part, opt, _, _ = run(2)
    fg.save(tmp_path / "c.fgz", part, opt)
    model, opt = fg.load(tmp_path / "c.fgz")
    resumed, opt, hist2, seen2 = run(4, model, opt, initial_epoch=2)
    assert resumed.params.tobytes() == whole.params.tobytes()
    assert hist2["loss"] == hist["loss"][2:] and seen2 == seen[2 * 5:]
    assert opt.step_count == 4 * 5
    with pytest.raises(ValueError, match="initial_epoch"):
        run(2, initial_epoch=3)


@pytest.mark.parametrize("checkpoint_first", [True, False])
def test_checkpoint_of_an_epoch_holds_its_plateau_cut(tmp_path, checkpoint_first):
    """ModelCheckpoint listed before ReduceLROnPlateau: the file of epoch e
    holds e's cut, so the run resumed from it trains on bitwise (it missed
    the cut: lr 0.0125 against 0.00625)."""
    from fastgrad import callbacks as C, schedules as S
    rng = np.random.default_rng(0)
    X, Y = rng.standard_normal((64, 4)), rng.integers(0, 2, 64)

    def run(model, opt, folder, initial_epoch=0):
        # the loss falls every epoch: in "max" mode with patience 0 every
        # epoch is a plateau, and the lr is cut after each
        saves = C.ModelCheckpoint(str(folder / "ck-{epoch}.fgz"))
        cuts = C.ReduceLROnPlateau("loss", mode="max")
        fg.fit(fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt), X, Y, epochs=5,
               batch_size=16, seed=1, progress=False, initial_epoch=initial_epoch,
               callbacks=[saves, cuts] if checkpoint_first else [cuts, saves])
        return cuts.reductions

    model = fg.MLP([4, 8, 2], dtype="float64", seed=0)
    opt = fg.SGD(model, lr=S.ReduceLROnPlateau(0.1, mode="max", patience=0, factor=0.5))
    (tmp_path / "a").mkdir()
    assert run(model, opt, tmp_path / "a") == [1, 2, 3, 4]
    model2, opt2 = fg.load(tmp_path / "a" / "ck-3.fgz")     # after epochs 0, 1, 2
    assert opt2.lr == 0.1 * 0.5 ** 2
    (tmp_path / "b").mkdir()
    run(model2, opt2, tmp_path / "b", initial_epoch=3)
    assert opt2.lr == opt.lr and model2.params.tobytes() == model.params.tobytes()


def test_fit_shuffle_is_seeded():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 3))
    Y = rng.integers(0, 2, 50)
    params = []
    for _ in range(2):
        m = fg.MLP([3, 4, 2], dtype="float64", seed=0)
        fg.fit(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.SGD(m, lr=0.1)), X, Y,
               epochs=2, batch_size=8, seed=7, progress=False)
        params.append(m.params.copy())
    np.testing.assert_array_equal(params[0], params[1])


def test_bad_construction():
    m = fg.MLP([3, 4, 2])
    other = fg.MLP([3, 4, 2])
    with pytest.raises(ValueError, match="built on this model"):
        fg.TrainStep(m, fg.MSE(), fg.Adam(other))
    with pytest.raises(TypeError, match="loss_fn"):
        fg.TrainStep(m, lambda y, t: (0.0, y), fg.Adam(m))
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m))
    with pytest.raises(ValueError, match="labels"):
        step(np.zeros((2, 3)), [0, 5])
    with pytest.raises(ValueError, match="shape"):
        step(np.zeros((2, 4)), [0, 1])
    with pytest.raises(ValueError, match="batch_size"):
        fg.fit(step, np.zeros((4, 3)), [0, 1, 0, 1], batch_size=0, progress=False)


def test_set_num_threads():
    import numba
    n0 = numba.get_num_threads()
    try:
        assert fg.set_num_threads(1) == 1
        nb, blas = fg.get_num_threads()
        assert nb == 1 and all(t == 1 for t in blas)
    finally:
        fg.set_num_threads(n0)
    with pytest.raises(ValueError):
        fg.set_num_threads(0)
    assert fg.set_num_threads(np.int64(n0)) == n0         # a NumPy integer is an integer
    for bad in (2.0, "2", True, None):
        with pytest.raises(TypeError, match="positive integer"):
            fg.set_num_threads(bad)
    with pytest.raises(TypeError, match="True or False"):
        fg.share_blas_pool("no")                           # was taken as True


def test_set_num_threads_off_the_main_thread_raises_where_blas_ignores_it():
    # OpenBLAS ignores a count set from another thread: the call returned the
    # count anyway, and the GEMMs ran on the old one
    import threading
    import numba
    from threadpoolctl import threadpool_info
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core: no other count to set")
    n0 = numba.get_num_threads()
    other = 1 if n0 > 1 else 2
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    out = {}

    def worker():
        try:
            out["n"] = fg.set_num_threads(other)
        except RuntimeError as e:
            out["error"] = str(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    after = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    if "error" in out:
        assert "main thread" in out["error"] and after == before     # nothing changed
    else:                       # a BLAS that takes it: it must have taken it
        assert out["n"] == other and all(t == other for t in after)
        fg.set_num_threads(n0)


def test_cache_falls_back_for_read_only_install(tmp_path):
    """An install tree Numba cannot write to: compiled code goes to the user
    cache directory instead, and the step still runs.  (These machines run as
    root, where chmod does not stop writes, so the read-only check itself is
    simulated by making Numba's in-tree cache locator refuse the directory.)"""
    code = textwrap.dedent("""
        import numpy as np
        from numba.core import caching
        def refuse(self):
            raise OSError("read-only install")
        caching.InTreeCacheLocator.ensure_cache_path = refuse
        import fastgrad as fg
        m = fg.MLP([4, 5, 3], dtype="float64")
        step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m))
        print(step(np.ones((2, 4)), [0, 2]))
    """)
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert np.isfinite(float(out.stdout.strip().splitlines()[-1]))
    cached = [p for p in tmp_path.rglob("*.nbi")]
    assert any("step" in p.name for p in cached), sorted(p.name for p in cached)


def test_step_plan_layout():
    """The step plan of kernels/cpu/step.py: a plain model's has every
    flag off and no scratch; a toolkit model's scratch slices lie after the
    layer outputs, do not overlap and fit in ``acts``; a length mismatch
    raises."""
    from fastgrad.kernels import layout
    from fastgrad.kernels.cpu import step as k
    sizes, B, n_params = [5, 7, 9, 3], 4, 200
    plan, fplan, acts = k.step_plan(sizes, B, n_params, np.zeros(3), [0, 0, 0], [0, 0, 0],
                                    [0, 0, 0], np.float32, seed=11)
    n_out = B * (7 + 9 + 3)
    assert acts.dtype == np.float32 and acts.size == n_out and fplan.size == 3
    assert not plan[k.PLAN_HEADER:].any() and plan[k.PLAN_SEED] == 11
    assert plan[k.PLAN_SAVED] == -1
    # this driver's plan holds its pass team's members for the dtype (no team)
    assert plan[layout.PLAN_POOL_FORWARD] != 0 and plan[layout.PLAN_POOL_THREADS] == 0
    assert plan[layout.PLAN_POOL_ITEMSIZE] == 4
    device_neutral, _, _ = layout.step_plan(sizes, B, n_params, np.zeros(3), [0, 0, 0],
                                            [0, 0, 0], [0, 0, 0], np.float32, seed=11)
    pool = slice(layout.PLAN_POOL_THREADS, k.PLAN_HEADER)
    assert not device_neutral[pool].any()
    device_neutral[pool] = plan[pool]
    np.testing.assert_array_equal(device_neutral, plan)

    drops, res, norms, wn = [0.1, 0.0, 0.0], [0, 1, 0], [k.BATCH, 1, 0], [1, 0, 0]
    plan, fplan, acts = k.step_plan(sizes, B, n_params, drops, res, norms, wn, np.float64)
    rows = plan[k.PLAN_HEADER:].reshape(3, k.PLAN_ROW)
    np.testing.assert_array_equal(rows[:, k.PLAN_RESIDUAL], res)
    np.testing.assert_array_equal(rows[:, k.PLAN_NORM], norms)
    np.testing.assert_array_equal(rows[:, k.PLAN_WN], wn)
    np.testing.assert_array_equal(fplan[:3], drops)
    widths = np.array(sizes[1:])
    spans = [(plan[k.PLAN_FZS], n_out), (plan[k.PLAN_XHATS], n_out),
             (plan[k.PLAN_NSTATS], 2 * int((B + widths).sum())),
             (plan[k.PLAN_WEFF], n_params), (plan[k.PLAN_DWEFF], n_params)]
    end = n_out
    for start, n in spans:              # in order, after the outputs, disjoint
        assert start == end
        end += n
    assert acts.size == end
    fspans = [(plan[k.PLAN_NWORK], 2 * max(B, 9)), (plan[k.PLAN_WNORM], int(widths.sum())),
              (plan[k.PLAN_SAVED], 2 * int(widths.sum()))]
    end = 3
    for start, n in fspans:
        assert start == end
        end += n
    assert fplan.size == end
    with pytest.raises(ValueError, match="one dropout rate"):
        k.step_plan(sizes, B, n_params, [0.1, 0.0], res, norms, wn, np.float64)


# --- the step's bookkeeping on every device: skips, counters, stats, fit ------------------
#
# On CUDA the step count, the hyper-parameter row (learning rate, bias
# corrections) and the skip decision live on the device, and StepStats
# arrive by an asynchronous copy that fills them when read; on the CPU they
# are settled before the call returns.  Every device's float32 training is
# compared with a float64 CPU run of the same model from the same start.

SIZES = [12, 24, 24, 5]


@pytest.fixture
def host_waits(monkeypatch):
    """The host emulator's count of device-to-host waits so far (a function;
    it gives None without the emulator).  Events complete 12 events late (3
    training steps: each queues 3 uploads and 1 record), so records are
    still in flight when the next steps are queued; a CUDA training loop
    must cause no wait.  (EMU_EVENT_LAG above 16 makes the host run into its
    rings' limits, 16 uploads and 16 records, and wait.)"""
    monkeypatch.setenv("EMU_EVENT_LAG", "12")
    try:
        import fakecupy
    except ImportError:
        return lambda: None
    return lambda: fakecupy.stats["syncs"]


def _waits_of(device, host_waits):
    # only CUDA defers anything: elsewhere there is no wait to count
    return host_waits if device == "cuda" else (lambda: None)


def _trainer(device, dtype=np.float32, opt_cls=fg.Adam, cuda_graph=False, model_kw=None,
             **opt_kw):
    m = fg.MLP(SIZES, activation="tanh", device=device, dtype=dtype, seed=4,
               **(model_kw or {}))
    return fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt_cls(m, **opt_kw),
                        cuda_graph=cuda_graph)


def _float64_twin(step, opt_cls=fg.Adam, model_kw=None, **opt_kw):
    """A float64 CPU TrainStep of ``step``'s model and optimizer settings,
    starting from ``step``'s (untrained) parameters."""
    twin = _trainer("cpu", np.float64, opt_cls, model_kw=model_kw, **opt_kw)
    twin.model.params[...] = to_numpy(step.model.params)
    return twin


def _batches(rng, n, bad=(), B=32):
    """n batches; those in ``bad`` hold a NaN (their update must be skipped)."""
    out = []
    for t in range(n):
        x = rng.standard_normal((B, SIZES[0])).astype(np.float32)
        if t in bad:
            x[3, 2] = np.nan
        out.append((x, rng.integers(0, SIZES[-1], B)))
    return out


def _same_stats(got, want, t):
    assert (got.step, got.skipped, got.clipped) == (want.step, want.skipped, want.clipped), \
        f"step {t}"
    assert got.lr == want.lr, f"lr at step {t}"
    if not want.skipped:
        assert_close(got.grad_norm, want.grad_norm, np.float64, rtol=1e-4, what=f"norm {t}")
        assert_close(got.layer_norms, want.layer_norms, np.float64, rtol=1e-4,
                     what=f"layer norms {t}")
    else:
        assert got.clip_scale == want.clip_scale == 0.0


def _train_then_compare(run, twin, data, bad, waits, inputs=None, first_counted=0):
    """Queue every batch on ``run`` reading nothing back, check that no step
    after the first ``first_counted`` waited for the device, then compare
    each step's stats and loss with ``twin``'s (float64, CPU) and the
    parameters at the end."""
    losses, stats = [], []
    for t, (x, y) in enumerate(inputs or data):
        if t == first_counted:
            waits0 = waits()
        losses.append(run(x, y))
        stats.append(run.stats)
    if waits0 is not None:
        assert waits() == waits0, "a training step waited for the device"
        assert not stats[-1].ready          # the emulated device is still steps behind
    for t, (x, y) in enumerate(data):
        want = twin(x, y)
        _same_stats(stats[t], twin.stats, t)
        if t in bad:
            assert np.isnan(float(losses[t]))
        else:
            assert_close(float(losses[t]), want, np.float32, rtol=1e-4, what=f"loss {t}")
    assert (run.opt.step_count, run.opt.n_skipped, run.opt.n_calls) == \
        (twin.opt.step_count, twin.opt.n_skipped, twin.opt.n_calls) == \
        (len(data) - len(bad), len(bad), len(data))
    assert run.opt.lr == twin.opt.lr
    assert_close(run.model.params, to_numpy(twin.model.params), np.float32, rtol=1e-3,
                 what=f"params after {len(data)} steps")
    return losses


def _schedule_and_clip():
    return dict(lr=warmup_cosine(3e-2, warmup_steps=5, decay_steps=30), clip_norm=0.5)


def test_skips_with_a_schedule_and_clipping_match_float64(device, rng, host_waits):
    """Adam (bias corrections) + warmup-cosine schedule + clipping, NaN
    batches at updates 3, 4 and 17: the skipped updates leave the schedule
    and the bias corrections where they were.  On CUDA the host has queued
    the later steps before the device knows of the skips, and none waits."""
    run = _trainer(device, **_schedule_and_clip())
    twin = _float64_twin(run, **_schedule_and_clip())
    bad = {3, 4, 17}
    losses = _train_then_compare(run, twin, _batches(rng, 30, bad), bad,
                                 _waits_of(device, host_waits))
    if device == "cuda":                # the loss stays on the device: reading it would wait
        assert run.model.backend.is_array(losses[0]) and losses[0].shape == ()


# CUDA only: labels already on the device, and a host far enough ahead to
# fill the device rings (lag 80), exist only where the step runs asynchronously.
@pytest.mark.cuda
@pytest.mark.parametrize("lag,labels_on_device", [(12, True), (80, False), (80, True)])
def test_cuda_skips_in_flight_with_full_rings_and_device_labels(cuda_be, rng, host_waits,
                                                                monkeypatch, lag,
                                                                labels_on_device):
    monkeypatch.setenv("EMU_EVENT_LAG", str(lag))
    run = _trainer("cuda", **_schedule_and_clip())
    twin = _float64_twin(run, **_schedule_and_clip())
    bad = {3, 4, 17}
    data = _batches(rng, 30, bad)
    inputs = [(cuda_be.to_device(x), cuda_be.to_device(y)) if labels_on_device
              else (x, y) for x, y in data]
    waits = host_waits if lag <= 12 else (lambda: None)     # full rings: waits expected
    _train_then_compare(run, twin, data, bad, waits, inputs=inputs)


@pytest.mark.parametrize("rule", [fg.SGD, fg.RMSprop, fg.AdamW])
def test_layer_path_step_stats_match_float64(device, rng, host_waits, rule):
    """opt.step() after model.backward: the StepStats (SGD's first-update
    flag and every rule's step count, on the device on CUDA) and parameters
    of a float64 CPU run, NaN batches at updates 0 and 5 skipped."""
    # Ten steps of float32 against float64, kept well-conditioned: tanh, not
    # relu, whose kink flips a unit where float32 rounds z across 0; and eps
    # well above float32's rounding of a gradient that cancels to near zero,
    # which with eps 1e-8 RMSprop moves by about lr / 10 whatever its sign.
    # Each failed about one seed in 60-400 (tests/test_optim.py checks the
    # rules themselves against float64).
    kw = {"momentum": 0.9} if rule is not fg.AdamW else {}
    if rule is not fg.SGD:
        kw["eps"] = 1e-3
    models, opts = [], []
    for dev, dtype in ((device, np.float32), ("cpu", np.float64)):
        m = fg.MLP(SIZES, activation="tanh", device=dev, dtype=dtype, seed=1)
        if models:
            m.params[...] = to_numpy(models[0].params)
        models.append(m)
        opts.append(rule(m, lr=1e-2, clip_norm=1.0, **kw))
    loss_fn = fg.SoftmaxCrossEntropy()
    pending = []
    for x, y in _batches(rng, 12, bad={0, 5}):
        for m, opt in zip(models, opts):
            out = m.forward(m.backend.to_device(x, m.dtype))
            _, grad = loss_fn(out, m.backend.to_device(y))
            m.backward(grad, input_grad=False)
            pending.append(opt.step())
    for t in range(12):
        _same_stats(pending[2 * t], pending[2 * t + 1], t)
    assert opts[0].step_count == opts[1].step_count == 10
    assert_close(models[0].params, to_numpy(models[1].params), np.float32, rtol=1e-4,
                 what="params")


def test_raise_mode_raises_at_the_failing_call(device, rng, host_waits):
    """skip_nonfinite=False: the call with the NaN batch raises and changes
    nothing; training goes on afterwards."""
    step = _trainer(device, lr=1e-2, skip_nonfinite=False)
    data = _batches(rng, 3, bad={1})
    step(*data[0])
    before = to_numpy(step.model.params).copy()
    with pytest.raises(fg.optim.NonFiniteGradientError):
        step(*data[1])
    np.testing.assert_array_equal(to_numpy(step.model.params), before)
    step(*data[2])
    assert step.opt.step_count == 2
    assert not np.array_equal(to_numpy(step.model.params), before)


def test_counters_and_state_dict_mid_run(device, rng, host_waits):
    """Reading a state dict or setting step_count mid-run (on CUDA with
    updates in flight: they finish first, then the device's count moves
    too): resuming gives bitwise the updates of an uninterrupted run."""
    sched = dict(lr=warmup_cosine(3e-2, warmup_steps=4, decay_steps=12))
    data = _batches(rng, 12, bad={2})
    ref = _trainer(device, **sched)
    for x, y in data:
        ref(x, y)
    run = _trainer(device, **sched)
    for x, y in data[:6]:
        run(x, y)
    sd = run.opt.state_dict()
    assert sd["step"] == 5 and sd["n_skipped"] == 1 and sd["n_calls"] == 6
    fresh = fg.MLP(SIZES, activation="tanh", device=device, seed=4)
    fresh.params[...] = fresh.backend.to_device(to_numpy(run.model.params))
    opt = fg.Adam(fresh, **sched)
    opt.load_state_dict(sd)
    resumed = fg.TrainStep(fresh, fg.SoftmaxCrossEntropy(), opt)
    for x, y in data[6:]:
        resumed(x, y)
    assert resumed.stats.step == ref.stats.step == 11
    np.testing.assert_array_equal(to_numpy(fresh.params), to_numpy(ref.model.params))
    # step_count = k moves the count: the next update is k's
    run.opt.step_count = 0
    run(*data[0])
    assert run.stats.step == 1 and run.stats.lr == ref.opt.lr_schedule(0)


def test_fit_matches_float64(device, rng, host_waits):
    X = rng.standard_normal((200, SIZES[0])).astype(np.float32)
    Y = (X[:, 0] > 0).astype(np.int64) + 2 * (X[:, 1] > 0)
    run = _trainer(device, lr=1e-2, clip_norm=1.0)
    hist = [fg.fit(step, X, Y, epochs=2, batch_size=32, progress=False,
                   validation_data=(X[:50], Y[:50]))
            for step in (run, _float64_twin(run, lr=1e-2, clip_norm=1.0))]
    assert set(hist[0]) == set(hist[1])
    for key in hist[1]:
        assert_close(np.asarray(hist[0][key], float), np.asarray(hist[1][key], float),
                     np.float32, rtol=1e-4, what=key)


def test_step_stats_are_read_only_values(device, rng, host_waits):
    step = _trainer(device)
    step(*_batches(rng, 1)[0])
    with pytest.raises(AttributeError):
        step.stats.step = 3
    assert step.stats == step.opt.last_stats and "grad_norm=" in repr(step.stats)
    step(*_batches(rng, 1)[0])
    import pickle
    assert pickle.loads(pickle.dumps(step.stats)) == step.stats     # a pending one on CUDA
    assert step.stats.step == 2


# --- CUDA only: device-side label checks, datasets on the GPU, CUDA graphs -----------------

@pytest.mark.cuda
def test_cuda_bad_device_labels_skip_and_raise_when_read(cuda_be, rng, host_waits):
    """Device labels are range-checked by the loss kernel, not read back
    (the CPU checks every label before it runs): the update is skipped on
    the device and ValueError comes when the step's record is read;
    parameters, moments and the step count stay as they were."""
    step = _trainer("cuda", lr=1e-2)
    x, y = _batches(rng, 1)[0]
    step(x, y)
    before = to_numpy(step.model.params).copy()
    moments = {k: to_numpy(v).copy() for k, v in step.opt.state.items()}
    bad = y.copy()
    bad[7] = SIZES[-1]
    step(cuda_be.to_device(x), cuda_be.to_device(bad))
    with pytest.raises(ValueError, match="class index outside"):
        step.stats.grad_norm
    st = step.stats
    assert st.skipped and st.step == 1              # filled, readable again
    np.testing.assert_array_equal(to_numpy(step.model.params), before)
    for k, v in step.opt.state.items():
        np.testing.assert_array_equal(to_numpy(v), moments[k])
    assert step.opt.step_count == 1 and step.opt.n_skipped == 0
    step(x, y)                                      # training goes on
    assert step.stats.step == 2 and not step.stats.skipped
    # host labels are still checked on the host, before anything runs
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 5\)"):
        step(x, bad)


@pytest.mark.cuda
def test_cuda_fit_on_a_dataset_on_the_gpu(cuda_be, rng, host_waits):
    """fit with CuPy X, Y gathers batches on the device: the same history
    and parameters as fit with the NumPy dataset, and no wait inside an
    epoch (records are read once, at its end)."""
    X = rng.standard_normal((150, SIZES[0])).astype(np.float32)
    Y = rng.integers(0, SIZES[-1], 150)
    runs = []
    for data in ((X, Y), (cuda_be.to_device(X), cuda_be.to_device(Y))):
        step = _trainer("cuda", lr=1e-2, clip_norm=1.0)
        waits = []
        hist = fg.fit(step, *data, epochs=1, batch_size=32, progress=False,
                      callbacks=[lambda k, loss, st: waits.append(host_waits())])
        runs.append((hist, to_numpy(step.model.params)))
        if waits[0] is not None:
            assert len(set(waits)) == 1, "a step inside the epoch waited for the device"
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    cpu = fg.MLP(SIZES, device="cpu")
    with pytest.raises(TypeError, match="CUDA array but the model is on cpu"):
        fg.fit(fg.TrainStep(cpu, fg.SoftmaxCrossEntropy(), fg.Adam(cpu)),
               cuda_be.to_device(X), Y)


@pytest.mark.cuda
def test_cuda_gpu_targets_script_runs(cuda_be, tmp_path):
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


@pytest.mark.cuda
def test_cuda_graph_step_matches_float64(cuda_be, rng, host_waits):
    """TrainStep(cuda_graph=True): captured on its second call (fastgrad's
    own GEMM), replayed afterwards with each step's hp row chosen on the
    device: the float64 run's stats and parameters, skips in flight
    included, and no wait for the device after the capture."""
    run = _trainer("cuda", cuda_graph=True, **_schedule_and_clip())
    twin = _float64_twin(run, **_schedule_and_clip())
    bad = {3, 4, 15}
    _train_then_compare(run, twin, _batches(rng, 24, bad), bad, host_waits, first_counted=2)
    (graphed,) = run._graphs.values()
    assert graphed.graph is not None, graphed.fallback_reason
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        fg.TrainStep(twin.model, fg.SoftmaxCrossEntropy(), twin.opt, cuda_graph=True)


@pytest.mark.cuda
def test_cuda_caches_stay_bounded(cuda_be, rng):
    """An adaptive clip_norm made one graph per value at one batch size,
    never dropped; batches with ignored labels (the layer path) staged one
    input buffer per batch size, never evicted."""
    m = fg.MLP([6, 8, 3], device="cuda", seed=0)
    opt = fg.SGD(m, lr=0.01, clip_norm=1.0)
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt, cuda_graph=True)
    x, y = rng.standard_normal((16, 6)).astype(np.float32), rng.integers(0, 3, 16)
    for k in range(12):
        opt.clip_norm = 1.0 + 0.1 * k
        step(x, y)
    assert len(step._graphs) == 1
    plain = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.SGD(m, lr=0.01))
    for B in range(2, 60):
        labels = rng.integers(0, 3, B)
        labels[0] = -100
        plain(rng.standard_normal((B, 6)).astype(np.float32), labels)
    assert len(plain._staged) <= 4 * plain.max_cached_batch_sizes


@pytest.mark.cuda
@pytest.mark.parametrize("loss", ["mse", "bce"])
def test_cuda_graph_regression_losses(cuda_be, rng, host_waits, loss):
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


_EVERY_PIECE = dict(norm="batch", dropout=0.2, residual=True, weight_norm=True)


@pytest.mark.cuda
@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_cuda_epilogue_model_steps_without_a_wait(cuda_be, rng, host_waits, cuda_graph):
    """A model with every epilogue piece (batch norm, dropout, residual
    blocks, weight norm) runs the fused CUDA step with no wait for the
    device per step (the skip decision settles the dropout step and the
    running statistics on the device), eagerly or replayed from a graph,
    skips in flight included; once read: the float64 run's stats,
    parameters, running statistics and dropout step."""
    # SGD: the bias before a batch norm has a gradient of rounding noise,
    # which Adam would turn into +-lr steps
    kw = dict(opt_cls=fg.SGD, model_kw=_EVERY_PIECE, momentum=0.9, clip_norm=0.5,
              lr=warmup_cosine(3e-2, warmup_steps=3, decay_steps=20))
    run = _trainer("cuda", cuda_graph=cuda_graph, **kw)
    twin = _float64_twin(run, **kw)
    bad = {3, 6}
    _train_then_compare(run, twin, _batches(rng, 10, bad), bad, host_waits, first_counted=2)
    if cuda_graph:
        (graphed,) = run._graphs.values()
        assert graphed.graph is not None, graphed.fallback_reason
    assert run.model.dropout_step == twin.model.dropout_step == 8
    assert_close(run.model.running_mean, twin.model.running_mean, np.float32, rtol=1e-3,
                 what="running mean")


@pytest.mark.cuda
def test_cuda_unknown_loss_code_raises(cuda_be):
    """The CUDA step's loss dispatch (shared by the plain and epilogue
    steps; the CPU's is compiled into its step) refuses a code it does not
    know instead of running some loss."""
    from fastgrad.kernels.cuda import step as cuda_step
    from fastgrad.kernels.spec import LOSS_CODES
    ws = cuda_step.Workspace(4, np.array([3, 5]), np.array([0, 20]), LOSS_CODES["mse"],
                             np.float32)
    h = cuda_be.alloc((4, 5), np.float32, fill=0)
    with pytest.raises(ValueError, match="unknown loss code 7"):
        cuda_step.loss_and_grad(7, h, cuda_be.alloc(4, np.int64, fill=0), h,
                                cuda_be.alloc(h.shape, h.dtype), ws)
    loss = cuda_step.loss_and_grad(LOSS_CODES["mse"], h, None,
                                   cuda_be.alloc((4, 5), np.float32, fill=1),
                                   cuda_be.alloc(h.shape, h.dtype), ws)
    assert float(loss[0]) == 1.0          # ws.loss: a 1-element view of the step record
