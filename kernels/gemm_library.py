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
import importlib.abc
import importlib.machinery
import importlib.util
import itertools
import os
import sys
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


SCIPY_BLAS = "scipy.linalg.cython_blas"


@functools.lru_cache(maxsize=None)
def scipy_cython_blas():
    """SciPy's ``scipy.linalg.cython_blas`` module, imported without
    ``scipy.linalg`` where that is not imported yet: its ``__init__``
    imports most of SciPy's linear algebra (~110 ms of ``import fastgrad``
    and again of a warm first step), none of which the kernels call."""
    module = sys.modules.get(SCIPY_BLAS)
    if module is None and "scipy.linalg" not in sys.modules:
        module = _import_without_package()
    return module if module is not None else importlib.import_module(SCIPY_BLAS)


def _import_without_package():
    """``scipy.linalg.cython_blas`` from its file (``scipy`` imported, not
    ``scipy.linalg``), or None where it is not an extension file in
    ``scipy/linalg``.  It stays in sys.modules, as any import leaves it:
    Numba's own ``import scipy.linalg.cython_blas`` (before its first
    compile) then imports nothing more.  A later import of ``scipy.linalg``
    finds it there, so :class:`_BindWhenImported` binds it as that
    package's attribute, as importing it the usual way would have."""
    scipy = importlib.util.find_spec("scipy")
    if scipy is None or not scipy.submodule_search_locations:
        return None
    for folder, suffix in itertools.product(scipy.submodule_search_locations,
                                            importlib.machinery.EXTENSION_SUFFIXES):
        path = os.path.join(folder, "linalg", "cython_blas" + suffix)
        if os.path.isfile(path):
            break
    else:
        return None
    loader = importlib.machinery.ExtensionFileLoader(SCIPY_BLAS, path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(SCIPY_BLAS, loader))
    sys.modules[SCIPY_BLAS] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[SCIPY_BLAS]
        raise
    sys.meta_path.insert(0, _BindWhenImported("scipy.linalg", "cython_blas", module))
    return module


class _BindWhenImported(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``package`` is imported it asks the
    other meta-path finders for the package's spec (the path finder, or
    whichever serves the package: an editable build's) and has its loader,
    once the package has run, bind ``module`` (imported before the
    package) as the package's attribute ``name``."""

    def __init__(self, package, name, module):
        self.package, self.name, self.module = package, name, module

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.package:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return None
        run = spec.loader.exec_module

        def exec_then_bind(package):
            run(package)
            if not hasattr(package, self.name):
                setattr(package, self.name, self.module)

        spec.loader.exec_module = exec_then_bind
        return spec


@functools.lru_cache(maxsize=None)
def _scipy_routines():
    cython_blas = scipy_cython_blas()
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
