"""Script the distributed tests run under mpiexec (and import for references).

    mpiexec -n 2 python tests/mpi_worker.py MODE OUT.npz

Modes
-----
steps     20 TrainStep-mode steps at local batch 32 (float64, Adam, clipping
          active), rank 1 feeding a NaN input at step NAN_STEP; rank 0 saves
          the parameters, per-step losses and stats, and every rank's
          parameters gathered to rank 0.
optloop   the same run written by hand: model.forward / loss / backward, then
          ``DataParallel(opt).step()``.
fit       ``fastgrad.distributed.fit`` on a dataset whose size is not a
          multiple of the global batch (the last batch is split unevenly),
          its second epoch in a second call (``initial_epoch=1``).
single    run WITHOUT mpiexec: init() gives size 1 and DataParallel on one
          process gives exactly the plain TrainStep's parameters.
raise     rank 1 raises RuntimeError(ERROR_TEXT) while rank 0 waits in an
          allreduce: the job must end with that error, not hang.
exit0, exit1, kill
          rank 1 trains 2 steps, writes the time to OUT.t, then calls
          sys.exit(0) / sys.exit(1) / SIGKILLs itself while rank 0 goes on
          training: the job must end at once, not hang.
late      both ranks train, then rank 1 works 2 s longer outside any
          collective before it ends: a clean end (exit status 0).
short     ``distributed.fit`` with rank 1's dataset 5 samples shorter: every
          rank must refuse it before the first step.
agree     what must agree across ranks: ranks that differ in a group's lr, a
          layer's activation, a loss option or ``global_loss`` are refused
          alike; a loss with options is refused; ``fit(seed=None)`` on a
          batch-norm + dropout model leaves every rank with the same
          parameters and running statistics (rank 0 saves each rank's);
          with ``skip_nonfinite=False`` a NaN on rank 1 raises on every rank
          and leaves the statistics and the dropout counter as they were.

The problem (data, model, optimizer) is built by the functions below, which
the tests also call to compute the one-process reference.
"""
import sys

import numpy as np

SIZES = [10, 32, 32, 4]
LOCAL_BATCH = 32
N_STEPS = 20
NAN_STEP = 7
NAN_RANK = 1
CLIP_NORM = 0.05            # well below the gradient norms here: every finite step clips
ERROR_TEXT = "rank 1 failed on purpose (fastgrad distributed test)"
FIT_SAMPLES = 2 * 2 * 24 + 37   # 2 full global batches of 2 x 24, then 37 split 18/19
FIT_LOCAL_BATCH = 24


def make_step(seed=0, dtype="float64"):
    import fastgrad as fg
    model = fg.MLP(SIZES, activation="relu", dtype=dtype, seed=seed)
    opt = fg.Adam(model, lr=1e-2, clip_norm=CLIP_NORM)
    return fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)


def global_batches(world=2, local_batch=LOCAL_BATCH, n_steps=N_STEPS):
    """The global batches of the run, NaN already placed where rank NAN_RANK
    feeds it (row 0 of its slice at step NAN_STEP)."""
    rng = np.random.default_rng(1234)
    B = world * local_batch
    out = []
    for k in range(n_steps):
        x = rng.normal(size=(B, SIZES[0]))
        y = rng.integers(0, SIZES[-1], size=B)
        if k == NAN_STEP:
            x[min(NAN_RANK, world - 1) * local_batch, 0] = np.nan
        out.append((x, y))
    return out


def fit_data():
    rng = np.random.default_rng(99)
    X = rng.normal(size=(FIT_SAMPLES, SIZES[0]))
    Y = rng.integers(0, SIZES[-1], size=FIT_SAMPLES)
    return X, Y


def _save_gathered(comm, path, step_or_opt, **arrays):
    params = np.ascontiguousarray(step_or_opt.params)
    gathered = None
    if comm.Get_rank() == 0:
        gathered = np.empty((comm.Get_size(), params.size), params.dtype)
    comm.Gather(params, gathered, root=0)
    if comm.Get_rank() == 0:
        np.savez(path, params=params, all_params=gathered, **arrays)


def run_steps(comm, path):
    from fastgrad import distributed as dist
    r, w = comm.Get_rank(), comm.Get_size()
    step = make_step(seed=r)          # different inits: DataParallel broadcasts rank 0's
    dp = dist.DataParallel(step)
    losses, skipped, clipped = [], [], []
    for x, y in global_batches(w):
        lo, hi = r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH
        losses.append(dp(x[lo:hi], y[lo:hi]))
        skipped.append(dp.stats.skipped)
        clipped.append(dp.stats.clipped)
    _save_gathered(comm, path, step.opt, losses=np.array(losses), skipped=np.array(skipped),
                   clipped=np.array(clipped))


