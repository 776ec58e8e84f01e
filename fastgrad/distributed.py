"""Data-parallel training over MPI: one gradient allreduce per step.

Run the same script on N processes (``mpiexec -n N python train.py``); each
process holds a full copy of the model and trains on its own slice of every
global batch::

    import fastgrad as fg
    from fastgrad import distributed as dist

    dist.init()                                   # rank / size from MPI COMM_WORLD
    model = fg.MLP([784, 256, 256, 10], seed=0)
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    dp = dist.DataParallel(fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt))
    history = dist.fit(dp, X, Y, epochs=5, batch_size=64)   # 64 per process

A data-parallel step is::

    loss = step.gradients(x, y)          # forward + loss + backward, one compiled call
    grads *= B_local / B_global          # so the sum below is the global-batch mean
    Allreduce(IN_PLACE, grads, SUM)      # ONE collective on the flat gradient buffer
    opt.step()                           # the same clipped-update kernel as TrainStep

Because every rank holds the same averaged gradient, the gradient norm, the
clipping decision, the non-finite skip (a NaN on any one rank is a NaN in the
sum, so every rank skips) and ``StepStats`` are identical on all ranks, and
the parameters stay bitwise identical.  With equal local batches the result
is the update of one process training on the concatenated global batch, to
floating-point rounding of the sums; the losses' options (sums, class
weights, ignored rows) do not split so, and are refused.  Batch-norm
running statistics are broadcast from rank 0 after every training step
(as PyTorch's ``DistributedDataParallel`` broadcasts buffers), so every
rank evaluates alike.  Dropout masks are drawn from the model's seed and
counter, so ranks built with one seed draw the same masks for their local
rows (as torch ranks seeded alike do).

The loss a step returns is the global-batch mean loss: the scalar rides on a
non-blocking ``Iallreduce`` started before the gradient allreduce and waited
for after the update, so it costs no extra synchronisation
(``DataParallel(..., global_loss=False)`` returns the local loss instead).

On the GPU (``model.device == "cuda"``) the gradient allreduce is one
``ncclAllReduce`` on the flat device buffer on the current stream (NCCL via
``cupy.cuda.nccl``, its communicator bootstrapped over MPI); nothing is copied
to the host.

If mpi4py is missing, :func:`init` raises ImportError naming the extra
``pip install 'fastgrad[distributed]'``.  Without ``mpiexec`` a script runs as
one process (size 1): MPI's singleton initialisation.
"""
import atexit
import os
import sys
import threading
import time
import traceback
import zlib

import numpy as np

from . import device as _device
from . import epilogue
from .errors import NonFiniteGradientError

__all__ = ["init", "rank", "world_size", "local_rank", "launched_by_mpi", "DataParallel",
           "fit"]

_INSTALL_HINT = ("fastgrad.distributed needs mpi4py and an MPI library: "
                 "pip install 'fastgrad[distributed]'")
# Environment variables launchers set in every process they start.
_LAUNCHER_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS",
                  "SLURM_STEP_NUM_TASKS")

# Open MPI's default allreduce for 2 ranks and tens of MB (recursive doubling:
# every rank sends and sums the whole buffer) measured 40-80 ms for the wide
# workload's 33.6 MB gradient here, its ring algorithm 15-27 ms (each rank
# sends 2 (p-1)/p of the buffer, the bandwidth-optimal schedule NCCL also
# uses).  Open MPI reads these at MPI_Init; MPICH ignores them; a value the
# user set wins.  bench/RESULTS.md has the numbers.
_OMPI_RING = {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1",
              "OMPI_MCA_coll_tuned_allreduce_algorithm": "4"}

_MPI = None
_comm = None

# Exit notices (see _ExitWatch): a rank that leaves tells the others, so that
# one waiting for it in a fastgrad collective aborts instead of hanging.
_watch = None


