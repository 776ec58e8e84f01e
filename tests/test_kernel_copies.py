"""The per-model copies of the CPU kernels (``fastgrad.registry.cpu_kernels``):
compiled for a model's activations, update rule and loss alone, they give
bitwise what the full package gives, refuse every code they were not built
for, and keep their own disk-cache entries."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import registry
from fastgrad.kernels import spec
from fastgrad.kernels.cpu import optim as full_optim
from fastgrad.kernels.cpu import step as full_step

# (optimizer, its options, loss, dtype): every rule, every loss, both dtypes,
# with the options that take each rule's other branches.
CONFIGS = [
    (fg.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, clip_norm=0.5),
     fg.MSE, np.float32),
    (fg.Adam, dict(lr=1e-2, amsgrad=True, clip_value=0.05), fg.SoftmaxCrossEntropy, np.float64),
    (fg.AdamW, dict(lr=1e-2, weight_decay=0.1, clip_norm=0.3, maximize=True), fg.BCEWithLogits,
     np.float32),
    (fg.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True), fg.SoftmaxCrossEntropy,
     np.float64),
]
SIZES = [7, 13, 5]

pytestmark = pytest.mark.usefixtures("per_model_copies")


def _batch(rng, loss, dtype, B=9):
    x = rng.standard_normal((B, SIZES[0])).astype(dtype)
    if loss is fg.SoftmaxCrossEntropy:
        return x, rng.integers(0, SIZES[-1], B)
    if loss is fg.BCEWithLogits:
        return x, (rng.random((B, SIZES[-1])) < 0.5).astype(dtype)
    return x, rng.standard_normal((B, SIZES[-1])).astype(dtype)


def _model(dtype):
    return fg.MLP(SIZES, activation="tanh", dtype=dtype, seed=3)


@pytest.mark.parametrize("opt_cls,kw,loss,dtype", CONFIGS,
                         ids=[c[0].__name__ + "-" + c[2].__name__ for c in CONFIGS])
def test_model_copies_match_the_full_package_bitwise(rng, opt_cls, kw, loss, dtype):
    """The whole step on the model's copy (its rule and loss alone) and on
    the full package (every rule and loss) give the same bits; so do
    ``opt.step()`` on the rule's copy and on the full package's update."""
    batches = [_batch(rng, loss, dtype) for _ in range(3)]
    runs = []
    for full in (False, True):
        model = _model(dtype)
        opt = opt_cls(model, **kw)
        step = fg.TrainStep(model, loss(), opt)
        if full:
            step._kernels = full_step
        else:
            assert sys.modules[step._kernels.__package__].optim.SERVED_RULES == (opt.rule,)
            assert step._kernels.SERVED_LOSSES == (spec.LOSS_CODES[loss.name],)
        losses = [step(x, y) for x, y in batches]
        runs.append((model.params.copy(), losses, [s.copy() for s in opt._kernel_args()[1:4]]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][2], runs[1][2]):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][0], _model(dtype).params)      # it trained

    params = []
    for full in (False, True):
        model = _model(dtype)
        opt = opt_cls(model, **kw)
        if full:
            opt._update = opt._serial_update = full_optim.clipped_update
        else:
            assert opt._update.py_func.__module__.startswith("fastgrad.kernels._cpu_")
        for x, y in batches:
            _, dy = loss()(model.forward(x), y)
            model.zero_grad()
            model.backward(dy)
            opt.step()
        params.append(model.params.copy())
    np.testing.assert_array_equal(params[0], params[1])


def test_a_copy_refuses_the_rules_and_losses_it_lacks(rng):
    """A copy serves its codes only: any other rule or loss raises ValueError
    in its kernels, and so does a code outside the table in the full
    package (nothing falls through to a default rule or loss)."""
    pkg = registry.cpu_kernels([spec.RELU, spec.IDENTITY], rules=[spec.ADAM],
                               losses=[spec.CROSS_ENTROPY])
    assert pkg.optim.SERVED_RULES == (spec.ADAM,)
    n = 11
    p, g = rng.standard_normal(n), rng.standard_normal(n)
    s = [np.zeros(n) for _ in range(3)]
    hp = np.zeros(spec.HP_SIZE)
    offsets = np.array([0, n], np.int64)
    for kernels, bad in ((pkg.optim, spec.SGD), (pkg.optim, spec.ADAMW),
                         (pkg.optim, spec.RMSPROP), (full_optim, spec.N_RULES), (full_optim, -1)):
        p0 = p.copy()
        with pytest.raises(ValueError, match="update rule code not served"):
            kernels.clipped_update(bad, p0, g, *s, hp, offsets, np.zeros(1), 0.0, 0.0)
        np.testing.assert_array_equal(p0, p)                      # nothing written

    model = fg.MLP([4, 5, 3], activation="relu", dtype="float64", seed=0)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model))
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    step(x, y)
    target = rng.standard_normal((6, 3))
    for bad in (spec.MSE, spec.BCE_WITH_LOGITS):
        step._loss_kind = bad             # as if the loss were not the one it was built for
        with pytest.raises(ValueError, match=r"loss code not served .*softmax_cross_entropy"):
            step(x, target)
    step._kernels = full_step
    step._loss_kind = len(spec.LOSS_CODES)
    with pytest.raises(ValueError, match="loss code not served"):
        step(x, target)
    with pytest.raises(ValueError, match="unknown update rule"):
        registry.cpu_kernels([spec.RELU], rules=[spec.N_RULES])
    with pytest.raises(ValueError, match="unknown loss"):
        registry.cpu_kernels([spec.RELU], losses=[7])


def test_copies_are_one_per_configuration():
    relu = [spec.RELU, spec.IDENTITY]
    a = registry.cpu_kernels(relu, rules=[spec.ADAM], losses=[spec.MSE])
    assert registry.cpu_kernels(relu[::-1], rules=(spec.ADAM,), losses={spec.MSE}) is a
    b = registry.cpu_kernels(relu, rules=[spec.SGD], losses=[spec.MSE])
    c = registry.cpu_kernels(relu, rules=[spec.ADAM], losses=[spec.CROSS_ENTROPY])
    everything = registry.cpu_kernels(relu)
    assert len({a.__name__, b.__name__, c.__name__, everything.__name__}) == 4
    assert len({a._VARIANT, b._VARIANT, c._VARIANT, everything._VARIANT}) == 4
    # the model's own copy (forward and backward) keeps every rule and loss
    assert fg.MLP([3, 4, 2], activation="relu")._kernels() is everything
    assert everything.step.SERVED_LOSSES == tuple(sorted(spec.LOSS_CODES.values()))
    assert everything.optim.SERVED_RULES == tuple(sorted(spec.RULES.values()))


_PROBE = """
import sys
import numpy as np
import fastgrad as fg
from fastgrad.kernels import spec
out = {}
for kind in sys.argv[2].split(","):
    opt_cls, loss = {"adam": (fg.Adam, fg.SoftmaxCrossEntropy()), "sgd": (fg.SGD, fg.MSE())}[kind]
    model = fg.MLP([5, 7, 3], activation="relu", dtype="float64", seed=1)
    step = fg.TrainStep(model, loss, opt_cls(model, lr=0.1))
    x = np.linspace(-1, 1, 20).reshape(4, 5)
    y = np.array([0, 2, 1, 0]) if kind == "adam" else np.linspace(0, 1, 12).reshape(4, 3)
    step(x, y)
    stats = step._kernels.train_step.stats
    out[kind] = model.params
    print(kind, sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))
