"""The compile worker (``fastgrad._compile_worker``): on a cold first step a
second process compiles the pass team's members while this one compiles the
step driver.  Whatever the worker does, the step gives the bits of a step
without one."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import _compile_worker, registry
from fastgrad import threads as fg_threads
from fastgrad.kernels.cpu import pass_team

SIZES = [11, 17, 5]
# the first call of each: the driver it compiles
CALLS = {"step": ("relu", "train_step"), "gradients": ("tanh", "forward_backward"),
         "epoch": ("gelu", "train_steps"),
         # the batch-sharded step (threads=2): its kernels in step._ksharded
         "sharded-step": ("silu", "sharded_train_step_small"),
         "sharded-epoch": ("elu", "sharded_train_steps_small")}
PLAIN = ["step", "gradients", "epoch"]

# A fresh process on an empty disk cache, with a copy of the kernels per
# model (so each model's first call is cold), runs each call of CALLS on its
# own model (_RUN) and reports what its members' cfuncs loaded from disk,
# its driver's signatures and the workers' exit codes; the parameters and
# gradients go to an .npz.
_CHILD_HEAD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import fastgrad as fg
    from fastgrad import _compile_worker as cw
    out_path, calls, hang = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "1"
    if hang:                       # a worker that never finishes: stopped after WAIT_S
        cw._BOOTSTRAP, cw.WAIT_S = "import time; time.sleep(600)", 1.0
""")

_RUN = textwrap.dedent("""
    def run(name):
        act, driver = {calls}[name]
        rng = np.random.default_rng(3)
        X = rng.standard_normal((40, {n_in})).astype(np.float32)
        Y = rng.integers(0, {n_out}, 40)
        model = fg.MLP({sizes}, activation=act, seed=1)
        step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(),
                            fg.Adam(model, lr=1e-2, clip_norm=0.5),
                            threads=2 if name.startswith("sharded") else None)
        if name.endswith("step"):
            step(X[:16], Y[:16])
        elif name == "gradients":
            step.gradients(X[:16], Y[:16])
        else:
            step.run_epoch(X, Y, 16, shuffle=False)
        kernels = step._ksharded if name.startswith("sharded") else step._kernels
        return step, getattr(kernels, driver)
""").format(calls=CALLS, n_in=SIZES[0], n_out=SIZES[-1], sizes=SIZES)

_CHILD_BODY = textwrap.dedent("""
    report, arrays = {}, {}
    for name in calls:
        step, driver = run(name)
        package = sys.modules[step._kernels.__package__]
        report[name] = {"hits": [m.cache_hits for m in package.pass_team._members.values()],
                        "shard_hits": [m.cache_hits for m in
                                       package.step_sharded._shard_members.values()],
                        "signatures": len(driver.signatures)}
        arrays[name + "_params"] = step.model.params
        arrays[name + "_grads"] = step.model.grads
    report["workers"] = [p.process.returncode for p in cw._started.values()]
    np.savez(out_path, **arrays)
    print(json.dumps(report))
""")

needs_team = pytest.mark.skipif(
    _compile_worker._usable_cores() < 2 or fg_threads.team_threads() == 0,
    reason="a worker runs beside a pass team: 2 cores and OpenBLAS's workers")


def _child(tmp_path, name, cache, calls, hang=False):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), FASTGRAD_KERNEL_COPIES="model",
               FASTGRAD_COMPILE_WORKER="1")
    code = "\n".join([_CHILD_HEAD, _RUN, _CHILD_BODY])
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / name), ",".join(calls),
                          "1" if hang else "0"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1]), np.load(tmp_path / (name + ".npz"))


def _in_process(name):
    """The same call in this process, without a worker (the suite's shared kernels)."""
    env = {"np": np, "fg": fg}
    exec(_RUN, env)
    step, _ = env["run"](name)
    return step.model.params.copy(), step.model.grads.copy()


