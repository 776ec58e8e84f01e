"""A CUDA model's data-parallel set-up when NCCL cannot run: every rank ends,
with the same error, instead of some ranks waiting forever.  Runs where CUDA
runs (a GPU, or the host emulator in CI) under ``mpiexec -n 2``."""
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_distributed import MPIEXEC, _env, _launcher, needs_mpiexec

WORKER = Path(__file__).resolve().parent / "mpi_nccl_worker.py"
TIMEOUT_S = 240

pytestmark = [pytest.mark.cuda, needs_mpiexec]


@pytest.fixture
def cuda(device):
    if device != "cuda":
        pytest.skip("a CUDA model's set-up")


def run(mode):
    cmd = _launcher(2) + [sys.executable, str(WORKER), mode]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(),
                              timeout=TIMEOUT_S, cwd=WORKER.parent.parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec {mode} hung for {TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize("mode, cause", [("missing", "NCCL is not installed"),
                                         ("uid", "get_unique_id")])
def test_every_rank_gets_the_same_error(cuda, mode, cause):
    proc, _ = run(mode)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = dict(re.findall(r"RANK (\d) ERROR: (.*)", proc.stdout))
    assert sorted(errors) == ["0", "1"], proc.stdout + proc.stderr
    assert errors["0"] == errors["1"] and cause in errors["0"], errors


def test_a_failed_communicator_set_up_ends_the_job(cuda):
    proc, seconds = run("comm")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "NCCL communicator set-up failed" in proc.stderr
    assert "no error" not in proc.stdout
    assert MPIEXEC and seconds < TIMEOUT_S