def _import_mpi(ring_allreduce=True):
    global _MPI
    if _MPI is None:
        if ring_allreduce and "mpi4py.MPI" not in sys.modules:
            for var, val in _OMPI_RING.items():
                os.environ.setdefault(var, val)
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(_INSTALL_HINT) from exc
        _MPI = MPI
    return _MPI


def launched_by_mpi():
    """True when this process was started by an MPI launcher (mpiexec, srun).

    Reads environment variables only; imports nothing.  Useful to switch a
    script to data-parallel mode automatically.
    """
    return any(os.environ.get(v) for v in _LAUNCHER_VARS)


def _abort_on_exception(exc_type, exc, tb):
    # An uncaught exception on one rank would leave the others waiting in the
    # next collective forever; print it (this rank's error is what the user
    # must see) and abort the whole job.
    try:
        sys.stderr.write(f"fastgrad.distributed: rank {_comm.Get_rank()} of "
                         f"{_comm.Get_size()} failed; aborting the job\n")
        traceback.print_exception(exc_type, exc, tb)
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        _MPI.COMM_WORLD.Abort(1)


class _ExitWatch:
    """Turns "a rank left while the others wait for it" into an abort.

    ``sys.exit`` (or the end of a script) on one rank raises SystemExit,
    which no excepthook sees; that rank would block in ``MPI_Finalize``
    while the others wait in the next allreduce, forever.  So every rank,
    at exit, sends each other rank a notice (on a private duplicate of the
    communicator) holding the number of fastgrad collectives it took part
    in.  A watchdog thread receives the notices (polling every 50 ms; MPI
    runs with ``MPI_THREAD_MULTIPLE``): a rank that is in, or enters,
    fastgrad collective ``i`` while a rank that left after fewer than ``i``
    collectives is known prints why and aborts the job.  The collectives
    themselves stay the blocking ones (Open MPI's non-blocking allreduce
    took 4x longer on a gradient-sized buffer here).  At a normal end every
    rank has finished every collective, so the notices only make the exit
    a clean handshake.  A rank killed by a signal is the launcher's to
    handle: mpiexec ends the job.
    """

    TAG = 16016
    POLL_S = 0.05

    def __init__(self, comm):
        self.comm = comm.Dup()            # collective: every rank calls init()
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.count = 0                    # fastgrad collectives started on this rank
        self.current = None               # the one this rank is in, if any
        self.left = {}                    # rank -> collectives it took part in
        self._note = np.zeros(1, np.int64)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fastgrad-exit-watch",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.announce)

    def _receive(self):
        status = _MPI.Status()
        while self.comm.Iprobe(source=_MPI.ANY_SOURCE, tag=self.TAG, status=status):
            src = status.Get_source()
            note = np.zeros(1, np.int64)
            self.comm.Recv(note, source=src, tag=self.TAG)
            self.left[src] = int(note[0])

    def _check(self, index):
        gone = [(r, c) for r, c in list(self.left.items()) if c < index]
        if not gone:
            return
        r, c = gone[0]
        try:
            sys.stderr.write(
                f"fastgrad.distributed: rank {r} of {self.size} ended (sys.exit or the end of "
                f"its script) after {c} collective operation(s), while rank {self.rank} needs "
                f"it in operation {index}; aborting the job\n")
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            _MPI.COMM_WORLD.Abort(1)

    def _watch(self):
        while not self._stop.wait(self.POLL_S):
            self._receive()
            current = self.current
            if current is not None:
                self._check(current)

    def run(self, call, index=None):
        """``call()`` as fastgrad collective ``index`` (the next one if None)."""
        if index is None:
            index = self.start()
        self._check(index)
        self.current = index
        try:
            return call()
        finally:
            self.current = None

    def start(self):
        self.count += 1
        return self.count

    def announce(self):
        """At exit: tell every other rank, then wait for theirs (clean end)."""
        self._stop.set()
        self._thread.join()
        if _MPI.Is_finalized():
            return
        self._note[0] = self.count
        sends = [self.comm.Isend(self._note, dest=r, tag=self.TAG)
                 for r in range(self.size) if r != self.rank]
        _MPI.Request.Waitall(sends)
        self._receive()
        pending = [r for r in range(self.size) if r != self.rank and r not in self.left]
        bufs = [np.zeros(1, np.int64) for _ in pending]
        _MPI.Request.Waitall([self.comm.Irecv(b, source=r, tag=self.TAG)
                              for b, r in zip(bufs, pending)])


