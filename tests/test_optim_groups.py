"""PyTorch habits on the optimizers (issue #17): ``maximize``, the settable
learning rate, PyTorch's implementation switches at their no-op values, and
parameter groups (several sets of hyper-parameters in the one fused update).

Parity is against ``torch.optim`` 2.13 in float64 on (param, grad) pairs of
odd shapes, with and without clipping (``clip_grad_norm_`` /
``clip_grad_value_`` before the step, as a PyTorch loop does).
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad.optim import SGD, Adam, AdamW, RMSprop

from conftest import OPTIMIZERS as CLASSES
from conftest import RULES, TORCH_OPTIMIZERS as TORCH_CLS

# every branch of every rule: (kind, hyper-parameters)
RULE_CONFIGS = [
    ("sgd", dict(lr=0.05)),
    ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2)),
    ("adam", dict(lr=1e-2, weight_decay=1e-2)),
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("rmsprop", dict(lr=1e-3, weight_decay=1e-2)),
    ("rmsprop", dict(lr=1e-3, momentum=0.9, centered=True)),
    ("rmsprop", dict(lr=1e-3, momentum=0.5)),
]
RULE_IDS = [f"{k}-{i}" for i, (k, _) in enumerate(RULE_CONFIGS)]
CLIPS = [(None, None), (1.0, None), (0.7, 0.05)]
SHAPES = [(5, 7), (7,), (7, 3), (3,)]
N_STEPS = 30


def _torch():
    return pytest.importorskip(
        "torch", reason="PyTorch parity test: torch is not installed (pip install 'fastgrad[peers]')")


def _grads(n, steps=N_STEPS, seed=3):
    """Gradients with spikes (x100 every 7th step) that trigger clipping."""
    rng = np.random.default_rng(seed)
    gs = rng.standard_normal((steps, n)) * 0.1
    gs[::7] *= 100.0
    return gs


class _Pair:
    """fastgrad on (param, grad) pairs and torch on copies, fed alike."""

    def __init__(self, kind, hyper, clip_norm, clip_value, seed=2, **extra):
        torch = _torch()
        rng = np.random.default_rng(seed)
        self.arrays = [rng.standard_normal(s) for s in SHAPES]
        self.tparams = [torch.nn.Parameter(torch.tensor(a)) for a in self.arrays]
        tcls = getattr(torch.optim, TORCH_CLS[kind])
        self.topt = tcls(self.tparams, foreach=False, **hyper, **extra)
        self.grads = [np.zeros(s) for s in SHAPES]
        self.opt = CLASSES[kind](list(zip(self.arrays, self.grads)), clip_norm=clip_norm,
                                 clip_value=clip_value, **hyper, **extra)
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.n = sum(a.size for a in self.arrays)

    def step(self, g):
        torch = _torch()
        off = 0
        for tp, ga in zip(self.tparams, self.grads):
            ga[...] = g[off:off + ga.size].reshape(ga.shape)
            tp.grad = torch.tensor(ga)
            off += ga.size
        total = torch.nn.utils.get_total_norm([tp.grad for tp in self.tparams])
        if self.clip_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(self.tparams, self.clip_norm, foreach=False)
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.tparams, self.clip_value, foreach=False)
        self.topt.step()
        stats = self.opt.step()
        assert stats.grad_norm == pytest.approx(float(total), rel=1e-12)
        self.check()
        return stats

    def check(self):
        for a, tp in zip(self.arrays, self.tparams):
            np.testing.assert_allclose(a, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


# -- maximize -------------------------------------------------------------------

@pytest.mark.parametrize("clip_norm,clip_value", CLIPS, ids=["noclip", "norm", "norm+value"])
@pytest.mark.parametrize("kind,hyper", RULE_CONFIGS, ids=RULE_IDS)
def test_maximize_matches_torch(kind, hyper, clip_norm, clip_value):
    pair = _Pair(kind, hyper, clip_norm, clip_value, maximize=True)
    assert pair.opt.maximize is True
    start = [a.copy() for a in pair.arrays]
    for g in _grads(pair.n):
        pair.step(g)
    assert any(not np.array_equal(a, s) for a, s in zip(pair.arrays, start))


def test_maximize_ascends_and_reports_the_gradient_as_given():
    """One SGD step up the gradient; norms and clipping are those of g."""
    p, g = np.zeros(3), np.array([3.0, 4.0, 0.0])
    opt = SGD([(p, g)], lr=0.5, clip_norm=1.0, maximize=True)
    stats = opt.step()
    assert stats.grad_norm == 5.0 and stats.clipped
    np.testing.assert_allclose(p, 0.5 * g / (5.0 + 1e-6), rtol=1e-15)


def test_maximize_is_settable_and_validated():
    torch = _torch()
    pair = _Pair("adam", dict(lr=1e-2), 1.0, None)
    gs = _grads(pair.n)
    for t, g in enumerate(gs):
        if t == 10:
            pair.opt.maximize = True
            pair.topt.param_groups[0]["maximize"] = True
        pair.step(g)
    with pytest.raises(TypeError, match="maximize must be True or False"):
        pair.opt.maximize = "yes"
    with pytest.raises(TypeError, match="maximize"):
        Adam([(np.zeros(2), np.zeros(2))], maximize=1)
    assert pair.opt.maximize is True and torch is not None


def test_maximize_in_a_train_step_matches_opt_step():
    """The compiled whole step (TrainStep) honours maximize as opt.step does."""
    rng = np.random.default_rng(5)
    loss_fn = fg.SoftmaxCrossEntropy()
    m1, m2 = (fg.MLP([5, 7, 3], activation="tanh", output_activation=None, dtype="float64",
                     seed=1) for _ in range(2))
    opt1 = fg.Adam(m1, lr=1e-2, clip_norm=0.5, maximize=True)
    opt2 = fg.Adam(m2, lr=1e-2, clip_norm=0.5, maximize=True)
    step = fg.TrainStep(m2, loss_fn, opt2)
    start = m1.params.copy()
    for _ in range(4):
        x = rng.standard_normal((9, 5))
        y = rng.integers(0, 3, 9)
        _, dy = loss_fn(m1.forward(x), y)
        m1.backward(dy, input_grad=False)
        opt1.step()
        step(x, y)
    np.testing.assert_allclose(m2.params, m1.params, rtol=1e-13, atol=1e-15)
    assert not np.array_equal(m1.params, start)


# -- the learning rate as a hyper-parameter ---------------------------------------

@pytest.mark.parametrize("kind,hyper", [RULE_CONFIGS[1], RULE_CONFIGS[4], RULE_CONFIGS[5],
                                        RULE_CONFIGS[8]], ids=["sgd", "adam", "adamw", "rmsprop"])
def test_lr_set_mid_run_matches_torch(kind, hyper):
    pair = _Pair(kind, hyper, 1.0, None)
    for t, g in enumerate(_grads(pair.n)):
        if t in (7, 19):
            new = hyper["lr"] * (0.3 if t == 7 else 2.5)
            pair.opt.lr = new
            pair.topt.param_groups[0]["lr"] = new
            assert pair.opt.lr == new
        stats = pair.step(g)
        assert stats.lr == pair.topt.param_groups[0]["lr"]


def test_lr_float_replaces_a_schedule():
    p, g = np.zeros(4), np.ones(4)
    opt = Adam([(p, g)], lr=fg.schedules.cosine_decay(1e-2, 10))
    opt.step()
    opt.step()
    assert opt.lr == pytest.approx(fg.schedules.cosine_decay(1e-2, 10)(2))
    opt.lr = 1e-4
    assert opt.lr_schedule == fg.schedules.constant(1e-4)
    assert opt.hyper["lr"] == fg.schedules.constant(1e-4).to_config()
    assert opt.step().lr == 1e-4 and opt.lr == 1e-4
    sched = fg.schedules.exponential_decay(1e-3, 0.5, 2)
    opt.lr = sched                      # a schedule is counted from update 0, as at construction
    assert opt.lr_schedule is sched and opt.lr == sched(opt.step_count)
    opt.lr_schedule = 0.25
    assert opt.lr == 0.25


@pytest.mark.parametrize("bad,exc,match", [
    (-1.0, ValueError, "lr must be a finite number >= 0"),
    (float("nan"), ValueError, "lr must be a finite number >= 0"),
    (float("inf"), ValueError, "lr must be a finite number >= 0"),
    ("0.1", TypeError, "lr must be a float or a fastgrad.schedules.Schedule"),
    (True, TypeError, "lr must be a float"),
    (None, TypeError, "lr must be a float"),
])
def test_lr_setter_validates_and_changes_nothing_when_refused(bad, exc, match):
    opt = SGD([(np.zeros(3), np.ones(3))], lr=0.1)
    with pytest.raises(exc, match=match):
        opt.lr = bad
    assert opt.lr == 0.1 and opt.lr_schedule == fg.schedules.constant(0.1)


def test_lr_set_is_saved_in_checkpoints(tmp_path):
    model = fg.MLP([4, 6, 3], dtype="float64", seed=2)
    opt = fg.AdamW(model, lr=fg.schedules.cosine_decay(1e-2, 10), maximize=True)
    opt.lr = 3e-4
    fg.save(tmp_path / "c.fgz", model, opt)
    _, opt2 = fg.load(tmp_path / "c.fgz")
    assert opt2.lr == 3e-4 and opt2.maximize is True
    sd = opt.state_dict()
    opt3 = fg.AdamW(fg.MLP([4, 6, 3], dtype="float64", seed=2))
    opt3.load_state_dict(sd)
    assert opt3.lr == 3e-4 and opt3.maximize is True


def test_checkpoints_from_before_maximize_still_load(tmp_path):
    """Files and state dicts written before maximize existed have no such
    field: they load, as ascending=False."""
    import json
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    model = fg.MLP([4, 6, 3], dtype="float32", seed=2)
    opt = fg.Adam(model, lr=fg.schedules.cosine_decay(1e-2, 10), amsgrad=True)
    opt.step_count = 3
    path = tmp_path / "new.fgz"
    fg.save(path, model, opt)
    with safe_open(str(path), "np") as f:
        doc = json.loads(f.metadata()["fastgrad"])
    del doc["optimizer"]["hyper"]["maximize"]
    old = tmp_path / "old.fgz"
    save_file(load_file(str(path)), str(old), metadata={"fastgrad": json.dumps(doc)})
    m2, opt2 = fg.load(old)
    assert opt2.maximize is False and opt2.step_count == 3 and opt2.amsgrad
    np.testing.assert_array_equal(m2.params, model.params)

    opt.maximize = True
    sd = opt.state_dict()
    del sd["hyper"]["maximize"]
    opt.load_state_dict(sd)
    assert opt.maximize is False


# -- PyTorch's implementation switches ------------------------------------------

NOOP_FLAGS = [("foreach", None), ("foreach", False), ("fused", None), ("fused", False),
              ("capturable", False), ("differentiable", False)]
REFUSED_FLAGS = [("foreach", True, "foreach=True: fastgrad's update is always one fused kernel"),
                 ("fused", True, "fused=True: fastgrad's update is always fused; pass fused=None"),
                 ("capturable", True, "capturable=True"),
                 ("differentiable", True, "differentiable=True"),
                 ("fused", "yes", "fused='yes'"),
                 ("foreach", 0, "foreach=0"),
                 ("capturable", None, "capturable=None")]


@pytest.mark.parametrize("kind", sorted(CLASSES))
def test_torch_noop_flags_are_accepted_and_change_nothing(kind):
    g = np.random.default_rng(4).standard_normal(7)
    p0 = np.random.default_rng(5).standard_normal(7)
    pa, pb = p0.copy(), p0.copy()
    plain = CLASSES[kind]([(pa, g)], lr=1e-2)
    flags = {}
    for name, value in NOOP_FLAGS:
        flags[name] = value
        CLASSES[kind]([(np.zeros(2), np.zeros(2))], **{name: value})
    spelled = CLASSES[kind]([(pb, g)], lr=1e-2, maximize=False, **flags)
    for _ in range(3):
        plain.step()
        spelled.step()
    np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("kind", sorted(CLASSES))
@pytest.mark.parametrize("name,value,match", REFUSED_FLAGS)
def test_torch_flags_other_values_are_refused(kind, name, value, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        CLASSES[kind]([(np.zeros(2), np.zeros(2))], **{name: value})


def test_torch_spelled_constructor_runs_unchanged():
    """A PyTorch line with every default spelled out works as is."""
    p = np.zeros(3)
    fg.Adam([(p, np.ones(3))], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
            amsgrad=False, foreach=None, maximize=False, capturable=False,
            differentiable=False, fused=None).step()
    fg.SGD([(p, np.ones(3))], lr=1e-3, momentum=0, dampening=0, weight_decay=0,
           nesterov=False, maximize=False, foreach=None, differentiable=False,
           fused=None).step()
    fg.RMSprop([(p, np.ones(3))], lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
               centered=False, capturable=False, foreach=None, maximize=False,
               differentiable=False).step()
    fg.AdamW([(p, np.ones(3))], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
             amsgrad=False, maximize=False, foreach=None, capturable=False,
             differentiable=False, fused=None).step()


# -- CUDA (real GPU or the host emulator) ---------------------------------------

class _Flat:
    def __init__(self, params, grads, offsets):
        self.params, self.grads, self.layer_offsets = params, grads, offsets


@pytest.mark.cuda
@pytest.mark.parametrize("kind,hyper", RULE_CONFIGS, ids=RULE_IDS)
def test_cuda_maximize_and_lr_setter_match_cpu(cp, kind, hyper):
    rng = np.random.default_rng(8)
    offsets = np.array([0, 30, 37, 100], np.int64)
    p = rng.standard_normal(offsets[-1])
    cpu = _Flat(p.copy(), np.zeros_like(p), offsets)
    gpu = _Flat(cp.asarray(p), cp.zeros(p.size, np.float64), offsets)
    o_cpu = CLASSES[kind](cpu, clip_norm=1.0, maximize=True, fused=None, **hyper)
    o_gpu = CLASSES[kind](gpu, clip_norm=1.0, maximize=True, fused=None, **hyper)
    for t, g in enumerate(_grads(p.size, steps=12)):
        if t == 5:
            o_cpu.lr = o_gpu.lr = hyper["lr"] * 0.5
        if t == 9:
            o_cpu.maximize = o_gpu.maximize = False
        cpu.grads[:] = g
        gpu.grads[...] = cp.asarray(g)
        s_cpu, s_gpu = o_cpu.step(), o_gpu.step()
        assert s_gpu.lr == s_cpu.lr
    np.testing.assert_allclose(cp.asnumpy(gpu.params), cpu.params, rtol=1e-12, atol=1e-14)
    assert o_gpu.step_count == 12 and o_gpu.lr == hyper["lr"] * 0.5
    if kind != "sgd":           # torch's structure from and into a CUDA optimizer
        pytest.importorskip("torch")
        sd_gpu, sd_cpu = o_gpu.state_dict(format="torch"), o_cpu.state_dict(format="torch")
        assert sd_gpu["param_groups"] == sd_cpu["param_groups"]
        for i, entry in sd_cpu["state"].items():
            for name, t in entry.items():
                np.testing.assert_allclose(sd_gpu["state"][i][name].numpy(), t.numpy(),
                                           rtol=1e-12, atol=1e-14)
        o_back = CLASSES[kind](_Flat(cp.asarray(p), cp.zeros(p.size, np.float64), offsets))
        o_back.load_state_dict(sd_gpu)
        assert o_back.step_count == 12
        for name in o_gpu.state:
            np.testing.assert_array_equal(cp.asnumpy(o_back.state[name]),
                                          cp.asnumpy(o_gpu.state[name]))


# -- state dicts in torch's structure ---------------------------------------------

TORCH_SD_CONFIGS = [
    ("adam", dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2, amsgrad=True)),
    ("adamw", dict(lr=1e-2, weight_decay=0.1)),
    ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("rmsprop", dict(lr=1e-3, momentum=0.5, centered=True)),
]
MODELS = {
    "plain": dict(sizes=[5, 7, 4, 3]),
    "layernorm+wnorm": dict(sizes=[5, 7, 4, 3], norm="layer", weight_norm=True),
    "residual+batchnorm": dict(sizes=[5, 6, 6, 3], residual=True, norm="batch"),
}


def _torch_grads(opt, flat):
    """The flat gradient as the list of torch tensors, in torch's order."""
    torch = _torch()
    return [torch.from_numpy(opt._tensor_of(flat, *entry)) for entry in opt._torch_layout]


