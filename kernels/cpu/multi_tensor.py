"""Clipped optimizer updates over many separate arrays, in place, no packing.

The flat-buffer kernel (``optim.clipped_update``) needs every parameter in
one contiguous buffer.  A user's own arrays (``fastgrad.Adam([(p, g), ...])``)
and PyTorch's parameters (``fastgrad.torch``) live in separate allocations;
copying them into a flat buffer and back costs three extra passes over
memory per update.  :func:`multi_clipped_update` walks the arrays where they
are, in ONE compiled call, with the same two passes:

1. the squared norm of each gradient tensor and the global one (float64,
   the same blocks in the same order as ``reduce.layer_sumsq`` with one
   layer per tensor, so bitwise the flat kernel's norms); a non-finite
   global norm stops here, nothing is written;
2. per tensor, ``optim.update_range`` (clip scale, clip-by-value, the rule),
   the very function the flat kernel runs, with the tensor's own row of
   hyper-parameters (parameter groups), so that the result is bitwise the
   flat kernel's on the same data.

How the arrays reach compiled code: as their data addresses (int64 arrays)
and sizes, turned back into 1-D arrays inside the kernel with
``numba.carray``.  Measured against ``numba.typed.List`` (bench/RESULTS.md,
"multi-tensor call overhead"), building a typed list costs microseconds per
array on every call, which at 1000 tensors exceeds the update itself of a
1M-parameter model; an address array costs a NumPy ``fromiter``.  The price
is that nothing checks the addresses here: the caller
(``fastgrad.kernels.cpu.multi_tensor.pack`` users) must pass live,
contiguous, writeable arrays of ``like``'s dtype and the given sizes, and
keep them referenced during the call.  :func:`addresses` does that for NumPy
arrays; ``fastgrad.torch`` checks tensors before taking their ``data_ptr``.

A state address of 0 means "this rule keeps no such buffer": the kernel then
passes a size-0 array, as the flat kernel's callers do.
"""
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._jit import INLINE, JIT
from .optim import clip_scale, update_range
from .reduce import BLOCK, add_block_sums, block_sumsq


@intrinsic
def _as_pointer(typingctx, addr):
    """An int64 address as a ``void*`` (what ``numba.carray`` takes)."""
    sig = types.voidptr(addr)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@njit(**dict(JIT, **INLINE))
def _view(addr, n, like):
    """The 1-D array of ``n`` items of ``like``'s dtype at ``addr`` (0: empty)."""
    # one type for both cases (a branch returning like[:0] would unify the
    # layouts to "A" and stop the update loops from vectorising)
    return carray(_as_pointer(addr), n if addr != 0 else 0, like.dtype)


@njit(**JIT)
def multi_sumsq(like, g_addr, sizes, tensor_sq):
    """Squared L2 norm of each gradient array and of all of them.

    Parameters
    ----------
    like : 1-D array of the gradients' dtype (any size; gives the dtype).
    g_addr : 1-D int64 array, the data address of each gradient.
    sizes : 1-D int64 array, the number of items of each gradient.
    tensor_sq : 1-D float64 array of ``len(sizes)``, written with each
        array's sum of squares (in float64).

    Returns
    -------
    float
        The sum of squares of all arrays (``tensor_sq`` summed in order).
    """
    total = 0.0
    for i in range(sizes.shape[0]):
        n = sizes[i]
        g = _view(g_addr[i], n, like)
        s = 0.0
        for b in range(0, n, BLOCK):
            s += block_sumsq(g[b:min(b + BLOCK, n)])
        tensor_sq[i] = s
        total += s
    return total


@njit(**JIT)
def multi_clipped_update(rule, like, p_addr, g_addr, s_addr, sizes, hp, rows, tensor_sq,
                         clip_norm, clip_value):
    """One clipped optimizer update over many arrays, in place.

    Parameters
    ----------
    rule : int
        ``optim.SGD``, ``ADAM``, ``ADAMW`` or ``RMSPROP``.
    like : 1-D array of the parameters' dtype (float32 or float64).
    p_addr, g_addr : 1-D int64 arrays of length ``n_tensors``
        Data addresses of the parameters (updated in place) and gradients.
    s_addr : 2-D int64 array ``(3, n_tensors)``
        Addresses of each tensor's state buffers ``s0, s1, s2`` (see
        ``optim``'s module docstring); 0 where the rule keeps none.
    sizes : 1-D int64 array, items per tensor.
    hp : 2-D float64 array ``(n_rows, HP_SIZE)``
        One row of hyper-parameters per parameter group.
    rows : 1-D int64 array, the row of ``hp`` each tensor uses.
    tensor_sq : 1-D float64 array of length ``n_tensors``
        Output: squared norm of each gradient (written even when skipped).
    clip_norm, clip_value : float
        Global-norm and per-element bounds; ``<= 0`` disables either.

    Returns
    -------
    norm, scale, skipped
        As ``optim.clipped_update``: the global norm before clipping, the
        clip factor (0 when skipped), True when the norm is NaN or Inf (then
        nothing else was written).
    """
    norm = np.sqrt(multi_sumsq(like, g_addr, sizes, tensor_sq))
    if not np.isfinite(norm):
        return norm, 0.0, True
    scale = clip_scale(norm, clip_norm)
    for i in range(sizes.shape[0]):
        n = sizes[i]
        p = _view(p_addr[i], n, like)
        g = _view(g_addr[i], n, like)
        s0 = _view(s_addr[0, i], n, like)
        s1 = _view(s_addr[1, i], n, like)
        s2 = _view(s_addr[2, i], n, like)
        update_range(rule, p, g, s0, s1, s2, hp[rows[i]], scale, clip_value, 0, n)
    return norm, scale, False


