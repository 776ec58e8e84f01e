"""The GEMM library under fastgrad's CPU kernels.

Every GEMM of the CPU kernels (``kernels/cpu/gemm.py``) calls a Fortran
``?gemm`` (``?gemv`` when one side is a single row or column, as Numba's
``np.dot`` does) through an address kept in a variable this module
owns, registered with llvmlite by symbol name (as ``kernels/denormals.py``
keeps its flag): a cached kernel reads it on every call, so the library
can change between steps (``fastgrad.set_blas``) and no address of this
process is compiled into a kernel.  The default is SciPy's BLAS
(``scipy.linalg.cython_blas``), the one Numba's ``np.dot`` calls.  This
module is not one of the per-model copies of ``fastgrad.kernels.cpu``:
there is one library per process.
"""
import ctypes
import functools
import threading

import llvmlite.binding as llvm

ROUTINES = ("sgemm", "dgemm", "sgemv", "dgemv")
SYMBOLS = {name: f"fastgrad_{name}_address" for name in ROUTINES}

_addresses = {name: ctypes.c_void_p(0) for name in ROUTINES}
_lock = threading.Lock()
for _name in ROUTINES:
    llvm.add_symbol(SYMBOLS[_name], ctypes.addressof(_addresses[_name]))


def scipy_gemm():
    """``{routine: address}`` of SciPy's Fortran routines (``ROUTINES``)."""
    return dict(_scipy_routines())


@functools.lru_cache(maxsize=None)
def _scipy_routines():
    import scipy.linalg.cython_blas as cython_blas
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                  ctypes.c_char_p]
    found = {}
    for name in ROUTINES:
        capsule = cython_blas.__pyx_capi__[name]
        found[name] = get_pointer(capsule, get_name(capsule))
    return found


def set_gemm(addresses):
    """Point the kernels' GEMMs at ``{routine: address}``, every one of
    ``ROUTINES`` (Fortran interface, 32-bit integers), from their next call."""
    if sorted(addresses) != sorted(ROUTINES) or not all(addresses.values()):
        raise ValueError(f"set_gemm needs an address for each of {ROUTINES}, got {addresses}")
    with _lock:
        for name, address in addresses.items():
            _addresses[name].value = address


def gemm_addresses():
    with _lock:
        return {name: slot.value for name, slot in _addresses.items()}


set_gemm(scipy_gemm())
