"""TrainStep(threads=n): the batch-sharded step on one thread pool."""
import json
import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

import fastgrad as fg
from fastgrad import reference as ref
from fastgrad.errors import NonFiniteGradientError
from fastgrad.kernels.cpu import step_sharded
from fastgrad.losses import LOSSES
from fastgrad.threads import _blas_of_kernels, _thread_count_functions, one_blas_thread

from conftest import ACTIVATIONS, loss_targets

N_THREADS = numba.config.NUMBA_NUM_THREADS
SHARDS = sorted({1, 2, N_THREADS})


_targets = loss_targets


def _step(sizes, act, loss, dtype, threads, opt="adam", seed=3):
    m = fg.MLP(sizes, activation=act, dtype=dtype, seed=seed)
    if opt == "adam":
        o = fg.Adam(m, lr=1e-2, clip_norm=0.5)
    else:
        o = fg.SGD(m, lr=0.1, momentum=0.9, nesterov=True, clip_value=0.05)
    return m, o, fg.TrainStep(m, LOSSES[loss](), o, threads=threads)


def _reference_grads(m, loss, x, y):
    """float64 gradients of the whole batch's mean loss (fastgrad.reference)."""
    layers = [(layer.W.astype(np.float64), layer.b.astype(np.float64), layer.activation,
               layer.alpha) for layer in m.layers]
    cache = ref.mlp_forward(x, layers)
    loss_value, dy = getattr(ref, loss)(cache[-1][2], y)
    grads, _ = ref.mlp_backward(cache, layers, dy)
    return loss_value, grads


