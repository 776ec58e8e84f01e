"""OpenBLAS's parallel jobs run on Numba's OpenMP pool: one pool owns the cores.

OpenBLAS (0.3.27 and later) lets a program run its parallel work through
a callback (``openblas_set_threads_callback_function``).  ``run_jobs`` is
that callback: it starts a GNU OpenMP team of ``numjobs`` threads
(``GOMP_parallel``, what ``#pragma omp parallel`` compiles to) from the
same thread pool as Numba's parallel passes, so the threads that finish a
GEMM are the ones the next pass or update wakes, and OpenBLAS's own
workers, which spin for ~2^28 cycles after each call and slowed what ran
next, are never woken (bench/RESULTS.md "One pool").  No Numba parallel
region is used here: one takes the GIL on entry and exit, which a thread
waiting in OpenBLAS for this call may hold.

The jobs of a level-3 routine wait for one another, so they must all run
at once.  Inside an active OpenMP region a nested team would get one
thread (and with ``OMP_DYNAMIC`` or a thread limit below the job count it
could get fewer than asked), so there the jobs go to OpenBLAS's own
workers, as OpenBLAS would have sent them.  A job clears the slot of its
number in OpenBLAS's thread table when it ends, so one callback runs at a
time (a spin lock that yields): a team's job must not clear the slot of a
worker that a fallback call gave work to.  OpenBLAS already runs one
threaded level-3 call at a time.

The external functions and variables are reached by symbol name,
registered with llvmlite at run time (``fastgrad.threads``), so the
compiled callback can be cached on disk: no address of this process is
compiled into it.
"""
import numpy as np
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from . import fpenv
from ._jit import JIT

# Symbols registered with llvmlite before the callback is compiled or loaded.
IN_PARALLEL = "fastgrad_omp_in_parallel"       # libgomp's omp_in_parallel
DYNAMIC = "fastgrad_omp_get_dynamic"           # libgomp's omp_get_dynamic
THREAD_LIMIT = "fastgrad_omp_get_thread_limit"  # libgomp's omp_get_thread_limit
THREAD_NUM = "fastgrad_omp_get_thread_num"     # libgomp's omp_get_thread_num
PARALLEL = "fastgrad_gomp_parallel"            # libgomp's GOMP_parallel
MEMBER = "fastgrad_blas_team_member"           # _team_member below, once compiled
BLAS_ASYNC = "fastgrad_exec_blas_async"        # OpenBLAS's exec_blas_async
BLAS_WAIT = "fastgrad_exec_blas_async_wait"    # OpenBLAS's exec_blas_async_wait
BLAS_WORKERS = "fastgrad_blas_num_threads"     # OpenBLAS's int blas_num_threads
LOCK = "fastgrad_blas_pool_lock"               # an int32 owned by fastgrad.threads
YIELD = "fastgrad_sched_yield"                 # libc's sched_yield

_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VOIDPTR = ir.IntType(8).as_pointer()


@intrinsic
def _call_job(typingctx, dojob, thread, job, data):
    """dojob(thread, job, data) through OpenBLAS's function pointer."""
    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.VoidType(), [_I32, _VOIDPTR, _I32])
        builder.call(builder.bitcast(args[0], fnty.as_pointer()), list(args[1:]))
        return context.get_dummy_value()
    return types.void(types.voidptr, types.int32, types.voidptr, types.int32), codegen


@intrinsic
def _job_at(typingctx, jobs, nbytes):
    """The address ``nbytes`` past ``jobs``."""
    def codegen(context, builder, signature, args):
        return builder.gep(args[0], [args[1]])
    return types.voidptr(types.voidptr, types.intp), codegen


def _external(builder, symbol, restype, argtypes=()):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(restype, argtypes),
                                          symbol)


def _external_int(builder, symbol):
    variable = builder.module.globals.get(symbol)
    if variable is None:
        variable = ir.GlobalVariable(builder.module, _I32, symbol)
        variable.linkage = "external"
    return variable


def _omp_query(symbol):
    """An intrinsic returning libgomp's ``int symbol(void)``."""
    @intrinsic
    def query(typingctx):
        def codegen(context, builder, signature, args):
            return builder.call(_external(builder, symbol, _I32), [])
        return types.int32(), codegen
    return query


_in_parallel = _omp_query(IN_PARALLEL)
_dynamic = _omp_query(DYNAMIC)
_thread_limit = _omp_query(THREAD_LIMIT)


@intrinsic
def _thread_num(typingctx):
    def codegen(context, builder, signature, args):
        return builder.call(_external(builder, THREAD_NUM, _I32), [])
    return types.int32(), codegen


@intrinsic
def _pack(typingctx, dojob, numjobs, job_size, jobs, data, mode):
    """The five arguments a team needs and the caller's floating-point mode,
    in a stack record of 6 int64."""
    def codegen(context, builder, signature, args):
        record = cgutils.alloca_once(builder, ir.ArrayType(_I64, 6))
        values = [builder.ptrtoint(args[0], _I64), builder.sext(args[1], _I64),
                  builder.zext(args[2], _I64) if args[2].type.width < 64 else args[2],
                  builder.ptrtoint(args[3], _I64), builder.sext(args[4], _I64),
                  context.cast(builder, args[5], mode, types.int64)]
        for k, value in enumerate(values):
            builder.store(value, builder.gep(record, [_I32(0), _I32(k)]))
        return builder.bitcast(record, _VOIDPTR)
    return types.voidptr(dojob, numjobs, job_size, jobs, data, mode), codegen


