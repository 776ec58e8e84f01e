"""Clipped optimizer updates over many separate CuPy arrays, in place: twin
of ``fastgrad.kernels.cpu.multi_tensor``.

The arrays are passed as device int64 arrays of their data addresses
(``a.data.ptr``) with their sizes, so that no flat copy is made.  Four
launches, no host sync (``multi_tensor.cu``):

1. ``fg_mt_sumsq_partial`` then ``reduce.cu``'s ``fg_seg_sumsq_final``:
   per-tensor and global squared norms in float64, bitwise those of
   ``reduce.layer_sumsq`` on the same data laid out flat (one layer per
   tensor);
2. ``optim.cu``'s ``fg_clip_control``: scale, skip and this update's hp
   row into the control block, as the flat update;
3. ``fg_mt_update<T, rule>``: per tensor, the flat ``fg_update``'s
   per-element code (``optim.cuh``) with the tensor's hp block.

So the result is bitwise ``optim.clipped_update`` on the flat layout.
Nothing checks the addresses on the device: the caller must pass live,
C-contiguous arrays of ``dtype`` and the given sizes, and keep them
referenced until the update has run (``addresses`` takes them from CuPy
arrays).
"""
import cupy
import numpy as np

from . import _module as _m
from ..spec import N_RULES
from .optim import CTL_NORM, CTL_SCALE, CTL_SKIP, control

__all__ = ["multi_clipped_update", "addresses", "layout", "partial_size"]

_FILE = "multi_tensor.cu"


