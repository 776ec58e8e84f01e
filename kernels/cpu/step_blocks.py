"""The whole training step of a model with dropout or residual blocks, as ONE
compiled call.

The same step as ``step.train_step`` (forward, loss, backward, clipped
update), plus per layer a dropout rate and a residual flag.  Layers with
neither run exactly the plain layers' code; the others run the block kernels
of ``blocks``.  A separate module and function on purpose: plain models keep
compiling only ``step.train_step``, whose cold compile time stays as it was.

Layout of the arguments (beyond ``step.train_step``'s)
------------------------------------------------------
drops    float64 (L,)  dropout rate per layer, 0 where off (all 0 in eval mode)
residual int64 (L,)    1 for a residual block
norms    int64 (L,)    0, or norm.LAYER / norm.BATCH (gamma, beta follow b in params)
seed, counter          the model's mask seed and this step's dropout counter
training               batch norm uses (and updates) batch statistics
run_mean, run_var      float64, sum(sizes[1:]): batch norm running statistics
xhats    flat like acts (normalised pre-activations; may be acts when no norm)
nstats   model dtype, 2 * sum(B + sizes[1:]): per layer mean and 1/std used
nwork    float64, 2 * max(B, max(sizes[1:])): batch norm's column sums in
         forward, layer norm's per-row sums in backward
wn       int64 (L,)    1 for a weight-normalised layer (v where W would be, g last)
weff, dweff            flat like params: effective W and its gradient (scratch)
wnorm    float64, sum(sizes[1:]): 1 / ||v_j|| per output unit
zs       flat, B * sum(sizes[1:]) -- pre-activations (gelu's, silu's derivatives)
fzs      flat, same length -- f(z) of residual blocks (their output is x + f(z));
         the other layers' backward reads f from their output
delta    flat, 3 * B * max(sizes[1:]) -- dL/da ping-pong, plus dz of a
         residual block (the skip gradient still needs dL/da)
"""
import math

import numpy as np
from numba import njit

from ._jit import INLINE, JIT
from .activations import bias_act, bias_act_grad, needs_z
from .blocks import block_backward_epilogue, block_forward_epilogue, dropout_key
from .norm import BATCH, norm_backward_epilogue, norm_forward_epilogue
from .wnorm import weight_norm_backward, weight_norm_forward
from .optim import clipped_update_inline as clipped_update
from .step import _views, gather_batch, layer_slots, loss_and_grad, record_step

_TWO53 = 9007199254740992.0


@njit(**INLINE)
def _layer_views(params, grads, acts, zs, fzs, offsets, sizes, B, l, act_off):
    W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
    n_out = sizes[l + 1]
    fz = fzs[act_off:act_off + B * n_out].reshape((B, n_out))
    return W, b, dW, db, a, z, fz


@njit(**INLINE)
def _drop_args(drops, seed, counter, l):
    p = drops[l]
    if p > 0.0:
        return (True, dropout_key(seed, l, counter), np.uint64(math.ceil(p * _TWO53)),
                1.0 / (1.0 - p))
    return False, np.uint64(0), np.uint64(0), 1.0


@njit(**INLINE)
def _add_into(dst, src):
    for i in range(dst.shape[0]):
        for j in range(dst.shape[1]):
            dst[i, j] += src[i, j]


@njit(**INLINE)
def _norm_views(params, grads, xhats, nstats, run_mean, run_var, offsets, sizes, norms, B, l,
                act_off, stat_off, col_off):
    n_out = sizes[l + 1]
    _, _, o, ob, _, _ = layer_slots(offsets[l], sizes[l], n_out, True, False)
    gamma, beta = params[o:o + n_out], params[ob:ob + n_out]
    dgamma, dbeta = grads[o:o + n_out], grads[ob:ob + n_out]
    xhat = xhats[act_off:act_off + B * n_out].reshape((B, n_out))
    ns = n_out if norms[l] == BATCH else B
    mean, rstd = nstats[stat_off:stat_off + ns], nstats[stat_off + ns:stat_off + 2 * ns]
    rm, rv = run_mean[col_off:col_off + n_out], run_var[col_off:col_off + n_out]
    return gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv


@njit(**INLINE)
def _weight_norm_views(params, weff, wnorm, offsets, sizes, norms, l, col_off, compute):
    """The effective W of layer l in ``weff`` (recomputed when ``compute``)."""
    n_in, n_out = sizes[l], sizes[l + 1]
    o, ob, _, _, og, _ = layer_slots(offsets[l], n_in, n_out, norms[l] != 0, True)
    W = weff[o:ob].reshape((n_in, n_out))
    if compute:
        v = params[o:ob].reshape((n_in, n_out))
        g = params[og:og + n_out]
        weight_norm_forward(v, g, W, wnorm[col_off:col_off + n_out])
    return W