def _collective(watch, call, index=None):
    """Run one blocking fastgrad collective under ``watch`` (None: plainly)."""
    if watch is None:
        return call()
    return watch.run(call, index)


def _watch_for(comm):
    """The exit watch for collectives on ``comm``: only on COMM_WORLD itself,
    where every rank takes part in every collective and so counts alike."""
    if _watch is None or comm is not _comm:
        return None
    return _watch


def init(abort_on_error=True, select_gpu="auto", ring_allreduce=True):
    """Start (or join) MPI; returns ``(rank, world_size)``.

    Parameters
    ----------
    abort_on_error : bool
        With more than one process, install a ``sys.excepthook`` that prints
        the traceback and calls ``MPI.COMM_WORLD.Abort(1)``, so a rank that
        raises ends the job with its error instead of leaving the other
        ranks hanging in a collective; and make a rank that ends early
        (``sys.exit``, the end of its script) abort the job when another
        rank waits for it in a fastgrad collective (see ``_ExitWatch``).
    select_gpu : "auto" | bool
        Bind this process to GPU ``local_rank() % n_gpus`` (CuPy's current
        device) so ranks on one node do not share a GPU.  "auto" does it when
        fastgrad can use CUDA here; call ``init`` before building models.
    ring_allreduce : bool
        Under Open MPI, use its ring allreduce (bandwidth-optimal for
        gradient-sized buffers; 2-4x faster than the default for the wide
        benchmark) unless ``OMPI_MCA_coll_tuned_allreduce_algorithm`` is set.
        Takes effect only if ``init`` is the first to import ``mpi4py.MPI``;
        every rank must make the same choice.

    Raises
    ------
    ImportError
        mpi4py (or its MPI library) is not installed; the message names the
        extra to install.
    """
    global _comm, _watch
    MPI = _import_mpi(ring_allreduce)
    if _comm is None:
        _comm = MPI.COMM_WORLD
    if abort_on_error and _comm.Get_size() > 1 and sys.excepthook is not _abort_on_exception:
        sys.excepthook = _abort_on_exception
    if abort_on_error and _comm.Get_size() > 1 and _watch is None:
        _watch = _ExitWatch(_comm)
    local_rank()                # collective once, here, where every rank is
    if select_gpu:
        from . import device as _device
        if select_gpu is True or _device._cuda_problem() is None:
            import cupy
            n = cupy.cuda.runtime.getDeviceCount()
            if n:
                cupy.cuda.Device(local_rank() % n).use()
    return _comm.Get_rank(), _comm.Get_size()


def _world():
    if _comm is None:
        init(select_gpu=False)
    return _comm


def rank():
    """This process's rank in COMM_WORLD (0 without mpiexec)."""
    return _world().Get_rank()


def world_size():
    """Number of processes in COMM_WORLD (1 without mpiexec)."""
    return _world().Get_size()


