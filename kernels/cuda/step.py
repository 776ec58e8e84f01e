"""The whole training step of an MLP on the GPU: the CUDA step driver, twin of
``fastgrad.kernels.cpu.step``.

One driver serves plain models and models with epilogue pieces (dropout,
residual blocks, batch/layer norm, weight norm), as on the CPU, and its
entry points are the CPU's (``forward``, ``backward``, ``forward_backward``,
``train_step``; the layer path runs ``forward`` and ``backward``).  They
take the CPU driver's arguments in the same order, the step plan included (``kernels/cpu/step.py`` explains
the layout of ``sizes, codes, alphas, offsets, acts, zs, delta, plan,
fplan, run_mean, run_var``; :func:`step_plan` of ``kernels/layout.py``
computes the plan), then keywords only the GPU has:

ws       a :class:`Workspace` of this batch size and plan (scratch below)
gemm     the GEMM, ``gemm(a, b, out)`` (default cuBLAS through
         ``cupy.matmul``; ``kernels.cuda.gemm.gemm`` for a captured step)
counter  the dropout step as a 1-element int64 device array: the kernels
         derive each layer's mask key from it on the device (``blocks.cuh``
         ``step_key``) instead of from ``plan[PLAN_COUNTER]``
commit   (``train_step``) settle on the device what the forward changed
         outside the parameters, by the update's skip decision: a device
         ``counter`` advances when the update is applied (training mode),
         and batch norm's running statistics are put back when it is
         skipped -- what the CPU's TrainStep does on the host.  A fused
         step cannot know on the host whether its update will be skipped.

Arrays the kernels touch are cupy arrays; ``sizes, codes, alphas, offsets,
plan, fplan`` are host NumPy arrays (they drive launch shapes, so reading
them never syncs) and ``hp`` is the host array ``fastgrad.optim`` fills
(sent by an asynchronous pinned copy) or a device one.  The model-dtype
scratch of epilogue pieces lies in ``acts`` at the plan's offsets, as on the
CPU; ``fplan``'s float64 scratch (norm partial sums, weight norm's 1/||v||,
the saved running statistics) lies at the same offsets in the workspace's
device array ``ws.fplan`` (the host ``fplan`` gives the dropout rates).
Every launch goes, in order, on the current stream; nothing waits for the
device: the loss, norm, scale and skip flag come back as 0-d float64 cupy
arrays.

Scratch (bias-gradient block sums, loss terms, norm partials, the device
``hp`` and the result scalars) lives in a :class:`Workspace`, allocated once
per batch size; without one, each call takes it from CuPy's stream-ordered
pool (no sync, but not capturable).

CUDA graphs
-----------
:class:`GraphedTrainStep` captures one ``train_step`` with
``stream.begin_capture()`` / ``end_capture()`` on fixed input buffers and
replays it with ``graph.launch()``.  CuPy refuses calls into cuBLAS while a
stream is capturing (cupy/cupy issue 6290, open: its cuBLAS binding raises
NotImplementedError), so by default the graphed step runs its GEMMs through
fastgrad's own kernel (``gemm.cu``, meant for the small widths where a step
is bound by launches), eager calls included, so that a replay gives the
eager call's bits; ``gemm="cublas"`` keeps ``cupy.matmul`` and shows
whether capture fails.  The capture is attempted once and, if anything
raises, the step falls back to plain launches for good
(``fallback_reason`` says why).  Everything a step reads that changes
between steps is in device memory (the hp row or table, the dropout step
``counter``, the running statistics); the plan (training mode, mask seed)
is frozen into the graph: ``fastgrad.TrainStep`` keeps a graph per mode.

To measure on a GPU (``cupyx.profiler.benchmark`` or CUDA events, never a
host timer around a launch):
  * per step: eager launches vs graph replay (when capture succeeds), for
    the bench shapes (mnist 784-256-256-10 at B=128, 8x256 deep, wide 4096);
  * host launch overhead: ``benchmark(..., n_warmup=10).cpu_times`` against
    ``gpu_times`` -- at small widths the step is launch-bound (~5 us/launch,
    ~6 launches per layer + 5 for loss/norm/update);
  * the bias-gradient pass (64 rows per block) and the 1-D bias_act grid
    (``i % cols``) against the memory-bandwidth floor;
  * the hp upload: the host must never block in ``transfer.Uploader.upload``
    (``cupyx.profiler.time_range`` around it) with 16 slots;
  * that a step holds no implicit sync: run under
    ``cupy.cuda.set_pinned_memory_allocator`` defaults with
    ``CUPY_CUDA_PER_THREAD_DEFAULT_STREAM`` unset and check with nsys that
    the host issues step k+1 before step k finishes.
"""
import cupy
import numpy as np