def _run(opt, model, tparams, topts, gs):
    for g in gs:
        model.grads[:] = g
        opt.step()
        for tps, topt in zip(tparams, topts):
            for tp, tg in zip(tps, _torch_grads(opt, g)):
                tp.grad = tg.clone()
            topt.step()


@pytest.mark.parametrize("model_kw", list(MODELS.values()), ids=list(MODELS))
@pytest.mark.parametrize("kind,hyper", TORCH_SD_CONFIGS, ids=[k for k, _ in TORCH_SD_CONFIGS])
def test_torch_state_dict_round_trip(kind, hyper, model_kw):
    import copy
    torch = _torch()
    tcls = getattr(torch.optim, TORCH_CLS[kind])
    kw = dict(model_kw)
    model = fg.MLP(kw.pop("sizes"), dtype="float64", seed=3, activation="tanh", **kw)
    tmodel = model.to_torch()
    tparams = list(tmodel.parameters())
    opt = CLASSES[kind](model, **hyper)
    assert len(opt._torch_layout) == len(tparams)
    topt = tcls(tparams, foreach=False, **hyper)
    rng = np.random.default_rng(11)
    _run(opt, model, [tparams], [topt], rng.standard_normal((5, model.params.size)))
    for tp, a in zip(tparams, _torch_grads(opt, model.params)):
        np.testing.assert_allclose(a.numpy(), tp.detach().numpy(), rtol=1e-12, atol=1e-13)

    # torch -> fastgrad: a fresh optimizer with other settings takes torch's state
    model2 = fg.MLP(model_kw["sizes"], dtype="float64", seed=3, activation="tanh", **kw)
    model2.params[:] = model.params
    opt2 = CLASSES[kind](model2, lr=0.5)
    opt2.load_state_dict(topt.state_dict())
    assert opt2.step_count == (1 if kind == "sgd" else 5)
    assert opt2.lr == hyper["lr"] and set(opt2.state) == set(opt.state)
    tstate = topt.state_dict()["state"]
    for name in opt.state:
        np.testing.assert_allclose(opt2.state[name], opt.state[name], rtol=1e-12, atol=1e-14)
        for i, entry in enumerate(opt2._torch_layout):      # torch's values, bitwise
            np.testing.assert_array_equal(opt2._tensor_of(opt2.state[name], *entry),
                                          tstate[i][name].numpy())
    for name, value in hyper.items():
        assert getattr(opt2, name) == value

    # fastgrad -> torch: a fresh torch optimizer takes fastgrad's state
    tmodel3 = copy.deepcopy(tmodel)
    tparams3 = list(tmodel3.parameters())
    topt3 = tcls(tparams3, lr=0.5)
    sd = opt.state_dict(format="torch")
    assert sorted(sd["param_groups"][0]) == sorted(topt.state_dict()["param_groups"][0])
    topt3.load_state_dict(sd)
    assert topt3.param_groups[0]["lr"] == hyper["lr"]
    for i, entry in sd["state"].items():
        for name, t in entry.items():
            assert torch.equal(topt3.state_dict()["state"][i][name], t)

    # all four continue alike (the SGD step counts differ but the rule only
    # needs "momentum buffer set")
    _run(opt2, model2, [tparams, tparams3], [topt, topt3],
         rng.standard_normal((4, model.params.size)))
    for tp, tp3, a in zip(tparams, tparams3, _torch_grads(opt2, model2.params)):
        np.testing.assert_allclose(a.numpy(), tp.detach().numpy(), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(tp3.detach().numpy(), tp.detach().numpy(), rtol=1e-12,
                                   atol=1e-13)


def test_torch_state_dict_before_any_step_and_on_pairs():
    torch = _torch()
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s) for s in SHAPES]
    grads = [np.zeros(s) for s in SHAPES]
    opt = Adam(list(zip(arrays, grads)), lr=1e-3)
    sd = opt.state_dict(format="torch")
    assert sd["state"] == {} and sd["param_groups"][0]["params"] == [0, 1, 2, 3]
    tparams = [torch.nn.Parameter(torch.tensor(a)) for a in arrays]
    topt = torch.optim.Adam(tparams)
    topt.load_state_dict(sd)
    assert topt.state_dict() == sd | {"state": {}}
    opt.load_state_dict(topt.state_dict())
    assert opt.step_count == 0 and not np.any(opt.state["exp_avg"])


