"""The step's passes on the threads that run its GEMMs.

The threads that just ran a GEMM's jobs run the bias + activation pass
after it, the gradient pass before the next, and the optimizer's update
after the last: the driver (kernels/cpu/step.py) starts a team whose
members take shares of the pass until none is left.  By default the team
is OpenBLAS's own workers, which spin waiting for work after each GEMM
(OpenBLAS's ``gotoblas_pthread``: each worker, and the caller, calls the
member); with the pool shared (``fastgrad.share_blas_pool``) it is a GNU
OpenMP team (``GOMP_parallel``) of the threads OpenBLAS's jobs run on.
Either way one pool owns the cores.  The forward is split by rows; a
built-in gradient by blocks of ``DB_ROWS`` rows, each block's partial sums
of db kept (on the stack, in rounds) and added here in block order, as the
serial loops of kernels/cpu/activations.py add them; a registered one
computed from z by columns, so that each ``db[j]`` is summed over the rows
in order by one thread; the loss by its units (kernels/cpu/losses.py), each
unit's float64 sum kept and added in unit order; the update's norm by runs
of the serial kernel's blocks (their sums added in its order:
``reduce.layer_sumsq``) and its elementwise pass by ranges.  Every split
gives bitwise the serial pass's values, for any thread count.

Members claim shares from a counter (an atomic add), so a team smaller than
asked (OpenBLAS told to use fewer threads, an OpenMP team nested in a
region, ``OMP_DYNAMIC``, a thread limit) still runs every share.  The
driver reaches the team's start and the members through addresses in its
step plan (``PLAN_POOL_*``, filled by the host: ``fastgrad.backend``,
``fastgrad.threads``): none is compiled into the driver, which is cached on
disk.  A pass too small to split, or any pass of a plan of 0 threads,
runs its member on the calling thread alone: the driver holds no second,
serial copy of the activation
and update passes (a cold first step compiles each once, in its member), so
its plan must hold the members (:func:`check_members` raises before a step
without them).  The same holds for the loss: such a driver computes it
through its member alone.
"""
import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..layout import (PLAN_POOL_BLAS, PLAN_POOL_FORWARD, PLAN_POOL_GEMM_MODE,  # noqa: F401
                      PLAN_POOL_GRAD, PLAN_POOL_ITEMSIZE, PLAN_POOL_LOSS, PLAN_POOL_NORM,
                      PLAN_POOL_SPLIT_UPDATE, PLAN_POOL_START, PLAN_POOL_THREADS,
                      PLAN_POOL_UPDATE)
from ..spec import (BCE_WITH_LOGITS, CROSS_ENTROPY, HP_SIZE, LOSS_CODES, MEMORY_BOUND,
                    MEMORY_BOUND_GRADIENT, MSE)
from . import fpenv
from ._jit import INLINE, INNER, JIT, served_ladder
from .activations import (DB_ROWS, _bias_act_ladder, _grad_block_ladder,
                          _grad_columns_ladder, _needs_z_ladder, add_part, blocks_db_code,
                          needs_z)
from .losses import bce_units, ce_count, ce_units, chunk_count, mse_units
from .optim import clip_scale, refuse_rule, update_rows
from .reduce import BLOCK, block_sumsq
# a record's int64 field k, and an int64 as a pointer: the callback's own
from .blas_pool import _as_pointer, _field

# Below these sizes a team costs more than it saves (2 cores, one pool;
# bench/RESULTS.md "Activation passes on the pool", "The update on the pool",
# "Small layers' forward on the team").
MIN_FORWARD_CHEAP = 1 << 14   # outputs of a memory-bound forward (spec.MEMORY_BOUND)
MIN_FORWARD = 1 << 12         # outputs of any other activation's forward (~0.4+ ns each)
_MEMORY_BOUND = tuple(sorted(MEMORY_BOUND))    # a tuple: Numba's `in` reads it as a constant
MIN_GRADIENT = 1 << 14        # values of a registered gradient computed from z (by columns)
MIN_COLUMNS = 32          # a gradient share of 16+ columns: whole vectors
MIN_GRADIENT_ROWS = 1 << 13   # values of a memory-bound built-in gradient (by blocks of rows)
MIN_GRADIENT_ROWS_COSTLY = 1 << 11   # values of a built-in gradient with a transcendental
_MEMORY_BOUND_GRADIENT = tuple(sorted(MEMORY_BOUND_GRADIENT))
PARTS_BYTES = 1 << 17     # the partial sums of db kept per team start (on the stack)
MIN_UPDATE = 1 << 15         # parameters (a team update of 17-30K slowed 8 of 9 small nets)
UPDATE_SHARE = 1 << 16    # the most elements per update share: balance on a busy host
NORM_SHARE = 64           # the most blocks per norm share (2^20 elements)
NORM_ROUND = 4096         # blocks summed per team start: their sums on the stack (32 KB)
MIN_LOSS = 1 << 14        # outputs of the loss (alone, a team won down to 4K; bench/RESULTS.md)

