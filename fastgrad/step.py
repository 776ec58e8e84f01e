"""TrainStep: a whole training step as one compiled call, and ``fit``.

``loss = step(x, labels)`` runs forward, loss, backward, the gradient norm,
clipping and the optimizer update in ONE ``@njit`` call
(``fastgrad.kernels.cpu.step.train_step``): no Python between layers and no
allocation in steady state -- activation, delta and scratch buffers are
allocated once per batch size, so the smaller last batch of an epoch runs
without a recompile.  The update is the very kernel ``opt.step()`` runs, so
both paths give the same parameters, and ``step.stats`` is the StepStats
``opt.step()`` would have returned.

On the CPU, plain models and models with dropout, residual blocks,
normalisation or weight normalisation run the same driver, reading the
model's step plan (``fastgrad.kernels.layout.step_plan``) and compiled for
the layer features the model uses (its copy of the kernels:
``fastgrad.registry.cpu_kernels``): plain models never compile epilogue code,
so their cold first step stays as fast.  CUDA has the twin driver
(``fastgrad.kernels.cuda.step``), reading the same plan.  A training-mode call
advances ``model.dropout_step`` once, as ``model.forward`` does, so both
paths draw the same dropout masks.

``step.run_epoch(X, Y, batch_size)`` runs a whole epoch's steps in compiled
chunks (``train_steps``: batch gathering, every step and its statistics),
bitwise the per-step loop; ``fit`` uses it.
"""
from collections import OrderedDict
import contextlib
import math
import numbers
import sys
import threading
import time

import numba
from numba.core import event as _numba_event
import numpy as np

from . import device as _device
from . import epilogue
from . import interrupts
from . import ops
from . import threads as _threads
from .errors import NonFiniteGradientError
from .optim import StepStats
from .kernels import layout as _layout
from .kernels import spec as _spec
from .kernels.cpu import step_sharded as _ksharded
from .layers import Sequential


_NO_KEYWORDS = {}


class _IgnoredRows(Exception):
    """A batch's labels hold the loss's ``ignore_index``: it takes the
    layer path (TrainStep._labels)."""


def layer_features(model):
    """The epilogue pieces ``model`` uses beyond the plain kernels' (names
    of ``fastgrad.kernels.layout.FEATURES``, which are the pieces'):
    what its step driver is compiled for."""
    return epilogue.used_pieces(model.layers)


def _fixed_field(name):
    def refuse(self, value):
        raise AttributeError(f"step.{name} is fixed: the step's buffers, plan and compiled "
                             "driver were made for it; build a new TrainStep")
    return property(lambda self: getattr(self, "_" + name), refuse,
                    doc=f"The ``{name}`` this step was built with (read-only).")