from ..layout import (FEATURES, PLAN_COUNTER, PLAN_DWEFF, PLAN_FZS, PLAN_HEADER, PLAN_NORM,
                      PLAN_NSTATS, PLAN_NWORK, PLAN_RESIDUAL, PLAN_ROW, PLAN_SAVED, PLAN_SEED,
                      PLAN_TRAINING, PLAN_WEFF, PLAN_WN, PLAN_WNORM, PLAN_XHATS, acts_size,
                      layer_slots, step_plan)
from ..spec import (BATCH, BCE_WITH_LOGITS, CROSS_ENTROPY, LOSS_CODES, MSE, dropout_layer_key,
                    dropout_threshold)
from . import _module as _m
from . import arrays as _arrays
from . import blocks as _blocks
from . import losses as _losses
from . import norm as _norm
from . import optim as _optim
from . import reduce as _reduce
from . import wnorm as _wnorm
from .activations import bias_act, bias_act_grad, grad_partials_shape

__all__ = ["CROSS_ENTROPY", "MSE", "BCE_WITH_LOGITS", "LOSS_CODES", "step_plan", "Workspace",
           "forward", "backward", "forward_backward", "train_step", "GraphedTrainStep"]

_LOSS_NAMES = {v: k for k, v in LOSS_CODES.items()}
#: The layer features this driver serves: all (it is one Python function;
#: only the CPU's compiled driver is specialised on a model's).
SERVED_FEATURES = FEATURES


def _host(a, dtype):
    if isinstance(a, cupy.ndarray):
        a = cupy.asnumpy(a)                 # a sync: pass host arrays
    return np.ascontiguousarray(a, dtype=dtype)


class _Layer:
    """Layer l's features as the plan gives them (host values)."""
    __slots__ = ("drop", "residual", "norm", "wn")

    def __init__(self, plan, fplan, l):
        row = plan[PLAN_HEADER + PLAN_ROW * l:PLAN_HEADER + PLAN_ROW * (l + 1)]
        # eval mode drops nothing
        self.drop = float(fplan[l]) if plan[PLAN_TRAINING] != 0 else 0.0
        self.residual = bool(row[PLAN_RESIDUAL])
        self.norm = int(row[PLAN_NORM])
        self.wn = bool(row[PLAN_WN])

    @property
    def plain(self):
        return not (self.drop > 0.0 or self.residual or self.norm or self.wn)


def _has_epilogue(plan, fplan, L):
    """True when some layer of the plan has an epilogue piece (in either mode)."""
    _plan_layers(plan, fplan, L)
    return bool((fplan[:L] > 0).any() or plan[PLAN_HEADER:].any())


def _plan_layers(plan, fplan, L):
    if plan.shape[0] != PLAN_HEADER + PLAN_ROW * L or fplan.shape[0] < L:
        raise ValueError(f"plan/fplan: not the step plan of {L} layers (kernels/layout.py "
                         "step_plan)")
    return [_Layer(plan, fplan, l) for l in range(L)]