def test_shard_bounds_cover_the_batch():
    for B in (1, 2, 3, 7, 64, 129):
        for n in (1, 2, 3, 8):
            b = step_sharded.shard_bounds(B, n)
            assert b[0] == 0 and b[-1] == B and np.all(np.diff(b) >= 1)
            assert len(b) - 1 == min(n, B)
            assert np.diff(b).max() - np.diff(b).min() <= 1


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("loss", list(LOSSES))
def test_sharded_gradients_match_the_reference(rng, act, loss):
    sizes = [5, 9, 6, 3]
    for threads in SHARDS:
        m, _, step = _step(sizes, act, loss, "float64", threads)
        B = int(rng.integers(threads, 13))          # odd sizes, shards of unequal rows
        x = rng.standard_normal((B, sizes[0])) * 2
        y = _targets(loss, rng, B, sizes[-1])
        got = step.gradients(x, y)
        want_loss, want = _reference_grads(m, loss, x, y)
        np.testing.assert_allclose(got, want_loss, rtol=1e-12)
        flat = np.concatenate([np.concatenate([dW.ravel(), db]) for dW, db in want])
        np.testing.assert_allclose(m.grads, flat, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt", ["adam", "sgd"])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-12), ("float32", 2e-5)])
def test_sharded_trajectory_equals_serial(rng, opt, dtype, rtol):
    sizes = [6, 17, 11, 4]
    runs = {t: _step(sizes, "tanh", "softmax_cross_entropy", dtype, t, opt) for t in
            [None] + SHARDS}
    for k in range(15):
        B = (8, 13, 1, 16)[k % 4]       # the batch size changes; a batch of 1 has one shard
        x = (rng.standard_normal((B, sizes[0])) * 3).astype(dtype)
        y = rng.integers(0, sizes[-1], B)
        losses = {t: step(x, y) for t, (_, _, step) in runs.items()}
        for t in SHARDS:
            np.testing.assert_allclose(losses[t], losses[None], rtol=rtol)
            a, b = runs[t][2].stats, runs[None][2].stats
            assert (a.step, a.skipped, a.clipped) == (b.step, b.skipped, b.clipped)
            np.testing.assert_allclose(a.grad_norm, b.grad_norm, rtol=rtol)
    base = runs[None][0].params
    for t in SHARDS:
        np.testing.assert_allclose(runs[t][0].params, base, rtol=rtol,
                                   atol=rtol * np.abs(base).max())
    # one shard is the serial step, bit for bit
    np.testing.assert_array_equal(runs[1][0].params, base)


def test_sharded_step_is_deterministic(rng):
    x = rng.standard_normal((33, 8)).astype(np.float32)
    y = rng.integers(0, 5, 33)
    params = []
    for _ in range(2):
        m, _, step = _step([8, 21, 5], "gelu", "softmax_cross_entropy", "float32", N_THREADS)
        for _ in range(6):
            step(x, y)
        params.append(m.params.copy())
    np.testing.assert_array_equal(params[0], params[1])


def test_sharded_step_skips_a_nonfinite_batch(rng):
    m, opt, step = _step([4, 7, 3], "relu", "mse", "float64", 2)
    x, y = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    step(x, y)
    before = m.params.copy(), opt.step_count
    y[4, 1] = np.nan                     # in the second shard only
    step(x, y)
    assert step.stats.skipped
    np.testing.assert_array_equal(m.params, before[0])
    assert opt.step_count == before[1]


def test_blas_threads_restored():
    before = [lib.get_num_threads() for lib in _blas_of_kernels()]
    with one_blas_thread():
        assert all(lib.get_num_threads() == 1 for lib in _blas_of_kernels())
    assert [lib.get_num_threads() for lib in _blas_of_kernels()] == before
    m, _, step = _step([4, 6, 3], "relu", "mse", "float64", 2)
    with pytest.raises(ValueError):     # bad target shape: raised before the kernel
        step(np.zeros((5, 4)), np.zeros((5, 2)))
    assert [lib.get_num_threads() for lib in _blas_of_kernels()] == before


@pytest.mark.parametrize("count", [1, 2, 3])
def test_one_blas_thread_sets_and_restores_the_count_threadpoolctl_reads(count):
    # the counts go through OpenBLAS's own functions (ctypes), not
    # threadpoolctl's controller: the controller must read the same
    libs = _blas_of_kernels()
    assert len(_thread_count_functions()) == len(libs) >= 1
    with threadpool_limits(count, user_api="blas"):
        assert [lib.get_num_threads() for lib in libs] == [count] * len(libs)
        with one_blas_thread():
            assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
            with pytest.raises(KeyError):
                with one_blas_thread():
                    raise KeyError("restored on the way out of an error too")
            assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
        assert [lib.get_num_threads() for lib in libs] == [count] * len(libs)


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2", N_THREADS + 1])
def test_bad_threads_raise(threads):
    m = fg.MLP([3, 4, 2])
    with pytest.raises(ValueError, match="threads"):
        fg.TrainStep(m, fg.MSE(), fg.Adam(m), threads=threads)


def test_threads_refuses_what_it_cannot_shard():
    m = fg.Sequential([fg.Dense(3, 4, norm="batch"), fg.Dense(4, 2, activation=None)])
    with pytest.raises(ValueError, match="plain model"):
        fg.TrainStep(m, fg.MSE(), fg.Adam(m), threads=2)
    m = fg.MLP([3, 4, 2])
    with pytest.raises(ValueError, match="loss options"):
        fg.TrainStep(m, fg.SoftmaxCrossEntropy(label_smoothing=0.1), fg.Adam(m), threads=2)


def test_sharded_step_with_parameter_groups(rng):
    runs = []
    for threads in (None, 2):
        m = fg.MLP([7, 12, 5], dtype="float64", seed=4)
        opt = fg.AdamW(m, lr=1e-2, clip_norm=0.5, param_groups=[
            {"params": m.weights(), "weight_decay": 0.1},
            {"params": m.biases_and_norms(), "weight_decay": 0.0, "lr": 3e-2}])
        runs.append((m, fg.TrainStep(m, fg.SoftmaxCrossEntropy(), opt, threads=threads)))
    for _ in range(8):
        x, y = rng.standard_normal((10, 7)), rng.integers(0, 5, 10)
        for _, step in runs:
            step(x, y)
    np.testing.assert_allclose(runs[1][0].params, runs[0][0].params, rtol=1e-12, atol=1e-13)


def test_run_epoch_of_a_sharded_step_is_its_step_loop(rng):
    X, Y = rng.standard_normal((50, 6)), rng.integers(0, 4, 50)
    runs = []
    for loop in (False, True):
        m = fg.MLP([6, 9, 4], dtype="float64", seed=2)
        step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m, clip_norm=0.5), threads=2)
        if loop:
            order = np.random.default_rng(5).permutation(50)
            for i in range(0, 50, 16):
                step(X[order[i:i + 16]], Y[order[i:i + 16]])
        else:
            step.run_epoch(X, Y, 16, seed=5)
        runs.append(m.params.copy())
    np.testing.assert_array_equal(runs[0], runs[1])