def local_rank():
    """Rank among the processes on this node (for picking a GPU).

    Found by :func:`init`, which every rank calls (splitting COMM_WORLD by
    node is collective); a plain query from then on."""
    global _local_rank
    if _local_rank is None:
        comm = _world()
        node = comm.Split_type(_MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        try:
            _local_rank = node.Get_rank()
        finally:
            node.Free()
    return _local_rank


_local_rank = None


# -- reducers: one in-place sum over all ranks, per device ----------------------

class _MPIReducer:
    """Host buffers: MPI collectives straight on the NumPy array."""

    def __init__(self, comm):
        self.comm = comm
        self.watch = _watch_for(comm)

    def allreduce(self, buf):
        _collective(self.watch, lambda: self.comm.Allreduce(_MPI.IN_PLACE, buf, op=_MPI.SUM))

    def bcast(self, buf, root=0):
        _collective(self.watch, lambda: self.comm.Bcast(buf, root=root))

    @staticmethod
    def scale(buf, factor):
        np.multiply(buf, factor, out=buf)


def _agree(comm, problem, what):
    """Raise the same error on every rank if ``problem`` is set on any.

    Collective: every rank calls it with its own ``problem`` (a message, or
    None).  A rank that raised alone would leave the others waiting in the
    next collective forever.
    """
    problems = comm.allgather(problem)
    bad = [(r, p) for r, p in enumerate(problems) if p]
    if bad:
        where = "; ".join(f"rank {r}: {p}" for r, p in bad)
        raise RuntimeError(f"fastgrad.distributed: {what} failed on {len(bad)} of "
                           f"{len(problems)} ranks ({where})")


def _nccl_problem():
    """None if CuPy's NCCL binding can run here, else why not."""
    try:
        from cupy.cuda import nccl
    except Exception as exc:                       # CuPy itself is broken
        return f"cannot import cupy.cuda.nccl: {exc}"
    if not getattr(nccl, "available", False):
        # CuPy only warns at import when libnccl is missing; the module is then empty.
        return ("NCCL is not installed (CuPy found no libnccl; pip install "
                "nvidia-nccl-cu13, or train the CUDA model with one process)")
    return None


class _NCCLReducer:
    """Device buffers: NCCL on the current CuPy stream, no host copy.

    The NCCL communicator is bootstrapped by broadcasting rank 0's unique id
    over MPI; every later collective is NCCL's.  Set-up failures end every
    rank with the same error (``_agree``) instead of leaving some ranks in
    ``bcast`` or in NCCL's initialisation.
    """

    def __init__(self, comm, dtype):
        _agree(comm, _nccl_problem(), "NCCL set-up")
        import cupy
        from cupy.cuda import nccl
        self._cupy, self._nccl = cupy, nccl
        uid = problem = None
        if comm.Get_rank() == 0:
            try:
                uid = nccl.get_unique_id()
            except Exception as exc:
                problem = f"nccl.get_unique_id(): {exc}"
        uid, problem = comm.bcast((uid, problem), root=0)
        _agree(comm, problem, "NCCL set-up")
        try:
            self.nccl_comm = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
        except Exception as exc:
            # The other ranks may be inside NCCL's initialisation, which waits
            # for every rank: only an abort ends them.
            sys.stderr.write(f"fastgrad.distributed: rank {comm.Get_rank()} of "
                             f"{comm.Get_size()}: NCCL communicator set-up failed: {exc}; "
                             "aborting the job\n")
            sys.stderr.flush()
            if comm.Get_size() > 1:
                comm.Abort(1)
            raise
        self._codes = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                       np.dtype(np.float64): nccl.NCCL_FLOAT64}
        self._dtype = self._codes[np.dtype(dtype)]

    def _stream(self):
        return self._cupy.cuda.get_current_stream().ptr

    def allreduce(self, buf):
        # In place: sendbuff == recvbuff is NCCL's documented in-place form.
        self.nccl_comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, self._dtype,
                                 self._nccl.NCCL_SUM, self._stream())

    def bcast(self, buf, root=0):
        # the buffer's own dtype: batch norm's float64 statistics in a float32 model
        self.nccl_comm.bcast(buf.data.ptr, buf.size, self._codes[np.dtype(buf.dtype)], root,
                             self._stream())

    @staticmethod
    def scale(buf, factor):
        buf *= factor                       # one elementwise kernel on the same stream


# -- the data-parallel step ----------------------------------------------------