class Workspace:
    """Every scratch buffer of one step at batch size ``B`` (device arrays).

    ``optim`` (optional) holds the optimizer's own device buffers (the
    control block ``ctl``, the device step count ``step``, the ``hp`` row,
    ``table``, ``total`` and ``norm_work``: ``fastgrad.optim`` passes them so
    that the step's record lands where the optimizer reads it back); without
    it the workspace has its own ``ctl`` and ``hp``.  The step's loss is
    written into ``ctl[CTL_LOSS]`` and a bad label raises
    ``ctl[CTL_STATUS]``; results are 0-d views of ``ctl``, overwritten by
    the next step (copy them to keep them).

    ``loss_kind`` None: no loss scratch (the layer path's forward and
    backward).  ``plan, fplan`` (the step plan, host arrays): the epilogue
    pieces' scratch for it -- ``work`` (float64 column partials of the blocks, norm
    and weight norm passes, sized for the largest layer) and ``fplan``, the
    device float64 array laid out as the host ``fplan`` (its scratch slots
    are used on the device).  Without a plan the workspace serves plain
    steps only.
    """

    def __init__(self, B, sizes, offsets, loss_kind, dtype, optim=None, plan=None, fplan=None):
        sizes = _host(sizes, np.int64)
        self.B = int(B)
        dtype = np.dtype(dtype)
        grad_elems = 0
        for w in sizes[1:]:
            shape = grad_partials_shape(B, int(w))
            if shape is not None:
                grad_elems = max(grad_elems, shape[0] * shape[1])
        self.grad_work = cupy.empty(grad_elems, dtype)
        self.loss_work = cupy.empty(
            0 if loss_kind is None else
            _losses.work_size(_LOSS_NAMES[int(loss_kind)], (B, int(sizes[-1]))), np.float64)
        # The update's buffers: the optimizer's when given (they depend on
        # the layer offsets only, not on B), else this workspace's own.
        self._optim = dict(optim or {})
        if "norm_work" not in self._optim:
            self._optim["norm_work"] = cupy.empty(_reduce.partial_size(offsets), np.float64)
        for name, size in (("total", 1), ("ctl", _optim.CTL_SIZE), ("hp", _optim.HP_SIZE)):
            if name not in self._optim:
                self._optim[name] = cupy.zeros(size, np.float64)
        self.ctl, self.hp = self._optim["ctl"], self._optim["hp"]
        self.loss = self.ctl[_optim.CTL_LOSS:_optim.CTL_LOSS + 1]
        self.status = self.ctl[_optim.CTL_STATUS:_optim.CTL_STATUS + 1]
        self.work = self.fplan = None
        if plan is not None:
            plan, fplan = _host(plan, np.int64), _host(fplan, np.float64)
            if _has_epilogue(plan, fplan, sizes.shape[0] - 1):
                need = 1
                for n_in, n_out in zip(sizes[:-1], sizes[1:]):
                    need = max(need, _blocks.col_partials_size(B, int(n_out), 1),
                               _norm.work_size(B, int(n_out)),
                               _wnorm.work_size(int(n_in), int(n_out)))
                self.work = cupy.empty(int(need), np.float64)
                self.fplan = cupy.zeros(fplan.shape[0], np.float64)

    def grad_partials(self, rows, cols):
        shape = grad_partials_shape(rows, cols)
        return None if shape is None else self.grad_work[:shape[0] * shape[1]].reshape(shape)

    def optim_buffers(self):
        return self._optim


def loss_and_grad(loss_kind, h, labels, target, grad, ws):
    """The mean loss of the network output ``h`` into ``ws.loss`` (returned)
    and its gradient into ``grad``: twin of the CPU step's ``loss_and_grad``."""
    if loss_kind == CROSS_ENTROPY:
        _losses.softmax_cross_entropy(h, labels, grad, out=ws.loss, work=ws.loss_work,
                                      status=ws.status)
    elif loss_kind == MSE:
        _losses.mse(h, target, grad, out=ws.loss, work=ws.loss_work)
    elif loss_kind == BCE_WITH_LOGITS:
        _losses.bce_with_logits(h, target, grad, out=ws.loss, work=ws.loss_work)
    else:
        raise ValueError(f"unknown loss code {loss_kind}; known: {LOSS_CODES}")
    return ws.loss


def _views(params, grads, acts, zs, offsets, sizes, B, l, act_off):
    n_in, n_out = int(sizes[l]), int(sizes[l + 1])
    o, ob, _, _, _, _ = layer_slots(int(offsets[l]), n_in, n_out, False, False)
    W = params[o:ob].reshape(n_in, n_out)
    b = params[ob:ob + n_out]
    dW = grads[o:ob].reshape(n_in, n_out)
    db = grads[ob:ob + n_out]
    a = acts[act_off:act_off + B * n_out].reshape(B, n_out)
    z = zs[act_off:act_off + B * n_out].reshape(B, n_out)
    return W, b, dW, db, a, z


