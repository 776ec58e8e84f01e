"""Models with the explosion-toolkit layers on the GPU against the same
models on the CPU: the layer path, TrainStep (which runs the layer path on
CUDA for these models), eval mode, and checkpoints.

Marked ``cuda``: skipped where CUDA cannot run.  Both models start from the
same seed, so they hold the same weights and draw the same dropout masks
(the mask is a hash of (seed, layer, step, element) on both devices).
Tolerances: float32 relative 1e-5 per step (conftest.RTOL), looser after
many steps because CPU float32 transcendentals are polynomials and CUDA's
are libm (~1e-6 relative apart per evaluation).
"""
import numpy as np
import pytest

import fastgrad as fg

from conftest import assert_close, to_numpy

pytestmark = pytest.mark.cuda

VARIANTS = {
    "batchnorm": dict(norm="batch"),
    "layernorm": dict(norm="layer"),
    "dropout": dict(dropout=0.2),
    "residual": dict(residual=True),
    "weight_norm": dict(weight_norm=True),
    "all": dict(norm="batch", dropout=0.1, residual=True, weight_norm=True),
}


def _pair(variant, act, dtype="float32", sizes=(12, 24, 24, 24, 5)):
    kw = VARIANTS[variant]
    return tuple(fg.MLP(list(sizes), activation=act, dtype=dtype, device=dev, seed=3, **kw)
                 for dev in ("cpu", "cuda"))


def _data(rng, B=32, n_in=12, n_out=5):
    return rng.standard_normal((B, n_in)).astype(np.float32), rng.integers(0, n_out, B)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "silu"])
def test_layer_path_matches_cpu(cp, rng, variant, act):
    cpu, gpu = _pair(variant, act)
    assert_close(gpu.params, to_numpy(cpu.params), np.float32, what="initial params")
    x, y = _data(rng)
    dy = rng.standard_normal((x.shape[0], 5)).astype(np.float32)
    out_c, out_g = cpu.forward(x), gpu.forward(cp.asarray(x))
    assert isinstance(out_g, cp.ndarray)
    assert_close(out_g, out_c, np.float32, what="forward")
    dx_c = cpu.backward(dy)
    dx_g = gpu.backward(cp.asarray(dy))
    assert_close(gpu.grads, cpu.grads, np.float32, what="gradients")
    assert_close(dx_g, dx_c, np.float32, what="dL/dx")
    assert_close(gpu.running_mean, cpu.running_mean, np.float32, what="running mean")
    assert_close(gpu.running_var, cpu.running_var, np.float32, what="running var")
    gpu.eval(), cpu.eval()
    assert_close(gpu.predict(cp.asarray(x)), cpu.predict(x), np.float32, what="eval predict")


def test_dropout_zeroes_the_same_units(cp, rng):
    """The exact mask identity at model level: identity activation, so a
    unit is 0 after dropout exactly where the mask dropped it."""
    kw = dict(activation=None, dropout=0.5, seed=11, dtype="float64")
    cpu = fg.MLP([7, 40, 3], device="cpu", **kw)
    gpu = fg.MLP([7, 40, 3], device="cuda", **kw)
    x = rng.standard_normal((9, 7))
    for _ in range(3):                          # three steps: three masks
        cpu.forward(x), gpu.forward(cp.asarray(x))
        h_c = cpu._cache[1][0]                  # input of layer 1 = output of layer 0
        h_g = to_numpy(gpu._cache[1][0])
        np.testing.assert_array_equal(h_g == 0, h_c == 0)
    assert cpu.dropout_step == gpu.dropout_step == 3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_train_steps_match_cpu(cp, rng, variant):
    """20 TrainSteps with SGD + momentum + clipping on both devices from the
    same start.  (SGD, not Adam: Adam's update of a near-zero gradient
    component is +-lr whatever its size, so rounding-level differences in
    such components would show as lr-sized parameter differences.)"""
    cpu, gpu = _pair(variant, "tanh")
    steps = []
    for m in (cpu, gpu):
        opt = fg.SGD(m, lr=0.05, momentum=0.9, clip_norm=1.0)
        steps.append(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt))
    for t in range(20):
        x, y = _data(rng)
        lc = steps[0](x, y)
        lg = steps[1](x, y)
        assert_close(lg, lc, np.float32, rtol=1e-4, what=f"loss at step {t}")
        assert bool(steps[1].stats.skipped) == bool(steps[0].stats.skipped)
    assert_close(gpu.params, to_numpy(cpu.params), np.float32, rtol=1e-3,
                 what="params after 20 steps")
    assert_close(gpu.running_var, cpu.running_var, np.float32, rtol=1e-3, what="running var")


def test_checkpoint_round_trip_on_gpu(cp, rng, tmp_path):
    m = fg.MLP([6, 16, 16, 3], activation="relu", device="cuda", norm="batch", dropout=0.1,
               residual=True)
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.SGD(m, lr=0.1))
    x, y = rng.standard_normal((8, 6)).astype(np.float32), rng.integers(0, 3, 8)
    for _ in range(3):
        step(x, y)
    path = tmp_path / "m.safetensors"
    fg.save(path, m)
    back, _ = fg.load(path, device="cuda")
    np.testing.assert_array_equal(to_numpy(back.params), to_numpy(m.params))
    np.testing.assert_array_equal(to_numpy(back.running_mean), to_numpy(m.running_mean))
    np.testing.assert_array_equal(to_numpy(back.running_var), to_numpy(m.running_var))
    assert back.dropout_step == m.dropout_step
