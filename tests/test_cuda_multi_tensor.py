"""The CUDA multi-tensor update (fastgrad.kernels.cuda.multi_tensor) against
the flat CUDA update on the same data, bitwise, and CuPy (param, grad) pairs
in fastgrad's optimizers against the CPU pair path.

Run without a GPU on the host emulator:
``PYTHONPATH=tools/cuda_emulator python -m pytest -q -p conftest_plugin -m cuda
tests/test_cuda_multi_tensor.py``.
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad.backend import backend_for
from fastgrad.kernels.cpu import optim as cpu_optim

from conftest import DTYPES, assert_close, to_numpy

pytestmark = pytest.mark.cuda

# every rule, with the options that take other code paths in its kernel
CONFIGS = [
    (fg.SGD, dict(lr=0.1)),
    (fg.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (fg.Adam, dict(lr=1e-2, weight_decay=0.01)),
    (fg.Adam, dict(lr=1e-2, amsgrad=True, maximize=True)),
    (fg.AdamW, dict(lr=1e-2)),
    (fg.RMSprop, dict(lr=1e-2, momentum=0.5, centered=True)),
    (fg.RMSprop, dict(lr=1e-2)),
]
CLIPS = [dict(clip_norm=1.5), dict(clip_value=0.05), dict(clip_norm=0.7, clip_value=0.2)]


def _shapes(rng, n):
    """n tensors of odd sizes, one empty and one above a norm chunk (8192)."""
    shapes = [tuple(int(d) for d in rng.integers(1, 9, size=rng.integers(1, 3)))
              for _ in range(n)]
    if n >= 3:
        shapes[1] = (0,)
        shapes[2] = (8193 + 17,)
    return shapes


def _ids(c):
    return f"{c[0].__name__}-{'-'.join(sorted(c[1]))}"


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("config", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_kernel_matches_flat_kernel_bitwise(cuda_be, rng, config, dtype):
    from fastgrad.kernels.cuda import multi_tensor as kmt
    from fastgrad.kernels.cuda import optim as kopt
    cls, kw = config
    for n, clip in ((1, CLIPS[0]), (3, CLIPS[1]), (7, CLIPS[2]), (20, CLIPS[0])):
        shapes = _shapes(rng, n)
        sizes = np.array([int(np.prod(s)) for s in shapes], np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        host_p = [rng.standard_normal(s).astype(dtype) for s in shapes]
        # a CPU optimizer only to make the hp rows and state buffers
        opt = cls([(p.copy(), np.zeros_like(p)) for p in host_p], **kw, **clip)
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


def test_kernel_rejects_bad_input(cuda_be):
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


def _pair_run(be, cls, kw, host_p, host_gs, groups=None):
    """Run ``cls`` on (param, grad) pairs of backend ``be``'s arrays over the
    gradient list; returns the params after each update and the StepStats."""
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


@pytest.mark.parametrize("dtype", DTYPES, ids=[np.dtype(d).name for d in DTYPES])
@pytest.mark.parametrize("config", CONFIGS, ids=[_ids(c) for c in CONFIGS])
def test_cupy_pairs_match_cpu_pairs(cuda_be, rng, config, dtype):
    """fg.<Optimizer> on CuPy pairs (CUDA multi-tensor path) against NumPy
    pairs (CPU multi-tensor path): params, state, StepStats and counters,
    incl. a skipped NaN update.  The GPU sums the norm's blocks in a tree,
    the CPU in order, so norms agree to 1e-13 and the updates to the
    dtype's tolerance (GPU multi == GPU flat is the bitwise test above)."""
    cls, kw = config
    shapes = _shapes(rng, 5)
    host_p = [rng.standard_normal(s).astype(dtype) for s in shapes]
    host_gs = [[(rng.standard_normal(s) * (3.0 if t % 3 == 0 else 0.2)).astype(dtype)
                for s in shapes] for t in range(7)]
    host_gs[3][0].reshape(-1)[0] = np.nan
    kw = dict(kw, clip_norm=1.0, clip_value=0.5)
    gpu, gp, gst = _pair_run(cuda_be, cls, kw, host_p, host_gs)
    cpu, cpp, cst = _pair_run(backend_for("cpu"), cls, kw, host_p, host_gs)
    assert gpu.device == "cuda" and cpu.device == "cpu"
    for t in range(len(host_gs)):
        for a, b in zip(gp[t], cpp[t]):
            assert_close(a, b, dtype, what=f"params after update {t}")
        g, c = gst[t], cst[t]
        assert (g.step, g.skipped, g.clipped) == (c.step, c.skipped, c.clipped)
        assert g.lr == c.lr
        if c.skipped:
            assert np.isnan(g.grad_norm) and np.isnan(c.grad_norm)
        else:
            assert_close(g.grad_norm, c.grad_norm, np.float64, rtol=1e-13, what="norm")
            assert_close(g.clip_scale, c.clip_scale, np.float64, rtol=1e-13, what="scale")
            assert_close(g.layer_norms, c.layer_norms, np.float64, rtol=1e-13, what="norms")
    assert (gpu.step_count, gpu.n_skipped) == (cpu.step_count, cpu.n_skipped) == (6, 1)
    for name in gpu.state:
        assert_close(gpu.state[name], cpu.state[name], dtype, what=name)


