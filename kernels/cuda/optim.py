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
is skipped.  That is how ``fastgrad.optim`` keeps the step count and the
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
                    HP_EPS, HP_FIRST, HP_LR, HP_MOMENTUM, HP_NESTEROV, HP_SIZE,
                    HP_UPDATE, HP_WEIGHT_DECAY, RMSPROP, RULES, SGD)
from . import _module as _m
from .reduce import layer_sumsq
from .transfer import uploader

__all__ = ["SGD", "ADAM", "ADAMW", "RMSPROP", "RULES", "HP_SIZE", "clipped_update",
           "clip_control", "update", "upload_hp", "CTL_SIZE", "CTL_NORM", "CTL_SCALE",
           "CTL_SKIP", "CTL_STEP", "CTL_LR", "CTL_ERROR", "CTL_STATUS", "CTL_LOSS",
           "ERR_NONE", "ERR_BAD_LABEL", "ERR_NO_HP_ROW",
           "HP_LR", "HP_WEIGHT_DECAY", "HP_BETA1", "HP_BETA2", "HP_EPS", "HP_BIAS_CORR1",
           "HP_BIAS_CORR2", "HP_AMSGRAD", "HP_MOMENTUM", "HP_DAMPENING", "HP_NESTEROV",
           "HP_FIRST", "HP_ALPHA", "HP_CENTERED", "HP_UPDATE"]

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
    if host.ndim not in (1, 2) or host.shape[-1] != HP_SIZE or host.size == 0:
        raise ValueError(f"hp: expected shape ({HP_SIZE},) or (rows, {HP_SIZE}), "
                         f"got {host.shape}")
    if dst is None:
        dst = cupy.empty(host.shape, np.float64)
    else:
        if dst.size < host.size:
            raise ValueError(f"hp: {host.shape[0]} rows do not fit a table of {dst.size} "
                             "values")
        dst = dst.reshape(-1)[:host.size].reshape(host.shape)
    return uploader().upload(host, dst)


def clip_control(total_sq, ctl, clip_norm, table, hp_dev, step=None):
    """Enqueue ctl (``CTL_*``) from the squared norm and copy this update's
    row of ``table`` into ``hp_dev``: the row of the device count ``step``
    when given (and advance it unless skipped), else the table's one row."""
    rows = table.reshape(-1, HP_SIZE)
    match = step is not None
    if step is None:
        step = _m.scratch("step")
    k = _m.kernel(_FILE, "fg_clip_control<double>")
    k((1,), (32,), (total_sq, ctl, _m.f64(clip_norm), rows, _m.i64(rows.shape[0]),
                    _m.i64(int(match)), hp_dev, step))


def update(rule, p, g, s0, s1, s2, hp_dev, ctl, clip_value):
    """Enqueue pass 2 (clip + rule) reading scale/skip from ``ctl``."""
    n = p.size
    if n == 0:
        return
    if int(rule) not in (SGD, ADAM, ADAMW, RMSPROP):
        raise ValueError(f"unknown optimizer rule {rule!r}")
    k = _m.kernel(_FILE, f"fg_update<{_m.ctype(p.dtype)}, {int(rule)}>")
    k((_m.blocks(n),), (_m.THREADS,),
      (p, g, s0, s1, s2, hp_dev, ctl, _m.f64(clip_value), _m.i64(n)))


def clipped_update(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm, clip_value,
                   ws=None):
    """One clipped optimizer update, in place on ``p`` and ``s0, s1, s2``.

    Arguments as the CPU twin, on the device: ``p, g, s0, s1, s2`` cupy
    arrays (unused state buffers of size 0), ``layer_sq`` a float64 cupy
    array (written even when skipped), ``offsets`` a host int64 array,
    ``hp`` a host or device float64 row (``HP_SIZE``) or table of rows (see
    the module docstring).  ``ws`` (optional) is a dict of preallocated
    device buffers: ``"hp"`` (HP_SIZE float64, the row in use), ``"table"``
    (room for the uploaded table), ``"ctl"`` (CTL_SIZE float64), ``"total"``
    (1 float64), ``"norm_work"`` (``reduce.partial_size(offsets)`` float64)
    and ``"step"`` (1 float64: the device step count a table is matched
    against; without it a table must have one row).

    Returns
    -------
    (norm, scale, skipped) : 0-d float64 cupy arrays (see the module docstring).
    """
    ws = ws or {}
    step = ws.get("step")
    if step is None and getattr(hp, "ndim", 1) == 2 and hp.shape[0] != 1:
        raise ValueError("a table of hp rows needs the device step count ws['step']")
    total = layer_sumsq(g, offsets, layer_sq, total=ws.get("total"), work=ws.get("norm_work"))
    ctl = ws.get("ctl")
    if ctl is None:
        ctl = cupy.zeros(CTL_SIZE, np.float64)
    table = upload_hp(hp, ws.get("table"))
    hp_dev = ws.get("hp")
    if hp_dev is None:
        hp_dev = cupy.empty(HP_SIZE, np.float64)
    clip_control(total, ctl, clip_norm, table, hp_dev, step)
    update(rule, p, g, s0, s1, s2, hp_dev, ctl, clip_value)
    return ctl[CTL_NORM], ctl[CTL_SCALE], ctl[CTL_SKIP]
