"""The step's passes on a thread team (kernels/cpu/pass_team.py): OpenBLAS's
own workers by default, the shared pool's GNU OpenMP threads with
``fg.share_blas_pool()``; bitwise the serial passes, for any team."""
from contextlib import contextmanager
import functools
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
from numba import njit

import fastgrad as fg
from fastgrad import registry
from fastgrad import threads as fg_threads
from fastgrad.kernels import layout as K
from fastgrad.kernels import spec
from fastgrad.kernels.cpu import activations as A
from fastgrad.kernels.cpu import fpenv
from fastgrad.kernels.cpu import losses as kl
from fastgrad.kernels.cpu import optim as kc
from fastgrad.kernels.cpu import pass_team

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["openblas", "shared"])
def team(request, monkeypatch):
    """Each team in turn: OpenBLAS's workers (the default), then the shared pool."""
    monkeypatch.delenv("FASTGRAD_PASS_TEAM", raising=False)
    if request.param == "shared":
        if not fg.share_blas_pool():
            pytest.skip(f"the BLAS pool cannot be shared here: {fg.blas_pool_status()[1]}")
    elif fg_threads._blas_team() is None:
        pytest.skip(f"no OpenBLAS team here: {fg_threads._blas_team_found.get('why_not')}")
    try:
        yield request.param
    finally:
        fg.share_blas_pool(False)


@contextmanager
def _passes(on):
    """Steps built inside run their passes on the team (on) or serially."""
    before = os.environ.get("FASTGRAD_PASS_TEAM")
    os.environ["FASTGRAD_PASS_TEAM"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["FASTGRAD_PASS_TEAM"]
        else:
            os.environ["FASTGRAD_PASS_TEAM"] = before


def _plan(dtype, threads):
    # (the team only asks for threads it may not get: OpenBLAS's never runs
    # more than OpenBLAS has, the shared pool's starts as many as asked)
    got = fg_threads.pass_team()
    assert got[0] == (numba.get_num_threads() if numba.get_num_threads() > 1 else 0)
    if numba.get_num_threads() < 2:
        pytest.skip("Numba runs one thread here: no team")
    plan = np.zeros(K.PLAN_HEADER, np.int64)
    plan[K.PLAN_POOL_THREADS], plan[K.PLAN_POOL_START], plan[K.PLAN_POOL_BLAS] = got
    pass_team.fill_members(plan, dtype)
    plan[K.PLAN_POOL_SPLIT_UPDATE] = 1
    plan[K.PLAN_POOL_THREADS] = threads
    return plan


@njit
def _forward(plan, threads, z, b, out, act, alpha):
    pass_team.forward(plan, threads, z, b, out, act, alpha)


@njit
def _gradient(plan, threads, g, a, z, db, act, alpha):
    pass_team.gradient(plan, threads, g, a, z, db, act, alpha)


def _serial_and_team(plan, threads, code, dtype, rows, cols, rng):
    """(serial, team) results of the forward and gradient passes from the
    same fresh inputs: z, the output, dz, db."""
    z0 = (rng.standard_normal((rows, cols)) * 3).astype(dtype)
    b = rng.standard_normal(cols).astype(dtype)
    g0 = rng.standard_normal((rows, cols)).astype(dtype)
    alpha = 0.3
    results = []
    for team in (False, True):
        z = z0.copy()
        out = np.empty_like(z) if A.needs_z(code) else z
        (_forward if team else _serial_forward)(plan, threads, z, b, out, code, alpha)
        g, db = g0.copy(), np.full(cols, 7, dtype)
        (_gradient if team else _serial_gradient)(plan, threads, g, out, z, db, code, alpha)
        results.append((z, out.copy(), g, db))
    return results


# The serial passes in the training kernels' floating-point mode, as the
# driver runs them (the members set it themselves: kernels/cpu/fpenv.py).
@njit
def _serial_forward(plan, threads, z, b, out, act, alpha):
    saved = fpenv.enter(z)
    A.bias_act_step(z, b, out, act, alpha)
    fpenv.leave(saved)


@njit
def _serial_gradient(plan, threads, g, a, z, db, act, alpha):
    saved = fpenv.enter(g)
    A.bias_act_grad_inplace(g, a, z, db, act, alpha)
    fpenv.leave(saved)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("code", range(spec.N_ACTIVATIONS),
                         ids=[a.name for a in spec.ACTIVATIONS])
def test_team_passes_are_bitwise_the_serial_passes(team, code, dtype):
    rng = np.random.default_rng()
    # odd sizes; fewer rows than threads; more threads than cores (a
    # share per thread, whichever thread runs it)
    # a gradient by blocks of rows: one block (8 rows), one row more,
    # partial sums in several rounds (300 x 2053: 38 blocks, 15 a round in
    # float32, 7 in float64), and rows of partial sums longer than a round
    # holds (on the heap)
    assert A.DB_ROWS == 8 and pass_team.PARTS_BYTES < 33000 * 4
    for threads, rows, cols in [(2, 147, 301), (2, 9, 2053), (2, 1000, 33), (3, 517, 37),
                                (7, 5, 211), (4, 1, 64), (2, 8, 1031), (2, 9, 1031),
                                (2, 300, 2053), (3, 0, 40), (2, 20, 33000)]:
        plan = _plan(dtype, threads)
        serial, team = _serial_and_team(plan, threads, code, dtype, rows, cols, rng)
        for name, s, t in zip(("z", "output", "dz", "db"), serial, team):
            assert np.array_equal(s, t), (name, threads, rows, cols)
        assert np.isfinite(team[1]).all() and np.isfinite(team[2]).all()


def test_a_team_smaller_than_asked_still_runs_every_share():
    # OMP_THREAD_LIMIT=1: GOMP_parallel starts one thread, which claims every share
    code = """
        import numpy as np, numba
        import fastgrad as fg
        from fastgrad.kernels import spec
        assert fg.share_blas_pool(), fg.blas_pool_status()
        numba.set_num_threads(2) if numba.config.NUMBA_NUM_THREADS > 1 else None
        import tests.test_pass_team as t
        if numba.get_num_threads() < 2:
            print("skip")
        else:
            rng = np.random.default_rng()
            for name in ("gelu", "tanh"):
                plan = t._plan(np.float32, 4)
                serial, team = t._serial_and_team(plan, 4, spec.CODES[name], np.float32, 301,
                                                  257, rng)
                assert all(np.array_equal(s, x) for s, x in zip(serial, team)), name
            print("ok")
    """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_THREAD_LIMIT="1")
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail("the child did not finish in 300 s (a hang)")
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.split() == ["skip"]:
        pytest.skip("Numba runs one thread here: no team")
    assert done.stdout.split() == ["ok"]