def _rows(buf, off, B, n):
    return buf[off:off + B * n].reshape(B, n)


def _cublas(a, b, out):
    return cupy.matmul(a, b, out=out)


def _drop_args(layer, plan, counter, l):
    """(drop, key, thresh, scale, device counter) of layer l: with a device
    ``counter`` the layer's key (the step's part is added on the device),
    else the key of the plan's counter."""
    p = layer.drop
    if p <= 0.0:
        return False, 0, 0, 1.0, None
    seed = int(plan[PLAN_SEED])
    if counter is not None:
        return True, dropout_layer_key(seed, l), dropout_threshold(p), 1.0 / (1.0 - p), counter
    return (True, _blocks.dropout_key(seed, l, int(plan[PLAN_COUNTER])), dropout_threshold(p),
            1.0 / (1.0 - p), None)


def _norm_views(params, grads, plan, acts, run_mean, run_var, offsets, sizes, kind, B, l,
                act_off, stat_off, col_off):
    n_out = int(sizes[l + 1])
    _, _, o, ob, _, _ = layer_slots(int(offsets[l]), int(sizes[l]), n_out, True, False)
    gamma, beta = params[o:o + n_out], params[ob:ob + n_out]
    dgamma, dbeta = grads[o:o + n_out], grads[ob:ob + n_out]
    xhat = _rows(acts, int(plan[PLAN_XHATS]) + act_off, B, n_out)
    ns = n_out if kind == BATCH else B
    s = int(plan[PLAN_NSTATS]) + stat_off
    mean, rstd = acts[s:s + ns], acts[s + ns:s + 2 * ns]
    rm, rv = run_mean[col_off:col_off + n_out], run_var[col_off:col_off + n_out]
    return gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv


def _weight_norm_slots(offsets, sizes, layer, l):
    n_in, n_out = int(sizes[l]), int(sizes[l + 1])
    o, ob, _, _, og, _ = layer_slots(int(offsets[l]), n_in, n_out, layer.norm != 0, True)
    return n_in, n_out, o, ob, og


def _check_buffers(acts, zs, delta, plan, B, sizes, layers, ws):
    widths = sizes[1:]
    flat = B * int(widths.sum())
    # epilogue pieces have scratch behind the outputs, f(z) first
    scratch = plan[PLAN_XHATS] > plan[PLAN_FZS]
    strides = 3 if any(layer.residual for layer in layers) else 2
    for name, a, size in (("acts", acts, acts_size(plan)), ("zs", zs, flat),
                          ("delta", delta, strides * B * int(widths.max()))):
        if a is not None and a.size < size:
            raise ValueError(f"{name}: need {size} elements, got {a.size}")
    if ws.fplan is None and scratch:
        raise ValueError("ws: a Workspace built without this step plan (it has epilogue "
                         "pieces: Workspace(..., plan=plan, fplan=fplan))")


class _Call:
    """One driver call's arguments, checked, with the host arrays as NumPy
    and the workspace (a new one when none is given)."""

    def __init__(self, x, params, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
                 ws, gemm, counter, loss_kind=None):
        self.mm = _cublas if gemm is None else gemm
        self.sizes, self.codes = _host(sizes, np.int64), _host(codes, np.int64)
        self.alphas, self.offsets = _host(alphas, np.float64), _host(offsets, np.int64)
        self.plan, self.fplan = _host(plan, np.int64), _host(fplan, np.float64)
        if counter is not None and not isinstance(counter, cupy.ndarray):
            raise TypeError("counter: the dropout step as a 1-element int64 device array (a "
                            "host counter goes in plan[PLAN_COUNTER])")
        self.counter = counter
        self.B = B = x.shape[0]
        self.layers = _plan_layers(self.plan, self.fplan, self.codes.shape[0])
        if ws is None:
            ws = Workspace(B, self.sizes, self.offsets, loss_kind, params.dtype, plan=self.plan,
                           fplan=self.fplan)
        self.ws = ws
        _check_buffers(acts, zs, delta, self.plan, B, self.sizes, self.layers, ws)
        self.training = bool(self.plan[PLAN_TRAINING] != 0)
        plan, dfplan = self.plan, ws.fplan
        if dfplan is not None:
            self.nwork = dfplan[int(plan[PLAN_NWORK]):int(plan[PLAN_WNORM])]
            self.weff = acts[int(plan[PLAN_WEFF]):]
            self.dweff = acts[int(plan[PLAN_DWEFF]):]
        # dL/da ping-pongs between delta's first two strides; the third holds
        # the dz of a residual block
        self.half = B * int(self.sizes[1:].max())


