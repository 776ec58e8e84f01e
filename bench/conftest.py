"""Shared pieces of the benchmarks: devices, GPU synchronisation, smoke mode.

* ``device`` -- parametrized over ``"cpu"`` and ``"cuda"``; the GPU case carries
  the ``cuda`` marker and skips, saying why, where ``fastgrad.available_devices()``
  has no GPU.
* ``sync(device)`` -- wait for the GPU.  pytest-benchmark's timer is a host
  clock: a benchmarked function on CUDA must end with ``sync(device)`` or it
  times only the kernel launches.
* ``SMOKE`` -- True under ``--benchmark-disable`` (each benchmark body runs
  once, as a test): benchmarks then pick tiny sizes so ``pytest bench
  --benchmark-disable -q`` finishes in seconds.  Read it at collection time
  (``from conftest import SMOKE``; it is set in ``pytest_configure``, before
  any bench module is imported) or through the ``smoke`` fixture.

Benchmarks are measurements, never pass/fail tests: they assert only that the
contenders ran.
"""
import fnmatch

import pytest

import fastgrad

SMOKE = False
DEVICES = ("cpu", "cuda")


def pytest_configure(config):
    global SMOKE
    SMOKE = bool(config.getoption("benchmark_disable", default=False))
    # Registered here too, for runs configured by the root pyproject.toml
    # (e.g. `pytest tests bench`), which does not read bench/pytest.ini.
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU and CuPy (skipped otherwise)")


def pytest_collect_file(file_path, parent):
    """Collect bench_*.py also when another config (pyproject.toml, whose
    python_files is test_*.py) drives the run; bench/pytest.ini already does
    it for `pytest bench`, so nothing is collected twice."""
    if file_path.suffix != ".py" or not fnmatch.fnmatch(file_path.name, "bench_*.py"):
        return None
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _cuda_skip_reason():
    if "cuda" in fastgrad.available_devices():
        return None
    from fastgrad import device as _device
    return f"no GPU: {_device._cuda_problem()}"


@pytest.fixture(params=[pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else [])
                        for d in DEVICES])
def device(request):
    """Each device fastgrad knows; "cuda" skips where it cannot run."""
    if request.param == "cuda":
        reason = _cuda_skip_reason()
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture
def smoke():
    return SMOKE


def xp_of(device):
    """numpy for "cpu", cupy for "cuda"."""
    return fastgrad.device.array_module(device)


def sync(device):
    """Block until the GPU has finished its queued work (no-op on the CPU)."""
    if device == "cuda":
        import cupy
        cupy.cuda.Device().synchronize()
