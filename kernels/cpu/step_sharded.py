"""The whole training step on several cores: batch shards on one thread pool.

OpenBLAS threads the small GEMMs of an MLP step poorly, and the elementwise,
loss, norm and update passes between them run on one core; two pools
(OpenBLAS's and Numba's) spinning against each other on the same cores made a
step 40-60x slower (DESIGN.md "Threads").  Here ONE pool owns the cores for
the whole step:

1. the batch is cut into ``T`` contiguous row shards (``bounds``); each
   thread runs forward, loss and backward of its shard with single-threaded
   BLAS (the caller limits BLAS to one thread around the call) into its own
   gradient buffer (shard 0 into ``grads`` itself), through the shard
   member (:func:`shard_member`, whose address the shards' header holds);
2. the shard gradients are combined in a fixed order, weighted by the share
   of the batch each shard holds (each shard's loss is a mean over its rows),
   parallel over chunks of the parameters;
3. the clipped update runs both of its passes on the same threads
   (``optim.clipped_update_parallel``).

Below ``MIN_PARALLEL`` parameters steps 2 and 3 run on the calling thread
(the same values: both are elementwise or sum in a fixed order); their
parallel regions cost more than a small net's combine and update.  The
shards then run on the pass team's pool (OpenBLAS's own workers, or the
shared pool: ``kernels/cpu/pass_team.py``), from it on Numba's threads,
which run the combine and the update too (:func:`_run_shards`).  Each
kernel comes in those two forms (``_small``, ``_large``; :func:`kernels_for`
picks), so that a cold first call compiles one of them.
``sharded_train_steps_*`` runs many steps of an epoch in one call, as
``step.train_steps`` does for the serial step.

The result is deterministic for a given number of shards.  It differs from
the one-shard step by rounding only (the batch mean is a sum of shard means),
and is bitwise the serial step for one shard.  Batch normalisation couples
the rows of a batch, so only plain models run sharded: each shard runs the
driver ``step.forward_backward`` with every layer feature off.
"""
from collections import namedtuple

import numpy as np
from numba import carray, njit, prange
from numba.core.cpu_options import ParallelOptions

from ._jit import INLINE, INNER, JIT
from .blas_pool import _as_pointer, _field
from .optim import clipped_update_parallel
from .pass_team import (MIN_UPDATE, _call, _claim, _numba_type, _record, compile_member,
                        in_disk_cache, start_team)
from .step import (PLAN_HEADER, PLAN_ROW, _refuse_layers, _refuse_loss, _refuse_update,
                   _update, forward_backward, gather_batch, record_step)
from ..layout import (PLAN_POOL_BLAS, PLAN_POOL_GEMM_MODE, PLAN_POOL_SHARD, PLAN_POOL_START,
                      PLAN_POOL_THREADS)

# Only the explicit prange loops run on the threads: with every parallel
# option on, Numba also made each small array set-up (the shards' plan) a
# parallel region of its own, three more thread-pool launches a step for a
# few values each.  (An options object, not a dict: Numba empties the dict
# it is given.)
_PRANGE = ParallelOptions(dict(
    prange=True, comprehension=False, reduction=False, inplace_binop=False, setitem=False,
    numpy=False, stencil=False, fusion=False))
PARALLEL_INNER = dict(INNER, parallel=_PRANGE)
PARALLEL = dict(JIT, parallel=_PRANGE)

# Parameters per reduction chunk (as optim.CHUNK: balances two threads and
# hides a chunk's bookkeeping).
CHUNK = 1 << 16

# Parameters from which the combine and the update run on the threads (the
# pass team's threshold: on a 9K-parameter net their three parallel regions
# cost ~8 us a step more than running them on the calling thread).
MIN_PARALLEL = MIN_UPDATE


ShardedKernels = namedtuple("ShardedKernels", "forward_backward train_step train_steps")

