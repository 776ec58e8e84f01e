"""Clipped optimizer updates on flat buffers: SGD, Adam, AdamW, RMSprop.

One entry, :func:`clipped_update`, does the whole step of every rule in two
passes over memory:

1. ``reduce.layer_sumsq``: squared global norm and per-layer norms of ``g``
   (float64 accumulation).  A non-finite norm stops here: nothing is written
   to ``p`` or to the optimizer state.
2. In place on ``p`` and the state buffers, per element: the clip coefficient
   ``min(1, clip_norm / (norm + 1e-6))`` exactly as
   ``torch.nn.utils.clip_grad_norm_``, then clip-by-value as
   ``torch.nn.utils.clip_grad_value_``, then the rule, written operation by
   operation as PyTorch's single-tensor implementations (``torch/optim/*.py``)
   so that float64 trajectories agree with PyTorch to rounding.

The entry is an ``@njit`` function so that a whole-step kernel
(``fastgrad.step.TrainStep``) can call it from compiled code; the Python
optimizers of ``fastgrad.optim`` call the very same function, so both give
bitwise the same parameters.

State buffers by rule (unused ones are size-0 arrays of the parameters' dtype):

========  ==============  ===================  ================
rule      s0              s1                   s2
========  ==============  ===================  ================
SGD       momentum_buffer  --                   --
ADAM      exp_avg (m)     exp_avg_sq (v)       max_exp_avg_sq (amsgrad)
ADAMW     exp_avg (m)     exp_avg_sq (v)       max_exp_avg_sq (amsgrad)
RMSPROP   square_avg      momentum_buffer      grad_avg (centered)
========  ==============  ===================  ================

``hp`` is a float64 array of ``HP_SIZE`` per-update hyper-parameters, filled
on the host (``fastgrad.optim``) for the update about to be made; each rule
reads only its own slots (indices ``HP_*`` below).  With parameter groups
(several sets of hyper-parameters in one update) ``hp`` is 2-D instead: one
row per contiguous segment of the flat buffer, in buffer order, each row's
``HP_END`` holding the end of its segment (the first starts at 0, each next
one where the previous ended; the last ends at ``p.size``).  A group owning
several non-adjacent segments repeats its row.  The 1-D row stays the
single-group case, compiled as before: the dimension is a compile-time
constant in Numba, so a single-group step never compiles the segment loop.

No ``fastmath`` but ``reassoc`` on the norm's float64 block sums
(kernels/cpu/reduce.py): the non-finite test must see NaN and Inf, and the
float64 path must round like PyTorch.  The passes are memory bound, so the
fused arithmetic costs nothing measurable.  ``clipped_update`` is serial;
``clipped_update_parallel`` (the optimizers' own ``step()``, ``opt.parallel``)
and the team update (``pass_team.clipped_update``, on OpenBLAS's
workers or the shared pool) are bitwise equal to it (bench/RESULTS.md has
them measured).
"""
import numpy as np
from numba import njit, prange

from . import fpenv
from .mathfn import divide_by_invariant
from ._jit import INLINE, JIT, not_served, served_ladder
from .reduce import layer_sumsq, layer_sumsq_parallel

# Rule codes and hp slots are shared with the CUDA twin: kernels/spec.py.
from ..spec import (ADAM, ADAMW, HP_ALPHA, HP_AMSGRAD, HP_BETA1, HP_BETA2,  # noqa: E402,F401
                    HP_BIAS_CORR1, HP_BIAS_CORR2, HP_CENTERED, HP_DAMPENING, HP_EPS,
                    HP_END, HP_FIRST, HP_LR, HP_MAXIMIZE, HP_MOMENTUM, HP_NESTEROV, HP_SIZE,
                    HP_UPDATE, HP_WEIGHT_DECAY, RMSPROP, RULES, SGD)


@njit(**dict(JIT, **INLINE))
def _lerp(a, b, lt, c):
    # torch.lerp's CPU formula: a + w*(b - a) when w < 0.5, else
    # b - (b - a)*(1 - w).  Written branch-free, with the caller passing
    # lt = (w < 0.5) and c = w or -(1 - w), so that the loop vectorises;
    # b + (-(1-w))*(b - a) rounds exactly like b - (b - a)*(1 - w).
    return (a if lt else b) + c * (b - a)


@njit(**dict(JIT, **INLINE))
def _clip_bounds(p, scale, clip_value):
    """The clip scale and the clip-by-value bounds ``(scale, -cv, cv)`` in
    ``p``'s dtype.  Clip-by-value always runs: an infinite bound leaves the
    (finite) gradient alone."""
    f = p.dtype.type
    cv = f(clip_value) if clip_value > 0 else f(np.inf)
    return f(scale), -cv, cv