def addresses(arrays, dtype=None):
    """Host int64 array of the data addresses of CuPy arrays (0 for None).

    Each array must be a C-contiguous ``cupy.ndarray`` (of ``dtype`` when
    given): TypeError/ValueError naming the index otherwise."""
    out = np.zeros(len(arrays), np.int64)
    for i, a in enumerate(arrays):
        if a is None:
            continue
        if not isinstance(a, cupy.ndarray):
            raise TypeError(f"array {i}: expected a cupy.ndarray, got {type(a).__name__}")
        if dtype is not None and a.dtype != np.dtype(dtype):
            raise TypeError(f"array {i}: expected dtype {np.dtype(dtype)}, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"array {i}: must be C-contiguous")
        out[i] = a.data.ptr
    return out


def layout(sizes):
    """``(host sizes, gx)``: the launch facts of tensors of ``sizes`` items
    (gx: chunks of the largest, as ``reduce.prepare`` for the flat layout)."""
    host = np.ascontiguousarray(sizes, dtype=np.int64)
    if host.ndim != 1 or host.size == 0 or np.any(host < 0):
        raise ValueError(f"sizes: expected a non-empty 1-D array of counts >= 0, got {host}")
    gx = max(1, int(-(-int(host.max()) // _m.SUMSQ_CHUNK)))
    return host, gx


def partial_size(sizes):
    """float64 scratch elements the norm pass needs (``ws["norm_work"]``);
    equal to ``reduce.partial_size`` of the flat layout."""
    host, gx = layout(sizes)
    return gx * host.size


def _device_i64(a, name, shape):
    if isinstance(a, cupy.ndarray):
        if a.dtype != np.int64 or a.shape != shape:
            raise TypeError(f"{name}: expected a device int64 array of shape {shape}, "
                            f"got {a.dtype} {a.shape}")
        return a
    host = np.ascontiguousarray(a, dtype=np.int64)
    if host.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {host.shape}")
    return cupy.asarray(host)               # a synchronous copy: pass device arrays in loops


def multi_clipped_update(rule, dtype, p_addr, g_addr, s_addr, sizes, hp, rows, tensor_sq,
                         clip_norm, clip_value, ws=None, dev_sizes=None):
    """One clipped optimizer update over many CuPy arrays, in place.

    Parameters
    ----------
    rule : int
        ``optim.SGD``, ``ADAM``, ``ADAMW`` or ``RMSPROP``.
    dtype : float32 or float64, the dtype of every array.
    p_addr, g_addr : int64 arrays ``(n_tensors,)`` (device, or host: then
        copied, a sync) -- data addresses of the parameters (updated in
        place) and gradients.
    s_addr : int64 array ``(3, n_tensors)``: each tensor's state buffers
        ``s0, s1, s2`` (0 where the rule keeps none).
    sizes : host int64 array ``(n_tensors,)``, items per tensor (the
        launch shape depends on it); ``dev_sizes`` its device copy, if the
        caller keeps one.
    hp : as ``optim.clipped_update``'s: a host or device row, a table of
        rows (with ``ws["step"]``), or a host table of segment rows
        ``(rows, n_segments, HP_SIZE)`` (parameter groups).
    rows : int64 array ``(n_tensors,)``: the segment (hp block) each tensor
        uses; all 0 without parameter groups.
    tensor_sq : float64 cupy array ``(n_tensors,)``: each gradient's squared
        norm (written even when skipped).
    clip_norm, clip_value : float, ``<= 0`` disables either.
    ws : dict, optional
        The device buffers of ``optim.clipped_update`` (``"hp"``,
        ``"table"``, ``"ctl"``, ``"total"``, ``"norm_work"`` of
        ``partial_size(sizes)``, ``"step"``, ``"lr_segment"``).

    Returns
    -------
    (norm, scale, skipped) : 0-d float64 cupy arrays, views of the control
        block, as ``optim.clipped_update``.
    """
    if not 0 <= int(rule) < N_RULES:
        raise ValueError(f"unknown optimizer rule {rule!r}")
    ctype = _m.ctype(dtype)
    host_sizes, gx = layout(sizes)
    n = host_sizes.size
    p_addr = _device_i64(p_addr, "p_addr", (n,))
    g_addr = _device_i64(g_addr, "g_addr", (n,))
    s_addr = _device_i64(s_addr, "s_addr", (3, n))
    rows = _device_i64(rows, "rows", (n,))
    dev_sizes = _device_i64(host_sizes if dev_sizes is None else dev_sizes, "sizes", (n,))
    if not (isinstance(tensor_sq, cupy.ndarray) and tensor_sq.dtype == np.float64
            and tensor_sq.size == n):
        raise TypeError(f"tensor_sq: expected a float64 cupy array of {n} items")
    ws = ws or {}
    step = ws.get("step")
    if step is None and getattr(hp, "ndim", 1) >= 2 and hp.shape[0] != 1:
        raise ValueError("a table of hp rows needs the device step count ws['step']")
    n_seg = hp.shape[-2] if getattr(hp, "ndim", 1) == 3 else 1

    # pass 1: the flat layout's partial sums, then its final reduction
    total = ws.get("total")
    if total is None:
        total = cupy.empty((), np.float64)
    work = ws.get("norm_work")
    if work is None or work.size < gx * n:
        work = cupy.empty(gx * n, np.float64)
    gy = min(n, _m.MAX_GRID_Y)
    kp = _m.kernel(_FILE, f"fg_mt_sumsq_partial<{ctype}>")
    kp((gx, gy), (_m.RED_THREADS,), (g_addr, dev_sizes, _m.i64(n), work))
    kf = _m.kernel("reduce.cu", "fg_seg_sumsq_final<double>")
    kf((1,), (_m.RED_THREADS,), (work, _m.i64(gx), _m.i64(n), tensor_sq, total))

    # the control block and this update's hp, as the flat update
    ctl, hp_dev = control(total, ws, hp, clip_norm, step, n_seg)

    # pass 2: every tensor, one launch
    ku = _m.kernel(_FILE, f"fg_mt_update<{ctype}, {int(rule)}>")
    ku((_m.blocks(host_sizes.max()), gy), (_m.THREADS,),
       (p_addr, g_addr, s_addr, dev_sizes, rows, _m.i64(n), hp_dev, ctl,
        _m.f64(clip_value)))
    return ctl[CTL_NORM], ctl[CTL_SCALE], ctl[CTL_SKIP]