def _sharded_pair(sizes, loss, dtype, make_opt, threads=N_THREADS):
    """Two identical TrainSteps (sharded unless ``threads`` is None): one for
    run_epoch, one for its loop."""
    out = []
    for _ in range(2):
        m = fg.MLP(sizes, activation="tanh", dtype=dtype, seed=7)
        out.append(fg.TrainStep(m, LOSSES[loss](), make_opt(m), threads=threads))
    assert out[0]._fused_epoch        # the compiled chunks, not a loop over step
    return out


def _epoch_against_loop(a, b, X, Y, batch_size, order):
    """run_epoch on ``a``, the per-step loop on ``b``: bitwise the same
    parameters, optimizer state and per-step results."""
    res = a.run_epoch(X, Y, batch_size, shuffle=order)
    ref = []
    for lo in range(0, len(order), batch_size):
        idx = order[lo:lo + batch_size]
        ref.append((b(X[idx], Y[idx]), b.stats))
    np.testing.assert_array_equal(a.model.params, b.model.params)
    for name, buf in b.opt.state.items():
        np.testing.assert_array_equal(a.opt.state[name], buf, err_msg=name)
    assert (a.opt.step_count, a.opt.n_skipped) == (b.opt.step_count, b.opt.n_skipped)
    assert a.model.dropout_step == b.model.dropout_step
    assert a.stats == b.stats
    np.testing.assert_array_equal(res["loss"], [loss for loss, _ in ref])
    np.testing.assert_array_equal(res["grad_norm"], [st.grad_norm for _, st in ref])
    np.testing.assert_array_equal(res["step"], [st.step for _, st in ref])
    np.testing.assert_array_equal(res["lr"], [st.lr for _, st in ref])
    np.testing.assert_array_equal(res["skipped"], [st.skipped for _, st in ref])
    return res


@pytest.mark.parametrize("loss", ["softmax_cross_entropy", "mse", "bce_with_logits"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_sharded_epoch_is_its_step_loop(rng, loss, dtype):
    """The sharded step's compiled epoch: the last batch (here 1 row more
    than whole batches: one shard) takes its own shard bounds."""
    sizes = [int(rng.integers(3, 12)), 17, 9, 5]
    batch = int(rng.integers(5, 17))
    n = batch * int(rng.integers(3, 6)) + 1
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    Y = _targets(loss, rng, n, sizes[-1])
    make = lambda m: fg.Adam(m, lr=fg.schedules.exponential_decay(1e-2, 0.9, 1), clip_norm=0.3)
    a, b = _sharded_pair(sizes, loss, dtype, make)
    _epoch_against_loop(a, b, X, Y, batch, rng.permutation(n))
    # a second epoch, its last batch cut differently
    _epoch_against_loop(a, b, X, Y, batch + 1, rng.permutation(n))


def test_compiled_sharded_epoch_of_a_large_net(rng):
    """From step_sharded.MIN_PARALLEL parameters the combine and the update
    run on the threads: the loop's values, and the serial step's up to
    rounding."""
    sizes = [180, 190, 7]
    assert sum(a * b + b for a, b in zip(sizes, sizes[1:])) >= step_sharded.MIN_PARALLEL
    X = rng.standard_normal((61, 180))
    Y = rng.integers(0, 7, 61)
    make = lambda m: fg.SGD(m, lr=0.05, momentum=0.9, clip_norm=0.5)
    a, b = _sharded_pair(sizes, "softmax_cross_entropy", "float64", make)
    order = rng.permutation(61)
    _epoch_against_loop(a, b, X, Y, 16, order)
    serial = _sharded_pair(sizes, "softmax_cross_entropy", "float64", make, threads=None)[0]
    serial.run_epoch(X, Y, 16, shuffle=order)
    np.testing.assert_allclose(a.model.params, serial.model.params, rtol=1e-12, atol=1e-14)


def test_compiled_sharded_epoch_skips_a_nonfinite_batch(rng):
    X, Y = rng.standard_normal((64, 6)), rng.integers(0, 4, 64)
    X[37, 1] = np.nan                      # batch 2 of 16 in order
    make = lambda m: fg.Adam(m, lr=fg.schedules.exponential_decay(1e-2, 0.5, 1), clip_norm=1.0)
    a, b = _sharded_pair([6, 9, 4], "softmax_cross_entropy", "float64", make)
    res = _epoch_against_loop(a, b, X, Y, 16, np.arange(64))
    assert list(res["skipped"]) == [False, False, True, False]
    assert list(res["step"]) == [1, 2, 2, 3]
    assert np.isfinite(a.model.params).all()


def test_compiled_sharded_epoch_raises_at_a_nonfinite_batch(rng):
    X, Y = rng.standard_normal((64, 6)), rng.integers(0, 4, 64)
    X[40, 0] = np.inf
    make = lambda m: fg.SGD(m, lr=0.1, skip_nonfinite=False)
    a, b = _sharded_pair([6, 9, 4], "softmax_cross_entropy", "float64", make)
    with pytest.raises(NonFiniteGradientError):
        a.run_epoch(X, Y, 16, shuffle=False)
    with pytest.raises(NonFiniteGradientError):
        for lo in range(0, 64, 16):
            b(X[lo:lo + 16], Y[lo:lo + 16])
    np.testing.assert_array_equal(a.model.params, b.model.params)
    assert a.opt.step_count == b.opt.step_count == 2 and a.stats == b.stats


def test_fit_of_a_sharded_step_is_its_per_step_loop(rng):
    """fit runs the sharded step's compiled epochs: the same parameters and
    history as its per-step loop (fused_epochs=False)."""
    X, Y = rng.standard_normal((70, 6)), rng.integers(0, 3, 70)
    runs = []
    for fused in (True, False):
        m = fg.MLP([6, 16, 3], dtype="float64", seed=0)
        step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m, lr=1e-2, clip_norm=1.0),
                            threads=N_THREADS)
        step.fused_epochs = fused
        seen = []
        hist = fg.fit(step, X, Y, epochs=3, batch_size=16, seed=4, progress=False,
                      callbacks=[lambda k, loss, st: seen.append((k, loss, st.grad_norm))])
        runs.append((m.params.copy(), hist, seen))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1]["loss"] == runs[1][1]["loss"] and runs[0][2] == runs[1][2]