def _train(sizes, act, on, B=64, steps=3):
    with _passes(on):
        return _train_now(sizes, act, B, steps)


def _train_now(sizes, act, B, steps):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], B)
    model = fg.MLP(sizes, activation=act, dtype=np.float32, seed=3)
    opt = fg.Adam(model, lr=1e-3, clip_norm=0.5)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    for _ in range(steps):
        step(x, y)
    loss = step.gradients(x, y)
    return step, opt.params.copy(), model.grads.copy(), loss


@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
def test_train_step_on_the_team_is_bitwise_the_serial_step(team, act):
    # 64 x 300 outputs: a team forward and gradient for every activation in
    # the first layer; 64 x 77: a team forward and gradient for gelu and
    # silu alone; the output layer serial
    sizes = [41, 300, 77, 5]
    assert 64 * 300 >= pass_team.MIN_FORWARD_CHEAP > 64 * 77 >= pass_team.MIN_FORWARD
    assert 64 * 300 >= pass_team.MIN_GRADIENT_ROWS > 64 * 77 >= pass_team.MIN_GRADIENT_ROWS_COSTLY
    serial = _train(sizes, act, False)
    on = _train(sizes, act, True)
    plan = on[0]._fixed_args[2][9]
    threads = numba.get_num_threads()
    assert plan[K.PLAN_POOL_THREADS] == (threads if threads > 1 else 0)
    assert (plan[K.PLAN_POOL_BLAS] != 0) == (team == "openblas" and threads > 1)
    assert serial[0]._fixed_args[2][9][K.PLAN_POOL_THREADS] == 0
    for s, t in zip(serial[1:], on[1:]):
        assert np.array_equal(s, t)


def test_a_forward_goes_to_the_team_by_its_cost():
    """Memory-bound forwards (identity, relu, leaky_relu) from
    MIN_FORWARD_CHEAP outputs, the others from MIN_FORWARD; none without a
    team of 2+."""
    plan = np.zeros(K.PLAN_HEADER, np.int64)
    plan[K.PLAN_POOL_THREADS] = 2
    for name in spec.CODES:
        least = (pass_team.MIN_FORWARD_CHEAP if name in ("identity", "relu", "leaky_relu")
                 else pass_team.MIN_FORWARD)
        code = spec.CODES[name]
        assert pass_team.team_size(plan, least, code) == 2, name
        assert pass_team.team_size(plan, least - 1, code) == 0, name
    plan[K.PLAN_POOL_THREADS] = 1
    assert pass_team.team_size(plan, 1 << 20, spec.CODES["gelu"]) == 0


def test_pass_team_status_says_which_team_or_why_none(monkeypatch):
    threads, team, why_not = fg.pass_team_status()
    assert threads == fg_threads.team_threads()
    assert (team is None) == (threads == 0) == (why_not is not None)
    assert team in (None, "shared pool", "openblas workers")
    monkeypatch.setenv("FASTGRAD_PASS_TEAM", "0")
    assert fg.pass_team_status() == (0, None, "FASTGRAD_PASS_TEAM=0 in the environment")
    monkeypatch.delenv("FASTGRAD_PASS_TEAM")
    monkeypatch.setattr(fg_threads, "numba_threads", lambda: 1)
    assert fg.pass_team_status()[:2] == (0, None) and "one thread" in fg.pass_team_status()[2]
    monkeypatch.setattr(fg_threads, "numba_threads", lambda: 2)
    monkeypatch.setattr(fg_threads, "blas_pool_shared", lambda: False)
    monkeypatch.setattr(fg_threads, "_blas_team", lambda: None)
    assert fg.pass_team_status()[:2] == (0, None) and fg.pass_team_status()[2]