def _forward(c, x, params, grads, acts, zs, run_mean, run_var):
    """The forward of call ``c``; returns the output (a view of ``acts``)."""
    sizes, codes, alphas, offsets, plan = c.sizes, c.codes, c.alphas, c.offsets, c.plan
    B, mm, work, dfplan = c.B, c.mm, c.ws.work, c.ws.fplan
    h = x
    act_off = stat_off = col_off = 0
    for l, layer in enumerate(c.layers):
        n_in, n_out = int(sizes[l]), int(sizes[l + 1])
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        code, alpha = int(codes[l]), float(alphas[l])
        if layer.wn:
            _, _, o, ob, og = _weight_norm_slots(offsets, sizes, layer, l)
            W = c.weff[o:ob].reshape(n_in, n_out)
            w = int(plan[PLAN_WNORM]) + col_off
            _wnorm.weight_norm_forward(params[o:ob].reshape(n_in, n_out), params[og:og + n_out],
                                       W, dfplan[w:w + n_out], work=work)
        drop, key, thresh, scale, dctr = _drop_args(layer, plan, c.counter, l)
        if layer.norm:
            gamma, beta, _, _, xhat, mean, rstd, rm, rv = _norm_views(
                params, grads, plan, acts, run_mean, run_var, offsets, sizes, layer.norm, B, l,
                act_off, stat_off, col_off)
            mm(h, W, a)
            _norm.norm_forward_epilogue(a, b, h, xhat, _rows(acts, int(plan[PLAN_FZS]) + act_off,
                                                             B, n_out),
                                        gamma, beta, mean, rstd, c.nwork, rm, rv, layer.norm,
                                        c.training, code, alpha, drop, key, thresh, scale,
                                        layer.residual, work=work, counter=dctr)
        elif drop or layer.residual:
            mm(h, W, a)
            _blocks.block_forward_epilogue(a, b, h, z, _rows(acts, int(plan[PLAN_FZS]) + act_off,
                                                             B, n_out),
                                           code, alpha, drop, key, thresh, scale,
                                           layer.residual, counter=dctr)
        else:
            if not _m.needs_z(code):
                z = a
            mm(h, W, z)
            bias_act(z, b, a, code, alpha)
        h = a
        act_off += B * n_out
        stat_off += 2 * (B + n_out)
        col_off += n_out
    return h


