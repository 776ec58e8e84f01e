"""The whole training step of an MLP as ONE compiled call.

forward (GEMM + fused epilogue per layer), loss, backward (fused dz/db pass +
GEMMs per layer, no dx for the first layer), then the optimizer's clipped
update (norm pass + update pass) -- no Python between layers, no allocation:
every buffer is a view into flat arrays the caller allocated once per batch
size.  The network is described by small integer/float arrays, so one
compiled function per dtype serves every depth, width, activation, loss and
optimizer (and caches on disk across processes); a model's copy of this
package (``fastgrad.registry.cpu_kernels``) compiles its own activations,
loss and update rule alone.

Layout of the arguments
-----------------------
sizes   int64 (L+1,)   widths, input first
codes   int64 (L,)     activation codes; alphas float64 (L,)
offsets int64 (L+1,)   layer i's W then b in params[offsets[i]:offsets[i+1]]
                       (kernels/layout.py)
acts    flat, B * sum(sizes[1:]) -- layer outputs, layer after layer
zs      flat, same length as acts when some layer needs z (gelu, silu), else acts
delta   flat, 2 * B * max(sizes[1:]) -- ping-pong buffers for dL/da
"""
import numpy as np
from numba import njit

from ._jit import INLINE, JIT, code_ladder, served_codes
from .activations import bias_act, bias_act_grad, needs_z
from .losses import bce_with_logits, mse, softmax_cross_entropy
from .optim import clipped_update_inline as clipped_update

from .. import layout as _layout  # noqa: E402
from ..spec import BCE_WITH_LOGITS, CROSS_ENTROPY, LOSS_CODES, MSE  # noqa: E402,F401


layer_slots = njit(**INLINE)(_layout.layer_slots)


@njit(**JIT)
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


_LOSS_KERNELS = {
    CROSS_ENTROPY: (softmax_cross_entropy, "out, labels, grad"),
    MSE: (mse, "out, target, grad"),
    BCE_WITH_LOGITS: (bce_with_logits, "out, target, grad"),
}
assert set(_LOSS_KERNELS) == set(LOSS_CODES.values()), "a loss of kernels/spec.py has no kernel"
# The losses these kernels serve: all, or in a model's copy of the package
# (fastgrad.registry.cpu_kernels) the model's own; others raise.
SERVED_LOSSES = served_codes(__package__, "LOSSES", LOSS_CODES.values())
loss_and_grad = code_ladder(
    "loss_and_grad", "loss_kind, out, labels, target, grad", "loss_kind",
    [(code,) + _LOSS_KERNELS[code] for code in SERVED_LOSSES],
    "loss code not served by these kernels: they serve "
    f"{[n for n, c in LOSS_CODES.items() if c in SERVED_LOSSES]} (kernels/spec.py "
    "LOSS_CODES; a model's copy of the kernels serves the model's loss alone)")
loss_and_grad.__doc__ = """The mean loss of ``out`` (labels or target, as the
loss ``loss_kind`` reads) and its gradient into ``grad``."""


@njit(**INLINE)
def _forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                      offsets, acts, zs, delta):
    B = x.shape[0]
    L = codes.shape[0]
    h = x
    # Not a literal 0: Numba would type the first _views call with
    # Literal[int](0) and compile _views a second time for it (~0.6 s cold).
    act_off = np.int64(0)
    for l in range(L):
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        if not needs_z(codes[l]):
            z = a
        np.dot(h, W, z)
        bias_act(z, b, a, codes[l], alphas[l])
        h = a
        act_off += B * sizes[l + 1]

    n_out = sizes[L]
    half = delta.shape[0] // 2
    da = delta[:B * n_out].reshape((B, n_out))
    loss = loss_and_grad(loss_kind, h, labels, target, da)

    ping = 0
    for l in range(L - 1, -1, -1):
        act_off -= B * sizes[l + 1]
        W, b, dW, db, a, z = _views(params, grads, acts, zs, offsets, sizes, B, l, act_off)
        if not needs_z(codes[l]):
            z = a
        bias_act_grad(da, a, z, da, db, codes[l], alphas[l])
        if l > 0:
            h = acts[act_off - B * sizes[l]:act_off].reshape((B, sizes[l]))
            np.dot(h.T, da, dW)
            nxt = (1 - ping) * half
            dx = delta[nxt:nxt + B * sizes[l]].reshape((B, sizes[l]))
            np.dot(da, W.T, dx)
            da = dx
            ping = 1 - ping
        else:
            np.dot(x.T, da, dW)
    return loss


@njit(**JIT)
def forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
                     offsets, acts, zs, delta):
    """Forward, loss and backward; writes ``grads``; returns the mean loss."""
    return _forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes,
                             alphas, offsets, acts, zs, delta)


@njit(**JIT)
def train_step(x, labels, target, loss_kind, params, grads, sizes, codes, alphas,
               offsets, acts, zs, delta,
               rule, s0, s1, s2, hp, layer_sq, clip_norm, clip_value):
    """forward_backward, then the optimizer's clipped update in place.

    Returns (loss, grad_norm, clip_scale, skipped) -- the update's outputs
    exactly as ``fastgrad.optim``'s ``step()`` gets them from the same kernel.
    """
    # Inlined rather than called: LLVM then optimises the step's code once,
    # instead of once for forward_backward and again when linking it here.
    loss = _forward_backward(x, labels, target, loss_kind, params, grads, sizes, codes,
                             alphas, offsets, acts, zs, delta)
    norm, scale, skipped = clipped_update(rule, params, grads, s0, s1, s2, hp, offsets,
                                          layer_sq, clip_norm, clip_value)
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


@njit(**JIT)
def train_steps(X, labels, target, order, first, n_steps, batch_size, n_order,
                xbuf, lbuf, tbuf, loss_kind, params, grads, sizes, codes, alphas,
                offsets, acts, zs, delta,
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
    """
    applied = 0
    for j in range(n_steps):
        xb, lb, tb = gather_batch(X, labels, target, order, (first + j) * batch_size,
                                  batch_size, n_order, xbuf, lbuf, tbuf)
        loss = _forward_backward(xb, lb, tb, loss_kind, params, grads, sizes, codes,
                                 alphas, offsets, acts, zs, delta)
        norm, scale, skipped = clipped_update(rule, params, grads, s0, s1, s2, hp_rows[applied],
                                              offsets, layer_sq, clip_norm, clip_value)
        record_step(j, loss, norm, scale, skipped, layer_sq, out_loss, out_norm, out_scale,
                    out_skipped, out_layer_sq)
        if skipped:
            if stop_on_skip:
                return j + 1
        else:
            applied += 1
    return n_steps
