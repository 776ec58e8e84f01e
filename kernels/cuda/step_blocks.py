"""The whole training step of a model with epilogue pieces (dropout, residual
blocks, batch/layer norm, weight norm) on the GPU.

The CPU runs plain models and models with epilogue pieces through ONE driver reading a packed
step plan (``fastgrad.kernels.cpu.step``); this step still takes the
per-layer feature arrays below (the CPU epilogue step's former arguments),
plus the CUDA step's keywords ``ws`` (a :class:`BlocksWorkspace`) and
``gemm`` (see ``step``).  Arrays the kernels touch are cupy arrays; ``sizes,
codes, alphas, drops, residual, norms, wn, offsets`` are host NumPy arrays
(they drive launch shapes).  Every launch goes, in order, on the current
stream; nothing waits for the device.

Layout of the arguments (beyond ``step.train_step``'s)
------------------------------------------------------
drops    float64 (L,)  dropout rate per layer, 0 where off (all 0 in eval mode)
residual int64 (L,)    1 for a residual block
norms    int64 (L,)    0, or spec.LAYER / spec.BATCH (gamma, beta follow b in params)
seed, counter          the model's mask seed and this step's dropout counter
training               batch norm uses (and updates) batch statistics
run_mean, run_var      float64, sum(sizes[1:]): batch norm running statistics
xhats    flat like acts (normalised pre-activations; may be acts when no norm)
nstats   model dtype, 2 * sum(B + sizes[1:]): per layer mean and 1/std used
nwork    float64, 2 * max(B, max(sizes[1:])): norm scratch
wn       int64 (L,)    1 for a weight-normalised layer (v where W would be, g last)
weff, dweff            flat like params: effective W and its gradient (scratch)
wnorm    float64, sum(sizes[1:]): 1 / ||v_j|| per output unit
zs, fzs  flat like acts -- pre-activations, and f(z) of residual blocks
delta    flat, 3 * B * max(sizes[1:]) -- dL/da ping-pong, plus dz of a
         residual block

The dropout step
----------------
``counter`` is an int (the masks' keys are host scalars, as on the CPU) or a
1-element int64 device array holding the step: the kernels then derive each
layer's key from it on the device (``blocks.cuh`` ``step_key``).  A fused
training step cannot know on the host whether its update will be skipped,
so ``TrainStep`` keeps the model's dropout step in device memory and
:func:`train_step_blocks` settles it there (``commit=True``): an applied
update advances it, a skipped one does not, and a skipped update also puts
back the batch-norm running statistics saved before the forward -- what the
CPU's TrainStep restores on the host.  The same launches run inside a CUDA
graph: nothing that changes per step is frozen in it except the training
flag, of which TrainStep keeps one graph per value.
"""
import cupy
import numpy as np

from ..layout import layer_slots
from ..spec import BATCH, dropout_layer_key, dropout_threshold
from . import _module as _m
from . import blocks as _blocks
from . import norm as _norm
from . import optim as _optim
from . import wnorm as _wnorm
from .activations import bias_act, bias_act_grad
from .step import GraphedTrainStep, Workspace, _cublas, _host, _views, loss_and_grad

__all__ = ["BlocksWorkspace", "forward_backward_blocks", "train_step_blocks",
           "GraphedTrainStepBlocks"]


class BlocksWorkspace(Workspace):
    """:class:`step.Workspace` plus the epilogue pieces' scratch at batch size
    ``B``: ``work`` (float64 column partials of the blocks, norm and weight
    norm passes, sized for the largest layer) and ``saved_mean``,
    ``saved_var`` (the running statistics before a step's forward, for
    ``commit``; ``n_stats`` elements)."""

    def __init__(self, B, sizes, offsets, loss_kind, dtype, n_stats=0, optim=None):
        super().__init__(B, sizes, offsets, loss_kind, dtype, optim=optim)
        sizes = _host(sizes, np.int64)
        need = 1
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            need = max(need, _blocks.col_partials_size(B, n_out, 1),
                       _norm.work_size(B, n_out), _wnorm.work_size(int(n_in), int(n_out)))
        self.work = cupy.empty(int(need), np.float64)
        self.saved_mean = cupy.empty(int(n_stats), np.float64)
        self.saved_var = cupy.empty(int(n_stats), np.float64)


def _drop_args(drops, seed, counter, l):
    """(drop, key, thresh, scale, device counter) of layer l: the key is the
    step's key for an int counter, the layer's key for a device one."""
    p = float(drops[l])
    if p <= 0.0:
        return False, 0, 0, 1.0, None
    if isinstance(counter, cupy.ndarray):
        return True, dropout_layer_key(seed, l), dropout_threshold(p), 1.0 / (1.0 - p), counter
    return (True, _blocks.dropout_key(seed, l, int(counter)), dropout_threshold(p),
            1.0 / (1.0 - p), None)


