"""The torch-named schedules against ``torch.optim.lr_scheduler``, step by step.

Each test drives a torch scheduler on an optimizer over one dummy parameter
and compares the lr it gives update k (after k calls of ``step()``) with
``schedule(k)``.
"""
import json
import math

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import schedules as S

torch = pytest.importorskip("torch", reason="torch parity needs PyTorch (pip install 'fastgrad[peers]')")
lrs = torch.optim.lr_scheduler


def _torch_opt(lr):
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    return torch.optim.SGD([p], lr=lr)


def _torch_sequence(make, n, lr=0.1):
    opt = _torch_opt(lr)
    sched = make(opt)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _close(ours, theirs, rtol=1e-12):
    ours, theirs = np.asarray(ours, float), np.asarray(theirs, float)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-300)


@pytest.mark.parametrize("T_max,eta_min", [(7, 0.0), (10, 0.003), (1, 0.01)])
def test_cosine_annealing_past_horizon(T_max, eta_min):
    n = 5 * T_max + 3
    ref = _torch_sequence(lambda o: lrs.CosineAnnealingLR(o, T_max=T_max, eta_min=eta_min), n)
    s = S.CosineAnnealingLR(0.1, T_max, eta_min)
    _close([s(k) for k in range(n)], ref)
    # past T_max it climbs back, unlike cosine_decay (optax), which holds
    held = S.cosine_decay(0.1, T_max, eta_min / 0.1)
    assert held(2 * T_max) == pytest.approx(eta_min)
    assert s(2 * T_max) == pytest.approx(0.1)


@pytest.mark.parametrize("total,power", [(5, 1.0), (13, 2.0), (8, 0.5)])
def test_polynomial(total, power):
    n = total + 6
    ref = _torch_sequence(lambda o: lrs.PolynomialLR(o, total_iters=total, power=power), n)
    s = S.PolynomialLR(0.1, total, power)
    _close([s(k) for k in range(n)], ref)
    assert s(total) == 0.0 and s(total + 3) == 0.0


@pytest.mark.parametrize("strategy", ["cos", "linear"])
@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("total,pct", [(100, 0.3), (37, 0.25), (11, 0.5)])
def test_one_cycle(strategy, three_phase, total, pct):
    kw = dict(max_lr=0.05, total_steps=total, pct_start=pct, anneal_strategy=strategy,
              div_factor=20.0, final_div_factor=300.0, three_phase=three_phase)
    ref = _torch_sequence(lambda o: lrs.OneCycleLR(o, cycle_momentum=False, **kw), total)
    s = S.OneCycleLR(**kw)
    _close([s(k) for k in range(total)], ref)
    s(total)                          # torch allows stepping to total_steps
    with pytest.raises(ValueError, match="total_steps"):
        s(total + 1)