def test_cupy_pairs_with_param_groups(cuda_be, rng):
    """Groups of CuPy pairs: each pair updated with its group's hp block."""
    shapes = [(3, 5), (7,), (2, 2), (11,)]
    host_p = [rng.standard_normal(s) for s in shapes]
    host_gs = [[rng.standard_normal(s) for s in shapes] for _ in range(4)]
    groups = [([0, 2], {"lr": 0.05}), ([1, 3], {"weight_decay": 0.1, "lr": 0.001})]
    kw = dict(lr=0.01, clip_norm=2.0)
    gpu, gp, gst = _pair_run(cuda_be, fg.AdamW, kw, host_p, host_gs, groups)
    cpu, cpp, cst = _pair_run(backend_for("cpu"), fg.AdamW, kw, host_p, host_gs, groups)
    for t in range(4):
        for a, b in zip(gp[t], cpp[t]):
            assert_close(a, b, np.float64, what=f"params after update {t}")
        assert gst[t].lr == cst[t].lr
        assert_close(gst[t].grad_norm, cst[t].grad_norm, np.float64, rtol=1e-13, what="norm")
    # the groups' rates differ, so a wrong row per pair would show
    assert not np.allclose(gp[-1][0] - host_p[0], 0.0)


def test_cupy_pairs_bad_input(cuda_be):
    p = cuda_be.alloc((4, 4), np.float64, fill=0)
    with pytest.raises(ValueError, match="C-contiguous"):
        fg.Adam([(p[:, 1], cuda_be.alloc(4, np.float64, fill=0))], lr=0.1)
    with pytest.raises(TypeError, match="one device"):
        fg.Adam([(cuda_be.alloc(3, np.float64, fill=0), cuda_be.alloc(3, np.float64, fill=0)),
                 (np.zeros(3), np.zeros(3))], lr=0.1)
    with pytest.raises(TypeError, match="NumPy arrays or CuPy"):
        fg.Adam([(cuda_be.alloc(3, np.float64, fill=0), np.zeros(3))], lr=0.1)
    with pytest.raises(TypeError, match="dtype"):
        fg.Adam([(cuda_be.alloc(3, np.float32, fill=0), cuda_be.alloc(3, np.float64, fill=0))],
                lr=0.1)


def test_cupy_pairs_skip_nonfinite_false_raises(cuda_be):
    p, g = cuda_be.alloc(5, np.float64, fill=1), cuda_be.alloc(5, np.float64, fill=1)
    opt = fg.SGD([(p, g)], lr=0.1, skip_nonfinite=False)
    g[2] = np.nan
    with pytest.raises(fg.NonFiniteGradientError):
        opt.step()
    np.testing.assert_array_equal(to_numpy(p), np.ones(5))


def test_cupy_pairs_checkpoint_round_trip(cuda_be, rng):
    """state_dict of an optimizer on CuPy pairs loads into a fresh one, which
    then continues bitwise as the original."""
    shapes = [(3, 4), (5,), (1,)]
    ps = [cuda_be.to_device(rng.standard_normal(s)) for s in shapes]
    gs = [cuda_be.to_device(rng.standard_normal(s)) for s in shapes]
    opt = fg.Adam(list(zip(ps, gs)), lr=0.1, clip_norm=1.0)
    opt.step()
    opt.step()
    assert to_numpy(opt.params).tobytes() == np.concatenate(
        [to_numpy(p).ravel() for p in ps]).tobytes()
    ps2 = [p.copy() for p in ps]
    opt2 = fg.Adam(list(zip(ps2, [g.copy() for g in gs])), lr=0.1, clip_norm=1.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.step_count == 2
    opt.step()
    opt2.step()
    for a, b in zip(ps, ps2):
        assert to_numpy(a).tobytes() == to_numpy(b).tobytes()
    opt.zero_grad()
    assert not any(to_numpy(g).any() for g in gs)


def test_kernel_strides_over_tensors_past_grid_y(cuda_be, rng, monkeypatch):
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
    opt = fg.SGD([(p.copy(), np.zeros_like(p)) for p in host_p], lr=0.1, momentum=0.9,
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