def test_torch_state_dict_refusals():
    import copy
    torch = _torch()
    model = fg.MLP([4, 5, 3], dtype="float64", seed=0)
    tparams = list(model.to_torch().parameters())
    opt = fg.Adam(model)
    with pytest.raises(ValueError, match="one parameter group, got 2"):
        opt.load_state_dict(torch.optim.Adam([{"params": tparams[:2]},
                                              {"params": tparams[2:]}]).state_dict())
    with pytest.raises(ValueError, match="the group has 3 parameters, this optimizer 4"):
        opt.load_state_dict(torch.optim.Adam(tparams[:3]).state_dict())
    with pytest.raises(ValueError, match="is for AdamW, not Adam"):
        opt.load_state_dict(torch.optim.AdamW(tparams).state_dict())
    sd = torch.optim.Adam(tparams, fused=None).state_dict()
    sd["param_groups"][0]["fused"] = True
    with pytest.raises(ValueError, match="fused=True"):
        opt.load_state_dict(sd)
    topt = torch.optim.Adam(tparams, lr=0.1)
    for tp in tparams:
        tp.grad = torch.ones_like(tp)
    topt.step()
    sd = copy.deepcopy(topt.state_dict())       # torch's dict shares its entries
    sd["state"][1]["exp_avg"] = torch.zeros(7)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"state\[1\]\['exp_avg'\] has shape \(7,\), expected \(5,\)"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(topt.state_dict())       # torch's dict shares its entries
    sd["state"][2]["step"] = torch.tensor(4.0)
    with pytest.raises(ValueError, match="different steps"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(topt.state_dict())       # torch's dict shares its entries
    sd["param_groups"][0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="beta2 must be in"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["hyper"] == before["hyper"] and after["step"] == before["step"] == 0
    with pytest.raises(ValueError, match='format must be "fastgrad" or "torch"'):
        opt.state_dict(format="pt")


# -- param_groups (one group) -----------------------------------------------------

def test_param_groups_manual_decay_matches_torch():
    """torch's ``for g in opt.param_groups: g["lr"] *= gamma`` loop, and a
    weight-decay write through the group, step by step."""
    pair = _Pair("adamw", dict(lr=1e-2, weight_decay=0.1), 1.0, None)
    for t, g in enumerate(_grads(pair.n)):
        if t % 5 == 4:
            for group, tgroup in zip(pair.opt.param_groups, pair.topt.param_groups):
                group["lr"] *= 0.7
                tgroup["lr"] *= 0.7
        if t == 12:
            pair.opt.param_groups[0]["weight_decay"] = 0.0
            pair.topt.param_groups[0]["weight_decay"] = 0.0
            pair.opt.param_groups[0]["betas"] = (0.5, 0.9)
            pair.topt.param_groups[0]["betas"] = (0.5, 0.9)
        pair.step(g)
        assert pair.opt.param_groups[0]["lr"] == pair.topt.param_groups[0]["lr"]
    assert pair.opt.weight_decay == 0.0 and pair.opt.betas == (0.5, 0.9)


def test_param_groups_view_and_refusals():
    p, g = np.zeros(3), np.ones(3)
    opt = SGD([(p, g)], lr=0.1, momentum=0.9)
    (group,) = opt.param_groups
    assert dict((k, v) for k, v in group.items() if k != "params") == {
        "lr": 0.1, "momentum": 0.9, "dampening": 0.0, "nesterov": False,
        "weight_decay": 0.0, "maximize": False}
    assert group["params"][0] is p
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        group["lr"] = -0.1
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        group["dampening"] = 0.5
        group["nesterov"] = True
    assert opt.lr == 0.1 and opt.nesterov is False
    with pytest.raises(KeyError, match="read-only"):
        group["params"] = []
    with pytest.raises(KeyError, match="'betas' cannot be set"):
        group["betas"] = (0.9, 0.99)
    with pytest.raises(TypeError, match="cannot lose keys"):
        del group["lr"]


def test_param_groups_params_of_a_model():
    model = fg.MLP([4, 5, 3], dtype="float64", seed=0)
    params = fg.Adam(model).param_groups[0]["params"]
    assert [a.shape for a in params] == [a.shape for a in model.parameters()]
    assert all(np.shares_memory(a, model.params) for a in params)


# -- several parameter groups in the one fused update --------------------------
#
# fastgrad on (param, grad) pairs spelled as torch's list of group dicts, and
# torch on copies with the same groups; the groups interleave in the flat
# buffer (group 0 owns pairs 0 and 2, group 1 pairs 1 and 3), so each group
# owns non-adjacent segments.

GROUP_OF = [0, 1, 0, 1]
GROUP_CONFIGS = [
    ("adam", dict(lr=1e-2), [dict(lr=2e-2, betas=(0.8, 0.99)), dict(weight_decay=1e-2)]),
    ("adamw", dict(lr=1e-2), [dict(weight_decay=0.1), dict(weight_decay=0.0)]),
    ("adamw", dict(lr=1e-2, amsgrad=True), [dict(weight_decay=0.1), dict(amsgrad=False)]),
    ("sgd", dict(lr=0.05, momentum=0.9), [dict(nesterov=True), dict(lr=0.01, dampening=0.1)]),
    ("sgd", dict(lr=0.05), [dict(momentum=0.9), dict(lr=0.02)]),
    ("rmsprop", dict(lr=1e-3, centered=True), [dict(momentum=0.9), dict(lr=3e-3, alpha=0.9)]),
    ("rmsprop", dict(lr=1e-3), [dict(centered=True, weight_decay=1e-2), dict(maximize=True)]),
]
GROUP_IDS = [f"{k}-{i}" for i, (k, _, _) in enumerate(GROUP_CONFIGS)]


def test_configs_cover_every_rule():
    # a new rule in kernels/spec.py must bring its configurations here
    for configs in (RULE_CONFIGS, TORCH_SD_CONFIGS, GROUP_CONFIGS):
        assert {c[0] for c in configs} == set(RULES)


class _Groups(_Pair):
    """:class:`_Pair` with two interleaved parameter groups on both sides."""

    def __init__(self, kind, hyper, groups, clip_norm, clip_value, seed=2, fg_groups=None):
        torch = _torch()
        rng = np.random.default_rng(seed)
        self.arrays = [rng.standard_normal(s) for s in SHAPES]
        self.tparams = [torch.nn.Parameter(torch.tensor(a)) for a in self.arrays]
        self.grads = [np.zeros(s) for s in SHAPES]
        tcls = getattr(torch.optim, TORCH_CLS[kind])
        members = [[i for i, g in enumerate(GROUP_OF) if g == gi] for gi in range(2)]
        thyper = {k: v for k, v in hyper.items()       # a test sets torch's scheduler
                  if not isinstance(v, fg.schedules.Schedule)}
        self.topt = tcls([dict(params=[self.tparams[i] for i in m], **h)
                          for m, h in zip(members, groups)], foreach=False, **thyper)
        fg_groups = fg_groups or groups
        self.opt = CLASSES[kind](
            [dict(params=[(self.arrays[i], self.grads[i]) for i in m], **h)
             for m, h in zip(members, fg_groups)],
            clip_norm=clip_norm, clip_value=clip_value, **hyper)
        # both sides list the pairs group by group
        order = members[0] + members[1]
        self.arrays = [self.arrays[i] for i in order]
        self.grads = [self.grads[i] for i in order]
        self.tparams = [self.tparams[i] for i in order]
        self.clip_norm, self.clip_value = clip_norm, clip_value
        self.n = sum(a.size for a in self.arrays)


@pytest.mark.parametrize("clip_norm,clip_value", CLIPS, ids=["noclip", "norm", "norm+value"])
@pytest.mark.parametrize("kind,hyper,groups", GROUP_CONFIGS, ids=GROUP_IDS)
def test_param_groups_match_torch(kind, hyper, groups, clip_norm, clip_value):
    """Per-group hyper-parameters, clipping over all groups, 30 steps."""
    pair = _Groups(kind, hyper, groups, clip_norm, clip_value)
    assert len(pair.opt.param_groups) == 2 and pair.opt._hp.ndim == 2
    start = [a.copy() for a in pair.arrays]
    for g in _grads(pair.n):
        stats = pair.step(g)
        assert stats.lr == pair.topt.param_groups[0]["lr"]
    for group, tgroup in zip(pair.opt.param_groups, pair.topt.param_groups):
        for key, value in group.items():
            if key != "params":
                assert value == (tuple(tgroup[key]) if key == "betas" else tgroup[key]), key
    assert all(not np.array_equal(a, s) for a, s in zip(pair.arrays, start))


def _resume_alongside(pair, fresh, fg_state, torch_state, steps):
    """``fresh`` takes ``pair``'s parameters and the optimizer states given
    (fastgrad's, torch's), then both run ``steps``: ``fresh`` checks its two
    sides against each other, and ends where ``pair`` does."""
    for a, b, ta, tb in zip(fresh.arrays, pair.arrays, fresh.tparams, pair.tparams):
        a[...] = b
        ta.data.copy_(tb.data)
    fresh.opt.load_state_dict(fg_state)
    fresh.topt.load_state_dict(torch_state)
    for g in steps:
        pair.step(g)
        fresh.step(g)
    for a, b in zip(fresh.arrays, pair.arrays):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,hyper,groups", [GROUP_CONFIGS[i] for i in (2, 4, 5, 6)],
                         ids=[GROUP_IDS[i] for i in (2, 4, 5, 6)])
def test_torch_state_dicts_of_groups_with_their_own_buffers_both_ways(kind, hyper, groups):
    # torch keeps a buffer (amsgrad's max, SGD's and RMSprop's momentum,
    # centered's average) for the groups that use it alone: such a dict was
    # refused ("kept for 1 of 2 parameters"); fastgrad's export wrote zero
    # buffers where torch has none, which torch then stepped on
    pair = _Groups(kind, hyper, groups, None, None)
    steps = _grads(pair.n)
    for g in steps[:5]:
        pair.step(g)
    # torch -> fastgrad and fastgrad -> torch
    _resume_alongside(pair, _Groups(kind, hyper, groups, None, None), pair.topt.state_dict(),
                      pair.opt.state_dict(format="torch"), steps[5:])


def test_sgd_torch_export_before_a_new_momentum_buffer_starts():
    # momentum switched on mid-run: no buffer yet (torch's next step sets it
    # to the gradient); a zero buffer made it a momentum step on 0
    pair = _Pair("sgd", dict(lr=0.05, dampening=0.5), None, None)
    steps = _grads(pair.n)
    for g in steps[:5]:
        pair.step(g)
    pair.opt.momentum = 0.9
    for group in pair.topt.param_groups:
        group["momentum"] = 0.9
    sd = pair.opt.state_dict(format="torch")
    assert all(v["momentum_buffer"] is None for v in sd["state"].values())
    _resume_alongside(pair, _Pair("sgd", dict(lr=0.05, dampening=0.5, momentum=0.9), None, None),
                      sd, sd, steps[5:])


def test_param_groups_kernel_matches_the_reference_per_segment():
    """The segment rows of the kernel against ``fastgrad.reference``: each
    segment gets its group's rule values, the clip scale is global."""
    from fastgrad import reference as ref
    from fastgrad.kernels.cpu import optim as K
    rng = np.random.default_rng(11)
    n = 1001
    ends = [3, 130, 131, 600, 1001]
    group = [0, 1, 0, 2, 1]
    lrs, wds = [1e-2, 3e-3, 0.1], [0.1, 0.0, 1e-2]
    p = rng.standard_normal(n)
    g = rng.standard_normal(n) * 3
    m, v = np.zeros(n), np.zeros(n)
    hp = np.zeros((len(ends), K.HP_SIZE))
    for s, (end, gi) in enumerate(zip(ends, group)):
        hp[s, [K.HP_LR, K.HP_WEIGHT_DECAY, K.HP_BETA1, K.HP_BETA2, K.HP_EPS, K.HP_BIAS_CORR1,
               K.HP_BIAS_CORR2, K.HP_END]] = [lrs[gi], wds[gi], 0.9, 0.999, 1e-8, 0.1,
                                             0.001, end]
    offsets = np.array([0, 500, n], np.int64)
    layer_sq = np.zeros(2)
    want_g, norm = ref.clip_grad(g, clip_norm=1.0)
    want = p.copy()
    lo = 0
    for end, gi in zip(ends, group):
        want[lo:end] = ref.optimizer_step("adamw", p[lo:end], want_g[lo:end], {}, 1, lrs[gi],
                                          weight_decay=wds[gi])
        lo = end
    got_norm, scale, skipped = K.clipped_update(K.ADAMW, p, g, m, v, p[:0], hp, offsets,
                                                layer_sq, 1.0, 0.0)
    assert not skipped and got_norm == pytest.approx(norm, rel=1e-14)
    np.testing.assert_allclose(p, want, rtol=1e-13, atol=1e-15)


def _adamw_recipe(model, **kw):
    return fg.AdamW(model, lr=1e-2, param_groups=[
        {"params": model.weights(), "weight_decay": 0.1},
        {"params": model.biases_and_norms(), "weight_decay": 0.0}], **kw)


def _torch_groups_of(model, tmodel):
    """torch's parameters of ``model.to_torch()`` split as weights() and
    biases_and_norms() split fastgrad's: a Linear's weight (for weight norm
    its direction ``original1``) against everything else."""
    torch = _torch()
    linear = {id(m.parametrizations.weight.original1 if hasattr(m, "parametrizations")
                 else m.weight) for m in tmodel.modules() if isinstance(m, torch.nn.Linear)}
    weights = [p for p in tmodel.parameters() if id(p) in linear]
    rest = [p for p in tmodel.parameters() if id(p) not in linear]
    assert len(weights) == len(model.weights())
    return weights, rest


@pytest.mark.parametrize("clip_norm", [None, 0.5])
def test_adamw_no_decay_on_biases_recipe_matches_torch(clip_norm):
    """The common AdamW recipe on a model (weights decayed, biases and
    layer-norm gains not), real forward/backward on both sides."""
    torch = _torch()
    model = fg.Sequential([fg.Dense(6, 9, activation="tanh", norm="layer"),
                           fg.Dense(9, 9, activation="tanh"),
                           fg.Dense(9, 4, activation=None)], dtype="float64", seed=3)
    tmodel = model.to_torch().double()
    opt = _adamw_recipe(model, clip_norm=clip_norm)
    tw, trest = _torch_groups_of(model, tmodel)
    topt = torch.optim.AdamW([{"params": tw, "weight_decay": 0.1},
                              {"params": trest, "weight_decay": 0.0}], lr=1e-2, foreach=False)
    assert [a.shape for a in model.weights()] == [(6, 9), (9, 9), (9, 4)]
    assert len(model.biases_and_norms()) == 5
    loss_fn = fg.SoftmaxCrossEntropy()
    rng = np.random.default_rng(4)
    for _ in range(25):
        x, y = rng.standard_normal((7, 6)) * 3, rng.integers(0, 4, 7)
        _, dy = loss_fn(model.forward(x), y)
        model.backward(dy, input_grad=False)
        stats = opt.step()
        topt.zero_grad()
        tl = torch.nn.functional.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y))
        tl.backward()
        if clip_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(tmodel.parameters(), clip_norm, foreach=False)
            assert stats.grad_norm == pytest.approx(float(total), rel=1e-10)
        topt.step()
    for a, (name, t) in zip(model.parameters(), tmodel.named_parameters()):
        t = t.detach().numpy()
        np.testing.assert_allclose(a, t.T if a.ndim == 2 else t, rtol=1e-11, atol=1e-12,
                                   err_msg=name)


