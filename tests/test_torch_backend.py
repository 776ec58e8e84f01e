"""fastgrad as PyTorch's CPU backend (issue #18): the multi-tensor kernel, the
``fastgrad.torch`` optimizers and ``fastgrad.torch.FusedMLP``.

Parity is against PyTorch 2.13 in float64: ``clip_grad_norm_`` /
``clip_grad_value_`` + ``torch.optim.X(foreach=False)`` on copies of the same
tensors, fed the same gradients (with spikes that trigger clipping).
"""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="fastgrad.torch needs PyTorch "
                                             "(pip install 'fastgrad[peers]')")

import fastgrad as fg  # noqa: E402
import fastgrad.torch as fgt  # noqa: E402
from fastgrad.kernels.cpu import multi_tensor as mt  # noqa: E402
from fastgrad.kernels.cpu import optim as k  # noqa: E402

RULE_CONFIGS = [
    ("SGD", dict(lr=0.05)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, betas=(0.8, 0.99), amsgrad=True, maximize=True)),
    ("Adam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1, amsgrad=True)),
    ("RMSprop", dict(lr=1e-3, weight_decay=1e-2)),
    ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)),
    ("RMSprop", dict(lr=1e-3, momentum=0.5, maximize=True)),
]
RULE_IDS = [f"{k}-{i}" for i, (k, _) in enumerate(RULE_CONFIGS)]
CLIPS = [(None, None), (1.0, None), (None, 0.05), (0.7, 0.05)]
SHAPES = [(5, 7), (7,), (7, 3), (3,), (1,), (4, 2, 3)]
N_STEPS = 25