# A shard's record (kernels/cpu/pass_team.py's records: int64 fields, the
# counter at 0): its rows of x, labels and target, the model's arrays, its
# own scratch and plan (addresses and sizes), then what the member writes
# back: the shard's mean loss (a float64's bits) and 1 once it is done.
(_ROWS, _N_IN, _X, _N_LABELS, _LABELS, _TARGET_ROWS, _TARGET_COLS, _TARGET, _LOSS_KIND,
 _N_PARAMS, _PARAMS, _GRADS, _LAYERS, _SIZES, _CODES, _ALPHAS, _OFFSETS, _N_ACTS, _ACTS, _ZS,
 _N_DELTA, _DELTA, _N_PLAN, _PLAN, _N_FPLAN, _FPLAN, _LOSS, _DONE) = range(1, 29)
RECORD = _DONE + 1      # int64 fields of a shard's record
_shard_members = {}


def _make_shard_member(dtype):
    def member(team):
        # team: the counter, the number of shards, the address of their
        # records (RECORD int64 fields each); runs the shards it claims
        shard = _claim(team)
        while shard < _field(team, 1):
            record = _as_pointer(_field(team, 2) + shard * RECORD * 8)
            rows, layers = _field(record, _ROWS), _field(record, _LAYERS)
            x = carray(_as_pointer(_field(record, _X)), (rows, _field(record, _N_IN)), dtype)
            labels = carray(_as_pointer(_field(record, _LABELS)), (_field(record, _N_LABELS),),
                            np.int64)
            target = carray(_as_pointer(_field(record, _TARGET)),
                            (_field(record, _TARGET_ROWS), _field(record, _TARGET_COLS)), dtype)
            n = _field(record, _N_PARAMS)
            params = carray(_as_pointer(_field(record, _PARAMS)), (n,), dtype)
            grads = carray(_as_pointer(_field(record, _GRADS)), (n,), dtype)
            sizes = carray(_as_pointer(_field(record, _SIZES)), (layers + 1,), np.int64)
            codes = carray(_as_pointer(_field(record, _CODES)), (layers,), np.int64)
            alphas = carray(_as_pointer(_field(record, _ALPHAS)), (layers,), np.float64)
            offsets = carray(_as_pointer(_field(record, _OFFSETS)), (layers + 1,), np.int64)
            acts = carray(_as_pointer(_field(record, _ACTS)), (_field(record, _N_ACTS),), dtype)
            zs = carray(_as_pointer(_field(record, _ZS)), (_field(record, _N_ACTS),), dtype)
            delta = carray(_as_pointer(_field(record, _DELTA)), (_field(record, _N_DELTA),), dtype)
            plan = carray(_as_pointer(_field(record, _PLAN)), (_field(record, _N_PLAN),), np.int64)
            fplan = carray(_as_pointer(_field(record, _FPLAN)), (_field(record, _N_FPLAN),),
                           np.float64)
            loss = forward_backward(x, labels, target, _field(record, _LOSS_KIND), params, grads,
                                    sizes, codes, alphas, offsets, acts, zs, delta, plan, fplan,
                                    fplan[:0], fplan[:0])
            carray(record, (RECORD,), np.float64)[_LOSS] = loss
            carray(record, (RECORD,), np.int64)[_DONE] = 1
            shard = _claim(team)
    return member


def shard_member_to_compile(dtype):
    """Whether :func:`shard_member` would compile: the member for
    ``dtype`` is neither in this process nor in Numba's disk cache (False
    where the cache cannot tell)."""
    dtype = np.dtype(dtype)
    if dtype in _shard_members:
        return False
    if not JIT["cache"]:
        return True
    return in_disk_cache(_make_shard_member(_numba_type(dtype))) is False


