"""PyTorch habits on the optimizers (issue #17): ``maximize``, the settable
learning rate, and PyTorch's implementation switches at their no-op values.

Parity is against ``torch.optim`` 2.13 in float64 on (param, grad) pairs of
odd shapes, with and without clipping (``clip_grad_norm_`` /
``clip_grad_value_`` before the step, as a PyTorch loop does).
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad.optim import SGD, Adam, AdamW, RMSprop

CLASSES = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop}

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
        tcls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam,
                "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[kind]
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
TORCH_CLS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop"}
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