np.savez(sys.argv[1], **out)
"""


# The compiled (not inlined) kernels of each layer feature: a call to one
# leaves its name in the LLVM IR of the driver that makes it.
_FEATURE_KERNELS = ("block_forward_epilogue", "block_backward_epilogue",
                    "norm_forward_epilogue", "norm_backward_epilogue", "weight_norm_forward",
                    "weight_norm_backward", "dropout_key")


def _epilogue_model(dtype, seed=5):
    return fg.Sequential([fg.Dense(SIZES[0], 11, activation="tanh", norm="layer", dropout=0.2),
                          fg.Residual(fg.Dense(11, 11, activation="gelu", dropout=0.1)),
                          fg.Dense(11, SIZES[-1], activation=None)], dtype=dtype, seed=seed)


def _uncached_copy(name, features):
    """A copy of the kernels for tanh, SGD, MSE and ``features`` that
    compiles afresh (a copy loaded from the disk cache has no LLVM IR to
    read)."""
    return registry._load_copy(
        f"fastgrad.kernels._test_{name}", "an uncached copy for a test", _NO_DISK_CACHE=True,
        _ONLY_ACTIVATIONS=frozenset([spec.TANH, spec.IDENTITY]),
        _ONLY_RULES=frozenset([spec.SGD]), _ONLY_LOSSES=frozenset([spec.MSE]),
        _ONLY_FEATURES=frozenset(features))


def test_a_plain_models_copy_compiles_no_epilogue_code(rng):
    """The step driver of a plain model's copy is compiled with every layer
    feature off: no epilogue kernel is typed into it (their branches are
    pruned before typing), while a driver built for a feature calls its
    kernels."""
    model = _model(np.float64)
    step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.1))
    kstep = step._kernels
    assert kstep.SERVED_FEATURES == ()
    assert not (kstep._DROPOUT or kstep._NORM or kstep._RESIDUAL or kstep._WEIGHT_NORM)
    assert kstep.__package__.endswith(("_fplain", "_fplain_team"))   # (a thread team or not)

    x, y = _batch(rng, fg.MSE, np.float64)
    wn_model = fg.Sequential([fg.Dense(SIZES[0], 11, activation="tanh", weight_norm=True),
                              fg.Dense(11, SIZES[-1], activation=None)], dtype="float64")
    wn_step = fg.TrainStep(wn_model, fg.MSE(), fg.SGD(wn_model, lr=0.1))
    seen = []
    for name, features, st in (("plain", (), step), ("wn", ("weight_norm",), wn_step)):
        st._kernels = _uncached_copy(name, features).step
        st(x, y)
        (sig,) = st._kernels.train_step.signatures
        ir = st._kernels.train_step.inspect_llvm(sig)
        assert "softmax" not in ir and len(ir) > 10_000      # the copy's code, and IR to read
        seen.append([k for k in _FEATURE_KERNELS if k in ir])
    assert seen == [[], ["weight_norm_forward", "weight_norm_backward"]]


def test_a_copy_refuses_the_layer_features_it_lacks(rng):
    """The step of a model with epilogue pieces, on a copy compiled without
    one of its features, raises ValueError before anything changes, instead
    of running the layer as a plain one."""
    codes = [spec.TANH, spec.GELU, spec.IDENTITY]
    x, y = _batch(rng, fg.MSE, np.float64)
    for features in ((), ("dropout", "residual"), ("dropout", "norm")):
        model = _epilogue_model(np.float64)
        step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.1))
        step._kernels = registry.cpu_kernels(codes, rules=[spec.SGD], losses=[spec.MSE],
                                             features=features).step
        params, grads = model.params.copy(), model.grads.copy()
        for run in (lambda: step(x, y), lambda: step.gradients(x, y),
                    lambda: step.run_epoch(x, y, 4)):
            with pytest.raises(ValueError, match="layer feature not served"):
                run()
            np.testing.assert_array_equal(model.params, params)
            np.testing.assert_array_equal(model.grads, grads)
            assert model.dropout_step == 0
    with pytest.raises(ValueError, match="unknown layer feature"):
        registry.cpu_kernels(codes, features=["dropout", "batchnorm"])
    with pytest.raises(TypeError, match="collection of names"):
        registry.cpu_kernels(codes, features="dropout")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_epilogue_copies_match_the_full_package_bitwise(rng, dtype):
    """The driver of a model with epilogue pieces, compiled for its own
    features, gives the bits of the driver serving every feature, per step
    and per compiled epoch."""
    X, Y = _batch(rng, fg.MSE, dtype, B=23)
    runs = []
    for full in (False, True):
        model = _epilogue_model(dtype)
        step = fg.TrainStep(model, fg.MSE(), fg.Adam(model, lr=1e-2, clip_norm=0.5))
        if full:
            step._kernels = full_step
        else:
            assert len(step._kernels.SERVED_FEATURES) == 3
        losses = [step(X[:9], Y[:9]), step.gradients(X[9:], Y[9:])]
        res = step.run_epoch(X, Y, 5, seed=1)
        runs.append((model.params.copy(), losses, res["loss"], model.dropout_step))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and runs[0][3] == runs[1][3]
    np.testing.assert_array_equal(runs[0][2], runs[1][2])


def test_two_rules_share_a_warm_disk_cache_across_processes(tmp_path):
    """Two models with the same activations and different rules and losses,
    in one process and then in others on the same disk cache: each loads
    its own cache entry (a hit, no compile) and gives the same bits."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def probe(name, kinds):
        res = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / name), kinds],
                             env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        lines = dict(line.split(" ", 1) for line in res.stdout.split("\n") if line)
        return lines, np.load(tmp_path / (name + ".npz"))

    cold_lines, cold = probe("cold", "adam,sgd")
    assert all(v.split() == ["0", "1"] for v in cold_lines.values()), cold_lines  # compiled
    warm_lines, warm = probe("warm", "sgd,adam")             # the other order
    assert all(v.split() == ["1", "0"] for v in warm_lines.values()), warm_lines
    for kind in ("adam", "sgd"):
        np.testing.assert_array_equal(cold[kind], warm[kind])
    assert not np.array_equal(cold["adam"], cold["sgd"])


def test_shared_mode_gives_every_model_the_one_package(monkeypatch):
    """FASTGRAD_KERNEL_COPIES=shared: every CPU model, step and optimizer
    runs the package serving every code (one compile for a whole sweep);
    a value it does not know raises."""
    import fastgrad.kernels.cpu as full
    monkeypatch.setenv("FASTGRAD_KERNEL_COPIES", "shared")
    model = fg.MLP([3, 4, 2], activation="softplus")
    opt = fg.RMSprop(model, lr=0.1)
    step = fg.TrainStep(model, fg.MSE(), opt)
    assert model._kernels() is full and step._kernels is full.step
    assert opt.backend.update_kernels(opt.rule) is full.optim
    monkeypatch.setenv("FASTGRAD_KERNEL_COPIES", "per-layer")
    with pytest.raises(ValueError, match="FASTGRAD_KERNEL_COPIES='per-layer'"):
        fg.MLP([3, 4, 2], activation="softplus")._kernels()
