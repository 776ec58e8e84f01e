"""fastgrad.optim: every rule against the float64 reference and PyTorch,
clipping, the non-finite skip, checkpoints, the kernel contract, (param,
grad) pairs on every device and the CUDA multi-tensor kernel."""
import json
import math
import pickle

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import reference as ref
from fastgrad import schedules
from fastgrad.backend import backend_for
from fastgrad.errors import NonFiniteGradientError
from fastgrad.kernels import spec
from fastgrad.kernels.spec import HP_FIRST
from fastgrad.optim import SGD, Adam, AdamW, RMSprop, clipped_update

from conftest import OPTIMIZERS as CLASSES
from conftest import RULES, assert_close, to_numpy

# (kind, hyper-parameters, clip_norm, clip_value): every branch of every rule
CONFIGS = [
    ("sgd", dict(lr=0.1), 1.0, None),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2), 1.0, 0.05),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True), 0.5, None),
    ("adam", dict(lr=1e-2), 1.0, None),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True), 1.0, 0.02),
    ("adam", dict(lr=1e-2, betas=(0.3, 0.9)), None, 0.03),       # lerp's w >= 0.5 branch
    ("adamw", dict(lr=1e-2, weight_decay=0.1), 1.0, None),
    ("adamw", dict(lr=1e-2, amsgrad=True), 2.0, 0.05),
    ("rmsprop", dict(lr=1e-3), 1.0, None),
    ("rmsprop", dict(lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2), 1.0, 0.05),
    ("rmsprop", dict(lr=1e-3, alpha=0.3, centered=True), None, None),
]
IDS = [f"{k}-{i}" for i, (k, *_) in enumerate(CONFIGS)]


def test_configs_cover_every_rule():
    # a new rule in kernels/spec.py must bring its trajectory configurations
    assert {k for k, *_ in CONFIGS} == set(RULES)
SHAPES = [(5, 7), (7,), (7, 3), (3,)]     # two dense layers: W, b each
N_STEPS = 60


class FlatModel:
    """The model contract: flat params/grads plus layer offsets, on ``device``."""

    def __init__(self, n_per_layer, dtype=np.float64, seed=0, device="cpu"):
        self.backend = backend_for(device)
        self.layer_offsets = np.concatenate([[0], np.cumsum(n_per_layer)]).astype(np.int64)
        rng = np.random.default_rng(seed)
        self.params = self.backend.to_device(rng.standard_normal(self.layer_offsets[-1]), dtype)
        self.grads = self.backend.alloc(self.params.shape, dtype, fill=0)

    def set_grads(self, g):
        """Copy the host gradient ``g`` (or a scalar) into ``grads``."""
        self.grads[...] = self.backend.to_device(np.broadcast_to(g, self.grads.shape),
                                                 self.grads.dtype)

    def host_params(self):
        return self.backend.to_host(self.params)


def grad_sequence(n, steps=N_STEPS, seed=1):
    """Gradients with spikes (x100 every 7th step) that trigger clipping."""
    rng = np.random.default_rng(seed)
    gs = rng.standard_normal((steps, n)) * 0.1
    gs[::7] *= 100.0
    return gs


@pytest.mark.parametrize("kind,hyper,clip_norm,clip_value", CONFIGS, ids=IDS)
def test_trajectory_matches_reference(device, kind, hyper, clip_norm, clip_value):
    model = FlatModel([35, 7, 21, 3], device=device)
    opt = CLASSES[kind](model, clip_norm=clip_norm, clip_value=clip_value, **hyper)
    p_ref, state = model.host_params().copy(), {}
    h = dict(hyper)
    lr = h.pop("lr")
    n_clipped = 0
    for t, g in enumerate(grad_sequence(model.params.size), start=1):
        model.set_grads(g)
        stats = opt.step()
        gc, norm = ref.clip_grad(g, clip_norm, clip_value)
        p_ref = ref.optimizer_step(kind, p_ref, gc, state, t, lr, **h)
        n_clipped += stats.clipped
        assert stats.step == t and not stats.skipped
        assert stats.grad_norm == pytest.approx(norm, rel=1e-13)
        segments = np.split(g, model.layer_offsets[1:-1])
        np.testing.assert_allclose(stats.layer_norms, [np.linalg.norm(s) for s in segments],
                                   rtol=1e-13)
        np.testing.assert_allclose(model.host_params(), p_ref, rtol=1e-10, atol=1e-13)
    if clip_norm is not None:
        assert n_clipped >= N_STEPS // 7      # the spikes were clipped


