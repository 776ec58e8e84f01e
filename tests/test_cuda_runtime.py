"""What only the CUDA runtime has: the .cu sources as NVRTC compiles them,
CUDA graphs (capture, replay, the cuBLAS fallback) and bitwise repeatable
steps, the own capturable GEMM, the import without CuPy, and arrays of two
devices refused.  Behaviours both devices have are tested once, over the
``device`` fixture, in the files of their concern (test_kernels.py,
test_step.py, test_optim.py, ...).

Tests marked ``cuda`` need CuPy and a GPU (skipped otherwise, by conftest and
by the ``cp`` fixture), or the host emulator (tools/cuda_emulator).
``test_cu_sources_compile`` needs only ``nvcc``.  Tolerances: float32
relative 1e-5, float64 1e-12 (conftest.RTOL).
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
from fastgrad.kernels.cpu import step as cpu_step
from fastgrad.kernels.cpu.activations import CODES

from conftest import DTYPES, assert_close, dense_inputs, to_numpy

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
    from conftest import run_without
    out = run_without(["cupy"], "import fastgrad\n"
                      "try:\n    import fastgrad.kernels.cuda\nexcept ImportError as e:\n"
                      "    print('ERR', e)\n", timeout=120)
    assert "ERR" in out.stdout and "fastgrad[cuda]" in out.stdout, out.stdout + out.stderr


# --- whole steps ---------------------------------------------------------------------

class _Flat:
    def __init__(self, p, g, offsets):
        self.params, self.grads, self.layer_offsets = p, g, offsets


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


def _to_gpu(be, arrays):
    out, seen = [], {}
    for a in arrays:                 # keep zs aliasing acts on the device too
        out.append(seen.setdefault(id(a), be.to_device(a)))
    return out


@pytest.mark.cuda
def test_step_determinism_and_graph(cuda_be, rng):
    """Two identical runs give bitwise-equal norms, bias gradients and
    parameters; the graphed step (or its eager fallback) equals the eager one."""
    from fastgrad.kernels.cuda import step as kstep
    dtype = np.float32
    loss = cpu_step.CROSS_ENTROPY
    args = _mlp_args(rng, [33, 300, 77, 10], "relu", dtype, 513, loss)
    x, labels, target, params, sizes, codes, alphas, offsets, acts, zs, delta = args
    opt = fg.Adam(_Flat(params.copy(), np.zeros_like(params), offsets), lr=1e-3, clip_norm=1.0)

    def run(graphed, gemm="fastgrad"):
        xg, lg, tg, pg, ag, zg, dg = _to_gpu(cuda_be, [x, labels, target, params, acts, zs, delta])
        gg, m, v = (cuda_be.alloc(pg.shape, dtype, fill=0) for _ in range(3))
        e = cuda_be.alloc(0, dtype)
        lsq = cuda_be.alloc(offsets.size - 1, np.float64)
        norms = []
        off = np.zeros(len(sizes) - 1)          # a plain model's step plan
        plan, fplan, _ = kstep.step_plan(sizes, x.shape[0], params.size, off, off, off, off,
                                         dtype)
        stats = cuda_be.alloc(0, np.float64)
        gs = kstep.GraphedTrainStep(loss, pg, gg, sizes, codes, alphas, offsets, ag, zg, dg,
                                    plan, fplan, stats, stats, cpu_optim.ADAM, m, v, e, lsq,
                                    1.0, 0.0, x.shape[0], use_graph=graphed, gemm=gemm)
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
    # Through cuBLAS (cupy.matmul): CuPy refuses cuBLAS under capture
    # (cupy issue 6290), so the step runs eagerly and says why.
    c1, _, q1, _ = run(False, "cublas")
    c2, _, q2, gs = run(True, "cublas")
    assert gs.graph is None and "cuBLAS" in gs.fallback_reason, gs.fallback_reason
    assert c2 == c1 and np.array_equal(q2, q1)
    # The two GEMMs round differently: the first norm agrees to float32's
    # tolerance; Adam moves components whose gradient is near zero by ~lr
    # whatever its size, so parameters agree only to 5 steps x 2 lr.
    assert_close(c1[0], n1[0], dtype, what="first gradient norm, cuBLAS vs own GEMM")
    np.testing.assert_allclose(q1, p1, rtol=0, atol=10 * 1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids(DTYPES))
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 65, 130), (129, 3, 64), (200, 33, 17)])
def test_own_gemm(cuda_be, rng, shape, dtype):
    """kernels.cuda.gemm (the capturable GEMM): a @ b, a.T @ b and a @ b.T
    as the step uses them, against float64, at sizes off the 64 x 64 tile;
    bitwise the same on a second call."""
    from fastgrad.kernels.cuda.gemm import gemm
    M, K, N = shape
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    dev = cuda_be.to_device
    cases = [(a, b, dev(a), dev(b)),
             (a, b, dev(a.T.copy()).T, dev(b)),
             (a, b, dev(a), dev(b.T.copy()).T)]
    for ah, bh, ad, bd in cases:
        out = cuda_be.alloc((M, N), dtype, fill=np.nan)
        gemm(ad, bd, out)
        ref = ah.astype(np.float64) @ bh.astype(np.float64)
        tol = 1e-5 if dtype == np.float32 else 1e-13
        np.testing.assert_allclose(to_numpy(out), ref, rtol=tol, atol=tol * np.sqrt(K) * 4)
        again = cuda_be.alloc(out.shape, dtype)
        gemm(ad, bd, again)
        np.testing.assert_array_equal(to_numpy(again), to_numpy(out))
    with pytest.raises(ValueError, match="shapes"):
        gemm(dev(a), dev(b), cuda_be.alloc((M, N + 1), dtype))


@pytest.mark.cuda
def test_mixed_devices_refused(cuda_be, rng):
    x, W, b = dense_inputs(rng, 4, 3, 2, np.float32)
    with pytest.raises(TypeError, match="different devices"):
        ops.dense_forward(cuda_be.to_device(x), W, b, "relu")
    with pytest.raises(TypeError, match="different devices"):
        ops.softmax_cross_entropy(cuda_be.to_device(x), np.zeros(4, np.int64))