def _norm_views(params, grads, xhats, nstats, run_mean, run_var, offsets, sizes, norms, B, l,
                act_off, stat_off, col_off):
    n_out = int(sizes[l + 1])
    _, _, o, ob, _, _ = layer_slots(int(offsets[l]), int(sizes[l]), n_out, True, False)
    gamma, beta = params[o:o + n_out], params[ob:ob + n_out]
    dgamma, dbeta = grads[o:o + n_out], grads[ob:ob + n_out]
    xhat = xhats[act_off:act_off + B * n_out].reshape(B, n_out)
    ns = n_out if norms[l] == BATCH else B
    mean, rstd = nstats[stat_off:stat_off + ns], nstats[stat_off + ns:stat_off + 2 * ns]
    rm, rv = run_mean[col_off:col_off + n_out], run_var[col_off:col_off + n_out]
    return gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv


def _weight_norm_slots(offsets, sizes, norms, l):
    n_in, n_out = int(sizes[l]), int(sizes[l + 1])
    o, ob, _, _, og, _ = layer_slots(int(offsets[l]), n_in, n_out, norms[l] != 0, True)
    return n_in, n_out, o, ob, og


def _check_buffers(acts, zs, fzs, xhats, nstats, nwork, wnorm, delta, B, sizes):
    widths = sizes[1:]
    flat = B * int(widths.sum())
    for name, a, size in (("acts", acts, flat), ("zs", zs, flat), ("fzs", fzs, flat),
                          ("delta", delta, 3 * B * int(widths.max())),
                          ("nstats", nstats, 2 * int((B + widths).sum())),
                          ("nwork", nwork, 2 * max(B, int(widths.max()))),
                          ("wnorm", wnorm, int(widths.sum()))):
        if a.size < size:
            raise ValueError(f"{name}: need {size} elements, got {a.size}")
    if nwork.dtype != np.float64 or wnorm.dtype != np.float64:
        raise TypeError("nwork and wnorm must be float64")


