"""What only the CUDA kernels (fastgrad.kernels.cuda) have: their reductions,
updates and whole steps against their CPU twins, the own GEMM, and a compile
check of every kernels/cuda/*.cu.  The activation, dense and loss kernels are
tested once for every device in tests/test_kernels.py.

Tests marked ``cuda`` need CuPy and a GPU (skipped otherwise, by conftest and
by the ``cp`` fixture).  ``test_cu_sources_compile`` needs only ``nvcc``.

Tolerances: float32 relative 1e-5, float64 1e-12 (conftest.RTOL).  The GPU
uses precise CUDA libm where the CPU's float32 kernels use polynomials, so
float32 transcendentals differ by ~1e-6 relative; + * / sqrt round alike
(both sides compile without FMA contraction), so the optimizer update is
bitwise equal given equal inputs -- in float32 as long as no value is
subnormal (the GPU flushes them: tests/test_cuda_subnormals.py).
"""
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import ops
from fastgrad.kernels import cpu as kcpu
from fastgrad.kernels.cpu import optim as cpu_optim
from fastgrad.kernels.cpu import reduce as cpu_reduce
from fastgrad.kernels.cpu import step as cpu_step
from fastgrad.kernels.cpu.activations import CODES

from conftest import DTYPES, RULES, assert_close, dense_inputs, to_numpy
from conftest import OPTIMIZERS as _OPT_CLS

CU_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "kernels", "cuda")


def _ids(values):
    return [np.dtype(v).name if isinstance(v, type) else str(v) for v in values]


# --- compile check (no GPU needed) ---------------------------------------------

def _cu_files():
    return sorted(f for f in os.listdir(CU_DIR) if f.endswith(".cu"))


