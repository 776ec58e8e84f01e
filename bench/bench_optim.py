"""Clipped Adam update alone, flat float32 buffers: fastgrad against NumPy,
PyTorch (Adam fused=True, else foreach, + clip_grad_norm_), optax
(chain(clip_by_global_norm, adam) under jax.jit) and the streaming ceiling.  Workloads ``adam-1M`` and ``adam-16M``
(parameters); contenders ``fastgrad`` (the default: from 2^15 parameters
on the step's thread team, OpenBLAS's workers), ``fastgrad-serial``
(``opt.parallel = False``), ``fastgrad-parallel`` (``opt.parallel = True``,
Numba's parfor kernel), ``ceiling``, ``ceiling-parallel``, ``numpy``,
``torch-<n>t`` (n threads) and ``jax`` (optax under jit).

Throughput counts 32 bytes per parameter: the norm pass reads g (4), the
update reads p, g, m, v (16) and writes p, m, v (12).  The ceiling is a plain
streaming kernel with exactly that traffic, measured in the same run.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        python -m pytest bench/bench_optim.py
    python -m pytest bench --benchmark-disable          # smoke: tiny sizes

``bench/optim_compare.py`` runs the same contenders in interleaved rounds
and prints the ratio table (the numbers in bench/RESULTS.md).
"""
import numpy as np
import pytest
from numba import njit, prange

import conftest

from fastgrad.kernels.cpu._jit import JIT

BYTES_PER_PARAM = 32
LR, BETAS, EPS, CLIP = 1e-3, (0.9, 0.999), 1e-8, 1.0


@njit(**dict(JIT, fastmath={"reassoc"}))
def _stream_sum(g):
    s = 0.0
    for i in range(g.shape[0]):
        s += np.float64(g[i])
    return s


@njit(**JIT)
def _stream_update(p, g, m, v, a):
    for i in range(p.shape[0]):
        gi = g[i]
        m[i] = m[i] * a + gi
        v[i] = v[i] * a + gi
        p[i] = p[i] + a * gi


