"""The whole training step of an MLP as ONE compiled call: the CPU driver.

forward (GEMM + fused epilogue per layer), loss, backward (fused dz/db pass +
GEMMs per layer, no dx for the first layer), then the optimizer's clipped
update (norm pass + update pass) -- no Python between layers, no allocation:
every buffer is a view into flat arrays the caller allocated once per batch
size.  The network is described by small integer/float arrays, so one
compiled function per dtype serves every depth, width, activation, loss and
optimizer (and caches on disk across processes).

Its entry points: ``train_step`` (the step), ``forward_backward`` (without
the update: ``TrainStep.gradients``), ``train_steps`` (an epoch's steps),
and ``forward`` / ``backward`` apart -- the layer path (``model.forward``,
``model.backward``, ``model.predict``) runs those, the backward from a
given dL/d(output) and with the first layer's dL/dx on request.

One driver serves plain models and models with epilogue pieces (dropout,
residual blocks, batch/layer norm, weight norm).  It is specialised at
compile time on the layer features its package serves (``SERVED_FEATURES``):
each feature's code sits under ``if _<FEATURE>:``, a module constant that
Numba's dead-branch pruning removes before typing, so code of a feature the
package does not serve is never typed nor compiled.  A model's copy of this
package (``fastgrad.registry.cpu_kernels``) serves the model's activations,
loss, update rule and layer features alone: a plain model compiles plain
code only.  The package itself (``FASTGRAD_KERNEL_COPIES=shared``) serves
every feature; a layer without features runs the plain code there too, so
both give the same bits.  A copy must not be given a layer with a feature it
does not serve: it would run that layer as a plain one (TrainStep checks
before it calls; a check in here would cost every cold compile).

Layout of the arguments
-----------------------
sizes   int64 (L+1,)   widths, input first
codes   int64 (L,)     activation codes; alphas float64 (L,)
offsets int64 (L+1,)   layer i's W, b (gamma, beta, g) in
                       params[offsets[i]:offsets[i+1]] (kernels/layout.py)
acts    flat, B * sum(sizes[1:]) -- layer outputs, layer after layer; for
        epilogue pieces followed by their scratch (below)
zs      flat, B * sum(sizes[1:]) when some layer needs z (gelu, silu) or
        the model has epilogue pieces, else acts
delta   flat, 2 * B * max(sizes[1:]) -- ping-pong buffers for dL/da; a third
        such stride with a residual block (its dz: the skip gradient still
        needs dL/da)

The epilogue pieces' data is packed into few arguments, laid out by
:func:`step_plan` (``kernels/layout.py``'s, device-neutral, with this
driver's pass team members: see ``TEAM``): each array argument costs the
compiled wrapper's unboxing code, in every cold compile (a plain model's
too) and every call.

plan    int64   the step plan: a header (``PLAN_*`` slots: the dropout mask
                seed, this step's dropout counter, training mode, the
                offsets of the scratch slices, the thread pool of the
                activation passes, the loss and the update:
                kernels/cpu/pass_team.py)
                then ``PLAN_ROW`` ints per
                layer (residual flag, norm kind of kernels/spec.py, weight
                norm flag)
fplan   float64 dropout rate per layer (L), then float64 scratch: batch
                norm's column sums / layer norm's row sums (``nwork``),
                weight norm's 1 / ||v_j|| per output unit (``wnorm``) and,
                with batch norm, ``train_steps``' copy of the running
                statistics (``PLAN_SAVED``; -1 without batch norm)
run_mean, run_var      float64, sum(sizes[1:]): batch norm running statistics
                (the model's state)

The model-dtype scratch of epilogue pieces lies in ``acts`` after the layer
outputs, at the plan's offsets: f(z) of residual blocks (``PLAN_FZS``, like
the outputs), normalised pre-activations (``PLAN_XHATS``), per layer mean
and 1/std (``PLAN_NSTATS``), the effective W of weight-normalised layers and
its gradient (``PLAN_WEFF``, ``PLAN_DWEFF``, like params).

A plain model passes the plan of :func:`step_plan` with every flag off (the
package serving every feature reads it) and no scratch.
"""
import math
import sys

import numpy as np
from numba import njit