def _backward(c, x, params, grads, acts, zs, delta, run_mean, run_var):
    """The backward of call ``c`` from dL/d(output) in ``delta``'s first
    stride; returns the first layer's (dz, dL/da, W, residual flag)."""
    sizes, codes, alphas, offsets, plan = c.sizes, c.codes, c.alphas, c.offsets, c.plan
    B, mm, work, dfplan, half = c.B, c.mm, c.ws.work, c.ws.fplan, c.half
    L = codes.shape[0]
    act_off = B * int(sizes[1:].sum())
    stat_off = 2 * int((B + sizes[1:]).sum())
    col_off = int(sizes[1:].sum())
    n_out = int(sizes[L])
    da = delta[:B * n_out].reshape(B, n_out)
    ping = 0
    for l in range(L - 1, -1, -1):
        layer = c.layers[l]
        n_in, n_out = int(sizes[l]), int(sizes[l + 1])
        code, alpha = int(codes[l]), float(alphas[l])
        act_off -= B * n_out
        stat_off -= 2 * (B + n_out)
        col_off -= n_out
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        dWt = dW
        if layer.wn:
            _, _, o, ob, og = _weight_norm_slots(offsets, sizes, layer, l)
            W = c.weff[o:ob].reshape(n_in, n_out)
            dWt = c.dweff[o:ob].reshape(n_in, n_out)
        res = layer.residual
        # f is read back from the layer's output, or kept for a block (see blocks)
        fz = _rows(acts, int(plan[PLAN_FZS]) + act_off, B, n_out) if res else a
        drop, key, thresh, scale, dctr = _drop_args(layer, plan, c.counter, l)
        # dz apart from da in a residual block: the skip gradient still needs da
        dz = _rows(delta, 2 * half, B, n_out) if res else da
        if layer.norm:
            gamma, beta, dgamma, dbeta, xhat, _, rstd, _, _ = _norm_views(
                params, grads, plan, acts, run_mean, run_var, offsets, sizes, layer.norm, B, l,
                act_off, stat_off, col_off)
            _norm.norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta,
                                         c.nwork[:B], c.nwork[B:2 * B], layer.norm, c.training,
                                         code, alpha, drop, key, thresh, scale, res, work=work,
                                         counter=dctr)
        elif drop or res:
            _blocks.block_backward_epilogue(da, fz, z, dz, db, code, alpha, drop, key, thresh,
                                            scale, res, work=work, counter=dctr)
        else:
            if not _m.needs_z(code):
                z = a
            bias_act_grad(da, a, z, da, db, code, alpha, c.ws.grad_partials(B, n_out))
        if l > 0:
            hprev = acts[act_off - B * n_in:act_off].reshape(B, n_in)
            mm(hprev.T, dz, dWt)
            nxt = (1 - ping) * half
            dx = delta[nxt:nxt + B * n_in].reshape(B, n_in)
            mm(dz, W.T, dx)
            if res:
                _arrays.add_into(dx, da)
            da = dx
            ping = 1 - ping
        else:
            mm(x.T, dz, dWt)
        if layer.wn:
            w = int(plan[PLAN_WNORM]) + col_off
            _wnorm.weight_norm_backward(params[o:ob].reshape(n_in, n_out), params[og:og + n_out],
                                        dfplan[w:w + n_out], dWt,
                                        grads[o:ob].reshape(n_in, n_out), grads[og:og + n_out],
                                        work=work)
    return dz, da, W, res


def forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                     offsets, acts, zs, delta, plan, fplan, run_mean, run_var,
                     ws=None, gemm=None, counter=None):
    """Forward, loss and backward; writes ``grads`` (and, training with batch
    norm, the running statistics); returns the mean loss (0-d float64 cupy
    array, a view of ``ws.ctl``)."""
    c = _Call(x, params, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan, ws, gemm,
              counter, loss_kind)
    h = _forward(c, x, params, grads, acts, zs, run_mean, run_var)
    B, n_out = h.shape
    loss_and_grad(loss_kind, h, labels, target, delta[:B * n_out].reshape(B, n_out), c.ws)
    _backward(c, x, params, grads, acts, zs, delta, run_mean, run_var)
    return c.ws.loss[0]


def forward(x, params, sizes, codes, alphas, offsets, acts, zs, plan, fplan, run_mean, run_var,
            ws=None, gemm=None, counter=None):
    """The forward alone (the layer path's ``model.forward`` and ``predict``):
    writes ``acts`` (and, training with batch norm, the running statistics);
    returns the output, a view of ``acts``.  A backward of this forward
    needs the same ``ws`` when the plan has epilogue pieces (their float64
    scratch is in it)."""
    c = _Call(x, params, sizes, codes, alphas, offsets, acts, zs, None, plan, fplan, ws, gemm,
              counter)
    # params stands in for grads: the views the forward takes of them go unused
    return _forward(c, x, params, params, acts, zs, run_mean, run_var)


def backward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
             run_mean, run_var, dx, ws=None, gemm=None, counter=None):
    """The backward alone, after :func:`forward` on the same buffers, plan
    (and ``ws``): reads dL/d(output) from ``delta``'s first ``B * sizes[-1]``
    elements (and overwrites ``delta``), writes ``grads`` and, when ``dx``
    has rows, dL/dx into it."""
    c = _Call(x, params, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan, ws, gemm,
              counter)
    if ws is None and c.ws.fplan is not None:
        raise ValueError("ws: backward of a plan with epilogue pieces needs its forward's "
                         "Workspace (their scratch is in it)")
    dz, da, W, res = _backward(c, x, params, grads, acts, zs, delta, run_mean, run_var)
    if dx.shape[0] > 0:
        c.mm(dz, W.T, dx)
        if res:
            _arrays.add_into(dx, da)


