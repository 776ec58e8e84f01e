"""Clipped optimizer updates on the GPU: twin of ``fastgrad.kernels.cpu.optim``.

Same rule codes, ``HP_*`` slots, state buffers and order of operations (see
the CPU module's docstring).  Three launches, no host sync:

1. ``reduce.layer_sumsq``: per-layer and global squared norms (float64).
2. ``fg_clip_control``: the control block ``ctl`` (``CTL_*``: norm, scale,
   skip, step count, learning rate, error) in device memory, and the
   hyper-parameter row of this update copied into the device ``hp``.
3. ``fg_update<T, rule>``: reads ``ctl`` and ``hp`` from device memory,
   returns at once when skipped, else clips and updates in place.

Hyper-parameters: ``hp`` is one row of ``HP_SIZE`` float64 (used as is) or
a table of rows for consecutive update indices ``k`` (``HP_UPDATE`` holds
each row's ``k``) together with a device step counter ``ws["step"]``: the
row of the device's count is used and the count advances unless the update
is skipped.  With parameter groups a row is itself ``(n_segments,
HP_SIZE)``, one block per contiguous segment of the flat buffer with its
end in ``HP_END`` (the CPU's segment rows, ``kernels.cpu.optim``), so a
host ``hp`` is 3-D ``(rows, n_segments, HP_SIZE)``; the segments are read
from its first row on the host and pass 2 runs once per segment.  That is how ``fastgrad.optim`` keeps the step count and the
bias corrections on the device: the host need not know whether the updates
it queued were skipped.  A host ``hp`` is sent by an asynchronous copy from
pinned memory (``transfer.Uploader``; ``cupy.asarray`` would wait for the
device); a device ``hp`` lets a captured CUDA graph see each step's values.

Returns device scalars: ``(norm, scale, skipped)`` are 0-d float64 views
of ``ctl`` (``skipped`` is 1.0 or 0.0, so ``bool(skipped)`` works);
reading them on the host is a sync -- ``fastgrad.optim`` copies the whole
block back asynchronously instead (``transfer.RecordReader``).
"""
import cupy
import numpy as np

from ..spec import (ADAM, ADAMW, HP_ALPHA, HP_AMSGRAD, HP_BETA1, HP_BETA2,
                    HP_BIAS_CORR1, HP_BIAS_CORR2, HP_CENTERED, HP_DAMPENING,
                    HP_END, HP_EPS, HP_FIRST, HP_LR, HP_MOMENTUM, HP_NESTEROV, HP_SIZE,
                    HP_UPDATE, HP_WEIGHT_DECAY, N_RULES, RMSPROP, RULES, SGD)
from . import _module as _m
from .reduce import layer_sumsq
from .transfer import uploader

__all__ = ["SGD", "ADAM", "ADAMW", "RMSPROP", "RULES", "HP_SIZE", "clipped_update",
           "clip_control", "update", "upload_hp", "CTL_SIZE", "CTL_NORM", "CTL_SCALE",
           "CTL_SKIP", "CTL_STEP", "CTL_LR", "CTL_ERROR", "CTL_STATUS", "CTL_LOSS",
           "ERR_NONE", "ERR_BAD_LABEL", "ERR_NO_HP_ROW",
           "HP_LR", "HP_WEIGHT_DECAY", "HP_BETA1", "HP_BETA2", "HP_EPS", "HP_BIAS_CORR1",
           "HP_BIAS_CORR2", "HP_AMSGRAD", "HP_MOMENTUM", "HP_DAMPENING", "HP_NESTEROV",
           "HP_FIRST", "HP_ALPHA", "HP_CENTERED", "HP_UPDATE", "HP_END"]

_FILE = "optim.cu"

# The control block (common.cuh): written by fg_clip_control (STATUS by a
# loss kernel, LOSS by the training step), read back as one record.
CTL_NORM, CTL_SCALE, CTL_SKIP, CTL_STEP, CTL_LR, CTL_ERROR, CTL_STATUS, CTL_LOSS = range(8)
CTL_SIZE = 8
ERR_NONE, ERR_BAD_LABEL, ERR_NO_HP_ROW = 0, 1, 2


def upload_hp(hp, dst=None):
    """``hp`` (one row or a table of rows) as a float64 device array;
    host arrays go by an asynchronous pinned copy into ``dst`` (its first
    rows when ``dst`` is a larger table) or a new array."""
    if isinstance(hp, cupy.ndarray):
        if dst is None or hp is dst:
            return hp
        dst = dst.reshape(-1)[:hp.size].reshape(hp.shape)
        dst[...] = hp                   # device-to-device, stream-ordered
        return dst
    host = np.ascontiguousarray(hp, dtype=np.float64)
    if host.ndim not in (1, 2, 3) or host.shape[-1] != HP_SIZE or host.size == 0:
        raise ValueError(f"hp: expected shape ({HP_SIZE},), (rows, {HP_SIZE}) or (rows, "
                         f"segments, {HP_SIZE}), got {host.shape}")
    if dst is None:
        dst = cupy.empty(host.shape, np.float64)
    else:
        if dst.size < host.size:
            raise ValueError(f"hp: {host.shape[0]} rows do not fit a table of {dst.size} "
                             "values")
        dst = dst.reshape(-1)[:host.size].reshape(host.shape)
    return uploader().upload(host, dst)