from . import fpenv, pass_team
from ._jit import INLINE, INNER, JIT, code_ladder, not_served, served_codes
from .activations import _unknown, bias_act_grad_inplace, bias_act_step, needs_z, served
from .blocks import _add_into, block_backward_epilogue, block_forward_epilogue, dropout_key
from .gemm import gemm
from .losses import bce_with_logits, mse, softmax_cross_entropy
from .norm import norm_backward_epilogue, norm_forward_epilogue
from .optim import clipped_update_inline, refuse_rule
from .wnorm import weight_norm_backward, weight_norm_forward

from .. import layout as _layout  # noqa: E402
# the step plan (device-neutral: kernels/layout.py); re-exported here
from ..layout import (FEATURES, PLAN_COUNTER, PLAN_DWEFF, PLAN_FZS,  # noqa: E402,F401
                      PLAN_HEADER, PLAN_NORM, PLAN_NSTATS, PLAN_NWORK, PLAN_RESIDUAL,
                      PLAN_ROW, PLAN_SAVED, PLAN_SEED, PLAN_TRAINING, PLAN_WEFF, PLAN_WN,
                      PLAN_WNORM, PLAN_XHATS)
from ..spec import BATCH, BCE_WITH_LOGITS, CROSS_ENTROPY, LOSS_CODES, MSE  # noqa: E402,F401


layer_slots = njit(**INLINE)(_layout.layer_slots)

# The features these kernels serve: all, or in a model's copy of the package
# the model's own.  Module constants: Numba prunes the branches of the
# others before typing them.
SERVED_FEATURES = served_codes(__package__, "FEATURES", FEATURES)
_DROPOUT = "dropout" in SERVED_FEATURES
_NORM = "norm" in SERVED_FEATURES
_RESIDUAL = "residual" in SERVED_FEATURES
_WEIGHT_NORM = "weight_norm" in SERVED_FEATURES
_BLOCKS = _DROPOUT or _RESIDUAL           # the block epilogue (blocks.py)
# Whether the driver has the pass team's branches (pass_team.py): the
# package itself yes; a model's copy only when built for a team
# (fastgrad.registry.cpu_kernels(team=True)).  With them its activation,
# loss and update passes run through the members in its plan, split or not; without
# them it runs its own serial passes and compiles no member.
TEAM = getattr(sys.modules.get(__package__), "_TEAM", True)


def step_plan(sizes, B, n_params, drops, residual, norms, weight_norm, dtype, seed=0,
              empty=np.empty):
    """``kernels/layout.py``'s :func:`~fastgrad.kernels.layout.step_plan`
    for this driver: with the team's branches (``TEAM``) the plan holds the
    pass team's members for ``dtype`` (compiled on first use), and its
    passes run on the calling thread (the host gives a step plan its team:
    ``fastgrad.backend``)."""
    plan, fplan, acts = _layout.step_plan(sizes, B, n_params, drops, residual, norms,
                                          weight_norm, dtype, seed, empty)
    if TEAM:
        pass_team.fill_members(plan, dtype)
    return plan, fplan, acts


_TWO53 = 9007199254740992.0


@njit(**INNER)
def _views(params, grads, acts, zs, offsets, sizes, B, l, act_off):
    n_in, n_out = sizes[l], sizes[l + 1]
    o, ob, _, _, _, _ = layer_slots(offsets[l], n_in, n_out, False, False)
    W = params[o:ob].reshape((n_in, n_out))
    b = params[ob:ob + n_out]
    dW = grads[o:ob].reshape((n_in, n_out))
    db = grads[ob:ob + n_out]
    a = acts[act_off:act_off + B * n_out].reshape((B, n_out))
    z = zs[act_off:act_off + B * n_out].reshape((B, n_out))
    return W, b, dW, db, a, z


@njit(**INLINE)
def _rows(buf, off, B, n):
    return buf[off:off + B * n].reshape((B, n))


@njit(**INLINE)
def _layer(plan, l, k):
    return plan[PLAN_HEADER + PLAN_ROW * l + k]


@njit(**INLINE)
def _drop_rate(plan, fplan, l):
    # eval mode drops nothing
    return fplan[l] if plan[PLAN_TRAINING] != 0 else 0.0