def test_cu_sources_compile(tmp_path):
    """Every .cu, as the loader hands it to NVRTC (local includes pasted, the
    activation table generated from kernels/spec.py) and as the file stands,
    compiles warning-free for sm_80; the NVRTC text includes no file, and
    nvcc's instantiations are exactly the loader's name_expressions."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    _module = pytest.importorskip("fastgrad.kernels.cuda._module")
    files = _cu_files()
    assert files, "no kernels/cuda/*.cu"
    emitted = {p.name: p for p in _module.emit(tmp_path / "src")}
    assert sorted(emitted) == files
    for f in files:
        text = emitted[f].read_text()
        assert text == _module.source(f)
        assert not re.search(r"^\s*#\s*include", text, re.MULTILINE), \
            f"{f}: the NVRTC source still includes a file"
        ptx = tmp_path / (f + ".ptx")
        res = subprocess.run([nvcc, "--ptx", "-arch=sm_80", "-std=c++17", "-Werror",
                              "all-warnings", "-o", str(ptx), str(emitted[f])],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{f} as NVRTC sees it:\n{res.stderr}"
        assert "warning" not in res.stderr.lower(), res.stderr
        # and as it stands in the package, with its includes (nvcc on the file)
        raw = subprocess.run([nvcc, "--ptx", "-arch=sm_80", "-std=c++17", "-Werror",
                              "all-warnings", "-o", os.devnull, os.path.join(CU_DIR, f)],
                             capture_output=True, text=True, timeout=120)
        assert raw.returncode == 0, f"{f}:\n{raw.stderr}"
        assert "warning" not in raw.stderr.lower(), raw.stderr
        entries = re.findall(r"\.entry\s+(\w+)\(", ptx.read_text())
        want = _module.NAMES.get(f)
        assert want is not None, f"{f} has no name_expressions in the loader"
        assert len(entries) == len(want), (f, entries, want)
        for base in {n.split("<")[0] for n in want}:
            names = [n for n in want if n.split("<")[0] == base]
            # a template's instances mangle as <len><name>I..., a plain kernel without the I
            mangled = re.compile(f"_Z{len(base)}{base}" + ("I" if "<" in names[0] else "(?!I)"))
            got = sum(1 for e in entries if mangled.match(e))
            assert got == len(names), (f, base, entries)


def test_import_without_cupy_is_clear(monkeypatch):
    """``import fastgrad`` never imports cupy; the CUDA package names the extra."""
    import sys
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import fastgrad\n"
            "try:\n    import fastgrad.kernels.cuda\nexcept ImportError as e:\n"
            "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "ERR" in out.stdout and "fastgrad[cuda]" in out.stdout, out.stdout + out.stderr


# --- norms and optimizer updates ------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
def test_layer_sumsq_and_determinism(cp, rng, dtype):
    from fastgrad.kernels.cuda import reduce as kreduce
    offsets = np.array([0, 5, 5, 100_003, 100_013, 300_000], np.int64)
    g = rng.standard_normal(offsets[-1]).astype(dtype)
    lsq_c = np.empty(offsets.size - 1)
    tot_c = cpu_reduce.layer_sumsq(g, offsets, lsq_c)
    gg = cp.asarray(g)
    runs = []
    for _ in range(2):
        lsq = cp.empty(offsets.size - 1, np.float64)
        tot = kreduce.layer_sumsq(gg, offsets, lsq)
        runs.append((float(tot), to_numpy(lsq)))
    assert runs[0][0] == runs[1][0] and np.array_equal(runs[0][1], runs[1][1])
    assert_close(runs[0][0], tot_c, np.float64, rtol=1e-13)
    assert_close(runs[0][1], lsq_c, np.float64, rtol=1e-13)
    gg[7] = np.nan
    assert not np.isfinite(float(kreduce.layer_sumsq(gg, offsets, lsq)))


class _Flat:
    def __init__(self, p, g, offsets):
        self.params, self.grads, self.layer_offsets = p, g, offsets


_OPT_KW = {
    "sgd": [dict(lr=0.1), dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
            dict(lr=0.05, momentum=0.9, nesterov=True, clip_value=0.5)],
    "adam": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, clip_value=0.3)],
    "adamw": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True)],
    "rmsprop": [dict(lr=1e-2), dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)],
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("rule", RULES)
def test_clipped_update_matches_cpu(cp, rng, rule, dtype):
    """50 updates per configuration on the same gradients: GPU == CPU to the
    dtype's tolerance (bitwise in practice), incl. a skipped NaN step."""
    from fastgrad.kernels.cuda import optim as kopt
    offsets = np.array([0, 300, 317, 1000], np.int64)
    for kw in _OPT_KW[rule]:
        p = rng.standard_normal(offsets[-1]).astype(dtype)
        flat = _Flat(p.copy(), np.zeros_like(p), offsets)
        opt = _OPT_CLS[rule](flat, clip_norm=2.0, **kw)
        pg = cp.asarray(p)
        _, s0, s1, s2, _ = opt._kernel_args()
        sg = [cp.asarray(s) for s in (s0, s1, s2)]
        lsq = cp.empty(offsets.size - 1, np.float64)
        for t in range(50):
            g = (rng.standard_normal(p.size) * (5.0 if t % 7 == 0 else 0.5)).astype(dtype)
            if t == 13:
                g[3] = np.nan
            flat.grads[:] = g
            rule_code, s0, s1, s2, hp = opt._kernel_args()
            ng, sc, sk = kopt.clipped_update(rule_code, pg, cp.asarray(g), *sg, hp, offsets, lsq,
                                             opt._clip_norm, opt._clip_value)
            norm, scale, skipped = cpu_optim.clipped_update(
                rule_code, flat.params, flat.grads, s0, s1, s2, hp, offsets, opt._layer_sq,
                opt._clip_norm, opt._clip_value)
            opt._commit(norm, scale, skipped, opt._layer_sq)
            assert bool(sk) == bool(skipped) == (t == 13)
            if not skipped:
                assert_close(float(ng), norm, np.float64, rtol=1e-13, what="norm")
                assert_close(float(sc), scale, np.float64, rtol=1e-13, what="scale")
            assert_close(lsq, opt._layer_sq, np.float64, rtol=1e-13, what="layer_sq")
            assert_close(pg, flat.params, dtype, what=f"{rule} {kw} params at step {t}")
            for a, b in zip(sg, (s0, s1, s2)):
                assert_close(a, b, dtype, what=f"{rule} state at step {t}")


# --- whole steps ---------------------------------------------------------------------

def _mlp_args(rng, sizes, act, dtype, B, loss):
    codes = np.array([CODES[act]] * (len(sizes) - 2) + [CODES["identity"]], np.int64)
    alphas = np.array([ops.resolve_activation(act)[1]] * (len(sizes) - 2) + [0.0], np.float64)
    sizes = np.array(sizes, np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1] * sizes[1:] + sizes[1:])]).astype(np.int64)
    params = (rng.standard_normal(offsets[-1]) * 0.3).astype(dtype)
    x = rng.standard_normal((B, sizes[0])).astype(dtype)
    labels = rng.integers(0, sizes[-1], B).astype(np.int64)
    target = rng.uniform(0, 1, (B, sizes[-1])).astype(dtype)
    if loss == cpu_step.CROSS_ENTROPY:
        target = np.zeros((0, 0), dtype)
    else:
        labels = np.zeros(0, np.int64)
    width = sizes[1:]
    acts = np.zeros(B * int(width.sum()), dtype)
    zs = np.zeros_like(acts) if CODES[act] in kcpu.NEEDS_Z else acts
    delta = np.zeros(2 * B * int(width.max()), dtype)
    return x, labels, target, params, sizes, codes, alphas, offsets, acts, zs, delta