def _cold_calls(tmp_path, cache, names):
    """Each call of ``names`` cold in one child on ``cache``: a worker
    compiled its members (exit 0), and for the sharded step a second one
    its shard member; the child loaded all of them from the disk cache and
    compiled its driver once, and the results are bitwise a warm call's
    (this process)."""
    report, arrays = _child(tmp_path, "cold", cache, names)
    sharded = [name.startswith("sharded") for name in names]
    assert report.pop("workers") == [0] * (len(names) + sum(sharded)), report
    for name, shards in zip(names, sharded):
        assert report[name] == {"hits": [1] * len(pass_team.KINDS),
                                "shard_hits": [1] if shards else [], "signatures": 1}, \
            (name, report)
        params, grads = _in_process(name)
        np.testing.assert_array_equal(arrays[name + "_params"], params)
        np.testing.assert_array_equal(arrays[name + "_grads"], grads)
    return arrays


@pytest.mark.slow
@needs_team
def test_a_cold_first_call_takes_its_members_from_a_worker(tmp_path):
    """Each driver entry's cold first call (step, gradients, epoch) takes its
    members from a worker.  A second process on the same cache starts no
    worker."""
    cache = tmp_path / "cache"
    arrays = _cold_calls(tmp_path, cache, PLAIN)
    report, warm = _child(tmp_path, "warm", cache, ["step"])
    assert report == {"workers": [], "step": {"hits": [1] * len(pass_team.KINDS),
                                              "shard_hits": [], "signatures": 1}}, report
    np.testing.assert_array_equal(warm["step_params"], arrays["step_params"])


@pytest.mark.slow
@needs_team
def test_the_sharded_steps_cold_first_call_takes_its_members_from_a_worker(tmp_path):
    """TrainStep(threads=2): its first step and its first compiled epoch
    take their members from a worker too, and their shard member from a
    second one."""
    _cold_calls(tmp_path, tmp_path / "cache", ["sharded-step", "sharded-epoch"])


@pytest.mark.slow
@needs_team
def test_a_worker_that_never_finishes_is_stopped_and_the_step_compiles_here(tmp_path):
    report, arrays = _child(tmp_path, "hung", tmp_path / "cache", ["step"], hang=True)
    assert report["workers"] == [-9], report             # killed after WAIT_S
    # compiled here
    assert report["step"] == {"hits": [0] * len(pass_team.KINDS), "shard_hits": [],
                              "signatures": 1}, report
    np.testing.assert_array_equal(arrays["step_params"], _in_process("step")[0])


def test_the_switch(monkeypatch):
    for value, on in (("", True), ("1", True), ("0", False)):
        monkeypatch.setenv(_compile_worker.ENV, value)
        assert _compile_worker.enabled() is on
    monkeypatch.setenv(_compile_worker.ENV, "yes")
    with pytest.raises(ValueError, match="FASTGRAD_COMPILE_WORKER='yes'"):
        _compile_worker.enabled()


def test_no_worker_where_its_cache_entries_would_not_be_used(monkeypatch):
    """Off by the switch; for a copy with registered activations (not cached
    on disk); for members this process has already: nothing is started."""
    import fastgrad.kernels.cpu as full
    full.pass_team.member_addresses(np.float32)
    assert full.pass_team.members_to_compile(np.float32) == ()
    assert _compile_worker.start(full.step, np.float32) is None     # compiled here already
    assert registry.rebuild_args(full.__name__) == {}
    monkeypatch.setattr(_compile_worker, "_BOOTSTRAP", "raise SystemExit(5)")
    monkeypatch.setattr(full.pass_team, "members_to_compile", lambda dtype: ("update",))
    monkeypatch.setenv(_compile_worker.ENV, "0")
    assert _compile_worker.start(full.step, np.float32) is None
    registered = registry.cpu_kernels()       # with whatever is registered: no disk cache
    assert registry.rebuild_args(registered.__name__) is None
    monkeypatch.setenv(_compile_worker.ENV, "1")
    assert _compile_worker.start(registered.step, np.float32) is None
    # an embedding program (uwsgi, a game engine): its sys.executable is not Python
    monkeypatch.setattr(_compile_worker, "_started", {})
    monkeypatch.setattr(sys, "executable", shutil.which("true") or "/bin/true")
    assert _compile_worker.start(full.step, np.float32) is None