def run_optloop(comm, path):
    from fastgrad import distributed as dist
    r, w = comm.Get_rank(), comm.Get_size()
    step = make_step(seed=r)
    model, loss_fn = step.model, step.loss_fn
    dp = dist.DataParallel(step.opt)
    skipped = []
    for x, y in global_batches(w):
        lo, hi = r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH
        out = model.forward(x[lo:hi])
        _, dy = loss_fn(out, y[lo:hi])
        model.backward(dy)
        skipped.append(dp.step().skipped)
    _save_gathered(comm, path, step.opt, skipped=np.array(skipped))


def run_fit(comm, path):
    from fastgrad import distributed as dist
    r = comm.Get_rank()
    step = make_step(seed=r)
    dp = dist.DataParallel(step)
    X, Y = fit_data()
    # in two calls: the second resumes at epoch 1 (initial_epoch), as a
    # run restarted from a checkpoint would
    first = dist.fit(dp, X, Y, epochs=1, batch_size=FIT_LOCAL_BATCH, seed=5, progress=False)
    hist = dist.fit(dp, X, Y, epochs=2, batch_size=FIT_LOCAL_BATCH, seed=5, progress=False,
                    initial_epoch=1)
    _save_gathered(comm, path, step.opt, loss=np.array(first["loss"] + hist["loss"]),
                   clipped=np.array(first["clipped"] + hist["clipped"]))


def run_raise(comm, path):
    from fastgrad import distributed as dist
    dp = dist.DataParallel(make_step(seed=0))
    if comm.Get_rank() == 1:
        raise RuntimeError(ERROR_TEXT)
    x, y = global_batches(comm.Get_size())[0]
    for _ in range(1000):            # would wait forever for rank 1 without Abort
        dp(x[:LOCAL_BATCH], y[:LOCAL_BATCH])


def run_single(comm, path):
    """Without mpiexec: size 1, and DataParallel equals the plain TrainStep."""
    from fastgrad import distributed as dist
    assert (comm.Get_rank(), comm.Get_size()) == (0, 1)
    assert (dist.rank(), dist.world_size(), dist.launched_by_mpi()) == (0, 1, False)
    a, b = make_step(seed=0), make_step(seed=0)
    dp = dist.DataParallel(b)
    la, lb = [], []
    for x, y in global_batches(1, n_steps=NAN_STEP + 3):
        la.append(a(x, y))
        lb.append(dp(x, y))
        assert dp.stats.skipped == a.stats.skipped
    # rows of ignore_index: a TrainStep skips them; a rank cannot (its mean
    # over kept rows would not weigh by its share of the batch): refused
    y_ignored = y.copy()
    y_ignored[0] = -100
    params = b.opt.params.copy()
    try:
        dp(x, y_ignored)
    except ValueError as exc:
        assert "ignore_index" in str(exc), exc
    else:
        raise AssertionError("DataParallel took labels of ignore_index")
    assert b.opt.params.tobytes() == params.tobytes()
    # pairs copied into the optimizer (strided): values written after it was
    # built survive the broadcast of DataParallel's construction
    import fastgrad as fg
    p, g = np.zeros(8)[::2], np.zeros(4)
    opt = fg.SGD([(p, g)], lr=0.1)
    p[...] = 7.0
    dist.DataParallel(opt)
    assert (p == 7.0).all(), p
    np.savez(path, a=a.opt.params, b=b.opt.params, la=np.array(la), lb=np.array(lb))


def _stop_rank1(comm, path, how):
    import os
    import signal
    import time
    from fastgrad import distributed as dist
    dp = dist.DataParallel(make_step(seed=0))
    x, y = global_batches(comm.Get_size())[0]
    for _ in range(2):
        dp(x[:LOCAL_BATCH], y[:LOCAL_BATCH])
    if comm.Get_rank() == 1:
        with open(path + ".t", "w") as f:
            f.write(repr(time.time()))
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(int(how[-1]))
    for _ in range(100000):          # would wait forever for rank 1
        dp(x[:LOCAL_BATCH], y[:LOCAL_BATCH])


def run_late(comm, path):
    import time
    from fastgrad import distributed as dist
    dp = dist.DataParallel(make_step(seed=0))
    x, y = global_batches(comm.Get_size())[0]
    for _ in range(3):
        dp(x[:LOCAL_BATCH], y[:LOCAL_BATCH])
    if comm.Get_rank() == 1:
        time.sleep(2.0)


def run_short(comm, path):
    from fastgrad import distributed as dist
    dp = dist.DataParallel(make_step(seed=0))
    X, Y = fit_data()
    if comm.Get_rank() == 1:
        X, Y = X[:-5], Y[:-5]
    dist.fit(dp, X, Y, epochs=1, batch_size=FIT_LOCAL_BATCH, progress=False)
    print("fit returned on rank", comm.Get_rank(), flush=True)