def shard_member(dtype):
    """The address of the shards' member for ``dtype`` (compiled, or loaded
    from Numba's disk cache, on first use): ``forward_backward`` of one
    shard, from a record.  The sharded kernels call it through this
    address (the shards' header holds it), so the driver is compiled once,
    apart from the kernels: on a cold first call a second compile worker
    compiles it while the kernel compiles here (``fastgrad._compile_worker``)."""
    dtype = np.dtype(dtype)
    member = _shard_members.get(dtype)
    if member is None:
        member = _shard_members[dtype] = compile_member(_make_shard_member(_numba_type(dtype)))
    return member.address


def kernels_for(n_params):
    """The sharded kernels (:class:`ShardedKernels`) of a model with
    ``n_params`` parameters: their combine and update run on the calling
    thread below ``MIN_PARALLEL`` and on the threads from it."""
    if n_params < MIN_PARALLEL:
        return ShardedKernels(sharded_forward_backward_small, sharded_train_step_small,
                              sharded_train_steps_small)
    return ShardedKernels(sharded_forward_backward_large, sharded_train_step_large,
                          sharded_train_steps_large)


def epoch_call(kernel):
    """``kernel`` (``sharded_train_steps_*``) callable with the arguments of
    ``step.train_steps`` (one list, the model's between the loss code and
    the optimizer's: ``loss_kind .. header``), which it takes in four tuples:
    the data and the batches, the model and the shards, the optimizer, the
    per-step statistics."""
    def call(*args):
        return kernel(args[:11], args[11:26], args[26:35], args[35:])
    return call


def shard_bounds(batch, n_shards):
    """Row boundaries of ``n_shards`` near-equal contiguous shards of a batch
    (fewer shards when the batch has fewer rows)."""
    n = max(1, min(int(n_shards), int(batch)))
    return np.linspace(0, batch, n + 1).round().astype(np.int64)


@njit(**INNER)
def _combine(grads, shard_grads, bounds, lo, hi):
    """``grads[lo:hi]`` (shard 0's) as the batch's: each shard's weighted by
    its share of the batch, added in shard order."""
    T = bounds.shape[0] - 1
    B = bounds[T]
    dt = grads.dtype.type
    out = grads[lo:hi]
    w0 = dt((bounds[1] - bounds[0]) / B)
    for i in range(hi - lo):
        out[i] *= w0
    for s in range(1, T):
        w = dt((bounds[s + 1] - bounds[s]) / B)
        src = shard_grads[s - 1, lo:hi]
        for i in range(hi - lo):
            out[i] += w * src[i]


@njit(**INLINE)
def _readable_as(a, params):
    return a.flags.c_contiguous and a.itemsize == params.itemsize


