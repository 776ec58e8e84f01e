"""Shared pieces of the benchmarks: devices, contenders, GPU synchronisation,
quick and smoke modes, and the per-workload ratio tables.

Every benchmark takes three parameters, ``workload``, ``device`` and
``contender``, so that pytest-benchmark groups each workload's contenders
side by side (``--benchmark-group-by=param:workload`` in bench/pytest.ini)
and bench/report.py can read any run back.

* ``device`` -- ``"cpu"`` or ``"cuda"``; the GPU cases carry the ``cuda``
  marker and skip, saying why, where ``fastgrad.available_devices()`` has no
  GPU (:func:`device_params` for direct parametrization, the ``device``
  fixture for benchmarks whose contenders exist on every device).
* :func:`require` -- skip, with the reason, a contender this machine lacks
  (PyTorch or JAX not installed, no GPU for them).
* :func:`sync` -- wait for the GPU.  pytest-benchmark's timer is a host
  clock: a benchmarked function on CUDA must end with ``sync(device)`` (or
  the peer's own wait) or it times only the kernel launches.
* :func:`torch_threads` -- run a PyTorch contender at a given thread count
  (contenders ``torch-1t``, ``torch-2t``, ...): PyTorch is compared at its
  best thread count, which on a small network is often 1.
* ``SMOKE`` -- True under ``--benchmark-disable`` (each benchmark body runs
  once, as a test): benchmarks then pick tiny sizes so ``pytest bench
  --benchmark-disable -q`` finishes in seconds.  Read it at collection time
  (``import conftest; conftest.SMOKE``; set in ``pytest_configure``, before
  any bench module is imported) or through the ``smoke`` fixture.
* ``QUICK`` -- ``pytest bench --quick``: only the whole-step benchmarks
  (marked ``quick``), each timed for a shorter while: about two minutes
  on two cores.  Without it every benchmark runs (the full mode).

Benchmarks are measurements, never pass/fail tests: they assert only that the
contenders ran.
"""
import contextlib
import fnmatch
import os

import pytest

import fastgrad

SMOKE = False
QUICK = False
DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    group = parser.getgroup("fastgrad benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="only the whole-step benchmarks, timed briefly (about 2 minutes)")
    group.addoption("--no-ratio-tables", action="store_true", default=False,
                    help="do not print the per-workload tables with ratios to fastgrad")


@pytest.hookimpl(tryfirst=True)   # before pytest-benchmark reads its options
def pytest_configure(config):
    global SMOKE, QUICK
    SMOKE = bool(config.getoption("benchmark_disable", default=False))
    QUICK = bool(config.getoption("quick", default=False))
    # Registered here too, for runs configured by the root pyproject.toml
    # (e.g. `pytest tests bench`), which does not read bench/pytest.ini.
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU and CuPy (skipped otherwise)")
    config.addinivalue_line("markers", "quick: part of the quick benchmark mode (--quick)")
    opt = config.option
    if SMOKE and hasattr(opt, "benchmark_autosave"):
        opt.benchmark_autosave = False        # nothing was measured: nothing to save
    if QUICK and hasattr(opt, "benchmark_max_time"):
        from decimal import Decimal
        opt.benchmark_max_time = min(Decimal(str(opt.benchmark_max_time)), Decimal("0.4"))
        opt.benchmark_min_rounds = max(int(opt.benchmark_min_rounds), 7)


def pytest_collection_modifyitems(config, items):
    if not QUICK:
        return
    keep = [i for i in items if i.get_closest_marker("quick")]
    drop = [i for i in items if not i.get_closest_marker("quick")]
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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


def device_params(devices=DEVICES):
    """pytest.param per device, the GPU one marked ``cuda``."""
    return [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in devices]


def cases(workloads, contenders, devices=DEVICES, quick=False):
    """``pytest.param(workload, device, contender)`` for every combination,
    for ``@pytest.mark.parametrize("workload,device,contender", ...)``;
    ``contenders`` is a list, or a function of the device returning one.
    GPU cases are marked ``cuda``; ``quick`` marks them all ``quick``."""
    out = []
    for workload in workloads:
        for dev in device_params(devices):
            d = dev.values[0]
            for contender in (contenders(d) if callable(contenders) else contenders):
                marks = list(dev.marks) + ([pytest.mark.quick] if quick else [])
                out.append(pytest.param(workload, d, contender, marks=marks,
                                        id=f"{workload}-{d}-{contender}"))
    return out


@pytest.fixture(params=device_params())
def device(request):
    """Each device fastgrad knows; "cuda" skips where it cannot run."""
    require(request.param)
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


# --- contenders ---------------------------------------------------------------

def cpu_count():
    return os.cpu_count() or 1


def torch_thread_counts():
    """Thread counts PyTorch is measured at on the CPU: 1 and every core;
    in the full mode also the powers of two between."""
    n = cpu_count()
    counts = {1, n}
    if not QUICK:
        k = 2
        while k < n:
            counts.add(k)
            k *= 2
    return sorted(counts)


def torch_cpu_contenders():
    return [f"torch-{n}t" for n in torch_thread_counts()]


def require(device, contender="fastgrad"):
    """Skip (with the reason) where ``contender`` cannot run on ``device``."""
    if contender.startswith("torch"):
        torch = pytest.importorskip("torch", reason="PyTorch is not installed (extra 'peers')")
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("PyTorch has no usable CUDA device here")
        return
    if contender.startswith(("jax", "optax")):
        jax = pytest.importorskip("jax", reason="JAX is not installed (extra 'peers')")
        pytest.importorskip("optax", reason="optax is not installed (extra 'peers')")
        if device == "cuda":
            try:
                jax.devices("gpu")
            except RuntimeError:
                pytest.skip("JAX has no GPU backend here")
        return
    if device == "cuda":                  # fastgrad, and the GEMM floor on cuBLAS
        reason = _cuda_skip_reason()
        if reason:
            pytest.skip(reason)


def peer_sync(device, contender):
    """The wait a timed function of ``contender`` on ``device`` ends with."""
    if device != "cuda" or contender.startswith("jax"):   # jax's step blocks on its result
        return lambda: None
    if contender.startswith("torch"):
        import torch
        return torch.cuda.synchronize
    return lambda: sync(device)


@contextlib.contextmanager
def torch_threads(contender):
    """Run PyTorch at the thread count named by ``torch-<n>t`` (unchanged
    for any other contender), restoring the previous count afterwards."""
    if not (contender.startswith("torch-") and contender.endswith("t")):
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(int(contender[len("torch-"):-1]))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- reporting ------------------------------------------------------------------

def pytest_benchmark_update_machine_info(config, machine_info):
    """Machine, BLAS kernel and thread settings, for the JSON and report.py."""
    import report
    machine_info["fastgrad"] = report.machine_header_info()


@pytest.hookimpl(trylast=True)    # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter, config):
    if SMOKE or config.getoption("no_ratio_tables", default=False):
        return
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    import report
    rows = report.best_torch(report.records(b.as_dict(include_data=False)
                                            for b in session.benchmarks))
    if not rows:
        return
    tr = terminalreporter
    tr.write_sep("-", "per workload, fastest first (x fastgrad: time / fastgrad's on the same device)")
    for line in report.header(report.machine_header_info()):
        tr.write_line(line)
    for table in report.tables(rows):
        tr.write_line("")
        for line in table.splitlines():
            tr.write_line(line)