def _to_gpu(cp, arrays):
    out, seen = [], {}
    for a in arrays:                 # keep zs aliasing acts on the device too
        out.append(seen.setdefault(id(a), cp.asarray(a)))
    return out


def _cpu_plan(sizes):
    """The CPU driver's step-plan arguments of a plain model: (plan,
    fplan, run_mean, run_var)."""
    off = np.zeros(len(sizes) - 1)
    plan, fplan, _ = cpu_step.step_plan(sizes, 1, 0, off, off, off, off, np.float64)
    return plan, fplan, np.zeros(0), np.zeros(0)


@pytest.mark.cuda
@pytest.mark.parametrize("loss", [cpu_step.CROSS_ENTROPY, cpu_step.MSE, cpu_step.BCE_WITH_LOGITS])
@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "silu"])
def test_forward_backward_matches_cpu(cp, rng, act, loss):
    from fastgrad.kernels.cuda import step as kstep
    dtype = np.float32
    (x, labels, target, params, sizes, codes, alphas, offsets, acts, zs,
     delta) = _mlp_args(rng, [20, 64, 130, 10], act, dtype, 100, loss)
    grads = np.zeros_like(params)
    xg, lg, tg, pg, ag, zg, dg = _to_gpu(cp, [x, labels, target, params, acts, zs, delta])
    gg = cp.zeros_like(pg)
    loss_c = cpu_step.forward_backward(x, labels, target, loss, params, grads, sizes, codes,
                                       alphas, offsets, acts, zs, delta, *_cpu_plan(sizes))
    loss_g = kstep.forward_backward(xg, lg, tg, loss, pg, gg, sizes, codes, alphas, offsets,
                                    ag, zg, dg)
    assert_close(float(loss_g), loss_c, dtype, what="loss")
    assert_close(ag, acts, dtype, what="activations")
    assert_close(gg, grads, dtype, what="gradients")


@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_train_steps_match_cpu(cp, rng, rule):
    """50 whole steps per rule (float32), CPU and GPU from the same start.

    The devices' float32 tanh differ by ~1e-7 relative (a polynomial on the
    CPU, CUDA's libm on the GPU), so the runs drift apart by rounding.  Every
    rule stays within 1e-5 except centered RMSprop with momentum, which
    amplifies the drift past 1e-5 after 10-20 steps (seen on the host
    emulator for 3 seeds in 5; the update itself is bitwise equal given equal
    inputs, test_clipped_update_matches_cpu): 1e-4 for it, and its GPU run
    restarts from the CPU's parameters and state every 5 steps (the drift
    grows chaotically: 3e-4 by step 14 for one seed in ~12)."""
    tol = 1e-4 if rule == "rmsprop" else None
    resync = 5 if rule == "rmsprop" else None
    from fastgrad.kernels.cuda import step as kstep
    dtype = np.float32
    loss = cpu_step.CROSS_ENTROPY
    (x, labels, target, params, sizes, codes, alphas, offsets, acts, zs,
     delta) = _mlp_args(rng, [16, 32, 32, 5], "tanh", dtype, 64, loss)
    grads = np.zeros_like(params)
    opt = _OPT_CLS[rule](_Flat(params, grads, offsets), clip_norm=1.0, **_OPT_KW[rule][-1])
    _, s0, s1, s2, _ = opt._kernel_args()
    xg, lg, tg, pg, ag, zg, dg = _to_gpu(cp, [x, labels, target, params, acts, zs, delta])
    gg = cp.zeros_like(pg)
    sg = [cp.asarray(s) for s in (s0, s1, s2)]
    lsq = cp.empty(offsets.size - 1, np.float64)
    ws = kstep.Workspace(x.shape[0], sizes, offsets, loss, dtype)
    for t in range(50):
        rc, s0, s1, s2, hp = opt._kernel_args()
        out_c = cpu_step.train_step(x, labels, target, loss, params, grads, sizes, codes, alphas,
                                    offsets, acts, zs, delta, *_cpu_plan(sizes), rc, s0, s1, s2,
                                    hp, opt._layer_sq, opt._clip_norm, opt._clip_value)
        opt._commit(*out_c[1:], opt._layer_sq)
        out_g = kstep.train_step(xg, lg, tg, loss, pg, gg, sizes, codes, alphas, offsets,
                                 ag, zg, dg, rc, *sg, hp, lsq, opt._clip_norm, opt._clip_value,
                                 ws=ws)
        assert_close(float(out_g[0]), out_c[0], dtype, rtol=tol, what=f"loss at step {t}")
        assert_close(float(out_g[1]), out_c[1], dtype, rtol=tol, what=f"norm at step {t}")
        assert bool(out_g[3]) == bool(out_c[3])
        if resync and t % resync == resync - 1:
            pg[...] = cp.asarray(params)
            for dev, host in zip(sg, opt._kernel_args()[1:4]):
                dev[...] = cp.asarray(host)
    assert_close(pg, params, dtype, rtol=tol, what=f"{rule} params after 50 steps")


