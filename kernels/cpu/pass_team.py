"""The step's activation passes on the shared pool's threads.

With one pool (``fastgrad.share_blas_pool``) the threads that just ran a
GEMM's jobs can run the bias + activation pass after it and the gradient
pass before the next: the driver (kernels/cpu/step.py) starts a GNU OpenMP
team (``GOMP_parallel``) whose members take shares of the pass until none
is left.  The forward is split by rows; the gradient by columns, so that
each ``db[j]`` is summed over the rows in order by one thread: every split
gives bitwise the serial pass's values, for any thread count.

Members claim shares from a counter (an atomic add), so a team smaller than
asked (nested in an OpenMP region, ``OMP_DYNAMIC``, a thread limit) still
runs every share.  The driver reaches ``GOMP_parallel`` and the members
through addresses in its step plan (``PLAN_POOL_*``, filled by the host,
``fastgrad.backend``): none is compiled into the driver, which is cached
on disk, and a plan without them (0 threads) runs the serial passes.
"""
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..layout import (PLAN_POOL_FORWARD, PLAN_POOL_GRAD, PLAN_POOL_START,  # noqa: F401
                      PLAN_POOL_THREADS)
from ._jit import INLINE, JIT
from .activations import bias_act_grad_columns, bias_act_step, needs_z
# a record's int64 field k, and an int64 as a pointer: the callback's own
from .blas_pool import _as_pointer, _field

# Below these sizes a team costs more than it saves (2 cores, one pool;
# bench/RESULTS.md "Activation passes on the pool").
MIN_ELEMENTS = 1 << 14
MIN_COLUMNS = 32          # a gradient share of 16+ columns: whole vectors

# The record a team reads: int64 fields.
_COUNTER, _SHARES, _SHARE, _P0, _P1, _P2, _P3, _ROWS, _COLS, _ACT, _ALPHA = range(11)
_FIELDS = 11

_I64 = ir.IntType(64)
_VOIDPTR = ir.IntType(8).as_pointer()


@intrinsic
def _record(typingctx, shares, share, p0, p1, p2, p3, rows, cols, act, alpha):
    """A stack record of the team's fields, the counter at 0."""
    def codegen(context, builder, signature, args):
        record = cgutils.alloca_once(builder, ir.ArrayType(_I64, _FIELDS))
        values = [_I64(0)] + list(args[:9]) + [builder.bitcast(args[9], _I64)]
        for k, value in enumerate(values):
            builder.store(value, builder.gep(record, [ir.IntType(32)(0), ir.IntType(32)(k)]))
        return builder.bitcast(record, _VOIDPTR)
    int64 = types.int64
    return types.voidptr(int64, int64, int64, int64, int64, int64, int64, int64, int64,
                         types.float64), codegen


@intrinsic
def _alpha(typingctx, record):
    def codegen(context, builder, signature, args):
        base = builder.bitcast(args[0], _I64.as_pointer())
        bits = builder.load(builder.gep(base, [_I64(_ALPHA)]))
        return builder.bitcast(bits, ir.DoubleType())
    return types.float64(types.voidptr), codegen


@intrinsic
def _claim(typingctx, record):
    """The next share's number (an atomic add on the counter)."""
    def codegen(context, builder, signature, args):
        counter = builder.bitcast(args[0], _I64.as_pointer())
        return builder.atomic_rmw("add", counter, _I64(1), "monotonic")
    return types.int64(types.voidptr), codegen