def test_pass_team_status_follows_threadpoolctl_limits():
    # the passes take no more threads than OpenBLAS is told to use at the
    # time; the status said 2 inside threadpool_limits(1)
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if fg.pass_team_status()[1] != "openblas workers":
        pytest.skip("no OpenBLAS team here")
    capacity = fg_threads.team_threads()
    with threadpoolctl.threadpool_limits(1):
        threads, team, why_not = fg.pass_team_status()
        assert (threads, team) == (0, None) and "limited to 1 thread" in why_not
        # plans are built for the team's capacity (the driver caps each pass
        # at the count of the moment): a step built here keeps its team
        assert fg_threads.team_threads() == capacity
    assert fg.pass_team_status()[1] == "openblas workers"


def test_the_plan_follows_the_pool_and_the_thread_count():
    # the team moves between OpenBLAS's workers and the shared pool, and
    # goes when Numba runs one thread
    if numba.get_num_threads() < 2 or fg_threads._blas_team() is None:
        pytest.skip("no OpenBLAS team here (one thread, or no pthreads OpenBLAS)")
    before = numba.get_num_threads()
    step, *_ = _train([20, 300, 3], "tanh", True, steps=1)
    x = np.ones((64, 20), np.float32)
    y = np.zeros(64, np.int64)

    def team():
        step(x, y)
        plan = step._fixed_args[2][9]
        return plan[K.PLAN_POOL_THREADS], plan[K.PLAN_POOL_BLAS] != 0

    try:
        assert team() == (before, True)
        fg.set_num_threads(1)
        assert team() == (0, False)
        fg.set_num_threads(before)
        assert team() == (before, True)
        if fg.share_blas_pool():
            assert team() == (before, False)
            fg.share_blas_pool(False)
            assert team() == (before, True)
    finally:
        fg.share_blas_pool(False)
        fg.set_num_threads(before)