@pytest.mark.cuda
def test_step_determinism_and_graph(cp, rng):
    """Two identical runs give bitwise-equal norms, bias gradients and
    parameters; the graphed step (or its eager fallback) equals the eager one."""
    from fastgrad.kernels.cuda import step as kstep
    dtype = np.float32
    loss = cpu_step.CROSS_ENTROPY
    args = _mlp_args(rng, [33, 300, 77, 10], "relu", dtype, 513, loss)
    x, labels, target, params, sizes, codes, alphas, offsets, acts, zs, delta = args
    opt = fg.Adam(_Flat(params.copy(), np.zeros_like(params), offsets), lr=1e-3, clip_norm=1.0)

    def run(graphed, gemm="fastgrad"):
        xg, lg, tg, pg, ag, zg, dg = _to_gpu(cp, [x, labels, target, params, acts, zs, delta])
        gg = cp.zeros_like(pg)
        m, v, e = cp.zeros_like(pg), cp.zeros_like(pg), cp.zeros(0, dtype)
        lsq = cp.empty(offsets.size - 1, np.float64)
        norms = []
        gs = kstep.GraphedTrainStep(loss, pg, gg, sizes, codes, alphas, offsets, ag, zg, dg,
                                    cpu_optim.ADAM, m, v, e, lsq, 1.0, 0.0, x.shape[0],
                                    use_graph=graphed, gemm=gemm)
        for t in range(5):
            opt.step_count = t
            _, _, _, _, hp = opt._kernel_args()
            out = gs(xg, lg, tg, hp.copy())
            norms.append(float(out[1]))
        return norms, to_numpy(gg), to_numpy(pg), gs

    n1, g1, p1, _ = run(False)
    n2, g2, p2, _ = run(False)
    assert n1 == n2 and np.array_equal(g1, g2) and np.array_equal(p1, p2)
    # fastgrad's own GEMM makes the whole step capturable: a real graph.
    n3, g3, p3, gs = run(True)
    assert gs.graph is not None, gs.fallback_reason
    assert n3 == n1 and np.array_equal(g3, g1) and np.array_equal(p3, p1)
    # Through cuBLAS (cupy.matmul): captured, or refused and run eagerly.
    c1, _, q1, _ = run(False, "cublas")
    c2, _, q2, gs = run(True, "cublas")
    print("graph with cuBLAS GEMMs:", "captured" if gs.graph is not None else gs.fallback_reason)
    assert c2 == c1 and np.array_equal(q2, q1)
    # The two GEMMs round differently: the first norm agrees to float32's
    # tolerance; Adam moves components whose gradient is near zero by ~lr
    # whatever its size, so parameters agree only to 5 steps x 2 lr.
    assert_close(c1[0], n1[0], dtype, what="first gradient norm, cuBLAS vs own GEMM")
    np.testing.assert_allclose(q1, p1, rtol=0, atol=10 * 1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 65, 130), (129, 3, 64), (200, 33, 17)])
def test_own_gemm(cp, rng, shape, dtype):
    """kernels.cuda.gemm (the capturable GEMM): a @ b, a.T @ b and a @ b.T
    as the step uses them, against float64, at sizes off the 64 x 64 tile;
    bitwise the same on a second call."""
    from fastgrad.kernels.cuda.gemm import gemm
    M, K, N = shape
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    cases = [(a, b, cp.asarray(a), cp.asarray(b)),
             (a, b, cp.asarray(a.T.copy()).T, cp.asarray(b)),
             (a, b, cp.asarray(a), cp.asarray(b.T.copy()).T)]
    for ah, bh, ad, bd in cases:
        out = cp.full((M, N), np.nan, dtype)
        gemm(ad, bd, out)
        ref = ah.astype(np.float64) @ bh.astype(np.float64)
        tol = 1e-5 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(to_numpy(out), ref, rtol=tol, atol=tol * np.sqrt(K) * 4)
        again = cp.empty_like(out)
        gemm(ad, bd, again)
        np.testing.assert_array_equal(to_numpy(again), to_numpy(out))
    with pytest.raises(ValueError, match="shapes"):
        gemm(cp.asarray(a), cp.asarray(b), cp.empty((M, N + 1), dtype))


@pytest.mark.cuda
def test_mixed_devices_refused(cp, rng):
    x, W, b = dense_inputs(rng, 4, 3, 2, np.float32)
    with pytest.raises(TypeError, match="different devices"):
        ops.dense_forward(cp.asarray(x), W, b, "relu")
    with pytest.raises(TypeError, match="different devices"):
        ops.softmax_cross_entropy(cp.asarray(x), np.zeros(4, np.int64))
