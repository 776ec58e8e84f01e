"""Dense layer forward and forward+backward, relu, float32, per device.

Workloads ``forward-<in>x<out>`` and ``fwd+bwd-<in>x<out>`` (batch 256);
contenders (one benchmarked function each):

* ``fastgrad`` -- ``fastgrad.kernels.<device>.dense_forward`` /
  ``dense_backward`` on preallocated buffers, called as ``fastgrad.layers``
  calls them (``z is a``; ``dz is da``): the library's hot path.
* ``fastgrad-ops`` -- the checked, allocating functional API ``fastgrad.ops``.
* ``numpy`` -- the same maths in bare NumPy (CuPy on the GPU), allocating.
* ``gemm-floor`` -- only the GEMMs through the BLAS the kernels use (an
  ``@njit`` ``np.dot(x, W, out)``; cuBLAS via ``cupy.matmul(out=)`` on the GPU):
  forward one GEMM, forward+backward three (``x@W``, ``x.T@dz``, ``dz@W.T``).

``extra_info`` carries the GEMM flops and GFLOP/s at the median.  For ratios
that survive this host's fast/slow phases use ``bench/dense_compare.py``,
which interleaves the contenders; see ``bench/RESULTS.md``.
"""
import numpy as np
import pytest
from numba import njit

import fastgrad
from fastgrad import ops
from fastgrad.kernels.cpu.activations import RELU
import conftest
from conftest import SMOKE, sync, xp_of

BATCH = 4 if SMOKE else 256
SHAPES = [(8, 8), (16, 8)] if SMOKE else [(64, 64), (784, 256), (1024, 1024)]
CONTENDERS = ["fastgrad", "fastgrad-ops", "numpy", "gemm-floor"]


@njit(nogil=True)
def _gemm(x, W, out):
    np.dot(x, W, out)


@njit(nogil=True)
def _gemm3(x, W, z, dz, dW, dx):
    np.dot(x, W, z)
    np.dot(x.T, dz, dW)
    np.dot(dz, W.T, dx)


def _kernels(device):
    k = fastgrad.device.kernels(device)
    if not hasattr(k, "dense_forward"):
        pytest.skip(f"fastgrad.kernels.{device} has no dense_forward yet")
    return k


def _needs_array_library(xp):
    if getattr(xp, "__emulated__", False):
        pytest.skip("the host emulator's CuPy has no array arithmetic (only the backend's "
                    "surface), and its timings mean nothing")


def _make(device, n_in, n_out):
    xp = xp_of(device)
    rng = np.random.default_rng(0)
    f32 = np.float32
    host = dict(
        x=rng.standard_normal((BATCH, n_in), dtype=f32),
        W=rng.standard_normal((n_in, n_out), dtype=f32) * f32(np.sqrt(2.0 / n_in)),
        b=rng.standard_normal(n_out, dtype=f32) * f32(0.1),
        da=rng.standard_normal((BATCH, n_out), dtype=f32),
    )
    d = {k: xp.asarray(v) for k, v in host.items()}
    d["a"] = xp.empty((BATCH, n_out), f32)
    d["dz"] = xp.empty_like(d["a"])
    d["g"] = d["da"].copy()
    d["dW"] = xp.empty_like(d["W"])
    d["db"] = xp.empty(n_out, f32)
    d["dx"] = xp.empty_like(d["x"])
    return xp, d


def _forward_fn(device, contender, xp, d):
    x, W, b, a = d["x"], d["W"], d["b"], d["a"]
    if contender == "fastgrad":
        k = _kernels(device)
        return lambda: k.dense_forward(x, W, b, a, a, RELU, 0.0)
    if contender == "fastgrad-ops":
        _kernels(device)
        return lambda: ops.dense_forward(x, W, b, "relu")
    if contender == "numpy":
        _needs_array_library(xp)
        zero = np.float32(0)
        return lambda: xp.maximum(x @ W + b, zero)
    if device == "cuda":
        return lambda: xp.matmul(x, W, out=a)
    return lambda: _gemm(x, W, a)


def _fwd_bwd_fn(device, contender, xp, d):
    x, W, b, a, da, g = d["x"], d["W"], d["b"], d["a"], d["da"], d["g"]
    dz, dW, db, dx = d["dz"], d["dW"], d["db"], d["dx"]
    if contender == "fastgrad":
        k = _kernels(device)

        def run():
            k.dense_forward(x, W, b, a, a, RELU, 0.0)
            k.dense_backward(x, W, a, a, g, g, dW, db, dx, RELU, 0.0, True)
        return run
    if contender == "fastgrad-ops":
        _kernels(device)

        def run():
            a_, z_ = ops.dense_forward(x, W, b, "relu")
            return ops.dense_backward(x, W, a_, z_, da, "relu")
        return run
    if contender == "numpy":
        _needs_array_library(xp)
        zero = np.float32(0)

        def run():
            a_ = xp.maximum(x @ W + b, zero)
            dz_ = da * (a_ > 0)
            return a_, x.T @ dz_, dz_.sum(axis=0), dz_ @ W.T
        return run
    if device == "cuda":
        def run():
            xp.matmul(x, W, out=a)
            xp.matmul(x.T, dz, out=dW)
            xp.matmul(dz, W.T, out=dx)
        return run
    return lambda: _gemm3(x, W, a, dz, dW, dx)


def _bench(benchmark, device, fn, n_in, n_out, n_gemms, group):
    flops = 2.0 * BATCH * n_in * n_out * n_gemms

    def timed():
        fn()
        sync(device)

    timed()                                   # compile / first-touch outside the timer
    benchmark.group = group
    benchmark.extra_info.update(batch=BATCH, n_in=n_in, n_out=n_out,
                                activation="relu", dtype="float32",
                                gemm_flops=flops)
    benchmark(timed)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and not SMOKE:
        benchmark.extra_info["gflops_at_median"] = round(flops / stats.stats.median / 1e9, 2)


def _workloads(kind):
    return {f"{kind}-{i}x{o}": (i, o) for i, o in SHAPES}


FORWARD, FWD_BWD = _workloads("forward"), _workloads("fwd+bwd")


@pytest.mark.parametrize("workload,device,contender", conftest.cases(FORWARD, CONTENDERS))
def bench_dense_forward(benchmark, workload, device, contender):
    conftest.require(device, contender)
    n_in, n_out = FORWARD[workload]
    xp, d = _make(device, n_in, n_out)
    fn = _forward_fn(device, contender, xp, d)
    _bench(benchmark, device, fn, n_in, n_out, 1,
           f"dense forward {BATCH}x{n_in}->{n_out} relu f32 {device}")


@pytest.mark.parametrize("workload,device,contender", conftest.cases(FWD_BWD, CONTENDERS))
def bench_dense_fwd_bwd(benchmark, workload, device, contender):
    conftest.require(device, contender)
    n_in, n_out = FWD_BWD[workload]
    xp, d = _make(device, n_in, n_out)
    fn = _fwd_bwd_fn(device, contender, xp, d)
    _bench(benchmark, device, fn, n_in, n_out, 3,
           f"dense fwd+bwd {BATCH}x{n_in}->{n_out} relu f32 {device}")
