"""The epilogue pieces (dropout, residual, batch/layer norm, weight norm) on
the deep workload, float32: fastgrad's TrainStep (on every available
device; on CUDA the fused step, eager and replayed from a CUDA graph) with
batch norm, residual blocks or dropout 0.1 on the hidden layers, against
its own plain step (the overhead each layer kind adds), PyTorch eager
(nn.BatchNorm1d / a residual module / nn.Dropout; Adam fused +
clip_grad_norm_) and JAX jit + optax (the same layers in jax.numpy).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest bench/bench_epilogue.py
    python bench/epilogue_compare.py      # interleaved rounds: the ratios in RESULTS.md

Workloads ``deep-plain``, ``deep-batchnorm``, ``deep-residual``,
``deep-dropout``; contenders ``fastgrad``, ``fastgrad-graph`` (CUDA),
``torch-<n>t`` (``torch`` on CUDA), ``jax`` (CPU).  Smoke runs (``--benchmark-disable``) use a miniature deep
network.
"""
import pytest

import conftest
from epilogue_workloads import CONTENDERS, DEEP, SMOKE_DEEP, VARIANTS
from workloads import gemm_flops


def _workload():
    return SMOKE_DEEP if conftest.SMOKE else DEEP


WORKLOADS = {f"deep-{v}": v for v in VARIANTS}


def _contenders(device):
    if device == "cuda":
        return ["fastgrad", "fastgrad-graph", "torch"]
    return ["fastgrad"] + conftest.torch_cpu_contenders() + ["jax"]


@pytest.mark.parametrize("workload,device,contender", conftest.cases(WORKLOADS, _contenders))
def bench_epilogue_step(benchmark, workload, device, contender):
    conftest.require(device, contender)
    variant = WORKLOADS[workload]
    sizes, batch, act, loss = _workload()
    with conftest.torch_threads(contender):
        if contender.startswith("fastgrad"):
            step = CONTENDERS["fastgrad"](variant, sizes, batch, act, loss, device=device,
                                          cuda_graph=contender == "fastgrad-graph")
        elif contender.startswith("torch"):
            step = CONTENDERS["torch"](variant, sizes, batch, act, loss, device=device)
        else:
            step = CONTENDERS["jax"](variant, sizes, batch, act, loss)
        wait = conftest.peer_sync(device, contender)
        step()                                    # compile / warm up

        def run():
            step()
            wait()
        benchmark.extra_info["gemm_gflop"] = gemm_flops(sizes, batch) / 1e9
        benchmark(run)