@njit(**INLINE)
def _run_shards(x, labels, target, loss_kind, params, grads, shard_grads, sizes, codes, alphas,
                offsets, acts, zs, delta, bounds, losses, header, large):
    """Forward, loss and backward of each shard on its own thread, through
    the header's shard member (:func:`shard_member`); inlined into the
    kernels (parallel functions themselves: one level of linked code less).

    ``acts``, ``zs``, ``delta`` are 2-D: one row of scratch per shard, laid out
    as ``step.forward_backward`` reads them (``zs`` may be ``acts``).  Shard
    0's gradients go to ``grads``, the others' to ``shard_grads`` (one row per
    shard beyond the first); ``losses`` (float64, one per shard) receives
    each shard's mean loss.  ``header`` (int64, ``PLAN_HEADER``) holds the
    shards' team (``fastgrad.threads.shard_team``) and the members a
    driver with the pass team's branches runs its passes through; each
    shard's step plan is the header without the team: it runs its passes
    on its own thread (``fastgrad.backend``'s ``fill_pass_team``).

    The shards run on the step's one pool.  Where the combine and the
    update run on the calling thread (not ``large``) that is the pass
    team's: OpenBLAS's own workers, which spin waiting for work for a
    while after any multi-threaded GEMM (shards on Numba's threads then
    shared the cores with them: a small net's step 2x slower after a
    default step, bench/RESULTS.md), or the shared pool's GNU OpenMP team.
    Where ``large``, Numba's threads, which run the combine and the update
    next (on OpenBLAS's workers the shards left them spinning through
    those: 10-25x slower).  Each member claims shards until none is left,
    so a smaller team (or Numba's loop without a team) runs them all.
    """
    T = bounds.shape[0] - 1
    # The driver's plan of a plain model (no layer feature on; the package
    # serving every feature reads it) and no epilogue scratch.
    L = codes.shape[0]
    plan = np.zeros(PLAN_HEADER + PLAN_ROW * L, np.int64)
    for i in range(PLAN_HEADER):    # (a slice assignment compiles a shape check: ~1.5 s cold)
        plan[i] = header[i]
    fplan = np.zeros(L)
    # What the member would refuse, refused here: it cannot raise (a C
    # callback).  (labels or target is size 0 when the loss does not read
    # it: its slices stay size 0.)
    if plan[PLAN_POOL_SHARD] == 0:
        raise ValueError("the shards' plan header has no shard member (step_sharded.shard_member)")
    # the member reads every buffer through its address as C-contiguous
    # arrays of the parameters' dtype (its own), the labels as int64
    if not (_readable_as(x, params) and _readable_as(target, params)
            and _readable_as(grads, params) and _readable_as(shard_grads, params)
            and _readable_as(acts, params) and _readable_as(zs, params)
            and _readable_as(delta, params) and params.flags.c_contiguous
            and labels.flags.c_contiguous and labels.itemsize == 8):
        raise ValueError("the sharded step needs C-contiguous buffers of the parameters' "
                         "dtype and int64 labels")
    _refuse_layers(plan, params, codes)
    _refuse_loss(plan, loss_kind, labels, target, x.shape[0], sizes)
    # the shards' own plans: each runs its passes on its own thread
    for field in (PLAN_POOL_THREADS, PLAN_POOL_START, PLAN_POOL_BLAS, PLAN_POOL_GEMM_MODE):
        plan[field] = 0
    records = np.zeros((T, RECORD), np.int64)
    for s in range(T):
        lo, hi = bounds[s], bounds[s + 1]
        g = grads if s == 0 else shard_grads[s - 1]
        shard_labels, shard_target = labels[lo:hi], target[lo:hi]
        record = _record((
            hi - lo, x.shape[1], x[lo:hi].ctypes.data, shard_labels.shape[0],
            shard_labels.ctypes.data, shard_target.shape[0], target.shape[1],
            shard_target.ctypes.data, loss_kind, params.shape[0], params.ctypes.data,
            g.ctypes.data, L, sizes.ctypes.data, codes.ctypes.data, alphas.ctypes.data,
            offsets.ctypes.data, acts.shape[1], acts[s].ctypes.data, zs[s].ctypes.data,
            delta.shape[1], delta[s].ctypes.data, plan.shape[0], plan.ctypes.data,
            fplan.shape[0], fplan.ctypes.data, 0, 0))
        records[s] = carray(record, (RECORD,), np.int64)
    team = _record((T, records.ctypes.data))
    threads = min(T, header[PLAN_POOL_THREADS])
    if not large and header[PLAN_POOL_START] != 0 and threads > 1:
        start_team(header, plan[PLAN_POOL_SHARD], team, threads)
    else:
        for _ in prange(T):
            _call(plan[PLAN_POOL_SHARD], team)
    for s in range(T):
        losses[s] = records.view(np.float64)[s, _LOSS]
        if records[s, _DONE] != 1:
            raise RuntimeError("a shard's forward and backward did not complete")


