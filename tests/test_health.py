"""fastgrad.health.GradientMonitor on real optimizer statistics."""
import numpy as np
import pytest

from fastgrad.health import GradientMonitor
from fastgrad.optim import Adam


class FlatModel:
    def __init__(self, sizes):
        self.layer_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.params = np.zeros(self.layer_offsets[-1])
        self.grads = np.zeros_like(self.params)


def run(grads_per_step, sizes=(6, 4)):
    model = FlatModel(sizes)
    opt = Adam(model, clip_norm=1.0)
    mon = GradientMonitor(explode_factor=10.0, window=20, min_history=5,
                          vanish_floor=1e-6, layer_names=["hidden", "out"])
    flagged = []
    for g in grads_per_step:
        model.grads[:] = g
        flagged.append(mon.record(opt.step()))
    return mon, flagged


def test_healthy_run_raises_nothing():
    rng = np.random.default_rng(0)
    mon, flagged = run(rng.uniform(0.5, 1.0, (30, 10)))
    assert mon.healthy and not any(flagged) and len(mon) == 30
    assert "healthy" in mon.summary() and "hidden" in mon.summary()


def test_explosion_nonfinite_and_vanishing_are_flagged():
    rng = np.random.default_rng(1)
    gs = rng.uniform(0.5, 1.0, (30, 10))
    gs[3] *= 1e3          # too early: fewer than min_history norms seen
    gs[12] *= 1e3         # explosion
    gs[15, 2] = np.nan    # non-finite
    gs[20:, 6:] = 0.0     # the output layer stops learning
    mon, flagged = run(gs)
    assert [e.kind for e in flagged[12]] == ["explosion"]
    assert flagged[12][0].value > flagged[12][0].threshold
    assert not flagged[3]
    assert [e.kind for e in flagged[15]] == ["nonfinite"]
    assert all(e.kind == "vanishing" and e.layer == 1 for f in flagged[20:] for e in f)
    assert mon.count("vanishing") == 10 and mon.count("explosion") == 1
    assert mon.count("nonfinite") == 1 and mon.skipped[15]
    text = str(mon)
    assert "1 skipped" in text and "explosion: 1 event(s) at steps 12" in text
    assert "out" in text and "<- vanishing" in text
    # the numbers are the optimizer's own norm pass
    np.testing.assert_allclose(mon.grad_norms[0], np.linalg.norm(gs[0]), rtol=1e-12)
    np.testing.assert_allclose(mon.layer_norms[0], [np.linalg.norm(gs[0, :6]),
                                                    np.linalg.norm(gs[0, 6:])], rtol=1e-12)


def test_empty_summary_and_bad_arguments():
    assert "no steps" in GradientMonitor().summary()
    with pytest.raises(ValueError):
        GradientMonitor(explode_factor=0.5)
    with pytest.raises(ValueError):
        GradientMonitor(window=0)
    # a window shorter than min_history never flagged an explosion
    with pytest.raises(ValueError, match="min_history <= window"):
        GradientMonitor(window=5, min_history=10)
    for bad in ({"window": 1.5}, {"min_history": "3"}, {"vanish_floor": None},
                {"explode_factor": "10"}):
        with pytest.raises(TypeError):
            GradientMonitor(**bad)


class _Stats:
    def __init__(self, norm):
        self.grad_norm, self.clip_scale, self.lr, self.skipped = norm, 1.0, 0.1, False
        self.layer_norms = [norm]


def test_explosion_after_min_history_and_none_over_a_zero_median():
    mon = GradientMonitor(window=10, min_history=10, vanish_floor=0.0)
    for _ in range(30):
        assert mon.record(_Stats(1.0)) == []
    [event] = mon.record(_Stats(1e6))
    assert (event.kind, event.threshold) == ("explosion", 10.0)
    # gradients exactly 0 so far: 1e-30 is no explosion (the bound was 0)
    zero = GradientMonitor(window=10, min_history=10, vanish_floor=0.0)
    for _ in range(10):
        zero.record(_Stats(0.0))
    assert zero.record(_Stats(1e-30)) == []
