"""Clipped optimizer updates on the GPU: twin of ``fastgrad.kernels.cpu.optim``.

Same rule codes, ``HP_*`` slots, state buffers and order of operations (see
the CPU module's docstring).  Three launches, no host sync:

1. ``reduce.layer_sumsq``: per-layer and global squared norms (float64).
2. ``fg_clip_control``: ``ctl = (norm, scale, skipped)`` in device memory.
3. ``fg_update<T, rule>``: reads ``ctl`` and ``hp`` from device memory,
   returns at once when skipped, else clips and updates in place.

Hyper-parameters: ``hp`` may be a float64 cupy array of ``HP_SIZE`` (used as
is) or the host NumPy array ``fastgrad.optim`` fills per update.  A host
``hp`` is NOT uploaded with ``cupy.asarray`` (a copy from pageable memory
blocks the host until the device has caught up) but copied into a pinned
staging slot and sent with an asynchronous copy on the current stream
(``HpUploader``).  Passing the values as kernel arguments would avoid the
copy too, but a captured CUDA graph freezes kernel arguments, while a device
``hp`` lets a replayed graph see each step's learning rate and bias
corrections.

Returns device scalars: ``(norm, scale, skipped)`` are 0-d float64 views
of one 3-element buffer (``skipped`` is 1.0 or 0.0, so ``bool(skipped)``
works); reading them on the host is the caller's one sync.
"""
import cupy
import numpy as np

from ..cpu.optim import (ADAM, ADAMW, HP_ALPHA, HP_AMSGRAD, HP_BETA1, HP_BETA2,
                         HP_BIAS_CORR1, HP_BIAS_CORR2, HP_CENTERED, HP_DAMPENING,
                         HP_EPS, HP_FIRST, HP_LR, HP_MOMENTUM, HP_NESTEROV, HP_SIZE,
                         HP_WEIGHT_DECAY, RMSPROP, RULES, SGD)
from . import _module as _m
from .reduce import layer_sumsq

__all__ = ["SGD", "ADAM", "ADAMW", "RMSPROP", "RULES", "HP_SIZE", "clipped_update",
           "clip_control", "update", "HpUploader", "upload_hp",
           "HP_LR", "HP_WEIGHT_DECAY", "HP_BETA1", "HP_BETA2", "HP_EPS", "HP_BIAS_CORR1",
           "HP_BIAS_CORR2", "HP_AMSGRAD", "HP_MOMENTUM", "HP_DAMPENING", "HP_NESTEROV",
           "HP_FIRST", "HP_ALPHA", "HP_CENTERED"]

_FILE = "optim.cu"


class HpUploader:
    """Host -> device copies of small float64 arrays without a host sync.

    A ring of ``slots`` pinned buffers, each guarded by an event recorded
    after its copy: a slot is rewritten only once its previous copy has run,
    so the host waits only when it is ``slots`` uploads ahead of the device
    (a queue that deep costs nothing; a shallower one would throttle it).
    """

    def __init__(self, size=HP_SIZE, slots=16):
        self.size = size
        self._mem = [cupy.cuda.alloc_pinned_memory(size * 8) for _ in range(slots)]
        self._host = [np.frombuffer(m, np.float64, size) for m in self._mem]
        self._events = [None] * slots
        self._next = 0

    def upload(self, host, dst):
        """Enqueue ``dst[...] = host`` (float64, ``size`` elements) on the
        current stream; returns ``dst``."""
        i = self._next
        self._next = (i + 1) % len(self._mem)
        ev = self._events[i]
        if ev is not None:
            ev.synchronize()
        self._host[i][:] = host
        stream = cupy.cuda.get_current_stream()
        dst.data.copy_from_host_async(self._mem[i].ptr, self.size * 8, stream)
        if ev is None:
            ev = self._events[i] = cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        return dst


_uploaders = {}     # device id -> HpUploader


def upload_hp(hp, dst=None):
    """``hp`` as a float64 device array of HP_SIZE (async copy if on the host)."""
    if isinstance(hp, cupy.ndarray):
        if dst is None or hp is dst:
            return hp
        dst[...] = hp                   # device-to-device, stream-ordered
        return dst
    dev = cupy.cuda.runtime.getDevice()
    up = _uploaders.get(dev)
    if up is None:
        up = _uploaders[dev] = HpUploader()
    host = np.ascontiguousarray(hp, dtype=np.float64)
    if host.shape != (HP_SIZE,):
        raise ValueError(f"hp: expected shape ({HP_SIZE},), got {host.shape}")
    return up.upload(host, cupy.empty(HP_SIZE, np.float64) if dst is None else dst)


def clip_control(total_sq, ctl, clip_norm):
    """Enqueue ctl = (norm, scale, skipped) from the squared norm."""
    k = _m.kernel(_FILE, "fg_clip_control<double>")
    k((1,), (32,), (total_sq, ctl, _m.f64(clip_norm)))


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
    ``hp`` a host float64 array (uploaded asynchronously) or a device one.
    ``ws`` (optional) is a dict of preallocated buffers: ``"hp"`` (HP_SIZE
    float64), ``"ctl"`` (3 float64), ``"total"`` (1 float64), ``"norm_work"``
    (``reduce.partial_size(offsets)`` float64).

    Returns
    -------
    (norm, scale, skipped) : 0-d float64 cupy arrays (see the module docstring).
    """
    ws = ws or {}
    total = layer_sumsq(g, offsets, layer_sq, total=ws.get("total"), work=ws.get("norm_work"))
    ctl = ws.get("ctl")
    if ctl is None:
        ctl = cupy.empty(3, np.float64)
    clip_control(total, ctl, clip_norm)
    hp_dev = upload_hp(hp, ws.get("hp"))
    update(rule, p, g, s0, s1, s2, hp_dev, ctl, clip_value)
    return ctl[0], ctl[1], ctl[2]