def _params(seed, dtype=torch.float64, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return [torch.nn.Parameter(torch.tensor(rng.standard_normal(s), dtype=dtype))
            for s in shapes]


def _grad_seq(shapes, steps=N_STEPS, seed=3):
    """Gradients with spikes (x100 every 7th step) that trigger clipping."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        gs = [rng.standard_normal(s) * 0.1 for s in shapes]
        if t % 7 == 0:
            gs = [g * 100.0 for g in gs]
        out.append(gs)
    return out


class _Twin:
    """torch.optim.X + clip_grad_* against fastgrad.torch.X, fed alike."""

    def __init__(self, kind, hyper, clip_norm, clip_value, groups=None, seed=2):
        self.tp, self.fp = _params(seed), _params(seed)
        self.clip_norm, self.clip_value = clip_norm, clip_value

        def arrange(ps):
            if groups is None:
                return ps
            return [dict(params=[ps[i] for i in idx], **extra) for idx, extra in groups]

        self.topt = getattr(torch.optim, kind)(arrange(self.tp), foreach=False, **hyper)
        self.fopt = getattr(fgt, kind)(arrange(self.fp), clip_norm=clip_norm,
                                       clip_value=clip_value, **hyper)

    def step(self, grads):
        for tp, fp, g in zip(self.tp, self.fp, grads):
            tp.grad = torch.tensor(g)
            fp.grad = torch.tensor(g)
        total = torch.nn.utils.get_total_norm([p.grad for p in self.tp])
        if self.clip_norm is not None:
            total = torch.nn.utils.clip_grad_norm_(self.tp, self.clip_norm, foreach=False)
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.tp, self.clip_value, foreach=False)
        self.topt.step()
        self.fopt.step()
        stats = self.fopt.stats
        assert stats.grad_norm == pytest.approx(float(total), rel=1e-12)
        assert not stats.skipped
        self.check()
        return stats

    def check(self):
        for tp, fp in zip(self.tp, self.fp):
            np.testing.assert_allclose(fp.detach().numpy(), tp.detach().numpy(),
                                       rtol=1e-12, atol=1e-12)


# -- the multi-tensor kernel ------------------------------------------------------------

def _hp_row():
    hp = np.zeros(k.HP_SIZE)
    hp[k.HP_LR], hp[k.HP_BETA1], hp[k.HP_BETA2], hp[k.HP_EPS] = 0.01, 0.9, 0.999, 1e-8
    hp[k.HP_BIAS_CORR1], hp[k.HP_BIAS_CORR2] = 0.1, 0.001
    hp[k.HP_AMSGRAD] = hp[k.HP_CENTERED] = 1.0
    hp[k.HP_MOMENTUM], hp[k.HP_ALPHA], hp[k.HP_WEIGHT_DECAY] = 0.9, 0.99, 1e-2
    return hp


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", [k.SGD, k.ADAM, k.ADAMW, k.RMSPROP])
@pytest.mark.parametrize("sizes", [[1], [17], [1, 3, 17, 129, 1000], [5] * 40 + [20000, 3]],
                         ids=["1", "17", "odd", "many"])
def test_multi_tensor_kernel_is_bitwise_the_flat_kernel(dtype, rule, sizes):
    rng = np.random.default_rng(len(sizes) * 10 + rule)
    n = sum(sizes)
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat = [rng.standard_normal(n).astype(dtype) for _ in range(5)]
    flat[2], flat[4] = np.abs(flat[2]) + 1, np.abs(flat[4]) + 1       # squared averages
    flat[1][rng.integers(0, n)] *= 1e3                                  # a clipped spike
    sep = [[a[off[i]:off[i + 1]].copy() for i in range(len(sizes))] for a in flat]
    hp = _hp_row()
    layer_sq, tensor_sq = np.zeros(len(sizes)), np.zeros(len(sizes))
    ref = k.clipped_update(rule, *flat, hp, off, layer_sq, 1.0, 0.5)
    got = mt.multi_clipped_update(
        rule, flat[0][:0], mt.addresses(sep[0]), mt.addresses(sep[1]),
        np.stack([mt.addresses(s) for s in sep[2:]]), np.diff(off), hp.reshape(1, -1),
        np.zeros(len(sizes), np.int64), tensor_sq, 1.0, 0.5)
    assert got == ref and ref[1] < 1.0
    assert np.array_equal(tensor_sq, layer_sq)
    for j in (0, 2, 3, 4):
        np.testing.assert_array_equal(np.concatenate(sep[j]), flat[j])
    np.testing.assert_array_equal(np.concatenate(sep[1]), flat[1])    # g read only


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", [k.SGD, k.ADAM, k.RMSPROP])
def test_parallel_multi_tensor_kernel_is_bitwise_the_serial_one(dtype, rule):
    """Blocks and chunks spanning several tensors, empty tensors between."""
    rng = np.random.default_rng(rule)
    sizes = [0, 5, 0, mt.CHUNK + 3, 1, 2 * mt.CHUNK, 17]
    runs = []
    for _ in range(2):
        r = np.random.default_rng(7)
        runs.append([[r.standard_normal(s).astype(dtype) for s in sizes] for _ in range(5)])
    for arrs in runs:
        arrs[2] = [np.abs(a) for a in arrs[2]]
    hp = _hp_row().reshape(1, -1)
    clip = float(rng.uniform(0.5, 2.0))
    out = []
    for fn, arrs in ((mt.multi_clipped_update, runs[0]),
                     (mt.multi_clipped_update_parallel, runs[1])):
        sq = np.zeros(len(sizes))
        res = fn(rule, arrs[0][0][:0], mt.addresses(arrs[0]), mt.addresses(arrs[1]),
                 np.stack([mt.addresses(a) for a in arrs[2:]]), np.array(sizes, np.int64), hp,
                 np.zeros(len(sizes), np.int64), sq, clip, 0.0)
        out.append((res, sq))
    assert out[0][0] == out[1][0] and np.array_equal(out[0][1], out[1][1])
    for a_list, b_list in zip(*runs):
        for a, b in zip(a_list, b_list):
            np.testing.assert_array_equal(a, b)


def test_multi_tensor_kernel_rows_and_absent_state():
    """Each tensor uses its own hp row; a state address of 0 is no buffer."""
    rng = np.random.default_rng(1)
    ps = [rng.standard_normal(s) for s in (3, 5)]
    gs = [rng.standard_normal(s) for s in (3, 5)]
    hp = np.zeros((2, k.HP_SIZE))
    hp[:, k.HP_LR] = (0.1, 0.5)
    want = [p - lr * g for p, g, lr in zip(ps, gs, (0.1, 0.5))]
    mt.multi_clipped_update(k.SGD, ps[0][:0], mt.addresses(ps), mt.addresses(gs),
                            np.zeros((3, 2), np.int64), np.array([3, 5]), hp,
                            np.array([0, 1]), np.zeros(2), 0.0, 0.0)
    for p, w in zip(ps, want):
        np.testing.assert_array_equal(p, w)


def test_multi_tensor_kernel_skips_a_nonfinite_gradient():
    ps = [np.ones(4), np.ones(3)]
    gs = [np.ones(4), np.array([1.0, np.nan, 2.0])]
    m = [np.zeros(4), np.zeros(3)]
    v = [np.zeros(4), np.zeros(3)]
    sq = np.zeros(2)
    norm, scale, skipped = mt.multi_clipped_update(
        k.ADAM, ps[0][:0], mt.addresses(ps), mt.addresses(gs),
        np.stack([mt.addresses(m), mt.addresses(v), np.zeros(2, np.int64)]),
        np.array([4, 3]), _hp_row().reshape(1, -1), np.zeros(2, np.int64), sq, 1.0, 0.0)
    assert skipped and np.isnan(norm) and scale == 0.0
    assert sq[0] == 4.0 and np.isnan(sq[1])
    for a, w in zip(ps + m + v, [1.0] * 2 + [0.0] * 4):
        assert np.all(a == w)


# -- fg.Adam over (param, grad) pairs: in place -------------------------------------------

def test_pairs_are_updated_in_place_bitwise_as_a_flat_model():
    rng = np.random.default_rng(4)
    sizes = [3, 17, 129, 1]
    ps = [rng.standard_normal(s).astype(np.float32) for s in sizes]
    gs = [rng.standard_normal(s).astype(np.float32) for s in sizes]

    class Flat:
        params = np.concatenate(ps)
        grads = np.concatenate(gs)
        layer_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    model = Flat()
    opt_pairs = fg.Adam(list(zip(ps, gs)), lr=0.1, clip_norm=1.0, amsgrad=True)
    opt_flat = fg.Adam(model, lr=0.1, clip_norm=1.0, amsgrad=True)
    assert opt_pairs._multi is not None
    for _ in range(3):
        a, b = opt_pairs.step(), opt_flat.step()
        assert a == b
    np.testing.assert_array_equal(np.concatenate(ps), model.params)
    np.testing.assert_array_equal(opt_pairs.params, model.params)     # a fresh copy
    for name in opt_flat.state:
        np.testing.assert_array_equal(opt_pairs.state[name], opt_flat.state[name])


def test_pairs_parallel_is_bitwise_serial():
    rng = np.random.default_rng(6)
    arrays = [[rng.standard_normal(s) for s in (3, 70000, 1)] for _ in range(2)]
    arrays[1] = [a.copy() for a in arrays[0]]
    grads = [rng.standard_normal(s) for s in (3, 70000, 1)]
    opts = [fg.RMSprop(list(zip(a, grads)), lr=0.1, momentum=0.5, centered=True,
                       clip_norm=1.0) for a in arrays]
    opts[1].parallel = True
    for _ in range(3):
        assert opts[0].step() == opts[1].step()
    for a, b in zip(*arrays):
        np.testing.assert_array_equal(a, b)


def test_pairs_that_are_not_contiguous_still_work():
    rng = np.random.default_rng(5)
    base = rng.standard_normal((6, 4))
    p, g = base[:, ::2], rng.standard_normal((6, 2))
    ref = p.copy()
    opt = fg.SGD([(p, g)], lr=0.5)
    assert opt._multi is None
    opt.step()
    np.testing.assert_allclose(base[:, ::2], ref - 0.5 * g, rtol=1e-15)


# -- fastgrad.torch optimizers: parity -------------------------------------------------

@pytest.mark.parametrize("clip_norm,clip_value", CLIPS,
                         ids=["noclip", "norm", "value", "norm+value"])
@pytest.mark.parametrize("kind,hyper", RULE_CONFIGS, ids=RULE_IDS)
def test_torch_optimizer_matches_torch(kind, hyper, clip_norm, clip_value):
    twin = _Twin(kind, hyper, clip_norm, clip_value)
    clipped = 0
    for grads in _grad_seq(SHAPES):
        clipped += twin.step(grads).clipped
    assert clipped > 0 if clip_norm else clipped == 0
    if clip_value and not clip_norm:      # the clamp acted (the spikes exceed it)
        assert any(abs(g).max() > clip_value for g in _grad_seq(SHAPES)[0])
    assert twin.fopt.n_updates == N_STEPS
    # the state is torch's, under torch's names
    for tp, fp in zip(twin.tp, twin.fp):
        ts, fs = twin.topt.state[tp], twin.fopt.state[fp]
        assert set(ts) == set(fs)
        for name in ts:
            if ts[name] is not None:
                assert fs[name].dtype == ts[name].dtype
                np.testing.assert_allclose(fs[name].numpy(), ts[name].numpy(),
                                           rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,hyper", [RULE_CONFIGS[i] for i in (2, 4, 10)],
                         ids=[RULE_IDS[i] for i in (2, 4, 10)])
def test_torch_optimizer_parallel_matches_torch(kind, hyper):
    twin = _Twin(kind, hyper, 1.0, 0.5)
    twin.fopt.parallel = True
    for grads in _grad_seq(SHAPES, steps=10):
        twin.step(grads)


@pytest.mark.parametrize("kind,hyper", [RULE_CONFIGS[i] for i in (1, 3, 7, 9)],
                         ids=[RULE_IDS[i] for i in (1, 3, 7, 9)])
def test_two_param_groups_and_a_scheduler_match_torch(kind, hyper):
    extra = {"SGD": dict(lr=0.01, momentum=0.5), "RMSprop": dict(lr=0.02, alpha=0.9)}.get(
        kind, dict(lr=0.03, weight_decay=0.0, betas=(0.5, 0.9)))
    groups = [([0, 2, 4], {}), ([1, 3, 5], extra)]
    twin = _Twin(kind, hyper, 1.0, None, groups=groups)
    sched_t = torch.optim.lr_scheduler.StepLR(twin.topt, step_size=5, gamma=0.5)
    sched_f = torch.optim.lr_scheduler.StepLR(twin.fopt, step_size=5, gamma=0.5)
    for grads in _grad_seq(SHAPES):
        twin.step(grads)
        sched_t.step()
        sched_f.step()
    assert twin.fopt.param_groups[1]["lr"] == twin.topt.param_groups[1]["lr"] < extra["lr"]


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind,hyper", [RULE_CONFIGS[i] for i in (2, 4, 9)],
                         ids=[RULE_IDS[i] for i in (2, 4, 9)])
def test_a_copied_optimizer_trains_on_as_the_original(kind, hyper, how):
    """As torch's optimizers do (a spawn worker pickles it): the copy keeps
    its clipping, counters and state and steps bitwise as the original (it
    raised AttributeError '_dtype', and clip_norm was lost)."""
    import pickle
    grads = _grad_seq(SHAPES, steps=8)
    params = _params(0)
    opt = getattr(fgt, kind)(params, clip_norm=0.7, skip_nonfinite=False, **hyper)
    for gs in grads[:4]:
        for p, g in zip(params, gs):
            p.grad = torch.tensor(g)
        opt.step()
    twin = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    assert (twin.clip_norm, twin.skip_nonfinite, twin.n_updates) == (0.7, False, 4)
    for gs in grads[4:]:
        for ps, o in ((params, opt), (twin_params, twin)):
            for p, g in zip(ps, gs):
                p.grad = torch.tensor(g)
            o.step()
    assert twin.n_updates == opt.n_updates == 8 and twin.stats.clipped == opt.stats.clipped
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_params_without_grad_are_skipped_as_torch_does():
    twin = _Twin("Adam", dict(lr=1e-2), 1.0, None)
    seq = _grad_seq(SHAPES)
    for t, grads in enumerate(seq):
        twin.step(grads)
        if t == 3:
            twin.tp[1].grad = twin.fp[1].grad = None
            for p in twin.tp[:1] + twin.tp[2:]:
                p.grad = p.grad * 0.5
            for p in twin.fp[:1] + twin.fp[2:]:
                p.grad = p.grad * 0.5
            torch.nn.utils.clip_grad_norm_(twin.tp, 1.0, foreach=False)
            twin.topt.step()
            twin.fopt.step()
            twin.check()
            assert len(twin.fopt.stats.layer_norms) == len(SHAPES) - 1
    # the parameter that missed a step is one step behind: its own bias correction
    assert float(twin.fopt.state[twin.fp[1]]["step"]) == len(seq)
    assert float(twin.fopt.state[twin.fp[0]]["step"]) == len(seq) + 1


def test_groups_from_generators_and_added_later():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    opt = fgt.SGD([dict(params=model[0].parameters())], lr=0.1)
    opt.add_param_group(dict(params=model[1].parameters(), lr=0.5))
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2]
    with pytest.raises(TypeError, match="ordered collections"):
        fgt.SGD([dict(params={torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))})])
    model(torch.ones(5, 3, dtype=torch.float64)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, b, lr in zip(model.parameters(), before, (0.1, 0.1, 0.5, 0.5)):
        torch.testing.assert_close(p.detach(), b - lr * p.grad, rtol=1e-15, atol=1e-15)


def test_float32_tracks_torch():
    tp, fp = _params(7, torch.float32), _params(7, torch.float32)
    topt = torch.optim.Adam(tp, lr=1e-2, foreach=False)
    fopt = fgt.Adam(fp, lr=1e-2, clip_norm=1.0)
    for grads in _grad_seq(SHAPES, steps=10):
        for a, b, g in zip(tp, fp, grads):
            a.grad = torch.tensor(g, dtype=torch.float32)
            b.grad = torch.tensor(g, dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_(tp, 1.0)
        topt.step()
        fopt.step()
    for a, b in zip(tp, fp):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-5, atol=1e-6)


# -- state_dict both ways ---------------------------------------------------------------

@pytest.mark.parametrize("kind,hyper", [RULE_CONFIGS[i] for i in (1, 4, 6, 9)],
                         ids=[RULE_IDS[i] for i in (1, 4, 6, 9)])
def test_state_dict_torch_to_fastgrad_and_back(kind, hyper):
    twin = _Twin(kind, hyper, None, None)
    seq = _grad_seq(SHAPES, steps=12)
    for grads in seq[:5]:
        twin.step(grads)
    # torch -> fastgrad: a fresh fastgrad optimizer continues torch's run
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in twin.tp]
    fopt = getattr(fgt, kind)(fresh, **hyper)
    fopt.load_state_dict(copy.deepcopy(twin.topt.state_dict()))
    # fastgrad -> torch: a fresh torch optimizer continues fastgrad's run
    fresh_t = [torch.nn.Parameter(p.detach().clone()) for p in twin.fp]
    topt = getattr(torch.optim, kind)(fresh_t, foreach=False, **hyper)
    topt.load_state_dict(copy.deepcopy(twin.fopt.state_dict()))
    for grads in seq[5:]:
        for ps in (fresh, fresh_t):
            for p, g in zip(ps, grads):
                p.grad = torch.tensor(g)
        twin.step(grads)
        fopt.step()
        topt.step()
    for a, b, c in zip(twin.tp, fresh, fresh_t):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-12,
                                   atol=1e-12)
        np.testing.assert_allclose(c.detach().numpy(), a.detach().numpy(), rtol=1e-12,
                                   atol=1e-12)


@pytest.mark.parametrize("step", [torch.tensor(3), torch.tensor(3, dtype=torch.int32),
                                  torch.tensor(3.0, dtype=torch.float64), 3])
def test_step_count_of_any_type_continues_as_torch(step):
    # a state dict's step as an integer tensor: the update ran, then adding
    # 1 to it failed, leaving the step uncounted
    ps, tps = _params(4), _params(4)
    grads = _grad_seq(SHAPES, steps=2)
    opt, topt = fgt.Adam(ps, lr=0.1), torch.optim.Adam(tps, lr=0.1, foreach=False)
    for o, qs in ((opt, ps), (topt, tps)):
        for p, g in zip(qs, grads[0]):
            p.grad = torch.tensor(g)
        o.step()
        sd = copy.deepcopy(o.state_dict())
        for st in sd["state"].values():
            st["step"] = copy.deepcopy(step)
        o.load_state_dict(sd)
        for p, g in zip(qs, grads[1]):
            p.grad = torch.tensor(g)
        o.step()
    for a, b in zip(tps, ps):
        np.testing.assert_allclose(b.detach().numpy(), a.detach().numpy(), rtol=1e-13)
    assert all(float(opt.state[p]["step"]) == 4.0 for p in ps)


def test_refused_param_group_leaves_the_optimizer_usable():
    ps = _params(5)
    opt = fgt.SGD(ps[:2], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="[Nn]esterov"):
        opt.add_param_group({"params": ps[2:4], "nesterov": True, "momentum": 0.0})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": ps[2:4], "lr": 0.2})     # the same tensors, fixed
    for p in ps[:4]:
        p.grad = torch.ones_like(p)
    opt.step()
    assert len(opt.param_groups) == 2 and opt.n_updates == 1


def test_a_refused_or_skipped_step_leaves_no_momentum_buffer():
    """Buffers made for a step that is refused (a later group's gradient is
    not contiguous) or skipped (NaN) are dropped: a zero buffer left
    behind made the next step take it as started (0.11 off torch's
    SGD with dampening)."""
    kw = dict(lr=0.1, momentum=0.9, dampening=0.5)
    ps, ref = _params(3, shapes=[(5, 7), (7, 3)]), _params(3, shapes=[(5, 7), (7, 3)])
    opt = fgt.SGD([{"params": [ps[0]]}, {"params": [ps[1]]}], **kw)
    want = torch.optim.SGD([{"params": [ref[0]]}, {"params": [ref[1]]}], **kw)
    g0, g1 = torch.randn_like(ps[0]), torch.randn(ps[1].shape[::-1], dtype=ps[1].dtype)
    ps[0].grad, ps[1].grad = g0.clone(), g1.clone().t()     # not contiguous
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    assert not opt.state[ps[0]] and not opt.state[ps[1]]
    ps[1].grad = g1.t().contiguous()
    ref[0].grad, ref[1].grad = g0.clone(), g1.t().contiguous()
    opt.step()
    want.step()
    for a, b in zip(ps, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
    # momentum turned on for started states, then a NaN step: no buffer
    p, q = _params(4)[:1], _params(4)[:1]
    a, b = fgt.SGD(p, lr=0.1), fgt.SGD(q, lr=0.1)
    for opt_ in (a, b):
        opt_.param_groups[0]["params"][0].grad = torch.ones_like(p[0])
        opt_.step()
        opt_.param_groups[0].update(momentum=0.9, dampening=0.5)
    p[0].grad[0] = float("nan")
    a.step()
    assert a.stats.skipped and "momentum_buffer" not in a.state[p[0]]
    p[0].grad = torch.ones_like(p[0])
    a.step()
    b.step()
    torch.testing.assert_close(p[0], q[0], rtol=0, atol=0)


# -- skip and stats -----------------------------------------------------------------------

def test_nan_gradient_skips_everything_and_is_reported():
    ps = _params(9)
    opt = fgt.Adam(ps, lr=0.1, clip_norm=1.0)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in ps]
    state = {i: {n: t.clone() for n, t in opt.state[p].items()} for i, p in enumerate(ps)}
    ps[3].grad[0] = float("nan")
    opt.step()
    assert opt.stats.skipped and opt.n_skipped == 1 and opt.n_updates == 1
    assert np.isnan(opt.stats.grad_norm) and opt.stats.clip_scale == 0.0
    for i, (p, b) in enumerate(zip(ps, before)):
        assert torch.equal(p, b)
        for n, t in opt.state[p].items():
            assert torch.equal(t, state[i][n])
    opt2 = fgt.SGD(_params(9), lr=0.1, momentum=0.9, skip_nonfinite=False)
    for p in opt2.param_groups[0]["params"]:
        p.grad = torch.full_like(p, float("inf"))
    with pytest.raises(fg.NonFiniteGradientError):
        opt2.step()
    assert len(opt2.state) == 0          # no state was made for the failed first step


def test_stats_report_norms_and_clipping():
    ps = _params(10, shapes=[(3,), (4,)])
    opt = fgt.SGD(ps, lr=0.1, clip_norm=1.0)
    ps[0].grad = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    ps[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    opt.step()
    s = opt.stats
    assert s.grad_norm == 5.0 and s.clipped and s.step == 1 and s.lr == 0.1
    np.testing.assert_allclose(s.layer_norms, [3.0, 4.0])
    assert s.clip_scale == pytest.approx(1.0 / (5.0 + 1e-6), rel=1e-15)


def test_closure_and_zero_grad():
    ps = _params(11, shapes=[(3,)])
    opt = fgt.SGD(ps, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (ps[0] ** 2).sum()
        loss.backward()
        return loss

    before = ps[0].detach().clone()
    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(float((before ** 2).sum()))
    torch.testing.assert_close(ps[0].detach(), before * 0.8, rtol=1e-15, atol=0)
    opt.zero_grad()
    assert ps[0].grad is None


def test_autograd_sees_the_in_place_update():
    """A tensor saved for backward and then updated is detected, as with torch."""
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = fgt.SGD([w], lr=0.1)
    w.grad = torch.ones(3, dtype=torch.float64)
    y = (w * w).sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


# -- refusals --------------------------------------------------------------------------------

def test_refusals():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        fgt.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])
    with pytest.raises(ValueError, match="contiguous"):
        fgt.Adam([torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64).T)])
    with pytest.raises(TypeError, match="one dtype"):
        fgt.Adam([p, torch.nn.Parameter(torch.zeros(2, dtype=torch.float32))])
    with pytest.raises(ValueError, match="fused"):
        fgt.Adam([p], fused=True)
    with pytest.raises(ValueError, match="foreach"):
        fgt.SGD([p], foreach=True)
    with pytest.raises(ValueError, match="capturable"):
        fgt.RMSprop([p], capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        fgt.AdamW([p], differentiable=True)
    fgt.Adam([p], foreach=False, fused=None, capturable=False, differentiable=False)
    with pytest.raises(ValueError, match="clip_norm"):
        fgt.Adam([p], clip_norm=-1.0)
    with pytest.raises(ValueError, match="beta1"):
        fgt.Adam([p], betas=(1.5, 0.9))
    with pytest.raises(ValueError, match="Nesterov"):
        fgt.SGD([p], nesterov=True)
    with pytest.raises(ValueError, match="lr"):
        fgt.SGD([p], lr=-1.0)
    opt = fgt.SGD([p], lr=0.1)
    p.grad = torch.zeros(6, dtype=torch.float64)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        opt.step()
    p.grad = torch._neg_view(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="negative view"):
        opt.step()
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    # any non-CPU tensor ("meta" stands in for CUDA, absent here)
    with pytest.raises(TypeError, match="CPU tensors"):
        fgt.Adam([torch.nn.Parameter(torch.zeros(3, device="meta"))])
    mlp = fgt.FusedMLP([3, 2])
    with pytest.raises(TypeError, match="on the CPU"):
        mlp(torch.zeros(2, 3, device="meta"))


def test_loads_a_state_whose_step_is_a_number():
    """Older torch state dicts keep ``step`` as a number (torch converts it)."""
    tp, fp = _params(13, shapes=[(3,)]), _params(13, shapes=[(3,)])
    topt, fopt = torch.optim.Adam(tp, foreach=False), fgt.Adam(fp)
    for ps in (tp, fp):
        ps[0].grad = torch.ones(3, dtype=torch.float64)
    topt.step()
    sd = copy.deepcopy(topt.state_dict())
    sd["state"][0]["step"] = 1
    topt.load_state_dict(copy.deepcopy(sd))
    fopt.load_state_dict(sd)
    with torch.no_grad():
        fp[0].copy_(tp[0])
    topt.step()
    fopt.step()
    torch.testing.assert_close(fp[0], tp[0], rtol=1e-12, atol=1e-12)
    assert float(fopt.state[fp[0]]["step"]) == 2.0


def test_refuses_a_loaded_state_of_the_wrong_size():
    ps = _params(12, shapes=[(3,)])
    opt = fgt.Adam(ps)
    ps[0].grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(2, dtype=torch.float64)
    opt.load_state_dict(sd)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.step()


def test_importing_fastgrad_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, fastgrad; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- FusedMLP ------------------------------------------------------------------------------

ACTIVATIONS = sorted(fg.kernels.cpu.activations.CODES)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_mlp_gradcheck(activation):
    torch.manual_seed(0)
    mlp = fgt.FusedMLP([3, 5, 4, 2], activation=activation, output_activation=activation,
                       dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    params = [p for p in mlp.parameters()]

    def f(x, *ps):
        with torch.no_grad():
            for p, q in zip(params, ps):
                p.copy_(q)
        return fgt.mlp._FusedMLPFunction.apply(x, mlp._plan, mlp._drops(None), False,
                                               (None,) * len(mlp._plan), *ps)

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_mlp_matches_its_sequential(activation, dtype):
    """Forward and gradients equal the equivalent nn.Sequential's; the state
    dict moves both ways with the same keys."""
    torch.manual_seed(1)
    mlp = fgt.FusedMLP([7, 9, 5], activation=activation, dtype=dtype)
    seq = mlp.to_sequential()
    assert list(seq.state_dict()) == list(mlp.state_dict())
    x = torch.randn(2, 3, 7, dtype=dtype)        # leading dims are kept
    y1, y2 = mlp(x), seq(x)
    assert y1.shape == (2, 3, 5)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(y1, y2, **tol)
    w = torch.randn_like(y1)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    for (n, p), q in zip(mlp.named_parameters(), seq.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=n)
    # a Sequential's state dict loads into a fresh FusedMLP (and back)
    other = fgt.FusedMLP([7, 9, 5], activation=activation, dtype=dtype)
    other.load_state_dict(seq.state_dict())
    torch.testing.assert_close(other(x), y1, rtol=0, atol=0)
    seq2 = copy.deepcopy(seq)
    for p in seq2.parameters():
        torch.nn.init.zeros_(p)
    seq2.load_state_dict(other.state_dict())
    torch.testing.assert_close(seq2(x), y2, rtol=0, atol=0)


def test_fused_mlp_draws_the_weights_of_its_sequential():
    """After the same torch.manual_seed, the weights are those of the same
    nn.Sequential (the dropout seed is drawn after them)."""
    for dropout in (0.0, 0.5):
        torch.manual_seed(8)
        mlp = fgt.FusedMLP([5, 6, 2], activation="tanh", dropout=dropout)
        torch.manual_seed(8)
        seq = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        for (_, a), b in zip(mlp.named_parameters(), seq.parameters()):
            assert torch.equal(a, b)


def test_fused_mlp_structure_is_to_torchs():
    """Keys and module types are those of fastgrad's MLP.to_torch()."""
    mlp = fgt.FusedMLP([4, 8, 8, 3], activation="tanh")
    ref = fg.interop.to_torch(fg.MLP([4, 8, 8, 3], activation="tanh", output_activation=None))
    assert [type(m) for m in mlp.children()] == [type(m) for m in ref.children()]
    assert list(mlp.state_dict()) == list(ref.state_dict())


def test_fused_mlp_trains_with_the_fused_optimizer():
    torch.manual_seed(2)
    mlp = fgt.FusedMLP([10, 16, 3], activation="relu")
    opt = fgt.Adam(mlp.parameters(), lr=1e-2, clip_norm=1.0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(mlp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_fused_mlp_follows_its_dropout_children_and_refuses_other_changes():
    """torch code turns dropout off through the children (``m.p = 0``): the
    kernels kept dropping at the built rate (0.65 between two calls);
    ``mlp.dropout`` sets the children's p.  Changes the kernels cannot run
    (an activation's slope, a replaced child) are refused, not ignored."""
    torch.manual_seed(0)
    mlp = fgt.FusedMLP([5, 8, 8, 3], activation="leaky_relu", dropout=0.3, dtype=torch.float64)
    x = torch.randn(16, 5, dtype=torch.float64)
    for m in mlp.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    a, b = mlp(x), mlp(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, mlp.to_sequential()(x), rtol=1e-12, atol=1e-12)
    mlp.dropout = 0.5
    assert all(m.p == 0.5 for m in mlp.modules() if isinstance(m, torch.nn.Dropout))
    assert not torch.equal(mlp(x), mlp(x))
    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp.to_sequential()(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="built without dropout"):
        fgt.FusedMLP([5, 3]).dropout = 0.1
    next(m for m in mlp.modules() if isinstance(m, torch.nn.LeakyReLU)).negative_slope = 0.3
    with pytest.raises(ValueError, match="activations it was built with"):
        mlp(x)
    other = fgt.FusedMLP([5, 8, 3])
    other.add_module("1", torch.nn.Tanh())
    with pytest.raises(ValueError, match="were replaced"):
        other(torch.randn(2, 5))
    # inside a residual block too (its new Linear got no gradient, the old
    # weights ran); an activation set in place runs (the same values)
    res = fgt.FusedMLP([5, 8, 8, 3], residual=True)
    block = next(m for m in res.children() if isinstance(m, fg.interop.ResidualBlock))
    for m in res.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = True
    res(torch.randn(2, 5))
    block.body[0] = torch.nn.Linear(8, 8)
    with pytest.raises(ValueError, match="were replaced"):
        res(torch.randn(2, 5))
    # the rate as the children say
    mlp2 = fgt.FusedMLP([5, 8, 8, 3], dropout=0.3)
    drops = [m for m in mlp2.modules() if isinstance(m, torch.nn.Dropout)]
    drops[0].p = 0.0
    assert mlp2.dropout == (0.0, 0.3)
    drops[1].p = 0.0
    assert mlp2.dropout == 0.0 and "dropout=0.0" in repr(mlp2)


def test_fused_mlp_refusals():
    mlp = fgt.FusedMLP([3, 4, 2])
    with pytest.raises(TypeError, match="float64"):
        mlp(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\)"):
        mlp(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="unknown activation"):
        fgt.FusedMLP([3, 2], activation="swish2")
    with pytest.raises(ValueError, match="sizes"):
        fgt.FusedMLP([3])
    with pytest.raises(TypeError, match="dtype"):
        fgt.FusedMLP([3, 2], dtype=torch.float16)
    # a dtype change of the module (nn.Module.double) is followed
    mlp64 = fgt.FusedMLP([3, 4, 2]).double()
    assert mlp64(torch.zeros(2, 3, dtype=torch.float64)).dtype == torch.float64
    # a non-contiguous input is read correctly
    x = torch.randn(3, 6)[:, ::2]
    torch.testing.assert_close(mlp(x), mlp(x.contiguous()), rtol=0, atol=0)
    # a module converted to a dtype the kernels lack: refused by name
    # before a kernel is compiled for it
    for half in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="float32 / torch.float64"):
            fgt.FusedMLP([3, 4, 2]).to(half)(torch.zeros(2, 3, dtype=half))
    # fastgrad.ops names the input NumPy cannot read (torch's own words kept)
    with pytest.raises(TypeError, match="x: cannot be read.*BFloat16.*float32 or float64"):
        fg.ops.dense_forward(torch.zeros(2, 3, dtype=torch.bfloat16),
                             np.zeros((3, 2), np.float32), np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="logits: cannot be read.*BFloat16"):
        fg.ops.softmax_cross_entropy(torch.zeros(2, 3, dtype=torch.bfloat16), np.zeros(2, int))


def test_ops_read_tensors_that_require_grad_as_their_values():
    # as torch's own functional ops with no_grad: W, b, logits, z and a that
    # require grad raised torch's "Can't call numpy() on Tensor that requires grad"
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=torch.float64)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    a, _ = fg.ops.dense_forward(x, W, b, "tanh")
    z = (x @ W + b).detach().numpy()
    np.testing.assert_allclose(a, np.tanh(z), rtol=1e-12)
    zt = torch.tensor(z, requires_grad=True)
    np.testing.assert_allclose(fg.ops.activation_forward(zt, "tanh"), a, rtol=1e-12)
    dz = fg.ops.activation_backward(torch.ones(5, 4, dtype=torch.float64),
                                    torch.tensor(a, requires_grad=True), zt, "tanh")
    np.testing.assert_allclose(dz, 1 - a * a, rtol=1e-12)
    dW, db, dx = fg.ops.dense_backward(x, W, torch.tensor(a, requires_grad=True), None,
                                       torch.ones(5, 4, dtype=torch.float64), "tanh")
    np.testing.assert_allclose(dW, x.numpy().T @ dz, rtol=1e-12)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    loss, _ = fg.ops.softmax_cross_entropy(logits, labels)
    F, plain = torch.nn.functional, logits.detach()
    assert loss == pytest.approx(float(F.cross_entropy(plain, labels)), rel=1e-12)
    target = torch.rand(5, 4, dtype=torch.float64)
    assert fg.ops.mse(logits, target)[0] == pytest.approx(
        float(F.mse_loss(plain, target)), rel=1e-12)
    assert fg.ops.bce_with_logits(logits, target)[0] == pytest.approx(
        float(F.binary_cross_entropy_with_logits(plain, target)), rel=1e-12)


def test_fused_mlp_frees_its_activations_at_backward():
    """As torch frees what nn.Linear saved: a loop that keeps its losses
    (to average them later) held every step's activations (6 MiB a step
    for a 1024-wide net); retain_graph=True keeps them for a second pass."""
    import tracemalloc
    torch.manual_seed(0)
    mlp = fgt.FusedMLP([64, 512, 512, 512, 4], activation="tanh")
    x, y = torch.randn(256, 64), torch.randint(0, 4, (256,))
    activations = 3 * 256 * 512 * 4          # bytes of the hidden layers' outputs
    torch.nn.functional.cross_entropy(mlp(x), y).backward()     # compiled, warm
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        loss = torch.nn.functional.cross_entropy(mlp(x), y)
        loss.backward()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < activations / 2, kept
    loss = torch.nn.functional.cross_entropy(mlp(x), y)
    first = torch.autograd.grad(loss, list(mlp.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(mlp.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, list(mlp.parameters()))


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_mlp_under_activation_checkpointing(reentrant):
    """torch.utils.checkpoint recomputes the forward in the backward: with
    dropout the module's counter drew new masks there (gradients 0.24-0.29
    off, silently), so that is refused; without dropout the gradients are
    those of the plain run."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    # reentrant checkpointing needs an input that requires grad
    xg = torch.randn(8, 5, dtype=torch.float64).requires_grad_(reentrant)
    plain = fgt.FusedMLP([5, 7, 7, 3], activation="tanh", norm="layer", dtype=torch.float64)
    plain(xg).square().sum().backward()
    want = [p.grad.clone() for p in plain.parameters()]
    plain.zero_grad()
    checkpoint(plain, xg, use_reentrant=reentrant).square().sum().backward()
    for p, g in zip(plain.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-12)
    dropped = fgt.FusedMLP([5, 7, 3], dropout=0.3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="checkpoint"):
        checkpoint(dropped, xg, use_reentrant=reentrant).sum().backward()
    dropped.eval()
    checkpoint(dropped, xg, use_reentrant=reentrant).sum().backward()


def test_fused_mlp_double_backward_raises():
    # the kernels' dx has no graph: a gradient penalty's term or a Hessian
    # read as 0 instead of failing (as @once_differentiable let through)
    torch.manual_seed(2)
    mlp = fgt.FusedMLP([3, 5, 1], activation="tanh", dtype=torch.float64)
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    u = mlp(x)
    with pytest.raises(RuntimeError, match="to_sequential"):
        torch.autograd.grad(u.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="to_sequential"):
        torch.autograd.functional.hessian(lambda v: mlp(v).sum(), x[0].detach())
    # a plain backward still works, and the Sequential twin takes the penalty
    (gx,) = torch.autograd.grad(mlp(x).sum(), x)
    seq = mlp.to_sequential()
    (gs,) = torch.autograd.grad(seq(x).sum(), x, create_graph=True)
    torch.testing.assert_close(gx, gs.detach())
    assert gs.requires_grad


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_fused_mlp_empty_batch_as_sequential(norm):
    """An empty batch gives what nn.Sequential gives: an empty output, zero
    gradients for every parameter and the input, and batch norm's count."""
    torch.manual_seed(3)
    mlp = fgt.FusedMLP([3, 5, 5, 2], activation="gelu", norm=norm, dropout=0.25,
                       residual=True)
    seq = mlp.to_sequential()
    for x_shape in ((0, 3), (2, 0, 3)):
        outs = []
        for net in (mlp, seq):
            x = torch.zeros(x_shape, requires_grad=True)
            y = net(x)
            y.sum().backward()
            outs.append((y.shape, x.grad.shape, [p.grad.clone() for p in net.parameters()]))
            net.zero_grad()
        assert outs[0][0] == outs[1][0] == x_shape[:-1] + (2,)
        assert outs[0][1] == outs[1][1] == x_shape
        for g_fused, g_seq in zip(outs[0][2], outs[1][2]):
            assert torch.equal(g_fused, g_seq) and not g_fused.any()
    assert mlp.dropout_step == 0
    if norm == "batch":
        assert all(int(m.num_batches_tracked) == 2 for m in mlp.modules()
                   if isinstance(m, torch.nn.BatchNorm1d))
        # the running statistics are untouched, as in torch
        assert all(not m.running_mean.any() for m in mlp.modules()
                   if isinstance(m, torch.nn.BatchNorm1d))


def test_fused_mlp_refuses_a_backward_after_its_input_changed_in_place():
    """backward reads the input's memory: changed in place after forward,
    torch raises as it does for nn.Sequential (the gradient was silently
    wrong); a fresh forward after the change is fine."""
    torch.manual_seed(0)
    mlp = fgt.FusedMLP([5, 7, 3], activation="tanh", dtype=torch.float64)
    for requires_grad in (False, True):
        x = torch.randn(4, 5, dtype=torch.float64, requires_grad=requires_grad)
        base = x.detach() if requires_grad else x
        y = mlp(x)
        base.mul_(10.0)
        with pytest.raises(RuntimeError, match="inplace"):
            y.sum().backward()
    mlp.zero_grad()
    mlp(base).sum().backward()
    seq = mlp.to_sequential()
    seq(base).sum().backward()
    grads = {n: p.grad for n, p in seq.named_parameters()}
    for name, p in mlp.named_parameters():
        torch.testing.assert_close(p.grad, grads[name])


# -- FusedMLP: dropout and residual blocks --------------------------------------------------

@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
def test_fused_mlp_blocks_gradcheck(activation):
    """Residual blocks with dropout: gradients at fixed masks (a fixed counter)."""
    torch.manual_seed(3)
    mlp = fgt.FusedMLP([4, 4, 4, 3], activation=activation, dtype=torch.float64, dropout=0.3,
                       residual=True, seed=5)
    drops = mlp._drops(7)
    assert all(d is not None for d in drops[:2]) and drops[2] is None
    params = list(mlp.parameters())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return fgt.mlp._FusedMLPFunction.apply(x, mlp._plan, drops, True, (None,) * 3, *ps)

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_fused_mlp_blocks_match_a_torch_reference_with_the_same_masks():
    from fastgrad.kernels.cpu import blocks
    torch.manual_seed(4)
    p = 0.25
    mlp = fgt.FusedMLP([6, 6, 5, 3], activation="tanh", dtype=torch.float64, dropout=p,
                       residual=True, seed=11)
    x = torch.randn(7, 6, dtype=torch.float64)
    y = mlp(x)                                     # training mode: dropout step 0
    assert mlp.dropout_step == 1
    drops = mlp._drops(0)
    lin = [m for m in mlp.modules() if isinstance(m, torch.nn.Linear)]
    ps = [t.detach().clone().requires_grad_() for m in lin for t in (m.weight, m.bias)]
    h = x
    for i in range(3):
        a = h @ ps[2 * i].T + ps[2 * i + 1]
        if i < 2:
            a = torch.tanh(a)
            drop, key, thresh, scale = drops[i]
            mask = np.empty((7, a.shape[1]))
            blocks.dropout_mask(key, thresh, mask)
            a = a * torch.tensor(mask) * scale
            assert 0 < mask.sum() < mask.size
        if i == 0:                                 # the one square hidden layer
            a = a + h
        h = a
    torch.testing.assert_close(y, h, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (h * w).sum().backward()
    for m_p, r_p in zip((t for m in lin for t in (m.weight, m.bias)), ps):
        torch.testing.assert_close(m_p.grad, r_p.grad, rtol=1e-12, atol=1e-12)
    # a second training forward draws new masks; eval mode none
    assert not torch.equal(mlp(x), y) and mlp.dropout_step == 2
    mlp.eval()
    torch.testing.assert_close(mlp(x), mlp.to_sequential().eval()(x), rtol=1e-12, atol=1e-12)
    assert mlp.dropout_step == 2


def test_fused_mlp_blocks_state_dict_is_to_torchs():
    mlp = fgt.FusedMLP([4, 8, 8, 3], activation="relu", dropout=0.1, residual=True)
    ref = fg.interop.to_torch(fg.MLP([4, 8, 8, 3], activation="relu", dropout=0.1,
                                     residual=True))
    assert list(mlp.state_dict()) == list(ref.state_dict())
    assert [type(m) for m in mlp.children()] == [type(m) for m in ref.children()]
    mlp.load_state_dict(ref.state_dict())
    mlp.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), ref.eval()(x), rtol=2e-5, atol=2e-6)
    with pytest.raises(ValueError, match="residual=True needs"):
        fgt.FusedMLP([4, 8, 3], residual=True)
    with pytest.raises(ValueError, match="dropout"):
        fgt.FusedMLP([4, 8, 3], dropout=1.0)


# -- FusedMLP: LayerNorm and BatchNorm1d -------------------------------------------------------

@pytest.mark.parametrize("norm,train", [("layer", True), ("batch", True), ("batch", False)])
def test_fused_mlp_norm_gradcheck(norm, train):
    torch.manual_seed(5)
    mlp = fgt.FusedMLP([4, 5, 5, 3], activation="tanh", dtype=torch.float64, norm=norm,
                       residual=True, dropout=0.2, seed=2)
    with torch.no_grad():                   # running statistics away from 0 / 1
        for m in mlp.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    drops = mlp._drops(3 if train else None)
    running = tuple((m.running_mean.numpy(), m.running_var.numpy())
                    if isinstance(m, torch.nn.BatchNorm1d) else None for m in mlp._norms)
    params = [p for p in mlp.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return fgt.mlp._FusedMLPFunction.apply(x, mlp._plan, drops, train, running, *ps)

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_fused_mlp_norm_matches_its_sequential(norm):
    torch.manual_seed(6)
    mlp = fgt.FusedMLP([5, 7, 7, 3], activation="relu", dtype=torch.float64, norm=norm,
                       residual=True)
    seq = mlp.to_sequential()
    ref = fg.interop.to_torch(fg.MLP([5, 7, 7, 3], norm=norm, residual=True))
    assert list(mlp.state_dict()) == list(seq.state_dict()) == list(ref.state_dict())
    for step in range(3):
        x = torch.randn(8, 5, dtype=torch.float64)
        w = torch.randn(8, 3, dtype=torch.float64)
        y1, y2 = mlp(x), seq(x)
        torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
        (y1 * w).sum().backward()
        (y2 * w).sum().backward()
        for (name, a), b in zip(mlp.named_parameters(), seq.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
            a.grad = b.grad = None
    for (name, a), b in zip(mlp.named_buffers(), seq.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    mlp.eval()
    seq.eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), seq(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mlp(x[:1]), seq(x[:1]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_fused_mlp_norm_float32(norm):
    torch.manual_seed(9)
    mlp = fgt.FusedMLP([6, 8, 4], activation="gelu", norm=norm, dropout=0.0)
    seq = mlp.to_sequential()
    x = torch.randn(16, 6)
    y1, y2 = mlp(x), seq(x)
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    for a, b in zip(mlp.parameters(), seq.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    for a, b in zip(mlp.buffers(), seq.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_mlp_weight_norm_matches_to_torch():
    torch.manual_seed(10)
    mlp = fgt.FusedMLP([5, 6, 6, 3], activation="elu", dtype=torch.float64, weight_norm=True,
                       norm="layer", residual=True)
    ref = fg.interop.to_torch(fg.MLP([5, 6, 6, 3], activation="elu", dtype="float64",
                                     weight_norm=True, norm="layer", residual=True))
    assert list(mlp.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(mlp.state_dict())
    x = torch.randn(7, 5, dtype=torch.float64)
    w = torch.randn(7, 3, dtype=torch.float64)
    y1, y2 = mlp(x), ref(x)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mlp.to_sequential()(x), y2, rtol=1e-10, atol=1e-10)
    (y1 * w).sum().backward()
    (y2 * w).sum().backward()
    for (name, a), b in zip(mlp.named_parameters(), ref.parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_fused_mlp_norm_refusals():
    with pytest.raises(ValueError, match="norm must be"):
        fgt.FusedMLP([3, 4, 2], norm="group")
    mlp = fgt.FusedMLP([3, 4, 2], norm="batch")
    with pytest.raises(ValueError, match="more than 1 sample"):
        mlp(torch.zeros(1, 3))
    # BatchNorm1d reads (N, C, L) with channels in dim 1: a 3-D input was
    # normalised per last feature, 0.42 off its Sequential (or ran where
    # the Sequential raises); a 1-D one is refused by torch too
    for shape in ((2, 6, 3), (3,)):
        with pytest.raises(ValueError, match="2-D input"):
            mlp(torch.zeros(shape))
    # the kernels' eps and momentum are constants: a child module changed to
    # others is refused (it was ignored: outputs 0.4 off its to_sequential())
    x = torch.randn(5, 3)
    for norm, attr, value in (("batch", "eps", 0.1), ("batch", "momentum", 0.5),
                              ("batch", "momentum", None), ("layer", "eps", 0.5)):
        mlp = fgt.FusedMLP([3, 4, 2], norm=norm)
        module = next(m for m in mlp.modules()
                      if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.LayerNorm)))
        mlp(x)
        setattr(module, attr, value)
        with pytest.raises(ValueError, match="eps 1e-05 and momentum 0.1"):
            mlp(x)
        mlp.to_sequential()(x)          # torch's modules run any


def test_torch_compile_runs_fastgrad_eagerly_inside_the_graph():
    """torch.compile of a training step around FusedMLP (dropout) and a
    fastgrad.torch optimizer: graph breaks at fastgrad's calls, the same
    parameters as the eager loop (it failed in TorchDynamo, and the
    optimizer's first step gathered one parameter's new state for all)."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)

    def train(compile_step):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            fgt.FusedMLP([5, 8, 8, 4], activation="tanh", dropout=0.25, seed=1,
                         dtype=torch.float64),
            torch.nn.Linear(4, 3, dtype=torch.float64))
        opt = fgt.Adam(model.parameters(), lr=1e-2, clip_norm=1.0)

        def step():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        run = torch.compile(step, backend="eager") if compile_step else step
        losses = [float(run().detach()) for _ in range(3)]
        return losses, [p.detach().clone() for p in model.parameters()], opt

    eager, compiled = train(False), train(True)
    assert compiled[0] == eager[0] and compiled[2].n_updates == 3
    for p, q in zip(eager[1], compiled[1]):
        assert torch.equal(p, q)


@pytest.mark.parametrize("hook", ["forward", "pre", "backward", "spectral_norm"])
def test_hooks_on_children_are_refused_and_on_the_module_run(hook):
    """FusedMLP never calls its children: their hooks would silently not run
    (spectral_norm's pre-hook: output 0.89 off nn.Sequential's)."""
    torch.manual_seed(0)
    mlp = fgt.FusedMLP([5, 8, 3], activation="tanh")
    x = torch.randn(4, 5)
    child = mlp._modules["0"]
    if hook == "forward":
        child.register_forward_hook(lambda m, i, o: o * 0)
    elif hook == "pre":
        child.register_forward_pre_hook(lambda m, i: None)
    elif hook == "backward":
        child.register_full_backward_hook(lambda m, gi, go: None)
    else:
        torch.nn.utils.spectral_norm(child)
    with pytest.raises(ValueError, match="hooks on its child Linear would never run"):
        mlp(x)
    seen = []
    plain = fgt.FusedMLP([5, 8, 3], activation="tanh")
    plain.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    plain(x)
    assert seen == [torch.Size([4, 3])]
    # a parametrization's modules run when .weight is read: their hooks do
    normed = fgt.FusedMLP([5, 8, 3], activation="tanh", weight_norm=True)
    normed._modules["0"].parametrizations.weight.register_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__))
    normed(x)
    assert seen[1:] == ["ParametrizationList"]

