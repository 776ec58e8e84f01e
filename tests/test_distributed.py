"""fastgrad.distributed: data-parallel training over MPI.

The multi-process tests start ``mpiexec -n 2`` on ``tests/mpi_worker.py``
themselves and compare with a one-process reference computed here.  They
skip, saying why, where mpi4py or an ``mpiexec`` is missing
(``pip install 'fastgrad[distributed]'`` provides both).
"""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastgrad as fg

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"
sys.path.insert(0, str(HERE))
import mpi_worker as W  # noqa: E402

# Generous: on a fresh checkout each rank compiles the kernels cold (~10 s on
# an idle 2-core machine, several times that when both ranks compile at once).
TIMEOUT_S = 300


def _mpiexec():
    """The mpiexec next to this interpreter (the pip-installed MPI that mpi4py
    loads) first, else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    return shutil.which("mpiexec")


HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
MPIEXEC = _mpiexec()
needs_mpi4py = pytest.mark.skipif(
    not HAVE_MPI4PY, reason="mpi4py not installed (pip install 'fastgrad[distributed]')")
needs_mpiexec = pytest.mark.skipif(
    not (HAVE_MPI4PY and MPIEXEC),
    reason="mpi4py or mpiexec not found (pip install 'fastgrad[distributed]')")


def _env():
    env = dict(os.environ)
    # The test machines run as root; Open MPI refuses that unless told.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONUNBUFFERED="1")
    # Oversubscribed ranks must not spin while the other compiles.
    env.setdefault("OMPI_MCA_mpi_yield_when_idle", "1")
    for var in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_SIZE", "PMIX_RANK"):
        env.pop(var, None)        # a test run itself under mpiexec must not leak its rank
    return env


def _launcher(n):
    cmd = [MPIEXEC, "-n", str(n)]
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True,
                             env=_env(), timeout=30).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        cmd.append("--oversubscribe")    # CI machines may report fewer slots than ranks
    return cmd


def run_worker(mode, tmp_path, n=2, check=True):
    out = tmp_path / f"{mode}.npz"
    cmd = _launcher(n) + [sys.executable, str(WORKER), mode, str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(),
                              timeout=TIMEOUT_S, cwd=HERE.parent)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mpiexec {mode} hung for {TIMEOUT_S} s; output:\n{exc.stdout}\n{exc.stderr}")
    if check:
        assert proc.returncode == 0, f"mpiexec {mode} failed:\n{proc.stdout}\n{proc.stderr}"
        return dict(np.load(out))
    return proc


def reference_steps():
    """One process at batch 64 on the same global batches (NaN included)."""
    step = W.make_step(seed=0)
    losses, skipped, clipped = [], [], []
    for x, y in W.global_batches(2):
        losses.append(step(x, y))
        skipped.append(step.stats.skipped)
        clipped.append(step.stats.clipped)
    return step, np.array(losses), np.array(skipped), np.array(clipped)


def assert_params_close(got, ref, rtol=1e-12):
    atol = rtol * float(np.max(np.abs(ref)))
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def steps_run(tmp_path_factory):
    return run_worker("steps", tmp_path_factory.mktemp("steps"))


@needs_mpiexec
def test_two_ranks_match_one_process_with_clipping_and_one_rank_nan(steps_run):
    res = steps_run
    step, losses, skipped, clipped = reference_steps()
    # The NaN fed by rank 1 alone made every rank skip, as the reference did.
    assert skipped.tolist() == [k == W.NAN_STEP for k in range(W.N_STEPS)]
    assert res["skipped"].tolist() == skipped.tolist()
    # Clipping was active on every other step, on both sides.
    assert clipped.sum() == W.N_STEPS - 1
    assert res["clipped"].tolist() == clipped.tolist()
    assert_params_close(res["params"], step.model.params)
    # Global-batch mean loss (NaN at the skipped step on every rank).
    np.testing.assert_allclose(res["losses"], losses, rtol=1e-12, equal_nan=True)


@needs_mpiexec
def test_params_bitwise_identical_across_ranks(steps_run):
    res = steps_run
    all_params = res["all_params"]
    assert all_params.shape[0] == 2
    # Bitwise: compare the bytes, not the values within a tolerance.
    assert all_params[0].tobytes() == all_params[1].tobytes()


@needs_mpiexec
def test_optimizer_mode_hand_written_loop(tmp_path):
    res = run_worker("optloop", tmp_path)
    step, _, skipped, _ = reference_steps()
    assert res["skipped"].tolist() == skipped.tolist()
    assert_params_close(res["params"], step.model.params)
    assert res["all_params"][0].tobytes() == res["all_params"][1].tobytes()


@needs_mpiexec
def test_fit_uneven_last_batch_matches_one_process_fit(tmp_path):
    res = run_worker("fit", tmp_path)
    step = W.make_step(seed=0)
    X, Y = W.fit_data()
    hist = fg.fit(step, X, Y, epochs=2, batch_size=2 * W.FIT_LOCAL_BATCH, seed=5,
                  progress=False)
    assert_params_close(res["params"], step.model.params)
    np.testing.assert_allclose(res["loss"], hist["loss"], rtol=1e-12)
    assert res["clipped"].tolist() == hist["clipped"]
    assert res["all_params"][0].tobytes() == res["all_params"][1].tobytes()


@needs_mpiexec
def test_what_ranks_must_agree_on(tmp_path):
    """Refused alike on every rank (they trained on and diverged or mixed
    two models' gradients): a group's lr, a layer's activation, a loss
    option, global_loss (a hang: collectives out of step), a loss with
    options, which the per-rank means do not compose, and in fit a
    validation_split (ranks training on different sample counts), validation
    data or local losses that differ (callbacks stopping some ranks only: a
    hang), and a batch-norm rank's share of 1 sample of the last batch.  fit(seed=None)
    draws one permutation for all; batch-norm statistics follow rank 0's,
    so every rank ends identical (they differed, and so did validation).
    A NaN with skip_nonfinite=False raises on every rank and leaves the
    statistics and the dropout counter as they were."""
    res = run_worker("agree", tmp_path)
    assert res["flags"].all(), res["flags"]
    states = res["states"]
    assert states[0].tobytes() == states[1].tobytes()


@needs_mpiexec
def test_a_failing_rank_fails_the_job_with_its_error(tmp_path):
    proc = run_worker("raise", tmp_path, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert W.ERROR_TEXT in out, out


@needs_mpi4py
def test_init_without_mpiexec_is_a_single_process(tmp_path):
    out = tmp_path / "single.npz"
    proc = subprocess.run([sys.executable, str(WORKER), "single", str(out)], capture_output=True,
                          text=True, env=_env(), timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = np.load(out)
    assert res["a"].tobytes() == res["b"].tobytes()
    np.testing.assert_array_equal(res["la"], res["lb"])


def test_validation_fingerprint_reads_values():
    # what ranks compare of their validation data: tensors that require
    # grad read as their values (it raised torch's numpy() error)
    from fastgrad import distributed as dist
    torch = pytest.importorskip("torch")
    x = np.arange(12.0).reshape(4, 3)
    y = np.array([0, 1, 1, 0])
    plain = dist._fingerprint((x, y))
    assert dist._fingerprint((torch.tensor(x, requires_grad=True), torch.tensor(y))) == plain
    assert dist._fingerprint((x.tolist(), y)) == plain
    assert dist._fingerprint((x + 1, y)) != plain and dist._fingerprint(None) == "none"


def test_data_parallel_refuses_other_objects():
    from fastgrad import distributed as dist
    with pytest.raises(TypeError, match="TrainStep or a fastgrad optimizer"):
        dist.DataParallel(object())


def test_missing_mpi4py_names_the_extra():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from fastgrad import distributed\n"
            "try:\n"
            "    distributed.init()\n"
            "except ImportError as exc:\n"
            "    print('ImportError:', exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(), timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert "ImportError:" in proc.stdout
    assert "pip install 'fastgrad[distributed]'" in proc.stdout