@pytest.mark.parametrize("kind,hyper,clip_norm,clip_value", CONFIGS, ids=IDS)
def test_trajectory_matches_torch(kind, hyper, clip_norm, clip_value):
    torch = pytest.importorskip(
        "torch", reason="PyTorch parity test: torch is not installed (pip install 'fastgrad[peers]')")
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(s) for s in SHAPES]
    tparams = [torch.nn.Parameter(torch.tensor(a)) for a in arrays]
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                 "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[kind]
    topt = torch_cls(tparams, foreach=False, **hyper)
    grads = [np.zeros(s) for s in SHAPES]
    opt = CLASSES[kind](list(zip(arrays, grads)), clip_norm=clip_norm,
                        clip_value=clip_value, **hyper)
    n = sum(a.size for a in arrays)
    for g in grad_sequence(n, seed=3):
        off = 0
        for tp, ga in zip(tparams, grads):
            ga[...] = g[off:off + ga.size].reshape(ga.shape)
            tp.grad = torch.tensor(ga)
            off += ga.size
        total = torch.nn.utils.get_total_norm([tp.grad for tp in tparams])
        if clip_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(tparams, clip_norm, foreach=False)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(tparams, clip_value, foreach=False)
        topt.step()
        stats = opt.step()
        assert stats.grad_norm == pytest.approx(float(total), rel=1e-12)
        for a, tp in zip(arrays, tparams):
            np.testing.assert_allclose(a, tp.detach().numpy(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradient_touches_nothing(device, dtype, bad):
    model = FlatModel([10, 6], dtype=dtype, device=device)
    host = model.backend.to_host
    opt = Adam(model, lr=1e-2, amsgrad=True, clip_norm=1.0)
    g = np.linspace(-1, 1, 16)
    for _ in range(3):
        model.set_grads(g)
        opt.step()
    before = {k: host(v).copy() for k, v in opt.state.items()}
    p_before = model.host_params().copy()
    g[12] = bad
    model.set_grads(g)
    stats = opt.step()
    assert stats.skipped and not stats.clipped and stats.step == 3
    assert not np.isfinite(stats.grad_norm)
    assert np.isfinite(stats.layer_norms[0]) and not np.isfinite(stats.layer_norms[1])
    assert opt.step_count == 3 and opt.n_skipped == 1 and opt.n_calls == 4
    np.testing.assert_array_equal(model.host_params(), p_before)
    for k, v in opt.state.items():
        np.testing.assert_array_equal(host(v), before[k])
    # the next finite step goes on as if the bad one never happened
    g[12] = 0.5
    model.set_grads(g)
    assert not opt.step().skipped and opt.step_count == 4


def test_nonfinite_raises_when_asked():
    model = FlatModel([8])
    opt = SGD(model, lr=0.1, momentum=0.9, skip_nonfinite=False)
    p_before = model.params.copy()
    model.grads[3] = np.nan
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    assert issubclass(NonFiniteGradientError, FloatingPointError)
    np.testing.assert_array_equal(model.params, p_before)
    assert opt.step_count == 0 and opt.n_skipped == 1
    assert not np.any(opt.state["momentum_buffer"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clipped_sgd_step_has_the_clip_norm(dtype):
    model = FlatModel([100, 20, 3], dtype=dtype)
    opt = SGD(model, lr=1.0, clip_norm=0.5)
    model.grads[:] = np.random.default_rng(4).standard_normal(123) * 10
    p0 = model.params.astype(np.float64)
    stats = opt.step()
    assert stats.clipped and stats.clip_scale < 1
    moved = np.linalg.norm(model.params.astype(np.float64) - p0)
    tol = 1e-6 if dtype == np.float32 else 1e-7   # the 1e-6 in norm + 1e-6
    assert moved == pytest.approx(0.5, rel=tol)
    # a gradient already within the bound is left alone (scale exactly 1)
    model.grads[:] = 1e-3
    assert opt.step().clip_scale == 1.0


def test_stats_layer_norms_and_flags(device):
    model = FlatModel([30, 5, 0, 9], dtype=np.float32, device=device)
    opt = Adam(model, clip_norm=1.0)
    g = np.random.default_rng(5).standard_normal(44).astype(np.float32)
    model.set_grads(g)
    stats = opt.step()
    segs = np.split(g.astype(np.float64), model.layer_offsets[1:-1])
    np.testing.assert_allclose(stats.layer_norms, [np.linalg.norm(s) for s in segs], rtol=1e-12)
    assert stats.layer_norms[2] == 0.0
    assert stats.grad_norm == pytest.approx(np.linalg.norm(g.astype(np.float64)), rel=1e-12)
    assert stats.clipped and stats.clip_scale == pytest.approx(1.0 / (stats.grad_norm + 1e-6))
    assert stats.lr == 1e-3 and stats.step == 1


def test_step_stats_value_semantics():
    """StepStats: read-only, equal by value, ready at once on the CPU."""
    model = FlatModel([4, 3], dtype=np.float64)
    opt = SGD(model, lr=0.1)
    model.grads[:] = np.arange(7.0)
    a = opt.step()
    assert a.ready and a is opt.last_stats
    b = fg.StepStats(step=1, lr=0.1, grad_norm=a.grad_norm, clip_scale=1.0, clipped=False,
                     skipped=False, layer_norms=a.layer_norms.copy())
    assert a == b and a != opt.step()
    with pytest.raises(AttributeError):
        a.grad_norm = 0.0
    assert repr(a).startswith("StepStats(step=1, lr=0.1, grad_norm=")
    assert pickle.loads(pickle.dumps(a)) == a


def test_step_stats_keep_their_layer_norms():
    """A CPU update's StepStats take their layer norms' roots when first
    read: every way of reading gives the norms of that update, after later
    updates too, in an array of their own."""
    model = FlatModel([4, 3, 5], dtype=np.float64)
    opt = Adam(model, lr=0.1)
    rng = np.random.default_rng(8)
    stats, wants = [], []
    for _ in range(3):
        g = rng.standard_normal(12)
        model.grads[:] = g
        stats.append(opt.step())
        wants.append([np.linalg.norm(s) for s in np.split(g, model.layer_offsets[1:-1])])
    first, second, third = stats
    # read first through pickle, repr and == (each roots them), after later updates
    twin = pickle.loads(pickle.dumps(first))
    np.testing.assert_allclose(twin.layer_norms, wants[0], rtol=1e-15)
    assert "layer_norms=array([" in repr(second)
    assert third == fg.StepStats(step=3, lr=0.1, grad_norm=third.grad_norm, clip_scale=1.0,
                                 clipped=False, skipped=False,
                                 layer_norms=np.sqrt(opt._layer_sq))      # the last update's
    for st, want in zip(stats, wants):
        norms = st.layer_norms
        assert norms is st.layer_norms and norms.dtype == np.float64
        np.testing.assert_allclose(norms, want, rtol=1e-15)
    first.layer_norms[0] = -1.0                 # its own array: nothing else changes
    assert second.layer_norms[0] == pytest.approx(wants[1][0], rel=1e-15)
    assert np.all(opt._layer_sq >= 0.0)


@pytest.mark.parametrize("kind,hyper,clip_norm,clip_value", CONFIGS, ids=IDS)
def test_update_row_refill_equals_a_full_fill(kind, hyper, clip_norm, clip_value):
    """After the first update an update's hp row is refilled from the last
    one (through a view of the row, only its per-update slots rewritten):
    bitwise the row a full fill gives, under a schedule and after a
    hyper-parameter write."""
    model = FlatModel([6, 4], dtype=np.float64)
    h = dict(hyper, lr=schedules.exponential_decay(hyper["lr"], 0.5, 3))
    opt = CLASSES[kind](model, clip_norm=clip_norm, clip_value=clip_value, **h)
    rng = np.random.default_rng(3)
    for k in range(6):
        if k == 3:
            opt.weight_decay = 0.25
        hp = opt._kernel_args()[4]
        assert opt._hp_rows_known and hp is opt._hp
        full = np.full_like(hp, np.nan)
        opt._hp_rows_known.clear()                # a full fill, then the next refill
        opt._fill_row(full, k)
        np.testing.assert_array_equal(hp, full)
        model.grads[:] = rng.standard_normal(10)
        opt.step()
    assert opt.step_count == 6


@pytest.mark.parametrize("kind,hyper,clip_norm,clip_value", CONFIGS, ids=IDS)
def test_float32_follows_float64_reference(device, kind, hyper, clip_norm, clip_value):
    model = FlatModel([35, 7, 21, 3], dtype=np.float32, device=device)
    opt = CLASSES[kind](model, clip_norm=clip_norm, clip_value=clip_value, **hyper)
    p_ref, state = model.host_params().astype(np.float64), {}
    h = dict(hyper)
    lr = h.pop("lr")
    for t, g in enumerate(grad_sequence(66), start=1):
        model.set_grads(g)
        opt.step()
        gc, _ = ref.clip_grad(g.astype(np.float32), clip_norm, clip_value)
        p_ref = ref.optimizer_step(kind, p_ref, gc, state, t, lr, **h)
    np.testing.assert_allclose(model.host_params(), p_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_sumsq_is_exact_and_deterministic(device, rng, dtype):
    """The per-layer sums of squares behind the gradient norm: against an
    exact sum, with an empty layer and layers past one block's reach,
    bitwise the same twice; a NaN makes the total non-finite."""
    import importlib
    be = backend_for(device)
    layer_sumsq = importlib.import_module(be.kernels.__name__ + ".reduce").layer_sumsq
    offsets = np.array([0, 5, 5, 100_003, 100_013, 300_000], np.int64)
    g = rng.standard_normal(offsets[-1]).astype(dtype)
    exact = [math.fsum(s.astype(np.float64) ** 2) for s in np.split(g, offsets[1:-1])]
    gd = be.to_device(g)
    runs = []
    for _ in range(2):
        lsq = be.alloc(offsets.size - 1, np.float64)
        total = layer_sumsq(gd, offsets, lsq)
        runs.append((float(total), be.to_host(lsq)))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    np.testing.assert_allclose(runs[0][1], exact, rtol=1e-13)
    assert runs[0][0] == pytest.approx(math.fsum(exact), rel=1e-13)
    gd[7] = np.nan
    assert not np.isfinite(float(layer_sumsq(gd, offsets, be.alloc(offsets.size - 1,
                                                                     np.float64))))


def test_schedule_drives_the_learning_rate():
    model = FlatModel([4])
    sched = schedules.exponential_decay(0.5, 0.5, 2)
    opt = SGD(model, lr=sched)
    model.grads[:] = 1.0
    for k in range(6):
        p0 = model.params.copy()
        assert opt.lr == sched(k)
        stats = opt.step()
        assert stats.lr == sched(k)
        np.testing.assert_allclose(p0 - model.params, sched(k), rtol=1e-15)


def test_kernel_contract_is_bitwise_step():
    """TrainStep calls _kernel_args -> clipped_update -> _commit itself."""
    a, b = FlatModel([40, 8], np.float32), FlatModel([40, 8], np.float32)
    oa = AdamW(a, lr=1e-2, clip_norm=0.3, clip_value=0.1)
    ob = AdamW(b, lr=1e-2, clip_norm=0.3, clip_value=0.1)
    for g in grad_sequence(48, steps=10).astype(np.float32):
        a.grads[:] = g
        b.grads[:] = g
        sa = oa.step()
        rule, s0, s1, s2, hp = ob._kernel_args()
        norm, scale, skipped = clipped_update(rule, b.params, b.grads, s0, s1, s2, hp,
                                              b.layer_offsets, ob._layer_sq,
                                              ob._clip_norm, ob._clip_value)
        sb = ob._commit(norm, scale, skipped, ob._layer_sq)
        assert (sa.grad_norm, sa.clip_scale, sa.step) == (sb.grad_norm, sb.clip_scale, sb.step)
    np.testing.assert_array_equal(a.params, b.params)
    for k in oa.state:
        np.testing.assert_array_equal(oa.state[k], ob.state[k])


def _adam_float32_by_operations(p, g, m, v, vmax, hp, decoupled):
    """One Adam/AdamW update in NumPy float32, operation by operation as the
    kernel's loop (kernels/cpu/optim.py) with clipping off, every division a
    float32 division: the float32 result the kernel must give bitwise."""
    f = np.float32
    lr, wd, beta1, beta2 = (hp[k] for k in (spec.HP_LR, spec.HP_WEIGHT_DECAY, spec.HP_BETA1,
                                             spec.HP_BETA2))
    pi = p * (f(1.0 - lr * wd) if decoupled else f(1.0))
    gi = g * f(1.0) + (f(0.0) if decoupled else f(wd)) * pi
    w1 = 1.0 - beta1
    mi = m + f(w1) * (gi - m) if w1 < 0.5 else gi + f(-(1.0 - w1)) * (gi - m)
    vi = v * f(beta2) + f(1.0 - beta2) * gi * gi
    if hp[spec.HP_AMSGRAD]:
        vmax[:] = np.maximum(vmax, vi)
    root = np.sqrt(vmax if hp[spec.HP_AMSGRAD] else vi)
    denom = root / f(math.sqrt(hp[spec.HP_BIAS_CORR2])) + f(hp[spec.HP_EPS])
    m[:], v[:] = mi, vi
    p[:] = pi + f(-(lr / hp[spec.HP_BIAS_CORR1])) * (mi / denom)


@pytest.mark.parametrize("cls,hyper", [
    (Adam, dict(lr=1e-2)), (Adam, dict(lr=3e-3, betas=(0.3, 0.95), weight_decay=1e-2)),
    (Adam, dict(lr=1e-2, amsgrad=True)), (AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True))])
def test_float32_adam_is_its_float32_operations_bitwise(cls, hyper, rng):
    """The float32 update rounds as its formula written with float32
    divisions (``sqrt(v) / sqrt(bias_correction2)`` is taken as a float64
    product: exact, tests/test_mathfn.py), over steps whose bias corrections
    and gradient magnitudes vary."""
    model = FlatModel([173, 31, 60], np.float32)
    opt = cls(model, clip_norm=None, **hyper)
    p = model.params.copy()
    m, v, vmax = (np.zeros_like(p) for _ in range(3))
    for t in range(12):
        g = (rng.standard_normal(p.size) * 10.0 ** rng.uniform(-8, 3, p.size)).astype(np.float32)
        model.grads[:] = g
        hp = opt._kernel_args()[4].copy()
        opt.step()
        _adam_float32_by_operations(p, g, m, v, vmax, hp, cls is AdamW)
        np.testing.assert_array_equal(model.params, p, err_msg=f"update {t + 1}")
        np.testing.assert_array_equal(opt.state["exp_avg_sq"], v)


@pytest.mark.parametrize("kind,hyper,clip_norm,clip_value", CONFIGS[1::3], ids=IDS[1::3])
def test_state_dict_roundtrip(kind, hyper, clip_norm, clip_value):
    gs = grad_sequence(20, steps=20)
    hyper = dict(hyper, lr=schedules.warmup_cosine_decay(hyper["lr"], 3, 15))
    a = FlatModel([12, 8])
    oa = CLASSES[kind](a, clip_norm=clip_norm, clip_value=clip_value, **hyper)
    for g in gs[:10]:
        a.grads[:] = g
        oa.step()
    sd = oa.state_dict()
    meta = json.loads(json.dumps({k: v for k, v in sd.items() if k != "state"}))
    arrays = {k: v.copy() for k, v in sd["state"].items()}
    b = FlatModel([12, 8])
    b.params[:] = a.params
    ob = CLASSES[kind](b, lr=123.0)   # different hyper-parameters, restored below
    ob.load_state_dict(dict(meta, state=arrays))
    assert ob.hyper == oa.hyper and ob.step_count == 10
    for g in gs[10:]:
        a.grads[:] = g
        b.grads[:] = g
        oa.step()
        ob.step()
    np.testing.assert_array_equal(a.params, b.params)
    with pytest.raises(ValueError):
        SGD(FlatModel([12, 8])).load_state_dict(sd) if kind != "sgd" else \
            Adam(FlatModel([12, 8])).load_state_dict(sd)


def test_pairs_are_updated_in_place():
    W = np.ones((3, 2))
    b = np.ones(2)
    gW, gb = np.full((3, 2), 2.0), np.full(2, -1.0)
    opt = SGD([(W, gW), (b, gb)], lr=0.5)
    stats = opt.step()
    np.testing.assert_array_equal(W, np.zeros((3, 2)))
    np.testing.assert_array_equal(b, np.full(2, 1.5))
    np.testing.assert_allclose(stats.layer_norms, [np.sqrt(24.0), np.sqrt(2.0)])
    opt.zero_grad()
    assert not gW.any() and not gb.any()


def test_params_of_copied_pairs_read_the_users_arrays():
    """Pairs that are not contiguous are copied into ``opt.params``: each
    read refreshes it from the user's arrays, which may change between
    steps (``DataParallel`` broadcast a stale copy and wrote it back)."""
    p, g = np.zeros(8)[::2], np.ones(4)
    opt = SGD([(p, g)], lr=0.5)
    p[...] = 7.0
    np.testing.assert_array_equal(opt.params, np.full(4, 7.0))
    opt.step()
    np.testing.assert_array_equal(p, np.full(4, 6.5))
    np.testing.assert_array_equal(opt.params, p)


@pytest.mark.parametrize("make", [
    lambda m: Adam(m, lr=-1e-3),
    lambda m: Adam(m, betas=(1.0, 0.999)),
    lambda m: Adam(m, betas=(0.9, -0.1)),
    lambda m: Adam(m, eps=-1.0),
    lambda m: AdamW(m, weight_decay=-0.1),
    lambda m: SGD(m, lr=0.1, clip_norm=-1.0),
    lambda m: SGD(m, lr=0.1, clip_value=0.0),
    lambda m: SGD(m, lr=0.1, nesterov=True),
    lambda m: SGD(m, lr=0.1, momentum=-0.5),
    lambda m: RMSprop(m, alpha=-0.1),
    lambda m: RMSprop(m, lr=float("nan")),
    lambda m: Adam(m, lr=schedules.constant(-1.0)),
], ids=range(12))
def test_invalid_hyper_parameters(make):
    with pytest.raises(ValueError):
        make(FlatModel([4]))


def test_invalid_inputs():
    with pytest.raises(TypeError):
        SGD([(np.ones(3, np.float32), np.ones(3))])
    with pytest.raises(ValueError):
        SGD([(np.ones(3), np.ones(4))])
    with pytest.raises(TypeError):
        SGD([(np.ones(3, np.int64), np.ones(3, np.int64))])
    m = FlatModel([4, 4])
    m.layer_offsets = np.array([0, 5], np.int64)
    with pytest.raises(ValueError):
        Adam(m)
    with pytest.raises(TypeError):
        Adam(FlatModel([4]), lr="fast")
    with pytest.raises(TypeError):
        Adam(FlatModel([4]), momentum=0.9)


@pytest.mark.parametrize("rule", ["adam", "sgd", "rmsprop"])
def test_parallel_update_is_bitwise_serial(rule):
    """The parallel kernel (``opt.parallel``) must give exactly what the
    serial kernel (the one TrainStep runs) gives, over several layers with
    ragged ends and an empty one."""
    from fastgrad.kernels.cpu import optim as K
    rng = np.random.default_rng()
    sizes = [170_017, 5, 0, 525_289]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(off[-1])
    p0 = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 3).astype(np.float32)
    hp = np.zeros(K.HP_SIZE)
    hp[[K.HP_LR, K.HP_BETA1, K.HP_BETA2, K.HP_EPS, K.HP_BIAS_CORR1, K.HP_BIAS_CORR2,
        K.HP_MOMENTUM, K.HP_ALPHA]] = [1e-2, 0.9, 0.999, 1e-8, 0.1, 0.001, 0.9, 0.99]
    results = []
    for kernel in (K.clipped_update, K.clipped_update_parallel):
        p = p0.copy()
        s = [np.zeros(n, np.float32), np.zeros(n, np.float32), np.empty(0, np.float32)]
        ls = np.zeros(len(sizes))
        out = kernel(K.RULES[rule], p, g, *s, hp, off, ls, 1.0, 0.5)
        results.append((p, s[0], s[1], ls, out))
    (p1, a1, b1, l1, o1), (p2, a2, b2, l2, o2) = results
    assert o1 == o2 and o1[1] < 1.0                 # same norm, scale; clipping active
    for x, y in ((p1, p2), (a1, a2), (b1, b2), (l1, l2)):
        np.testing.assert_array_equal(x, y)


def test_parallel_kernels_give_the_same_trajectory(per_model_copies, monkeypatch):
    # by default parallel from 2^15 parameters where the step has a thread
    # team (fastgrad.threads.team_threads); without one the serial kernel,
    # and True fixes Numba's parfor kernel: all the same bits
    rng = np.random.default_rng()
    models = [fg.MLP([300, 700, 9], dtype="float32", seed=1) for _ in range(3)]
    opts = [fg.Adam(m, lr=1e-2, clip_norm=0.5) for m in models]
    assert models[0].n_params >= fg.threads.PARALLEL_UPDATE_MIN_PARAMS
    assert opts[2].parallel == (fg.threads.team_threads() > 0)
    monkeypatch.setenv("FASTGRAD_PASS_TEAM", "0")
    K = opts[0].backend.update_kernels(opts[0].rule)   # compiled for Adam alone
    assert K.SERVED_RULES == (K.ADAM,)
    assert not opts[0].parallel and opts[0]._update is K.clipped_update
    opts[1].parallel = True
    assert opts[1].parallel and opts[1]._update is K.clipped_update_parallel
    for _ in range(5):
        g = rng.standard_normal(models[0].n_params).astype(np.float32)
        for k, (m, o) in enumerate(zip(models, opts)):
            m.grads[...] = g
            if k == 2:
                monkeypatch.delenv("FASTGRAD_PASS_TEAM")     # the default: a team if any
            o.step()
            if k == 2:
                monkeypatch.setenv("FASTGRAD_PASS_TEAM", "0")
    np.testing.assert_array_equal(models[0].params, models[1].params)
    np.testing.assert_array_equal(models[0].params, models[2].params)
    opts[1].parallel = False
    assert opts[1]._update is K.clipped_update


@pytest.mark.parametrize("kind,hyper,clip_norm,clip_value", CONFIGS, ids=IDS)
@pytest.mark.parametrize("lr", ["constant", "schedule"])
def test_fill_updates_gives_the_rows_of_fill_update(kind, hyper, clip_norm, clip_value, lr):
    """The compiled epoch's hyper-parameter rows (one per step, filled at
    once) equal the rows the per-step path fills, for every update count."""
    model = fg.MLP([5, 7, 3], seed=0)
    if lr == "schedule":
        hyper = dict(hyper, lr=schedules.warmup_cosine_decay(0.01, 3, 15))
    opt = CLASSES[kind](model, clip_norm=clip_norm, clip_value=clip_value, **hyper)
    for k0 in (0, 1, 7):
        n = 20
        rows = np.full((n,) + opt._hp.shape, np.nan)
        lrs = np.full(n, np.nan)
        opt._fill_updates(rows, lrs, k0)
        for r in range(n):
            want = np.full(opt._hp.shape, np.nan)
            want_lr = opt._fill_update(want, k0 + r)
            np.testing.assert_array_equal(rows[r], want, err_msg=f"row {r}, k0 {k0}")
            assert lrs[r] == want_lr


def test_fill_updates_with_param_groups_and_a_bad_schedule():
    model = fg.MLP([5, 7, 3], seed=0)
    opt = Adam([{"params": model.weights(), "weight_decay": 0.1},
                {"params": model.biases_and_norms(), "lr": 0.5}], lr=1e-2)
    rows, lrs = np.zeros((4,) + opt._hp.shape), np.zeros(4)
    opt._fill_updates(rows, lrs, 3)
    for r in range(4):
        want = np.zeros(opt._hp.shape)
        assert lrs[r] == opt._fill_update(want, 3 + r)
        np.testing.assert_array_equal(rows[r], want)


class _NegativeFrom(schedules.Schedule):
    """A user schedule that turns negative at update ``k_bad``."""
    kind = "negative_from"

    def __init__(self, k_bad):
        self.k_bad = k_bad

    def __call__(self, k):
        return -1.0 if k >= self.k_bad else 0.01


def test_a_refused_load_state_dict_changes_nothing(rng):
    """Everything is checked before anything changes: another model's
    checkpoint, a bad counter or a malformed dict leaves the optimizer's
    values, groups, state and counters as they were (the hyper-parameters
    were installed before the state was found not to fit)."""
    a, b = fg.MLP([4, 8, 3], seed=0), fg.MLP([4, 16, 3], seed=0)
    oa = fg.Adam(a, lr=1e-3, param_groups=[{"params": a.weights()},
                                           {"params": a.biases_and_norms(), "lr": 5e-4}])
    ob = fg.Adam(b, lr=0.3, weight_decay=0.1)
    a.grads[:] = rng.standard_normal(a.grads.size)
    b.grads[:] = rng.standard_normal(b.grads.size)
    oa.step()
    ob.step()
    before = oa.state_dict()
    good = oa.state_dict()
    bad_step = dict(good, step="x")
    lacking = dict(good, state={})
    for sd, exc in ((ob.state_dict(), ValueError), (bad_step, ValueError),
                    (lacking, ValueError), ({"kind": "adam"}, ValueError), ([1], TypeError),
                    (dict(good, since=[5, 0]), ValueError)):
        with pytest.raises(exc):
            oa.load_state_dict(sd)
        after = oa.state_dict()
        assert json.dumps({k: v for k, v in after.items() if k != "state"}, sort_keys=True) \
            == json.dumps({k: v for k, v in before.items() if k != "state"}, sort_keys=True)
        for name in before["state"]:
            np.testing.assert_array_equal(after["state"][name], before["state"][name])
    oa.load_state_dict(good)            # and a good one still loads
    oa.step()


@pytest.mark.parametrize("k_bad", [0, 2])
def test_fill_updates_refuses_a_bad_lr_at_its_update(k_bad):
    model = fg.MLP([5, 7, 3], seed=0)
    opt = Adam(model, lr=_NegativeFrom(k_bad))
    rows, lrs = np.zeros((4,) + opt._hp.shape), np.zeros(4)
    with pytest.raises(ValueError, match=f"lr=-1.0 at update {k_bad}"):
        opt._fill_updates(rows, lrs, 0)


# --- (param, grad) pairs on every device: the multi-tensor path ---------------------------

# every rule, with the options that take other code paths in its kernel
PAIR_CONFIGS = [
    ("sgd", dict(lr=0.1)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("adam", dict(lr=1e-2, weight_decay=0.01)),
    ("adam", dict(lr=1e-2, amsgrad=True, maximize=True)),
    ("adamw", dict(lr=1e-2)),
    ("rmsprop", dict(lr=1e-2, momentum=0.5, centered=True)),
    ("rmsprop", dict(lr=1e-2)),
]
PAIR_IDS = [f"{k}-{'-'.join(sorted(h))}" for k, h in PAIR_CONFIGS]
# fastgrad's (torch's) state names -> fastgrad.reference.optimizer_step's
REF_STATE = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vmax",
             "momentum_buffer": "b", "square_avg": "s", "grad_avg": "a"}


def test_pair_configs_cover_every_rule():
    assert {k for k, _ in PAIR_CONFIGS} == set(RULES)


def _pair_shapes(rng, n):
    """n tensors of odd shapes, one empty and one above a norm chunk (8192)."""
    shapes = [tuple(int(d) for d in rng.integers(1, 9, size=rng.integers(1, 3)))
              for _ in range(n)]
    if n >= 3:
        shapes[1] = (0,)
        shapes[2] = (8193 + 17,)
    return shapes


def _keep_decay_from_cancelling(kind, hyper, host_p, host_gs, clip_norm, clip_value):
    """Move any parameter whose first update's L2-decayed gradient g + wd p
    cancels to near zero.  The kernel forms it in the params' dtype, off by an
    ulp of the terms (1e-9 in float32), and Adam's first step divides it by
    its own size plus eps (1e-8): at |g + wd p| = 1e-9 (seed 2724960214) the
    float32 step is a different number from the float64 reference's, an
    ill-conditioned input rather than a wrong kernel.  Moving p does not
    change the clip (the norm is the gradients')."""
    wd = hyper.get("weight_decay", 0.0)
    if not wd or kind == "adamw":
        return
    first = next(g for g in host_gs
                 if np.isfinite(np.concatenate([x.ravel() for x in g])).all())
    gc, _ = ref.clip_grad(np.concatenate([g.ravel() for g in first]), clip_norm, clip_value)
    start = 0
    for p in host_p:
        flat, g = p.reshape(-1), gc[start:start + p.size]
        start += p.size
        decayed = g + wd * flat.astype(np.float64)
        near = np.abs(decayed) < 1e-4 * wd * np.abs(flat)
        flat[near] += np.asarray(0.5, p.dtype)


def _run_pairs(device, cls, kw, host_p, host_gs, groups=None):
    """``cls`` on (param, grad) pairs of ``device`` arrays over the gradient
    list: the optimizer, the host params after each update, the StepStats."""
    be = backend_for(device)
    ps = [be.to_device(p.copy()) for p in host_p]
    gs = [be.alloc(p.shape, p.dtype, fill=0) for p in ps]
    pairs = list(zip(ps, gs))
    if groups is not None:
        pairs = [dict(g, params=[pairs[i] for i in idx]) for idx, g in groups]
    opt = cls(pairs, **kw)
    params, stats = [], []
    for step_g in host_gs:
        for g, h in zip(gs, step_g):
            g[...] = be.to_device(h)
        stats.append(opt.step())
        params.append([to_numpy(p).copy() for p in ps])
    return opt, params, stats


@pytest.mark.parametrize("flat", [False, True], ids=["pairs", "model"])
def test_centered_rmsprop_survives_an_overflowing_square(device, flat):
    """A finite float32 gradient of 3e21 overflows the squares' average and
    grad_avg**2: inf - inf wrote NaN into the parameter (not skipped: the
    gradient is finite); torch's fused form gives an infinite variance, so
    that entry does not move and the others step as usual."""
    g = np.array([3e21, 1.0, -2.0], np.float32)
    p0 = np.array([0.5, 0.25, -1.0], np.float32)
    if flat:
        model = fg.Sequential([fg.Dense(1, 1, activation=None)], seed=0, device=device)
        model.params[...] = backend_for(device).to_device(p0[:2])
        model.grads[...] = backend_for(device).to_device(g[:2])
        opt = fg.RMSprop(model, lr=1e-2, centered=True, momentum=0.5)
        got = lambda: to_numpy(model.params)            # noqa: E731
    else:
        _, params, _ = _run_pairs(device, fg.RMSprop, dict(lr=1e-2, centered=True, momentum=0.5),
                                  [p0], [[g]])
        got = lambda: params[-1][0]                      # noqa: E731
    if flat:
        assert not opt.step().skipped
    out = got()
    assert np.isfinite(out).all() and out[0] == 0.5
    # the finite entries as the float64 reference (1 - alpha = 0.01, so
    # centered: avg = sqrt(0.01 g^2 - (0.01 g)^2) = sqrt(0.0099) |g|)
    want = p0[1:len(out)] - 1e-2 * np.sign(g[1:len(out)]) / np.sqrt(0.0099)
    np.testing.assert_allclose(out[1:], want, rtol=1e-5)


def _reference_pairs(kind, hypers, host_p, host_gs, clip_norm, clip_value):
    """The float64 reference of ``_run_pairs``: tensor i updated with
    ``hypers[i]`` (lr and the rest) after the global clip; a non-finite
    gradient skips the update.  Returns the params after each update,
    (norm, skipped) per update, and each state buffer, flat."""
    ps = [p.astype(np.float64) for p in host_p]
    states = [{} for _ in ps]
    params, norms, t = [], [], 0
    for step_g in host_gs:
        gc, norm = ref.clip_grad(np.concatenate([g.ravel() for g in step_g]),
                                 clip_norm, clip_value)
        norms.append((norm, gc is None))
        if gc is not None:
            t += 1
            parts = np.split(gc, np.cumsum([p.size for p in ps])[:-1])
            for i, (p, g) in enumerate(zip(ps, parts)):
                h = dict(hypers[i])
                lr = h.pop("lr")
                if h.pop("maximize", False):
                    g = -g
                ps[i] = ref.optimizer_step(kind, p.ravel(), g, states[i], t, lr,
                                           **h).reshape(p.shape)
        params.append([p.copy() for p in ps])
    names = {k for s in states for k in s}
    flat_state = {k: np.concatenate([s[k] for s in states if k in s]) for k in names}
    return params, norms, flat_state


def _flat(state):
    if isinstance(state, (list, tuple)):
        return np.concatenate([to_numpy(a).ravel() for a in state if a is not None])
    return to_numpy(state).ravel()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind,hyper", PAIR_CONFIGS, ids=PAIR_IDS)
def test_pairs_match_reference(device, rng, kind, hyper, dtype):
    """fg.<Optimizer> on the device's (param, grad) pairs (an empty tensor,
    one over a norm chunk, a skipped NaN update) against the float64
    reference: params, state, StepStats and counters."""
    shapes = _pair_shapes(rng, 5)
    host_p = [rng.standard_normal(s).astype(dtype) for s in shapes]
    host_gs = [[(rng.standard_normal(s) * (3.0 if t % 3 == 0 else 0.2)).astype(dtype)
                for s in shapes] for t in range(7)]
    host_gs[3][0].reshape(-1)[0] = np.nan
    _keep_decay_from_cancelling(kind, hyper, host_p, host_gs, 1.0, 0.5)
    kw = dict(hyper, clip_norm=1.0, clip_value=0.5)
    opt, got, stats = _run_pairs(device, CLASSES[kind], kw, host_p, host_gs)
    want, norms, state = _reference_pairs(kind, [hyper] * len(shapes), host_p, host_gs,
                                          1.0, 0.5)
    assert opt.device == device
    for t, st in enumerate(stats):
        norm, skipped = norms[t]
        assert st.skipped == skipped and st.lr == hyper["lr"]
        assert st.step == t + (t < 3), f"update {t}"
        for a, b in zip(got[t], want[t]):
            assert_close(a, b, dtype, what=f"params after update {t}")
        if skipped:
            assert np.isnan(st.grad_norm)
            continue
        assert_close(st.grad_norm, norm, np.float64, rtol=1e-12, what="norm")
        assert_close(st.clip_scale, min(1.0, 1.0 / (norm + 1e-6)), np.float64, rtol=1e-12,
                     what="scale")
        layer = [np.linalg.norm(g.astype(np.float64)) for g in host_gs[t]]
        assert_close(st.layer_norms, layer, np.float64, rtol=1e-12, what="layer norms")
    assert (opt.step_count, opt.n_skipped) == (6, 1)
    assert {REF_STATE[k] for k in opt.state} == set(state)
    for name, buf in opt.state.items():
        assert_close(_flat(buf), state[REF_STATE[name]], dtype, what=name)


def test_pairs_with_param_groups_match_reference(device, rng):
    """Groups of pairs: each pair updated with its group's hp row (the
    groups' rates differ, so a wrong row per pair would show)."""
    shapes = [(3, 5), (7,), (2, 2), (11,)]
    host_p = [rng.standard_normal(s) for s in shapes]
    host_gs = [[rng.standard_normal(s) for s in shapes] for _ in range(4)]
    groups = [([0, 2], {"lr": 0.05}), ([1, 3], {"weight_decay": 0.1, "lr": 0.001})]
    _, got, stats = _run_pairs(device, AdamW, dict(lr=0.01, clip_norm=2.0), host_p, host_gs,
                               groups)
    hypers = [{"lr": 0.05}, {"lr": 0.001, "weight_decay": 0.1}] * 2
    want, norms, _ = _reference_pairs("adamw", hypers, host_p, host_gs, 2.0, None)
    for t in range(4):
        for a, b in zip(got[t], want[t]):
            assert_close(a, b, np.float64, what=f"params after update {t}")
        assert_close(stats[t].grad_norm, norms[t][0], np.float64, rtol=1e-12, what="norm")


def test_pairs_of_mixed_dtypes_and_strided_views(device):
    be = backend_for(device)
    with pytest.raises(TypeError, match="dtype"):
        Adam([(be.alloc(3, np.float32, fill=0), be.alloc(3, np.float64, fill=0))], lr=0.1)
    p = be.alloc((4, 4), np.float64, fill=0)
    pair = (p[:, 1], be.alloc(4, np.float64, fill=1))
    if device == "cuda":
        # CuPy pairs go to the multi-tensor kernel by address: no copies
        with pytest.raises(ValueError, match="C-contiguous"):
            Adam([pair], lr=0.1)
    else:
        # NumPy views are copied into the flat buffer and back
        SGD([pair], lr=0.5).step()
        want = np.zeros((4, 4))
        want[:, 1] = -0.5
        np.testing.assert_array_equal(to_numpy(p), want)


def test_pairs_whose_params_overlap_are_refused(device):
    """A tensor listed twice (or two views sharing elements) was updated
    twice and counted twice in the norm; neighbouring and empty arrays are
    fine."""
    be = backend_for(device)
    p, g = be.alloc(8, np.float64, fill=1), be.alloc(8, np.float64, fill=1)
    cases = [([(p, g), (p, g)], 0, 1),
             ([(p[:3], g[:3]), (p[6:], g[6:]), (p[2:5], g[2:5])], 0, 2)]
    if device == "cpu":         # (CuPy pairs must be C-contiguous)
        cases.append(([(p[::-1][:4], g[:4]), (p[:5], g[:5])], 0, 1))
    for pairs, i, j in cases:
        with pytest.raises(ValueError, match=f"pairs {i} and {j}: their params share"):
            SGD(pairs, lr=0.1)
    SGD([(p[:4], g[:4]), (p[4:], g[4:]), (p[4:4], g[4:4])], lr=0.5).step()
    np.testing.assert_array_equal(to_numpy(p), np.full(8, 0.5))
    if device == "cpu":
        # interleaved views share no element (their byte spans overlap): as
        # torch, each is updated once; they were refused
        base, grad = np.arange(12.0).reshape(2, 6), np.ones((2, 6))
        SGD([(base[:, 0::2], grad[:, 0::2]), (base[:, 1::2], grad[:, 1::2])], lr=0.1).step()
        np.testing.assert_allclose(base, np.arange(12.0).reshape(2, 6) - 0.1)
        # a third pair that shares with the first but lies past the second
        with pytest.raises(ValueError, match="pairs 0 and 2: their params share"):
            SGD([(base[:, 0::2], grad[:, 0::2]), (base[:, 1::2], grad[:, 1::2]),
                 (base[1, 4:], grad[1, 4:])], lr=0.1)


def test_a_bare_array_is_not_taken_for_a_pair():
    # fg.SGD([W]) with W of 2 rows unpacked W as (param, grad): row 1 was
    # applied as row 0's gradient
    W = np.ones((2, 5))
    with pytest.raises(TypeError, match="expected a \\(param, grad\\) pair"):
        SGD([W], lr=0.1)
    assert (W == 1).all()


# CUDA only: a mix of devices needs a second one
@pytest.mark.cuda
def test_cuda_pairs_mixed_with_numpy_are_refused(cuda_be):
    with pytest.raises(TypeError, match="one device"):
        Adam([(cuda_be.alloc(3, np.float64, fill=0), cuda_be.alloc(3, np.float64, fill=0)),
              (np.zeros(3), np.zeros(3))], lr=0.1)
    with pytest.raises(TypeError, match="NumPy arrays or CuPy"):
        Adam([(cuda_be.alloc(3, np.float64, fill=0), np.zeros(3))], lr=0.1)


def test_pairs_skip_nonfinite_false_raises(device):
    be = backend_for(device)
    p, g = be.alloc(5, np.float64, fill=1), be.alloc(5, np.float64, fill=1)
    opt = SGD([(p, g)], lr=0.1, skip_nonfinite=False)
    g[2] = np.nan
    with pytest.raises(NonFiniteGradientError):
        opt.step()
    np.testing.assert_array_equal(to_numpy(p), np.ones(5))
    g[2] = 1.0
    opt.step()
    np.testing.assert_allclose(to_numpy(p), np.full(5, 0.9), rtol=1e-15)


def test_pairs_checkpoint_round_trip(device, rng):
    """state_dict of an optimizer on pairs loads into a fresh one, which
    then continues bitwise as the original."""
    be = backend_for(device)
    shapes = [(3, 4), (5,), (1,)]
    ps = [be.to_device(rng.standard_normal(s)) for s in shapes]
    gs = [be.to_device(rng.standard_normal(s)) for s in shapes]
    opt = Adam(list(zip(ps, gs)), lr=0.1, clip_norm=1.0)
    opt.step()
    opt.step()
    assert to_numpy(opt.params).tobytes() == np.concatenate(
        [to_numpy(p).ravel() for p in ps]).tobytes()
    ps2 = [p.copy() for p in ps]
    opt2 = Adam(list(zip(ps2, [g.copy() for g in gs])), lr=0.1, clip_norm=1.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.step_count == 2
    opt.step()
    opt2.step()
    for a, b in zip(ps, ps2):
        assert to_numpy(a).tobytes() == to_numpy(b).tobytes()
    opt.zero_grad()
    assert not any(to_numpy(g).any() for g in gs)


# --- the CUDA multi-tensor kernel itself --------------------------------------------------
# CUDA only: its signature (a dtype, device address tables, a grid) is the
# CUDA backend's own; the CPU twin's bitwise test against the flat kernel
# is tests/test_torch_backend.py's.

_CLIPS = [dict(clip_norm=1.5), dict(clip_value=0.05), dict(clip_norm=0.7, clip_value=0.2)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind,hyper", PAIR_CONFIGS, ids=PAIR_IDS)
def test_cuda_multi_tensor_kernel_is_bitwise_the_flat_kernel(cuda_be, rng, kind, hyper, dtype):
    from fastgrad.kernels.cuda import multi_tensor as kmt
    from fastgrad.kernels.cuda import optim as kopt
    for n, clip in ((1, _CLIPS[0]), (3, _CLIPS[1]), (7, _CLIPS[2]), (20, _CLIPS[0])):
        shapes = _pair_shapes(rng, n)
        sizes = np.array([int(np.prod(s)) for s in shapes], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        host_p = [rng.standard_normal(s).astype(dtype) for s in shapes]
        # a CPU optimizer only to make the hp rows and state buffers
        opt = CLASSES[kind]([(p.copy(), np.zeros_like(p)) for p in host_p], **hyper, **clip)
        rule, s0, s1, s2, _ = opt._kernel_args()
        flat_p = cuda_be.to_device(np.concatenate([p.ravel() for p in host_p]))
        flat_s = [cuda_be.alloc(s.size, dtype, fill=0) for s in (s0, s1, s2)]
        ps = [cuda_be.to_device(p) for p in host_p]
        gs = [cuda_be.alloc(s, dtype) for s in shapes]
        # each tensor's state: a separate array (not slices of a flat one)
        ss = [[cuda_be.alloc(sz, dtype, fill=0) if s.size else None for sz in sizes]
              for s in (s0, s1, s2)]
        p_addr = cuda_be.to_device(kmt.addresses(ps, dtype))
        g_addr = cuda_be.to_device(kmt.addresses(gs, dtype))
        s_addr = cuda_be.to_device(np.stack([kmt.addresses(col, dtype) for col in ss]))
        rows = cuda_be.alloc(n, np.int64, fill=0)
        lsq_flat = cuda_be.alloc(n, np.float64)
        lsq_multi = cuda_be.alloc(n, np.float64)
        for t in range(6):
            opt._step_count = t
            hp = opt._kernel_args()[4]
            host_g = [(rng.standard_normal(s) * (4.0 if t % 2 else 0.3)).astype(dtype)
                      for s in shapes]
            nan_step = t == 4
            if nan_step:
                host_g[-1].reshape(-1)[0] = np.nan
            for g, h in zip(gs, host_g):
                g[...] = cuda_be.to_device(h)
            flat_g = cuda_be.to_device(np.concatenate([h.ravel() for h in host_g]))
            before = [to_numpy(p).copy() for p in ps]
            nf, sf, kf = kopt.clipped_update(rule, flat_p, flat_g, *flat_s, hp, offsets,
                                             lsq_flat, opt._clip_norm, opt._clip_value)
            nm, sm, km = kmt.multi_clipped_update(rule, dtype, p_addr, g_addr, s_addr, sizes,
                                                  hp, rows, lsq_multi, opt._clip_norm,
                                                  opt._clip_value)
            assert bool(km) == bool(kf) == nan_step
            assert to_numpy(lsq_multi).tobytes() == to_numpy(lsq_flat).tobytes()
            if nan_step:
                assert not np.isfinite(float(nm))
                for p, b in zip(ps, before):
                    assert to_numpy(p).tobytes() == b.tobytes(), "a skipped update wrote"
            else:
                assert float(nm) == float(nf) and float(sm) == float(sf)
            got = np.concatenate([to_numpy(p).ravel() for p in ps])
            assert got.tobytes() == to_numpy(flat_p).tobytes(), f"params at update {t}"
            for j, col in enumerate(ss):
                if flat_s[j].size:
                    got = np.concatenate([to_numpy(a) for a in col])
                    assert got.tobytes() == to_numpy(flat_s[j]).tobytes(), f"s{j} at {t}"


@pytest.mark.cuda
def test_cuda_multi_tensor_kernel_rejects_bad_input(cuda_be):
    from fastgrad.kernels.cuda import multi_tensor as kmt
    a = cuda_be.alloc(3, np.float32, fill=0)
    with pytest.raises(TypeError, match="dtype"):
        kmt.addresses([a], np.float64)
    with pytest.raises(TypeError, match="cupy.ndarray"):
        kmt.addresses([np.zeros(3)])
    with pytest.raises(ValueError, match="contiguous"):
        kmt.addresses([cuda_be.alloc((4, 4), np.float32, fill=0)[:, 1]])
    with pytest.raises(ValueError, match="sizes"):
        kmt.layout(np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="rule"):
        kmt.multi_clipped_update(9, np.float32, [0], [0], np.zeros((3, 1)), [3],
                                 np.zeros(17), [0], cuda_be.alloc(1, np.float64, fill=0), 0.0, 0.0)


@pytest.mark.cuda
def test_cuda_multi_tensor_kernel_strides_over_tensors_past_grid_y(cuda_be, rng, monkeypatch):
    """More tensors than grid y allows (lowered here to 2 after the flat
    reference ran, whose norm pass launches one grid row per layer): both
    kernels loop over tensors, and the result is still the flat kernel's."""
    from fastgrad.kernels.cuda import _module
    from fastgrad.kernels.cuda import multi_tensor as kmt
    from fastgrad.kernels.cuda import optim as kopt
    sizes = np.array([5, 1, 9000, 3, 0, 17, 2], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    host_p = [rng.standard_normal(n) for n in sizes]
    host_g = [rng.standard_normal(n) for n in sizes]
    opt = SGD([(p.copy(), np.zeros_like(p)) for p in host_p], lr=0.1, momentum=0.9,
              clip_norm=1.0)
    rule, s0, _, _, hp = opt._kernel_args()
    ps, gs = [cuda_be.to_device(p) for p in host_p], [cuda_be.to_device(g) for g in host_g]
    bufs = [cuda_be.alloc(int(n), np.float64, fill=0) for n in sizes]
    s_addr = np.stack([kmt.addresses(bufs), np.zeros(7, np.int64), np.zeros(7, np.int64)])
    flat_p = cuda_be.to_device(np.concatenate(host_p))
    flat_s = cuda_be.alloc(s0.size, np.float64, fill=0)
    lsq_f, lsq_m = cuda_be.alloc(7, np.float64), cuda_be.alloc(7, np.float64)
    empty = cuda_be.alloc(0, np.float64)
    kopt.clipped_update(rule, flat_p, cuda_be.to_device(np.concatenate(host_g)), flat_s, empty,
                        empty, hp, offsets, lsq_f, opt._clip_norm, opt._clip_value)
    monkeypatch.setattr(_module, "MAX_GRID_Y", 2)
    kmt.multi_clipped_update(rule, np.float64, kmt.addresses(ps), kmt.addresses(gs), s_addr,
                             sizes, hp, np.zeros(7, np.int64), lsq_m, opt._clip_norm,
                             opt._clip_value)
    assert to_numpy(lsq_m).tobytes() == to_numpy(lsq_f).tobytes()
    got = np.concatenate([to_numpy(p) for p in ps])
    assert got.tobytes() == to_numpy(flat_p).tobytes()
    assert np.concatenate([to_numpy(b) for b in bufs]).tobytes() == to_numpy(flat_s).tobytes()


_NEW_VALUE = {"nonneg": 0.3, "fraction": 0.5, "flag": True, "betas": (0.5, 0.9)}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_hp_row_follows_every_hyper_parameter_write(name, rng):
    """The optimizer reuses the hp row it filled while its values are
    unchanged; after each write (attribute, param_groups entry, lr, a
    schedule) its row is the one a fresh optimizer with those values fills
    at the same update count."""
    cls = CLASSES[name]
    model = fg.MLP([5, 7, 3], seed=1, dtype="float64")
    opt = cls(model, lr=1e-2)
    model.grads[:] = rng.standard_normal(model.grads.size)
    writes = [("param_groups", h.name, _NEW_VALUE[h.check])
              for h in fg.kernels.spec.UPDATE_RULES[cls.rule].hyper]
    writes += [("attr", "lr", 3e-3), ("attr", "lr", schedules.cosine_decay(1e-2, 50)),
               ("param_groups", "lr", 5e-3)]
    for where, key, value in writes:
        for _ in range(2):                       # the row filled once, then reused
            opt.step()
        buffers = set(opt.state)
        try:
            if where == "attr":
                setattr(opt, key, value)
            else:
                opt.param_groups[0][key] = value
        except ValueError:                       # a combination the rule refuses
            continue
        got = opt._kernel_args()[4].copy()
        values = {h.name: getattr(opt, h.name)
                  for h in fg.kernels.spec.UPDATE_RULES[cls.rule].hyper}
        fresh = cls(fg.MLP([5, 7, 3], seed=1, dtype="float64"), lr=opt.lr_schedule,
                    **values)
        fresh.step_count = opt.step_count
        want = fresh._kernel_args()[4].copy()
        if set(opt.state) - buffers and not cls._torch.counts_steps:
            want[HP_FIRST] = 1.0        # a new buffer's first update (SGD: torch's)
        np.testing.assert_array_equal(got, want, err_msg=f"{key}={value!r}")