@njit(**dict(JIT, **INLINE))
def _clip(gi, sc, lo, hi):
    # clip by norm (the scale), then by value
    return min(max(gi * sc, lo), hi)


@njit(**JIT)
def _adam_range(p, g, m, v, vmax, scale, clip_value, hp, decoupled):
    f = p.dtype.type
    sc, ncv, cv = _clip_bounds(p, scale, clip_value)
    lr = hp[HP_LR]
    wd = hp[HP_WEIGHT_DECAY]
    # AdamW multiplies p by (1 - lr*wd), Adam adds wd*p to the gradient; the
    # neutral values (1 and 0) are exact no-ops, so one loop serves both
    l2 = f(0.0) if decoupled else f(wd)
    decay = f(1.0 - lr * wd) if decoupled else f(1.0)
    w1 = 1.0 - hp[HP_BETA1]
    lt1 = w1 < 0.5
    c1 = f(w1) if lt1 else f(-(1.0 - w1))
    b2 = f(hp[HP_BETA2])
    w2 = f(1.0 - hp[HP_BETA2])
    eps = f(hp[HP_EPS])
    nstep = f(-(lr / hp[HP_BIAS_CORR1]))
    bc2s = f(np.sqrt(hp[HP_BIAS_CORR2]))
    inv_bc2s = 1.0 / np.float64(bc2s)      # sqrt(v) / bc2s below, without a division
    if hp[HP_AMSGRAD] != 0.0:
        for i in range(p.shape[0]):
            pi = p[i] * decay
            gi = _clip(g[i], sc, ncv, cv) + l2 * pi
            mi = _lerp(m[i], gi, lt1, c1)
            vi = v[i] * b2 + w2 * gi * gi
            vm = max(vmax[i], vi)
            m[i] = mi
            v[i] = vi
            vmax[i] = vm
            p[i] = pi + nstep * (mi / (divide_by_invariant(np.sqrt(vm), bc2s, inv_bc2s) + eps))
    else:
        for i in range(p.shape[0]):
            pi = p[i] * decay
            gi = _clip(g[i], sc, ncv, cv) + l2 * pi
            mi = _lerp(m[i], gi, lt1, c1)
            vi = v[i] * b2 + w2 * gi * gi
            m[i] = mi
            v[i] = vi
            p[i] = pi + nstep * (mi / (divide_by_invariant(np.sqrt(vi), bc2s, inv_bc2s) + eps))


@njit(**JIT)
def _sgd_range(p, g, buf, scale, clip_value, hp):
    f = p.dtype.type
    sc, ncv, cv = _clip_bounds(p, scale, clip_value)
    nlr = f(-hp[HP_LR])
    wd = f(hp[HP_WEIGHT_DECAY])
    mom = f(hp[HP_MOMENTUM])
    w = f(1.0 - hp[HP_DAMPENING])
    if hp[HP_MOMENTUM] == 0.0:
        for i in range(p.shape[0]):
            pi = p[i]
            gi = _clip(g[i], sc, ncv, cv) + wd * pi
            p[i] = pi + nlr * gi
        return
    first = hp[HP_FIRST] != 0.0
    nesterov = hp[HP_NESTEROV] != 0.0
    for i in range(p.shape[0]):
        pi = p[i]
        gi = _clip(g[i], sc, ncv, cv) + wd * pi
        # torch sets the buffer to the first gradient, undampened
        bi = gi if first else buf[i] * mom + w * gi
        buf[i] = bi
        d = gi + mom * bi if nesterov else bi
        p[i] = pi + nlr * d


@njit(**JIT)
def _rmsprop_range(p, g, sq, buf, gavg, scale, clip_value, hp):
    f = p.dtype.type
    sc, ncv, cv = _clip_bounds(p, scale, clip_value)
    nlr = f(-hp[HP_LR])
    wd = f(hp[HP_WEIGHT_DECAY])
    alpha = f(hp[HP_ALPHA])
    wa = 1.0 - hp[HP_ALPHA]
    wsq = f(wa)
    lta = wa < 0.5
    ca = f(wa) if lta else f(-(1.0 - wa))
    eps = f(hp[HP_EPS])
    mom = f(hp[HP_MOMENTUM])
    centered = hp[HP_CENTERED] != 0.0
    use_mom = hp[HP_MOMENTUM] > 0.0
    for i in range(p.shape[0]):
        pi = p[i]
        gi = _clip(g[i], sc, ncv, cv) + wd * pi
        si = sq[i] * alpha + wsq * gi * gi
        sq[i] = si
        if centered:
            ai = _lerp(gavg[i], gi, lta, ca)
            gavg[i] = ai
            # where the squares' average overflowed (a finite float32
            # gradient of ~1e19), ai * ai does too: inf - inf wrote NaN into
            # the parameter; the variance is inf (torch's fused subtraction
            # gives it) and the update 0
            var = si if si == np.inf else si + (-ai) * ai
            avg = np.sqrt(var) + eps
        else:
            avg = np.sqrt(si) + eps
        if use_mom:
            bi = buf[i] * mom + gi / avg
            buf[i] = bi
            p[i] = pi + nlr * bi
        else:
            p[i] = pi + nlr * (gi / avg)