def forward_backward_blocks(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                            drops, residual, norms, seed, counter, training, offsets, acts, zs,
                            fzs, xhats, run_mean, run_var, nstats, nwork, wn, weff, dweff, wnorm,
                            delta, ws=None, gemm=None):
    """Forward, loss and backward; writes ``grads`` (and, training with batch
    norm, the running statistics); returns the mean loss (0-d float64 cupy
    array, a view of ``ws.ctl``)."""
    mm = _cublas if gemm is None else gemm
    sizes, codes = _host(sizes, np.int64), _host(codes, np.int64)
    alphas, drops = _host(alphas, np.float64), _host(drops, np.float64)
    residual, norms = _host(residual, np.int64), _host(norms, np.int64)
    wn, offsets = _host(wn, np.int64), _host(offsets, np.int64)
    B = x.shape[0]
    L = codes.shape[0]
    training = bool(training)
    _check_buffers(acts, zs, fzs, xhats, nstats, nwork, wnorm, delta, B, sizes)
    if ws is None:
        ws = BlocksWorkspace(B, sizes, offsets, loss_kind, params.dtype)
    work = ws.work
    h = x
    act_off = stat_off = col_off = 0
    for l in range(L):
        n_in, n_out = int(sizes[l]), int(sizes[l + 1])
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        fz = fzs[act_off:act_off + B * n_out].reshape(B, n_out)
        if wn[l]:
            _, _, o, ob, og = _weight_norm_slots(offsets, sizes, norms, l)
            W = weff[o:ob].reshape(n_in, n_out)
            _wnorm.weight_norm_forward(params[o:ob].reshape(n_in, n_out), params[og:og + n_out],
                                       W, wnorm[col_off:col_off + n_out], work=work)
        drop, key, thresh, scale, dctr = _drop_args(drops, seed, counter, l)
        if norms[l]:
            gamma, beta, _, _, xhat, mean, rstd, rm, rv = _norm_views(
                params, grads, xhats, nstats, run_mean, run_var, offsets, sizes, norms, B, l,
                act_off, stat_off, col_off)
            mm(h, W, a)
            _norm.norm_forward_epilogue(a, b, h, xhat, fz, gamma, beta, mean, rstd, nwork, rm, rv,
                                        int(norms[l]), training, int(codes[l]), float(alphas[l]),
                                        drop, key, thresh, scale, bool(residual[l]), work=work,
                                        counter=dctr)
        elif drop or residual[l]:
            mm(h, W, a)
            _blocks.block_forward_epilogue(a, b, h, z, fz, int(codes[l]), float(alphas[l]), drop,
                                           key, thresh, scale, bool(residual[l]), counter=dctr)
        else:
            if not _m.needs_z(codes[l]):
                z = a
            mm(h, W, z)
            bias_act(z, b, a, int(codes[l]), float(alphas[l]))
        h = a
        act_off += B * n_out
        stat_off += 2 * (B + n_out)
        col_off += n_out

    n_out = int(sizes[L])
    third = delta.shape[0] // 3
    da = delta[:B * n_out].reshape(B, n_out)
    loss_and_grad(loss_kind, h, labels, target, da, ws)

    ping = 0
    for l in range(L - 1, -1, -1):
        n_in, n_out = int(sizes[l]), int(sizes[l + 1])
        act_off -= B * n_out
        stat_off -= 2 * (B + n_out)
        col_off -= n_out
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        fz = fzs[act_off:act_off + B * n_out].reshape(B, n_out)
        dWt = dW
        if wn[l]:
            _, _, o, ob, og = _weight_norm_slots(offsets, sizes, norms, l)
            W = weff[o:ob].reshape(n_in, n_out)
            dWt = dweff[o:ob].reshape(n_in, n_out)
        res = bool(residual[l])
        if not res:
            fz = a          # f is read back from the layer's output (see blocks)
        drop, key, thresh, scale, dctr = _drop_args(drops, seed, counter, l)
        # dz apart from da in a residual block: the skip gradient still needs da
        dz = delta[2 * third:2 * third + B * n_out].reshape(B, n_out) if res else da
        if norms[l]:
            gamma, beta, dgamma, dbeta, xhat, _, rstd, _, _ = _norm_views(
                params, grads, xhats, nstats, run_mean, run_var, offsets, sizes, norms, B, l,
                act_off, stat_off, col_off)
            _norm.norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta,
                                         nwork[:B], nwork[B:2 * B], int(norms[l]), training,
                                         int(codes[l]), float(alphas[l]), drop, key, thresh,
                                         scale, res, work=work, counter=dctr)
        elif drop or res:
            _blocks.block_backward_epilogue(da, fz, z, dz, db, int(codes[l]), float(alphas[l]),
                                            drop, key, thresh, scale, res, work=work,
                                            counter=dctr)
        else:
            if not _m.needs_z(codes[l]):
                z = a
            bias_act_grad(da, a, z, da, db, int(codes[l]), float(alphas[l]),
                          ws.grad_partials(B, n_out))
        if l > 0:
            hprev = acts[act_off - B * n_in:act_off].reshape(B, n_in)
            mm(hprev.T, dz, dWt)
            nxt = (1 - ping) * third
            dx = delta[nxt:nxt + B * n_in].reshape(B, n_in)
            mm(dz, W.T, dx)
            if res:
                cupy.add(dx, da, out=dx)
            da = dx
            ping = 1 - ping
        else:
            mm(x.T, dz, dWt)
        if wn[l]:
            _, _, o, ob, og = _weight_norm_slots(offsets, sizes, norms, l)
            _wnorm.weight_norm_backward(params[o:ob].reshape(n_in, n_out), params[og:og + n_out],
                                        wnorm[col_off:col_off + n_out], dWt,
                                        grads[o:ob].reshape(n_in, n_out), grads[og:og + n_out],
                                        work=work)
    return ws.loss[0]