# Elements per parallel update chunk, as optim.CHUNK.
CHUNK = 1 << 16


@njit(**JIT)
def _first_piece(sizes, piece):
    """Index of each tensor's first piece of ``piece`` items (and the total)."""
    first = np.empty(sizes.shape[0] + 1, np.int64)
    first[0] = 0
    for i in range(sizes.shape[0]):
        first[i + 1] = first[i] + (sizes[i] + piece - 1) // piece
    return first


@njit(**dict(JIT, parallel=True))
def _multi_sumsq_parallel(like, g_addr, sizes, tensor_sq):
    first = _first_piece(sizes, BLOCK)
    n = sizes.shape[0]
    parts = np.empty(first[n])
    for c in prange(first[n]):
        # the tensor of block c: the last i with first[i] <= c (skips empty ones)
        i = np.searchsorted(first, c, side="right") - 1
        b = (c - first[i]) * BLOCK
        g = _view(g_addr[i], sizes[i], like)
        parts[c] = block_sumsq(g[b:min(b + BLOCK, sizes[i])])
    # the same block sums added in the same order as multi_sumsq: bitwise equal
    return add_block_sums(parts, first, tensor_sq)


@njit(**dict(JIT, parallel=True))
def _multi_update_parallel(rule, like, p_addr, g_addr, s_addr, sizes, hp, rows, scale,
                           clip_value):
    first = _first_piece(sizes, CHUNK)
    for c in prange(first[sizes.shape[0]]):
        i = np.searchsorted(first, c, side="right") - 1
        n = sizes[i]
        lo = (c - first[i]) * CHUNK
        p = _view(p_addr[i], n, like)
        g = _view(g_addr[i], n, like)
        s0 = _view(s_addr[0, i], n, like)
        s1 = _view(s_addr[1, i], n, like)
        s2 = _view(s_addr[2, i], n, like)
        update_range(rule, p, g, s0, s1, s2, hp[rows[i]], scale, clip_value, lo,
                     min(lo + CHUNK, n))


@njit(**JIT)
def multi_clipped_update_parallel(rule, like, p_addr, g_addr, s_addr, sizes, hp, rows,
                                  tensor_sq, clip_norm, clip_value):
    """:func:`multi_clipped_update` with both passes spread over Numba's
    threads (blocks of every tensor in one parallel loop); bitwise the same
    result.  Opt-in, as ``optim.clipped_update_parallel``: next to another
    library's spinning thread pool (BLAS, PyTorch's intra-op threads) a
    parallel region can lose more than it gains (DESIGN.md "Threads")."""
    norm = np.sqrt(_multi_sumsq_parallel(like, g_addr, sizes, tensor_sq))
    if not np.isfinite(norm):
        return norm, 0.0, True
    scale = clip_scale(norm, clip_norm)
    _multi_update_parallel(rule, like, p_addr, g_addr, s_addr, sizes, hp, rows, scale,
                           clip_value)
    return norm, scale, False


@njit(**JIT)
def add_one_f32(addrs):
    """Add 1 to the float32 scalar at each address (torch's per-parameter
    ``step`` tensors, counted in one call)."""
    one = np.empty(0, np.float32)
    for i in range(addrs.shape[0]):
        c = _view(addrs[i], 1, one)
        c[0] += np.float32(1.0)


def address(a):
    """Data address of a NumPy array (0 for None)."""
    return 0 if a is None else a.__array_interface__["data"][0]


def addresses(arrays):
    """int64 array of the data addresses of NumPy arrays (0 for None)."""
    return np.fromiter((address(a) for a in arrays), np.int64, len(arrays))