def control(total, ws, hp, clip_norm, step, n_seg):
    """The clip/skip decision of one update on the device, shared by the flat
    and the multi-tensor update: ``(ctl, hp_dev)``, the control block (from
    ``ws`` or new) and this update's hp rows chosen from the uploaded table by
    the device step count (``clip_control``); no host wait."""
    ctl = ws.get("ctl")
    if ctl is None:
        ctl = cupy.zeros(CTL_SIZE, np.float64)
    table = upload_hp(hp, ws.get("table"))
    hp_dev = ws.get("hp")
    if hp_dev is None or hp_dev.size < n_seg * HP_SIZE:
        hp_dev = cupy.empty(n_seg * HP_SIZE, np.float64)
    lr_segment = ws.get("lr_segment")
    lr_segment = 0 if lr_segment is None or n_seg == 1 else int(lr_segment[0])
    clip_control(total, ctl, clip_norm, table, hp_dev, step, n_seg, lr_segment)
    return ctl, hp_dev


def clip_control(total_sq, ctl, clip_norm, table, hp_dev, step=None, n_segments=1,
                 lr_segment=0):
    """Enqueue ctl (``CTL_*``) from the squared norm and copy this update's
    row of ``table`` into ``hp_dev``: the row of the device count ``step``
    when given (and advance it unless skipped), else the table's one row.
    A row holds ``n_segments`` blocks of ``HP_SIZE``; ctl's lr is block
    ``lr_segment``'s."""
    width = n_segments * HP_SIZE
    rows = table.reshape(-1, width)
    match = step is not None
    if step is None:
        step = _m.scratch("step")
    k = _m.kernel(_FILE, "fg_clip_control<double>")
    k((1,), (32,), (total_sq, ctl, _m.f64(clip_norm), rows, _m.i64(rows.shape[0]),
                    _m.i64(width), _m.i64(lr_segment * HP_SIZE + HP_LR), _m.i64(int(match)),
                    hp_dev, step))


def update(rule, p, g, s0, s1, s2, hp_dev, ctl, clip_value, segments=None):
    """Enqueue pass 2 (clip + rule) reading scale/skip from ``ctl``; with
    ``segments`` (``[(lo, hi), ...]``, one ``HP_SIZE`` block of ``hp_dev``
    each) once per segment on its slice."""
    if not 0 <= int(rule) < N_RULES:
        raise ValueError(f"unknown optimizer rule {rule!r}")
    k = _m.kernel(_FILE, f"fg_update<{_m.ctype(p.dtype)}, {int(rule)}>")
    if segments is None:
        segments = [(0, p.size)]
    for s, (lo, hi) in enumerate(segments):
        n = hi - lo
        if n <= 0:
            continue
        # unused state buffers are size 0 and never read: passed as they are
        s0_, s1_, s2_ = (b[lo:hi] if b.size else b for b in (s0, s1, s2))
        k((_m.blocks(n),), (_m.THREADS,),
          (p[lo:hi], g[lo:hi], s0_, s1_, s2_, hp_dev[s * HP_SIZE:(s + 1) * HP_SIZE], ctl,
           _m.f64(clip_value), _m.i64(n)))


def segments_of(hp):
    """``[(lo, hi), ...]`` of a host 3-D ``hp`` table (its first row's
    ``HP_END``), or None for one row / a table of single rows."""
    if isinstance(hp, cupy.ndarray):
        if hp.ndim == 3:
            raise ValueError("a device hp table of segment rows needs its segments on the "
                             "host: pass the host table")
        return None
    hp = np.asarray(hp)
    if hp.ndim != 3:
        return None
    ends = [int(e) for e in hp[0, :, HP_END]]
    return list(zip([0] + ends[:-1], ends))


def clipped_update(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm, clip_value,
                   ws=None):
    """One clipped optimizer update, in place on ``p`` and ``s0, s1, s2``.

    Arguments as the CPU twin, on the device: ``p, g, s0, s1, s2`` cupy
    arrays (unused state buffers of size 0), ``layer_sq`` a float64 cupy
    array (written even when skipped), ``offsets`` a host int64 array,
    ``hp`` a host or device float64 row (``HP_SIZE``) or table of rows, or
    a host table of segment rows (parameter groups; see the module
    docstring).  ``ws`` (optional) is a dict of preallocated device
    buffers: ``"hp"`` (HP_SIZE float64 per segment, the row in use),
    ``"table"`` (room for the uploaded table), ``"ctl"`` (CTL_SIZE
    float64), ``"total"`` (1 float64), ``"norm_work"``
    (``reduce.partial_size(offsets)`` float64) and ``"step"`` (1 float64:
    the device step count a table is matched against; without it a table
    must have one row); and ``"lr_segment"`` (a 1-element host int64 array:
    the segment whose lr the control block reports, default 0).

    Returns
    -------
    (norm, scale, skipped) : 0-d float64 cupy arrays (see the module docstring).
    """
    ws = ws or {}
    step = ws.get("step")
    if step is None and getattr(hp, "ndim", 1) >= 2 and hp.shape[0] != 1:
        raise ValueError("a table of hp rows needs the device step count ws['step']")
    segments = segments_of(hp)
    n_seg = 1 if segments is None else len(segments)
    total = layer_sumsq(g, offsets, layer_sq, total=ws.get("total"), work=ws.get("norm_work"))
    ctl, hp_dev = control(total, ws, hp, clip_norm, step, n_seg)
    update(rule, p, g, s0, s1, s2, hp_dev, ctl, clip_value, segments)
    return ctl[CTL_NORM], ctl[CTL_SCALE], ctl[CTL_SKIP]
