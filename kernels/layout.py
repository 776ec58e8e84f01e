"""Where a layer's parameters lie in a model's flat buffers: the kernels' copy.

Layer ``l`` of a model owns ``params[offsets[l]:offsets[l + 1]]`` (and the
same slice of ``grads``), in this order:

    W      n_in x n_out, row-major (weight norm: its direction v)
    b      n_out
    gamma  n_out        with a batch or layer norm
    beta   n_out        with a batch or layer norm
    g      n_out        with weight norm (the per-column magnitude)

The epilogue pieces that own gamma, beta (norm) and g (weight norm) declare
their slots in ``fastgrad/epilogue.py``, from which the layers and the
checkpoints place them (``param_slots``); ``tests/test_epilogue.py`` checks
that these functions give the same offsets for every combination.  They are
integer arithmetic alone, so the Numba kernels inline them
(``kernels/cpu/step*.py``) and the CUDA step calls them on the host;
``kernels/`` never imports ``fastgrad``, hence the copy.

The step plan (:func:`step_plan`) is the per-step half of the layout: the
layer features and scratch offsets a step driver reads, computed once per
batch size in Python, device-neutral (``kernels/cpu/step.py`` explains how
the CPU driver reads it).
"""
import numpy as np

from .spec import BATCH


def layer_size(n_in, n_out, norm, weight_norm):
    """How many parameters a layer owns."""
    return layer_slots(0, n_in, n_out, norm, weight_norm)[5]


def layer_slots(offset, n_in, n_out, norm, weight_norm):
    """``(w, b, gamma, beta, g, end)``: the start of each slot of the layer
    at ``offset`` and the end of its parameters.  Absent slots start where
    the next one does (they hold no parameters)."""
    b = offset + n_in * n_out
    gamma = b + n_out
    beta = gamma + n_out if norm else gamma
    g = beta + n_out if norm else beta
    end = g + n_out if weight_norm else g
    return offset, b, gamma, beta, g, end


# The step plan's header slots (plan[PLAN_*]) and per-layer row.
PLAN_SEED, PLAN_COUNTER, PLAN_TRAINING = 0, 1, 2
PLAN_FZS, PLAN_XHATS, PLAN_NSTATS, PLAN_WEFF, PLAN_DWEFF = 3, 4, 5, 6, 7   # in acts
PLAN_NWORK, PLAN_WNORM, PLAN_SAVED = 8, 9, 10                            # in fplan
# The host's thread pool for the step's passes (CPU, kernels/cpu/
# pass_team.py): threads (0: serial passes), then function addresses: the
# team's start, its activation members and its update members (a driver
# with the team's branches runs its activation, loss and update passes
# through the members, serially too); then where the team runs: the address
# of OpenBLAS's thread count (its own workers) or 0 (GNU OpenMP's pool);
# then whether the update is split on the team (0: serial, ``opt.parallel =
# False``), the item size of the dtype the members were compiled for, the
# loss's member, and in the shards' header of the sharded step
# (kernels/cpu/step_sharded.py) the member running one shard's forward and
# backward; last, 1 where the kernels' GEMMs run on GNU OpenMP's pool without
# taking the caller's floating-point mode (MKL: ``fastgrad.set_blas``), so
# that a step gives the pool its mode for its span (pass_team.workers_mode).
PLAN_POOL_THREADS, PLAN_POOL_START, PLAN_POOL_FORWARD, PLAN_POOL_GRAD = 11, 12, 13, 14
PLAN_POOL_NORM, PLAN_POOL_UPDATE, PLAN_POOL_BLAS, PLAN_POOL_SPLIT_UPDATE = 15, 16, 17, 18
PLAN_POOL_ITEMSIZE, PLAN_POOL_LOSS, PLAN_POOL_SHARD, PLAN_POOL_GEMM_MODE = 19, 20, 21, 22
PLAN_HEADER = 23
PLAN_RESIDUAL, PLAN_NORM, PLAN_WN = 0, 1, 2          # plan[PLAN_HEADER + PLAN_ROW * l + k]
PLAN_ROW = 3


#: The layer features a step driver can be specialised on (the CPU kernels'
#: ``_ONLY_FEATURES``, ``fastgrad.registry.cpu_kernels(features=...)``).
FEATURES = ("dropout", "norm", "residual", "weight_norm")


def acts_size(plan):
    """The elements of a driver's ``acts`` under ``plan``: the layer outputs,
    then the scratch, which ends with dweff, of weff's size."""
    return int(2 * plan[PLAN_DWEFF] - plan[PLAN_WEFF])


def step_plan(sizes, B, n_params, drops, residual, norms, weight_norm, dtype, seed=0,
              empty=np.empty):
    """``(plan, fplan, acts)`` of a batch of ``B`` rows (laid out as
    ``kernels/cpu/step.py``'s docstring says): the step plan of layers with
    dropout rates ``drops``, ``residual`` flags, ``norms`` kinds and
    ``weight_norm`` flags (host arrays), and the driver's ``acts`` of
    ``dtype`` from ``empty`` (the device's, e.g. ``cupy.empty``): the layer
    outputs, then the scratch of what those layers use (none for a plain
    model)."""
    sizes = np.asarray(sizes, np.int64)
    L = sizes.shape[0] - 1
    widths = sizes[1:]
    residual, norms, weight_norm = (np.asarray(a, np.int64) for a in
                                    (residual, norms, weight_norm))
    drops = np.asarray(drops, np.float64)
    if not (drops.shape == residual.shape == norms.shape == weight_norm.shape == (L,)):
        raise ValueError(f"step_plan: one dropout rate, residual flag, norm kind and weight "
                         f"norm flag per layer ({L} layers)")
    plan = np.zeros(PLAN_HEADER + PLAN_ROW * L, np.int64)
    rows = plan[PLAN_HEADER:].reshape((L, PLAN_ROW))
    rows[:, PLAN_RESIDUAL] = residual != 0
    rows[:, PLAN_NORM] = norms
    rows[:, PLAN_WN] = weight_norm != 0
    plan[PLAN_SEED] = seed
    has_epilogue = bool(drops.any() or residual.any() or norms.any() or weight_norm.any())
    acts = B * int(widths.sum()) if has_epilogue else 0
    n_x = acts if norms.any() else 0
    n_s = 2 * int((B + widths).sum()) if norms.any() else 0
    n_w = int(n_params) if weight_norm.any() else 0
    end = B * int(widths.sum())          # the layer outputs come first
    for slot, n in ((PLAN_FZS, acts), (PLAN_XHATS, n_x), (PLAN_NSTATS, n_s),
                    (PLAN_WEFF, n_w), (PLAN_DWEFF, n_w)):
        plan[slot] = end
        end += n
    n_work = 2 * max(B, int(widths.max())) if norms.any() else 0
    n_wnorm = int(widths.sum()) if weight_norm.any() else 0
    batch_norm = bool((norms == BATCH).any())
    plan[PLAN_NWORK] = L
    plan[PLAN_WNORM] = L + n_work
    plan[PLAN_SAVED] = L + n_work + n_wnorm if batch_norm else -1
    fplan = np.zeros(L + n_work + n_wnorm + (2 * int(widths.sum()) if batch_norm else 0))
    fplan[:L] = drops
    assert acts_size(plan) == end
    return plan, fplan, empty(end, dtype)