@intrinsic
def _field(typingctx, record, k):
    """Field k of a record made by _pack, as an int64."""
    def codegen(context, builder, signature, args):
        base = builder.bitcast(args[0], _I64.as_pointer())
        return builder.load(builder.gep(base, [args[1]]))
    return types.int64(types.voidptr, k), codegen


@intrinsic
def _as_pointer(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], _VOIDPTR)
    return types.voidptr(types.int64), codegen


@intrinsic
def _run_team(typingctx, record, numjobs):
    """GOMP_parallel(team_member, record, numjobs, 0): returns when all are done."""
    def codegen(context, builder, signature, args):
        member_ty = ir.FunctionType(ir.VoidType(), [_VOIDPTR])
        member = _external(builder, MEMBER, ir.VoidType(), [_VOIDPTR])
        start = _external(builder, PARALLEL, ir.VoidType(),
                          [member_ty.as_pointer(), _VOIDPTR, _I32, _I32])
        builder.call(start, [member, args[0], args[1], _I32(0)])
        return context.get_dummy_value()
    return types.void(types.voidptr, types.int32), codegen


@intrinsic
def _spare_slot(typingctx):
    """The slot of OpenBLAS's thread table no worker owns: blas_num_threads - 1."""
    def codegen(context, builder, signature, args):
        return builder.sub(builder.load(_external_int(builder, BLAS_WORKERS)), _I32(1))
    return types.int32(), codegen


@intrinsic
def _lock(typingctx):
    def codegen(context, builder, signature, args):
        word = _external_int(builder, LOCK)
        retry = builder.append_basic_block("lock.retry")
        held = builder.append_basic_block("lock.held")
        builder.branch(retry)
        builder.position_at_end(retry)
        taken = builder.extract_value(
            builder.cmpxchg(word, _I32(0), _I32(1), "acquire", "monotonic"), 1)
        with builder.if_then(builder.not_(taken)):
            builder.call(_external(builder, YIELD, _I32), [])
        builder.cbranch(taken, held, retry)
        builder.position_at_end(held)
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _unlock(typingctx):
    def codegen(context, builder, signature, args):
        builder.store_atomic(_I32(0), _external_int(builder, LOCK), "release", 4)
        return context.get_dummy_value()
    return types.void(), codegen


def _blas_server_call(symbol):
    """An intrinsic calling OpenBLAS's ``int symbol(long count, void *jobs)``."""
    @intrinsic
    def call(typingctx, count, jobs):
        def codegen(context, builder, signature, args):
            fn = cgutils.get_or_insert_function(builder.module,
                                                ir.FunctionType(_I32, [_I64, _VOIDPTR]), symbol)
            return builder.call(fn, args)
        return types.int32(types.int64, types.voidptr), codegen
    return call


_blas_async = _blas_server_call(BLAS_ASYNC)
_blas_wait = _blas_server_call(BLAS_WAIT)


def _team_member(record):
    i = _thread_num()
    if i < _field(record, 1):
        # the caller's FTZ/DAZ bits: a GEMM of the training kernels flushes
        # denormals on every thread (kernels/cpu/fpenv.py), anyone else's not
        own = fpenv.adopt(_field(record, 5))
        _call_job(_as_pointer(_field(record, 0)), i,
                  _job_at(_as_pointer(_field(record, 3)), i * _field(record, 2)),
                  np.int32(_field(record, 4)))
        fpenv.leave(own)


def _run_jobs(sync, dojob, numjobs, job_size, jobs, data):
    _lock()
    # A team of exactly numjobs threads: not nested in an active region, and
    # libgomp neither free to give fewer (OMP_DYNAMIC) nor limited below it.
    if _in_parallel() == 0 and _dynamic() == 0 and numjobs <= _thread_limit():
        # The team starts with this thread's FTZ/DAZ cleared, so that GNU
        # OpenMP never creates a pool thread flushing; each job adopts them.
        mode = fpenv.caller_mode()
        own = fpenv.adopt(0)
        _run_team(_pack(dojob, numjobs, job_size, jobs, data, mode), numjobs)
        fpenv.leave(own)
    else:
        # OpenBLAS's own way: its workers take jobs 1..n-1 (linked through
        # each job's ``next``); this thread runs job 0 under the slot no
        # worker owns, then waits for them.
        rest = _job_at(jobs, job_size)
        if numjobs > 1:
            _blas_async(np.int64(1), rest)
        _call_job(dojob, _spare_slot(), jobs, data)
        if numjobs > 1:
            _blas_wait(np.int64(numjobs - 1), rest)
    _unlock()


_compiled = {}


def _compiled_address(name, function, signature):
    if name not in _compiled:
        _compiled[name] = cfunc(signature, cache=JIT["cache"],
                                pipeline_class=JIT["pipeline_class"])(function)
    return _compiled[name].address


def team_member_address():
    """The team's function, compiled (or loaded from the disk cache) once;
    registered as MEMBER before ``run_jobs_address`` is first called."""
    return _compiled_address("member", _team_member, types.void(types.voidptr))


def run_jobs_address():
    """The callback, compiled (or loaded from the disk cache) once, after
    every symbol above is registered with llvmlite."""
    return _compiled_address("callback", _run_jobs, types.void(
        types.int32, types.voidptr, types.int32, types.uintp, types.voidptr, types.int32))