@pytest.mark.parametrize("which", ["step_decay", "one_cycle"])
def test_param_groups_with_a_torch_scheduler(which):
    """A fastgrad schedule scales each group's initial lr, as torch's
    StepLR / OneCycleLR do per group; a group may also carry its own."""
    torch = _torch()
    from fastgrad import schedules
    n = 30
    if which == "step_decay":
        sched = schedules.step_decay(1e-2, 4, 0.5)
        groups = [dict(lr=1e-2), dict(lr=3e-3)]        # initial lrs, as torch's
        fg_groups = [dict(), dict(lr=3e-3)]             # group 0 follows the schedule
    else:
        sched = schedules.one_cycle(1e-2, n, anneal_strategy="linear")
        groups = [dict(), dict()]
        # group 1 peaks at 4e-3: its initial lr 4e-3 / 25 scales the schedule,
        # or it carries its own one_cycle (both are torch's max_lr=[.., 4e-3])
        fg_groups = [dict(), dict(lr=schedules.one_cycle(4e-3, n, anneal_strategy="linear"))]
    pair = _Groups("adam", dict(lr=sched), groups, 1.0, None, fg_groups=fg_groups)
    if which == "step_decay":
        pair.topt = torch.optim.Adam(
            [dict(params=pair.tparams[:2], lr=1e-2), dict(params=pair.tparams[2:], lr=3e-3)],
            foreach=False)
        tsched = torch.optim.lr_scheduler.StepLR(pair.topt, 4, 0.5)
    else:
        pair.topt = torch.optim.Adam([dict(params=pair.tparams[:2]),
                                      dict(params=pair.tparams[2:])], foreach=False)
        tsched = torch.optim.lr_scheduler.OneCycleLR(
            pair.topt, max_lr=[1e-2, 4e-3], total_steps=n, anneal_strategy="linear",
            cycle_momentum=False)
    for g in _grads(pair.n, steps=n):
        for group, tgroup in zip(pair.opt.param_groups, pair.topt.param_groups):
            assert group["lr"] == pytest.approx(tgroup["lr"], rel=1e-13)
        pair.step(g)
        tsched.step()