@njit(**INLINE)
def _drop_args(plan, p, l):
    if p > 0.0:
        return (True, dropout_key(plan[PLAN_SEED], l, plan[PLAN_COUNTER]),
                np.uint64(math.ceil(p * _TWO53)), 1.0 / (1.0 - p))
    return False, np.uint64(0), np.uint64(0), 1.0


@njit(**INLINE)
def _norm_views(params, grads, plan, acts, run_mean, run_var, offsets, sizes, kind, B, l,
                act_off, stat_off, col_off):
    n_out = sizes[l + 1]
    _, _, o, ob, _, _ = layer_slots(offsets[l], sizes[l], n_out, True, False)
    gamma, beta = params[o:o + n_out], params[ob:ob + n_out]
    dgamma, dbeta = grads[o:o + n_out], grads[ob:ob + n_out]
    xhat = _rows(acts, plan[PLAN_XHATS] + act_off, B, n_out)
    ns = n_out if kind == BATCH else B
    s = plan[PLAN_NSTATS] + stat_off
    mean, rstd = acts[s:s + ns], acts[s + ns:s + 2 * ns]
    rm, rv = run_mean[col_off:col_off + n_out], run_var[col_off:col_off + n_out]
    return gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv


@njit(**INLINE)
def _weight_norm_views(params, weff, plan, fplan, offsets, sizes, l, col_off, compute):
    """The effective W of layer l in ``weff`` (recomputed when ``compute``)."""
    n_in, n_out = sizes[l], sizes[l + 1]
    o, ob, _, _, og, _ = layer_slots(offsets[l], n_in, n_out, _layer(plan, l, PLAN_NORM) != 0,
                                     True)
    W = weff[o:ob].reshape((n_in, n_out))
    if compute:
        v = params[o:ob].reshape((n_in, n_out))
        g = params[og:og + n_out]
        w = plan[PLAN_WNORM] + col_off
        weight_norm_forward(v, g, W, fplan[w:w + n_out])
    return W


@njit(**INLINE)
def _weight_norm_grads(params, grads, dW, plan, fplan, offsets, sizes, l, col_off):
    n_in, n_out = sizes[l], sizes[l + 1]
    o, ob, _, _, og, _ = layer_slots(offsets[l], n_in, n_out, _layer(plan, l, PLAN_NORM) != 0,
                                     True)
    v = params[o:ob].reshape((n_in, n_out))
    g = params[og:og + n_out]
    dv = grads[o:ob].reshape((n_in, n_out))
    dg = grads[og:og + n_out]
    w = plan[PLAN_WNORM] + col_off
    weight_norm_backward(v, g, fplan[w:w + n_out], dW, dv, dg)


_LOSS_KERNELS = {
    CROSS_ENTROPY: (softmax_cross_entropy, "out, labels, grad"),
    MSE: (mse, "out, target, grad"),
    BCE_WITH_LOGITS: (bce_with_logits, "out, target, grad"),
}
assert set(_LOSS_KERNELS) == set(LOSS_CODES.values()), "a loss of kernels/spec.py has no kernel"
# The losses these kernels serve: all, or in a model's copy of the package
# (fastgrad.registry.cpu_kernels) the model's own; others raise.
SERVED_LOSSES = served_codes(__package__, "LOSSES", LOSS_CODES.values())
_LOSS_REFUSED = not_served(LOSS_CODES, SERVED_LOSSES, "LOSS_CODES", "loss")
loss_and_grad = code_ladder(
    "loss_and_grad", "loss_kind, out, labels, target, grad", "loss_kind",
    [(code,) + _LOSS_KERNELS[code] for code in SERVED_LOSSES], _LOSS_REFUSED)
loss_and_grad.__doc__ = """The mean loss of ``out`` (labels or target, as the
loss ``loss_kind`` reads) and its gradient into ``grad``."""