def _thread_cpu_seconds():
    """CPU seconds (user + system) of each thread of this process (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:                 # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def test_the_default_team_runs_on_openblas_workers():
    # not silently serial: with OpenBLAS's workers asleep (no GEMM for a
    # while), a team's passes wake them, and they do a real part of the work
    import threading
    import time
    if numba.get_num_threads() < 2 or fg_threads._blas_team() is None \
            or not os.path.isdir("/proc/self/task"):
        pytest.skip("no OpenBLAS team here (or no /proc)")
    plan = _plan(np.float32, 2)
    assert plan[K.PLAN_POOL_BLAS] != 0 and plan[K.PLAN_POOL_THREADS] == 2
    rng = np.random.default_rng()
    z = rng.standard_normal((2048, 1031)).astype(np.float32)
    b = rng.standard_normal(1031).astype(np.float32)
    out = np.empty_like(z)
    _forward(plan, 2, z, b, out, spec.CODES["gelu"], 0.0)        # compiled
    time.sleep(0.5)                     # OpenBLAS's workers stop spinning and sleep
    main = threading.get_native_id()
    before = _thread_cpu_seconds()
    t = time.perf_counter()
    while time.perf_counter() - t < 1.0:
        _forward(plan, 2, z, b, out, spec.CODES["gelu"], 0.0)
    after = _thread_cpu_seconds()
    others = sum(v - before.get(tid, 0.0) for tid, v in after.items() if tid != main)
    assert others >= 0.2 * (after[main] - before[main]), (others, after[main] - before[main])


def test_two_steps_in_two_threads_share_the_team(team):
    # two models trained at once from two Python threads (the kernels release
    # the GIL): their GEMMs and team passes queue on the same workers without
    # a hang, and each model ends bitwise where it ends trained alone
    from test_reliability import _hammer
    if numba.get_num_threads() < 2:
        pytest.skip("Numba runs one thread here: no team")

    def make(seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((128, 41)).astype(np.float32)
        y = rng.integers(0, 5, 128)
        model = fg.MLP([41, 300, 400, 5], activation="gelu", dtype=np.float32, seed=seed)
        step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(),
                            fg.Adam(model, lr=1e-3, clip_norm=0.5))
        return model, functools.partial(step, x, y)

    alone = []
    for seed in (1, 2):
        model, step = make(seed)
        for _ in range(30):
            step()
        assert step.func._fixed_args[2][9][K.PLAN_POOL_THREADS] > 1
        alone.append(model.params.copy())
    runs = [make(1), make(2)]
    _hammer([step for _, step in runs], 30)
    for (model, _), want in zip(runs, alone):
        assert np.array_equal(model.params, want)


def test_openblas_told_to_use_one_thread_runs_the_team_serially():
    # the team never asks OpenBLAS for more threads than it is told to use
    # now: threadpoolctl's limit of 1 on the kernels' BLAS leaves the member
    # to this thread alone, with the same result
    from threadpoolctl import threadpool_limits
    if numba.get_num_threads() < 2 or fg_threads._blas_team() is None:
        pytest.skip("no OpenBLAS team here")
    rng = np.random.default_rng()
    plan = _plan(np.float32, 2)
    with threadpool_limits(limits=1, user_api="blas"):
        serial, one = _serial_and_team(plan, 2, spec.CODES["gelu"], np.float32, 257, 301, rng)
    assert all(np.array_equal(s, t) for s, t in zip(serial, one))


def test_a_gradient_goes_to_the_team_by_its_cost():
    """Built-in gradients by blocks of rows from two blocks and
    MIN_GRADIENT_ROWS values (memory-bound derivatives: identity, relu,
    leaky_relu, elu, sigmoid, tanh) or MIN_GRADIENT_ROWS_COSTLY (the
    others); none without a team of 2+, nor for a code the kernels do not
    serve."""
    plan = np.zeros(K.PLAN_HEADER, np.int64)
    plan[K.PLAN_POOL_THREADS] = 2
    cheap = ("identity", "relu", "leaky_relu", "elu", "sigmoid", "tanh")
    for name in spec.CODES:
        least = (pass_team.MIN_GRADIENT_ROWS if name in cheap
                 else pass_team.MIN_GRADIENT_ROWS_COSTLY)
        code = spec.CODES[name]
        cols = least // 9
        assert pass_team.gradient_team_size(plan, np.empty((9, cols + 1)), code) == 2, name
        assert pass_team.gradient_team_size(plan, np.empty((9, cols - 1)), code) == 0, name
        assert pass_team.gradient_team_size(plan, np.empty((8, 2 * least)), code) == 0, name
    assert pass_team.gradient_team_size(plan, np.empty((64, 1 << 12)), spec.N_ACTIVATIONS) == 0
    plan[K.PLAN_POOL_THREADS] = 1
    assert pass_team.gradient_team_size(plan, np.empty((64, 1 << 12)), spec.CODES["gelu"]) == 0


def test_a_registered_activation_runs_on_the_team(team):
    # its members come from the model's own copy of the kernels (uncached),
    # with the activation's loops inlined: bitwise the serial step
    from fastgrad.kernels.cpu import mathfn

    def f(z, alpha):
        return z / (mathfn.like(z, 1.0) + mathfn.exp(-z))

    def df(a, z, alpha):
        one = mathfn.like(z, 1.0)
        s = one / (one + mathfn.exp(-z))
        return s * (one + z * (one - s))

    name = "swish_pass_team"
    assert 64 * 300 >= pass_team.MIN_GRADIENT       # its gradient by columns
    registry.register_activation(name, f, df, needs="z")
    try:
        serial = _train([41, 300, 77, 5], name, False)
        on = _train([41, 300, 77, 5], name, True)
        threads = numba.get_num_threads()
        assert on[0]._fixed_args[2][9][K.PLAN_POOL_THREADS] == (threads if threads > 1 else 0)
        for s, t in zip(serial[1:], on[1:]):
            assert np.array_equal(s, t)
    finally:
        registry._forget(name)


# -- the optimizer's update on the team -----------------------------------------

# the update on a plan's team, as opt.step() runs it (TrainStep inlines it)
_team_update = pass_team.clipped_update_on_team


def _grouped(model, **kw):
    # two hp rows (weights, then biases): several segments per row
    return fg.AdamW(model, lr=1e-2, param_groups=[
        {"params": model.weights(), "weight_decay": 0.1, "lr": 3e-3},
        {"params": model.biases_and_norms(), "weight_decay": 0.0}], **kw)


OPTIMIZERS = {
    "sgd": lambda m: fg.SGD(m, lr=0.1),
    "sgd-nesterov": lambda m: fg.SGD(m, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                     clip_norm=0.5),
    "adam-amsgrad": lambda m: fg.Adam(m, lr=1e-3, amsgrad=True, clip_value=0.01),
    "adamw-maximize": lambda m: fg.AdamW(m, lr=1e-3, maximize=True, clip_norm=1.0),
    "rmsprop-centered": lambda m: fg.RMSprop(m, lr=1e-3, centered=True, momentum=0.5,
                                             weight_decay=1e-2),
    "adamw-groups": lambda m: _grouped(m, clip_norm=1.0),
}


@njit
def _serial_loss(kind, out, labels, target, grad):
    # the serial kernels (fastgrad.ops, the layer path) in the training
    # kernels' floating-point mode
    saved = fpenv.enter(out)
    if kind == spec.CROSS_ENTROPY:
        loss = kl.softmax_cross_entropy(out, labels, grad)
    elif kind == spec.MSE:
        loss = kl.mse(out, target, grad)
    else:
        loss = kl.bce_with_logits(out, target, grad)
    fpenv.leave(saved)
    return loss


def _losses_serial_and_team(plan, name, dtype, rows, cols, rng):
    """(serial, team) (loss, gradient) of loss ``name`` from fresh inputs,
    and the float64 reference's."""
    from fastgrad import reference as R
    out = (rng.standard_normal((rows, cols)) * 4).astype(dtype)
    labels = rng.integers(0, cols, rows)
    target = (rng.standard_normal((rows, cols)) if name == "mse"
              else (rng.random((rows, cols)) < 0.3)).astype(dtype)
    kind = spec.LOSS_CODES[name]
    no_labels, no_target = np.zeros(0, np.int64), np.zeros((0, cols), dtype)
    if name == "softmax_cross_entropy":
        target = no_target
        reference = R.softmax_cross_entropy(out.astype(np.float64), labels)
    else:
        labels = no_labels
        reference = (((out.astype(np.float64) - target) ** 2).mean(),
                     2 * (out.astype(np.float64) - target) / out.size) if name == "mse" \
            else R.bce_with_logits(out.astype(np.float64), target.astype(np.float64))
    results = []
    for run in (_serial_loss, functools.partial(pass_team.loss_on_team, plan)):
        grad = np.full_like(out, np.nan)
        results.append((run(kind, out, labels, target, grad), grad))
    return results, reference


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(spec.LOSS_CODES))
def test_team_loss_is_bitwise_the_serial_loss(team, name, dtype):
    rng = np.random.default_rng()
    # odd sizes over and under MIN_LOSS outputs; one unit; units fewer than
    # threads; a row per cross-entropy unit and several; more than
    # NORM_ROUND units (two rounds of sums)
    cases = [(2, 147, 301), (3, 517, 37), (7, 29, 2053), (2, 1, 16411), (4, 3, 7),
             (2, 16387, 1), (2, 4099, 700)]
    if name != "softmax_cross_entropy":
        cases.append((2, 4099, 513))          # 4,107 chunks of 512
    for threads, rows, cols in cases:
        plan = _plan(dtype, threads)
        (serial, team_run), reference = _losses_serial_and_team(plan, name, dtype, rows, cols,
                                                                rng)
        assert serial[0] == team_run[0], (threads, rows, cols)
        assert np.array_equal(serial[1], team_run[1]), (threads, rows, cols)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        divisor = rows if name == "softmax_cross_entropy" else rows * cols   # the mean's
        assert team_run[0] == pytest.approx(reference[0], rel=tol, abs=tol)
        assert np.allclose(team_run[1], reference[1], rtol=tol * 10, atol=tol / divisor)