def _torch_group_lrs(torch, group_lrs, make_sched, n, metrics=None):
    """The lr of each group at updates 0 .. n-1 under a torch scheduler."""
    ps = [torch.nn.Parameter(torch.zeros(2)) for _ in group_lrs]
    topt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(ps, group_lrs)],
                           lr=group_lrs[0])
    sched = make_sched(topt)
    out = []
    for k in range(n):
        out.append([g["lr"] for g in topt.param_groups])
        topt.step()
        sched.step(*(() if metrics is None else (metrics[k],)))
    return np.array(out)


def _fg_group_lrs(group_lrs, schedule, n, metrics=None):
    opt = fg.SGD([{"params": [(np.zeros(2), np.zeros(2))], "lr": lr} for lr in group_lrs],
                 lr=schedule)
    out = []
    for k in range(n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if metrics is not None:
            schedule.step(metrics[k])
    return np.array(out)


@pytest.mark.parametrize("which", ["one_cycle", "cosine_annealing", "plateau", "exponential"])
def test_groups_with_their_own_lr_under_a_schedule_match_torch(which):
    """Groups that give a float lr under a schedule get torch's rates: a
    schedule scales each group's initial lr, but what torch's scheduler holds
    fixed stays fixed (cosine annealing's eta_min, plateau's min_lr), and
    OneCycleLR gives every group its cycle whatever the group's lr (a
    scaling made this group peak at 25x max_lr)."""
    torch = _torch()
    L, S = torch.optim.lr_scheduler, fg.schedules
    rng = np.random.default_rng()
    n = 24 + int(rng.integers(0, 9))
    # the last below plateau's min_lr: torch never raises a rate to it
    group_lrs = [0.1, float(rng.uniform(0.005, 0.05)), float(rng.uniform(0.001, 0.004)), 0.0015]
    metrics = None
    if which == "one_cycle":
        ours = S.OneCycleLR(0.1, total_steps=n)
        theirs = lambda o: L.OneCycleLR(o, 0.1, total_steps=n, cycle_momentum=False)  # noqa: E731
    elif which == "cosine_annealing":
        ours = S.CosineAnnealingLR(0.1, T_max=n // 2, eta_min=0.004)
        theirs = lambda o: L.CosineAnnealingLR(o, T_max=n // 2, eta_min=0.004)  # noqa: E731
    elif which == "plateau":
        metrics = [1.0] * n
        ours = S.ReduceLROnPlateau(0.1, patience=1, factor=0.5, min_lr=0.002)
        theirs = lambda o: L.ReduceLROnPlateau(o, patience=1, factor=0.5, min_lr=0.002)  # noqa
    else:
        ours = S.exponential_decay(0.1, 0.9, 1)
        theirs = lambda o: L.ExponentialLR(o, 0.9)  # noqa: E731
    expected = _torch_group_lrs(torch, group_lrs, theirs, n, metrics)
    got = _fg_group_lrs(group_lrs, ours, n, metrics)
    # torch's CosineAnnealingLR steps by a recursion: agreement to ~1e-12
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-15)
    if which == "one_cycle":
        assert got.max() <= 0.1 * (1 + 1e-12)


def test_param_groups_follow_a_plateau_schedule_together():
    """ReduceLROnPlateau (driven through opt.lr_schedule, as fit's callback
    does) reduces every group that follows the optimizer's schedule, as
    torch's reduces every group; a group with its own schedule keeps it."""
    torch = _torch()
    sched = fg.schedules.reduce_on_plateau(1e-2, patience=0, factor=0.5)
    pairs = [(np.zeros(n), np.zeros(n)) for n in (2, 3, 4)]
    opt = Adam([{"params": [pairs[0]]}, {"params": [pairs[1]], "lr": 1e-3},
                {"params": [pairs[2]], "lr": fg.schedules.constant(0.1)}], lr=sched)
    tps = [torch.nn.Parameter(torch.zeros(n)) for n in (2, 3, 4)]
    topt = torch.optim.Adam([{"params": [tps[0]]}, {"params": [tps[1]], "lr": 1e-3}], lr=1e-2)
    tsched = torch.optim.lr_scheduler.ReduceLROnPlateau(topt, patience=0, factor=0.5)
    for metric in (1.0, 2.0, 3.0, 0.5, 0.7):
        opt.lr_schedule.step(metric)
        tsched.step(metric)
        got = [g["lr"] for g in opt.param_groups]
        assert got[:2] == pytest.approx([g["lr"] for g in topt.param_groups], rel=1e-15)
        assert got[2] == 0.1
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * 0.5 ** 3, rel=1e-15)


def test_param_groups_lr_written_mid_run_matches_torch():
    pair = _Groups("sgd", dict(lr=0.05, momentum=0.9), [dict(), dict(lr=0.01)], 1.0, None)
    for t, g in enumerate(_grads(pair.n)):
        if t == 6:
            for group, tgroup in zip(pair.opt.param_groups, pair.topt.param_groups):
                group["lr"] *= 0.5
                tgroup["lr"] *= 0.5
        if t == 13:
            pair.opt.param_groups[1]["momentum"] = 0.5
            pair.topt.param_groups[1]["momentum"] = 0.5
            pair.opt.param_groups[0]["nesterov"] = True
            pair.topt.param_groups[0]["nesterov"] = True
        pair.step(g)
    assert pair.opt.param_groups[1]["lr"] == pytest.approx(0.005, rel=1e-15)
    assert pair.opt.lr == pair.opt.param_groups[0]["lr"] == pytest.approx(0.025, rel=1e-15)
    # opt.lr and opt.<name> set every group
    pair.opt.lr = 0.1
    pair.opt.momentum = 0.8
    assert [(g["lr"], g["momentum"]) for g in pair.opt.param_groups] == [(0.1, 0.8)] * 2


@pytest.mark.parametrize("where", ["optimizer", "one group", "a second group", "off and on"])
def test_sgd_momentum_turned_on_mid_run_matches_torch(where):
    """torch makes a tensor's momentum buffer at the first update that uses
    it, as the gradient itself (undampened); fastgrad's buffer made when
    momentum is turned on mid-run starts the same way (it started at zero
    and took the dampened gradient: 0.13-0.35 off torch within 3 updates)."""
    rng = np.random.default_rng()
    damp = float(rng.uniform(0.2, 0.7))
    if where == "one group":
        pair = _Groups("sgd", dict(lr=0.05, dampening=damp), [dict(), dict()], 1.0, None)
    elif where == "a second group":         # the buffer exists: group 0 uses it throughout
        pair = _Groups("sgd", dict(lr=0.05, dampening=damp), [dict(momentum=0.8), dict()],
                       1.0, None)
    else:
        pair = _Pair("sgd", dict(lr=0.05, dampening=damp), 1.0, None)
    on_at = int(rng.integers(2, 6))
    for t, g in enumerate(_grads(pair.n, steps=16)):
        if t == on_at:
            if where in ("one group", "a second group"):
                pair.opt.param_groups[1]["momentum"] = 0.9
                pair.topt.param_groups[1]["momentum"] = 0.9
            else:
                pair.opt.momentum = 0.9
                pair.topt.param_groups[0]["momentum"] = 0.9
        if where == "off and on" and t == on_at + 4:
            # off: fastgrad drops the buffer, torch keeps it but stops using it;
            # both give plain SGD, and each starts a fresh buffer when back on
            pair.opt.momentum = 0.0
            pair.topt.param_groups[0]["momentum"] = 0.0
            pair.topt.state.clear()
        if where == "off and on" and t == on_at + 7:
            pair.opt.momentum = 0.5
            pair.topt.param_groups[0]["momentum"] = 0.5
        pair.step(g)            # checks the parameters against torch's


def test_param_groups_by_name_and_by_view_are_the_same():
    model = fg.MLP([4, 6, 3], dtype="float64", seed=0)
    names = [n for n, _ in model.named_parameters()]
    by_view = _adamw_recipe(model)
    by_name = fg.AdamW(model, lr=1e-2, param_groups=[
        {"params": [n for n in names if n.endswith(".W")], "weight_decay": 0.1},
        {"params": [n for n in names if n.endswith(".b")], "weight_decay": 0.0}])
    torch_spelling = fg.AdamW([{"params": model.weights(), "weight_decay": 0.1},
                               {"params": model.biases_and_norms(), "weight_decay": 0.0}],
                              lr=1e-2)
    for opt in (by_name, torch_spelling):
        assert opt.params is model.params
        assert [g.ranges for g in opt._groups] == [g.ranges for g in by_view._groups]
        np.testing.assert_array_equal(opt._kernel_args()[4], by_view._kernel_args()[4])
    got = by_view.param_groups[1]["params"]
    assert len(got) == 2 and all(a is b for a, b in zip(got, model.biases_and_norms()))


def _epilogue_model(seed):
    return fg.Sequential([fg.Dense(5, 8, activation="tanh", norm="layer", dropout=0.0),
                          fg.Residual(fg.Dense(8, 8, activation="relu")),
                          fg.Dense(8, 3, activation=None, weight_norm=True)],
                         dtype="float64", seed=seed)


@pytest.mark.parametrize("build", [_epilogue_model,
                                   lambda s: fg.MLP([5, 8, 3], dtype="float64", seed=s)],
                         ids=["epilogue", "plain"])
def test_param_groups_train_step_matches_opt_step_bitwise(build):
    rng = np.random.default_rng(6)
    loss_fn = fg.SoftmaxCrossEntropy()
    m1, m2 = build(1), build(1)
    opt1, opt2 = (_adamw_recipe(m, clip_norm=0.5) for m in (m1, m2))
    opt1.param_groups[1]["lr"] = opt2.param_groups[1]["lr"] = 3e-2
    step = fg.TrainStep(m2, loss_fn, opt2)
    for _ in range(6):
        x, y = rng.standard_normal((9, 5)), rng.integers(0, 3, 9)
        _, dy = loss_fn(m1.forward(x), y)
        m1.backward(dy, input_grad=False)
        s1 = opt1.step()
        step(x, y)
        assert step.stats == s1
    np.testing.assert_array_equal(m2.params, m1.params)
    for name in opt1.state:
        np.testing.assert_array_equal(opt2.state[name], opt1.state[name])


def test_param_groups_parallel_update_is_bitwise_serial():
    """Chunks of the parallel update cut across segments (> 2 chunks)."""
    m1, m2 = (fg.MLP([300, 256, 257, 10], dtype="float32", seed=2) for _ in range(2))
    opt1, opt2 = (_adamw_recipe(m, clip_norm=1.0) for m in (m1, m2))
    opt2.parallel = True
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.standard_normal(m1.params.size).astype(np.float32)
        m1.grads[...] = g
        m2.grads[...] = g
        assert opt1.step() == opt2.step()
    np.testing.assert_array_equal(m2.params, m1.params)


def test_param_groups_refusals():
    model = fg.MLP([4, 5, 3], dtype="float64", seed=0)
    W, b = model.weights(), model.biases_and_norms()
    with pytest.raises(ValueError, match=r"parameter layers\.0\.W is in param groups 0 and 1"):
        fg.AdamW(model, param_groups=[{"params": W}, {"params": W + b}])
    with pytest.raises(ValueError, match=r"\['layers\.0\.b', 'layers\.1\.b'\] are in no param"):
        fg.AdamW(model, param_groups=[{"params": W}])
    with pytest.raises(ValueError, match=r"AdamW has no hyper-parameter\(s\) \['momentum'\]"):
        fg.AdamW(model, param_groups=[{"params": W, "momentum": 0.9}, {"params": b}])
    with pytest.raises(ValueError, match="weight_decay must be a finite number >= 0"):
        fg.AdamW(model, param_groups=[{"params": W, "weight_decay": -1}, {"params": b}])
    with pytest.raises(ValueError, match="beta2 must be in"):
        fg.AdamW(model, param_groups=[{"params": W, "betas": (0.9, 1.0)}, {"params": b}])
    with pytest.raises(ValueError, match="clip_norm is set on the optimizer"):
        fg.AdamW(model, param_groups=[{"params": W, "clip_norm": 1.0}, {"params": b}])
    with pytest.raises(ValueError, match="Nesterov momentum requires"):
        fg.SGD(model, param_groups=[{"params": W, "nesterov": True}, {"params": b}])
    with pytest.raises(ValueError, match="'layers.7.W' is not a parameter"):
        fg.AdamW(model, param_groups=[{"params": ["layers.7.W"]}, {"params": W + b}])
    with pytest.raises(ValueError, match=r"shape \(4, 5\) is not a parameter"):
        fg.AdamW(model, param_groups=[{"params": [np.zeros((4, 5))]}, {"params": W + b}])
    with pytest.raises(ValueError, match="param group 1 has no parameters"):
        fg.AdamW(model, param_groups=[{"params": W + b}, {"params": []}])
    with pytest.raises(ValueError, match="param group 0 has no 'params'"):
        fg.AdamW(model, param_groups=[{"lr": 0.1}])
    with pytest.raises(TypeError, match="param_groups must be a non-empty list of dicts"):
        fg.AdamW(model, param_groups={"params": W})
    with pytest.raises(TypeError, match="given twice"):
        fg.AdamW([{"params": W + b}], param_groups=[{"params": W + b}])
    with pytest.raises(TypeError, match="pass the model"):
        fg.AdamW([{"params": ["layers.0.W"]}])
    with pytest.raises(ValueError, match="schedule starts at 0.0"):
        fg.AdamW(model, lr=fg.schedules.linear_warmup(0.0, 1e-2, 5),
                 param_groups=[{"params": W, "lr": 1e-3}, {"params": b}])
    with pytest.raises(ValueError, match="fused=True"):
        fg.AdamW(model, param_groups=[{"params": W, "fused": True}, {"params": b}])
    opt = _adamw_recipe(model)
    group = opt.param_groups[0]
    before = opt.state_dict()
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        group["lr"] = float("nan")
    with pytest.raises(TypeError, match="amsgrad must be True or False"):
        group["amsgrad"] = 1
    with pytest.raises(KeyError, match="'momentum' cannot be set"):
        group["momentum"] = 0.9
    after = opt.state_dict()
    assert after["groups"] == before["groups"] and after["hyper"] == before["hyper"]


def test_one_explicit_group_is_the_optimizer():
    """One group over everything: its values become the optimizer's, the
    kernel keeps the single row, checkpoints keep the plain form."""
    model = fg.MLP([4, 5, 3], dtype="float64", seed=0)
    opt = fg.AdamW(model, param_groups=[{"params": list(model.parameters()),
                                         "weight_decay": 0.0, "lr": 3e-3}])
    plain = fg.AdamW(model, weight_decay=0.0, lr=3e-3)
    assert opt.weight_decay == 0.0 and opt.lr == 3e-3 and opt._hp.ndim == 1
    sd, sd_plain = opt.state_dict(), plain.state_dict()
    assert sd.pop("state").keys() == sd_plain.pop("state").keys() and sd == sd_plain
    np.testing.assert_array_equal(opt._kernel_args()[4], plain._kernel_args()[4])
    opt.param_groups[0]["lr"] = 1e-3
    assert opt.lr == opt.lr_schedule(0) == 1e-3


def test_param_groups_state_follows_the_groups():
    """A state buffer exists when some group needs it (amsgrad in one group)."""
    p = [np.zeros(3), np.zeros(4)]
    opt = Adam([{"params": [(p[0], np.ones(3))]}, {"params": [(p[1], np.ones(4))]}])
    assert set(opt.state) == {"exp_avg", "exp_avg_sq"}
    opt.param_groups[1]["amsgrad"] = True
    assert set(opt.state) == {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert opt.amsgrad is False and opt.param_groups[1]["amsgrad"] is True


def test_param_groups_checkpoint_round_trip(tmp_path):
    """fg.save / fg.load keep the groups; the resumed run equals an
    uninterrupted one bitwise.  Files without groups load as one group."""
    from fastgrad import schedules
    rng = np.random.default_rng(3)
    data = [(rng.standard_normal((8, 5)), rng.integers(0, 3, 8)) for _ in range(8)]
    loss_fn = fg.SoftmaxCrossEntropy()

    def build():
        model = _epilogue_model(5)
        opt = fg.AdamW(model, lr=schedules.step_decay(1e-2, 3, 0.5), clip_norm=1.0,
                       param_groups=[{"params": model.weights(), "weight_decay": 0.1},
                                     {"params": model.biases_and_norms(), "lr": 2e-3,
                                      "weight_decay": 0.0, "betas": (0.8, 0.9)}])
        opt.param_groups[0]["eps"] = 1e-7          # a write through a group is kept too
        return model, opt

    def run(model, opt, batches):
        step = fg.TrainStep(model, loss_fn, opt)
        for x, y in batches:
            step(x, y)

    m1, o1 = build()
    run(m1, o1, data)
    m2, o2 = build()
    run(m2, o2, data[:4])
    fg.save(tmp_path / "g.fgz", m2, o2)
    m3, o3 = fg.load(tmp_path / "g.fgz")
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in o3.param_groups] == \
        [dict((k, v) for k, v in g.items() if k != "params") for g in o2.param_groups]
    assert o3.param_groups[0]["eps"] == 1e-7 and o3._groups[1].lr_scale == (2e-3, 1e-2)
    run(m3, o3, data[4:])
    np.testing.assert_array_equal(m3.params, m1.params)
    assert o3.step_count == o1.step_count == 8
    # a checkpoint without groups (one group, or older) loads as one group
    m4, o4 = build()
    sd = o4.state_dict()
    del sd["groups"]
    o4.load_state_dict(sd)
    assert len(o4.param_groups) == 1 and o4._hp.ndim == 1
    assert o4.weight_decay == 1e-2 and o4.lr == 1e-2


def test_param_groups_torch_state_dict_both_ways():
    """torch AdamW with two groups -> fastgrad -> torch, trajectories equal."""
    torch = _torch()
    model = fg.Sequential([fg.Dense(5, 7, activation="tanh", norm="layer"),
                           fg.Dense(7, 3, activation=None, weight_norm=True)],
                          dtype="float64", seed=0)
    tmodel = model.to_torch().double()
    tw, trest = _torch_groups_of(model, tmodel)
    topt = torch.optim.AdamW([{"params": tw, "weight_decay": 0.1, "lr": 2e-2},
                              {"params": trest, "weight_decay": 0.0}], lr=1e-2, foreach=False)
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    loss_fn = fg.SoftmaxCrossEntropy()

    def torch_step():
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tmodel(torch.tensor(x)), torch.tensor(y)).backward()
        topt.step()

    for _ in range(5):
        torch_step()
    # torch -> fastgrad (parameters copied over, state by load_state_dict)
    model.load_state_dict({k: v for k, v in fg.from_torch(tmodel, dtype="float64")
                           .state_dict().items()})
    opt = _adamw_recipe(model)
    opt.load_state_dict(topt.state_dict())
    assert opt.step_count == 5
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(2e-2, 0.1),
                                                                       (1e-2, 0.0)]
    for _ in range(20):
        _, dy = loss_fn(model.forward(x), y)
        model.backward(dy, input_grad=False)
        opt.step()
        torch_step()
    back = fg.from_torch(tmodel, dtype="float64")
    np.testing.assert_allclose(model.params, back.params, rtol=1e-11, atol=1e-12)
    # fastgrad -> torch: the state dict loads into torch's grouped AdamW
    sd = opt.state_dict(format="torch")
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3, 4, 5, 6]]
    t2 = model.to_torch().double()
    w2, r2 = _torch_groups_of(model, t2)
    topt2 = torch.optim.AdamW([{"params": w2}, {"params": r2}], foreach=False)
    topt2.load_state_dict(sd)
    assert [(g["lr"], g["weight_decay"]) for g in topt2.param_groups] == [(2e-2, 0.1),
                                                                         (1e-2, 0.0)]
    for p1, p2 in zip(tw + trest, w2 + r2):
        s1, s2 = topt.state[p1], topt2.state[p2]
        assert float(s1["step"]) == float(s2["step"]) == 25.0
        for name in ("exp_avg", "exp_avg_sq"):
            np.testing.assert_allclose(s2[name].numpy(), s1[name].numpy(), rtol=1e-10,
                                       atol=1e-13)