@njit(**INLINE)
def _forward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, plan, fplan, run_mean,
             run_var):
    # Each feature's code is under `if _FEATURE`: pruned unless served (see
    # the module docstring).  A layer without features runs the plain code.
    B = x.shape[0]
    L = codes.shape[0]
    h = x
    # Not a literal 0: Numba would type the first _views call with
    # Literal[int](0) and compile _views a second time for it (~0.6 s cold).
    act_off = np.int64(0)
    if _BLOCKS or _NORM or _WEIGHT_NORM:
        stat_off = 0
        col_off = 0
        training = plan[PLAN_TRAINING] != 0
        nwork = fplan[plan[PLAN_NWORK]:plan[PLAN_WNORM]]
    for l in range(L):
        n_out = sizes[l + 1]
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        if _WEIGHT_NORM:
            if _layer(plan, l, PLAN_WN) != 0:
                W = _weight_norm_views(params, acts[plan[PLAN_WEFF]:], plan, fplan, offsets,
                                       sizes, l, col_off, True)
        if _NORM and _layer(plan, l, PLAN_NORM) != 0:
            kind = _layer(plan, l, PLAN_NORM)
            gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv = _norm_views(
                params, grads, plan, acts, run_mean, run_var, offsets, sizes, kind, B, l,
                act_off, stat_off, col_off)
            drop, key, thresh, scale = _drop_args(plan, _drop_rate(plan, fplan, l), l)
            gemm(h, W, a)
            norm_forward_epilogue(a, b, h, xhat, _rows(acts, plan[PLAN_FZS] + act_off, B,
                                                       n_out),
                                  gamma, beta, mean, rstd, nwork, rm, rv, kind, training,
                                  codes[l], alphas[l], drop, key, thresh, scale,
                                  _layer(plan, l, PLAN_RESIDUAL) != 0)
        elif _BLOCKS and (_drop_rate(plan, fplan, l) > 0.0
                          or _layer(plan, l, PLAN_RESIDUAL) != 0):
            drop, key, thresh, scale = _drop_args(plan, _drop_rate(plan, fplan, l), l)
            gemm(h, W, a)
            block_forward_epilogue(a, b, h, z, _rows(acts, plan[PLAN_FZS] + act_off, B, n_out),
                                   codes[l], alphas[l], drop, key, thresh, scale,
                                   _layer(plan, l, PLAN_RESIDUAL) != 0)
        else:
            if not needs_z(codes[l]):
                z = a
            gemm(h, W, z)
            if TEAM:      # on the team, or through its member on this thread
                pass_team.forward(plan, pass_team.team_size(plan, B * n_out, codes[l]), z, b,
                                  a, codes[l], alphas[l])
            else:
                bias_act_step(z, b, a, codes[l], alphas[l])
        h = a
        act_off += B * n_out
        if _BLOCKS or _NORM or _WEIGHT_NORM:
            stat_off += 2 * (B + n_out)
            col_off += n_out
    return h