def _buffers(n, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    return p, g, np.zeros(n, np.float32), np.zeros(n, np.float32)


@njit(**dict(JIT, parallel=True, fastmath={"reassoc"}))
def _stream_sum_parallel(g):
    s = 0.0
    for i in prange(g.shape[0]):
        s += np.float64(g[i])
    return s


@njit(**dict(JIT, parallel=True))
def _stream_update_parallel(p, g, m, v, a):
    for i in prange(p.shape[0]):
        gi = g[i]
        m[i] = m[i] * a + gi
        v[i] = v[i] * a + gi
        p[i] = p[i] + a * gi


def make_ceiling(n, parallel=False):
    """A plain streaming kernel with the update's traffic (read g; read
    p, g, m, v; write p, m, v), on one thread or on Numba's threads."""
    p, g, m, v = _buffers(n)
    a = np.float32(0.5)
    total = _stream_sum_parallel if parallel else _stream_sum
    update = _stream_update_parallel if parallel else _stream_update

    def run():
        total(g)
        update(p, g, m, v, a)
    return run


def make_ceiling_parallel(n):
    return make_ceiling(n, parallel=True)


class _Flat:
    """A "model" that is just flat buffers, as fastgrad's optimizers take."""

    def __init__(self, p, g):
        self.params, self.grads = p, g
        self.layer_offsets = np.array([0, p.size], np.int64)


def make_fastgrad(n, parallel=None):
    """What a user runs: ``fg.Adam(model, clip_norm=...).step()`` (Python
    overhead included), with ``opt.parallel`` as given (None: the default)."""
    from fastgrad.optim import Adam
    p, g, m, v = _buffers(n)
    opt = Adam(_Flat(p, g), lr=LR, betas=BETAS, eps=EPS, clip_norm=CLIP)
    opt.parallel = parallel
    return opt.step


def make_fastgrad_serial(n):
    return make_fastgrad(n, parallel=False)


def make_fastgrad_parallel(n):
    return make_fastgrad(n, parallel=True)


def make_numpy(n):
    p, g, m, v = _buffers(n)
    t = np.empty_like(g)
    b1, b2 = (np.float32(b) for b in BETAS)
    bc1, bc2 = 1 - BETAS[0], 1 - BETAS[1]

    def run():
        # in-place ufuncs with one temporary: NumPy's best without fusion
        norm = float(np.sqrt(np.dot(g, g)))
        np.multiply(g, np.float32(min(1.0, CLIP / (norm + 1e-6))), out=t)
        np.multiply(m, b1, out=m)
        m.__iadd__((1 - b1) * t)
        np.multiply(v, b2, out=v)
        np.multiply(t, t, out=t)
        np.multiply(t, 1 - b2, out=t)
        np.add(v, t, out=v)
        np.sqrt(v, out=t)
        np.multiply(t, np.float32(1 / np.sqrt(bc2)), out=t)
        np.add(t, np.float32(EPS), out=t)
        np.divide(m, t, out=t)
        np.multiply(t, np.float32(LR / bc1), out=t)
        np.subtract(p, t, out=p)
    return run


def make_torch(n):
    """PyTorch at its current thread count (the benchmark sets it)."""
    torch = pytest.importorskip("torch")
    p, g, _, _ = _buffers(n)
    param = torch.nn.Parameter(torch.from_numpy(p))
    param.grad = torch.from_numpy(g)
    try:
        opt = torch.optim.Adam([param], lr=LR, betas=BETAS, eps=EPS, fused=True)
        opt.step()
    except (RuntimeError, ValueError):
        opt = torch.optim.Adam([param], lr=LR, betas=BETAS, eps=EPS, foreach=True)

    def run():
        # clip_grad_norm_ scales .grad in place; the spike-free gradient here
        # keeps the scale at 1 after the first call, like the other contenders
        torch.nn.utils.clip_grad_norm_([param], CLIP, foreach=True)
        opt.step()
    run.torch_flavour = "fused" if opt.defaults.get("fused") else "foreach"
    return run


def make_optax(n):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    p, g, _, _ = _buffers(n)
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.adam(LR, *BETAS, eps=EPS))
    params, grads = jax.numpy.asarray(p), jax.numpy.asarray(g)
    state = [tx.init(params), params]

    @jax.jit
    def update(params, state, grads):
        upd, state = tx.update(grads, state, params)
        return optax.apply_updates(params, upd), state

    def run():
        params, opt_state = update(state[1], state[0], grads)
        params.block_until_ready()
        state[0], state[1] = opt_state, params
    return run


CONTENDERS = {"ceiling": make_ceiling, "ceiling-parallel": make_ceiling_parallel,
              "fastgrad": make_fastgrad, "fastgrad-serial": make_fastgrad_serial,
              "fastgrad-parallel": make_fastgrad_parallel,
              "numpy": make_numpy, "torch": make_torch, "jax": make_optax}
WORKLOADS = {"adam-1M": 1 << 20, "adam-16M": 1 << 24}


def _contenders(device):
    return [c for c in CONTENDERS if c != "torch"] + conftest.torch_cpu_contenders()


@pytest.mark.parametrize("workload,device,contender",
                         conftest.cases(WORKLOADS, _contenders, devices=("cpu",)))
def bench_clipped_adam_update(benchmark, workload, device, contender):
    conftest.require(device, contender)
    # smoke mode: correctness of the harness only
    n_params = 4096 if conftest.SMOKE else WORKLOADS[workload]
    with conftest.torch_threads(contender):
        run = CONTENDERS["torch" if contender.startswith("torch") else contender](n_params)
        run()                                   # compile / warm up
        benchmark.extra_info["bytes"] = BYTES_PER_PARAM * n_params
        benchmark.pedantic(run, rounds=20 if n_params < (1 << 22) else 6, iterations=1,
                           warmup_rounds=1)
    if benchmark.stats is not None:         # None when benchmarking is disabled
        gbs = BYTES_PER_PARAM * n_params / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["GB/s"] = round(gbs, 2)