@pytest.mark.cuda
@pytest.mark.parametrize("kind,hyper,groups", [GROUP_CONFIGS[1], GROUP_CONFIGS[3],
                                               GROUP_CONFIGS[5]], ids=["adamw", "sgd", "rmsprop"])
def test_cuda_param_groups_match_cpu(cp, kind, hyper, groups):
    """Several groups in the CUDA update (one launch per segment, the table
    of segment rows chosen on the device) against the CPU, opt.step() and
    the fused CUDA TrainStep, with group writes mid-run."""
    rng = np.random.default_rng(9)
    loss_fn = fg.SoftmaxCrossEntropy()

    def build(device):
        model = fg.MLP([5, 8, 7, 3], dtype="float64", seed=4, device=device)
        parts = [model.weights(), model.biases_and_norms()]
        if kind == "sgd":       # group 0 (whose lr the stats report) starts at segment 1
            parts.reverse()
        opt = CLASSES[kind](model, clip_norm=0.5, param_groups=[
            dict(params=parts[0], **groups[0]), dict(params=parts[1], **groups[1])], **hyper)
        return model, opt

    (mc, oc), (mg, og), (ms, os_) = build("cpu"), build("cuda"), build("cuda")
    step = fg.TrainStep(ms, loss_fn, os_)
    for t in range(12):
        if t == 5:
            for o in (oc, og, os_):
                o.param_groups[1]["lr"] = 2 * o.param_groups[1]["lr"]
                o.param_groups[0]["weight_decay"] = 0.05
        x, y = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
        for m, o in ((mc, oc), (mg, og)):
            _, dy = loss_fn(m.forward(m._xp.asarray(x)), m._xp.asarray(y))
            m.backward(dy, input_grad=False)
        s_cpu, s_gpu = oc.step(), og.step()
        step(x, y)
        assert s_gpu.lr == s_cpu.lr == step.stats.lr
        assert s_gpu.grad_norm == pytest.approx(s_cpu.grad_norm, rel=1e-12)
    for m in (mg, ms):
        np.testing.assert_allclose(cp.asnumpy(m.params), mc.params, rtol=1e-12, atol=1e-14)
    assert og.step_count == os_.step_count == 12
    with pytest.raises(ValueError, match="one parameter group"):
        fg.TrainStep(mg, loss_fn, og, cuda_graph=True)


def test_run_epoch_with_groups_is_the_step_loop():
    """The compiled epoch fills one row per segment for every update count."""
    rng = np.random.default_rng()
    X, Y = rng.standard_normal((70, 6)), rng.integers(0, 4, 70)
    X[33, 2] = np.nan                       # one skipped step inside the epoch
    out = []
    for mode in ("epoch", "loop"):
        m = fg.MLP([6, 9, 4], dtype="float64", seed=2)
        opt = fg.AdamW(m, lr=fg.schedules.cosine_decay(1e-2, 10), clip_norm=0.5, param_groups=[
            {"params": m.weights(), "weight_decay": 0.1},
            {"params": m.biases_and_norms(), "weight_decay": 0.0, "lr": 2e-2}])
        step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt)
        if mode == "epoch":
            res = step.run_epoch(X, Y, 16, seed=5)
            assert res["skipped"].sum() == 1
        else:
            order = np.random.default_rng(5).permutation(70)
            for i in range(0, 70, 16):
                step(X[order[i:i + 16]], Y[order[i:i + 16]])
        out.append((m.params.copy(), opt.step_count))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    assert out[0][1] == out[1][1] == 4