def test_the_shards_plan_header_is_kept_until_the_pool_changes(rng, monkeypatch):
    from fastgrad import threads as fg_threads
    from fastgrad.kernels import layout
    m, _, step = _step([5, 8, 3], "relu", "mse", "float64", N_THREADS)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 3))
    step(x, y)
    header, _ = step._shard_plan_header()
    assert step._shard_plan_header()[0] is header
    assert header[layout.PLAN_POOL_LOSS] != 0            # the members filled in
    assert header[layout.PLAN_POOL_SHARD] == step._ksharded.shard_member(np.float64) != 0
    monkeypatch.setitem(fg_threads._pool, "generation", fg_threads.pool_generation() + 1)
    fresh, _ = step._shard_plan_header()
    assert fresh is not header
    np.testing.assert_array_equal(fresh, header)
    before = m.params.copy()
    step(x, y)
    assert not np.array_equal(m.params, before)


def test_a_header_without_a_working_shard_member_is_refused(rng):
    """The kernels call the shards' member through the header's address:
    none there is refused before anything runs, and a member that returns
    without completing its shard (it cannot raise: a C callback) is
    reported before the update."""
    from numba import cfunc, types
    from fastgrad.kernels import layout
    m, _, step = _step([5, 8, 3], "relu", "mse", "float64", 2)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 3))
    step(x, y)
    kept = step._shard_plan_header()[0]
    header = kept.copy()
    bounds, acts, zs, delta, shard_grads, losses = step._shard_buffers_for(9)
    kernel = step._sharded_kernels().train_step
    rule, s0, s1, s2, hp = step.opt._kernel_args()

    def run(x=x):
        with one_blas_thread():
            return kernel(x, step._no_labels, y, step._loss_kind, m.params, m.grads,
                          shard_grads, step._sizes, step._codes, step._alphas,
                          step.opt._offsets, acts, zs, delta, bounds, losses, header, rule,
                          s0, s1, s2, hp, step._layer_sq, step.opt._clip_norm,
                          step.opt._clip_value)
    before, moments = m.params.copy(), step.opt.state["exp_avg"].copy()
    header[layout.PLAN_POOL_SHARD] = 0
    with pytest.raises(ValueError, match="no shard member"):
        run()

    @cfunc(types.void(types.voidptr))
    def gives_up(record):
        return

    header[layout.PLAN_POOL_SHARD] = gives_up.address
    with pytest.raises(RuntimeError, match="did not complete"):
        run()
    np.testing.assert_array_equal(m.params, before)
    np.testing.assert_array_equal(step.opt.state["exp_avg"], moments)
    header[layout.PLAN_POOL_SHARD] = kept[layout.PLAN_POOL_SHARD]
    with pytest.raises(ValueError, match="C-contiguous buffers of the parameters' dtype"):
        run(x=x.astype(np.float32))         # the member would read 8 bytes a value
    with pytest.raises(ValueError, match="C-contiguous buffers"):
        run(x=np.asfortranarray(x))
    np.testing.assert_array_equal(m.params, before)
    run()
    assert not np.array_equal(m.params, before)