@njit(**INLINE)
def _backward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
              run_mean, run_var):
    # dL/d(output) is in delta's first stride; the forward's buffers are
    # read back.  The first layer's dz and dL/da are left in delta, where
    # backward() reads them for dL/dx (the step needs none).
    B = x.shape[0]
    L = codes.shape[0]
    act_off = np.int64(0)
    for l in range(L):
        act_off += B * sizes[l + 1]
    if _BLOCKS or _NORM or _WEIGHT_NORM:
        stat_off = 0
        col_off = 0
        widest = 0
        training = plan[PLAN_TRAINING] != 0
        nwork = fplan[plan[PLAN_NWORK]:plan[PLAN_WNORM]]
        for l in range(L):
            widest = max(widest, sizes[l + 1])
            stat_off += 2 * (B + sizes[l + 1])
            col_off += sizes[l + 1]
    n_out = sizes[L]
    half = delta.shape[0] // 2
    if _BLOCKS:
        # dL/da ping-pongs between delta's first two strides; the third holds
        # the dz of a residual block.
        half = B * widest
    da = delta[:B * n_out].reshape((B, n_out))

    ping = 0
    for l in range(L - 1, -1, -1):
        act_off -= B * sizes[l + 1]
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        dWt = dW
        if _BLOCKS or _NORM or _WEIGHT_NORM:
            n_out = sizes[l + 1]
            stat_off -= 2 * (B + n_out)
            col_off -= n_out
        if _WEIGHT_NORM:
            if _layer(plan, l, PLAN_WN) != 0:
                W = _weight_norm_views(params, acts[plan[PLAN_WEFF]:], plan, fplan, offsets,
                                       sizes, l, col_off, False)
                dWt = _weight_norm_views(grads, acts[plan[PLAN_DWEFF]:], plan, fplan,
                                         offsets, sizes, l, col_off, False)
        res = False
        if _NORM and _layer(plan, l, PLAN_NORM) != 0:
            kind = _layer(plan, l, PLAN_NORM)
            res = _layer(plan, l, PLAN_RESIDUAL) != 0
            # f is read back from the layer's output, or kept for a block (see blocks)
            fz = _rows(acts, plan[PLAN_FZS] + act_off, B, n_out) if res else a
            gamma, beta, dgamma, dbeta, xhat, mean, rstd, rm, rv = _norm_views(
                params, grads, plan, acts, run_mean, run_var, offsets, sizes, kind, B, l,
                act_off, stat_off, col_off)
            drop, key, thresh, scale = _drop_args(plan, _drop_rate(plan, fplan, l), l)
            dz = _rows(delta, 2 * half, B, n_out) if res else da
            norm_backward_epilogue(da, fz, xhat, gamma, beta, rstd, dz, db, dgamma, dbeta,
                                   nwork[:B], nwork[B:2 * B], kind, training, codes[l],
                                   alphas[l], drop, key, thresh, scale, res)
        elif _BLOCKS and (_drop_rate(plan, fplan, l) > 0.0
                          or _layer(plan, l, PLAN_RESIDUAL) != 0):
            res = _layer(plan, l, PLAN_RESIDUAL) != 0
            fz = _rows(acts, plan[PLAN_FZS] + act_off, B, n_out) if res else a
            drop, key, thresh, scale = _drop_args(plan, _drop_rate(plan, fplan, l), l)
            dz = _rows(delta, 2 * half, B, n_out) if res else da
            block_backward_epilogue(da, fz, z, dz, db, codes[l], alphas[l], drop, key, thresh,
                                    scale, res)
        else:
            if not needs_z(codes[l]):
                z = a
            if TEAM:      # on the team, or through its member on this thread
                pass_team.gradient(plan, pass_team.gradient_team_size(plan, da, codes[l]), da,
                                   a, z, db, codes[l], alphas[l])
            else:
                bias_act_grad_inplace(da, a, z, db, codes[l], alphas[l])
            dz = da
        if l > 0:
            h = acts[act_off - B * sizes[l]:act_off].reshape((B, sizes[l]))
            gemm(h.T, dz, dWt)
            nxt = (1 - ping) * half
            dx = delta[nxt:nxt + B * sizes[l]].reshape((B, sizes[l]))
            gemm(dz, W.T, dx)
            if _BLOCKS:
                if res:
                    _add_into(dx, da)
            da = dx
            ping = 1 - ping
        else:
            gemm(x.T, dz, dWt)
        if _WEIGHT_NORM:
            if _layer(plan, l, PLAN_WN) != 0:
                _weight_norm_grads(params, grads, dWt, plan, fplan, offsets, sizes, l, col_off)




@njit(**INLINE)
def _refuse_layers(plan, params, codes):
    # What the kernels would refuse inside is refused before fpenv.enter: a
    # raise after it would leave flush-to-zero set on the calling thread
    # (kernels/cpu/fpenv.py), and a pass team member cannot raise at all.
    for act in codes:
        if not served(act):
            _unknown(act)
    if TEAM:
        pass_team.check_members(plan, params)


@njit(**INLINE)
def _refuse_loss(plan, loss_kind, labels, target, rows, sizes):
    if loss_kind not in SERVED_LOSSES:
        raise ValueError(_LOSS_REFUSED)
    if TEAM:        # what the loss's member needs of the buffers
        pass_team.check_loss(plan, loss_kind, labels, target, rows, sizes[-1])


@njit(**INLINE)
def _loss(plan, loss_kind, h, labels, target, grad):
    # the loss, through the plan's member where this driver has the team's
    # branches (it then compiles no serial copy)
    if TEAM:
        return pass_team.loss(plan, loss_kind, h, labels, target, grad)
    return loss_and_grad(loss_kind, h, labels, target, grad)


