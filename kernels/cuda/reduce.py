"""Squared gradient norms on the GPU: twin of ``fastgrad.kernels.cpu.reduce``.

float64 accumulation, a deterministic two-level reduction (``reduce.cu``):
the same gradient and layout give the same bits on every run.  The layout
(``offsets``) is a host int64 array -- the launch shape depends on it -- and
is uploaded to the device once per distinct layout and cached (that first
upload is a synchronous copy; do it outside any captured graph, e.g. through
``prepare``).
"""
import cupy
import numpy as np

from . import _module as _m

__all__ = ["layer_sumsq", "sumsq", "prepare", "partial_size"]

_FILE = "reduce.cu"
_offsets_cache = {}     # (device id, offsets bytes) -> device int64 array


def _host_offsets(offsets):
    if isinstance(offsets, cupy.ndarray):
        offsets = cupy.asnumpy(offsets)          # a sync: pass host offsets instead
    return np.ascontiguousarray(offsets, dtype=np.int64)


def prepare(offsets):
    """(host offsets, device offsets, gx): the launch facts of a layout."""
    host = _host_offsets(offsets)
    key = (cupy.cuda.runtime.getDevice(), host.tobytes())
    dev = _offsets_cache.get(key)
    if dev is None:
        dev = _offsets_cache[key] = cupy.asarray(host)
    lengths = np.diff(host)
    gx = max(1, int(-(-int(lengths.max(initial=0)) // _m.SUMSQ_CHUNK)))
    return host, dev, gx


def partial_size(offsets):
    """float64 scratch elements ``layer_sumsq`` needs for this layout."""
    host, _, gx = prepare(offsets)
    return gx * (host.size - 1)


def layer_sumsq(g, offsets, layer_sq, total=None, work=None):
    """Squared L2 norm of each layer segment of ``g`` and of all of ``g``.

    Parameters
    ----------
    g : 1-D float32/float64 cupy array, the flat gradient.
    offsets : host int64 array, ``n_layers + 1`` boundaries (see the CPU twin).
    layer_sq : 1-D float64 cupy array of length ``n_layers`` (written).
    total, work : optional float64 cupy buffers for the result (shape ``()``
        or ``(1,)``) and the partial sums (``partial_size(offsets)``).

    Returns
    -------
    0-d (or ``total``'s shape) float64 cupy array: the sum of squares of ``g``
    (the sum of ``layer_sq`` in layer order); non-finite if ``g`` holds NaN/Inf.
    """
    host, dev, gx = prepare(offsets)
    n_layers = host.size - 1
    if total is None:
        total = cupy.empty((), np.float64)
    partial = cupy.empty(gx * n_layers, np.float64) if work is None else work
    kp = _m.kernel(_FILE, f"fg_seg_sumsq_partial<{_m.ctype(g.dtype)}>")
    kp((gx, n_layers), (_m.RED_THREADS,), (g, dev, partial))
    kf = _m.kernel(_FILE, "fg_seg_sumsq_final<double>")
    kf((1,), (_m.RED_THREADS,), (partial, _m.i64(gx), _m.i64(n_layers), layer_sq, total))
    return total


def sumsq(g):
    """Sum of squares of a 1-D array in float64 (one segment), 0-d device array."""
    return layer_sumsq(g, np.array([0, g.size], np.int64), cupy.empty(1, np.float64))
