"""Whole training step (forward + loss + backward + clip + Adam), float32,
every contender side by side per workload:

* ``fastgrad-epoch`` -- ``TrainStep.run_epoch`` over 64 batches (CPU): one
  timed call is 64 steps (``extra_info["steps"]``);
* ``fastgrad`` -- ``fg.TrainStep`` (one compiled call on the CPU; on CUDA
  the batch lives on the GPU), and ``fastgrad-graph``, the same step replayed
  from a CUDA graph (CUDA only);
* ``gemm-floor`` -- the step's own GEMMs alone, through the BLAS fastgrad
  uses (cuBLAS on CUDA): no step can be faster than this;
* ``numpy`` -- the step written in plain NumPy (CPU only);
* ``torch-<n>t`` -- PyTorch eager at n threads on the CPU (Adam fused +
  ``clip_grad_norm_``), ``torch`` on CUDA;
* ``jax`` -- JAX jit + optax, with its own thread pool.

    python -m pytest bench/bench_step.py             # grouped by workload
    python -m pytest bench --quick                   # these only, ~2 minutes
    fastgrad bench                                   # the same, as tables and a chart
    python bench/step_compare.py                     # interleaved rounds: README's ratios

Workloads (bench/workloads.py): tiny, mnist, deep, wide.  Smoke runs
(``--benchmark-disable``) use miniature versions of each.
"""
import pytest

import conftest
from workloads import (CONTENDERS, SMOKE_WORKLOADS, WORKLOADS, gemm_flops,
                       make_gemm_floor_cuda)


def _contenders(device):
    if device == "cuda":
        return ["fastgrad", "fastgrad-graph", "gemm-floor", "torch", "jax"]
    return (["fastgrad", "fastgrad-epoch", "gemm-floor", "numpy"]
            + conftest.torch_cpu_contenders() + ["jax"])


def _workload(name):
    return (SMOKE_WORKLOADS if conftest.SMOKE else WORKLOADS)[name]


def _make(workload, device, contender):
    sizes, batch, act, loss = _workload(workload)
    if contender == "fastgrad-epoch":
        return CONTENDERS[contender](sizes, batch, act, loss, steps=4 if conftest.SMOKE else 64)
    if contender.startswith("fastgrad"):
        return CONTENDERS["fastgrad"](sizes, batch, act, loss, device=device,
                                      cuda_graph=contender == "fastgrad-graph")
    if contender == "gemm-floor" and device == "cuda":
        return make_gemm_floor_cuda(sizes, batch, act, loss)
    if contender.startswith("torch"):
        return CONTENDERS["torch"](sizes, batch, act, loss, device=device)
    if contender == "jax":
        return CONTENDERS["jax"](sizes, batch, act, loss, device=device)
    return CONTENDERS[contender](sizes, batch, act, loss)


@pytest.mark.parametrize("workload,device,contender", conftest.cases(WORKLOADS, _contenders, quick=True))
def bench_step(benchmark, workload, device, contender):
    conftest.require(device, contender)
    sizes, batch, _, _ = _workload(workload)
    with conftest.torch_threads(contender):
        step = _make(workload, device, contender)
        wait = conftest.peer_sync(device, contender)
        for _ in range(3 if contender == "fastgrad-graph" else 1):
            step()                            # compile / warm up (a graph captures on call 2)

        def run():
            step()
            wait()
        benchmark.extra_info["gemm_gflop"] = gemm_flops(sizes, batch) / 1e9
        # fastgrad-epoch: one timed call runs this many steps (run_epoch)
        benchmark.extra_info["steps"] = getattr(step, "steps", 1)
        if contender == "fastgrad-graph":
            benchmark.extra_info["captured"] = all(
                g.graph is not None for g in step.train_step._graphs.values())
        benchmark(run)