class TrainStep:
    """The training step of ``model`` under ``loss_fn`` and ``opt``.

    Parameters
    ----------
    model : fastgrad.Sequential / MLP
    loss_fn : fastgrad.SoftmaxCrossEntropy | MSE | BCEWithLogits
        With PyTorch's options set (``label_smoothing``, ``weight``,
        ``pos_weight``, ``reduction="sum"``, ...) the step runs the layer
        path (forward, loss, backward, update launched one by one) instead
        of the fused call, which computes the default losses only.
    opt : fastgrad optimizer
        Built on ``model`` (``fg.Adam(model, ...)`` and the like).

    Notes
    -----
    Calling ``step(x, y)`` returns the mean loss of the batch (before the
    update, as in a PyTorch loop) and leaves the update's statistics in
    ``step.stats``.

    ``cuda_graph=True`` (CUDA, default losses) replays each batch size's
    step from a CUDA graph captured on its second call, with fastgrad's own
    GEMM kernel (CuPy cannot capture cuBLAS); ``step._graphs`` holds the
    graphed steps (``.graph`` is None and ``.fallback_reason`` says why if
    capture failed: the step then runs eagerly).  Models with epilogue pieces
    are graphed too: their dropout step and running statistics live in
    device memory, which the graphed kernels read, and the train/eval mode
    gets a graph of its own.  Not yet measured on a GPU.

    On CUDA a call only queues work: the loss is a 0-d float64 CuPy array
    and ``step.stats`` fills itself when first read (see
    ``fastgrad.optim``); reading either waits for that step.  NumPy inputs
    are copied to the GPU through pinned memory without waiting; CuPy
    inputs are used in place.  Labels on the GPU are range-checked by the
    loss kernel: a bad one skips the update and raises ValueError when the
    step's stats are read back (host labels raise at once, as on the CPU).

    A skipped update (non-finite gradient) leaves everything as it was: the
    parameters, the optimizer state and step count, the model's dropout
    counter (``model.dropout_step``) and batch-norm running statistics,
    which the forward had already advanced.  (On CUDA the skip is decided on
    the device without the host waiting: the fused step keeps the dropout
    counter in device memory while it trains, and reading
    ``model.dropout_step`` waits for the steps queued.  Only the layer path
    of a loss with options keeps the counter on the host, where it does
    advance on a skipped update.)

    Calls from several threads run one at a time (the model's lock, shared
    with its optimizer), so no thread sees or writes a half-done step.  A
    Ctrl-C during a call (or during ``run_epoch``) raises KeyboardInterrupt
    once the step it interrupted is applied and counted.

    ``threads=n`` (CPU, plain models) runs the step on ``n`` threads of ONE
    pool: the batch is cut into ``n`` row shards whose forward and backward
    run side by side with single-threaded BLAS, their gradients are combined
    in a fixed order, and the norm and update passes run on the same
    threads (``fastgrad.kernels.cpu.step_sharded``).  Results are
    deterministic for a given ``n`` and equal the one-thread step up to
    rounding (a batch mean summed from shard means), bitwise for ``n=1``.
    Below 2^15 parameters (the combine and the update then run on the
    calling thread) the shards run on the default step's pass team:
    OpenBLAS's own workers, or the shared pool's threads.  OpenBLAS's
    workers spin for a while after any multi-threaded BLAS call, and shards
    on other threads shared the cores with them (small nets' steps took
    2-3.5x as long); on the workers, they run on the spinning threads.  A
    larger net's shards run on Numba's threads, with its combine and update.
    The shards' GEMMs run on SciPy's OpenBLAS whatever ``fastgrad.set_blas``
    chose.
    ``threads=None`` (default) leaves the GEMMs to BLAS's own threads, and
    the step's activation passes, its loss from 2^14 outputs and, from 2^15
    parameters, its update run on those same threads (OpenBLAS's workers, or the shared pool's with
    ``fastgrad.share_blas_pool``; ``fastgrad.kernels.cpu.pass_team``),
    bitwise the serial passes; ``opt.parallel = False`` keeps the update
    serial.

    Buffers are kept per batch size for the last ``max_cached_batch_sizes``
    (default 8) distinct batch sizes used; a ninth releases the least
    recently used one (it is allocated again if that size comes back).
    """

    max_cached_batch_sizes = 8

    def __init__(self, model, loss_fn, opt, cuda_graph=False, threads=None):
        if not isinstance(model, Sequential):
            raise TypeError(f"model must be a fastgrad Sequential/MLP, got {type(model).__name__}")
        name = getattr(loss_fn, "name", None)
        if name not in _spec.LOSS_CODES:
            raise TypeError(f"loss_fn must be one of fastgrad's losses, got {loss_fn!r}")
        # A loss with options (label smoothing, class weights, ...) runs the
        # composed step below: the same kernels as model(x) / loss_fn /
        # backward / opt.step(), launched one by one (the fused step
        # computes the default losses only).
        self._loss_options = bool(getattr(loss_fn, "options", None))
        if self._loss_options and cuda_graph:
            raise ValueError(f"cuda_graph=True fuses the default losses only; {loss_fn!r} "
                             f"sets {sorted(loss_fn.options)}")
        if getattr(opt, "params", None) is not model.params or not np.array_equal(
                opt._offsets, model.layer_offsets):
            raise ValueError("opt must be built on this model (fg.Adam(model, ...))")
        self._model, self._loss_fn, self._opt = model, loss_fn, opt
        be = self._backend = model.backend
        # Models with epilogue pieces (dropout, residual, norm, weight norm):
        # the step plan carries them; plain models never compile (nor pay
        # for) their code.
        self._blocks = model.extended
        # Where the device has no fused step for epilogue pieces, the model
        # runs the layer path (forward, loss, backward, update: the same twin
        # kernels, launched one by one).
        self._composed = (self._blocks and not be.fuses_epilogue) or self._loss_options
        # CUDA graphs: the step's launches replayed as one graph per batch
        # size and mode (GEMMs through fastgrad's own kernel: CuPy refuses
        # cuBLAS in a capture).  Off by default until it has been measured
        # on a GPU.
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and not be.graphs_steps:
            raise ValueError(f"cuda_graph=True needs a CUDA model; this one is on {be.name}")
        if self.cuda_graph and opt._seg_group is not None:
            raise ValueError("cuda_graph=True needs an optimizer with one parameter group")
        self._graphs = {}
        self._threads = self._threads_arg(threads, model)
        xp = self._xp = be.xp
        self._loss_kind = _spec.LOSS_CODES[name]
        self._sizes = np.asarray(model.sizes, np.int64)
        self._n_out = int(model.sizes[-1])
        self._codes = np.asarray([layer.code for layer in model.layers], np.int64)
        self._alphas = np.asarray([layer.alpha for layer in model.layers], np.float64)
        self._needs_z = any(ops.needs_z(c) for c in self._codes)
        # The step kernels of this model's activations, update rule, loss and
        # layer features (on the CPU compiled for those alone:
        # fastgrad.registry.cpu_kernels), with the host team's branches
        # while there is a team (_use_team).
        self._team = None
        self._use_team(be.step_team())
        model._driver_config = None
        # Every device steps by plan: ONE step driver for plain models and
        # models with epilogue pieces (kernels/cpu/step.py, kernels/cuda/step.py).
        self._by_plan = be.steps_by_plan and not self._composed
        if self._by_plan:
            # the per-layer values the step reads, from the pieces' table
            flags = epilogue.plan_flags(model.layers)
            self._drops, self._residual = flags["drops"], flags["residual"]
            self._norms, self._wn = flags["norms"], flags["wn"]
        # Where the skip decision stays on the device, the fused step of a
        # model with epilogue pieces keeps the dropout step there too, and
        # settles both there (see model.dropout_step).
        self._device_step = (xp.zeros(1, np.int64) if self._by_plan and self._blocks
                             and not be.skip_known_on_host else None)
        # The optimizer's: on CUDA they are part of the record it reads back.
        self._layer_sq = opt._layer_sq
        self._buffers = OrderedDict()     # batch size -> buffers, least recently used first
        self._fixed_args = None           # (buffers, kernels, driver arguments): _driver_args
        self._pending_members = None      # (worker, plan): _driver_args, _ready
        self._shard_header = None         # (kernels, pool generation, header): threads=n
        self._workspaces = {}
        self._staged = {}           # CUDA: device buffers of host inputs, by (name, shape)
        # Placeholders for the loss input the chosen loss does not read.
        self._no_labels = xp.zeros(0, np.int64)
        self._no_target = xp.zeros((0, 0), model.dtype)
        self.stats = None

    model = _fixed_field("model")
    loss_fn = _fixed_field("loss_fn")
    opt = _fixed_field("opt")

    def __reduce__(self):
        # copy.deepcopy and pickle: a step built again on the copies of its
        # model, loss and optimizer (its compiled state is rebuilt on use)
        return _rebuilt_step, (self._model, self._loss_fn, self._opt, self.cuda_graph,
                               self._threads, self.fused_epochs, self.progress_interval)

    @property
    def threads(self):
        """``threads=`` of the constructor (read-only: the shard buffers
        and the checks of the model were made for it)."""
        return self._threads

    def _threads_arg(self, threads, model):
        if threads is None:
            return None
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) \
                or threads < 1:
            raise ValueError(f"threads must be None or a positive integer, got {threads!r}")
        if not model.backend.shards_threads or self._blocks or self._loss_options:
            raise ValueError("threads= shards the fused CPU step of a plain model (no dropout, "
                             "normalisation, residual or weight norm, default loss options); "
                             f"this step runs on {model.device}"
                             + (" with epilogue pieces" if self._blocks else "")
                             + (" with loss options" if self._loss_options else ""))
        limit = numba.config.NUMBA_NUM_THREADS
        if threads > limit:
            raise ValueError(f"threads={threads} exceeds Numba's {limit} threads "
                             "(NUMBA_NUM_THREADS)")
        return int(threads)

    def _shard_plan_header(self):
        """``(header, ready)``: the head of the shards' step plans (no team:
        each shard runs on its own thread; the members of a driver with the
        team's branches, ``kernels/cpu/pass_team.py``) and ``ready(kernel)``,
        the sharded kernel to call on arguments holding it: the header
        holds the shard member too (``step_sharded.shard_member``).  Where
        worker processes compile the members (``fastgrad._compile_worker``:
        a cold first call), that compiles the kernel here meanwhile, then
        fills the members in before it runs.  A complete header is kept (the
        kernels only read it): filling one took ~5 us of a small net's
        ~70 us step."""
        kernels, generation = self._kernels, _threads.pool_generation()
        kept = self._shard_header
        if kept is not None and kept[0] is kernels and kept[1] == generation:
            return kept[2], _as_is
        header = np.zeros(_layout.PLAN_HEADER, np.int64)
        pending = self._backend.fill_pass_team(header, kernels, self._model.dtype,
                                               team=False, defer=True, shards=True)
        if pending is None:
            self._shard_header = (kernels, generation, header)
            return header, _as_is

        def ready(kernel):
            def compile_then_run(*args):
                try:
                    kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
                finally:
                    pending.fill(header)        # waits for the worker, whatever happened
                self._shard_header = (kernels, generation, header)
                return kernel(*args)
            return compile_then_run
        return header, ready

    def _sharded_kernels(self):
        """The sharded step's kernels in the form for this model's size
        (``step_sharded.kernels_for``)."""
        return self._ksharded.kernels_for(self._model.params.size)

    def _shard_buffers_for(self, B):
        """Per-shard scratch of batch size B: (bounds, acts, zs, delta,
        shard_grads, losses), cached like the serial step's buffers."""
        key = ("shards", B)
        buf = self._buffers.get(key)
        if buf is not None:
            self._buffers.move_to_end(key)
            return buf
        self._evict(keep=self.max_cached_batch_sizes - 1)
        dt, widths = self._model.dtype, self._sizes[1:]
        bounds = _ksharded.shard_bounds(B, self._threads)
        T, rows = len(bounds) - 1, int(np.diff(bounds).max())
        acts = np.empty((T, rows * int(widths.sum())), dt)
        zs = np.empty_like(acts) if self._needs_z else acts
        delta = np.empty((T, 2 * rows * int(widths.max())), dt)
        shard_grads = np.empty((T - 1, self._model.params.size), dt)
        buf = self._buffers[key] = (bounds, acts, zs, delta, shard_grads, np.empty(T))
        return buf

    def _buffers_for(self, B):
        """``(acts, zs, delta, plan, fplan)`` of batch size B: the driver's
        buffers and step plan (see kernels/cpu/step.py), with the device's
        workspace where it has one; cached for the last
        ``max_cached_batch_sizes`` batch sizes."""
        buf = self._buffers.get(B)
        if buf is not None:
            self._buffers.move_to_end(B)
            return buf
        self._evict(keep=self.max_cached_batch_sizes - 1)
        xp, dt, widths = self._xp, self._model.dtype, self._sizes[1:]
        # z always kept and a third delta stride (a residual block's dz) for
        # epilogue pieces; their scratch lies in acts behind the outputs
        plan, fplan, acts = _layout.step_plan(
            self._sizes, B, self._model.params.size, self._drops, self._residual,
            self._norms, self._wn, dt, self._model._mask_seed, empty=xp.empty)
        zs = xp.empty(B * int(widths.sum()), dt) if self._needs_z or self._blocks else acts
        delta = xp.empty((3 if self._blocks else 2) * B * int(widths.max()), dt)
        buf = self._buffers[B] = (acts, zs, delta, plan, fplan)
        ws = self._backend.step_workspace(B, self._sizes, self._opt._offsets, self._loss_kind,
                                          dt, self._opt._records, plan=(plan, fplan))
        if ws is not None:
            self._workspaces[B] = ws
        return buf

    def _evict(self, keep):
        """Release the buffers (and CUDA workspaces, graphs, staging
        buffers) of the least recently used batch sizes beyond ``keep``."""
        while len(self._buffers) > max(keep, 0):
            B, _ = self._buffers.popitem(last=False)
            if isinstance(B, tuple):        # ("shards", B): host buffers only
                continue
            self._workspaces.pop(B, None)
            for key in [k for k in self._graphs if k[0] == B]:
                del self._graphs[key]
            for key in [k for k in self._staged if k[1][:1] == (B,)]:
                del self._staged[key]

    def _graph_for(self, B, rule, s0, s1, s2):
        """The graphed step of batch size B on the current buffers; a new
        one when anything frozen into a graph changed (clipping, rule,
        optimizer state buffers after a load; with epilogue pieces the mode
        and mask seed).  Sets this call's plan as :meth:`_driver_args`."""
        opt = self._opt
        if opt._seg_group is not None:
            # the graph replays a device table of single hp rows
            raise ValueError("cuda_graph=True needs an optimizer with one parameter group")
        model = self._model
        args, kw = self._driver_args(B, update=True)
        key = (B, int(rule), opt._clip_norm, opt._clip_value, id(s0), id(s1), id(s2))
        if self._blocks:
            # frozen in the graph's plan: the mode (dropout on or off, batch or
            # running statistics) and the mask seed (the layers' keys; the
            # dropout step is read from device memory); mode last
            key += (model._mask_seed, bool(model.training))
        g = self._graphs.get(key)
        if g is None:
            # a graph of this batch size frozen with other clipping, rule or
            # state buffers is not replayed again: dropped (one per value of
            # an adaptive clip_norm piled up); other modes are kept
            for stale in [k for k in self._graphs if k[0] == B and k[1:7] != key[1:7]]:
                del self._graphs[stale]
            g = self._graphs[key] = self._kernels.GraphedTrainStep(
                self._loss_kind, *args, rule, s0, s1, s2, self._layer_sq, opt._clip_norm,
                opt._clip_value, B, optim=opt._device_buffers(), counter=kw.get("counter"))
        return g

    def _labels(self, y, B, n_out, **kw):
        """``ops.as_labels``; labels out of range only where some are the
        loss's ``ignore_index`` (torch's default -100) raise _IgnoredRows:
        the compiled step's loss keeps every row, so such a batch takes the
        layer path, whose loss skips them as torch's."""
        try:
            return ops.as_labels(y, B, n_out, **kw)
        except ValueError:
            if self._ignores(y):
                raise _IgnoredRows from None
            raise

    def _ignores(self, Y):
        """Whether host labels ``Y`` hold the loss's ``ignore_index``."""
        host = np.asarray(Y) if _device.is_host_array(Y) else None
        return hasattr(self._loss_fn, "kept") and host is not None and \
            host.dtype.kind in "iuf" and not self._loss_fn.kept(host)[1].all()

    def _inputs(self, x, y):
        """``(x, labels, target)`` checked and on the model's device.

        On CUDA, host (NumPy) inputs are checked on the host and sent by an
        asynchronous copy through pinned memory into buffers this step
        keeps (``cupy.asarray`` would wait for the device: a sync per step);
        device arrays are used in place, and device labels are range-checked
        by the loss kernel, which makes the update skip and the optimizer
        raise ValueError when the step's record is read back.
        """
        model, n_out, be = self._model, self._n_out, self._backend
        if be.stages_inputs and be.needs_staging(x):
            x = self._stage("x", ops.as_array(x, "x", model.dtype, shape=(None, model.sizes[0])))
            if x.shape[0] == 0:
                raise ValueError("x: empty batch")
        else:
            x = model._input(x)
        B = x.shape[0]
        stage_y = be.stages_inputs and be.needs_staging(y)
        if self._loss_kind == _spec.CROSS_ENTROPY:
            if stage_y:
                return x, self._stage("labels", self._labels(y, B, n_out)), self._no_target
            return x, self._labels(y, B, n_out, xp=self._xp,
                                   check_range=not be.labels_checked_by_kernel), \
                self._no_target
        if stage_y:
            return x, self._no_labels, self._stage(
                "target", ops.as_array(y, "target", model.dtype, shape=(B, n_out)))
        return x, self._no_labels, ops.as_array(y, "target", model.dtype, shape=(B, n_out),
                                                xp=self._xp)

    def _stage(self, name, host):
        """Queue the copy of the host array ``host`` into this step's device
        buffer for it (no sync; the buffer is reused in stream order)."""
        key = (name, host.shape, host.dtype.str)
        dst = self._staged.get(key)
        if dst is None:
            # batch sizes that never get step buffers (batches with ignored
            # labels take the layer path) are not evicted with them: bounded
            # here, dropping the least recently made
            while len(self._staged) >= 4 * self.max_cached_batch_sizes:
                del self._staged[next(iter(self._staged))]
            dst = self._staged[key] = self._xp.empty(host.shape, host.dtype)
        return self._backend.upload(host, dst)

    def _result(self, loss):
        """The loss a call returns: a float on the CPU; on CUDA a 0-d float64
        CuPy array (reading it waits for the step, like ``loss.item()``)."""
        return self._backend.loss_result(loss)

    def _use_team(self, team):
        """Step on kernels whose driver has the host team's branches
        (``team``) or not: a copy without them compiles no pass team member
        (~0.7 s less on a cold first step), and the pool can be shared or
        given back between steps."""
        if team == self._team:
            return
        model = self._model
        self._kernels, self._ksharded = self._backend.step_kernels(
            self._codes, rules=(self._opt.rule,), losses=(self._loss_kind,),
            features=layer_features(model), team=team)
        self._team = team
        # the model's layer path (forward, backward, predict) runs the same
        # driver, whose helpers this step compiles
        model._step_driver = ((tuple(self._codes.tolist()), layer_features(model)),
                              self._kernels)

    def _driver_args(self, B, counter=None, update=False):
        """``(args, kwargs)`` of the driver: its arguments between the loss
        code and the optimizer's (``kernels/cpu/step.py``) on the buffers of
        batch size ``B``, their step plan set for this forward, and the
        keywords only the device's driver takes (CUDA: its workspace; for an
        update, ``commit`` and the device dropout step).

        In training mode the dropout counter advances as in
        ``model.forward`` (``counter``: the one to use instead, not
        advanced; an update that keeps the counter on the device leaves it
        to the device); eval mode drops nothing and batch norm uses its
        running statistics.  Raises before anything changes when the
        kernels do not serve a layer feature of the model."""
        m = self._model
        if B == 1:
            # before the buffers and the pass team: a refused first call
            # started a compile worker that nothing waited for (a zombie)
            _refuse_batch_of_one(m, 1, 1, 1, "use model.eval()")
        buf = self._buffers_for(B)
        # kept for the last buffers and kernels used: building the tuple is
        # ~1 us of a tiny net's ~20 us step
        cached = self._fixed_args
        if cached is None or cached[0] is not buf or cached[1] is not self._kernels or \
                cached[4] != (_threads.pool_generation(), self._opt._parallel_asked):
            if self._pending_members is not None:   # a call that never reached its driver
                self._fill_pending()
            self._use_team(self._backend.step_team())
            missing = layer_features(m) - set(self._kernels.SERVED_FEATURES)
            if missing:
                # the driver would run such a layer as a plain one
                raise ValueError(f"a layer feature not served by these kernels: "
                                 f"{sorted(missing)} (they serve "
                                 f"{list(self._kernels.SERVED_FEATURES)})")
            acts, zs, delta, plan, fplan = buf
            # the plan's team, and whether the update runs on it (not when
            # the user fixed opt.parallel = False)
            team_key = (_threads.pool_generation(), self._opt._parallel_asked)
            pending = self._backend.fill_pass_team(
                plan, self._kernels, m.dtype, update=self._opt._parallel_asked is not False,
                defer=True)
            if pending is not None:
                self._pending_members = (pending, plan)
            ws = self._workspaces.get(B)
            cached = self._fixed_args = (buf, self._kernels, (
                m.params, m.grads, self._sizes, self._codes, self._alphas, self._opt._offsets,
                acts, zs, delta, plan, fplan, m.running_mean, m.running_var),
                _NO_KEYWORDS if ws is None else {"ws": ws}, team_key)
        kw = cached[3]
        on_device = update and self._device_step is not None
        if self._blocks:
            plan, k = buf[3], _layout
            if m.training:
                if on_device:
                    plan[k.PLAN_COUNTER] = 0        # read from the device counter instead
                    kw = dict(kw, counter=self._dropout_on_device(), commit=True)
                else:
                    plan[k.PLAN_COUNTER] = m._next_dropout_step() if counter is None else counter
                plan[k.PLAN_TRAINING] = 1
            else:
                plan[k.PLAN_COUNTER] = plan[k.PLAN_TRAINING] = 0
            plan[k.PLAN_SEED] = m._mask_seed
        elif m.training and counter is None:
            m._next_dropout_step()
        return cached[2], kw

    def _ready(self, driver):
        """``driver``, to be called on :meth:`_driver_args`'s arguments.
        Where a worker process compiles the plan's pass team members
        (``fastgrad._compile_worker``: a cold first step), a function that
        compiles the driver for its arguments here meanwhile, then fills
        the members in before the driver runs."""
        if self._pending_members is None:
            return driver

        def compile_then_run(*args, **kw):
            driver.compile(tuple(driver.typeof_pyval(a) for a in args))
            self._fill_pending()
            return driver(*args, **kw)
        return compile_then_run

    def _fill_pending(self):
        pending, plan = self._pending_members
        pending.fill(plan)
        # not before: a wait cut short (Ctrl-C) leaves the fill to the next call
        self._pending_members = None

    def _dropout_on_device(self):
        """This step's device copy of ``model.dropout_step``, made the
        model's counter (its value sent up first when the host's rules:
        set by the user, a layer-path forward or another step)."""
        model, dev = self._model, self._device_step
        if model._dropout_on_device is not dev:
            self._backend.upload(np.array([model.dropout_step], np.int64), dev)
            model._dropout_on_device = dev
        return dev

    def _composed_step(self, x, y, update):
        # model.forward is the training forward in train mode (dropout, batch
        # statistics) and the eval forward in eval mode, as the fused step.
        model = self._model
        snap = model._step_snapshot()
        try:
            out = model.forward(x)
            loss, grad = self._loss_fn(out, model._xp.asarray(y))
            model.backward(grad, input_grad=False)
        except BaseException:
            # labels the loss refuses, found after the forward: the running
            # statistics and dropout counter as they were, as the fused step
            model._restore_snapshot(snap)
            raise
        if update:
            try:
                self.stats = self._opt.step()
            except NonFiniteGradientError:
                self._undo_forward(snap, skipped=True)
                raise
            self._undo_forward(snap)
        return self._result(loss)

    def _undo_forward(self, snap, skipped=None):
        """After a skipped update, undo what the forward changed besides the
        parameters (``model._step_snapshot``), as the backend can: on CUDA
        the skip decision is in device memory, the running statistics are
        restored by a device-side select on it (no host wait) and the
        dropout counter, on the host, keeps its advance."""
        self._backend.undo_skipped_forward(
            self._model, snap,
            (lambda: self.stats.skipped) if skipped is None else skipped, self._opt._records)

    def __call__(self, x, y):
        with self._opt._lock, interrupts.hold:   # a Ctrl-C lands after the book-keeping
            return self._step(x, y)

    def _step(self, x, y):
        if self._composed:
            return self._composed_step(x, y, True)
        model = self._model
        try:
            x, labels, target = self._inputs(x, y)
        except _IgnoredRows:
            return self._composed_step(x, y, True)
        B = x.shape[0]
        rule, s0, s1, s2, hp = self._opt._kernel_args()
        # Where the skip decision is known when the kernel returns: undo
        # what the forward changed outside the parameters on the host.
        snap = model._step_snapshot() if self._backend.skip_known_on_host else None
        if self.threads is not None:
            if model.training:
                model._next_dropout_step()
            bounds, acts, zs, delta, shard_grads, losses = self._shard_buffers_for(B)
            header, ready = self._shard_plan_header()
            with _threads.sharded_step_blas():
                loss, norm, scale, skipped = ready(self._sharded_kernels().train_step)(
                    x, labels, target, self._loss_kind, model.params, model.grads,
                    shard_grads, self._sizes, self._codes, self._alphas, self._opt._offsets,
                    acts, zs, delta, bounds, losses, header,
                    rule, s0, s1, s2, hp, self._layer_sq, self._opt._clip_norm,
                    self._opt._clip_value)
        elif self.cuda_graph:
            loss, norm, scale, skipped = self._graph_for(B, rule, s0, s1, s2)(
                x, labels, target, hp)
        else:
            args, kw = self._driver_args(B, update=True)
            driver = self._kernels.train_step
            if self._pending_members is not None:
                driver = self._ready(driver)
            loss, norm, scale, skipped = driver(
                x, labels, target, self._loss_kind, *args,
                rule, s0, s1, s2, hp, self._layer_sq, self._opt._clip_norm, self._opt._clip_value,
                **kw)
        if snap is not None and skipped:
            model._restore_snapshot(snap)
        self.stats = self._opt._commit(norm, scale, skipped, self._layer_sq,
                                      with_loss=self._backend.loss_in_record)
        return self._backend.loss_result(loss)        # (self._result, a call less)

    def gradients(self, x, y):
        """Forward + loss + backward only (no update): fills ``model.grads``
        and returns the loss.  Useful for checks and data-parallel training."""
        with self._opt._lock:
            return self._gradients(x, y)

    def _gradients(self, x, y, ignored_rows=True):
        if self._composed:
            return self._composed_step(x, y, False)
        try:
            x, labels, target = self._inputs(x, y)
        except _IgnoredRows:
            if not ignored_rows:
                # a data-parallel rank: its mean over the kept rows does not
                # weigh by its share of the batch (fastgrad.distributed)
                raise ValueError(f"labels equal to ignore_index="
                                 f"{self._loss_fn.ignore_index}: data-parallel training "
                                 "weighs each rank by its rows and cannot skip rows") from None
            return self._composed_step(x, y, False)
        if self.threads is not None:
            m = self._model
            if m.training:
                m._next_dropout_step()
            bounds, acts, zs, delta, shard_grads, losses = self._shard_buffers_for(x.shape[0])
            header, ready = self._shard_plan_header()
            with _threads.sharded_step_blas():
                return float(ready(self._sharded_kernels().forward_backward)(
                    x, labels, target, self._loss_kind, m.params, m.grads, shard_grads,
                    self._sizes, self._codes, self._alphas, self._opt._offsets, acts, zs, delta,
                    bounds, losses, header))
        args, kw = self._driver_args(x.shape[0])
        return self._result(self._ready(self._kernels.forward_backward)(
            x, labels, target, self._loss_kind, *args, **kw))

    # -- whole epochs -----------------------------------------------------------
    #: Seconds of training between two returns to Python in :meth:`run_epoch`
    #: (and so between two progress callbacks).
    progress_interval = 0.1

    #: False makes :func:`fit` run its per-step loop even where
    #: :meth:`run_epoch`'s compiled epoch applies.
    fused_epochs = True

    @property
    def _fused_epoch(self):
        """True when an epoch runs as compiled chunks (CPU models with a
        default loss, the sharded ``threads=n`` step included); other steps
        run a Python loop over ``step(x, y)``."""
        return self._backend.compiled_epochs and not self._composed

    def run_epoch(self, X, Y, batch_size, shuffle=True, seed=None, drop_last=False,
                  callback=None):
        """Train one epoch over ``X, Y``: every mini-batch step in compiled code.

        On the CPU, for every model with a default loss (epilogue pieces
        included: dropout, residual blocks, normalisation, weight
        normalisation), the epoch runs in compiled chunks of steps: each chunk gathers its
        batches into one reused buffer, runs every step (forward, loss,
        backward, norm, clip, skip, update) and records its statistics
        without returning to Python; it returns about every
        ``progress_interval`` seconds (0.1), sized by the measured step time,
        to call ``callback``.  The parameters are bitwise those of calling
        ``step(x, y)`` on the same batches in the same order, and the
        optimizer's counters (``step_count``, ``n_skipped``), the learning
        rate schedule, bias corrections, ``model.dropout_step`` (so the
        dropout masks) and batch norm's running statistics advance exactly
        as they would: the hyper-parameters of every update count
        the chunk can reach are computed on the host before the chunk, and
        the kernel picks the row of its current count, so a skipped step
        (non-finite gradient) leaves the next step the same row.

        The sharded ``threads=n`` step runs its epoch in compiled chunks
        too, each step on the shards' threads.  Losses with options and
        CUDA models run the same API as a Python loop over ``step(x, y)``
        (the same results; CUDA statistics are read back when the callback
        or the end needs them).

        Parameters
        ----------
        X : (n, n_in) array
        Y : labels (n,) for softmax cross-entropy, else targets (n, n_out)
        batch_size : int
            Samples per step; the last batch is smaller unless ``drop_last``.
        shuffle : bool or 1-D integer array
            True: a random permutation of the samples drawn from ``seed``;
            False: the samples in order; an integer array: these sample
            indices in this order (any length, repeats allowed; ``seed`` is
            not used).
        seed : None, int or numpy.random.Generator
            Source of the permutation: ``np.random.default_rng(seed).
            permutation(n)``, so an int gives the same order every call and
            a Generator a new one per call (reproducible from its seed);
            None draws fresh entropy.
        drop_last : bool
            Leave out the last batch when it is smaller than ``batch_size``.
        callback : callable ``f(done, total, results)`` or None
            Called after each chunk (about every ``progress_interval`` s) and
            after the last step: ``done`` steps of ``total`` have run and
            ``results`` holds the arrays below, cut to ``done`` steps.

        Returns
        -------
        dict of per-step arrays: ``loss`` (float64, the batch's mean loss
        before the update), ``grad_norm``, ``clip_scale`` (float64),
        ``clipped``, ``skipped`` (bool), ``step`` (int64, updates applied
        so far as in ``StepStats.step``), ``lr`` (float64) and
        ``layer_norms`` (float64, steps x layers).  ``step.stats`` holds the
        last step's StepStats.

        Raises
        ------
        TypeError, ValueError
            Bad shapes, dtypes, ``batch_size``, ``shuffle`` indices, labels
            out of range, or a batch of 1 sample for batch norm in training
            mode, before any step runs.
        NonFiniteGradientError
            With ``skip_nonfinite=False``, at the first non-finite gradient
            (the steps before it are applied, as in a per-step loop).
        """
        batch_size = _positive_int("batch_size", batch_size)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
        with self._opt._lock:
            X, Y, labels, target = self._epoch_inputs(X, Y)
            order = _epoch_order(len(X), shuffle, seed)
            return self._epoch(X, Y, labels, target, order, batch_size, bool(drop_last), callback)

    def _epoch_inputs(self, X, Y):
        """``(X, Y, labels, target)`` of a whole dataset, checked once.

        For the compiled epoch ``labels`` (int64, range-checked) or
        ``target`` (model dtype, ``(n, n_out)``) is the loss's input and the
        other a placeholder; the other paths check host labels here too, so
        that a bad label raises before the first step.  ``labels`` is None
        where some are the loss's ``ignore_index``: the compiled epoch keeps
        every row, so that epoch runs step by step."""
        model, n_out = self._model, int(self._sizes[-1])
        on_device = self._backend.holds(X, "X")
        xp = model._xp if on_device else np
        X = ops.as_array(X, "X", model.dtype, shape=(None, model.sizes[0]), xp=xp)
        n = X.shape[0]
        if n == 0:
            raise ValueError("X: empty dataset")
        if on_device:
            Y = self._backend.gatherable(xp.asarray(Y), model.dtype)
        elif not _device.is_host_array(Y):
            raise TypeError("Y is a CUDA array but X is on the host")
        else:
            Y = np.asarray(Y)
        if Y.ndim == 0 or len(Y) != n:
            raise ValueError(f"X has {n} samples but Y has shape {tuple(Y.shape)}")
        labels, target = self._no_labels, self._no_target
        if on_device:
            return X, Y, labels, target       # checked per batch by step(x, y)
        if self._loss_kind == _spec.CROSS_ENTROPY:
            try:
                labels = ops.as_labels(Y, n, n_out)
            except ValueError:
                if not self._ignores(Y):
                    raise
                # rows of ignore_index: the epoch runs step by step (each
                # batch with such rows on the layer path); the rest checked
                ops.check_class_range(Y, n_out, self._loss_fn.ignore_index)
                return X, Y, None, target
        else:
            target = ops.as_array(Y, "target", model.dtype, shape=(n, n_out))
        return X, Y, labels, target

    def _hp_rows(self, n):
        """The optimizer's hyper-parameter rows of the next ``n`` update
        counts (from ``step_count`` on) and their learning rates."""
        opt = self._opt
        k0 = opt._step_count
        rows = getattr(self, "_rows", None)
        if rows is None or rows.shape[0] < n or rows.shape[1:] != opt._hp.shape:
            rows = self._rows = np.zeros((max(n, 16),) + opt._hp.shape, np.float64)
            self._row_lr = np.zeros(rows.shape[0])
        opt._fill_updates(rows[:n], self._row_lr[:n], k0)
        return rows, self._row_lr

    def _epoch(self, X, Y, labels, target, order, batch_size, drop_last, callback):
        n_order = order.shape[0]
        n_steps = n_order // batch_size if drop_last else -(-n_order // batch_size)
        L = len(self._model.layers)
        res = {"loss": np.zeros(n_steps), "grad_norm": np.zeros(n_steps),
               "clip_scale": np.zeros(n_steps), "clipped": np.zeros(n_steps, bool),
               "skipped": np.zeros(n_steps, bool), "step": np.zeros(n_steps, np.int64),
               "lr": np.zeros(n_steps), "layer_norms": np.zeros((n_steps, L))}
        if n_steps == 0:
            return res
        _refuse_batch_of_one(self._model, n_order, batch_size, n_steps,
                             "use model.eval() or drop_last=True")
        if self._fused_epoch and labels is not None:
            self._compiled_epoch(X, labels, target, order, batch_size, n_steps, res, callback)
        else:
            self._looped_epoch(X, Y, order, batch_size, n_steps, res, callback)
        return res

    def _chunk_kernel(self, B, n_order, batch_size, n_steps):
        """``(kernel, model arguments)`` of the compiled epoch: the
        arguments of ``train_steps`` between the loss code and the
        optimizer's (the step plan's dropout counter: the first step's);
        for the sharded step, ``sharded_train_steps_*`` and its own."""
        model = self._model
        if self.threads is not None:
            # the shards of a full batch and of a smaller last one
            bounds, acts, zs, delta, shard_grads, losses = self._shard_buffers_for(B)
            last = _ksharded.shard_bounds(min(B, n_order - (n_steps - 1) * batch_size),
                                          self._threads)
            header, ready = self._shard_plan_header()
            return self._ksharded.epoch_call(ready(self._sharded_kernels().train_steps)), (
                model.params, model.grads, shard_grads, self._sizes, self._codes, self._alphas,
                self._opt._offsets, acts, zs, delta, bounds, last, losses, header)
        args = self._driver_args(B, counter=model.dropout_step)[0]   # may change the kernels
        return self._ready(self._kernels.train_steps), args

    def _compiled_epoch(self, X, labels, target, order, batch_size, n_steps, res, callback):
        model, opt = self._model, self._opt
        B = min(batch_size, order.shape[0])
        self._chunk_kernel(B, order.shape[0], batch_size, n_steps)   # checks, buffers
        xbuf = np.empty((B, X.shape[1]), X.dtype)
        lbuf = np.empty(B if labels.shape[0] else 0, np.int64)
        tbuf = np.empty((B, target.shape[1]) if target.shape[0] else (0, 0), target.dtype)
        layer_sq = np.zeros((n_steps, len(model.layers)))
        # The kernel only reads these: read-only views, so that one compiled
        # signature serves writable and read-only datasets (np.load with
        # mmap_mode="r", broadcast arrays) alike.
        X, labels, target, order = (_read_only(a) for a in (X, labels, target, order))
        pos, chunk = 0, 1      # the first chunk is one step: it may compile
        while pos < n_steps:
            size = min(chunk, n_steps - pos)
            t = time.perf_counter()
            rule, s0, s1, s2, _ = opt._kernel_args()
            k0 = opt._step_count
            rows, row_lr = self._hp_rows(size)
            kernel, model_args = self._chunk_kernel(B, order.shape[0], batch_size, n_steps)
            # a Ctrl-C lands after the chunk's book-keeping; the sharded
            # step's threads own the cores (BLAS on one thread)
            blas = (_threads.sharded_step_blas() if self.threads is not None
                    else contextlib.nullcontext())
            with interrupts.hold, blas:
                ran = kernel(
                    X, labels, target, order, pos, size, batch_size, order.shape[0],
                    xbuf, lbuf, tbuf, self._loss_kind, *model_args,
                    rule, s0, s1, s2, rows, self._layer_sq, opt._clip_norm, opt._clip_value,
                    not opt.skip_nonfinite, res["loss"][pos:], res["grad_norm"][pos:],
                    res["clip_scale"][pos:], res["skipped"][pos:], layer_sq[pos:])
                end = pos + ran
                # The optimizer's book-keeping, as _commit would have done step by step.
                skipped = res["skipped"][pos:end]
                applied = ~skipped
                before = np.cumsum(applied) - applied     # updates applied before each step
                res["step"][pos:end] = k0 + before + applied
                res["lr"][pos:end] = row_lr[before]
                res["clipped"][pos:end] = applied & (res["clip_scale"][pos:end] < 1.0)
                res["layer_norms"][pos:end] = np.sqrt(layer_sq[pos:end])
                n_applied = int(applied.sum())
                opt._step_count += n_applied
                opt._n_skipped += ran - n_applied
                opt.n_calls += ran
                if model.training:
                    model.dropout_step += n_applied
                last = end - 1
                opt._lr_now = float(res["lr"][last])
                opt.last_stats = _stats_of(res, last)
                # As a per-step loop: the steps before a failing one were
                # applied (and reported), then the failing one raises
                # (leaving step.stats at the step before it).
                failed = bool(skipped.size and skipped[-1]) and not opt.skip_nonfinite
                if not failed:
                    self.stats = opt.last_stats
                elif last > 0:
                    self.stats = _stats_of(res, last - 1)
            if failed:
                if callback is not None and last > pos:
                    callback(last, n_steps, {key: val[:last] for key, val in res.items()})
                raise NonFiniteGradientError(
                    f"non-finite gradient norm {res['grad_norm'][last]} at update "
                    f"{opt._step_count}; parameters and optimizer state were left unchanged")
            pos = end
            if callback is not None:
                callback(pos, n_steps, {key: val[:pos] for key, val in res.items()})
            # Size the next chunk to take about progress_interval seconds
            # (at most 16 times the last one: a fluke of the clock cannot
            # make the progress freeze).
            spent = max(time.perf_counter() - t, 1e-9)
            chunk = int(min(max(1, self.progress_interval * ran / spent), 16 * ran))

    def _looped_epoch(self, X, Y, order, batch_size, n_steps, res, callback):
        """The epoch as a Python loop over ``step(x, y)`` (losses with
        options, CUDA)."""
        be = self._backend
        on_device = be.holds(X, "X")
        xp = be.xp if on_device else np
        n_order = order.shape[0]
        B = min(batch_size, n_order)
        xbuf = xp.empty((B,) + X.shape[1:], X.dtype)
        ybuf = xp.empty((B,) + Y.shape[1:], Y.dtype)
        ibuf = xp.empty(B, np.int64) if on_device else None
        done, filled = [], 0
        t = time.perf_counter()

        def fill(upto):
            for j in range(filled, upto):
                loss, st = done[j]
                res["loss"][j] = _host_loss(loss, st)
                res["grad_norm"][j], res["clip_scale"][j] = st.grad_norm, st.clip_scale
                res["clipped"][j], res["skipped"][j] = st.clipped, st.skipped
                res["step"][j], res["lr"][j] = st.step, st.lr
                res["layer_norms"][j] = st.layer_norms
            return upto

        for b in range(n_steps):
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb, yb = xbuf[:len(idx)], ybuf[:len(idx)]
            _gather_batch(be, X, Y, np.ascontiguousarray(idx, np.int64), xb, yb, ibuf)
            done.append((self._step(xb, yb), self.stats))
            if callback is not None and (b + 1 == n_steps
                                         or time.perf_counter() - t >= self.progress_interval):
                filled = fill(b + 1)
                callback(b + 1, n_steps, {key: val[:b + 1] for key, val in res.items()})
                t = time.perf_counter()
        fill(n_steps)