def test_a_target_the_member_cannot_read_is_refused_before_the_step():
    # the loss's member reads the target through its address
    model = fg.MLP([30, 40, 5], seed=1)
    step = fg.TrainStep(model, fg.MSE(), fg.Adam(model, lr=1e-3))
    x = np.ones((8, 30), np.float32)
    y = np.zeros((8, 5), np.float32)
    step(x, y)
    assert step._kernels.TEAM
    args = step._fixed_args[2]
    params = model.params.copy()
    rule, s0, s1, s2, hp = step.opt._kernel_args()
    x, labels, target = step._inputs(x, y)
    strided = np.zeros((8, 10), np.float32)[:, ::2]
    for bad, match in [(strided, "C-contiguous"), (np.zeros((7, 5), np.float32), "shape"),
                       (np.zeros((8, 4), np.float32), "shape"),
                       (np.zeros((8, 5), np.float64), "dtype")]:
        with pytest.raises(ValueError, match=match):
            step._kernels.train_step(x, labels, bad, step._loss_kind, *args,
                                     rule, s0, s1, s2, hp, step._layer_sq, 0.0, 0.0)
    assert np.array_equal(model.params, params)


def test_labels_the_member_cannot_read_are_refused_before_the_step():
    model = fg.MLP([30, 40, 5], seed=1)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-3))
    x = np.ones((8, 30), np.float32)
    step(x, np.zeros(8, np.int64))
    args = step._fixed_args[2]
    params = model.params.copy()
    rule, s0, s1, s2, hp = step.opt._kernel_args()
    x, labels, target = step._inputs(x, np.zeros(8, np.int64))
    for bad, match in [(np.zeros(8, np.int32), "int64"), (np.zeros(7, np.int64), "labels"),
                       (np.zeros(16, np.int64)[::2], "C-contiguous")]:
        with pytest.raises(ValueError, match=match):
            step._kernels.train_step(x, bad, target, step._loss_kind, *args,
                                     rule, s0, s1, s2, hp, step._layer_sq, 0.0, 0.0)
    assert np.array_equal(model.params, params)


def test_loss_on_team_refuses_a_plan_it_cannot_run():
    plan = _plan(np.float32, 2)
    out = np.zeros((4, 3), np.float32)
    labels = np.zeros(4, np.int64)
    target = np.zeros((0, 0), np.float32)
    code = spec.LOSS_CODES["softmax_cross_entropy"]
    with pytest.raises(ValueError, match="dtype"):
        pass_team.loss_on_team(plan, code, out.astype(np.float64), labels, target,
                               np.zeros((4, 3)))
    plan[K.PLAN_POOL_LOSS] = 0
    with pytest.raises(ValueError, match="loss member"):
        pass_team.loss_on_team(plan, code, out, labels, target, np.zeros_like(out))