@njit(**INLINE)
def _weight_norm_grads(params, grads, dW, wnorm, offsets, sizes, norms, l, col_off):
    n_in, n_out = sizes[l], sizes[l + 1]
    o, ob, _, _, og, _ = layer_slots(offsets[l], n_in, n_out, norms[l] != 0, True)
    v = params[o:ob].reshape((n_in, n_out))
    g = params[og:og + n_out]
    dv = grads[o:ob].reshape((n_in, n_out))
    dg = grads[og:og + n_out]
    weight_norm_backward(v, g, wnorm[col_off:col_off + n_out], dW, dv, dg)


@njit(**INLINE)
def _forward_backward_blocks(x, labels, target, loss_kind, params, grads, sizes, codes,
                             alphas, drops, residual, norms, seed, counter, training, offsets,
                             acts, zs, fzs, xhats, run_mean, run_var, nstats, nwork, wn, weff,
                             dweff, wnorm, delta):
    B = x.shape[0]
    L = codes.shape[0]
    h = x
    # Not a literal 0: the first _views call would be typed with
    # Literal[int](0) and compile _views a second time (see step.py).
    act_off = np.int64(0)
    stat_off = 0
    col_off = 0
    for l in range(L):
        W, b, dW, db, a, z, fz = _layer_views(params, grads, acts, zs, fzs, offsets, sizes,
                                              B, l, act_off)
        if wn[l] != 0:
            W = _weight_norm_views(params, weff, wnorm, offsets, sizes, norms, l, col_off, True)
        if norms[l] != 0:
            gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv = _norm_views(
                params, grads, xhats, nstats, run_mean, run_var, offsets, sizes, norms, B, l,
                act_off, stat_off, col_off)
            drop, key, thresh, scale = _drop_args(drops, seed, counter, l)
            np.dot(h, W, a)
            norm_forward_epilogue(a, b, h, xhat, fz, gamma, beta, mean, rstd, nwork, rm, rv,
                                  norms[l], training, codes[l], alphas[l], drop, key, thresh,
                                  scale, residual[l] != 0)
        elif drops[l] > 0.0 or residual[l] != 0:
            drop, key, thresh, scale = _drop_args(drops, seed, counter, l)
            np.dot(h, W, a)
            block_forward_epilogue(a, b, h, z, fz, codes[l], alphas[l], drop, key, thresh,
                                   scale, residual[l] != 0)
        else:
            if not needs_z(codes[l]):
                z = a
            np.dot(h, W, z)
            bias_act(z, b, a, codes[l], alphas[l])
        h = a
        act_off += B * sizes[l + 1]
        stat_off += 2 * (B + sizes[l + 1])
        col_off += sizes[l + 1]

    n_out = sizes[L]
    third = delta.shape[0] // 3
    da = delta[:B * n_out].reshape((B, n_out))
    loss = loss_and_grad(loss_kind, h, labels, target, da)

    ping = 0
    for l in range(L - 1, -1, -1):
        act_off -= B * sizes[l + 1]
        stat_off -= 2 * (B + sizes[l + 1])
        col_off -= sizes[l + 1]
        W, b, dW, db, a, z, fz = _layer_views(params, grads, acts, zs, fzs, offsets, sizes,
                                              B, l, act_off)
        dWt = dW
        if wn[l] != 0:
            W = _weight_norm_views(params, weff, wnorm, offsets, sizes, norms, l, col_off, False)
            dWt = _weight_norm_views(grads, dweff, wnorm, offsets, sizes, norms, l, col_off, False)
        res = residual[l] != 0
        if not res:
            fz = a      # f is read back from the layer's output (see blocks)
        if norms[l] != 0:
            gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv = _norm_views(
                params, grads, xhats, nstats, run_mean, run_var, offsets, sizes, norms, B, l,
                act_off, stat_off, col_off)
            drop, key, thresh, scale = _drop_args(drops, seed, counter, l)
            dz = da
            if res:
                dz = delta[2 * third:2 * third + B * sizes[l + 1]].reshape((B, sizes[l + 1]))
            norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta,
                                   nwork[:B], nwork[B:2 * B], norms[l], training, codes[l],
                                   alphas[l], drop, key, thresh, scale, res)
        elif drops[l] > 0.0 or res:
            drop, key, thresh, scale = _drop_args(drops, seed, counter, l)
            dz = da
            if res:
                dz = delta[2 * third:2 * third + B * sizes[l + 1]].reshape((B, sizes[l + 1]))
            block_backward_epilogue(da, fz, z, dz, db, codes[l], alphas[l], drop, key, thresh,
                                    scale, res)
        else:
            if not needs_z(codes[l]):
                z = a
            bias_act_grad(da, a, z, da, db, codes[l], alphas[l])
            dz = da
        if l > 0:
            hprev = acts[act_off - B * sizes[l]:act_off].reshape((B, sizes[l]))
            np.dot(hprev.T, dz, dWt)
            nxt = (1 - ping) * third
            dx = delta[nxt:nxt + B * sizes[l]].reshape((B, sizes[l]))
            np.dot(dz, W.T, dx)
            if res:
                _add_into(dx, da)
            da = dx
            ping = 1 - ping
        else:
            np.dot(x.T, dz, dWt)
        if wn[l] != 0:
            _weight_norm_grads(params, grads, dWt, wnorm, offsets, sizes, norms, l, col_off)
    return loss