def train_step(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
               offsets, acts, zs, delta, plan, fplan, run_mean, run_var,
               rule, s0, s1, s2, hp, layer_sq, clip_norm, clip_value, ws=None, gemm=None,
               counter=None, commit=False):
    """forward_backward, then the optimizer's clipped update in place.

    Returns (loss, grad_norm, clip_scale, skipped) as 0-d float64 cupy arrays
    (``skipped`` is 1.0 or 0.0), views of ``ws.ctl``.  Reading them waits for
    the device; ``fastgrad.TrainStep`` copies the whole control block back
    asynchronously instead (``fastgrad.optim``).  ``commit``: see the module
    docstring (it needs ``ws``).
    """
    B = x.shape[0]
    if ws is None:
        if commit:
            raise ValueError("commit=True needs ws, a Workspace of the step plan")
        ws = Workspace(B, sizes, offsets, loss_kind, params.dtype, plan=plan, fplan=fplan)
    offsets = _host(offsets, np.int64)
    plan, fplan = _host(plan, np.int64), _host(fplan, np.float64)
    training = plan[PLAN_TRAINING] != 0
    saved = int(plan[PLAN_SAVED])
    # batch norm in training mode: the running statistics before the forward
    n = int(run_mean.size) if commit and training and saved >= 0 and ws.fplan is not None else 0
    if n:
        saved_mean, saved_var = ws.fplan[saved:saved + n], ws.fplan[saved + n:saved + 2 * n]
        _arrays.copy_into(saved_mean, run_mean)
        _arrays.copy_into(saved_var, run_var)
    loss = forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes,
                            alphas, offsets, acts, zs, delta, plan, fplan, run_mean, run_var,
                            ws=ws, gemm=gemm, counter=counter)
    norm, scale, skipped = _optim.clipped_update(rule, params, grads, s0, s1, s2, hp, offsets,
                                                 layer_sq, clip_norm, clip_value,
                                                 ws=ws.optim_buffers())
    dctr = counter if commit and training else None
    if dctr is not None or n:
        k = _m.kernel("blocks.cu", "fg_commit_forward")
        k((_m.cover(max(n, 1)),), (_m.THREADS,),
          (ws.ctl, _blocks.null(dctr), run_mean if n else _m.NULL, run_var if n else _m.NULL,
           saved_mean if n else _m.NULL, saved_var if n else _m.NULL, _m.i64(n)))
    return loss, norm, scale, skipped