@njit(**INLINE)
def _refuse_update(plan, rule, params, grads, s0, s1, s2, hp):
    if TEAM:        # the rule, and what the members need of the buffers
        pass_team.check_update(plan, rule, params, grads, s0, s1, s2, hp)
    else:
        refuse_rule(rule)


@njit(**INLINE)
def _enter(params, plan, sizes, B):
    """fpenv.enter, and OpenBLAS's workers flushing too when a GEMM of this
    step may run on them (pass_team.workers_mode): where they keep
    denormals, a confident classifier's last-layer GEMMs ran 3x slower
    (bench/RESULTS.md "Denormals").  Returns the caller's mode and whether
    the workers must be cleared on return (:func:`_leave`)."""
    saved = fpenv.enter(params)
    workers = False
    if TEAM:
        # runtime values, not literals: one compile of workers_mode for both calls
        workers = pass_team.workers_mode(plan, sizes, B, B < 0)
    return saved, workers


@njit(**INLINE)
def _leave(plan, sizes, saved, workers):
    if TEAM:
        if workers:
            pass_team.workers_mode(plan, sizes, sizes[0], workers)
    fpenv.leave(saved)


@njit(**JIT)
def forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                     offsets, acts, zs, delta, plan, fplan, run_mean, run_var):
    """Forward, loss and backward; writes ``grads``; returns the mean loss."""
    _refuse_layers(plan, params, codes)
    _refuse_loss(plan, loss_kind, labels, target, x.shape[0], sizes)
    saved, workers = _enter(params, plan, sizes, x.shape[0])
    h = _forward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, plan, fplan,
                 run_mean, run_var)
    loss = _loss(plan, loss_kind, h, labels, target, _rows(delta, 0, x.shape[0], sizes[-1]))
    _backward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
              run_mean, run_var)
    _leave(plan, sizes, saved, workers)
    return loss


@njit(**JIT)
def forward(x, params, sizes, codes, alphas, offsets, acts, zs, plan, fplan, run_mean, run_var):
    """The forward alone (the layer path's ``model.forward`` and
    ``predict``): writes ``acts`` (and, training with batch norm, the
    running statistics); returns the output, a view of ``acts``."""
    _refuse_layers(plan, params, codes)
    saved, workers = _enter(params, plan, sizes, x.shape[0])
    # params stands in for grads: the views the forward takes of them go unused
    h = _forward(x, params, params, sizes, codes, alphas, offsets, acts, zs, plan, fplan,
                 run_mean, run_var)
    _leave(plan, sizes, saved, workers)
    return h


@njit(**JIT)
def backward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
             run_mean, run_var, dx):
    """The backward alone, after :func:`forward` on the same buffers and
    plan: reads dL/d(output) from ``delta``'s first ``B * sizes[-1]``
    elements (and overwrites ``delta``), writes ``grads`` and, when ``dx``
    has rows, dL/dx into it."""
    _refuse_layers(plan, params, codes)
    saved, workers = _enter(params, plan, sizes, x.shape[0])
    _backward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
              run_mean, run_var)
    if dx.shape[0] > 0:
        _first_layer_dx(params, sizes, offsets, acts, delta, plan, x.shape[0], dx)
    _leave(plan, sizes, saved, workers)


@njit(**INLINE)
def _first_layer_dx(params, sizes, offsets, acts, delta, plan, B, dx):
    # Where _backward left the first layer's dL/da (after L - 1 swaps of the
    # ping-pong strides) and, for a residual block, its dz (third stride).
    L = sizes.shape[0] - 1
    n_in, n_out = sizes[0], sizes[1]
    half = delta.shape[0] // 2
    if _BLOCKS:
        widest = 0
        for l in range(L):
            widest = max(widest, sizes[l + 1])
        half = B * widest
    da = _rows(delta, ((L - 1) % 2) * half, B, n_out)
    dz = da
    res = False
    if _RESIDUAL:
        res = _layer(plan, 0, PLAN_RESIDUAL) != 0
        if res:
            dz = _rows(delta, 2 * half, B, n_out)
    o, ob, _, _, _, _ = layer_slots(offsets[0], n_in, n_out, _layer(plan, 0, PLAN_NORM) != 0,
                                    _layer(plan, 0, PLAN_WN) != 0)
    W = params[o:ob].reshape((n_in, n_out))
    if _WEIGHT_NORM:
        if _layer(plan, 0, PLAN_WN) != 0:
            W = acts[plan[PLAN_WEFF] + o:plan[PLAN_WEFF] + ob].reshape((n_in, n_out))
    gemm(dz, W.T, dx)
    if _RESIDUAL:
        if res:
            _add_into(dx, da)