# A team's record: int64 fields (a float64 kept as its bits), the claim
# counter at 0, then the number of shares and the share's size; then the
# pass's own fields.
_COUNTER, _SHARES, _SHARE = 0, 1, 2
_P0, _P1, _P2, _P3, _ROWS, _COLS, _ACT, _ALPHA = range(3, 11)             # activation passes
_STRIDE, _FIRST_ROW_BLOCK, _ROW_BLOCKS = range(11, 14)     # the gradient by blocks of rows
_N = 3                                                 # the update passes: elements
_G, _OFFSETS, _PARTS, _LAYERS, _FIRST_BLOCK, _BLOCKS = range(4, 10)         # the norm
(_KIND, _OUT, _OUT_ROWS, _OUT_COLS, _LABELS, _N_LABELS, _TARGET, _TARGET_ROWS, _TARGET_COLS,
 _DOUT, _FIRST_UNIT, _SUMS, _COUNT) = range(3, 16)                         # the loss
(_P, _GRAD, _S0, _S1, _S2, _N_S0, _N_S1, _N_S2, _HP, _HP_ROWS, _SINGLE, _RULE, _SCALE,
 _CLIP) = range(4, 18)                                                     # the update

# The default losses by units (kernels/cpu/losses.py): the ones these
# kernels serve (all, or in a model's copy its own); the driver refuses the
# others before a step.
_UNITS_ARGS = "sums, u0, u1, first"
loss_units = served_ladder(
    "loss_units", "loss_kind, out, labels, target, grad, " + _UNITS_ARGS, "loss_kind",
    {CROSS_ENTROPY: (ce_units, "out, labels, grad, " + _UNITS_ARGS),
     MSE: (mse_units, "out, target, grad, " + _UNITS_ARGS),
     BCE_WITH_LOGITS: (bce_units, "out, target, grad, " + _UNITS_ARGS)},
    __package__, "LOSSES", LOSS_CODES, "LOSS_CODES", "loss")[0]
loss_count = served_ladder(
    "loss_count", "loss_kind, out", "loss_kind",
    {CROSS_ENTROPY: (ce_count, "out"), MSE: (chunk_count, "out"),
     BCE_WITH_LOGITS: (chunk_count, "out")},
    __package__, "LOSSES", LOSS_CODES, "LOSS_CODES", "loss")[0]

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)
_VOIDPTR = ir.IntType(8).as_pointer()


@intrinsic
def _record(typingctx, values):
    """A stack record: the counter (0), then ``values`` (a tuple of ints,
    floats and pointers) from field 1 on."""
    def codegen(context, builder, signature, args):
        record = cgutils.alloca_once(builder, ir.ArrayType(_I64, len(values) + 1))
        builder.store(_I64(0), builder.gep(record, [_I32(0), _I32(0)]))
        for k, ty in enumerate(values):
            value = builder.extract_value(args[0], k)
            if isinstance(ty, types.Float):
                value = builder.bitcast(context.cast(builder, value, ty, types.float64), _I64)
            elif isinstance(ty, types.RawPointer):
                value = builder.ptrtoint(value, _I64)
            else:
                value = context.cast(builder, value, ty, types.int64)
            builder.store(value, builder.gep(record, [_I32(0), _I32(k + 1)]))
        return builder.bitcast(record, _VOIDPTR)
    if not all(isinstance(ty, (types.Integer, types.Float, types.Boolean, types.RawPointer))
               for ty in values):
        return None
    return types.voidptr(values), codegen


@intrinsic
def _float(typingctx, record, k):
    """A record's field ``k`` as the float64 it holds."""
    def codegen(context, builder, signature, args):
        base = builder.bitcast(args[0], _I64.as_pointer())
        return builder.bitcast(builder.load(builder.gep(base, [args[1]])), ir.DoubleType())
    return types.float64(types.voidptr, types.int64), codegen


@intrinsic
def _block_sums(typingctx, n):
    """A stack buffer of ``n`` float64s (read with :func:`_float`), sized at
    run time: LLVM spent 0.4 s of a cold first step on a constant-sized one
    of 4096.  Taken once per call of its function, which returns soon after;
    were LLVM to inline that function into a loop, it wraps a dynamic
    alloca in stacksave / stackrestore (InlineFunction)."""
    def codegen(context, builder, signature, args):
        buffer = builder.alloca(ir.DoubleType(), size=args[0])
        return builder.bitcast(buffer, _VOIDPTR)
    if not isinstance(n, types.Integer):
        return None
    return types.voidptr(n), codegen