@intrinsic
def _start(typingctx, start, member, record, threads):
    """GOMP_parallel(member, record, threads, 0) through the two addresses;
    returns when every member is done."""
    def codegen(context, builder, signature, args):
        member_ty = ir.FunctionType(ir.VoidType(), [_VOIDPTR]).as_pointer()
        start_ty = ir.FunctionType(ir.VoidType(), [member_ty, _VOIDPTR, ir.IntType(32),
                                                   ir.IntType(32)]).as_pointer()
        builder.call(builder.inttoptr(args[0], start_ty),
                     [builder.inttoptr(args[1], member_ty), args[2],
                      builder.trunc(args[3], ir.IntType(32)), ir.IntType(32)(0)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64, types.voidptr, types.int64), codegen


# --- the driver's side ---------------------------------------------------------

@njit(**INLINE)
def team_size(plan, elements):
    """Threads for a forward pass over ``elements`` values: 0 runs it serially."""
    threads = plan[PLAN_POOL_THREADS]
    return threads if threads > 1 and elements >= MIN_ELEMENTS else 0


@njit(**INLINE)
def gradient_team_size(plan, g, act):
    """Threads for the gradient pass over ``g``: 0 runs it serially.  Only
    derivatives computed from z (gelu, gelu_tanh, silu: ``needs_z``) are
    split.  The others read ``a`` and cost little; split by columns, their
    pass is memory-bound, and the cache line at each share's edge, written
    by two threads in every row, made it 2-16x slower (relu, tanh;
    bench/RESULTS.md "Activation passes on the pool")."""
    if g.shape[1] < MIN_COLUMNS or not needs_z(act):
        return 0
    return team_size(plan, g.size)


@njit(**INLINE)
def forward(plan, threads, z, b, out, act, alpha):
    """``bias_act_step(z, b, out, act, alpha)`` on ``threads`` threads, by rows."""
    rows, cols = z.shape
    share = (rows + threads - 1) // threads
    record = _record((rows + share - 1) // share, share, z.ctypes.data, out.ctypes.data,
                     b.ctypes.data, 0, rows, cols, act, alpha)
    _start(plan[PLAN_POOL_START], plan[PLAN_POOL_FORWARD], record, threads)


@njit(**INLINE)
def gradient(plan, threads, g, a, z, db, act, alpha):
    """``bias_act_grad_inplace(g, a, z, db, act, alpha)`` on ``threads``
    threads, by columns (shares of whole 16-column vectors)."""
    rows, cols = g.shape
    share = ((cols + threads - 1) // threads + 15) // 16 * 16
    record = _record((cols + share - 1) // share, share, g.ctypes.data, a.ctypes.data,
                     z.ctypes.data, db.ctypes.data, rows, cols, act, alpha)
    _start(plan[PLAN_POOL_START], plan[PLAN_POOL_GRAD], record, threads)


# --- the members -----------------------------------------------------------------

def _forward_member(dtype):
    def member(record):
        rows, cols, share = _field(record, _ROWS), _field(record, _COLS), _field(record, _SHARE)
        z = carray(_as_pointer(_field(record, _P0)), (rows, cols), dtype)
        out = carray(_as_pointer(_field(record, _P1)), (rows, cols), dtype)
        b = carray(_as_pointer(_field(record, _P2)), (cols,), dtype)
        act, alpha = _field(record, _ACT), _alpha(record)
        k = _claim(record)
        while k < _field(record, _SHARES):
            r0 = k * share
            r1 = min(rows, r0 + share)
            bias_act_step(z[r0:r1], b, out[r0:r1], act, alpha)
            k = _claim(record)
    return member


def _gradient_member(dtype):
    def member(record):
        rows, cols, share = _field(record, _ROWS), _field(record, _COLS), _field(record, _SHARE)
        g = carray(_as_pointer(_field(record, _P0)), (rows, cols), dtype)
        a = carray(_as_pointer(_field(record, _P1)), (rows, cols), dtype)
        z = carray(_as_pointer(_field(record, _P2)), (rows, cols), dtype)
        db = carray(_as_pointer(_field(record, _P3)), (cols,), dtype)
        act, alpha = _field(record, _ACT), _alpha(record)
        k = _claim(record)
        while k < _field(record, _SHARES):
            c0 = k * share
            bias_act_grad_columns(g, a, z, db, act, alpha, c0, min(cols, c0 + share))
            k = _claim(record)
    return member


_members = {}


def member_addresses(dtype):
    """``(forward, gradient)``: the addresses of this package's members for
    ``dtype``, compiled (or loaded from the disk cache) on first use."""
    dtype = np.dtype(dtype)
    found = _members.get(dtype)
    if found is None:
        nb = types.float32 if dtype == np.float32 else types.float64
        sig = types.void(types.voidptr)
        found = _members[dtype] = tuple(
            cfunc(sig, cache=JIT["cache"], error_model="numpy")(make(nb))
            for make in (_forward_member, _gradient_member))
    return found[0].address, found[1].address