def _run_kernel(step, x, y, header):
    """The sharded train step's kernel on ``header`` (BLAS on one thread, as
    TrainStep calls it)."""
    m = step.model
    bounds, acts, zs, delta, shard_grads, losses = step._shard_buffers_for(x.shape[0])
    rule, s0, s1, s2, hp = step.opt._kernel_args()
    with one_blas_thread():
        step._sharded_kernels().train_step(
            x, step._no_labels, y, step._loss_kind, m.params, m.grads, shard_grads, step._sizes,
            step._codes, step._alphas, step.opt._offsets, acts, zs, delta, bounds, losses,
            header, rule, s0, s1, s2, hp, step._layer_sq, step.opt._clip_norm,
            step.opt._clip_value)
    return losses


def test_the_shards_header_holds_the_pass_team():
    from fastgrad import threads as fg_threads
    from fastgrad.kernels import layout
    _, _, step = _step([5, 8, 3], "relu", "mse", "float64", 2)
    step(np.ones((4, 5)), np.ones((4, 3)))
    header, _ = step._shard_plan_header()
    threads, start, blas = fg_threads.shard_team()
    assert (threads, start, blas) == (
        header[layout.PLAN_POOL_THREADS], header[layout.PLAN_POOL_START],
        header[layout.PLAN_POOL_BLAS])
    assert fg_threads.pass_team()[1:] == (start, blas)
    if threads:
        assert 2 <= threads <= N_THREADS


@pytest.mark.skipif(N_THREADS < 2, reason="one thread")
@pytest.mark.parametrize("team", ["as filled", "numba's threads"])
def test_every_way_to_start_the_shards_gives_the_same_step(rng, team):
    """The shards on the pass team or on Numba's threads (no team in the
    header): bitwise the same step."""
    from fastgrad.kernels import layout
    x, y = rng.standard_normal((37, 6)), rng.standard_normal((37, 4))
    results = []
    for way in ("as filled", team):
        m, _, step = _step([6, 11, 9, 4], "tanh", "mse", "float64", 2)
        step(x, y)                                  # compiles, fills the header
        header = step._shard_plan_header()[0].copy()
        if way == "numba's threads":
            header[layout.PLAN_POOL_START] = 0
        losses = [_run_kernel(step, x, y, header).copy() for _ in range(3)]
        results.append((m.params.copy(), losses))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_the_shards_run_side_by_side_with_blas_on_one_thread(rng):
    """A stand-in shard member that holds each shard for 0.1 s: the team
    (started whatever OpenBLAS is told to use: one thread around the
    kernel) runs the two shards on two threads, not one after the other."""
    import ctypes
    from numba import carray, cfunc, types
    from fastgrad import threads as fg_threads
    from fastgrad.kernels import layout
    from fastgrad.kernels.cpu.blas_pool import _as_pointer, _field
    from fastgrad.kernels.cpu.pass_team import _claim
    if fg_threads.shard_team()[0] < 2:
        pytest.skip("no pass team to run the shards")
    libc = ctypes.CDLL(None)
    gettid, usleep = libc.gettid, libc.usleep
    gettid.restype, gettid.argtypes = ctypes.c_int, ()
    usleep.restype, usleep.argtypes = ctypes.c_int, (ctypes.c_uint,)
    fields = step_sharded.RECORD

    @cfunc(types.void(types.voidptr))
    def holds_each_shard(team):
        shard = _claim(team)
        while shard < _field(team, 1):
            record = _as_pointer(_field(team, 2) + shard * fields * 8)
            carray(record, (fields,), np.float64)[step_sharded._LOSS] = gettid()
            carray(record, (fields,), np.int64)[step_sharded._DONE] = 1
            usleep(100000)
            shard = _claim(team)

    m, _, step = _step([5, 8, 3], "relu", "mse", "float64", 2)
    x, y = rng.standard_normal((9, 5)), rng.standard_normal((9, 3))
    step(x, y)
    header = step._shard_plan_header()[0].copy()
    header[layout.PLAN_POOL_SHARD] = holds_each_shard.address
    threads = _run_kernel(step, x, y, header)
    assert threads[0] != threads[1]
    if header[layout.PLAN_POOL_BLAS] != 0:
        # on OpenBLAS's own workers (and the caller), none of Numba's threads

        @numba.njit(parallel=True)
        def numba_threads(n):
            tids = np.zeros(n, np.int64)
            for i in numba.prange(n):
                tids[i] = gettid()
            return tids
        caller = threading.get_native_id()
        assert caller in threads
        assert not set(threads) & (set(numba_threads(64 * N_THREADS)) - {caller})