# Each rule's kernel and its arguments in the rule ladder.  Adam and AdamW
# pass a run-time flag, not the literals True/False: Numba would compile
# _adam_range twice (once per Literal[bool]), ~0.6 s of a cold start.
_RULE_KERNELS = {
    SGD: (_sgd_range, "p, g, s0, scale, clip_value, hp"),
    ADAM: (_adam_range, f"p, g, s0, s1, s2, scale, clip_value, hp, rule == {ADAMW}"),
    ADAMW: (_adam_range, f"p, g, s0, s1, s2, scale, clip_value, hp, rule == {ADAMW}"),
    RMSPROP: (_rmsprop_range, "p, g, s0, s1, s2, scale, clip_value, hp"),
}
# The rules these kernels serve: all of them, or in a model's copy of the
# package (fastgrad.registry.cpu_kernels) the model's own; others raise.
_rule_ladder, SERVED_RULES = served_ladder(
    "_rule_ladder", "rule, p, g, s0, s1, s2, hp, scale, clip_value", "rule", _RULE_KERNELS,
    __package__, "RULES", RULES, "RULES", "update rule")
_RULE_REFUSED = not_served(RULES, SERVED_RULES, "RULES", "update rule")


@njit(**INLINE)
def refuse_rule(rule):
    """Raise unless these kernels serve update ``rule`` (what the rule
    ladder raises inside a kernel, checked before one starts)."""
    if rule not in SERVED_RULES:
        raise ValueError(_RULE_REFUSED)


@njit(**dict(JIT, **INLINE))
def _update_range(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, hi):
    # The rules loop over views from 0: with a loop index starting at an
    # arbitrary lo, Numba's negative-index wraparound stays in the loop body
    # and LLVM does not vectorise it (3.6 ms instead of 0.7 ms per 1M float32).
    p = p[lo:hi]
    g = g[lo:hi]
    s0 = s0[lo:hi]
    s1 = s1[lo:hi]
    s2 = s2[lo:hi]
    # maximize (torch): the rule sees -g.  Clipping by norm and by value is
    # symmetric, so negating the clip scale is exactly negating the clipped g.
    if hp[HP_MAXIMIZE] != 0.0:
        scale = -scale
    _rule_ladder(rule, p, g, s0, s1, s2, hp, scale, clip_value)


@njit(**JIT)
def update_range(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, hi):
    """Pass 2 on elements ``[lo, hi)``: clip (scale, value) then the rule."""
    # A call, not inlined code, for the prange loops of the multi-tensor
    # update: the ladder's raise inlined there would be a second exit from
    # the loop, and Numba then runs the loop serially.
    _update_range(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, hi)


@njit(**dict(JIT, **INLINE))
def update_segments(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, hi):
    """Pass 2 on elements ``[lo, hi)`` under ``hp``: one row (every element),
    or one row per segment (see the module docstring)."""
    # One loop for both forms, over hp seen as rows: inlined into its caller,
    # a branch on hp.ndim would not be pruned (Numba folds .ndim for a
    # compiled function's own arguments only) and the 2-D branch would not
    # type for a 1-D hp.  The one row of a 1-D hp covers [lo, hi).
    update_rows(rule, p, g, s0, s1, s2, np.atleast_2d(hp), hp.ndim == 1, scale, clip_value,
                lo, hi)


@njit(**dict(JIT, **INLINE))
def update_rows(rule, p, g, s0, s1, s2, rows, single, scale, clip_value, lo, hi):
    """:func:`update_segments` on ``hp`` given as 2-D ``rows``: with
    ``single`` the one row covers every element (a 1-D ``hp``), else each
    row its segment.  (The step's team members see every ``hp`` this way.)"""
    start = lo
    for s in range(rows.shape[0]):
        end = hi if single else np.int64(rows[s, HP_END])
        a = max(start, lo)
        b = min(end, hi)
        if a < b:
            _update_range(rule, p, g, s0, s1, s2, rows[s], scale, clip_value, a, b)
        start = end