@pytest.mark.parametrize("loss", ["cross-entropy", "bce", "mse"])
@pytest.mark.parametrize("epoch", [False, True], ids=["steps", "run_epoch"])
def test_train_step_loss_on_the_team_is_bitwise_the_serial_step(team, monkeypatch, loss, epoch):
    # 64 x 700 outputs: the loss on the team (and the update); against the
    # same member on the calling thread and a model's copy of the kernels
    # without the team's branches (its own serial loss kernel)
    sizes = [23, 61, 700]
    assert 64 * 700 >= pass_team.MIN_LOSS

    def train(on):
        rng = np.random.default_rng(9)
        B, steps = 64, 3
        x = rng.standard_normal((B * steps, sizes[0])).astype(np.float32)
        if loss == "cross-entropy":
            y, fn = rng.integers(0, sizes[-1], B * steps), fg.SoftmaxCrossEntropy()
        else:
            y = (rng.random((B * steps, sizes[-1])) < 0.2).astype(np.float32)
            fn = fg.BCEWithLogits() if loss == "bce" else fg.MSE()
        model = fg.MLP(sizes, activation="tanh", dtype=np.float32, seed=3)
        opt = fg.Adam(model, lr=1e-3, clip_norm=0.5)
        step = fg.TrainStep(model, fn, opt)
        with _passes(on):
            if epoch:
                losses = list(step.run_epoch(x, y, B, shuffle=False)["loss"])
            else:
                losses = [step(x[k * B:(k + 1) * B], y[k * B:(k + 1) * B])
                          for k in range(steps)]
        return np.asarray(losses), opt.params.copy(), step

    on, members = train(True), train(False)
    monkeypatch.setenv("FASTGRAD_KERNEL_COPIES", "model")
    plain = train(False)
    threads = numba.get_num_threads()
    assert on[2]._fixed_args[2][9][K.PLAN_POOL_THREADS] == (threads if threads > 1 else 0)
    assert members[2]._kernels.TEAM and not plain[2]._kernels.TEAM
    assert members[2]._fixed_args[2][9][K.PLAN_POOL_THREADS] == 0
    for other in (members, plain):
        assert np.array_equal(other[1], on[1])
        assert np.array_equal(other[0], on[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_team_update_is_bitwise_the_serial_update(team, name, dtype):
    rng = np.random.default_rng()
    # 33,828 parameters (just over MIN_UPDATE; one share per thread) and
    # 185,212 (shares of UPDATE_SHARE, more than threads); odd sizes
    for sizes in ([37, 301, 61, 64], [517, 301, 97]):
        model = fg.MLP(sizes, dtype=dtype, seed=int(rng.integers(1 << 30)))
        opt = OPTIMIZERS[name](model)
        for _ in range(2):                 # non-zero optimizer state
            model.grads[...] = rng.standard_normal(model.grads.size)
            opt.step()
        g = (rng.standard_normal(model.grads.size) * 3).astype(dtype)
        rule, s0, s1, s2, hp = opt._kernel_args()
        assert (hp.ndim == 2) == (name == "adamw-groups")
        n = g.size
        assert n >= pass_team.MIN_UPDATE
        for threads in (2, 3, 7):
            plan = _plan(dtype, threads)
            assert pass_team.update_team_size(plan, n) == threads
            outs = []
            for on in (False, True):
                state = [opt._params.copy(), s0.copy(), s1.copy(), s2.copy()]
                layer_sq = np.full(len(opt._offsets) - 1, -1.0)
                args = (rule, state[0], g, *state[1:], hp, opt._offsets, layer_sq,
                        opt._clip_norm, opt._clip_value)
                got = _team_update(plan, *args) if on else kc.clipped_update(*args)
                outs.append((got, state, layer_sq))
            (want, want_state, want_sq), (got, got_state, got_sq) = outs
            assert got == want and not got[2]
            assert np.array_equal(got_sq, want_sq)
            for s, t in zip(want_state, got_state):
                assert np.array_equal(s, t), (name, sizes, threads)
            assert not np.array_equal(got_state[0], opt._params)   # it did update


def test_team_norm_in_several_rounds_is_bitwise_the_serial_norm(tmp_path):
    """The team sums the norm's blocks NORM_ROUND at a time into a stack
    buffer and adds them in order across rounds: with the round made 3
    blocks (a child with its own compile cache), layers that cross rounds
    and shares give the serial kernel's bits."""
    code = """
    import numba, numpy as np
    import fastgrad as fg
    from fastgrad.kernels.cpu import optim as kc, pass_team
    pass_team.NORM_ROUND = 3                 # before anything compiles
    import tests.test_pass_team as t
    if numba.get_num_threads() < 2:
        print("skip"); raise SystemExit
    rng = np.random.default_rng()
    # 185,212 parameters: 12 blocks in 3 layers (10 + 2 + 1), 4 rounds
    model = fg.MLP([517, 301, 97], dtype=np.float32, seed=int(rng.integers(1 << 30)))
    opt = fg.Adam(model, clip_norm=1.0)
    rule, s0, s1, s2, hp = opt._kernel_args()
    for threads in (2, 3):
        plan = t._plan(np.float32, threads)
        g = (rng.standard_normal(model.grads.size) * 3).astype(np.float32)
        outs = []
        for team in (False, True):
            state = [opt._params.copy(), s0.copy(), s1.copy(), s2.copy()]
            layer_sq = np.full(len(opt._offsets) - 1, -1.0)
            args = (rule, state[0], g, *state[1:], hp, opt._offsets, layer_sq,
                    opt._clip_norm, opt._clip_value)
            got = t._team_update(plan, *args) if team else kc.clipped_update(*args)
            outs.append((got, layer_sq, state[0]))
        (want, want_sq, want_p), (got, got_sq, got_p) = outs
        assert got == want and np.array_equal(got_sq, want_sq), (got, want)
        assert np.array_equal(got_p, want_p)
    print("ok")
    """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.split() == ["skip"]:
        pytest.skip("Numba runs one thread here: no team")
    assert done.stdout.split() == ["ok"]


def test_team_update_skips_a_non_finite_gradient_and_writes_nothing(team):
    model = fg.MLP([517, 301, 97], seed=2)
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    rng = np.random.default_rng()
    model.grads[...] = rng.standard_normal(model.grads.size)
    opt.step()
    g = rng.standard_normal(model.grads.size).astype(np.float32)
    g[170_001] = np.nan                     # in the second layer (from 155,918)
    rule, s0, s1, s2, hp = opt._kernel_args()
    plan = _plan(np.float32, 2)
    p, m, v = opt._params.copy(), s0.copy(), s1.copy()
    layer_sq = np.zeros(len(opt._offsets) - 1)
    norm, scale, skipped = _team_update(plan, rule, p, g, m, v, s2, hp, opt._offsets, layer_sq,
                                        1.0, 0.0)
    assert skipped and np.isnan(norm) and scale == 0.0
    assert np.array_equal(p, opt._params) and np.array_equal(m, s0) and np.array_equal(v, s1)
    # the monitor still sees which layer blew up
    assert np.isnan(layer_sq[1]) and np.isfinite(layer_sq[0])


def test_team_update_of_strided_buffers_raises_before_writing(team):
    # the members reach the buffers by address: strided ones are refused
    # before either pass runs (TrainStep and opt.step() pass contiguous ones)
    model = fg.MLP([199, 200], seed=4)           # 40,000 parameters, one layer
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    rng = np.random.default_rng()
    model.grads[...] = rng.standard_normal(model.grads.size)
    opt.step()
    rule, s0, s1, s2, hp = opt._kernel_args()
    g = rng.standard_normal(model.grads.size).astype(np.float32)
    plan = _plan(np.float32, 2)
    wide = [np.zeros(2 * g.size, np.float32) for _ in range(4)]
    for w, a in zip(wide, (opt._params, g, s0, s1)):
        w[::2] = a
    before = [w.copy() for w in wide]
    layer_sq = np.full(1, -1.0)
    with pytest.raises(ValueError, match="C-contiguous"):
        _team_update(plan, rule, *(w[::2] for w in wide), s2, hp, opt._offsets, layer_sq,
                     1.0, 0.0)
    for w, b in zip(wide, before):
        assert np.array_equal(w, b)
    assert layer_sq[0] == -1.0
    # refused before the kernel set this thread's floating-point mode
    assert np.float32(1e-20) * np.float32(3e-20) != 0


def _train_with(make_opt, on, sizes=(41, 300, 77, 5), steps=3, epoch=False):
    with _passes(on):
        return _train_with_now(make_opt, sizes, steps, epoch)


def _train_with_now(make_opt, sizes, steps, epoch, activation="tanh", dtype=np.float32):
    rng = np.random.default_rng(5)
    B = 64
    x = rng.standard_normal((B * steps, sizes[0])).astype(dtype)
    y = rng.integers(0, sizes[-1], B * steps)
    model = fg.MLP(list(sizes), activation=activation, dtype=dtype, seed=3)
    opt = make_opt(model)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
    if epoch:
        step.run_epoch(x, y, B, shuffle=False)
    else:
        for k in range(steps):
            step(x[k * B:(k + 1) * B], y[k * B:(k + 1) * B])
    return step, opt.params.copy(), [s.copy() for s in opt._kernel_args()[1:4]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("epoch", [False, True], ids=["steps", "run_epoch"])
def test_members_on_the_calling_thread_equal_a_driver_without_them(monkeypatch, dtype, epoch):
    # A driver with the team's branches runs its forward and update passes
    # through the members, on the calling thread when the plan has no team;
    # a model's copy without the branches runs its own serial passes.
    # (gelu: a forward member that keeps z; layers under and over the split
    # sizes; adamw-groups: several hp rows)
    def train():
        return _train_with_now(OPTIMIZERS["adamw-groups"], (41, 300, 77, 5), 3, epoch,
                               activation="gelu", dtype=dtype)
    with _passes(False):
        members = train()                    # the suite's shared package
        monkeypatch.setenv("FASTGRAD_KERNEL_COPIES", "model")
        plain = train()                      # the model's copy, no team branches
    plan = members[0]._fixed_args[2][9]
    assert members[0]._kernels.TEAM and not plain[0]._kernels.TEAM
    assert plan[K.PLAN_POOL_THREADS] == 0 and plan[K.PLAN_POOL_FORWARD] != 0
    assert plain[0]._fixed_args[2][9][K.PLAN_POOL_FORWARD] == 0
    assert np.array_equal(members[1], plain[1])
    for s, t in zip(members[2], plain[2]):
        assert np.array_equal(s, t)


def test_a_plan_without_members_is_refused_before_the_step():
    # a driver with the team's branches has no serial copy of those passes
    model = fg.MLP([30, 40, 5], seed=1)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-3))
    x = np.ones((8, 30), np.float32)
    y = np.zeros(8, np.int64)
    step(x, y)
    args = list(step._fixed_args[2])
    assert step._kernels.TEAM
    args[9] = plan = args[9].copy()
    plan[K.PLAN_POOL_FORWARD] = 0
    params = model.params.copy()
    rule, s0, s1, s2, hp = step.opt._kernel_args()
    x, labels, target = step._inputs(x, y)
    with pytest.raises(ValueError, match="members"):
        step._kernels.train_step(x, labels, target, step._loss_kind, *args,
                                 rule, s0, s1, s2, hp, step._layer_sq, 0.0, 0.0)
    with pytest.raises(ValueError, match="members"):
        step._kernels.forward(x, args[0], *args[2:8], *args[9:])
    assert np.array_equal(model.params, params)


@pytest.mark.parametrize("name", ["sgd-nesterov", "rmsprop-centered", "adamw-groups"])
@pytest.mark.parametrize("epoch", [False, True], ids=["steps", "run_epoch"])
def test_train_step_updates_on_the_team_bitwise(team, name, epoch):
    # 36,167 parameters: the update runs on the team, in the step and in
    # run_epoch's compiled epoch
    serial = _train_with(OPTIMIZERS[name], False, epoch=epoch)
    on = _train_with(OPTIMIZERS[name], True, epoch=epoch)
    threads = numba.get_num_threads()
    plan = on[0]._fixed_args[2][9]
    assert plan[K.PLAN_POOL_THREADS] == (threads if threads > 1 else 0)
    assert plan[K.PLAN_POOL_SPLIT_UPDATE] == 1 and plan[K.PLAN_POOL_UPDATE] != 0
    assert serial[0]._fixed_args[2][9][K.PLAN_POOL_THREADS] == 0
    assert np.array_equal(serial[1], on[1])
    for s, t in zip(serial[2], on[2]):
        assert np.array_equal(s, t)


def test_opt_parallel_false_keeps_the_step_update_serial(team):
    if numba.get_num_threads() < 2:
        pytest.skip("Numba runs one thread here: no team")
    step, *_ = _train_with(OPTIMIZERS["sgd"], True, steps=1)
    x = np.ones((64, 41), np.float32)
    y = np.zeros(64, np.int64)

    def split_update():
        step(x, y)
        plan = step._fixed_args[2][9]
        assert plan[K.PLAN_POOL_THREADS] > 1      # the activation passes keep the team
        assert plan[K.PLAN_POOL_UPDATE] != 0      # the update runs through its member
        return plan[K.PLAN_POOL_SPLIT_UPDATE]

    assert split_update() == 1
    step.opt.parallel = False
    assert split_update() == 0
    step.opt.parallel = True
    assert split_update() == 1
    step.opt.parallel = None
    assert split_update() == 1


def test_opt_step_runs_the_team_update_bitwise(team):
    # opt.step() (no TrainStep) from PARALLEL_UPDATE_MIN_PARAMS: the team
    # kernel, bitwise the serial kernel's result; re-bound after set_num_threads
    if numba.get_num_threads() < 2:
        pytest.skip("Numba runs one thread here: no team")
    assert fg_threads.PARALLEL_UPDATE_MIN_PARAMS == pass_team.MIN_UPDATE
    rng = np.random.default_rng()
    grads = [rng.standard_normal(36_167) for _ in range(3)]
    runs = []
    for on in (False, True):
        with _passes(on):
            model = fg.MLP([41, 300, 77, 5], seed=3)           # 36,167 parameters
            opt = OPTIMIZERS["adamw-groups"](model)
            assert opt.parallel == on
            for k, g in enumerate(grads):
                if on and k == 1:
                    before = numba.get_num_threads()
                    fg.set_num_threads(1)
                    assert not opt.parallel
                    fg.set_num_threads(before)
                model.grads[...] = g
                stats = opt.step()
            if on:
                kernel = opt._chosen_update()
                assert kernel.func is pass_team_of(opt).clipped_update_on_team
                assert (kernel.args[0][K.PLAN_POOL_BLAS] != 0) == (team == "openblas")
        runs.append((opt.params.copy(), stats.grad_norm, stats.layer_norms))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] and np.array_equal(runs[0][2], runs[1][2])


