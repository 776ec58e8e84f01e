"""TrainStep: the whole step in one compiled call equals the layer-by-layer path."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgrad as fg
from fastgrad.kernels.cpu import step as kstep
from fastgrad.losses import LOSSES

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


def _flat_mlp(rng, sizes, act, dtype, batch, loss):
    """The flat arguments of the step kernels for an MLP, as NumPy arrays."""
    codes = np.array([fg.registry.get(act).code] * (len(sizes) - 2)
                     + [fg.registry.get("identity").code], np.int64)
    alphas = np.array([fg.ops.resolve_activation(act)[1]] * (len(sizes) - 2) + [0.0], np.float64)
    sizes = np.array(sizes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1] * sizes[1:] + sizes[1:])]).astype(np.int64)
    params = (rng.standard_normal(offsets[-1]) * 0.3).astype(dtype)
    x = rng.standard_normal((batch, sizes[0])).astype(dtype)
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


def _plain_plan(sizes):
    """The CPU driver's step-plan arguments of a plain model: (plan, fplan,
    run_mean, run_var)."""
    off = np.zeros(len(sizes) - 1)
    plan, fplan, _ = kstep.step_plan(sizes, 1, 0, off, off, off, off, np.float64)
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
                                      offsets, a64, z64, d64, *_plain_plan(sizes))
    dev, seen = [], {}
    for a in (x, labels, target, params, acts, zs, delta):   # zs may alias acts: keep it
        dev.append(seen.setdefault(id(a), be.to_device(a)))
    xd, ld, td, pd, ad, zd, dd = dev
    gd = be.alloc(params.shape, np.float32, fill=0)
    plan = _plain_plan(sizes) if be.steps_by_plan else ()
    got = kernel(xd, ld, td, loss, pd, gd, sizes, codes, alphas, offsets, ad, zd, dd, *plan)
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
    args = (x, labels, target, 0) + step._driver_args(16) + (
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
    from fastgrad.kernels.cpu import step as k
    sizes, B, n_params = [5, 7, 9, 3], 4, 200
    plan, fplan, acts = k.step_plan(sizes, B, n_params, np.zeros(3), [0, 0, 0], [0, 0, 0],
                                    [0, 0, 0], np.float32, seed=11)
    n_out = B * (7 + 9 + 3)
    assert acts.dtype == np.float32 and acts.size == n_out and fplan.size == 3
    assert not plan[k.PLAN_HEADER:].any() and plan[k.PLAN_SEED] == 11
    assert plan[k.PLAN_SAVED] == -1

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
