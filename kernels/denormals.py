"""Whether fastgrad's CPU training kernels flush denormal floats to zero.

A float below the smallest normal number (1.2e-38 in float32) is a
denormal.  On Intel cores an operation that reads or produces one takes a
microcode assist of about a hundred cycles; a model that grows confident
(softmax probabilities underflowing in the loss, their gradients in the
GEMMs, squared gradients in Adam's second moment) made whole training steps
up to 6x slower on such a core (bench/RESULTS.md "Denormals").  With the flag
on (the default, as JAX/XLA and TensorFlow run on the CPU), the float32
step, optimizer update and layer path set the x86 FTZ and DAZ bits of MXCSR
on entry and restore the caller's bits on return: denormal inputs read as
zero and denormal results are written as zero, only inside those kernels,
as CUDA's float32 kernels do (kernels/cpu/fpenv.py).  float64 keeps them.

The kernels read the flag at run time through the symbol ``SYMBOL`` (an
int32 this module owns, registered with llvmlite), so a cached kernel
follows it and none is compiled twice.  This module is not one of the
per-model copies of ``fastgrad.kernels.cpu``: there is one flag per process.
"""
import ctypes
import platform

import llvmlite.binding as llvm

SYMBOL = "fastgrad_flush_denormal"
SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")

_flag = ctypes.c_int32(1 if SUPPORTED else 0)
llvm.add_symbol(SYMBOL, ctypes.addressof(_flag))


def set_flush(mode):
    """Flush (``True``) or keep (``False``) denormals in the training
    kernels from their next call; returns whether this CPU supports it (on
    one that does not, the kernels always keep them)."""
    _flag.value = 1 if (mode and SUPPORTED) else 0
    return SUPPORTED


def flushing():
    return bool(_flag.value)
