"""Whole training step (forward + loss + backward + clip + Adam), float32:
fastgrad's TrainStep against the step's own GEMMs (the floor), plain NumPy,
PyTorch eager (Adam fused + clip_grad_norm_) and JAX jit + optax.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m pytest bench/bench_step.py
    python bench/step_compare.py      # interleaved rounds: the ratios in RESULTS.md

Workloads (bench/workloads.py): tiny, mnist, deep, wide.  Smoke runs
(``--benchmark-disable``) use miniature versions of each.
"""
import pytest

import conftest
from workloads import CONTENDERS, SMOKE_WORKLOADS, WORKLOADS, gemm_flops

PEERS = ("gemm_floor", "numpy", "torch", "jax")


def _workload(name):
    return (SMOKE_WORKLOADS if conftest.SMOKE else WORKLOADS)[name]


@pytest.mark.parametrize("workload", list(WORKLOADS))
def bench_fastgrad_step(benchmark, workload, device):
    sizes, batch, act, loss = _workload(workload)
    step = CONTENDERS["fastgrad"](sizes, batch, act, loss, device=device)
    step()                                    # compile / warm up

    def run():
        step()
        conftest.sync(device)
    benchmark.extra_info["gemm_gflop"] = gemm_flops(sizes, batch) / 1e9
    benchmark(run)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def bench_fastgrad_step_cuda_graph(benchmark, workload, device):
    """TrainStep(cuda_graph=True): the step replayed from a CUDA graph."""
    if device != "cuda":
        pytest.skip("CUDA graphs are a CUDA feature")
    sizes, batch, act, loss = _workload(workload)
    step = CONTENDERS["fastgrad"](sizes, batch, act, loss, device=device, cuda_graph=True)
    for _ in range(3):                        # compile, capture on the second call
        step()

    def run():
        step()
        conftest.sync(device)
    benchmark.extra_info["captured"] = all(
        g.graph is not None for g in step.train_step._graphs.values())
    benchmark(run)


@pytest.mark.parametrize("peer", PEERS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def bench_peer_step(benchmark, workload, peer):
    if peer in ("torch", "jax"):
        pytest.importorskip(peer)
    if peer == "jax":
        pytest.importorskip("optax")
    sizes, batch, act, loss = _workload(workload)
    step = CONTENDERS[peer](sizes, batch, act, loss)
    step()
    benchmark.extra_info["gemm_gflop"] = gemm_flops(sizes, batch) / 1e9
    benchmark(step)
