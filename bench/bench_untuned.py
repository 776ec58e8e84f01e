"""bench/untuned_compare.py (MLPs nobody tuned on, against issue #19's
targets) in its smoke mode: tiny drawn workloads, one short round, the
peers' step check included.  Not a benchmark: it checks that the script
runs and that its check catches a peer computing another step, so that the
CI's ``pytest bench --benchmark-disable`` keeps it working.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/untuned_compare.py   # the measurement
"""
import functools

import numpy as np
import pytest

import untuned_compare
from step_compare import Threads
from workloads import (data, initial_params, make_fastgrad, make_gemms_then_update,
                       make_jax, make_torch)


def test_untuned_compare_smoke(capsys):
    assert untuned_compare.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "Workloads meeting each target:" in out
    assert "Small nets meeting the target" in out


def test_the_floor_runs_its_gemms_on_the_models_memory():
    """The floor's GEMMs write the model's own weight gradients, from which
    its update then moves the model's parameters."""
    run = make_gemms_then_update([13, 9, 5], 11, "relu", "mse")
    before = np.array(run.model.params)
    run()
    hs, _, dzs, _, _ = run.operands
    for i, layer in enumerate(run.model.layers):
        np.testing.assert_allclose(layer.dW, hs[i].T @ dzs[i], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(run.model.params, before)


@pytest.mark.parametrize("peer", ["jax", "torch"])
def test_step_check_catches_another_step(peer):
    """A peer with another activation fails the check; the same peer built
    right passes it."""
    pytest.importorskip("optax" if peer == "jax" else "torch")
    make = make_jax if peer == "jax" else make_torch
    sizes, batch, loss = [13, 9, 5], 11, "softmax_cross_entropy"
    init = initial_params(sizes, "relu")
    threads = Threads()
    fns = {"fastgrad": (make_fastgrad(sizes, batch, "relu", loss), None, None),
           "same": (make(sizes, batch, "relu", loss, init=init), None, None),
           "other activation": (make(sizes, batch, "silu", loss, init=init), None, None)}
    worst, problems = untuned_compare.check_losses(untuned_compare.checked_warm_up(fns, threads))
    assert len(problems) == 1 and problems[0].startswith("other activation:"), problems
    assert worst > untuned_compare.CHECK_RTOL
    fns.pop("other activation")
    _, problems = untuned_compare.check_losses(untuned_compare.checked_warm_up(fns, threads))
    assert problems == []


def test_step_check_catches_a_missing_clip():
    """Adam barely sees clipping in a few steps (it rescales the gradient),
    so the tolerance must be tight enough for it: the same step without
    clipping, where the gradient norm is well above the clip (3.1 here),
    fails (its loss at step 3 is 2.7e-4 of the loss away)."""
    import fastgrad as fg
    from fastgrad.losses import LOSSES
    sizes, batch, act, loss = [37, 61, 45, 7], 33, "relu", "mse"
    model = fg.MLP(sizes, activation=act, seed=0)
    unclipped = fg.TrainStep(model, LOSSES[loss](), fg.Adam(model, lr=1e-3, clip_norm=None))
    fns = {"fastgrad": (make_fastgrad(sizes, batch, act, loss), None, None),
           "unclipped": (functools.partial(unclipped, *data(sizes, batch, loss)), None, None)}
    _, problems = untuned_compare.check_losses(untuned_compare.checked_warm_up(fns, Threads()))
    assert len(problems) == 1 and problems[0].startswith("unclipped:"), problems
    assert unclipped.stats.grad_norm > 1.0
