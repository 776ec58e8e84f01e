"""Flushing float32 denormals in the CPU training kernels (fastgrad.set_flush_denormal).

On (the default) the float32 step, run_epoch, the layer path and the
optimizer's update read denormal inputs as zero and write denormal results
as zero, on every thread they run on, and leave the caller's floating-point
mode as it was; off, they keep IEEE gradual underflow.  float64 keeps them
either way.  Each case below makes a denormal the kernel can only return
(or avoid) through the mode: values of random magnitude, not constants a
kernel could special-case.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgrad as fg
from fastgrad.kernels import spec

pytestmark = pytest.mark.skipif(not fg.set_flush_denormal(True),
                                reason="flushing needs an x86-64 CPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = float(np.finfo(np.float32).tiny)


@pytest.fixture(autouse=True)
def flush_restored():
    yield
    fg.set_flush_denormal(True)


def _linear(n_in, n_out, dtype="float32"):
    model = fg.MLP([n_in, n_out], activation="identity", dtype=dtype, seed=0)
    model.layers[0].b[:] = 0.0
    return model


def _in_a_child(code):
    """Run ``code`` in a fresh interpreter (its own thread pools), which
    prints "ok", or "skip" and why where the BLAS pool cannot be shared."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("skip"):
        pytest.skip(done.stdout)
    assert "ok" in done.stdout


def _parallel_code_keeps_denormals(rng, n):
    """A user's own ``prange`` function, on Numba's threads, keeps float32
    denormal products (none of those threads left flushing)."""
    import numba

    @numba.njit(parallel=True)
    def products(a, b):
        out = np.empty_like(a)
        for i in numba.prange(a.shape[0]):
            out[i] = a[i] * b[i]
        return out
    a = (rng.uniform(0.5, 2.0, n) * 1e-20).astype(np.float32)
    out = products(a, a)
    assert (out != 0).all(), int((out == 0).sum())


def _keeps_ieee_arithmetic():
    """The calling thread's own float32 arithmetic still has gradual underflow."""
    a = np.float32(1e-20) * np.float32(3e-20)
    return a != 0 and abs(a) < TINY


def test_the_flag_is_on_by_default_and_switches():
    assert fg.get_flush_denormal()
    assert fg.set_flush_denormal(False) and not fg.get_flush_denormal()
    assert fg.set_flush_denormal(True) and fg.get_flush_denormal()


@pytest.mark.parametrize("n_in", [1, 7, 37])
def test_forward_flushes_denormal_results_and_inputs_only_while_on(rng, n_in):
    model = _linear(n_in, 5)
    # x * W sums to a denormal: x ~ 1e-20, W ~ 1e-20 / n_in
    x = (rng.uniform(0.5, 2.0, (3, n_in)) * 1e-20).astype(np.float32)
    model.layers[0].W[:] = rng.uniform(0.5, 2.0, (n_in, 5)) * 1e-20 / n_in
    fg.set_flush_denormal(False)
    kept = np.array(model.predict(x))
    ref = x.astype(np.float64) @ np.asarray(model.layers[0].W, np.float64)
    assert (np.abs(kept) < TINY).all() and (kept != 0).all()
    np.testing.assert_allclose(kept, ref, rtol=0, atol=2 ** -149 * (n_in + 1))
    fg.set_flush_denormal(True)
    assert (np.array(model.predict(x)) == 0).all()
    assert _keeps_ieee_arithmetic()
    # a denormal input reads as zero: x ~ 1e-40 times W ~ 1e30 would be ~1e-10
    x_sub = (rng.uniform(0.5, 2.0, (3, n_in)) * 1e-40).astype(np.float32)
    model.layers[0].W[:] = rng.uniform(0.5, 2.0, (n_in, 5)) * 1e30
    assert (np.array(model.predict(x_sub)) == 0).all()
    fg.set_flush_denormal(False)
    assert (np.abs(np.array(model.predict(x_sub))) > 1e-12).all()