@intrinsic
def _stack_lines(typingctx, n):
    """The address of ``n`` 64-byte lines on the stack, aligned to a line
    (rows of partial sums written by two threads share no line).  As
    :func:`_block_sums`: sized at run time, taken once per call."""
    def codegen(context, builder, signature, args):
        buffer = builder.alloca(ir.IntType(8), size=builder.add(builder.mul(args[0], _I64(64)),
                                                                _I64(64)))
        address = builder.add(builder.ptrtoint(buffer, _I64), _I64(63))
        return builder.and_(address, _I64(~63))
    if not isinstance(n, types.Integer):
        return None
    return types.int64(types.int64), codegen


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
        start_ty = ir.FunctionType(ir.VoidType(), [member_ty, _VOIDPTR, _I32,
                                                   _I32]).as_pointer()
        builder.call(builder.inttoptr(args[0], start_ty),
                     [builder.inttoptr(args[1], member_ty), args[2],
                      builder.trunc(args[3], _I32), _I32(0)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64, types.voidptr, types.int64), codegen


@intrinsic
def _start_on_blas(typingctx, start, threads, member, record):
    """OpenBLAS's gotoblas_pthread(threads, member, record, 0) through its
    address: its workers and this thread each call member(record)."""
    def codegen(context, builder, signature, args):
        start_ty = ir.FunctionType(_I32, [_I32, _VOIDPTR, _VOIDPTR, _I32]).as_pointer()
        builder.call(builder.inttoptr(args[0], start_ty),
                     [builder.trunc(args[1], _I32), builder.inttoptr(args[2], _VOIDPTR),
                      args[3], _I32(0)])
        return context.get_dummy_value()
    return types.void(types.int64, types.int64, types.int64, types.voidptr), codegen


@intrinsic
def _int_at(typingctx, address):
    """The int32 at ``address``, as an int64."""
    def codegen(context, builder, signature, args):
        value = builder.load_atomic(builder.inttoptr(args[0], _I32.as_pointer()),
                                    "monotonic", 4)
        return builder.sext(value, _I64)
    return types.int64(types.int64), codegen


@intrinsic
def _mode_member(typingctx):
    """The address of a member that gives its thread the FTZ and DAZ bits
    of the record's field 1 (a small function of this module; x86-64 only)."""
    def codegen(context, builder, signature, args):
        name = "fastgrad_pass_team_take_mode"
        member = builder.module.globals.get(name)
        if member is None:
            member = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), [_VOIDPTR]),
                                 name)
            member.linkage = "internal"
            body = ir.IRBuilder(member.append_basic_block())
            fields = body.bitcast(member.args[0], _I64.as_pointer())
            mode = body.trunc(body.load(body.gep(fields, [_I32(1)])), _I32)
            slot = body.alloca(_I32)
            fpenv.mxcsr_call(body, "llvm.x86.sse.stmxcsr", slot)
            own = body.and_(body.load(slot), _I32(~fpenv.FTZ_DAZ & 0xFFFFFFFF))
            body.store(body.or_(own, body.and_(mode, _I32(fpenv.FTZ_DAZ))), slot)
            fpenv.mxcsr_call(body, "llvm.x86.sse.ldmxcsr", slot)
            body.ret_void()
        return builder.ptrtoint(member, _I64)
    return types.int64(), codegen


@intrinsic
def _call(typingctx, member, record):
    """member(record) through its address."""
    def codegen(context, builder, signature, args):
        member_ty = ir.FunctionType(ir.VoidType(), [_VOIDPTR]).as_pointer()
        builder.call(builder.inttoptr(args[0], member_ty), [args[1]])
        return context.get_dummy_value()
    return types.void(types.int64, types.voidptr), codegen


# --- the driver's side ---------------------------------------------------------

@njit(**INNER)
def _run(plan, member, record, threads):
    """``member`` on a team of ``threads`` (0 or 1: on this thread alone,
    a plain call).  Without the shared pool the
    team is OpenBLAS's own workers, which ran the GEMM just before and spin
    waiting for the next job, never more than OpenBLAS is told to use now
    (its ``blas_cpu_number``).  On the shared pool it is a GNU OpenMP
    team, started with this thread's FTZ and DAZ cleared: GNU OpenMP may
    create its threads here, and a thread keeps the mode it is created in
    (kernels/cpu/fpenv.py).  Each member sets its own."""
    if threads > 1 and plan[PLAN_POOL_BLAS] != 0:
        threads = min(threads, _int_at(plan[PLAN_POOL_BLAS]))
    start_team(plan, member, record, threads)


@njit(**INNER)
def start_team(plan, member, record, threads):
    """``member`` on a team of ``threads`` started as the plan says
    (OpenBLAS's workers where ``PLAN_POOL_BLAS``, else the shared pool's
    GNU OpenMP team), whatever OpenBLAS is told to use now (:func:`_run`
    caps the passes' teams at that; the sharded step's shards run with
    BLAS on one thread); 0 or 1 thread: a plain call."""
    if threads < 2:
        _call(member, record)
    elif plan[PLAN_POOL_BLAS] != 0:
        _start_on_blas(plan[PLAN_POOL_START], threads, member, record)
    else:
        flushed = fpenv.adopt(0)
        _start(plan[PLAN_POOL_START], member, record, threads)
        fpenv.leave(flushed)


# OpenBLAS splits a GEMM over its workers only above m * n * k = 65536 *
# GEMM_MULTITHREAD_THRESHOLD (4 in its builds; interface/gemm.c).
BLAS_THREADED_MNK = 1 << 18