class DataParallel:
    """Data-parallel wrapper of a :class:`fastgrad.TrainStep` or an optimizer.

    At construction it checks that every rank built the same model and
    optimizer (sizes, dtype, device, hyper-parameters; ValueError on every
    rank otherwise, instead of a hang or silent divergence) and broadcasts
    the parameters and the optimizer state (moments and step counts) from
    rank 0, so ranks may start from different seeds.

    Parameters
    ----------
    step : fastgrad.TrainStep or fastgrad optimizer
        With a TrainStep, call ``dp(x, y)``; with an optimizer (hand-written
        loops that fill ``opt.grads`` or the ``(param, grad)`` arrays), call
        ``dp.step()`` after the backward pass.
    comm : mpi4py communicator, optional
        Defaults to COMM_WORLD (after :func:`init`).
    global_loss : bool
        ``dp(x, y)`` returns the global-batch mean loss (default), through a
        non-blocking allreduce of one scalar overlapped with the update; False
        returns this rank's local mean loss and skips that collective.

    Attributes
    ----------
    stats : StepStats of the last update (identical on every rank)
    rank, world : this rank and the number of ranks
    comm_seconds : cumulative wall time spent scaling and allreducing gradients
    last_comm_seconds : that time for the last step
    """

    def __init__(self, step, comm=None, global_loss=True):
        from .optim import Optimizer
        from .step import TrainStep
        if isinstance(step, TrainStep):
            self.train_step, self.opt = step, step.opt
            self.model, self.loss_fn = step.model, step.loss_fn
        elif isinstance(step, Optimizer):
            self.train_step, self.opt = None, step
            self.model, self.loss_fn = None, None
        else:
            raise TypeError("DataParallel wraps a fastgrad.TrainStep or a fastgrad optimizer, "
                            f"got {type(step).__name__}")
        self.comm = comm if comm is not None else _world()
        _import_mpi()
        self.rank, self.world = self.comm.Get_rank(), self.comm.Get_size()
        self._watch = _watch_for(self.comm)
        self.global_loss = bool(global_loss)
        opt = self.opt
        self.device = opt.backend.name
        self._check_same_everywhere()
        if self.loss_fn is not None and self.loss_fn.options:
            # (after the check above: every rank refuses alike)
            raise ValueError(f"DataParallel averages the ranks' mean losses, weighted by their "
                             f"shares of the global batch; {self.loss_fn!r} does not split so "
                             "(a sum, or a mean over per-batch class weights or ignored rows): "
                             "use the default loss options")
        # batch-norm running statistics follow rank 0's after every step (as
        # DistributedDataParallel's broadcast_buffers): every rank validates alike
        self._sync_buffers = self.model is not None and self.model._has_batch_norm
        if opt.backend.holds(opt.grads, "grads"):       # device memory: NCCL
            self._reducer = _NCCLReducer(self.comm, opt.grads.dtype)
        else:
            self._reducer = _MPIReducer(self.comm)
        self._loss_buf = np.zeros(1, np.float64)
        self.stats = None
        self.comm_seconds = 0.0
        self.last_comm_seconds = 0.0
        self.broadcast_state(root=0)

    # -- construction ------------------------------------------------------------
    def _signature(self):
        opt, model, loss_fn = self.opt, self.model, self.loss_fn
        groups = opt._groups_state()          # each group's ranges, hyper-parameters, lr
        return (int(opt.params.size), np.dtype(opt.params.dtype).str, self.device,
                type(opt).__name__, repr(opt.hyper), repr(groups), tuple(sorted(opt.state)),
                None if model is None else tuple(model.sizes),
                None if model is None else repr([epilogue.config_of(layer)
                                                 for layer in model.layers]),
                None if loss_fn is None else getattr(loss_fn, "name", None),
                None if loss_fn is None else repr(loss_fn.options),
                self.global_loss)

    def _check_same_everywhere(self):
        sigs = _collective(self._watch, lambda: self.comm.allgather(self._signature()))
        bad = [r for r, s in enumerate(sigs) if s != sigs[0]]
        if bad:
            names = ("n_params", "dtype", "device", "optimizer", "hyper-parameters",
                     "parameter groups", "optimizer state", "model sizes", "layer settings",
                     "loss", "loss options", "global_loss")
            diff = [n for n, a, b in zip(names, sigs[0], sigs[bad[0]]) if a != b]
            raise ValueError(f"DataParallel: rank {bad[0]} differs from rank 0 in "
                             f"{', '.join(diff)}; every rank must build the same model and "
                             "optimizer")

    def broadcast_state(self, root=0):
        """Copy ``root``'s parameters and optimizer state to every rank."""
        opt, red = self.opt, self._reducer
        red.bcast(opt.params, root)
        for name in sorted(opt.state):
            red.bcast(opt.state[name], root)
        counts = _collective(self._watch, lambda: self.comm.bcast(
            (opt.step_count, opt.n_skipped, opt.n_calls), root=root))
        opt.step_count, opt.n_skipped, opt.n_calls = counts
        if opt._pairs is not None:
            opt._scatter_params()

    # -- the step ------------------------------------------------------------------
    def _weight(self, local_batch, global_batch):
        if global_batch is None:
            return 1.0 / self.world
        if local_batch is None:
            raise ValueError("global_batch needs local_batch")
        if not 0 <= local_batch <= global_batch or global_batch < 1:
            raise ValueError(f"need 0 <= local_batch <= global_batch, got {local_batch} "
                             f"and {global_batch}")
        return local_batch / global_batch

    def _average_grads(self, weight):
        """grads <- sum over ranks of weight_r * grads_r: the one allreduce."""
        t0 = time.perf_counter()
        g = self.opt.grads
        if self.world > 1 or weight != 1.0:
            if weight != 1.0:
                # Scaling before the sum (not after) keeps large gradients
                # from overflowing in the sum and handles unequal batches.
                self._reducer.scale(g, weight)
            if self.world > 1:
                self._reducer.allreduce(g)
        self.last_comm_seconds = dt = time.perf_counter() - t0
        self.comm_seconds += dt

    def __call__(self, x, y, global_batch=None):
        """One data-parallel training step on this rank's batch ``x, y``.

        Every rank must call it the same number of times.  Local batches must
        have equal sizes, or pass ``global_batch`` (the sum of all ranks'
        local batch sizes, known without communication, e.g. from the shard
        arithmetic of :func:`fit`); a rank may then hold 0 samples.

        Returns the mean loss over the global batch (before the update), or
        over the local batch with ``global_loss=False``; ``self.stats`` holds
        the update's StepStats.
        """
        if self.train_step is None:
            raise TypeError("this DataParallel wraps an optimizer: call .step() after backward")
        n = len(x)
        # What the forward changes besides the parameters (dropout counter,
        # batch-norm running statistics), restored if the update is skipped.
        model, opt = self.model, self.opt
        snap = model._step_snapshot()
        if n == 0:
            if global_batch is None:
                raise ValueError("an empty local batch needs global_batch")
            opt.grads[...] = 0            # contributes nothing to the sum
            if model.training:
                model._next_dropout_step()   # the counter stays the other ranks'
            loss = 0.0
        else:
            with opt._lock:
                loss = self.train_step._gradients(x, y, ignored_rows=False)
        weight = self._weight(n, global_batch)
        req = None
        if self.global_loss and self.world > 1:
            # Started before the gradient allreduce, progressed by it, and
            # waited for after the update: no extra MPI synchronisation
            # point.  MPI takes a host float (on CUDA that read waits for
            # the device).
            self._loss_buf[0] = float(loss) * weight if n else 0.0
            index = None if self._watch is None else self._watch.start()
            req = self.comm.Iallreduce(_MPI.IN_PLACE, self._loss_buf, op=_MPI.SUM)
        self._average_grads(weight)
        undo = model.backend.undo_skipped_forward
        try:
            self.stats = opt.step()
        except NonFiniteGradientError:      # skip_nonfinite=False: on every rank alike
            undo(model, snap, True, opt._records)
            if req is not None:
                _collective(self._watch, req.Wait, index)
            raise
        undo(model, snap, lambda: self.stats.skipped, opt._records)
        if self._sync_buffers and model.training:
            self._reducer.bcast(model._running_mean, 0)
            self._reducer.bcast(model._running_var, 0)
        if req is not None:
            _collective(self._watch, req.Wait, index)
            loss = float(self._loss_buf[0])
        self.train_step.stats = self.stats
        return loss

    def step(self, local_batch=None, global_batch=None):
        """Allreduce the gradients, then ``opt.step()``; returns its StepStats.

        For an optimizer over ``(param, grad)`` pairs the users' gradient
        arrays are overwritten with the averaged gradients (as PyTorch's
        DistributedDataParallel leaves ``.grad``).  Pass ``local_batch`` and
        ``global_batch`` when local batches differ in size.
        """
        opt = self.opt
        weight = self._weight(local_batch, global_batch)
        if opt._pairs is not None:
            opt._gather_grads()
            self._average_grads(weight)
            off = opt.layer_offsets
            for i, (_, g) in enumerate(opt._pairs):
                g[...] = opt.grads[off[i]:off[i + 1]].reshape(g.shape)
        else:
            self._average_grads(weight)
        self.stats = opt.step()
        return self.stats