def test_the_worker_gets_the_cache_settings_made_in_code(monkeypatch):
    import numba
    monkeypatch.setattr(numba.config, "CACHE_DIR", "/somewhere/else")
    monkeypatch.setattr(numba.config, "CPU_NAME", "generic")
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    env = _compile_worker._worker_env()
    assert env["NUMBA_CACHE_DIR"] == "/somewhere/else" and env["NUMBA_CPU_NAME"] == "generic"
    assert env["PATH"] == os.environ["PATH"]


@needs_team
def test_a_worker_that_fails_costs_no_result(monkeypatch):
    """A worker that exits with an error: fill() still gives the plan this
    process's members (loaded or compiled here)."""
    import fastgrad.kernels.cpu as full
    from fastgrad.kernels import layout
    if "mpi4py.MPI" in sys.modules:
        pytest.skip("no worker in an MPI process")
    monkeypatch.setenv(_compile_worker.ENV, "1")
    monkeypatch.setattr(_compile_worker, "_started", {})
    monkeypatch.setattr(_compile_worker, "_BOOTSTRAP", "raise SystemExit(5)")
    monkeypatch.setattr(full.pass_team, "members_to_compile", lambda dtype: ("update",))
    pending = _compile_worker.start(full.step, np.float64)
    assert pending is not None
    assert _compile_worker.start(full.step, np.float64) in (pending, None)   # one at a time
    plan = np.zeros(layout.PLAN_HEADER, np.int64)
    pending.fill(plan)
    assert pending.process.returncode == 5
    expected = np.zeros(layout.PLAN_HEADER, np.int64)
    full.pass_team.fill_members(expected, np.float64)
    np.testing.assert_array_equal(plan, expected)
    assert plan[layout.PLAN_POOL_UPDATE] != 0


@needs_team
def test_a_shard_worker_that_fails_costs_no_result(monkeypatch):
    """The shard member's worker exits with an error: fill() still gives
    the header this process's shard member, the one step_sharded gives."""
    import fastgrad.kernels.cpu as full
    from fastgrad.kernels import layout
    from fastgrad.kernels.cpu import step_sharded
    if "mpi4py.MPI" in sys.modules:
        pytest.skip("no worker in an MPI process")
    with pytest.raises(ValueError, match="job='both'"):
        _compile_worker.start(full.step, np.float64, "both")
    monkeypatch.setenv(_compile_worker.ENV, "1")
    monkeypatch.setattr(_compile_worker, "_started", {})
    monkeypatch.setattr(_compile_worker, "_BOOTSTRAP", "raise SystemExit(5)")
    to_compile = step_sharded.shard_member_to_compile
    monkeypatch.setattr(step_sharded, "shard_member_to_compile", lambda dtype: True)
    pending = _compile_worker.start(full.step, np.float64, "shard")
    assert pending is not None
    header = np.zeros(layout.PLAN_HEADER, np.int64)
    _compile_worker.together([None, pending]).fill(header)
    assert pending.process.returncode == 5
    assert header[layout.PLAN_POOL_SHARD] == step_sharded.shard_member(np.float64) != 0
    assert not np.delete(header, layout.PLAN_POOL_SHARD).any()
    assert to_compile(np.float64) is False         # in this process now


@needs_team
def test_a_refused_first_call_starts_no_worker(tmp_path):
    # a batch of 1 for batch norm is refused before the plan's team is
    # filled: it started a worker that nothing waited for (a zombie)
    code = textwrap.dedent("""
        import numpy as np
        import fastgrad as fg
        from fastgrad import _compile_worker as cw
        m = fg.MLP([6, 8, 3], norm="batch", seed=0)
        step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m))
        try:
            step(np.zeros((1, 6), np.float32), np.zeros(1, np.int64))
        except ValueError as exc:
            assert "batch of 1" in str(exc), exc
        else:
            raise AssertionError("a batch of 1 was taken")
        print(len(cw._started))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               FASTGRAD_KERNEL_COPIES="model", FASTGRAD_COMPILE_WORKER="1")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[-1] == "0"
