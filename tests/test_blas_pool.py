"""fastgrad.share_blas_pool: OpenBLAS's parallel jobs on Numba's OpenMP threads.

Every case that could hang (jobs that wait for one another run where they
cannot all run at once) runs in a child process with a time limit, so a
hang fails the test instead of stopping the suite.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastgrad as fg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, timeout=240, **env):
    """Run ``code`` in a fresh interpreter; returns its stdout lines."""
    environ = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **env)
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child did not finish in {timeout} s (a hang):\n{code}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split("\n")


def _shareable():
    shared = fg.share_blas_pool()
    if not shared:
        pytest.skip(f"the BLAS pool cannot be shared here: {fg.blas_pool_status()[1]}")
    fg.share_blas_pool(False)


PRELUDE = """
    import numpy as np, numba, fastgrad as fg
    assert fg.share_blas_pool(), fg.blas_pool_status()

    @numba.njit
    def mm(a, b):
        return a @ b
"""


def test_gemms_on_the_shared_pool_are_bitwise_openblas_own():
    _shareable()
    out = _run(PRELUDE + """
    rng = np.random.default_rng()
    for dtype in (np.float32, np.float64):
        for m, k, n in ((7, 5, 3), (129, 65, 257), (517, 301, 263), (1031, 700, 999)):
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            shared = mm(a, b)
            fg.share_blas_pool(False)
            own = mm(a, b)
            assert fg.share_blas_pool()
            assert np.array_equal(shared, own), (dtype, m, k, n)
            ref = a.astype(np.float64) @ b.astype(np.float64)
            assert np.allclose(shared, ref, rtol=1e-4 if dtype == np.float32 else 1e-12,
                               atol=1e-3 if dtype == np.float32 else 1e-10)
    print("ok")
    """)
    assert "ok" in out


def test_jobs_that_cannot_all_run_on_the_pool_go_to_openblas_workers():
    # Numba told to use one thread; a GEMM called inside an active parallel
    # region (a nested team would get one thread); three Python threads
    # calling GEMMs at once, holding the GIL or not.
    _shareable()
    out = _run(PRELUDE + """
    import threading
    rng = np.random.default_rng()
    a = rng.standard_normal((600, 600))
    want = mm(a, a)
    numba.set_num_threads(1)
    assert np.array_equal(mm(a, a), want)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)

    @numba.njit(parallel=True)
    def nested(a, out):
        for i in numba.prange(out.shape[0]):
            out[i] = a @ a

    out = np.empty((4,) + a.shape)
    nested(a, out)
    assert all(np.allclose(o, want, rtol=1e-12, atol=1e-9) for o in out)

    @numba.njit(nogil=True)
    def mm_nogil(a, b):
        return a @ b

    ok = []
    def work(f):
        for _ in range(15):
            ok.append(np.array_equal(f(a, a), want))
    threads = [threading.Thread(target=work, args=(f,)) for f in (mm, mm_nogil, mm, mm_nogil)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ok) == 60 and all(ok)
    print("ok")
    """)
    assert "ok" in out


@pytest.mark.parametrize("env", [{"OMP_DYNAMIC": "true"}, {"OMP_THREAD_LIMIT": "1"}])
def test_a_team_openmp_may_shrink_is_not_used(env):
    # libgomp free to give fewer threads than jobs: OpenBLAS's workers run them
    _shareable()
    out = _run(PRELUDE + """
    a = np.random.default_rng().standard_normal((700, 500))
    fg.share_blas_pool(False)
    want = mm(a, a.T)
    assert fg.share_blas_pool()
    assert np.array_equal(mm(a, a.T), want)
    print("ok")
    """, **env)
    assert "ok" in out


def test_a_forked_child_gets_openblas_threads_and_its_team():
    # the child cannot use GNU OpenMP: OpenBLAS's own threads run its GEMMs
    # and its parallel update (OpenBLAS starts them again after a fork),
    # with the parent's bits
    _shareable()
    out = _run(PRELUDE + """
    import os
    a = np.random.default_rng(0).standard_normal((600, 600))
    want = mm(a, a)
    model = fg.MLP([512, 512, 512, 10], dtype=np.float32, seed=0)
    opt = fg.Adam(model, lr=1e-3)
    assert opt.parallel
    twin = fg.MLP([512, 512, 512, 10], dtype=np.float32, seed=0)
    twin_opt = fg.Adam(twin, lr=1e-3)
    twin_opt.parallel = False
    twin_opt.grads[:] = 1.0
    twin_opt.step()
    pid = os.fork()
    if pid == 0:
        ok = (np.array_equal(mm(a, a), want) and not fg.blas_pool_status()[0]
              and not fg.share_blas_pool() and "fork" in fg.blas_pool_status()[1])
        team = fg.threads.team_threads() > 0
        ok = ok and opt.parallel == team
        opt.grads[:] = 1.0
        opt.step()
        ok = ok and np.array_equal(opt.params, twin_opt.params)
        if team:
            plan = opt._chosen_update().args[0]
            ok = ok and plan[fg.kernels.layout.PLAN_POOL_BLAS] != 0
        os._exit(0 if ok else 3)
    assert os.waitpid(pid, 0)[1] == 0
    print("ok")
    """)
    assert "ok" in out


def test_without_numba_openmp_the_pool_is_not_shared():
    out = _run("""
    import fastgrad as fg
    print(fg.share_blas_pool(), fg.blas_pool_status())
    """, NUMBA_THREADING_LAYER="workqueue")
    assert out[0].startswith("False") and "threading layer is 'workqueue'" in out[0]


def test_the_environment_variable_shares_it_with_the_first_optimizer():
    _shareable()
    code = """
    import numpy as np, fastgrad as fg
    print(fg.blas_pool_status()[0])
    fg.Adam(fg.MLP([4, 3], seed=0), lr=1e-3)
    print(fg.blas_pool_status()[0])
    """
    assert _run(code, FASTGRAD_SHARE_BLAS_POOL="1")[:2] == ["False", "True"]
    assert _run(code, FASTGRAD_SHARE_BLAS_POOL="0")[:2] == ["False", "False"]
    # read once: a pool given back stays unshared when the next optimizer is built
    code = """
    import numpy as np, fastgrad as fg
    fg.Adam(fg.MLP([4, 3], seed=0), lr=1e-3)
    print(fg.blas_pool_status()[0])
    fg.share_blas_pool(False)
    fg.Adam(fg.MLP([4, 3], seed=0), lr=1e-3)
    print(fg.blas_pool_status()[0])
    """
    assert _run(code, FASTGRAD_SHARE_BLAS_POOL="1")[:2] == ["True", "False"]


@pytest.mark.parametrize("sizes", [[37, 45, 11], [600, 500, 10]])
def test_the_parallel_default_follows_the_pool_and_the_size(sizes):
    _shareable()
    rng = np.random.default_rng()
    x = rng.standard_normal((33, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], 33)
    runs = {}
    for shared in (False, True):
        fg.share_blas_pool(shared)
        try:
            model = fg.MLP(sizes, dtype=np.float32, seed=3)
            opt = fg.Adam(model, lr=1e-3, clip_norm=0.5)
            step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
            big = opt.params.size >= fg.threads.PARALLEL_UPDATE_MIN_PARAMS
            assert opt.parallel == (big and fg.threads.team_threads() > 0)
            for _ in range(3):
                step.gradients(x, y)
                opt.step()
            for _ in range(3):
                step(x, y)              # TrainStep: its update on the step's team
                assert np.isfinite(step.stats.grad_norm) and not step.stats.skipped
            assert opt.step_count == 6
            before = opt.params.copy()
            bad = x.copy()
            bad[1, 2] = np.nan
            step(bad, y)                    # a non-finite gradient: skipped, nothing written
            assert step.stats.skipped and opt.step_count == 6
            assert np.array_equal(opt.params, before)
            runs[shared] = (before, step.stats.layer_norms.copy())
            opt.parallel = False
            assert not opt.parallel
            opt.parallel = None
            assert opt.parallel == (big and fg.threads.team_threads() > 0)
            with pytest.raises(TypeError):
                opt.parallel = 1
        finally:
            fg.share_blas_pool(False)
    # the parallel kernel and the shared pool's GEMMs are bitwise the serial path
    assert np.array_equal(runs[False][0], runs[True][0])
    assert np.array_equal(runs[False][1], runs[True][1], equal_nan=True)


def test_opt_parallel_says_how_pairs_in_place_are_updated():
    """Contiguous (param, grad) pairs are updated in place by the
    multi-tensor kernel: serial on OpenBLAS's own workers whatever their
    size, Numba's parfor kernel on the shared pool; ``opt.parallel`` says
    which, and a pinned value is what runs."""
    _shareable()
    rng = np.random.default_rng()
    n = fg.threads.PARALLEL_UPDATE_MIN_PARAMS + int(rng.integers(1, 999))
    params = [rng.standard_normal(n).astype(np.float32), np.zeros(3, np.float32)]
    grads = [rng.standard_normal(n).astype(np.float32), np.ones(3, np.float32)]
    try:
        for shared in (False, True):
            fg.share_blas_pool(shared)
            opt = fg.Adam(list(zip(params, grads)), lr=1e-3, clip_norm=1.0)
            assert opt._multi is not None
            team = fg.threads.team_threads() > 0
            assert opt.parallel == (shared and team)
            opt.parallel = True
            assert opt.parallel
            opt.parallel = False
            assert not opt.parallel
            opt.parallel = None
            assert opt.parallel == (shared and team)
            assert np.isfinite(opt.step().grad_norm)
    finally:
        fg.share_blas_pool(False)