def pass_team_of(opt):
    return sys.modules[opt._backend.update_kernels(opt.rule).__package__].pass_team


def test_a_model_copy_has_the_team_branches_only_while_it_has_a_team(per_model_copies):
    # A model's copy of the kernels without a team (one thread, or
    # FASTGRAD_PASS_TEAM=0): a driver with no team branch (a cold first step
    # compiles ~1 s less).  A team between steps moves the step to a copy
    # with them, losing it moves it back; the parameters are bitwise those
    # of a step that never had one at the same thread counts (the GEMMs'
    # bits may depend on OpenBLAS's thread count: with OPENBLAS_CORETYPE=
    # Haswell and OPENBLAS_L2_SIZE=512 on an AMD Zen 5 they did).
    if numba.get_num_threads() < 2 or fg_threads._blas_team() is None:
        pytest.skip("no OpenBLAS team here")
    threads = numba.get_num_threads()
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 41)).astype(np.float32)
    y = rng.integers(0, 5, 64)

    def run(team):
        with _passes(team):
            model = fg.MLP([41, 300, 77, 5], activation="gelu", dtype=np.float32, seed=3)
            step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, clip_norm=0.5))
            seen = []
            try:
                for k in range(4):
                    fg.set_num_threads(threads if k % 2 == 1 else 1)
                    on = fg_threads.team_threads() > 0
                    step(x, y)
                    seen.append((on, step._kernels.TEAM, step._kernels.__package__))
            finally:
                fg.set_num_threads(threads)
        return model.params.copy(), seen

    plain, seen = run(False)
    assert all(not on and not team for on, team, _ in seen)
    toggled, seen = run(True)
    assert np.array_equal(plain, toggled)
    assert [on for on, _, _ in seen] == [False, True, False, True]
    for on, team, package in seen:
        assert team == on and package.endswith("_team") == on
    assert registry.full_cpu_kernels().step.TEAM     # the package itself has them
