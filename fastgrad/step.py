"""TrainStep: a whole training step as one compiled call, and ``fit``.

``loss = step(x, labels)`` runs forward, loss, backward, the gradient norm,
clipping and the optimizer update in ONE ``@njit`` call
(``fastgrad.kernels.cpu.step.train_step``): no Python between layers and no
allocation in steady state -- activation, delta and scratch buffers are
allocated once per batch size, so the smaller last batch of an epoch runs
without a recompile.  The update is the very kernel ``opt.step()`` runs, so
both paths give the same parameters, and ``step.stats`` is the StepStats
``opt.step()`` would have returned.

Models with dropout, residual blocks, normalisation or weight normalisation
run their own compiled step (``fastgrad.kernels.cpu.step_blocks``): plain
models never compile that code, so their cold first step stays as fast.  A
training-mode call advances ``model.dropout_step`` once, as
``model.forward`` does, so both paths draw the same dropout masks.
"""
from collections import OrderedDict
import time

import numpy as np

from . import device as _device
from . import ops
from .errors import NonFiniteGradientError
from .kernels.cpu import step as _kstep
from .kernels.cpu import norm as _knorm
from .kernels.cpu import step_blocks as _kblocks
from .layers import Sequential


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

    ``cuda_graph=True`` (CUDA, plain models) replays each batch size's step
    from a CUDA graph captured on its second call, with fastgrad's own GEMM
    kernel (CuPy cannot capture cuBLAS); ``step._graphs`` holds the graphed
    steps (``.graph`` is None and ``.fallback_reason`` says why if capture
    failed: the step then runs eagerly).  Not yet measured on a GPU.

    On CUDA a call only queues work: the loss is a 0-d float64 CuPy array
    and ``step.stats`` fills itself when first read (see
    ``fastgrad.optim``); reading either waits for that step.  NumPy inputs
    are copied to the GPU through pinned memory without waiting; CuPy
    inputs are used in place.  Labels on the GPU are range-checked by the
    loss kernel: a bad one skips the update and raises ValueError when the
    step's stats are read back (host labels raise at once, as on the CPU).

    A skipped update (non-finite gradient) leaves everything as it was: the
    parameters, the optimizer state and step count, and on the CPU also
    the model's dropout counter (``model.dropout_step``) and batch-norm
    running statistics, which the forward had already advanced.  (On CUDA
    the skip is decided on the device without the host waiting: the running
    statistics are restored there by a device-side select, but the dropout
    counter, kept on the host, does advance.)

    Calls from several threads run one at a time (the model's lock, shared
    with its optimizer), so no thread sees or writes a half-done step.

    Buffers are kept per batch size for the last ``max_cached_batch_sizes``
    (default 8) distinct batch sizes used; a ninth releases the least
    recently used one (it is allocated again if that size comes back).
    """

    max_cached_batch_sizes = 8

    def __init__(self, model, loss_fn, opt, cuda_graph=False):
        if not isinstance(model, Sequential):
            raise TypeError(f"model must be a fastgrad Sequential/MLP, got {type(model).__name__}")
        name = getattr(loss_fn, "name", None)
        if name not in _kstep.LOSS_CODES:
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
        self.model, self.loss_fn, self.opt = model, loss_fn, opt
        # Models with dropout or residual blocks get their own compiled step:
        # plain models never compile (nor pay for) the block code.
        self._blocks = model.extended
        # A CUDA model with toolkit layers runs the layer path (forward, loss,
        # backward, update: the same twin kernels, launched one by one; the
        # loss is read back each step).  A fused CUDA step for them is not
        # written yet.
        self._composed = (self._blocks and model.device == "cuda") or self._loss_options
        # CUDA graphs: the step's launches replayed as one graph per batch
        # size (GEMMs through fastgrad's own kernel: CuPy refuses cuBLAS in a
        # capture).  Off by default until it has been measured on a GPU.
        self.cuda_graph = bool(cuda_graph)
        if self.cuda_graph and (model.device != "cuda" or self._blocks):
            raise ValueError("cuda_graph=True needs a CUDA model without toolkit layers")
        self._graphs = {}
        if model.device == "cuda":
            # One Python function issuing the step's launches on the current
            # stream (no host sync inside); see kernels/cuda/step.py.
            from .kernels.cuda import step as kernels
            self._kernels = kernels
        else:
            self._kernels = _kstep
        xp = self._xp = model._xp
        self._loss_kind = _kstep.LOSS_CODES[name]
        self._sizes = np.asarray(model.sizes, np.int64)
        self._codes = np.asarray([layer.code for layer in model.layers], np.int64)
        self._alphas = np.asarray([layer.alpha for layer in model.layers], np.float64)
        self._needs_z = any(ops.needs_z(c) for c in self._codes)
        self._kblocks = _kblocks
        pkg = ops.kernels_for(model.device, self._codes)
        if model.device == "cpu" and pkg is not _device.kernels("cpu"):
            # a registered activation: the registry's copy of the step kernels
            self._kernels, self._kblocks = pkg.step, pkg.step_blocks
        if self._blocks and not self._composed:
            self._drops = np.asarray([layer.dropout for layer in model.layers], np.float64)
            self._no_drops = np.zeros_like(self._drops)
            self._residual = np.asarray([int(layer.residual) for layer in model.layers], np.int64)
            self._norms = np.asarray([_knorm.KINDS[layer.norm] for layer in model.layers],
                                     np.int64)
            self._batch_norm = bool((self._norms == _knorm.BATCH).any())
            self._wn = np.asarray([int(layer.weight_norm) for layer in model.layers], np.int64)
            if self._wn.any():
                self._weff = np.empty_like(model.params)
                self._dweff = np.empty_like(model.params)
            else:
                self._weff = self._dweff = model.params[:0]
            self._wnorm = np.empty(int(self._sizes[1:].sum()))
        # The optimizer's: on CUDA they are part of the record it reads back.
        self._layer_sq = opt._layer_sq
        self._buffers = OrderedDict()     # batch size -> buffers, least recently used first
        self._workspaces = {}
        self._staged = {}           # CUDA: device buffers of host inputs, by (name, shape)
        # Placeholders for the loss input the chosen loss does not read.
        self._no_labels = xp.zeros(0, np.int64)
        self._no_target = xp.zeros((0, 0), model.dtype)
        self.stats = None

    def _buffers_for(self, B):
        buf = self._buffers.get(B)
        if buf is not None:
            self._buffers.move_to_end(B)
        else:
            self._evict(keep=self.max_cached_batch_sizes - 1)
            xp, dt, widths = self._xp, self.model.dtype, self._sizes[1:]
            acts = xp.empty(B * int(widths.sum()), dt)
            if self._blocks:
                # z and f(z) always kept; a third delta buffer for dz of a
                # residual block (see kernels/cpu/step_blocks.py).
                zs, fzs = xp.empty_like(acts), xp.empty_like(acts)
                xhats = xp.empty_like(acts) if self._norms.any() else acts
                delta = xp.empty(3 * B * int(widths.max()), dt)
                nstats = np.empty(2 * int((B + widths).sum()), dt)
                nwork = np.empty(2 * max(B, int(widths.max())))
                buf = self._buffers[B] = (acts, zs, fzs, xhats, nstats, nwork, delta)
                return buf
            zs = xp.empty_like(acts) if self._needs_z else acts
            delta = xp.empty(2 * B * int(widths.max()), dt)
            buf = self._buffers[B] = (acts, zs, delta)
            if self.model.device == "cuda":
                self._workspaces[B] = self._kernels.Workspace(
                    B, self._sizes, self.opt._offsets, self._loss_kind, dt,
                    optim=self.opt._device_buffers())
        return buf

    def _evict(self, keep):
        """Release the buffers (and CUDA workspaces, graphs, staging
        buffers) of the least recently used batch sizes beyond ``keep``."""
        while len(self._buffers) > max(keep, 0):
            B, _ = self._buffers.popitem(last=False)
            self._workspaces.pop(B, None)
            for key in [k for k in self._graphs if k[0] == B]:
                del self._graphs[key]
            for key in [k for k in self._staged if k[1][:1] == (B,)]:
                del self._staged[key]

    def _graph_for(self, B, rule, s0, s1, s2):
        """The graphed step of batch size B on the current buffers; a new
        one when anything frozen into a graph changed (clipping, rule,
        optimizer state buffers after a load)."""
        opt = self.opt
        key = (B, int(rule), opt._clip_norm, opt._clip_value, id(s0), id(s1), id(s2))
        g = self._graphs.get(key)
        if g is None:
            acts, zs, delta = self._buffers_for(B)
            model = self.model
            g = self._graphs[key] = self._kernels.GraphedTrainStep(
                self._loss_kind, model.params, model.grads, self._sizes, self._codes,
                self._alphas, self.opt._offsets, acts, zs, delta, rule, s0, s1, s2,
                self._layer_sq, opt._clip_norm, opt._clip_value, B,
                optim=opt._device_buffers())
        return g

    def _extra(self, B):
        """Keyword arguments only the CUDA twin takes (its scratch space)."""
        return {"ws": self._workspaces[B]} if self._workspaces else {}

    def _inputs(self, x, y):
        """``(x, labels, target)`` checked and on the model's device.

        On CUDA, host (NumPy) inputs are checked on the host and sent by an
        asynchronous copy through pinned memory into buffers this step
        keeps (``cupy.asarray`` would wait for the device: a sync per step);
        device arrays are used in place, and device labels are range-checked
        by the loss kernel, which makes the update skip and the optimizer
        raise ValueError when the step's record is read back.
        """
        model, n_out = self.model, int(self._sizes[-1])
        cuda = model.device == "cuda"
        if not cuda or _device.device_of(x) == "cuda":
            x = model._input(x)
        else:
            x = self._stage("x", ops.as_array(x, "x", model.dtype, shape=(None, model.sizes[0])))
            if x.shape[0] == 0:
                raise ValueError("x: empty batch")
        B = x.shape[0]
        on_device = cuda and _device.device_of(y) == "cuda"
        if self._loss_kind == _kstep.CROSS_ENTROPY:
            if not cuda:
                return x, ops.as_labels(y, B, n_out), self._no_target
            if on_device:
                return x, ops.as_labels(y, B, n_out, xp=self._xp, check_range=False), \
                    self._no_target
            return x, self._stage("labels", ops.as_labels(y, B, n_out)), self._no_target
        if not cuda or on_device:
            return x, self._no_labels, ops.as_array(y, "target", model.dtype, shape=(B, n_out),
                                                    xp=self._xp)
        return x, self._no_labels, self._stage(
            "target", ops.as_array(y, "target", model.dtype, shape=(B, n_out)))

    def _stage(self, name, host):
        """Queue the copy of the host array ``host`` into this step's device
        buffer for it (no sync; the buffer is reused in stream order)."""
        from .kernels.cuda.transfer import uploader
        key = (name, host.shape, host.dtype.str)
        dst = self._staged.get(key)
        if dst is None:
            dst = self._staged[key] = self._xp.empty(host.shape, host.dtype)
        return uploader().upload(host, dst)

    def _result(self, loss):
        """The loss a call returns: a float on the CPU; on CUDA a 0-d float64
        CuPy array (reading it waits for the step, like ``loss.item()``)."""
        if self.model.device == "cuda":
            return self._xp.array(loss, dtype=np.float64)
        return float(loss)

    def _block_args(self, B):
        """(drops, residual, norms, seed, counter, training) of this training
        forward: the dropout counter advances as in ``model.forward``; eval
        mode drops nothing and batch norm uses its running statistics."""
        model = self.model
        if model.training:
            if B == 1 and self._batch_norm:
                raise ValueError("batch norm in training mode needs more than 1 sample per "
                                 "batch (got a batch of 1), as in PyTorch; use model.eval()")
            return (self._drops, self._residual, self._norms, model._mask_seed,
                    model._next_dropout_step(), True)
        return self._no_drops, self._residual, self._norms, model._mask_seed, 0, False

    def _composed_step(self, x, y, update):
        # model.forward is the training forward in train mode (dropout, batch
        # statistics) and the eval forward in eval mode, as the fused step.
        model = self.model
        snap = model._step_snapshot() if update else None
        out = model.forward(x)
        loss, grad = self.loss_fn(out, model._xp.asarray(y))
        model.backward(grad, input_grad=False)
        if update:
            try:
                self.stats = self.opt.step()
            except NonFiniteGradientError:
                self._undo_forward(snap, skipped=True)
                raise
            self._undo_forward(snap)
        return self._result(loss)

    def _undo_forward(self, snap, skipped=None):
        """After a skipped update, undo what the forward changed besides the
        parameters (``model._step_snapshot``).  On CUDA the skip decision
        is in device memory: the running statistics are restored by a
        device-side select on it (no host wait); the dropout counter lives
        on the host and keeps its advance."""
        model = self.model
        if model.device == "cpu":
            if skipped or (skipped is None and self.stats.skipped):
                model._restore_snapshot(snap)
            return
        _, mean, var = snap
        if mean is None:
            return
        book = self.opt._book
        skip = book.buffers["ctl"][book.k.CTL_SKIP] != 0
        xp = model._xp
        model._running_mean[...] = xp.where(skip, mean, model._running_mean)
        model._running_var[...] = xp.where(skip, var, model._running_var)

    def __call__(self, x, y):
        with self.opt._lock:
            return self._step(x, y)

    def _step(self, x, y):
        if self._composed:
            return self._composed_step(x, y, True)
        model = self.model
        x, labels, target = self._inputs(x, y)
        B = x.shape[0]
        rule, s0, s1, s2, hp = self.opt._kernel_args()
        # On the CPU the skip decision is known when the kernel returns:
        # undo what the forward changed outside the parameters.
        snap = model._step_snapshot() if model.device == "cpu" else None
        if self._blocks:
            acts, zs, fzs, xhats, nstats, nwork, delta = self._buffers_for(B)
            drops, residual, norms, seed, counter, training = self._block_args(B)
            loss, norm, scale, skipped = self._kblocks.train_step_blocks(
                x, labels, target, self._loss_kind, model.params, model.grads, self._sizes,
                self._codes, self._alphas, drops, residual, norms, seed, counter, training,
                self.opt._offsets, acts, zs, fzs, xhats, model.running_mean,
                model.running_var, nstats, nwork, self._wn, self._weff, self._dweff,
                self._wnorm, delta,
                rule, s0, s1, s2, hp, self._layer_sq, self.opt._clip_norm, self.opt._clip_value)
            if skipped:
                model._restore_snapshot(snap)
            self.stats = self.opt._commit(norm, scale, skipped, self._layer_sq)
            return float(loss)
        if model.training:
            model._next_dropout_step()
        acts, zs, delta = self._buffers_for(B)
        if self.cuda_graph:
            loss, norm, scale, skipped = self._graph_for(B, rule, s0, s1, s2)(
                x, labels, target, hp)
            self.stats = self.opt._commit(norm, scale, skipped, self._layer_sq, with_loss=True)
            return loss
        loss, norm, scale, skipped = self._kernels.train_step(
            x, labels, target, self._loss_kind, model.params, model.grads, self._sizes,
            self._codes, self._alphas, self.opt._offsets, acts, zs, delta,
            rule, s0, s1, s2, hp, self._layer_sq, self.opt._clip_norm, self.opt._clip_value,
            **self._extra(B))
        if snap is not None and skipped:
            model._restore_snapshot(snap)
        self.stats = self.opt._commit(norm, scale, skipped, self._layer_sq,
                                      with_loss=model.device == "cuda")
        return self._result(loss)

    def gradients(self, x, y):
        """Forward + loss + backward only (no update): fills ``model.grads``
        and returns the loss.  Useful for checks and data-parallel training."""
        with self.opt._lock:
            return self._gradients(x, y)

    def _gradients(self, x, y):
        if self._composed:
            return self._composed_step(x, y, False)
        x, labels, target = self._inputs(x, y)
        if self._blocks:
            acts, zs, fzs, xhats, nstats, nwork, delta = self._buffers_for(x.shape[0])
            drops, residual, norms, seed, counter, training = self._block_args(x.shape[0])
            m = self.model
            return float(self._kblocks.forward_backward_blocks(
                x, labels, target, self._loss_kind, m.params, m.grads, self._sizes,
                self._codes, self._alphas, drops, residual, norms, seed, counter, training,
                self.opt._offsets, acts, zs, fzs, xhats, m.running_mean, m.running_var, nstats,
                nwork, self._wn, self._weff, self._dweff, self._wnorm, delta))
        if self.model.training:
            self.model._next_dropout_step()
        acts, zs, delta = self._buffers_for(x.shape[0])
        return self._result(self._kernels.forward_backward(
            x, labels, target, self._loss_kind, self.model.params, self.model.grads,
            self._sizes, self._codes, self._alphas, self.opt._offsets, acts, zs, delta,
            **self._extra(x.shape[0])))


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


def _progress_bar(total, enabled, desc):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=True, dynamic_ncols=True)


def evaluate(model, loss_fn, X, Y, batch_size=1024):
    """Mean loss (and accuracy for softmax cross-entropy) of ``model`` on X, Y.

    X and Y may live on the host for a CUDA model: each batch is copied once.
    The loss is per sample: a loss with ``reduction="sum"`` is summed over
    the batches, then divided by the number of samples.
    """
    n = len(X)
    summed = getattr(loss_fn, "reduction", "mean") == "sum"
    classify = getattr(loss_fn, "name", None) == "softmax_cross_entropy"
    xp = model._xp
    total, correct = 0.0, 0
    for lo in range(0, n, batch_size):
        out = model.predict(X[lo:lo + batch_size])
        target = xp.asarray(Y[lo:lo + batch_size])
        loss, _ = loss_fn(out, target)
        total += loss if summed else loss * len(out)
        if classify:
            correct += int((out.argmax(axis=1) == target).sum())
    result = {"loss": total / n}
    if classify:
        result["accuracy"] = correct / n
    return result


def fit(step, X, Y, epochs=1, batch_size=32, shuffle=True, seed=0, progress=True,
        validation_data=None, callbacks=()):
    """Train with mini-batches, Keras style; returns the history.

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
    callbacks : per-step callables ``f(step_index, loss, stats)`` run after
        every step (e.g. ``fastgrad.health.GradientMonitor.record``-style
        hooks), and epoch callbacks (objects with ``on_epoch_end``, see
        :mod:`fastgrad.callbacks`): ``EarlyStopping`` (on a validation
        metric, restoring the best weights), ``ModelCheckpoint`` (through
        ``fastgrad.save`` every N epochs), ``ReduceLROnPlateau``

    Returns
    -------
    dict of per-epoch lists: ``loss`` (mean over the epoch's batches),
    ``grad_norm_mean``, ``grad_norm_max``, ``clipped``, ``skipped``, and
    ``val_loss`` / ``val_accuracy`` with validation data.  An early stop
    leaves them shorter than ``epochs``.
    """
    model = step.model
    for name, val in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    # A dataset already on the GPU stays there: batches are gathered on the
    # device (the batch's indices go up by an asynchronous pinned copy).
    on_device = _device.device_of(X) == "cuda"
    if on_device and model.device != "cuda":
        raise TypeError(f"X is a CUDA array but the model is on {model.device}")
    xp = model._xp if on_device else np
    X = ops.as_array(X, "X", model.dtype, shape=(None, model.sizes[0]), xp=xp)
    Y = xp.asarray(Y)
    if len(Y) != len(X):
        raise ValueError(f"X has {len(X)} samples but Y has {len(Y)}")
    n = len(X)
    rng = np.random.default_rng(seed)
    order = np.arange(n, dtype=np.int64)
    n_batches = -(-n // batch_size)
    xbuf = xp.empty((min(batch_size, n),) + X.shape[1:], X.dtype)
    ybuf = xp.empty((min(batch_size, n),) + Y.shape[1:], Y.dtype)
    if on_device:
        from .kernels.cuda.transfer import uploader
        ibuf = xp.empty(min(batch_size, n), np.int64)
    history = {"loss": [], "grad_norm_mean": [], "grad_norm_max": [], "clipped": [], "skipped": []}
    if validation_data is not None:
        history["val_loss"] = []
        if getattr(step.loss_fn, "name", None) == "softmax_cross_entropy":
            history["val_accuracy"] = []
    step_hooks = [cb for cb in callbacks if not hasattr(cb, "on_epoch_end")]
    epoch_hooks = [cb for cb in callbacks if hasattr(cb, "on_epoch_end")]
    for cb in epoch_hooks:
        if hasattr(cb, "on_train_begin"):
            cb.on_train_begin(step, history)
    bar = _progress_bar(epochs * n_batches, progress, "fit")
    t0, k = time.perf_counter(), 0
    shown_val = {}          # the last epoch's validation figures, kept in the bar
    try:
        for epoch in range(epochs):
            if shuffle:
                rng.shuffle(order)
            done = []               # (loss, stats) of this epoch's steps
            for bi in range(n_batches):
                idx = order[bi * batch_size:(bi + 1) * batch_size]
                xb, yb = xbuf[:len(idx)], ybuf[:len(idx)]
                if on_device:
                    idx = uploader().upload(idx, ibuf[:len(idx)])
                xp.take(X, idx, axis=0, out=xb)
                xp.take(Y, idx, axis=0, out=yb)
                loss = step(xb, yb)
                st = step.stats
                done.append((loss, st))
                for cb in step_hooks:
                    cb(k, loss, st)
                k += 1
                if bar is not None:
                    bar.update(1)
                    shown = _newest_ready(done) if k % 10 == 0 or k == epochs * n_batches \
                        else None
                    if shown is not None:
                        bar.set_postfix(epoch=epoch + 1, loss=f"{_host_loss(*shown):.4f}",
                                        grad_norm=f"{shown[1].grad_norm:.3g}",
                                        steps_s=f"{k / (time.perf_counter() - t0):.0f}",
                                        **shown_val)
            # The epoch's figures: on CUDA the one wait for the device per epoch.
            losses = [_host_loss(loss, st) for loss, st in done]
            norms = [st.grad_norm for _, st in done]
            clipped = sum(st.clipped for _, st in done)
            skipped = sum(st.skipped for _, st in done)
            finite = [v for v in norms if np.isfinite(v)]
            history["loss"].append(float(np.mean(losses)))
            history["grad_norm_mean"].append(float(np.mean(finite)) if finite else float("nan"))
            history["grad_norm_max"].append(float(np.max(finite)) if finite else float("nan"))
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
            stop = False
            for cb in epoch_hooks:
                stop = bool(cb.on_epoch_end(epoch, history, step)) or stop
            if stop:
                break
        for cb in epoch_hooks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(step, history)
    finally:
        if bar is not None:
            bar.close()
    return history
