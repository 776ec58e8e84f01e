"""fastgrad as PyTorch's CPU backend (issue #18), under pytest-benchmark.

* ``bench_torch_adam``: one clipped Adam update in a torch program at 1M and
  16M float32 parameters over 64 tensors: ``fastgrad.torch.Adam(clip_norm=
  1.0)`` (serial, and ``parallel``) against ``clip_grad_norm_`` +
  ``torch.optim.Adam(fused=True)``, PyTorch at 1 and every core's threads;
* ``bench_torch_mlp``: forward + backward of ``fastgrad.torch.FusedMLP``
  against the equivalent ``nn.Sequential`` (mnist-like 784-256-256-10 relu,
  batch 128; deep-narrow 8 x 256 tanh, batch 64).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest bench/bench_torch_backend.py

``bench/torch_backend_compare.py`` runs the same workloads in interleaved
rounds and prints the ratio table of bench/RESULTS.md.  Under
``--benchmark-disable`` (the CI smoke run) the sizes are tiny.
"""
import pytest

import conftest
from torch_backend_compare import MLP_WORKLOADS, OPTIM_WORKLOADS, make_mlp, make_optim


def _optim_contenders(device):
    return ["fastgrad", "fastgrad-parallel"] + [
        c.replace("torch", "torch-fused") for c in conftest.torch_cpu_contenders()]


def _mlp_contenders(device):
    return ["fastgrad"] + conftest.torch_cpu_contenders()


@pytest.mark.parametrize("workload,device,contender",
                         conftest.cases(OPTIM_WORKLOADS, _optim_contenders, devices=("cpu",)))
def bench_torch_adam(benchmark, workload, device, contender):
    conftest.require(device, "torch")
    kind = contender if contender.startswith("fastgrad") else "torch-fused"
    with conftest.torch_threads(contender.replace("torch-fused", "torch")):
        step = make_optim(workload, kind, smoke=conftest.SMOKE)
        step()                                  # compile / warm up
        benchmark(step)


@pytest.mark.parametrize("workload,device,contender",
                         conftest.cases(MLP_WORKLOADS, _mlp_contenders, devices=("cpu",)))
def bench_torch_mlp(benchmark, workload, device, contender):
    conftest.require(device, "torch")
    kind = "fastgrad" if contender == "fastgrad" else "torch"
    with conftest.torch_threads(contender):
        step = make_mlp(workload, kind, smoke=conftest.SMOKE)
        step()                                  # compile / warm up
        benchmark(step)