# -- fit ----------------------------------------------------------------------------

class _RankShard:
    """What ``fastgrad.step.fit`` sees as its step: it receives each global
    batch and trains this rank on its contiguous slice of it."""

    def __init__(self, dp):
        self.dp, self.model, self.loss_fn, self.stats = dp, dp.model, dp.loss_fn, None
        self.opt = dp.opt           # for fit's epoch callbacks (checkpoints, plateau lr)

    def _epoch_inputs(self, X, Y):
        # the whole dataset checked before the first step, as a TrainStep's
        return self.dp.train_step._epoch_inputs(X, Y)

    def __call__(self, xb, yb):
        n, r, w = len(xb), self.dp.rank, self.dp.world
        lo, hi = n * r // w, n * (r + 1) // w        # disjoint, sizes differ by <= 1
        loss = self.dp(xb[lo:hi], yb[lo:hi], global_batch=n)
        self.stats = self.dp.stats
        return loss


def _fingerprint(data):
    """Shapes, dtypes and a CRC of the bytes of ``validation_data``'s arrays
    (None: none): what ranks compare, not the data."""
    if data is None:
        return "none"
    if not isinstance(data, (tuple, list)):
        return type(data).__name__       # refused alike by fit on every rank
    out = []
    for a in data:
        if hasattr(a, "detach") and type(a).__module__.startswith("torch"):
            a = a.detach().cpu()        # read as its values, as fit reads it
        a = np.ascontiguousarray(_device.to_numpy(a))
        out.append(f"{a.shape} {a.dtype} {zlib.crc32(a.view(np.uint8).reshape(-1)):08x}"
                   if a.dtype.kind in "biuf" else f"{a.shape} {a.dtype}")
    return "; ".join(out)


