"""Second processes compile what a step reaches through addresses while
this one compiles its driver.

A cold first step compiles things that do not call each other: the step
driver and the pass team's members, which the driver reaches through
addresses in its plan (``kernels/cpu/pass_team.py``); the sharded step's
kernel and its shard member, which runs one shard's forward and backward
(``kernels/cpu/step_sharded.py``).  Numba compiles one function at a time
in a process (a global compiler lock), so where the host has a second
core, :func:`start` runs a worker (``python -c`` on :func:`main`) that
compiles one of those jobs (``JOBS``) into Numba's disk cache while this
process compiles the driver (``TrainStep``); :meth:`Pending.fill` then waits
for it and fills the plan from the cache.  ``fill`` ends in ``fill_members``
(or ``shard_member``) as without a worker, which compiles whatever the
cache lacks: a worker that fails or is slow costs time, never a result.

No worker where the job would not come from the disk cache (a copy of the
kernels with registered activations, a cache Numba cannot write), where it
is in the cache or this process already, with one usable core, in an MPI
job (its ranks own the cores), or with ``FASTGRAD_COMPILE_WORKER=0``.
"""
import importlib
import json
import os
import subprocess
import sys
import threading

import numpy as np

from . import registry
from .kernels.layout import PLAN_POOL_SHARD

ENV = "FASTGRAD_COMPILE_WORKER"
#: Seconds :meth:`Pending.fill` waits for a worker before it stops it and
#: compiles here (the members take ~2 s on a quiet 2-core host).
WAIT_S = 120.0

# The worker's program: this process's module path first, so that it
# imports the same fastgrad (and so writes the cache entries looked up here).
_BOOTSTRAP = ("import json, sys; spec = json.loads(sys.argv[1]); sys.path[:] = spec['path']; "
              "from fastgrad._compile_worker import main; main(spec)")

_lock = threading.Lock()
_started = {}            # (package, dtype name, job) -> Pending
#: What a worker compiles: the pass team's members, or the shard member.
JOBS = ("members", "shard")


def enabled():
    """Whether workers may run: ``FASTGRAD_COMPILE_WORKER`` is unset or "1"."""
    value = os.environ.get(ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected '0' or '1'")
    return value != "0"


def _usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:             # not on Linux
        return os.cpu_count() or 1


class Pending:
    """A worker compiling one job of one kernel package for one dtype."""

    def __init__(self, process, step_module, dtype, job):
        self.process, self._step_module, self._dtype, self._job = \
            process, step_module, dtype, job

    def fill(self, plan):
        """Wait for the worker (at most :data:`WAIT_S` s, then stop it) and
        write its job's addresses into ``plan``: loaded from the disk cache,
        or compiled here what the worker did not leave there."""
        try:
            self.process.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        fill(plan, self._step_module, self._dtype, self._job)


class Together:
    """Several :class:`Pending` workers filling one plan."""

    def __init__(self, pending):
        self._pending = pending

    def fill(self, plan):
        for pending in self._pending:
            pending.fill(plan)


def together(pending):
    """One object whose ``fill`` fills each of ``pending`` (Nones left
    out); None where there is none."""
    pending = [p for p in pending if p is not None]
    if not pending:
        return None
    return pending[0] if len(pending) == 1 else Together(pending)


def _sharded(step_module):
    """The ``step_sharded`` module of ``step_module``'s package."""
    return importlib.import_module(step_module.__package__ + ".step_sharded")


def fill(plan, step_module, dtype, job):
    """Write ``job``'s addresses for ``dtype`` into ``plan`` in this
    process (compiled here where the disk cache lacks them)."""
    if job == "members":
        step_module.pass_team.fill_members(plan, dtype)
    else:
        plan[PLAN_POOL_SHARD] = _sharded(step_module).shard_member(dtype)


def _to_compile(step_module, dtype, job):
    """Whether ``job`` would compile something: not in this process nor
    in the disk cache."""
    if job == "members":
        return bool(step_module.pass_team.members_to_compile(dtype))
    return _sharded(step_module).shard_member_to_compile(dtype)


def _worker_env():
    """This process's environment, with the Numba settings that place and
    key the disk cache as this process has them (set in code, too)."""
    import numba
    env = dict(os.environ)
    for name, value in (("NUMBA_CACHE_DIR", numba.config.CACHE_DIR),
                        ("NUMBA_CPU_NAME", numba.config.CPU_NAME),
                        ("NUMBA_CPU_FEATURES", numba.config.CPU_FEATURES)):
        if value:
            env[name] = value
    return env


def start(step_module, dtype, job="members"):
    """A :class:`Pending` worker compiling ``job`` (one of ``JOBS``) of the
    kernel package of ``step_module`` (its ``step``) for ``dtype``, or None
    where none runs (see the module's docstring): then the caller fills
    the plan itself (:func:`fill`)."""
    if job not in JOBS:
        raise ValueError(f"job={job!r}: expected one of {JOBS}")
    team = step_module.pass_team
    package = team.__package__
    dtype = np.dtype(dtype).name
    if not enabled() or not team.JIT["cache"] or _usable_cores() < 2 \
            or "mpi4py.MPI" in sys.modules \
            or not os.path.basename(sys.executable or "").lower().startswith("python"):
        return None             # (an embedding program's sys.executable is not Python)
    rebuild = registry.rebuild_args(package)
    if rebuild is None:
        return None
    with _lock:
        pending = _started.get((package, dtype, job))
        if pending is not None and pending.process.poll() is None:
            return pending               # another step of the same kernels waits on it too
        if not _to_compile(step_module, dtype, job):
            return None
        import fastgrad
        spec = {"path": sys.path, "fastgrad": fastgrad.__file__, "kernels": rebuild,
                "dtype": dtype, "job": job}
        try:
            process = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, json.dumps(spec)],
                                       env=_worker_env(), stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError:
            return None
        pending = _started[package, dtype, job] = Pending(process, step_module, dtype, job)
        return pending


def main(spec):
    """The worker: compile its job into the disk cache and exit."""
    import fastgrad
    if os.path.realpath(fastgrad.__file__) != os.path.realpath(spec["fastgrad"]):
        sys.exit(f"fastgrad worker: imported {fastgrad.__file__}, not {spec['fastgrad']}")
    package = (registry.cpu_kernels(**spec["kernels"]) if spec["kernels"]
               else registry.full_cpu_kernels())
    if spec["job"] == "shard":
        importlib.import_module(package.__name__ + ".step_sharded").shard_member(spec["dtype"])
    else:
        package.pass_team.member_addresses(spec["dtype"])