def test_threads_is_read_only():
    m = fg.MLP([3, 4, 2])
    step = fg.TrainStep(m, fg.MSE(), fg.Adam(m), threads=2)
    assert step.threads == 2
    with pytest.raises(AttributeError):
        step.threads = 1
    assert fg.TrainStep(m, fg.MSE(), fg.Adam(m)).threads is None


def test_shards_and_the_serial_step_share_one_compiled_driver(rng, per_model_copies):
    """The shards call the one driver (``step.forward_backward``) with its
    epilogue-piece arguments off, typed as ``gradients()`` passes them (no literal
    types): one compiled driver per dtype, not two."""
    from numba.core import types
    m, o, step = _step([5, 9, 3], "tanh", "mse", np.float64, threads=2, opt="sgd", seed=4)
    serial = fg.TrainStep(m, fg.MSE(), o)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((7, 3))
    step(x, y)
    serial.gradients(x, y)
    assert step._kernels is serial._kernels and step._kernels.SERVED_FEATURES == ()
    sigs = step._kernels.forward_backward.signatures
    assert sigs and not [t for sig in sigs for t in sig if isinstance(t, types.Literal)]


# A fresh process on an empty disk cache: the first sharded step of a large
# net (from MIN_PARALLEL parameters) and then of a small one, each with its
# own copy of the kernels (other activations), reporting which kernels each
# compiled.
_FORMS_CHILD = """
import json, sys
import numpy as np
import fastgrad as fg
from fastgrad.kernels.cpu import reduce

def first_step(sizes, act):
    rng = np.random.default_rng(0)
    model = fg.MLP(sizes, activation=act, seed=1)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, clip_norm=0.5),
                        threads=2)
    step(rng.standard_normal((24, sizes[0])).astype(np.float32),
         rng.integers(0, sizes[-1], 24))
    return model.params.size, sys.modules[step._ksharded.__package__]

def compiled(*kernels):
    return [len(k.signatures) for k in kernels]

def parallel_regions(kernel):
    # the parfors Numba made of the kernel (compiled here: the cache is empty)
    (sig,) = kernel.signatures
    return kernel.get_metadata(sig)["parfor_diagnostics"].count_parfors()

n_large, large = first_step([200, 160, 5], "relu")
report = {"large": [n_large] + compiled(
    large.step_sharded.sharded_train_step_large, large.step_sharded.sharded_train_step_small,
    large.optim.clipped_update_parallel, reduce.layer_sumsq)}
n_small, small = first_step([11, 17, 5], "tanh")
report["small"] = [n_small] + compiled(
    small.step_sharded.sharded_train_step_small, small.step_sharded.sharded_train_step_large,
    small.optim.clipped_update_parallel, reduce.layer_sumsq)
report["regions"] = [parallel_regions(large.step_sharded.sharded_train_step_large),
                     parallel_regions(large.step_sharded._combine_on_threads),
                     parallel_regions(small.step_sharded.sharded_train_step_small)]
print(json.dumps(report))
"""


@pytest.mark.slow
def test_a_sharded_step_compiles_only_its_own_combine_and_update(tmp_path):
    """The large form compiles the parallel update and not the serial one's
    norm (``reduce.layer_sumsq``); the small form neither: it runs its
    update through the pass team's members, which its shards use anyway
    (each form prunes the other's branches).  The shards and the combine
    are one parallel region each (no array set-up made one)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               FASTGRAD_KERNEL_COPIES="model")
    res = subprocess.run([sys.executable, "-c", _FORMS_CHILD], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    n_large, *large = report["large"]
    n_small, *small = report["small"]
    assert n_large >= step_sharded.MIN_PARALLEL > n_small
    # the step's kernel, the other form's, the parallel update, the serial norm
    assert large == [1, 0, 1, 0], report
    assert small == [1, 0, 0, 0], report
    assert report["regions"] == [1, 1, 1], report