@pytest.mark.parametrize("team", [True, False], ids=["team-driver", "serial-driver"])
def test_a_refused_step_leaves_the_callers_arithmetic_alone(monkeypatch, rng, team):
    # The drivers refuse an unknown activation or loss code before they set
    # FTZ/DAZ: raised from inside, the mode would stay on the caller's thread.
    if not team:       # a model's own copy of the kernels, without the team's branches
        monkeypatch.setenv("FASTGRAD_KERNEL_COPIES", "model")
        monkeypatch.setenv("FASTGRAD_PASS_TEAM", "0")
    fg.set_flush_denormal(True)
    model = fg.MLP([6, 8, 3], activation="relu", dtype="float32", seed=0)
    step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-3))
    x = rng.standard_normal((5, 6)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1])
    step(x, y)
    assert step._kernels.TEAM == team
    params = model.params.copy()
    identity = model.layers[1].code
    # past the table: the kernels refuse it (object.__setattr__: past the
    # layer's own guard, which refuses any write of a placed layer's code)
    object.__setattr__(model.layers[1], "code", spec.N_ACTIVATIONS)
    bad_step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-3))
    for call in (lambda: bad_step(x, y), lambda: model.forward(x), lambda: model.predict(x)):
        with pytest.raises(ValueError, match="unknown activation code"):
            call()
        assert _keeps_ieee_arithmetic()
    object.__setattr__(model.layers[1], "code", identity)
    step._loss_kind = len(spec.LOSS_CODES)         # past the table (a target, then)
    with pytest.raises(ValueError, match="loss code not served"):
        step(x, np.zeros((5, 3), np.float32))
    assert _keeps_ieee_arithmetic()
    np.testing.assert_array_equal(model.params, params)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_a_refused_update_kernel_leaves_every_threads_mode_alone(rng, parallel):
    # The update kernels refuse a rule code they do not serve before they
    # set FTZ/DAZ: raised from inside (the parallel kernel's chunks on
    # Numba's threads), the mode stayed on each thread that raised.
    from fastgrad.kernels.cpu import optim as K
    kernel = K.clipped_update_parallel if parallel else K.clipped_update
    n = 5 * K.CHUNK + int(rng.integers(1, 100))
    p = rng.standard_normal(n).astype(np.float32)
    before = p.copy()
    g = rng.standard_normal(n).astype(np.float32)
    s = [np.zeros(n, np.float32), np.zeros(n, np.float32), np.empty(0, np.float32)]
    with pytest.raises(ValueError, match="update rule code not served"):
        kernel(max(spec.RULES.values()) + 1, p, g, *s, np.zeros(spec.HP_SIZE),
               np.array([0, n]), np.zeros(1), 1.0, 0.0)
    assert _keeps_ieee_arithmetic()
    np.testing.assert_array_equal(p, before)
    _parallel_code_keeps_denormals(rng, n)      # on the threads the chunks ran on


def test_float64_keeps_denormals_with_the_flag_on(rng):
    model = _linear(4, 3, dtype="float64")
    x = rng.uniform(0.5, 2.0, (2, 4)) * 1e-160
    model.layers[0].W[:] = rng.uniform(0.5, 2.0, (4, 3)) * 1e-160
    out = np.array(model.predict(x))
    assert (out != 0).all() and (np.abs(out) < np.finfo(np.float64).tiny).all()
    np.testing.assert_allclose(out, x @ np.asarray(model.layers[0].W), rtol=1e-12)


@pytest.mark.parametrize("epoch", [False, True])
def test_train_step_flushes_a_denormal_gradient(rng, epoch):
    """MSE on a 1x1 linear model: dW = 2 (W x - y) x / 1 with x ~ 3e-20 is
    ~2e-39, a denormal; db ~ 6e-20 is normal."""
    results = {}
    x = np.full((1, 1), rng.uniform(2e-20, 4e-20), np.float32)
    y = np.zeros((1, 1), np.float32)
    for flush in (False, True):
        fg.set_flush_denormal(flush)
        model = _linear(1, 1)
        model.layers[0].W[:] = 1.0
        step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.0))
        if epoch:
            step.run_epoch(x, y, 1, shuffle=False)
        else:
            step(x, y)
        results[flush] = (float(model.layers[0].dW[0, 0]), float(model.layers[0].db[0]))
        assert _keeps_ieee_arithmetic()
    (dw_kept, db_kept), (dw_flushed, db_flushed) = results[False], results[True]
    assert 0 < dw_kept < TINY and dw_flushed == 0
    assert db_kept == db_flushed > TINY


@pytest.mark.parametrize("parallel", [False, True])
def test_opt_step_flushes_a_denormal_update(rng, parallel):
    """SGD, lr 1: p - g with p, g random in [2, 3) * TINY and p - g < TINY."""
    n = 300_017 if parallel else 1001
    for flush in (False, True):
        fg.set_flush_denormal(flush)
        model = fg.MLP([n, 1], activation="identity", dtype="float32", seed=0)
        opt = fg.SGD(model, lr=1.0)
        opt.parallel = parallel
        p = (rng.uniform(2.0, 3.0, model.params.shape[0]) * TINY).astype(np.float32)
        g = p - (rng.uniform(0.1, 0.9, p.shape[0]) * TINY).astype(np.float32)
        model.params[:] = p
        model.grads[:] = g
        opt.step()
        out = np.array(model.params)
        if flush:
            assert (out == 0).all()
        else:
            np.testing.assert_array_equal(out, p - g)
            assert (out > 0).all() and (out < TINY).all()
        assert _keeps_ieee_arithmetic()


def test_a_kernel_that_raises_does_not_leave_the_mode_set():
    """An error before the kernel runs (bad input) leaves the caller's mode."""
    model = _linear(3, 2)
    step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.1))
    with pytest.raises(Exception):
        step(np.ones((2, 4), np.float32), np.ones((2, 2), np.float32))
    assert _keeps_ieee_arithmetic()