def train_step_blocks(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                      drops, residual, norms, seed, counter, training, offsets, acts, zs, fzs,
                      xhats, run_mean, run_var, nstats, nwork, wn, weff, dweff, wnorm, delta,
                      rule, s0, s1, s2, hp, layer_sq, clip_norm, clip_value, ws=None, gemm=None,
                      commit=False):
    """:func:`forward_backward_blocks`, then the optimizer's clipped update;
    returns (loss, grad_norm, clip_scale, skipped) as ``step.train_step``
    (0-d float64 cupy arrays, views of ``ws.ctl``).

    ``commit=True`` (needs ``ws``, a :class:`BlocksWorkspace`) settles on the
    device what the forward changed outside the parameters, by the update's
    skip decision: a device ``counter`` advances by one when the update is
    applied (in training mode), and the running statistics (training mode,
    ``ws.saved_*`` of their size) are put back when it is skipped -- as the
    CPU's TrainStep does on the host.
    """
    B = x.shape[0]
    if ws is None:
        if commit:
            raise ValueError("commit=True needs ws, a BlocksWorkspace")
        ws = BlocksWorkspace(B, sizes, offsets, loss_kind, params.dtype)
    offsets = _host(offsets, np.int64)
    keep_stats = bool(commit and training and run_mean.size and ws.saved_mean.size)
    if keep_stats:
        if ws.saved_mean.size != run_mean.size:
            raise ValueError(f"ws.saved_mean: {ws.saved_mean.size} elements for "
                             f"{run_mean.size} running statistics")
        cupy.copyto(ws.saved_mean, run_mean)
        cupy.copyto(ws.saved_var, run_var)
    loss = forward_backward_blocks(x, labels, target, loss_kind, params, grads, sizes, codes,
                                   alphas, drops, residual, norms, seed, counter, training,
                                   offsets, acts, zs, fzs, xhats, run_mean, run_var, nstats,
                                   nwork, wn, weff, dweff, wnorm, delta, ws=ws, gemm=gemm)
    norm, scale, skipped = _optim.clipped_update(rule, params, grads, s0, s1, s2, hp, offsets,
                                                 layer_sq, clip_norm, clip_value,
                                                 ws=ws.optim_buffers())
    dctr = counter if commit and training and isinstance(counter, cupy.ndarray) else None
    n = run_mean.size if keep_stats else 0
    if dctr is not None or n:
        k = _m.kernel("blocks.cu", "fg_commit_forward")
        k((_m.cover(max(n, 1)),), (_m.THREADS,),
          (ws.ctl, _blocks.null(dctr), run_mean if n else _m.NULL, run_var if n else _m.NULL,
           ws.saved_mean if n else _m.NULL, ws.saved_var if n else _m.NULL, _m.i64(n)))
    return loss, norm, scale, skipped


class GraphedTrainStepBlocks(GraphedTrainStep):
    """:func:`train_step_blocks` (``commit=True``) at one batch size,
    replayed from a CUDA graph when possible: :class:`step.GraphedTrainStep`
    for models with epilogue pieces.

    Parameters: those of :func:`train_step_blocks` without ``x, labels,
    target, hp``, then ``batch`` and the keywords of ``GraphedTrainStep``.
    Everything a step reads that changes between steps is in device memory
    (the dropout step ``counter``, the running statistics, the hp table), so
    a replay computes what an eager call would.  ``training`` is frozen in
    the graph (a graph per mode: ``fastgrad.TrainStep`` keys its graphs by
    it); with dropout in training mode ``counter`` must be a device array --
    an int would freeze one mask into every replay, so it is refused.
    """

    def __init__(self, loss_kind, params, grads, sizes, codes, alphas, drops, residual, norms,
                 seed, counter, training, offsets, acts, zs, fzs, xhats, run_mean, run_var,
                 nstats, nwork, wn, weff, dweff, wnorm, delta, rule, s0, s1, s2, layer_sq,
                 clip_norm, clip_value, batch, use_graph=True, gemm="fastgrad", optim=None):
        training = bool(training)
        drops = _host(drops, np.float64)
        if training and (drops > 0).any() and not isinstance(counter, cupy.ndarray):
            raise ValueError("a graphed step with dropout in training mode needs its dropout "
                             "step in device memory (counter: a 1-element int64 device array);"
                             " an int would freeze one mask into every replay")
        self._n_stats = int(run_mean.size)
        super().__init__(loss_kind, params, grads, sizes, codes, alphas, offsets, acts, zs,
                         delta, rule, s0, s1, s2, layer_sq, clip_norm, clip_value, batch,
                         use_graph=use_graph, gemm=gemm, optim=optim)
        self._epilogue = (drops, _host(residual, np.int64), _host(norms, np.int64), int(seed),
                         counter, training, fzs, xhats, run_mean, run_var, nstats, nwork,
                         _host(wn, np.int64), weff, dweff, wnorm)

    def _workspace(self, dtype, optim):
        return BlocksWorkspace(self.B, self.sizes, self.offsets, self.loss_kind, dtype,
                               n_stats=self._n_stats, optim=optim)

    def _launch(self):
        (params, grads, acts, zs, delta, rule, s0, s1, s2, layer_sq,
         clip_norm, clip_value) = self._bufs
        (drops, residual, norms, seed, counter, training, fzs, xhats, run_mean, run_var, nstats,
         nwork, wn, weff, dweff, wnorm) = self._epilogue
        return train_step_blocks(self.x, self.labels, self.target, self.loss_kind, params, grads,
                                 self.sizes, self.codes, self.alphas, drops, residual, norms,
                                 seed, counter, training, self.offsets, acts, zs, fzs, xhats,
                                 run_mean, run_var, nstats, nwork, wn, weff, dweff, wnorm, delta,
                                 rule, s0, s1, s2, self._hp, layer_sq, clip_norm, clip_value,
                                 ws=self.ws, gemm=self._gemm, commit=True)