@njit(**INNER)
def workers_mode(plan, sizes, batch, clear):
    """OpenBLAS's workers (as many as it is told to use now, the caller
    among them) take this thread's FTZ and DAZ bits if they are set and a
    GEMM of a step of layer ``sizes`` and ``batch`` rows is large enough
    for OpenBLAS to split; with ``clear``, whatever the step, they are
    cleared.  Returns whether the workers were given the mode.  SciPy's
    OpenBLAS does not pass the caller's floating-point mode to its workers
    (no CONSISTENT_FPCSR), so a flushing step gives them its own for its
    span, and clears it on return (OpenBLAS never sets it) so that other
    code's BLAS calls keep gradual underflow (kernels/cpu/step.py).  A job
    queued to n - 1 workers takes the lowest-numbered idle ones, as each
    GEMM's jobs do (OpenBLAS's ``exec_blas_async``).  Where MKL runs the
    GEMMs (``PLAN_POOL_GEMM_MODE``) its threads are GNU OpenMP's pool, the
    team's, and take no mode from the caller: the team gets the mode the
    same way, whatever the GEMMs' sizes (MKL's own threading thresholds
    are not known here; a relu net's GEMMs on denormals ran 2x slower).
    Nothing on the shared pool with OpenBLAS, whose BLAS jobs adopt the
    caller's mode, or off x86-64.  One compiled call, not inlined:
    inlined in the driver it cost a cold first step 0.2 s more."""
    if fpenv.X86:
        if plan[PLAN_POOL_BLAS] == 0:
            if plan[PLAN_POOL_GEMM_MODE] == 0 or plan[PLAN_POOL_THREADS] < 2:
                return False
            mode = 0 if clear else fpenv.caller_mode()
            if mode == 0 and not clear:
                return False
            _run(plan, _mode_member(), _record((mode,)), plan[PLAN_POOL_THREADS])
            return True
        mode = 0
        if not clear:
            mode = fpenv.caller_mode()
            largest = 0
            for l in range(sizes.shape[0] - 1):
                largest = max(largest, batch * sizes[l] * sizes[l + 1])
            if mode == 0 or largest <= BLAS_THREADED_MNK:
                return False
        _run(plan, _mode_member(), _record((mode,)), _int_at(plan[PLAN_POOL_BLAS]))
        return True
    return False


@njit(**INLINE)
def check_members(plan, params):
    """Raise unless ``plan`` holds the members of ``params``' dtype: a
    driver with the team's branches runs its activation, loss and update
    passes through them alone (the plans of ``kernels/cpu/step.py``'s
    ``step_plan`` and of the host hold them: :func:`fill_members`).  A
    member cannot raise (a C callback: Numba prints its exception and
    returns), so the driver also refuses an activation code these kernels
    do not serve before it starts (kernels/cpu/step.py)."""
    if (plan[PLAN_POOL_FORWARD] == 0 or plan[PLAN_POOL_GRAD] == 0 or plan[PLAN_POOL_NORM] == 0
            or plan[PLAN_POOL_UPDATE] == 0 or plan[PLAN_POOL_LOSS] == 0):
        raise ValueError("this step driver runs its passes through the pass team's members: "
                         "the step plan has none (make it with kernels/cpu/step.py's "
                         "step_plan, or kernels/cpu/pass_team.py's fill_members)")
    _check_itemsize(plan, params)


@njit(**INLINE)
def _check_itemsize(plan, a):
    if plan[PLAN_POOL_ITEMSIZE] != a.itemsize:
        raise ValueError("the step plan's pass team members were compiled for another dtype "
                         "than the parameters'")


@njit(**INLINE)
def team_size(plan, elements, act):
    """Threads for the forward pass of activation ``act`` over ``elements``
    outputs: 0 runs it on this thread.  A memory-bound pass gains from a
    team only on large layers; one that computes a transcendental per
    output, from a few thousand."""
    threads = plan[PLAN_POOL_THREADS]
    least = MIN_FORWARD_CHEAP if act in _MEMORY_BOUND else MIN_FORWARD
    return threads if threads > 1 and elements >= least else 0


@njit(**INLINE)
def gradient_team_size(plan, g, act):
    """Threads for the gradient pass over ``g``: 0 runs it on this thread.
    A built-in gradient (``blocks_db_code``) is split by blocks of rows from
    two blocks and ``MIN_GRADIENT_ROWS`` values (a memory-bound derivative,
    ``spec.MEMORY_BOUND_GRADIENT``) or ``MIN_GRADIENT_ROWS_COSTLY`` (one with
    a transcendental).  A registered one is split by columns from
    ``MIN_GRADIENT`` values and ``MIN_COLUMNS`` columns if it reads z, else
    not at all: by columns, the cache line at each share's edge, written by
    two threads in every row, made a derivative read from ``a`` 2-16x
    slower (relu, tanh; bench/RESULTS.md "Activation passes on the pool")."""
    threads = plan[PLAN_POOL_THREADS]
    if threads < 2:
        return 0
    if blocks_db_code(act):
        least = MIN_GRADIENT_ROWS if act in _MEMORY_BOUND_GRADIENT else MIN_GRADIENT_ROWS_COSTLY
        return threads if g.size >= least and g.shape[0] > DB_ROWS else 0
    if g.shape[1] < MIN_COLUMNS or not needs_z(act) or g.size < MIN_GRADIENT:
        return 0
    return threads


@njit(**INLINE)
def check_update(plan, rule, p, g, s0, s1, s2, hp):
    """Raise unless :func:`clipped_update` can run these buffers and rule:
    the members see the buffers through their addresses (contiguous ones
    only) and cannot raise themselves.  Called before the caller's
    floating-point mode is set (fpenv.enter), which a raise would leave
    behind."""
    if not _contiguous(p, g, s0, s1, s2, hp):
        raise ValueError("the update on the pass team needs C-contiguous buffers")
    refuse_rule(rule)
    _check_itemsize(plan, p)