@njit(**INLINE)
def _update(plan, rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm, clip_value):
    # the clipped update, through the plan's members where this driver has
    # the team's branches
    if TEAM:
        return pass_team.clipped_update(plan, rule, p, g, s0, s1, s2, hp, offsets, layer_sq,
                                        clip_norm, clip_value)
    return clipped_update_inline(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm,
                                 clip_value)


@njit(**JIT)
def train_step(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
               offsets, acts, zs, delta, plan, fplan, run_mean, run_var,
               rule, s0, s1, s2, hp, layer_sq, clip_norm, clip_value):
    """forward_backward, then the optimizer's clipped update in place.

    Returns (loss, grad_norm, clip_scale, skipped) -- the update's outputs
    exactly as ``fastgrad.optim``'s ``step()`` gets them from the same kernel.
    """
    _refuse_layers(plan, params, codes)
    _refuse_loss(plan, loss_kind, labels, target, x.shape[0], sizes)
    _refuse_update(plan, rule, params, grads, s0, s1, s2, hp)
    saved, workers = _enter(params, plan, sizes, x.shape[0])
    # Inlined rather than called: LLVM then optimises the step's code once,
    # instead of once for forward_backward and again when linking it here.
    h = _forward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, plan, fplan,
                 run_mean, run_var)
    loss = _loss(plan, loss_kind, h, labels, target, _rows(delta, 0, x.shape[0], sizes[-1]))
    _backward(x, params, grads, sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
              run_mean, run_var)
    norm, scale, skipped = _update(plan, rule, params, grads, s0, s1, s2, hp, offsets, layer_sq,
                                   clip_norm, clip_value)
    _leave(plan, sizes, saved, workers)
    return loss, norm, scale, skipped


@njit(**INLINE)
def gather_batch(X, labels, target, order, lo, batch_size, n_order, xbuf, lbuf, tbuf):
    """The batch of samples ``order[lo : lo + batch_size]`` (cut at
    ``n_order``) copied into the prefixes of ``xbuf`` and ``lbuf`` or
    ``tbuf`` (whichever the loss reads; the other is size 0): the values
    the per-step loop's ``np.take`` gives.  Element loops, not slice
    assignment, whose shape checks cost seconds of compile time."""
    B = min(n_order - lo, batch_size)
    n_lab = labels.shape[0]
    n_tgt = target.shape[0]
    xb = xbuf[:B]
    for i in range(B):
        src = order[lo + i]
        for c in range(X.shape[1]):
            xb[i, c] = X[src, c]
        if n_lab:
            lbuf[i] = labels[src]
        for c in range(target.shape[1] if n_tgt else 0):
            tbuf[i, c] = target[src, c]
    lb = lbuf[:B] if n_lab else lbuf
    tb = tbuf[:B] if n_tgt else tbuf
    return xb, lb, tb


@njit(**INLINE)
def record_step(j, loss, norm, scale, skipped, layer_sq, out_loss, out_norm, out_scale,
                out_skipped, out_layer_sq):
    """Step ``j``'s statistics into the output arrays of an epoch kernel."""
    out_loss[j] = loss
    out_norm[j] = norm
    out_scale[j] = scale
    out_skipped[j] = skipped
    for l in range(layer_sq.shape[0]):
        out_layer_sq[j, l] = layer_sq[l]


@njit(**INLINE)
def _copy_into(dst, src):
    for i in range(dst.shape[0]):
        dst[i] = src[i]


