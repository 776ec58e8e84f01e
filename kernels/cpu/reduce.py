"""Float64 sums: squared norms of a flat gradient (the global one and one
per layer, in one pass), and the sums the losses take of their terms.

This is pass 1 of every clipped update (``fastgrad.kernels.cpu.optim``): the
global norm decides the clip coefficient and the non-finite skip, the per-layer
norms feed ``fastgrad.health`` without another pass over memory.

Summation is in float64 whatever the gradient's dtype (a float32 gradient of
16M entries keeps ~1e-16 relative accuracy; torch's float64 total norm is
matched to ~1e-15).  Each layer is summed in blocks of ``BLOCK`` elements
counted from the layer's start and the block sums are added in order, so the
result depends on the data layout and the compiled code only.

``layer_sumsq`` is serial.  ``layer_sumsq_parallel`` gives bitwise the same
result (the same block sums, added in the same order) with the blocks
spread over Numba's threads (``optim.clipped_update_parallel``:
``opt.parallel = True``, ``TrainStep(threads=n)``).  The step's pass team
(``pass_team.clipped_update``) sums the same blocks on its own threads and
adds their sums in this order, also bitwise equal.
"""
import numpy as np
from numba import njit, prange

from ._jit import INLINE, JIT

# Elements per block: the vectorised block loop dominates the bookkeeping,
# and a block of float32 stays within L1/L2 while being summed.
BLOCK = 1 << 14


# The sums below are compiled with ``reassoc`` alone (no ``nnan``/``ninf``;
# the one fast-math flag in the kernels, kernels/cpu/_jit.py): it lets LLVM
# split a float64 sum into vector lanes, where one scalar chain waits 4
# cycles an element and eight chains still ran at ~2 (bench/RESULTS.md,
# "The losses' sums in vector lanes"), while NaN and Inf still propagate to
# the callers' non-finite tests.  The order of the additions is then fixed
# by the compiled code, not by the data or threads.  Functions of their
# own: fast-math flags are set per function as Numba lowers it.
REASSOC = dict(JIT, fastmath={"reassoc"})


@njit(**REASSOC)
def sum64(a):
    """The sum of a 1-D array in float64."""
    s = 0.0
    for k in range(a.shape[0]):
        s += np.float64(a[k])
    return s


@njit(**REASSOC)
def sq_diff_sum(p, t):
    """sum((p - t)^2) of two 1-D arrays, each difference taken in their
    dtype and squared in float64."""
    s = 0.0
    for k in range(p.shape[0]):
        d = np.float64(p[k] - t[k])
        s += d * d
    return s


@njit(**REASSOC)
def block_sumsq(g):
    """sum(g.astype(float64) ** 2) of a 1-D view (a block of <= BLOCK items).

    Callers pass a view, so that the loop index starts at 0: a loop from an
    arbitrary start keeps Numba's negative-index wraparound in its body and
    does not vectorise.
    """
    s = 0.0
    for i in range(g.shape[0]):
        x = np.float64(g[i])
        s += x * x
    return s


@njit(**JIT)
def layer_sumsq(g, offsets, layer_sq):
    """Squared L2 norm of each layer segment of ``g`` and of all of ``g``.

    Parameters
    ----------
    g : 1-D float32 or float64 array, the flat gradient.
    offsets : 1-D int64 array of length ``n_layers + 1``; layer ``i`` is
        ``g[offsets[i]:offsets[i + 1]]``; ``offsets[-1]`` is ``g.size``.
    layer_sq : 1-D float64 array of length ``n_layers``, written with each
        layer's sum of squares.

    Returns
    -------
    float
        The sum of squares of the whole gradient (sum of ``layer_sq`` in layer
        order).  NaN or Inf anywhere in ``g`` makes it non-finite.
    """
    total = 0.0
    for li in range(offsets.shape[0] - 1):
        s = segment_sumsq(g, offsets[li], offsets[li + 1])
        layer_sq[li] = s
        total += s
    return total


@njit(**dict(JIT, **INLINE))
def segment_sumsq(g, lo, hi):
    """The sum of squares of ``g[lo:hi]``: its blocks of ``BLOCK`` counted
    from ``lo``, their sums added in order (one layer of :func:`layer_sumsq`)."""
    s = 0.0
    for b in range(lo, hi, BLOCK):
        s += block_sumsq(g[b:min(b + BLOCK, hi)])
    return s


@njit(**dict(JIT, **INLINE))
def add_block_sums(parts, first, seg_sq):
    """``seg_sq[i]`` = the sum of segment ``i``'s block sums
    ``parts[first[i]:first[i + 1]]``, and the sum of ``seg_sq``, each added
    in order: the serial kernels' order, so the parallel ones match them
    bitwise."""
    total = 0.0
    for i in range(first.shape[0] - 1):
        s = 0.0
        for k in range(first[i], first[i + 1]):
            s += parts[k]
        seg_sq[i] = s
        total += s
    return total


@njit(**dict(JIT, parallel=True))
def layer_sumsq_parallel(g, offsets, layer_sq):
    """:func:`layer_sumsq` with the block sums computed in parallel."""
    n_layers = offsets.shape[0] - 1
    first = np.empty(n_layers + 1, np.int64)      # index of each layer's first block
    first[0] = 0
    for li in range(n_layers):
        first[li + 1] = first[li] + (offsets[li + 1] - offsets[li] + BLOCK - 1) // BLOCK
    parts = np.empty(first[n_layers])
    # one parallel loop over every layer's blocks (one per layer started the
    # threads once a layer)
    for k in prange(first[n_layers]):
        li = np.searchsorted(first, k, side="right") - 1      # skips empty layers
        b = offsets[li] + (k - first[li]) * BLOCK
        parts[k] = block_sumsq(g[b:min(b + BLOCK, offsets[li + 1])])
    return add_block_sums(parts, first, layer_sq)


@njit(**JIT)
def sumsq(g):
    """Sum of squares of a 1-D array, accumulated in float64 (one segment)."""
    s = 0.0
    n = g.shape[0]
    for b in range(0, n, BLOCK):
        s += block_sumsq(g[b:min(b + BLOCK, n)])
    return s