class GraphedTrainStep:
    """``train_step`` (``commit=True``) at one batch size, replayed from a
    CUDA graph when possible.

    Holds fixed input buffers and a :class:`Workspace`; every pointer the
    step touches is fixed, so the graph stays valid across calls.  The first
    call runs eagerly (it compiles the kernels and initialises cuBLAS, which
    must not happen inside a capture); the second captures; if capture
    raises (cuBLAS under capture, cupy issue 6290) every later call runs
    eagerly on the same buffers.  Per call, ``hp`` is copied into the
    workspace's device ``hp`` before the replay, so each replay sees its own
    learning rate and bias corrections; ``clip_norm``, ``clip_value`` and
    the step plan (a copy: training mode, mask seed) are frozen into the
    graph (build a new object to change them).  With dropout in training
    mode ``counter`` must be a device array -- the plan's host counter would
    freeze one mask into every replay, so it is refused.

    Parameters: those of :func:`train_step` without ``x, labels, target, hp``,
    plus ``batch`` (B), ``use_graph``, ``gemm``: ``"fastgrad"`` (default,
    capturable) or ``"cublas"`` (``cupy.matmul``), ``optim``: an
    optimizer's device buffers (``fastgrad.optim``: control block, step
    count, hp table), with which each call's ``hp`` is that optimizer's
    fixed-size table of rows and the step count stays on the device, and
    ``counter`` (see :func:`train_step`).
    """

    def __init__(self, loss_kind, params, grads, sizes, codes, alphas, offsets, acts, zs, delta,
                 plan, fplan, run_mean, run_var, rule, s0, s1, s2, layer_sq, clip_norm,
                 clip_value, batch, use_graph=True, gemm="fastgrad", optim=None, counter=None):
        if gemm not in ("fastgrad", "cublas"):
            raise ValueError(f"gemm must be 'fastgrad' or 'cublas', got {gemm!r}")
        self.sizes = _host(sizes, np.int64)
        self.codes = _host(codes, np.int64)
        self.plan = _host(plan, np.int64).copy()
        self.fplan = _host(fplan, np.float64).copy()
        layers = _plan_layers(self.plan, self.fplan, self.codes.shape[0])
        if any(layer.drop > 0.0 for layer in layers) and not isinstance(counter, cupy.ndarray):
            raise ValueError("a graphed step with dropout in training mode needs its dropout "
                             "step in device memory (counter: a 1-element int64 device array);"
                             " the plan's host counter would freeze one mask into every replay")
        from .gemm import gemm as own_gemm
        self._gemm = own_gemm if gemm == "fastgrad" else None
        self.alphas = _host(alphas, np.float64)
        self.offsets = _host(offsets, np.int64)
        self.loss_kind = int(loss_kind)
        self.B = int(batch)
        dt = params.dtype
        self.x = cupy.empty((self.B, int(self.sizes[0])), dt)
        if self.loss_kind == CROSS_ENTROPY:
            self.labels = cupy.zeros(self.B, np.int64)
            self.target = cupy.empty((0, 0), dt)
        else:
            self.labels = cupy.zeros(0, np.int64)
            self.target = cupy.empty((self.B, int(self.sizes[-1])), dt)
        self.ws = Workspace(self.B, self.sizes, self.offsets, self.loss_kind, dt, optim=optim,
                            plan=self.plan, fplan=self.fplan)
        # Where each call's hp goes: the row buffer, or the optimizer's table.
        self._hp = self.ws.hp if optim is None else optim["table"].reshape(-1, _optim.HP_SIZE)
        self._bufs = (params, grads, acts, zs, delta, run_mean, run_var, rule, s0, s1, s2,
                      layer_sq, float(clip_norm), float(clip_value), counter)
        self.use_graph = bool(use_graph)
        self.graph = None
        self.fallback_reason = None if use_graph else "use_graph=False"
        self._calls = 0

    def _launch(self):
        (params, grads, acts, zs, delta, run_mean, run_var, rule, s0, s1, s2, layer_sq,
         clip_norm, clip_value, counter) = self._bufs
        return train_step(self.x, self.labels, self.target, self.loss_kind, params, grads,
                          self.sizes, self.codes, self.alphas, self.offsets, acts, zs, delta,
                          self.plan, self.fplan, run_mean, run_var, rule, s0, s1, s2, self._hp,
                          layer_sq, clip_norm, clip_value, ws=self.ws, gemm=self._gemm,
                          counter=counter, commit=True)

    def _capture(self):
        stream = cupy.cuda.Stream(non_blocking=True)
        # The eager first call ran on the caller's stream; capture must not
        # record work that depends on it still running.
        cupy.cuda.get_current_stream().synchronize()
        with stream:
            stream.begin_capture()
            try:
                self._launch()
            except Exception as exc:           # cuBLAS refused (cupy#6290), or other
                try:
                    stream.end_capture()
                except Exception:
                    pass
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                return None
            try:
                return stream.end_capture()
            except Exception as exc:
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                return None

    def __call__(self, x, labels, target, hp):
        """One step on device arrays ``x`` and ``labels`` or ``target``;
        returns (loss, norm, scale, skipped), 0-d float64 cupy arrays that
        the next call does not overwrite."""
        if x.shape[0] != self.B:
            raise ValueError(f"this step was built for batch {self.B}, got {x.shape[0]}")
        self.x[...] = x
        if self.loss_kind == CROSS_ENTROPY:
            self.labels[...] = labels
        else:
            self.target[...] = target
        _optim.upload_hp(hp, self._hp)
        self._calls += 1
        if self.use_graph and self.graph is None and self.fallback_reason is None \
                and self._calls >= 2:
            self.graph = self._capture()
        if self.graph is not None:
            self.graph.launch(cupy.cuda.get_current_stream())
        else:
            self._launch()
        out = self.ws.ctl.copy()               # stream-ordered, survives the next replay
        return (out[_optim.CTL_LOSS], out[_optim.CTL_NORM], out[_optim.CTL_SCALE],
                out[_optim.CTL_SKIP])