@njit(**JIT)
def train_steps(X, labels, target, order, first, n_steps, batch_size, n_order,
                xbuf, lbuf, tbuf, loss_kind, params, grads, sizes, codes, alphas,
                offsets, acts, zs, delta, plan, fplan, run_mean, run_var,
                rule, s0, s1, s2, hp_rows, layer_sq, clip_norm, clip_value, stop_on_skip,
                out_loss, out_norm, out_scale, out_skipped, out_layer_sq):
    """Steps ``first .. first + n_steps - 1`` of an epoch, in one call.

    Step ``b`` trains on the samples ``order[b * batch_size : (b + 1) *
    batch_size]`` (cut at ``n_order``), gathered into the prefix of
    ``xbuf`` (and ``lbuf`` / ``tbuf``, the loss's labels or target) --
    the buffers of one full batch, reused.  Each step is exactly
    :func:`train_step` on that batch; ``acts``, ``zs`` and ``delta`` are
    sized for a full batch and a smaller last batch uses their prefix.

    ``hp_rows[r]`` is the optimizer's hyper-parameter row for the update
    made after ``r`` updates of this call were applied: a skipped step
    (non-finite gradient) does not advance the count, so the next step
    reuses its row, as the per-step loop would.  ``stop_on_skip`` (the
    optimizer's ``skip_nonfinite=False``) returns right after a skipped
    step so that the caller can raise there.

    Per step ``j`` of the call: ``out_loss[j]``, the gradient norm, clip
    scale, skip flag and the squared per-layer norms (``out_layer_sq[j]``).
    Returns the number of steps run.

    ``plan[PLAN_COUNTER]`` is the dropout counter of the first step; like
    the model's ``dropout_step`` it advances with every applied update (a
    skipped one restores it; it is left at the last step's).  In training
    mode with batch norm the running statistics are saved before each step
    (in ``fplan`` at ``plan[PLAN_SAVED]``) and restored when its update is
    skipped, as the per-step TrainStep does.
    """
    _refuse_layers(plan, params, codes)
    # the members read the gathered batches (of up to min(batch_size, n_order) rows)
    _refuse_loss(plan, loss_kind, lbuf, tbuf, min(batch_size, n_order), sizes)
    _refuse_update(plan, rule, params, grads, s0, s1, s2, hp_rows)
    saved_mode, workers = _enter(params, plan, sizes, batch_size)
    applied = 0
    if _DROPOUT:
        counter = plan[PLAN_COUNTER]
    if _NORM:
        saved = plan[PLAN_SAVED]
        keep = plan[PLAN_TRAINING] != 0 and saved >= 0
        n_stats = run_mean.shape[0]
        saved_mean = fplan[saved:saved + n_stats]
        saved_var = fplan[saved + n_stats:saved + 2 * n_stats]
    for j in range(n_steps):
        xb, lb, tb = gather_batch(X, labels, target, order, (first + j) * batch_size,
                                  batch_size, n_order, xbuf, lbuf, tbuf)
        if _DROPOUT:
            plan[PLAN_COUNTER] = counter + applied
        if _NORM:
            if keep:
                _copy_into(saved_mean, run_mean)
                _copy_into(saved_var, run_var)
        h = _forward(xb, params, grads, sizes, codes, alphas, offsets, acts, zs, plan, fplan,
                     run_mean, run_var)
        loss = _loss(plan, loss_kind, h, lb, tb, _rows(delta, 0, xb.shape[0], sizes[-1]))
        _backward(xb, params, grads, sizes, codes, alphas, offsets, acts, zs, delta, plan,
                  fplan, run_mean, run_var)
        norm, scale, skipped = _update(plan, rule, params, grads, s0, s1, s2, hp_rows[applied],
                                       offsets, layer_sq, clip_norm, clip_value)
        record_step(j, loss, norm, scale, skipped, layer_sq, out_loss, out_norm, out_scale,
                    out_skipped, out_layer_sq)
        if skipped:
            if _NORM:
                if keep:
                    _copy_into(run_mean, saved_mean)
                    _copy_into(run_var, saved_var)
            if stop_on_skip:
                _leave(plan, sizes, saved_mode, workers)
                return j + 1
        else:
            applied += 1
    _leave(plan, sizes, saved_mode, workers)
    return n_steps