@njit(**PARALLEL_INNER)
def _combine_on_threads(grads, shard_grads, bounds):
    n = grads.shape[0]
    for c in prange((n + CHUNK - 1) // CHUNK):
        _combine(grads, shard_grads, bounds, c * CHUNK, min(c * CHUNK + CHUNK, n))


@njit(**INLINE)
def _forward_backward(x, labels, target, loss_kind, params, grads, shard_grads, sizes, codes,
                      alphas, offsets, acts, zs, delta, bounds, losses, header, large):
    """The shards, then their gradients combined into ``grads`` (on the
    threads where ``large``, a constant of each kernel); the batch's mean
    loss."""
    _run_shards(x, labels, target, loss_kind, params, grads, shard_grads, sizes, codes, alphas,
                offsets, acts, zs, delta, bounds, losses, header, large)
    T = bounds.shape[0] - 1
    B = bounds[T]
    if T > 1:
        if large:
            _combine_on_threads(grads, shard_grads, bounds)
        else:
            _combine(grads, shard_grads, bounds, 0, grads.shape[0])
    loss = 0.0
    for s in range(T):
        loss += losses[s] * ((bounds[s + 1] - bounds[s]) / B)
    return loss


@njit(**INLINE)
def _train_step(x, labels, target, loss_kind, params, grads, shard_grads, sizes, codes, alphas,
                offsets, acts, zs, delta, bounds, losses, header, rule, s0, s1, s2, hp, layer_sq,
                clip_norm, clip_value, large):
    """The sharded step: :func:`_forward_backward`, then the clipped update
    (on the threads where ``large``; else on the calling thread, through
    the header's members where the driver has the pass team's branches:
    they are compiled for the step's shards anyway)."""
    if not large:
        _refuse_update(header, rule, params, grads, s0, s1, s2, hp)
    loss = _forward_backward(x, labels, target, loss_kind, params, grads, shard_grads, sizes,
                             codes, alphas, offsets, acts, zs, delta, bounds, losses, header,
                             large)
    if large:
        norm, scale, skipped = clipped_update_parallel(rule, params, grads, s0, s1, s2, hp,
                                                       offsets, layer_sq, clip_norm, clip_value)
    else:
        norm, scale, skipped = _update(header, rule, params, grads, s0, s1, s2, hp, offsets,
                                       layer_sq, clip_norm, clip_value)
    return loss, norm, scale, skipped


@njit(**INLINE)
def _train_steps(data, net, opt, out, large):
    """Steps ``first .. first + n_steps - 1`` of an epoch, each exactly
    the sharded train step on its batch: ``step.train_steps``'s contract
    (batches gathered from ``order``, ``hp_rows`` indexed by the updates
    applied, ``stop_on_skip``, per-step statistics; returns the number of
    steps run).  ``bounds`` are the shards of a full batch, ``last_bounds``
    those of a smaller last batch; the scratch (``acts``, ``zs``,
    ``delta``) is sized for a full batch's.  The arguments come in four
    tuples (:func:`epoch_call`): Numba cannot inline a call of more than 30
    arguments (CPython passes them as ``*args``)."""
    X, labels, target, order, first, n_steps, batch_size, n_order, xbuf, lbuf, tbuf = data
    (loss_kind, params, grads, shard_grads, sizes, codes, alphas, offsets, acts, zs, delta,
     bounds, last_bounds, losses, header) = net
    rule, s0, s1, s2, hp_rows, layer_sq, clip_norm, clip_value, stop_on_skip = opt
    out_loss, out_norm, out_scale, out_skipped, out_layer_sq = out
    applied = 0
    for j in range(n_steps):
        xb, lb, tb = gather_batch(X, labels, target, order, (first + j) * batch_size,
                                  batch_size, n_order, xbuf, lbuf, tbuf)
        shards = bounds if xb.shape[0] == bounds[bounds.shape[0] - 1] else last_bounds
        # the step kernel a compiled call, not inlined: the epoch then links
        # its code instead of compiling the step a second time (1.2 s against
        # 1.9-2.7 s for the epoch's kernel on a cold cache)
        if large:
            train_step = sharded_train_step_large
        else:
            train_step = sharded_train_step_small
        loss, norm, scale, skipped = train_step(
            xb, lb, tb, loss_kind, params, grads, shard_grads, sizes, codes, alphas, offsets,
            acts, zs, delta, shards, losses, header, rule, s0, s1, s2, hp_rows[applied],
            layer_sq, clip_norm, clip_value)
        record_step(j, loss, norm, scale, skipped, layer_sq, out_loss, out_norm, out_scale,
                    out_skipped, out_layer_sq)
        if skipped:
            if stop_on_skip:
                return j + 1
        else:
            applied += 1
    return n_steps


# The kernels, in two forms: ``large`` is a constant of each, so Numba prunes
# the other form's branches after inlining and a model compiles one combine
# and one update (the serial update 0.9 s, the parallel one 2.0 s on a cold
# cache; kernels_for picks).

@njit(**PARALLEL)
def sharded_forward_backward_small(x, labels, target, loss_kind, params, grads, shard_grads, sizes,
                                   codes, alphas, offsets, acts, zs, delta, bounds, losses,
                                   header):
    """Forward, loss and backward in shards, combined on the calling
    thread (below ``MIN_PARALLEL`` parameters): writes ``grads``, returns
    the batch's mean loss."""
    return _forward_backward(x, labels, target, loss_kind, params, grads, shard_grads, sizes,
                             codes, alphas, offsets, acts, zs, delta, bounds, losses, header,
                             False)


@njit(**PARALLEL)
def sharded_train_step_small(x, labels, target, loss_kind, params, grads, shard_grads, sizes,
                             codes, alphas, offsets, acts, zs, delta, bounds, losses, header, rule,
                             s0, s1, s2, hp, layer_sq, clip_norm, clip_value):
    """The sharded step, its combine and clipped update on the calling
    thread (below ``MIN_PARALLEL`` parameters).  Returns (loss, grad_norm,
    clip_scale, skipped) as ``step.train_step``."""
    return _train_step(x, labels, target, loss_kind, params, grads, shard_grads, sizes, codes,
                       alphas, offsets, acts, zs, delta, bounds, losses, header, rule, s0, s1, s2,
                       hp, layer_sq, clip_norm, clip_value, False)


@njit(**JIT)
def sharded_train_steps_small(data, net, opt, out):
    """Steps of an epoch in one call (``_train_steps``, :func:`epoch_call`
    passes its arguments), each step's combine and update on the calling
    thread (below ``MIN_PARALLEL`` parameters)."""
    return _train_steps(data, net, opt, out, False)


@njit(**PARALLEL)
def sharded_forward_backward_large(x, labels, target, loss_kind, params, grads, shard_grads, sizes,
                                   codes, alphas, offsets, acts, zs, delta, bounds, losses,
                                   header):
    """Forward, loss and backward in shards, combined on the threads (from
    ``MIN_PARALLEL`` parameters): writes ``grads``, returns the batch's mean
    loss."""
    return _forward_backward(x, labels, target, loss_kind, params, grads, shard_grads, sizes,
                             codes, alphas, offsets, acts, zs, delta, bounds, losses, header, True)


@njit(**PARALLEL)
def sharded_train_step_large(x, labels, target, loss_kind, params, grads, shard_grads, sizes,
                             codes, alphas, offsets, acts, zs, delta, bounds, losses, header, rule,
                             s0, s1, s2, hp, layer_sq, clip_norm, clip_value):
    """The sharded step, its combine and clipped update on the threads
    (from ``MIN_PARALLEL`` parameters).  Returns (loss, grad_norm,
    clip_scale, skipped) as ``step.train_step``."""
    return _train_step(x, labels, target, loss_kind, params, grads, shard_grads, sizes, codes,
                       alphas, offsets, acts, zs, delta, bounds, losses, header, rule, s0, s1, s2,
                       hp, layer_sq, clip_norm, clip_value, True)


@njit(**JIT)
def sharded_train_steps_large(data, net, opt, out):
    """As :func:`sharded_train_steps_small`, each step's combine and update
    on the threads (from ``MIN_PARALLEL`` parameters)."""
    return _train_steps(data, net, opt, out, True)