def _as_is(kernel):
    return kernel


def _rebuilt_step(model, loss_fn, opt, cuda_graph, threads, fused_epochs, progress_interval):
    step = TrainStep(model, loss_fn, opt, cuda_graph=cuda_graph, threads=threads)
    step.fused_epochs, step.progress_interval = fused_epochs, progress_interval
    return step


def _refuse_batch_of_one(model, n_order, batch_size, n_steps, hint, world=1):
    """Before the first step: a batch of 1 sample (the last one, say; with
    ``world`` data-parallel ranks, a rank's share of one) that batch norm in
    training mode cannot take, refused as the step would."""
    if not (model.training and model._has_batch_norm):
        return
    last = n_order - (n_steps - 1) * batch_size
    for size in {min(batch_size, n_order), last}:
        shares = [size * (r + 1) // world - size * r // world for r in range(world)]
        if 1 not in shares:
            continue
        if world == 1:
            raise ValueError("batch norm in training mode needs more than 1 sample per "
                             f"batch (got a batch of 1), as in PyTorch; {hint}")
        raise ValueError(f"batch norm in training mode needs more than 1 sample per batch: "
                         f"a global batch of {size} samples over {world} ranks gives rank "
                         f"{shares.index(1)} 1 sample (of {n_order}); {hint}")


def _read_only(a):
    view = a.view()
    view.flags.writeable = False
    return view


def _positive_int(name, val):
    if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
        raise ValueError(f"{name} must be a positive integer, got {val!r}")
    return int(val)


def _epoch_order(n, shuffle, seed):
    """The sample order of an epoch (see ``TrainStep.run_epoch``): int64."""
    if isinstance(shuffle, (bool, np.bool_)):
        if not shuffle:
            return np.arange(n, dtype=np.int64)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return rng.permutation(n).astype(np.int64, copy=False)
    order = np.asarray(shuffle)
    if order.dtype.kind not in "iu" or order.ndim != 1:
        raise TypeError(f"shuffle must be a bool or a 1-D integer array of sample indices, "
                        f"got {order.dtype} of shape {order.shape}")
    if order.size == 0:
        raise ValueError("shuffle: empty sample order")
    lo, hi = int(order.min()), int(order.max())
    if lo < 0 or hi >= n:
        raise ValueError(f"shuffle: sample indices must lie in [0, {n}), got min {lo}, max {hi}")
    return np.ascontiguousarray(order, dtype=np.int64)


def _stats_of(res, j):
    """StepStats of step ``j`` of ``run_epoch``'s results."""
    return StepStats(step=res["step"][j], lr=res["lr"][j], grad_norm=res["grad_norm"][j],
                     clip_scale=res["clip_scale"][j], clipped=res["clipped"][j],
                     skipped=res["skipped"][j], layer_norms=res["layer_norms"][j])


def _host_loss(loss, stats):
    """A step's loss as a float: from its record when the stats carry it
    (a CUDA TrainStep's, already on the host once read), else ``float(loss)``."""
    stats._get()                     # fills a pending record
    return stats._loss if stats._loss is not None else float(loss)


def _newest_ready(done, look_back=20):
    """The newest (loss, stats) among the last steps whose record is on the
    host without waiting (always the last on the CPU); None if none is."""
    for loss, st in reversed(done[-look_back:]):
        if st.ready:
            return loss, st
    return None


COMPILE_MESSAGE = "compiling kernels for this model (first run only)"


class CompileNotice(_numba_event.Listener):
    """Tell the user when Numba compiles for more than ``after`` seconds.

    A context manager: while it is open, a daemon thread watches Numba's
    ``numba:compile`` events (``numba.core.event``), and once one compile
    (with the compiles it sets off) has run for ``after`` seconds it calls
    ``show(COMPILE_MESSAGE)``; when that compile ends it calls ``done()``
    (if given).  Kernels loaded from the on-disk cache raise no compile
    event, so a warm cache shows nothing.  ``fit`` uses it for its progress
    bar; ``fastgrad demo`` prints the line.

    Parameters
    ----------
    show : callable ``show(message)``, called from the watching thread
    done : callable or None, called (from that thread) when the compile ends
    after : seconds of compiling before ``show`` is called
    once : call ``show`` for the first long compile only (a printed line)
    """

    poll = 0.05          # seconds between two looks of the watching thread

    def __init__(self, show, done=None, after=1.0, once=False):
        self._show, self._done, self._after = show, done, float(after)
        self._once = bool(once)
        self._depth, self._since = 0, 0.0
        self._stop = threading.Event()
        self._thread = None
        self.shown = False          # True once show was called

    # numba.core.event.Listener: called by the compiling thread
    def on_start(self, event):
        if self._depth == 0:
            self._since = time.perf_counter()
        self._depth += 1

    def on_end(self, event):
        self._depth = max(self._depth - 1, 0)

    def _watch(self):
        showing = False
        while not self._stop.wait(self.poll):
            compiling = self._depth > 0
            if (compiling and not showing and not (self._once and self.shown)
                    and time.perf_counter() - self._since >= self._after):
                showing = self.shown = True
                self._show(COMPILE_MESSAGE)
            elif showing and not compiling:
                showing = False
                if self._done is not None:
                    self._done()
        if showing and self._done is not None:
            self._done()

    def __enter__(self):
        _numba_event.register("numba:compile", self)
        self._thread = threading.Thread(target=self._watch, name="fastgrad-compile-notice",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        _numba_event.unregister("numba:compile", self)
        self._stop.set()
        self._thread.join()
        return False


def _unpause(bar):
    """Restart the bar's clock (tqdm's ``unpause``): the time so far, the
    first step's compile, leaves its rate and ETA.  A bar-like object
    without ``unpause`` is left alone."""
    unpause = getattr(bar, "unpause", None)
    if unpause is not None:
        unpause()


def _bar_notice(bar, desc):
    """A CompileNotice that shows in ``bar`` (tqdm) or, without a bar, as a
    line on stderr."""
    if bar is None:
        return CompileNotice(lambda msg: print(f"fastgrad: {msg}", file=sys.stderr, flush=True),
                             once=True)

    def show(msg):
        if hasattr(bar, "set_description_str"):
            bar.set_description_str(msg, refresh=True)

    def done():
        if hasattr(bar, "set_description_str"):
            bar.set_description_str(desc, refresh=True)
    return CompileNotice(show, done)


def _progress_bar(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


def _gather_batch(be, X, Y, idx, xb, yb, ibuf):
    """Rows ``idx`` (host int64) of X and Y into ``xb``, ``yb``: with NumPy
    for a host dataset (``ibuf`` None), else on the device, the indices
    going up asynchronously through ``ibuf``."""
    if ibuf is None:
        np.take(X, idx, axis=0, out=xb)
        np.take(Y, idx, axis=0, out=yb)
        return
    idx = be.upload(idx, ibuf[:len(idx)])
    be.gather_rows(X, idx, xb)
    be.gather_rows(Y, idx, yb)


def evaluate(model, loss_fn, X, Y, batch_size=1024):
    """Mean loss (and accuracy for softmax cross-entropy) of ``model`` on X, Y.

    X and Y may live on the host for a CUDA model: each batch is copied once.
    The loss is the mean over the whole set, whatever the batch size: each
    batch weighs by what its mean divides by (``loss_fn.divisor``: its
    elements for MSE and BCE; for cross-entropy its samples, or the labels
    other than ``ignore_index``, or their class weights, as torch's mean),
    and a loss with
    ``reduction="sum"`` gives the same mean.  The accuracy counts the
    labels other than ``ignore_index``.
    """
    batch_size = _positive_int("batch_size", batch_size)
    n = len(X)
    if n == 0 or len(Y) != n:
        raise ValueError(f"evaluate: X and Y need the same number of samples, at least one; "
                         f"got {n} and {len(Y)}")
    summed = getattr(loss_fn, "reduction", "mean") == "sum"
    classify = getattr(loss_fn, "name", None) == "softmax_cross_entropy"
    xp, be = model._xp, model.backend
    total, weight, correct, counted = 0.0, 0.0, 0, 0
    for lo in range(0, n, batch_size):
        out = model.predict(X[lo:lo + batch_size])
        target = xp.asarray(Y[lo:lo + batch_size])
        loss, _ = loss_fn(out, target)
        if classify:        # a small host read: the batch's outputs and labels
            labels, kept = loss_fn.kept(be.to_host(target))
            w = loss_fn.divisor(labels)
            correct += int((be.to_host(out).argmax(axis=1) == labels)[kept].sum())
            counted += int(kept.sum())
        else:
            w = loss_fn.divisor(target)     # its elements: MSE's, BCE's mean
        if w > 0:           # a batch of ignored labels only: its mean is NaN, its weight 0
            total += loss if summed else loss * w
            weight += w
    result = {"loss": total / weight if weight > 0 else float("nan")}
    if classify:
        result["accuracy"] = correct / counted if counted else float("nan")
    return result


def _checked_validation(step, data):
    """``(X_val, Y_val)`` checked as the training data is, before any
    training: a mistake there was found after the first epoch had trained."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError("validation_data must be a pair (X_val, Y_val), got "
                         f"{type(data).__name__}"
                         + (f" of {len(data)}" if isinstance(data, (tuple, list)) else ""))
    model = step.model
    be = model.backend
    xp = be.xp if be.holds(data[0], "validation_data X") else np
    X = ops.as_array(data[0], "validation_data X", model.dtype,
                     shape=(None, model.sizes[0]), xp=xp)
    n_out = int(model.sizes[-1])
    if getattr(step.loss_fn, "name", None) == "softmax_cross_entropy":
        Y = ops.as_labels(data[1], len(X), n_out, xp=xp, check_range=False)
        ops.check_class_range(be.to_host(Y) if xp is not np else Y, n_out,
                              getattr(step.loss_fn, "ignore_index", -100), "validation_data Y")
    else:
        Y = ops.as_array(data[1], "validation_data Y", model.dtype, shape=(len(X), n_out),
                         xp=xp)
    if len(X) == 0:
        raise ValueError("validation_data: empty X_val")
    return X, Y


def _split_validation(X, Y, fraction, validation_data):
    """Keras's ``validation_split``: the last samples, before shuffling."""
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_split must be a number in [0, 1), got {fraction!r}")
    if fraction == 0.0 or validation_data is not None:
        return X, Y, validation_data
    n = len(X)
    split_at = math.floor(n * (1.0 - fraction))
    if split_at in (0, n):
        raise ValueError(f"validation_split={fraction} of {n} samples leaves "
                         f"{'no training' if split_at == 0 else 'no validation'} samples")
    return X[:split_at], Y[:split_at], (X[split_at:], Y[split_at:])


def fit(step, X, Y, epochs=1, batch_size=32, shuffle=True, seed=0, progress=True,
        validation_data=None, callbacks=None, initial_epoch=0, validation_split=0.0):
    """Train with mini-batches, Keras style; returns the history.

    The model trains in the mode it is in, as a torch loop's: a model left
    in eval mode (``model.eval()``) trains without dropout and with batch
    norm on its running statistics; call ``model.train()`` first.

    Parameters
    ----------
    step : TrainStep
    X, Y : training inputs and targets (labels for softmax cross-entropy);
        NumPy arrays, or for a CUDA model CuPy arrays (the dataset stays on
        the GPU and each batch is gathered there)
    epochs, batch_size : int
    shuffle : reshuffle the sample order every epoch (a seeded permutation;
        batches are gathered into one reused buffer, the dataset is never
        copied per epoch)
    seed : seed of the shuffling
    progress : show a tqdm bar (loss, grad norm, steps/s) when tqdm is installed
    validation_data : optional (X_val, Y_val), evaluated after every epoch
        (in eval mode: no dropout, batch norm on its running statistics);
        ``val_loss`` (and ``val_accuracy``) then show in the progress bar
    callbacks : an iterable (None: none) of per-step callables
        ``f(step_index, loss, stats)`` run after
        every step (e.g. ``fastgrad.health.GradientMonitor.record``-style
        hooks), and epoch callbacks (objects with ``on_epoch_end``, see
        :mod:`fastgrad.callbacks`): ``EarlyStopping`` (on a validation
        metric, restoring the best weights), ``ModelCheckpoint`` (through
        ``fastgrad.save`` every N epochs), ``ReduceLROnPlateau``
    initial_epoch : the epoch to start from, as Keras's: epochs
        ``initial_epoch .. epochs - 1`` run, numbered so in callbacks (the
        per-step index counts from the first of them), and the shuffle
        continues as it would have.  A run resumed from a checkpoint saved
        after epoch ``e - 1`` (``fastgrad.save``/``load`` of the model and
        optimizer) with ``initial_epoch=e`` and the same seed trains on as
        the uninterrupted run.  Epoch callbacks start afresh, as Keras's:
        ``EarlyStopping`` counts its patience and best value from the
        resumed epoch (a plateau schedule's counters are the optimizer's and
        resume with it).
    validation_split : as Keras's: the fraction in [0, 1) of the samples,
        the last ones before any shuffling, held out as ``validation_data``
        (``floor(n * (1 - validation_split))`` train); ignored when
        ``validation_data`` is given

    Notes
    -----
    On the CPU, models with a default loss train each epoch with
    :meth:`TrainStep.run_epoch` (compiled chunks of about
    0.1 s; the same parameters and history as the per-step loop).  The
    per-step callbacks are then called after each chunk, for each of its
    steps in order, with the same ``(step_index, loss, stats)``; a callback
    that changes the optimizer or model takes effect from the next chunk
    rather than the next step, and one that reads them (a save) sees them
    at the chunk's end.  ``step.fused_epochs = False`` runs the per-step
    loop instead (a save at a given step; or save at an epoch's end with
    ``ModelCheckpoint``).  Labels and targets are checked for the whole
    dataset before the first step.

    With ``progress``, a compile that runs for more than a second (a cold
    Numba cache) shows "compiling kernels for this model (first run only)"
    in the bar (or on stderr without tqdm), and the bar's rate and ETA
    leave out the first step.

    Returns
    -------
    dict of per-epoch lists: ``loss`` (the epoch's mean loss, as
    :func:`evaluate` counts it: each batch weighed by its size, or by its
    kept labels' count or class weight for cross-entropy with those options),
    ``grad_norm_mean``, ``grad_norm_max``, ``clipped``, ``skipped``, and
    ``val_loss`` / ``val_accuracy`` with validation data: one entry per
    epoch run (``epochs - initial_epoch``, fewer after an early stop).
    """
    model = step.model
    for name, val in (("epochs", epochs), ("batch_size", batch_size)):
        _positive_int(name, val)
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer)) \
            or not 0 <= initial_epoch <= epochs:
        raise ValueError(f"initial_epoch must be an integer in [0, epochs={epochs}], got "
                         f"{initial_epoch!r}")
    # read once: an iterator's second pass would find no epoch callbacks
    callbacks = [] if callbacks is None else list(callbacks)
    for cb in callbacks:
        if not (callable(cb) or hasattr(cb, "on_epoch_end")):
            raise TypeError(f"callbacks: {cb!r} is neither a per-step callable nor an epoch "
                            "callback (an object with on_epoch_end)")
    # A dataset already on the GPU stays there: batches are gathered on the
    # device (the batch's indices go up by an asynchronous pinned copy).
    be = model.backend
    on_device = be.holds(X, "X")
    xp = be.xp if on_device else np
    X = ops.as_array(X, "X", model.dtype, shape=(None, model.sizes[0]), xp=xp)
    Y = be.gatherable(xp.asarray(Y), model.dtype) if on_device else np.asarray(Y)
    if len(Y) != len(X):
        raise ValueError(f"X has {len(X)} samples but Y has {len(Y)}")
    if len(X) == 0:
        raise ValueError("fit: X has no samples")
    X, Y, validation_data = _split_validation(X, Y, validation_split, validation_data)
    # CPU models (with a default loss) run each epoch as compiled chunks of steps
    # (TrainStep.run_epoch): the dataset is checked once, here.
    # Only a TrainStep itself: fit also drives duck-typed steps (a
    # data-parallel rank's, which must all-reduce every step's gradient).
    # Every path checks the whole dataset here, before the first step: a bad
    # label in the last batch raised after the others had trained.
    fused = isinstance(step, TrainStep) and step._fused_epoch and step.fused_epochs
    if hasattr(step, "_epoch_inputs"):
        X, Y, labels, target = step._epoch_inputs(X, Y)
        fused = fused and labels is not None    # None: rows of ignore_index, step by step
    n = len(X)
    rng = np.random.default_rng(seed)
    order = np.arange(n, dtype=np.int64)
    n_batches = -(-n // batch_size)
    if isinstance(step, TrainStep):
        _refuse_batch_of_one(model, n, batch_size, n_batches, "use model.eval() or "
                             "another batch_size")
    total = (epochs - initial_epoch) * n_batches
    k0 = initial_epoch * n_batches          # the per-step index of the first step
    if not fused:
        xbuf = xp.empty((min(batch_size, n),) + X.shape[1:], X.dtype)
        ybuf = xp.empty((min(batch_size, n),) + Y.shape[1:], Y.dtype)
    ibuf = xp.empty(min(batch_size, n), np.int64) if on_device else None
    # The epoch's loss as evaluate's: each batch weighs by its loss's divisor
    # (its size; the kept labels' count or weight for cross-entropy with
    # options), so a smaller last batch is not overweighted.
    loss_fn = step.loss_fn
    summed = getattr(loss_fn, "reduction", "mean") == "sum"
    by_label = getattr(loss_fn, "name", None) == "softmax_cross_entropy"
    host_Y = be.to_host(Y) if by_label and on_device else Y
    by_label = by_label and ("weight" in loss_fn.options
                             or not loss_fn.kept(host_Y)[1].all())

    # an elementwise loss's mean divides by the batch's elements
    per_row = 1 if getattr(loss_fn, "name", None) == "softmax_cross_entropy" \
        else int(np.prod(Y.shape[1:]))

    def per_sample(losses):
        losses = np.asarray(losses, np.float64)
        starts = range(0, n, batch_size)
        w = np.asarray([loss_fn.divisor(host_Y[order[lo:lo + batch_size]]) if by_label
                        else min(batch_size, n - lo) * per_row for lo in starts], np.float64)
        kept = w > 0        # a batch of ignored labels only: NaN mean, no weight
        if not kept.any():
            return float("nan")
        return float((losses[kept].sum() if summed else losses[kept] @ w[kept]) / w.sum())

    history = {"loss": [], "grad_norm_mean": [], "grad_norm_max": [], "clipped": [], "skipped": []}
    if validation_data is not None:
        validation_data = _checked_validation(step, validation_data)
        history["val_loss"] = []
        if getattr(step.loss_fn, "name", None) == "softmax_cross_entropy":
            history["val_accuracy"] = []
    step_hooks = [cb for cb in callbacks if not hasattr(cb, "on_epoch_end")]
    epoch_hooks = [cb for cb in callbacks if hasattr(cb, "on_epoch_end")]
    for cb in epoch_hooks:
        if hasattr(cb, "on_train_begin"):
            cb.on_train_begin(step, history)
    bar = _progress_bar(total, progress, "fit")
    t0, k = time.perf_counter(), 0
    shown_val = {}          # the last epoch's validation figures, kept in the bar

    def show(epoch, loss, stats):
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.4f}",
                        grad_norm=f"{stats.grad_norm:.3g}",
                        steps_s=f"{k / (time.perf_counter() - t0):.0f}", **shown_val)

    def chunk_done(epoch, k_epoch, done, res):
        """After a compiled chunk: the per-step callbacks of its steps, in
        order, with the (k, loss, stats) a per-step loop passes, and the bar."""
        nonlocal k
        first = k - k_epoch
        for j in range(first, done):
            if step_hooks:
                st = _stats_of(res, j)
                for cb in step_hooks:
                    cb(k0 + k_epoch + j, float(res["loss"][j]), st)
            k = k_epoch + j + 1
        if bar is not None and done > first:
            if first == 0 and k_epoch == 0:
                _unpause(bar)       # the rate and ETA leave out the first (compiling) step
            bar.update(done - first)
            show(epoch, float(res["loss"][done - 1]), _stats_of(res, done - 1))

    def train():
        nonlocal k, shown_val
        if shuffle:
            for _ in range(initial_epoch):      # the orders of the epochs already run
                rng.shuffle(order)
        for epoch in range(initial_epoch, epochs):
            if shuffle:
                rng.shuffle(order)
            if fused:
                k_epoch = k
                res = step.run_epoch(
                    X, labels if labels.shape[0] else target, batch_size, shuffle=order,
                    callback=lambda done, _, res: chunk_done(epoch, k_epoch, done, res))
                losses, norms = res["loss"], res["grad_norm"]
                clipped, skipped = int(res["clipped"].sum()), int(res["skipped"].sum())
            else:
                done = []               # (loss, stats) of this epoch's steps
                for bi in range(n_batches):
                    idx = order[bi * batch_size:(bi + 1) * batch_size]
                    xb, yb = xbuf[:len(idx)], ybuf[:len(idx)]
                    _gather_batch(be, X, Y, idx, xb, yb, ibuf)
                    loss = step(xb, yb)
                    st = step.stats
                    done.append((loss, st))
                    for cb in step_hooks:
                        cb(k0 + k, loss, st)
                    k += 1
                    if bar is not None:
                        if k == 1:
                            _unpause(bar)   # the rate and ETA leave out the first step
                        bar.update(1)
                        shown = _newest_ready(done) if k % 10 == 0 or k == total else None
                        if shown is not None:
                            show(epoch, _host_loss(*shown), shown[1])
                # The epoch's figures: on CUDA the one wait for the device per epoch.
                losses = np.asarray([_host_loss(loss, st) for loss, st in done])
                norms = np.asarray([st.grad_norm for _, st in done])
                clipped = sum(st.clipped for _, st in done)
                skipped = sum(st.skipped for _, st in done)
            finite = norms[np.isfinite(norms)]
            history["loss"].append(per_sample(losses))
            history["grad_norm_mean"].append(float(np.mean(finite)) if finite.size
                                             else float("nan"))
            history["grad_norm_max"].append(float(np.max(finite)) if finite.size
                                            else float("nan"))
            history["clipped"].append(clipped)
            history["skipped"].append(skipped)
            if validation_data is not None:
                res = evaluate(model, step.loss_fn, *validation_data)
                history["val_loss"].append(res["loss"])
                if "val_accuracy" in history:
                    history["val_accuracy"].append(res["accuracy"])
                shown_val = {key: f"{history[key][-1]:.4f}"
                             for key in ("val_loss", "val_accuracy") if key in history}
                if bar is not None:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{history['loss'][-1]:.4f}",
                                    **shown_val)
            # a callback that saves the training state (ModelCheckpoint) runs
            # after the others: the checkpoint of epoch e holds their changes
            # of epoch e (a plateau cut), so a resume from it misses none
            stop = False
            for cb in sorted(epoch_hooks, key=lambda cb: bool(getattr(cb, "saves_state", False))):
                stop = bool(cb.on_epoch_end(epoch, history, step)) or stop
            if stop:
                break
        # a callback that changes the model at the end (EarlyStopping's
        # restore) runs after the others: a last checkpoint holds the
        # weights of the epoch it is named after, whatever the list's order
        ending = [cb for cb in epoch_hooks if hasattr(cb, "on_train_end")]
        for cb in sorted(ending, key=lambda cb: bool(getattr(cb, "changes_model_at_end", False))):
            cb.on_train_end(step, history)

    # A cold first step compiles for seconds: say so (in the bar) after 1 s.
    notice = _bar_notice(bar, "fit") if progress else contextlib.nullcontext()
    try:
        with notice:
            train()
    finally:
        if bar is not None:
            bar.close()
    return history
