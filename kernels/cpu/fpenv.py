"""The floating-point mode of the training kernels: flush float32 denormals or not.

``enter(like)`` at a kernel's start reads the caller's MXCSR and, when the
process's flag is on (``fastgrad.kernels.denormals``) and ``like`` (the
kernel's parameters) is float32, sets FTZ and DAZ; ``leave(saved)`` on
return puts the caller's bits back.  float64 kernels never flush, as on
CUDA (CuPy compiles float32 code with ``-ftz=true``, float64 without).  A
BLAS job on the shared pool adopts its caller's bits (``adopt``), as
OpenBLAS's CONSISTENT_FPCSR build does for its workers, and restores its
own after; OpenBLAS's own workers are given the mode for a step's span
(kernels/cpu/pass_team.py, ``workers_mode``).  A new thread inherits
its creator's MXCSR, so a team is started with the caller's bits cleared
(``adopt(0)`` around the start):
GNU OpenMP's pool threads, which other code in the process may use, are
never created flushing.  Off x86-64 all of these do nothing.
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.extending import intrinsic

from ..denormals import SUPPORTED, SYMBOL
from ._jit import INLINE

FTZ_DAZ = 0x8040        # MXCSR bit 15 flush-to-zero, bit 6 denormals-are-zero
X86 = SUPPORTED          # a constant: Numba prunes the other branch

_I32 = ir.IntType(32)
_BYTEPTR = ir.IntType(8).as_pointer()


def mxcsr_call(builder, name, slot):
    fn = cgutils.get_or_insert_function(builder.module,
                                        ir.FunctionType(ir.VoidType(), [_BYTEPTR]), name)
    builder.call(fn, [builder.bitcast(slot, _BYTEPTR)])


@intrinsic
def _read_mxcsr(typingctx):
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once(builder, _I32)
        mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
        return builder.zext(builder.load(slot), ir.IntType(64))
    return types.int64(), codegen


@intrinsic
def _write_mxcsr(typingctx, value):
    def codegen(context, builder, signature, args):
        value = args[0]
        if value.type.width > 32:
            value = builder.trunc(value, _I32)
        elif value.type.width < 32:
            value = builder.zext(value, _I32)
        slot = cgutils.alloca_once(builder, _I32)
        builder.store(value, slot)
        mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
        return context.get_dummy_value()
    if not isinstance(value, types.Integer):
        return None
    return types.void(value), codegen


@intrinsic
def _flag(typingctx):
    """The process's flag (an int32 reached by symbol, read at run time)."""
    def codegen(context, builder, signature, args):
        flag = builder.module.globals.get(SYMBOL)
        if flag is None:
            flag = ir.GlobalVariable(builder.module, _I32, SYMBOL)
            flag.linkage = "external"
        return builder.load(flag)
    return types.int32(), codegen


@njit(**INLINE)
def enter(like):
    """Flush denormals from here if the flag is on and ``like`` (an array of
    the kernel's float type) is float32, else keep them; returns the
    caller's MXCSR."""
    if X86:
        saved = _read_mxcsr()
        # set both ways: a pool thread may have been created in another mode
        if like.itemsize == 4 and _flag() != 0:
            _write_mxcsr(saved | FTZ_DAZ)
        else:
            _write_mxcsr(saved & ~FTZ_DAZ)
        return saved
    return 0


@njit(**INLINE)
def leave(saved):
    """Back to the caller's mode (its FTZ and DAZ bits; the exception
    flags raised meanwhile are kept)."""
    if X86:
        _write_mxcsr((_read_mxcsr() & ~FTZ_DAZ) | (saved & FTZ_DAZ))


@njit(**INLINE)
def caller_mode():
    """The FTZ and DAZ bits of this thread, for a team to adopt."""
    if X86:
        return _read_mxcsr() & FTZ_DAZ
    return 0


@njit(**INLINE)
def adopt(mode):
    """This thread takes ``mode`` (from :func:`caller_mode`); returns its own
    bits for :func:`leave`."""
    if X86:
        own = _read_mxcsr()
        _write_mxcsr((own & ~FTZ_DAZ) | (mode & FTZ_DAZ))
        return own
    return 0