def _refuse_a_rank_batch_of_one(dp, X, Y, batch_size, validation_split, validation_data):
    """Batch norm in training mode: a rank's share of a global batch must
    not be 1 sample (found after the epoch's other steps had trained).
    Every rank has the same data and arguments, so all refuse alike."""
    from .step import _refuse_batch_of_one, _split_validation
    n = len(_split_validation(X, Y, validation_split, validation_data)[0])
    full = batch_size * dp.world
    _refuse_batch_of_one(dp.model, n, full, -(-n // full),
                         "choose another batch_size or use model.eval()", world=dp.world)


def _check_same_dataset(dp, X, Y, epochs, batch_size, shuffle, seed, initial_epoch,
                        validation_split=0.0, validation_data=None):
    """ValueError on every rank unless all ranks pass the same number of
    samples, the same validation data and the same loop arguments (one
    allgather): epoch callbacks decide on each rank, on its history."""
    mine = {"len(X)": len(X), "len(Y)": len(Y), "epochs": repr(epochs),
            "batch_size": repr(batch_size), "shuffle": repr(shuffle), "seed": repr(seed),
            "initial_epoch": repr(initial_epoch), "validation_split": repr(validation_split),
            "validation_data": _fingerprint(validation_data)}
    every = _collective(dp._watch, lambda: dp.comm.allgather(mine))
    for r, theirs in enumerate(every):
        diff = [f"{k} {theirs[k]} (rank 0: {every[0][k]})" for k in mine
                if theirs[k] != every[0][k]]
        if diff:
            raise ValueError(f"distributed.fit: rank {r} differs from rank 0 in "
                             f"{', '.join(diff)}; every rank must pass the same dataset and "
                             "arguments")


def fit(dp_step, X, Y, epochs=1, batch_size=32, shuffle=True, seed=0, progress=True,
        validation_data=None, callbacks=None, initial_epoch=0, validation_split=0.0):
    """Data-parallel :func:`fastgrad.fit`; ``batch_size`` is per process.

    Every rank draws the same seeded permutation each epoch (``seed=None``:
    a seed drawn on rank 0 for all); a global batch
    is ``world_size * batch_size`` consecutive samples of it and rank ``r``
    trains on its own contiguous slice (the last, smaller global batch is
    split as evenly as possible, each rank's gradient weighted by its share,
    computed without communication).  So N processes at ``batch_size`` B
    follow the trajectory of one process at batch ``N * B`` to rounding.

    Every rank needs ``X`` and ``Y`` (memory-mapped arrays are fine).  The
    progress bar shows on rank 0 only; callbacks run on every rank with the
    same global loss and stats.  Validation runs on every rank (identical
    parameters and batch-norm statistics: rank 0's after every step,
    identical results).  Returns the history of
    :func:`fastgrad.fit`, identical on every rank.

    Before the first step the ranks compare their dataset lengths,
    validation data (a checksum) and arguments; if they disagree every rank
    raises the same ValueError (a shorter dataset on one rank would
    otherwise leave the others waiting in an allreduce it never joins, and
    epoch callbacks deciding on different validation figures would stop or
    cut the lr on some ranks only).  The DataParallel must report the global
    loss (``global_loss=True``), and a batch-norm model must not give a rank
    a share of 1 sample of a global batch.
    """
    from .step import fit as _fit
    if not isinstance(dp_step, DataParallel) or dp_step.train_step is None:
        raise TypeError("fit needs a DataParallel wrapping a TrainStep")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if seed is None:
        # one fresh seed, drawn on rank 0: each rank drawing its own gave
        # every rank another permutation (samples trained twice or never)
        seed = _collective(dp_step._watch, lambda: dp_step.comm.bcast(
            np.random.SeedSequence().entropy if dp_step.rank == 0 else None, root=0))
    if not dp_step.global_loss:
        # the history (and what EarlyStopping or a plateau cut decide on it)
        # must be the same on every rank: each would stop or cut on its own
        raise ValueError("distributed.fit needs DataParallel(global_loss=True): with "
                         "global_loss=False each rank's history holds its own loss, and "
                         "epoch callbacks would decide differently on each")
    _check_same_dataset(dp_step, X, Y, epochs, batch_size, shuffle, seed, initial_epoch,
                        validation_split, validation_data)
    _refuse_a_rank_batch_of_one(dp_step, X, Y, int(batch_size), validation_split,
                                validation_data)
    return _fit(_RankShard(dp_step), X, Y, epochs=epochs,
                batch_size=int(batch_size) * dp_step.world, shuffle=shuffle, seed=seed,
                progress=progress and dp_step.rank == 0, validation_data=validation_data,
                callbacks=callbacks, initial_epoch=initial_epoch,
                validation_split=validation_split)