def run_agree(comm, path):
    import fastgrad as fg
    from fastgrad import distributed as dist
    r = comm.Get_rank()

    def refused(build, match):
        try:
            build()
        except ValueError as exc:
            assert match in str(exc), str(exc)
            return True
        return False

    def dp_of(model=None, loss=None, lr=1e-2, global_loss=True, opt=None):
        model = model or fg.MLP(SIZES, dtype="float64", seed=0)
        opt = opt or fg.Adam(model, lr=lr)
        return dist.DataParallel(fg.TrainStep(model, loss or fg.SoftmaxCrossEntropy(), opt),
                                 global_loss=global_loss)

    def _local_loss_dp():
        m = fg.MLP(SIZES, dtype="float64", seed=0)
        return dist.DataParallel(fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m)),
                                 global_loss=False)

    m = fg.MLP(SIZES, dtype="float64", seed=0)
    groups = [{"params": m.weights(), "lr": 0.1 * (r + 1)}, {"params": m.biases_and_norms()}]
    flags = [
        refused(lambda: dp_of(m, opt=fg.Adam(m, lr=1e-2, param_groups=groups)),
                "parameter groups"),
        refused(lambda: dp_of(fg.MLP(SIZES, dtype="float64",
                                     activation="relu" if r == 0 else "tanh")),
                "layer settings"),
        refused(lambda: dp_of(loss=fg.SoftmaxCrossEntropy(label_smoothing=0.1 * r)),
                "loss options"),
        refused(lambda: dp_of(global_loss=r == 0), "global_loss"),
        refused(lambda: dp_of(loss=fg.SoftmaxCrossEntropy(reduction="sum")),
                "does not split so"),
        refused(lambda: dist.fit(dp_of(), *fit_data(), epochs=1, batch_size=FIT_LOCAL_BATCH,
                                 progress=False, validation_split=0.25 * r),
                "validation_split"),
        # epoch callbacks decide on each rank's history: validation data that
        # differ (a per-rank shard) or local losses made ranks stop apart
        refused(lambda: dist.fit(dp_of(), *fit_data(), epochs=1, batch_size=FIT_LOCAL_BATCH,
                                 progress=False,
                                 validation_data=tuple(a[r::2] for a in fit_data())),
                "validation_data"),
        refused(lambda: dist.fit(_local_loss_dp(),
                                 *fit_data(), epochs=1, batch_size=FIT_LOCAL_BATCH,
                                 progress=False),
                "global_loss=True"),
        # a batch-norm rank's share of 1 sample of the last global batch
        refused(lambda: dist.fit(dp_of(fg.MLP(SIZES, dtype="float64", seed=0, norm="batch")),
                                 *(a[:2 * FIT_LOCAL_BATCH + 3] for a in fit_data()),
                                 epochs=1, batch_size=FIT_LOCAL_BATCH, progress=False),
                "gives rank 0 1 sample"),
    ]
    model = fg.MLP(SIZES, dtype="float64", seed=r, norm="batch", dropout=0.2)
    dp = dp_of(model)
    X, Y = fit_data()
    dist.fit(dp, X, Y, epochs=2, batch_size=FIT_LOCAL_BATCH, seed=None, progress=False)
    state = np.concatenate([model.params, model.running_mean, model.running_var,
                            [model.dropout_step]])
    dp.opt.skip_nonfinite = False
    x, y = X[:LOCAL_BATCH].copy(), Y[:LOCAL_BATCH]
    if r == 1:
        x[0, 0] = np.nan
    try:
        dp(x, y)
        flags.append(False)
    except fg.NonFiniteGradientError:
        flags.append(True)
    after = np.concatenate([model.params, model.running_mean, model.running_var,
                            [model.dropout_step]])
    flags.append(after.tobytes() == state.tobytes())
    every = np.empty((comm.Get_size(), state.size)) if r == 0 else None
    comm.Gather(state, every, root=0)
    all_flags = np.empty((comm.Get_size(), len(flags)), bool) if r == 0 else None
    comm.Gather(np.array(flags), all_flags, root=0)
    if r == 0:
        np.savez(path, states=every, flags=all_flags)


MODES = {"single": run_single, "steps": run_steps, "optloop": run_optloop, "fit": run_fit, "raise": run_raise,
         "exit0": lambda c, p: _stop_rank1(c, p, "exit0"),
         "exit1": lambda c, p: _stop_rank1(c, p, "exit1"),
         "kill": lambda c, p: _stop_rank1(c, p, "kill"), "late": run_late, "short": run_short,
         "agree": run_agree}


def main(argv):
    from fastgrad import distributed as dist
    mode, path = argv[1], argv[2]
    dist.init()                       # installs the abort-on-exception hook
    dist.DataParallel  # noqa: B018  (imported before any rank can fail)
    MODES[mode](dist._comm, path)


if __name__ == "__main__":
    main(sys.argv)