# The passes below are compiled calls, not inlined: Numba's IR inliner
# copies a callee's whole IR at every call site it reaches (~0.15 s of a
# cold first step for these); and called from compiled code alone (INNER).

@njit(**INNER)
def forward(plan, threads, z, b, out, act, alpha):
    """``bias_act_step(z, b, out, act, alpha)`` on ``threads`` threads, by
    rows (0 or 1: on this thread)."""
    if not needs_z(act) and out.ctypes.data != z.ctypes.data:
        raise ValueError("a separate out (z kept) for an activation whose derivative reads "
                         "out (bias_act_step)")
    rows, cols = z.shape
    threads = max(threads, 1)
    share = (rows + threads - 1) // threads
    record = _record(((rows + share - 1) // share, share, z.ctypes.data, out.ctypes.data,
                      b.ctypes.data, 0, rows, cols, act, alpha))
    _run(plan, plan[PLAN_POOL_FORWARD], record, threads)


@njit(**INNER)
def gradient(plan, threads, g, a, z, db, act, alpha):
    """``bias_act_grad_inplace(g, a, z, db, act, alpha)`` on ``threads``
    threads (0 or 1: on this thread): by blocks of rows for a built-in
    gradient, else by columns (shares of whole 16-column vectors)."""
    if blocks_db_code(act):
        _gradient_by_blocks(plan, threads, g, a, z, db, act, alpha)
        return
    rows, cols = g.shape
    threads = max(threads, 1)
    share = ((cols + threads - 1) // threads + 15) // 16 * 16
    record = _record(((cols + share - 1) // share, share, g.ctypes.data, a.ctypes.data,
                      z.ctypes.data, db.ctypes.data, rows, cols, act, alpha))
    _run(plan, plan[PLAN_POOL_GRAD], record, threads)


@njit(**INLINE)
def _gradient_by_blocks(plan, threads, g, a, z, db, act, alpha):
    # Each block's partial sums into a row of whole cache lines on the
    # stack, in rounds of PARTS_BYTES (a row longer than that: one a round,
    # on the heap); the rows added into db in block order, the first
    # copied (kernels/cpu/activations.py _grad_row_blocks).
    rows, cols = g.shape
    if rows == 0:
        for j in range(cols):
            db[j] = 0
        return
    line = 64 // g.itemsize
    stride = (cols + line - 1) // line * line
    blocks = (rows + DB_ROWS - 1) // DB_ROWS
    on_stack = stride * g.itemsize <= PARTS_BYTES
    per_round = min(blocks, PARTS_BYTES // (stride * g.itemsize)) if on_stack else 1
    address = _stack_lines(per_round * stride // line if on_stack else 0)
    parts = carray(_as_pointer(address), (per_round, stride), g.dtype)
    if not on_stack:
        parts = np.empty((1, stride), g.dtype)
        address = np.int64(parts.ctypes.data)      # (uintp: would unify to float64)
    sharers = max(threads, 1)
    for first in range(0, blocks, per_round):
        count = min(per_round, blocks - first)
        # a share a thread, balanced by rows (the last block may be short)
        share = max(1, ((min(rows, (first + count) * DB_ROWS) - first * DB_ROWS) * 2
                        + sharers * DB_ROWS) // (2 * sharers * DB_ROWS))
        record = _record(((count + share - 1) // share, share, g.ctypes.data, a.ctypes.data,
                          z.ctypes.data, address, rows, cols, act, alpha, stride, first,
                          count))
        _run(plan, plan[PLAN_POOL_GRAD], record, threads)
        for k in range(count):
            if first + k == 0:
                for j in range(cols):
                    db[j] = parts[0, j]
            else:
                add_part(db, parts[k, :cols])


@njit(**INLINE)
def update_team_size(plan, n):
    """Threads for the update of ``n`` parameters: 1 runs it on this thread
    (no team, the update not split: ``PLAN_POOL_SPLIT_UPDATE`` 0, or fewer
    than ``MIN_UPDATE``)."""
    threads = plan[PLAN_POOL_THREADS]
    if threads < 2 or plan[PLAN_POOL_SPLIT_UPDATE] == 0 or n < MIN_UPDATE:
        return 1
    return threads


@njit(**INLINE)
def _contiguous(p, g, s0, s1, s2, hp):
    return (p.flags.c_contiguous and g.flags.c_contiguous and s0.flags.c_contiguous
            and s1.flags.c_contiguous and s2.flags.c_contiguous and hp.flags.c_contiguous)


@njit(**INNER)
def clipped_update(plan, rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm, clip_value):
    """``optim.clipped_update`` with both passes through the plan's members,
    on its team (on this thread when :func:`update_team_size` says 1): the
    same outputs, bitwise, and nothing written when the norm is not finite.
    Its callers first run :func:`check_update`."""
    threads = update_team_size(plan, p.shape[0])
    # The norm by blocks of reduce.BLOCK counted from each layer's start,
    # their sums added in order: reduce.layer_sumsq's sums, however split.
    layers = offsets.shape[0] - 1
    blocks = 0
    for li in range(layers):
        blocks += (offsets[li + 1] - offsets[li] + BLOCK - 1) // BLOCK
    # Rounds of NORM_ROUND blocks, each summed by the team into a stack
    # buffer (no allocation: run_epoch allocates nothing per step), then
    # added here in order, layer by layer.
    parts = _block_sums(min(blocks, NORM_ROUND))
    total = 0.0
    li, left, s = -1, 0, 0.0          # the layer being added, its blocks not yet added
    for first in range(0, blocks, NORM_ROUND):
        count = min(NORM_ROUND, blocks - first)
        share = max(1, min((count + threads - 1) // threads, NORM_SHARE))
        record = _record(((count + share - 1) // share, share, g.shape[0], g.ctypes.data,
                          offsets.ctypes.data, parts, layers, first, count))
        _run(plan, plan[PLAN_POOL_NORM], record, threads)
        for k in range(count):
            while left == 0:
                if li >= 0:
                    layer_sq[li] = s
                    total += s
                li, s = li + 1, 0.0
                left = (offsets[li + 1] - offsets[li] + BLOCK - 1) // BLOCK
            s += _float(parts, k)
            left -= 1
    if li >= 0:
        layer_sq[li] = s
        total += s
    for rest in range(li + 1, layers):      # empty layers after the last block
        layer_sq[rest] = 0.0
    norm = np.sqrt(total)
    if not np.isfinite(norm):
        return norm, 0.0, True
    scale = clip_scale(norm, clip_norm)
    n = p.shape[0]
    share = (min((n + threads - 1) // threads, UPDATE_SHARE) + 15) // 16 * 16
    rows = hp.shape[0] if hp.ndim == 2 else 1
    record = _record(((n + share - 1) // share, share, n, p.ctypes.data, g.ctypes.data,
                      s0.ctypes.data, s1.ctypes.data, s2.ctypes.data, s0.shape[0], s1.shape[0],
                      s2.shape[0], hp.ctypes.data, rows, hp.ndim == 1, rule, scale, clip_value))
    _run(plan, plan[PLAN_POOL_UPDATE], record, threads)
    return norm, scale, False


@njit(**INLINE)
def check_loss(plan, loss_kind, labels, target, rows, cols):
    """Raise unless :func:`loss` can read the ``labels`` or ``target`` of
    ``loss_kind`` for outputs of up to ``rows`` x ``cols``: the members see
    them through their addresses (C-contiguous ones only) as int64 labels
    and a target of the members' dtype."""
    if not (labels.flags.c_contiguous and target.flags.c_contiguous):
        raise ValueError("the loss on the pass team needs C-contiguous labels and target")
    if labels.itemsize != 8 or target.itemsize != plan[PLAN_POOL_ITEMSIZE]:
        raise ValueError("the loss on the pass team needs int64 labels and a target of the "
                         "model's dtype")
    if loss_kind == CROSS_ENTROPY:
        if labels.shape[0] < rows:
            raise ValueError("fewer labels than the batch's rows")
    elif target.shape[0] < rows or target.shape[1] != cols:
        raise ValueError("the target's shape is not the output's")


@njit(**INNER)
def loss(plan, loss_kind, out, labels, target, grad):
    """The mean loss ``loss_kind`` of ``out`` and its gradient into
    ``grad`` (``out`` and ``grad`` C-contiguous, the driver's buffers; its
    callers first run :func:`check_loss`), through the plan's member: on
    its team from ``MIN_LOSS`` outputs, by shares of the loss's units, each
    unit's sum kept (on the stack, in rounds) and added here in unit order,
    as the serial kernels of kernels/cpu/losses.py add them: the same loss
    and gradient, bitwise, however split."""
    units, divisor = loss_count(loss_kind, out)
    threads = plan[PLAN_POOL_THREADS] if out.size >= MIN_LOSS else 0
    sharers = max(threads, 1)           # one share a thread
    sums = _block_sums(min(units, NORM_ROUND))
    total = 0.0
    for first in range(0, units, NORM_ROUND):
        count = min(NORM_ROUND, units - first)
        share = (count + sharers - 1) // sharers
        record = _record(((count + share - 1) // share, share, loss_kind, out.ctypes.data,
                          out.shape[0], out.shape[1], labels.ctypes.data, labels.shape[0],
                          target.ctypes.data, target.shape[0], target.shape[1],
                          grad.ctypes.data, first, sums, count))
        _run(plan, plan[PLAN_POOL_LOSS], record, threads)
        for k in range(count):
            total += _float(sums, k)
    return total / divisor


# --- the members -----------------------------------------------------------------

def _forward_member(dtype):
    def member(record):
        rows, cols, share = _field(record, _ROWS), _field(record, _COLS), _field(record, _SHARE)
        z = carray(_as_pointer(_field(record, _P0)), (rows, cols), dtype)
        out = carray(_as_pointer(_field(record, _P1)), (rows, cols), dtype)
        b = carray(_as_pointer(_field(record, _P2)), (cols,), dtype)
        act, alpha = _field(record, _ACT), _float(record, _ALPHA)
        keep_z = _field(record, _P0) != _field(record, _P1)
        saved = fpenv.enter(z)
        k = _claim(record)
        while k < _field(record, _SHARES):
            r0 = k * share
            r1 = min(rows, r0 + share)
            if keep_z:
                _needs_z_ladder(z[r0:r1], b, out[r0:r1], alpha, act)
            else:
                _bias_act_ladder(z[r0:r1], b, alpha, act)
            k = _claim(record)
        fpenv.leave(saved)
    return member


def _gradient_member(dtype):
    def member(record):
        rows, cols, share = _field(record, _ROWS), _field(record, _COLS), _field(record, _SHARE)
        g = carray(_as_pointer(_field(record, _P0)), (rows, cols), dtype)
        a = carray(_as_pointer(_field(record, _P1)), (rows, cols), dtype)
        z = carray(_as_pointer(_field(record, _P2)), (rows, cols), dtype)
        db = carray(_as_pointer(_field(record, _P3)), (cols,), dtype)
        act, alpha = _field(record, _ACT), _float(record, _ALPHA)
        saved = fpenv.enter(g)
        if blocks_db_code(act):       # by blocks of rows: _P3 holds their partial sums
            first, count = _field(record, _FIRST_ROW_BLOCK), _field(record, _ROW_BLOCKS)
            stride = _field(record, _STRIDE)
            parts = carray(_as_pointer(_field(record, _P3)), (count, stride), dtype)
            k = _claim(record)
            while k < _field(record, _SHARES):
                b0, b1 = k * share, min(count, (k + 1) * share)
                _grad_block_ladder(g, a, z, parts[b0:b1], alpha, act, (first + b0) * DB_ROWS,
                                   min(rows, (first + b1) * DB_ROWS))
                k = _claim(record)
        else:
            k = _claim(record)
            while k < _field(record, _SHARES):
                c0 = k * share
                _grad_columns_ladder(g, a, z, db, alpha, act, c0, min(cols, c0 + share))
                k = _claim(record)
        fpenv.leave(saved)
    return member


def _norm_member(dtype):
    def member(record):
        n, layers, share = _field(record, _N), _field(record, _LAYERS), _field(record, _SHARE)
        g = carray(_as_pointer(_field(record, _G)), (n,), dtype)
        offsets = carray(_as_pointer(_field(record, _OFFSETS)), (layers + 1,), np.int64)
        first_block, count = _field(record, _FIRST_BLOCK), _field(record, _BLOCKS)
        parts = carray(_as_pointer(_field(record, _PARTS)), (count,), np.float64)
        saved = fpenv.enter(g)
        k = _claim(record)
        while k < _field(record, _SHARES):
            b = first_block + k * share                # blocks counted over all layers
            end = min(first_block + count, b + share)
            li, first = 0, 0                    # the layer of block b, and its first block
            while b < end:
                n_li = (offsets[li + 1] - offsets[li] + BLOCK - 1) // BLOCK
                if b >= first + n_li:
                    li, first = li + 1, first + n_li
                    continue
                lo = offsets[li] + (b - first) * BLOCK
                parts[b - first_block] = block_sumsq(g[lo:min(lo + BLOCK, offsets[li + 1])])
                b += 1
            k = _claim(record)
        fpenv.leave(saved)
    return member


def _update_member(dtype):
    def member(record):
        n, share = _field(record, _N), _field(record, _SHARE)
        p = carray(_as_pointer(_field(record, _P)), (n,), dtype)
        g = carray(_as_pointer(_field(record, _GRAD)), (n,), dtype)
        s0 = carray(_as_pointer(_field(record, _S0)), (_field(record, _N_S0),), dtype)
        s1 = carray(_as_pointer(_field(record, _S1)), (_field(record, _N_S1),), dtype)
        s2 = carray(_as_pointer(_field(record, _S2)), (_field(record, _N_S2),), dtype)
        rows = carray(_as_pointer(_field(record, _HP)), (_field(record, _HP_ROWS), HP_SIZE),
                      np.float64)
        single, rule = _field(record, _SINGLE) != 0, _field(record, _RULE)
        scale, clip_value = _float(record, _SCALE), _float(record, _CLIP)
        saved = fpenv.enter(p)
        k = _claim(record)
        while k < _field(record, _SHARES):
            lo = k * share
            update_rows(rule, p, g, s0, s1, s2, rows, single, scale, clip_value, lo,
                        min(n, lo + share))
            k = _claim(record)
        fpenv.leave(saved)
    return member


def _loss_member(dtype):
    def member(record):
        share, kind, first = _field(record, _SHARE), _field(record, _KIND), \
            _field(record, _FIRST_UNIT)
        rows, cols = _field(record, _OUT_ROWS), _field(record, _OUT_COLS)
        out = carray(_as_pointer(_field(record, _OUT)), (rows, cols), dtype)
        grad = carray(_as_pointer(_field(record, _DOUT)), (rows, cols), dtype)
        labels = carray(_as_pointer(_field(record, _LABELS)), (_field(record, _N_LABELS),),
                        np.int64)
        target = carray(_as_pointer(_field(record, _TARGET)),
                        (_field(record, _TARGET_ROWS), _field(record, _TARGET_COLS)), dtype)
        count = _field(record, _COUNT)
        sums = carray(_as_pointer(_field(record, _SUMS)), (count,), np.float64)
        saved = fpenv.enter(out)
        k = _claim(record)
        while k < _field(record, _SHARES):
            u0 = first + k * share
            loss_units(kind, out, labels, target, grad, sums, u0,
                       min(u0 + share, first + count), first)
            k = _claim(record)
        fpenv.leave(saved)
    return member


_MAKERS = {"forward": _forward_member, "gradient": _gradient_member, "norm": _norm_member,
           "update": _update_member, "loss": _loss_member}
KINDS = tuple(_MAKERS)
_MEMBER_SIGNATURE = types.void(types.voidptr)
_members = {}


def _numba_type(dtype):
    return types.float32 if np.dtype(dtype) == np.float32 else types.float64


def compile_member(py_func):
    """``py_func(record)`` compiled as a member: a C callback on a record's
    address, cached on disk as the kernels are (the sharded step's shard
    member is one too: kernels/cpu/step_sharded.py)."""
    return cfunc(_MEMBER_SIGNATURE, cache=JIT["cache"], error_model="numpy",
                 pipeline_class=JIT["pipeline_class"])(py_func)


def member_addresses(dtype, kinds=KINDS):
    """The addresses of this package's members of ``kinds`` for ``dtype``,
    each compiled (or loaded from the disk cache) on first use."""
    dtype = np.dtype(dtype)
    found = []
    for kind in kinds:
        member = _members.get((dtype, kind))
        if member is None:
            member = _members[dtype, kind] = compile_member(_MAKERS[kind](_numba_type(dtype)))
        found.append(member.address)
    return tuple(found)


def members_to_compile(dtype, kinds=KINDS):
    """The members of ``kinds`` for ``dtype`` that :func:`member_addresses`
    would compile: neither in this process nor in Numba's disk cache."""
    dtype = np.dtype(dtype)
    todo = [kind for kind in kinds if (dtype, kind) not in _members]
    if not todo or not JIT["cache"]:
        return tuple(todo)
    cached = [in_disk_cache(_MAKERS[kind](_numba_type(dtype))) for kind in todo]
    if None in cached:
        return ()
    return tuple(kind for kind, hit in zip(todo, cached) if not hit)


def in_disk_cache(py_func):
    """Whether Numba's disk cache holds ``py_func`` compiled as a member
    (:func:`compile_member`); None where that cannot be told."""
    from numba.core.caching import FunctionCache
    from numba.core.registry import cpu_target
    # The key and index of Numba's cache (numba.core.caching.Cache): what
    # the cfunc's compile() looks up, without loading the machine code.
    # Private to Numba: where they change, say None (each member is then
    # compiled or loaded on first use, as without this question;
    # tests/test_compile_worker.py fails).
    try:
        codegen = cpu_target.target_context.codegen()
        cache = FunctionCache(py_func)
        return cache._index_key(_MEMBER_SIGNATURE, codegen) in cache._cache_file._load_index()
    except (AttributeError, TypeError, OSError, RuntimeError):
        return None


def fill_members(plan, dtype, kinds=KINDS):
    """Write the addresses of this package's members of ``kinds`` for
    ``dtype`` (compiled on first use) into ``plan`` (``PLAN_POOL_*``; the
    others 0), with the dtype's item size.  Threads are the host's to set."""
    found = dict(zip(kinds, member_addresses(dtype, kinds)))
    for kind, slot in (("forward", PLAN_POOL_FORWARD), ("gradient", PLAN_POOL_GRAD),
                       ("norm", PLAN_POOL_NORM), ("update", PLAN_POOL_UPDATE),
                       ("loss", PLAN_POOL_LOSS)):
        plan[slot] = found.get(kind, 0)
    plan[PLAN_POOL_ITEMSIZE] = np.dtype(dtype).itemsize


@njit(**JIT)
def loss_on_team(plan, loss_kind, out, labels, target, grad):
    """:func:`loss` as a kernel of its own, checked and in the training
    kernels' floating-point mode, as a step runs it (``bench/loss_team.py``
    and the tests call it; ``out`` and ``grad`` C-contiguous)."""
    if not (out.flags.c_contiguous and grad.flags.c_contiguous and out.shape == grad.shape):
        raise ValueError("the loss on the pass team needs C-contiguous out and grad of one shape")
    if plan[PLAN_POOL_LOSS] == 0:
        raise ValueError("the plan has no loss member (kernels/cpu/pass_team.py fill_members)")
    _check_itemsize(plan, out)
    _check_itemsize(plan, grad)
    check_loss(plan, loss_kind, labels, target, out.shape[0], out.shape[1])
    saved = fpenv.enter(out)
    value = loss(plan, loss_kind, out, labels, target, grad)
    fpenv.leave(saved)
    return value


@njit(**JIT)
def clipped_update_on_team(plan, rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm,
                           clip_value):
    """:func:`clipped_update` as a kernel of its own: an optimizer's
    ``step()`` on the team (``fastgrad.backend``; the plan's norm and
    update members are all it reads)."""
    check_update(plan, rule, p, g, s0, s1, s2, hp)
    saved = fpenv.enter(p)
    result = clipped_update(plan, rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm,
                            clip_value)
    fpenv.leave(saved)
    return result