@njit(**dict(JIT, **INLINE))
def clip_scale(norm, clip_norm):
    """``min(1, clip_norm / (norm + 1e-6))`` as ``clip_grad_norm_``; 1 if off."""
    if clip_norm > 0:
        return min(1.0, clip_norm / (norm + 1e-6))
    return 1.0


@njit(**dict(JIT, **INLINE))
def clipped_update_inline(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm,
                          clip_value):
    """:func:`clipped_update` inlined into its caller (the whole-step
    kernels): the update chain is then lowered and optimised once, in the
    caller, instead of once per level of calls (Numba links each callee's
    code into its caller and optimises the linked module again)."""
    norm = np.sqrt(layer_sumsq(g, offsets, layer_sq))
    if not np.isfinite(norm):
        return norm, 0.0, True
    scale = clip_scale(norm, clip_norm)
    update_segments(rule, p, g, s0, s1, s2, hp, scale, clip_value, 0, p.shape[0])
    return norm, scale, False


@njit(**JIT)
def clipped_update(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm, clip_value):
    """One clipped optimizer update, in place on ``p`` and ``s0, s1, s2``.

    Parameters
    ----------
    rule : int
        ``SGD``, ``ADAM``, ``ADAMW`` or ``RMSPROP``.
    p, g : 1-D float32 or float64 arrays of one length, contiguous
        Flat parameters (updated in place) and gradient (read only).
    s0, s1, s2 : 1-D arrays of ``p``'s dtype
        State buffers of the rule (see the module docstring), size 0 if unused.
    hp : float64 array, ``(HP_SIZE,)`` or ``(n_segments, HP_SIZE)``
        Hyper-parameters of this update (slots ``HP_*``): one row, or one
        row per segment of ``p`` (parameter groups; module docstring).
        Norm clipping and the skip decision are global either way, as
        ``clip_grad_norm_`` over all parameters.
    offsets : 1-D int64 array, ``n_layers + 1`` layer boundaries in ``p``.
    layer_sq : 1-D float64 array of length ``n_layers``
        Output: squared L2 norm of each layer's gradient (written even when
        the update is skipped, so that a monitor sees which layer blew up).
    clip_norm, clip_value : float
        Global-norm and per-element bounds; ``<= 0`` disables either.

    Returns
    -------
    norm : float
        L2 norm of ``g`` before clipping (what ``clip_grad_norm_`` returns).
    scale : float
        Factor applied to ``g`` by norm clipping (1 if none; 0 if skipped).
    skipped : bool
        True when ``norm`` is NaN or Inf; then nothing else was written.
    """
    refuse_rule(rule)       # before fpenv.enter: a raise after it would leave FTZ set
    saved = fpenv.enter(p)
    result = clipped_update_inline(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm,
                                   clip_value)
    fpenv.leave(saved)
    return result


# Elements per parallel chunk: large enough that a chunk's bookkeeping
# vanishes, small enough to balance two threads.
CHUNK = 1 << 16


@njit(**JIT)
def _update_chunk(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, hi):
    # A call in the prange loop below, for the reason update_range gives;
    # on each of Numba's threads in the training kernels' floating-point mode.
    saved = fpenv.enter(p)
    update_segments(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, hi)
    fpenv.leave(saved)


@njit(**dict(JIT, parallel=True))
def _update_parallel(rule, p, g, s0, s1, s2, hp, scale, clip_value):
    n = p.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo = c * CHUNK
        _update_chunk(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, min(lo + CHUNK, n))


@njit(**JIT)
def clipped_update_parallel(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm,
                            clip_value):
    """:func:`clipped_update` with both passes spread over Numba's threads.

    Bitwise the same result as the serial entry (the update is elementwise,
    the norm adds the same block sums in the same order).  It runs when
    asked (``opt.parallel = True``) and in ``TrainStep(threads=n)``; by
    default ``opt.step()`` runs its update on the pass team from 2^15
    parameters (``pass_team.clipped_update``): with OpenBLAS's own threads
    spinning after each GEMM, a parallel region fights them (DESIGN.md
    "Threads").
    """
    refuse_rule(rule)       # here, not raised in each thread's chunk after fpenv.enter
    norm = np.sqrt(layer_sumsq_parallel(g, offsets, layer_sq))
    if not np.isfinite(norm):
        return norm, 0.0, True
    scale = clip_scale(norm, clip_norm)
    _update_parallel(rule, p, g, s0, s1, s2, hp, scale, clip_value)
    return norm, scale, False