def test_the_shared_pools_threads_flush_a_gemm_of_the_step():
    """With the BLAS pool shared, every thread running a GEMM of the step
    flushes (a 256-row GEMM is split over the threads); the caller's own
    NumPy BLAS call on the same pool keeps denormals."""
    code = """
    import numpy as np, numba, fastgrad as fg
    if not fg.share_blas_pool():
        print("skip", fg.blas_pool_status()[1]); raise SystemExit
    numba.set_num_threads(2)
    rng = np.random.default_rng()
    model = fg.MLP([256, 256], activation="identity", dtype="float32", seed=0)
    model.layers[0].b[:] = 0.0
    # each product ~1e-42 and their sum ~2e-40: denormal unless flushed
    x = (rng.uniform(0.5, 2.0, (256, 256)) * 1e-21).astype(np.float32)
    model.layers[0].W[:] = rng.uniform(0.5, 2.0, (256, 256)) * 1e-21
    flushed = np.array(model.predict(x))
    fg.set_flush_denormal(False)
    kept = np.array(model.predict(x))
    assert (flushed == 0).all(), int((flushed != 0).sum())
    assert (kept != 0).all() and (np.abs(kept) < 1.2e-38).all()

    @numba.njit
    def mm(a, b):
        return a @ b
    fg.set_flush_denormal(True)
    outside = mm(x, np.ascontiguousarray(model.layers[0].W))
    assert (outside != 0).all()
    print("ok")
    """
    _in_a_child(code)


def test_openblas_workers_flush_the_steps_gemms_and_only_those():
    """Without the shared pool a float32 step's GEMMs run partly on
    OpenBLAS's own workers: the step gives them its mode for its span (a
    weight gradient whose sums are denormal comes back zero in every
    element, not just the caller's share) and clears it on return (a NumPy
    GEMM afterwards keeps every denormal)."""
    code = """
    import numpy as np, fastgrad as fg
    from fastgrad import threads
    from threadpoolctl import threadpool_limits
    if not threads.pass_team()[2]:
        print("skip: no pass team on OpenBLAS's workers here"); raise SystemExit
    rng = np.random.default_rng()
    n = 256 + int(rng.integers(0, 40))
    model = fg.MLP([n, n], activation="identity", dtype="float32", seed=0)
    model.layers[0].W[:] = rng.uniform(0.5, 2.0, (n, n)) * 1e-21
    step = fg.TrainStep(model, fg.MSE(), fg.SGD(model, lr=0.1))
    x = (rng.uniform(0.5, 2.0, (n, n)) * 1e-21).astype(np.float32)
    y = (rng.uniform(0.5, 2.0, (n, n)) * 1e-17).astype(np.float32)
    # dW = x.T @ dz: products ~1e-43, sums ~1e-40, denormal unless flushed
    with threadpool_limits(2, user_api="blas"):
        for flush in (False, True, False, True):
            fg.set_flush_denormal(flush)
            step.gradients(x, y)
            dW = np.array(model.layers[0].dW)
            if flush:
                assert (dW == 0).all(), int((dW != 0).sum())
            else:
                assert (dW != 0).all() and (np.abs(dW) < 1.2e-38).all()
            after = x.T @ (y * np.float32(1e-5))
            assert (after != 0).all(), int((after == 0).sum())
    print("ok")
    """
    _in_a_child(code)


def test_pool_threads_started_by_a_flushing_step_do_not_flush_other_code():
    """A thread inherits its creator's mode: the step's teams start with the
    caller's bits cleared, so GNU OpenMP's threads (first created by a
    flushing step here) keep denormals in a user's own parallel code and
    in fastgrad's kernels with the flag off."""
    code = """
    import numpy as np, numba, fastgrad as fg
    if not fg.share_blas_pool():
        print("skip", fg.blas_pool_status()[1]); raise SystemExit
    numba.set_num_threads(2)
    rng = np.random.default_rng()
    # 64 x 512 outputs and 37K parameters: the activation and update teams run
    model = fg.MLP([64, 512, 8], activation="tanh", dtype="float32", seed=0)
    opt = fg.SGD(model, lr=1e-3)
    step = fg.TrainStep(model, fg.MSE(), opt)
    for _ in range(3):
        step(rng.standard_normal((64, 64)).astype(np.float32),
             rng.standard_normal((64, 8)).astype(np.float32))
    from tests.test_denormals import _parallel_code_keeps_denormals
    _parallel_code_keeps_denormals(rng, 1 << 16)

    fg.set_flush_denormal(False)
    big = fg.MLP([300_017, 1], activation="identity", dtype="float32", seed=0)
    sgd = fg.SGD(big, lr=1.0)
    sgd.parallel = True
    tiny = float(np.finfo(np.float32).tiny)
    p = (rng.uniform(2.0, 3.0, big.params.shape[0]) * tiny).astype(np.float32)
    g = p - (rng.uniform(0.1, 0.9, p.shape[0]) * tiny).astype(np.float32)
    big.params[:] = p
    big.grads[:] = g
    sgd.step()
    assert np.array_equal(np.array(big.params), p - g)
    print("ok")
    """
    _in_a_child(code)