@njit(**JIT)
def forward_backward_blocks(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                            drops, residual, norms, seed, counter, training, offsets, acts, zs,
                            fzs, xhats, run_mean, run_var, nstats, nwork, wn, weff, dweff, wnorm,
                            delta):
    """Forward, loss and backward; writes ``grads``; returns the mean loss."""
    return _forward_backward_blocks(x, labels, target, loss_kind, params, grads, sizes, codes,
                                    alphas, drops, residual, norms, seed, counter, training,
                                    offsets, acts, zs, fzs, xhats, run_mean, run_var, nstats,
                                    nwork, wn, weff, dweff, wnorm, delta)


@njit(**JIT)
def train_step_blocks(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                      drops, residual, norms, seed, counter, training, offsets, acts, zs, fzs,
                      xhats, run_mean, run_var, nstats, nwork, wn, weff, dweff, wnorm, delta,
                      rule, s0, s1, s2, hp, layer_sq, clip_norm, clip_value):
    """:func:`forward_backward_blocks`, then the optimizer's clipped update;
    returns (loss, grad_norm, clip_scale, skipped) as ``step.train_step``."""
    loss = _forward_backward_blocks(x, labels, target, loss_kind, params, grads, sizes, codes,
                                    alphas, drops, residual, norms, seed, counter, training,
                                    offsets, acts, zs, fzs, xhats, run_mean, run_var, nstats,
                                    nwork, wn, weff, dweff, wnorm, delta)
    norm, scale, skipped = clipped_update(rule, params, grads, s0, s1, s2, hp, offsets,
                                          layer_sq, clip_norm, clip_value)
    return loss, norm, scale, skipped


@njit(**JIT)
def train_steps_blocks(X, labels, target, order, first, n_steps, batch_size, n_order,
                       xbuf, lbuf, tbuf, loss_kind, params, grads, sizes, codes, alphas,
                       drops, residual, norms, seed, counter, training, offsets, acts, zs, fzs,
                       xhats, run_mean, run_var, saved_mean, saved_var, nstats, nwork, wn, weff,
                       dweff, wnorm, delta,
                       rule, s0, s1, s2, hp_rows, layer_sq, clip_norm, clip_value, stop_on_skip,
                       out_loss, out_norm, out_scale, out_skipped, out_layer_sq):
    """``step.train_steps`` for the block models: steps ``first ..
    first + n_steps - 1`` of an epoch, each exactly :func:`train_step_blocks`
    on its gathered batch.

    ``counter`` is the dropout counter of the first step; like the model's
    ``dropout_step`` it advances with every applied update (a skipped one
    restores it).  With ``saved_mean``/``saved_var`` of run_mean's size
    (training with batch norm) the running statistics are saved before each
    step and restored when its update is skipped, as the per-step
    TrainStep does; size 0 leaves them alone.  Returns the number of steps
    run (see ``step.train_steps`` for the other arguments)."""
    applied = 0
    keep = saved_mean.shape[0] > 0
    for j in range(n_steps):
        xb, lb, tb = gather_batch(X, labels, target, order, (first + j) * batch_size,
                                  batch_size, n_order, xbuf, lbuf, tbuf)
        if keep:
            for i in range(run_mean.shape[0]):
                saved_mean[i] = run_mean[i]
                saved_var[i] = run_var[i]
        loss = _forward_backward_blocks(xb, lb, tb, loss_kind, params, grads, sizes, codes,
                                        alphas, drops, residual, norms, seed, counter + applied,
                                        training, offsets, acts, zs, fzs, xhats, run_mean,
                                        run_var, nstats, nwork, wn, weff, dweff, wnorm, delta)
        norm, scale, skipped = clipped_update(rule, params, grads, s0, s1, s2, hp_rows[applied],
                                              offsets, layer_sq, clip_norm, clip_value)
        record_step(j, loss, norm, scale, skipped, layer_sq, out_loss, out_norm, out_scale,
                    out_skipped, out_layer_sq)
        if skipped:
            if keep:
                for i in range(run_mean.shape[0]):
                    run_mean[i] = saved_mean[i]
                    run_var[i] = saved_var[i]
            if stop_on_skip:
                return j + 1
        else:
            applied += 1
    return n_steps