def _plateau_metrics(rng, n):
    # improving, then flat with noise, then a spike: every branch runs
    base = np.concatenate([np.linspace(1.0, 0.5, n // 3), np.full(n - n // 3, 0.5)])
    return base + rng.uniform(-1e-5, 1e-5, n) * (np.arange(n) > n // 2)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(mode="max", patience=2, factor=0.5),
    dict(patience=1, cooldown=2, factor=0.3, min_lr=1e-3),
    dict(patience=0, threshold=0.01, threshold_mode="abs", factor=0.5, eps=1e-3),
    dict(patience=3, threshold_mode="abs", threshold=0.0),
])
def test_reduce_on_plateau(rng, kw):
    n = 60
    metrics = _plateau_metrics(rng, n)
    if kw.get("mode") == "max":
        metrics = 2.0 - metrics          # positive: rel thresholds read as intended
    opt = _torch_opt(0.1)
    ref_sched = lrs.ReduceLROnPlateau(opt, **kw)
    ours = S.ReduceLROnPlateau(0.1, **kw)
    for k, m in enumerate(metrics):
        assert ours(k) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), k
        ref_sched.step(float(m))
        ours.step(m)
    assert ours.scale < 1.0               # the run did reduce


@pytest.mark.parametrize("base, lrs_, kw", [
    (0.01, (0.5, 0.02), dict(patience=0, factor=0.5, min_lr=0.005)),   # base stops at min_lr
    (1e-8, (0.1, 3e-8), dict(patience=0, factor=0.5)),                 # base cut below eps
    (0.1, (1e-3, 0.3), dict(patience=1, factor=0.3, min_lr=2e-3, cooldown=1, eps=1e-4)),
])
def test_reduce_on_plateau_cuts_each_group_on_its_own_rate(base, lrs_, kw):
    # torch decides each param_group's cut on its own lr: the base group at
    # min_lr (or cut by no more than eps) stopped every group's cuts here
    metrics = [5.0] + [6.0] * 14
    model = fg.MLP([3, 4, 4, 2], seed=0)
    views = list(model.parameters())
    ours = fg.SGD(model, lr=S.ReduceLROnPlateau(base, **kw), param_groups=[
        {"params": views[:2]}, {"params": views[2:4], "lr": lrs_[0]},
        {"params": views[4:], "lr": lrs_[1]}])
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    theirs = torch.optim.SGD([{"params": [ps[0]]}, {"params": [ps[1]], "lr": lrs_[0]},
                              {"params": [ps[2]], "lr": lrs_[1]}], lr=base)
    sched = lrs.ReduceLROnPlateau(theirs, **kw)
    seen = []
    for m in metrics:
        ours.step()
        theirs.step()
        got = [g["lr"] for g in ours.param_groups]
        _close(got, [g["lr"] for g in theirs.param_groups])
        seen.append(got)
        ours.lr_schedule.step(m)
        sched.step(m)
    assert seen[-1][2] < lrs_[1]          # the run did cut (a group below min_lr stays)
    # a checkpoint's schedule continues every group's rates
    again = fg.SGD(model, lr=S.from_config(json.loads(json.dumps(
        ours.lr_schedule.to_config()))), param_groups=[
        {"params": views[:2]}, {"params": views[2:4], "lr": lrs_[0]},
        {"params": views[4:], "lr": lrs_[1]}])
    assert [g["lr"] for g in again.param_groups] == [g["lr"] for g in ours.param_groups]


def test_reduce_on_plateau_reads_a_one_scale_checkpoint():
    # fastgrad 0.1.0 kept one scale for all groups: it reads as that many cuts
    old = {"kind": "reduce_on_plateau", "lr": 0.1, "mode": "min", "factor": 0.5,
           "patience": 0, "threshold": 1e-4, "threshold_mode": "rel", "cooldown": 0,
           "min_lr": 0.0, "eps": 1e-8,
           "state": {"scale": 0.125, "best": 1.0, "num_bad_epochs": 0, "cooldown_counter": 0,
                     "last_epoch": 4, "last_k": 40}}
    s = S.from_config(old)
    assert s.scale == 0.125 and s(41) == pytest.approx(0.0125, rel=1e-15)
    assert s.state["reductions"] == [40, 40, 40]


def test_reduce_on_plateau_config_round_trip_keeps_progress(rng):
    s = S.ReduceLROnPlateau(S.cosine_decay(0.1, 50), patience=1, factor=0.5)
    for m in [1.0, 1.0, 1.0, 1.0, 0.5]:
        s.step(m)
    s(7)
    cfg = json.loads(json.dumps(s.to_config(), allow_nan=False))
    t = S.from_config(cfg)
    assert t == s and t.scale == s.scale == 0.5 and t.best == 0.5
    assert [t(k) for k in range(10)] == [s(k) for k in range(10)]
    fresh = S.from_config(S.ReduceLROnPlateau(0.1).to_config())
    assert fresh.best == math.inf and fresh.scale == 1.0


def test_new_schedules_checkpoint(tmp_path, rng):
    model = fg.MLP([3, 4, 2], dtype="float64", seed=1)
    for sched in (S.OneCycleLR(0.1, 20), S.PolynomialLR(0.1, 9, 2.0),
                  S.CosineAnnealingLR(0.1, 5, 0.01), S.ReduceLROnPlateau(0.02, patience=0)):
        opt = fg.Adam(model, lr=sched)
        if isinstance(sched, S.reduce_on_plateau):
            sched.step(1.0)
            sched.step(2.0)
        fg.save(tmp_path / "c.fgz", model, opt)
        _, opt2 = fg.load(tmp_path / "c.fgz")
        assert opt2.lr_schedule == sched
        assert [opt2.lr_schedule(k) for k in range(10)] == [sched(k) for k in range(10)]


@pytest.mark.parametrize("bad", [
    lambda: S.OneCycleLR(0.1, 10, pct_start=1.5),
    lambda: S.OneCycleLR(0.1, 10, anneal_strategy="exp"),
    lambda: S.OneCycleLR(0.1, 0),
    lambda: S.PolynomialLR(0.1, 0),
    lambda: S.CosineAnnealingLR(-0.1, 5),
    lambda: S.ReduceLROnPlateau(0.1, mode="up"),
    lambda: S.ReduceLROnPlateau(0.1, factor=1.0),
    lambda: S.ReduceLROnPlateau(0.1, threshold_mode="pct"),
    lambda: S.ReduceLROnPlateau(0.1, patience=-1),
])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        bad()
