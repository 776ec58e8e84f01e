"""Models with the explosion-toolkit layers on the GPU against the same
models on the CPU: the layer path, the fused TrainStep
(``kernels/cuda/step_blocks.py`` against ``kernels/cpu/step_blocks.py``),
eager and replayed from a CUDA graph, eval mode, and checkpoints.

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
def test_layer_path_matches_cpu(cuda_be, rng, variant, act):
    cpu, gpu = _pair(variant, act)
    assert_close(gpu.params, to_numpy(cpu.params), np.float32, what="initial params")
    x, y = _data(rng)
    dy = rng.standard_normal((x.shape[0], 5)).astype(np.float32)
    out_c, out_g = cpu.forward(x), gpu.forward(cuda_be.to_device(x))
    assert cuda_be.is_array(out_g)
    assert_close(out_g, out_c, np.float32, what="forward")
    dx_c = cpu.backward(dy)
    dx_g = gpu.backward(cuda_be.to_device(dy))
    assert_close(gpu.grads, cpu.grads, np.float32, what="gradients")
    assert_close(dx_g, dx_c, np.float32, what="dL/dx")
    assert_close(gpu.running_mean, cpu.running_mean, np.float32, what="running mean")
    assert_close(gpu.running_var, cpu.running_var, np.float32, what="running var")
    gpu.eval(), cpu.eval()
    assert_close(gpu.predict(cuda_be.to_device(x)), cpu.predict(x), np.float32,
                 what="eval predict")


def test_dropout_zeroes_the_same_units(cuda_be, rng):
    """The exact mask identity at model level: identity activation, so a
    unit is 0 after dropout exactly where the mask dropped it."""
    kw = dict(activation=None, dropout=0.5, seed=11, dtype="float64")
    cpu = fg.MLP([7, 40, 3], device="cpu", **kw)
    gpu = fg.MLP([7, 40, 3], device="cuda", **kw)
    x = rng.standard_normal((9, 7))
    for _ in range(3):                          # three steps: three masks
        cpu.forward(x), gpu.forward(cuda_be.to_device(x))
        h_c = cpu._cache[1][0]                  # input of layer 1 = output of layer 0
        h_g = to_numpy(gpu._cache[1][0])
        np.testing.assert_array_equal(h_g == 0, h_c == 0)
    assert cpu.dropout_step == gpu.dropout_step == 3


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_train_steps_match_cpu(cuda_be, rng, variant):
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


def test_checkpoint_round_trip_on_gpu(cuda_be, rng, tmp_path):
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


# -- the fused step ----------------------------------------------------------------------

# every feature alone and in combinations (residual blocks need equal widths:
# the hidden layers of FUSED_SIZES)
FUSED_VARIANTS = dict(VARIANTS, **{
    "layernorm+dropout": dict(norm="layer", dropout=0.3),
    "residual+dropout": dict(residual=True, dropout=0.25),
    "weight_norm+layernorm+residual": dict(weight_norm=True, norm="layer", residual=True),
    "batchnorm+dropout+weight_norm": dict(norm="batch", dropout=0.2, weight_norm=True),
})
FUSED_SIZES = (13, 19, 19, 7)
FUSED_TOL = {"float32": 2e-4, "float64": 1e-10}


def _fused_pair(variant, dtype, cuda_graph=False, act="tanh", opt=fg.SGD, **opt_kw):
    """A CPU and a CUDA TrainStep of the same model (same seed: same weights,
    same dropout masks).  SGD with momentum by default, as in
    test_train_steps_match_cpu: the bias before a batch norm has a gradient
    of rounding noise only, which Adam would turn into +-lr steps."""
    steps = []
    for dev in ("cpu", "cuda"):
        m = fg.MLP(list(FUSED_SIZES), activation=act, dtype=dtype, device=dev, seed=5,
                   **FUSED_VARIANTS[variant])
        o = opt(m, **(opt_kw or dict(lr=0.05, momentum=0.9, clip_norm=0.5)))
        steps.append(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), o,
                                  cuda_graph=cuda_graph and dev == "cuda"))
    assert steps[1]._kblocks is not None and not steps[1]._composed     # the fused step
    return steps


def _fused_batches(rng, n, dtype, bad=(), B=67, last=None):
    """n batches of B (67: over one row block of 64, so the column sums take
    their partials), the last one of ``last`` rows if given (an epoch's
    smaller last batch); those in ``bad`` hold a NaN."""
    out = []
    for t in range(n):
        rows = last if last is not None and t == n - 1 else B
        x = rng.standard_normal((rows, FUSED_SIZES[0])).astype(dtype)
        if t in bad:
            x[5, 3] = np.nan
        out.append((x, rng.integers(0, FUSED_SIZES[-1], rows)))
    return out


def _same_step(gpu, cpu, lg, lc, dtype, t):
    rtol = FUSED_TOL[dtype]
    sg, sc = gpu.stats, cpu.stats
    assert (bool(sg.skipped), int(sg.step)) == (bool(sc.skipped), int(sc.step)), f"step {t}"
    if sc.skipped:
        assert np.isnan(float(lg)) and np.isnan(lc)
        return
    assert_close(float(lg), lc, dtype, rtol=rtol, what=f"loss at step {t}")
    assert_close(sg.grad_norm, sc.grad_norm, np.float64, rtol=rtol, what=f"grad norm {t}")
    assert_close(sg.layer_norms, sc.layer_norms, np.float64, rtol=rtol, what=f"layer norms {t}")


def _same_state(gpu, cpu, dtype, what=""):
    rtol = FUSED_TOL[dtype]
    mg, mc = gpu.model, cpu.model
    assert_close(mg.params, mc.params, dtype, rtol=rtol, what=f"params {what}")
    for name, ref in cpu.opt.state.items():
        assert_close(gpu.opt.state[name], ref, dtype, rtol=rtol, what=f"{name} {what}")
    assert_close(mg.running_mean, mc.running_mean, np.float64, rtol=rtol, what=f"running mean {what}")
    assert_close(mg.running_var, mc.running_var, np.float64, rtol=rtol, what=f"running var {what}")
    assert mg.dropout_step == mc.dropout_step, f"dropout step {what}"
    assert gpu.opt.step_count == cpu.opt.step_count and gpu.opt.n_skipped == cpu.opt.n_skipped


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("variant", sorted(FUSED_VARIANTS))
def test_fused_step_matches_cpu(cuda_be, rng, variant, dtype, cuda_graph):
    """The fused CUDA step of every feature and combination gives the CPU
    fused step's losses, norms, skips, parameters, optimizer state, running
    statistics and dropout step, a non-finite batch (skipped: the dropout
    step and running statistics put back) included; eagerly and replayed
    from a CUDA graph; the last batch is smaller (its own buffers and graph)."""
    cpu, gpu = _fused_pair(variant, dtype, cuda_graph)
    for t, (x, y) in enumerate(_fused_batches(rng, 5, dtype, bad={2}, last=29)):
        lg = gpu(x, y)
        assert cuda_be.is_array(lg)
        lc = cpu(x, y)
        _same_step(gpu, cpu, lg, lc, dtype, t)
    _same_state(gpu, cpu, dtype, "after 5 steps")
    assert cpu.model.dropout_step == 4 and cpu.opt.n_skipped == 1
    if cuda_graph:
        assert sorted(key[0] for key in gpu._graphs) == [29, 67]
        assert gpu._graphs[max(gpu._graphs)].graph is not None       # B=67, replayed


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_fused_step_modes_and_counter_changes(cuda_be, rng, cuda_graph):
    """Train, eval (no dropout, running statistics), train again, and the
    dropout step set by hand, a layer-path forward and a checkpoint-style
    assignment in between: the device's counter follows the host's each
    time, and every step matches the CPU (one graph per mode)."""
    cpu, gpu = _fused_pair("batchnorm+dropout+weight_norm", "float64", cuda_graph,
                           opt=fg.SGD, lr=0.05, momentum=0.9, clip_norm=1.0)
    data = _fused_batches(rng, 9, "float64", bad={4})
    for t, (x, y) in enumerate(data):
        if t == 3:
            for s in (cpu, gpu):
                s.model.eval()
        if t == 5:
            for s in (cpu, gpu):
                s.model.train()
                s.model.dropout_step = 11
        if t == 7:
            for s in (cpu, gpu):
                s.model.forward(s.model._xp.asarray(x))      # advances the host counter
        lg, lc = gpu(x, y), cpu(x, y)
        _same_step(gpu, cpu, lg, lc, "float64", t)
    _same_state(gpu, cpu, "float64", "after the mode changes")
    assert cpu.model.dropout_step == 16
    if cuda_graph:
        modes = sorted(key[-1] for key in gpu._graphs)
        assert modes == [False, True]
        assert all(g.graph is not None for g in gpu._graphs.values())


def test_fused_gradients_match_cpu(cuda_be, rng):
    """TrainStep.gradients (forward and backward without the update) on the
    toolkit driver: the CPU's gradients and loss, and the dropout step
    advances on both (after a fused step, whose counter was on the device)."""
    cpu, gpu = _fused_pair("all", "float64")
    (x, y), (x2, y2) = _fused_batches(rng, 2, "float64")
    gpu(x, y), cpu(x, y)
    lg, lc = gpu.gradients(x2, y2), cpu.gradients(x2, y2)
    assert_close(float(lg), lc, np.float64, rtol=1e-10, what="loss")
    assert_close(gpu.model.grads, cpu.model.grads, np.float64, rtol=1e-10, what="gradients")
    assert gpu.model.dropout_step == cpu.model.dropout_step == 2


def test_fused_dropout_masks_follow_the_cpu(cuda_be, rng):
    """The masks of the fused step are the CPU's: with identity layers and a
    rate of 0.5, the first layer's output is 0 exactly where its mask drops,
    and it is read from the step's own buffer after steps with a skip."""
    steps = []
    for dev in ("cpu", "cuda"):
        m = fg.MLP([7, 40, 3], activation=None, dropout=0.5, seed=11, dtype="float64",
                   device=dev)
        steps.append(fg.TrainStep(m, fg.MSE(), fg.SGD(m, lr=0.01)))
    for t in range(4):
        x = rng.standard_normal((9, 7))
        if t == 1:
            x[0, 0] = np.nan
        y = rng.standard_normal((9, 3))
        for s in steps:
            s(x, y)
        acts = [to_numpy(s._buffers[9][0])[:9 * 40] for s in steps]
        np.testing.assert_array_equal(acts[1] == 0, acts[0] == 0)
        assert steps[1].model.dropout_step == steps[0].model.dropout_step
    assert steps[0].model.dropout_step == 3


def test_graph_refuses_a_frozen_dropout_step(cuda_be):
    """A graphed toolkit step with dropout in training mode reads its
    dropout step from device memory; a host int would freeze one mask into
    every replay, so the graph class refuses it."""
    from fastgrad.kernels.cuda import step_blocks
    m = fg.MLP([4, 6, 2], dropout=0.5, device="cuda")
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.SGD(m, lr=0.1), cuda_graph=True)
    acts, zs, fzs, xhats, nstats, nwork, delta = step._buffers_for(3)
    args = (step._loss_kind, m.params, m.grads, step._sizes, step._codes, step._alphas,
            step._drops, step._residual, step._norms, 1, 5, True, m.layer_offsets, acts, zs,
            fzs, xhats, m.running_mean, m.running_var, nstats, nwork, step._wn, step._weff,
            step._dweff, step._wnorm, delta, 1, m.params[:0], m.params[:0], m.params[:0],
            step._layer_sq, 0.0, 0.0, 3)
    with pytest.raises(ValueError, match="freeze one mask"):
        step_blocks.GraphedTrainStepBlocks(*args)
