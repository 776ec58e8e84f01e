"""The explosion-toolkit layers on the deep workload, float32: fastgrad's
TrainStep (on every available device; on CUDA these models run the composed
layer path) with batch norm, residual blocks or dropout 0.1 on the hidden
layers, against its own plain step (the overhead each layer kind adds),
PyTorch eager (nn.BatchNorm1d / a residual module / nn.Dropout; Adam fused +
clip_grad_norm_) and JAX jit + optax (the same layers in jax.numpy).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest bench/bench_toolkit.py
    python bench/toolkit_compare.py      # interleaved rounds: the ratios in RESULTS.md

Smoke runs (``--benchmark-disable``) use a miniature deep network.
"""
import pytest

import conftest
from toolkit_workloads import CONTENDERS, DEEP, SMOKE_DEEP, VARIANTS
from workloads import gemm_flops


def _workload():
    return SMOKE_DEEP if conftest.SMOKE else DEEP


@pytest.mark.parametrize("variant", VARIANTS)
def bench_fastgrad_toolkit_step(benchmark, variant, device):
    sizes, batch, act, loss = _workload()
    step = CONTENDERS["fastgrad"](variant, sizes, batch, act, loss, device=device)
    step()                                    # compile / warm up

    def run():
        step()
        conftest.sync(device)
    benchmark.extra_info["gemm_gflop"] = gemm_flops(sizes, batch) / 1e9
    benchmark(run)


@pytest.mark.parametrize("contender", [c for c in CONTENDERS if c != "fastgrad"])
@pytest.mark.parametrize("variant", VARIANTS)
def bench_toolkit_step(benchmark, variant, contender):
    if contender in ("torch", "jax"):
        pytest.importorskip(contender)
    if contender == "jax":
        pytest.importorskip("optax")
    sizes, batch, act, loss = _workload()
    step = CONTENDERS[contender](variant, sizes, batch, act, loss)
    step()                                    # compile / warm up
    benchmark.extra_info["gemm_gflop"] = gemm_flops(sizes, batch) / 1e9
    benchmark(step)
