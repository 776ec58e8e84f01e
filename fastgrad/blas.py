"""The BLAS library under the CPU kernels' GEMMs: SciPy's OpenBLAS (the
default) or Intel MKL.

    pip install "fastgrad[mkl]"
    fastgrad.set_blas("mkl")        # or FASTGRAD_BLAS=mkl in the environment

On the Intel Xeon this was measured on, MKL's GEMMs took 0.53-0.79x the
time of SciPy's OpenBLAS on the steps' own GEMMs, and PyTorch's CPU wheels
already run MKL's (bench/RESULTS.md "MKL under the kernels").  The kernels
call the library through addresses they read at each call
(``fastgrad.kernels.gemm_library``), so the choice takes effect from the
next step, without recompiling anything.

MKL runs on its GNU OpenMP threading layer: its threads are GNU OpenMP's
pool, the one Numba's parallel passes use, and a step's passes then run on
a team of that pool (as with :func:`fastgrad.share_blas_pool`): one pool
owns the cores.  With Intel's own OpenMP the two pools spun against each
other (a step 25x slower), so ``MKL_THREADING_LAYER`` set to anything but
GNU is refused.  MKL keeps its dynamic threads (``MKL_DYNAMIC``, its
default): it runs a small GEMM on one thread.  The sharded step's shards
call SciPy's OpenBLAS whatever the library
(``fastgrad.threads.sharded_step_blas``): called from a team's threads,
MKL took 18x as long with its dynamic threads off (as
``torch.set_num_threads`` leaves them) or after PyTorch's own parallel
steps in the process.  Its results are the same from step to step and
run to run for a given thread count on a given CPU (tested), but they are
not bitwise OpenBLAS's, nor those of another thread count.

As with the shared pool, a process that has used GNU OpenMP cannot start
a team in a child it forks: a forked child goes back to OpenBLAS.
"""
import ctypes
import ctypes.util
import importlib.metadata
import os
import threading

from . import threads as _threads
from .kernels import gemm_library

LIBRARIES = ("openblas", "mkl")
_MKL_THREADING_GNU = 3          # MKL_THREADING_GNU in mkl_service.h
_MKL_INTERFACE_LP64 = 0         # 32-bit integers, as SciPy's cython_blas and the kernels

_lock = threading.Lock()
_state = {"name": "openblas", "mkl": None, "forked": False, "fork_hook": False,
          "env_read": False}


def set_blas(name):
    """Run the CPU kernels' GEMMs on ``name`` ("openblas": SciPy's, the
    default; "mkl": Intel MKL, ``pip install "fastgrad[mkl]"``) from the
    next step on; returns ``name``.  Raises RuntimeError, changing nothing,
    where MKL cannot be used (not installed, ``MKL_THREADING_LAYER`` other
    than GNU, Numba's threading layer not OpenMP, a forked child).  Call
    it between steps, from the thread that trains."""
    if name not in LIBRARIES:
        raise ValueError(f"set_blas: name must be one of {LIBRARIES}, got {name!r}")
    with _lock:
        if name == _state["name"]:
            return name
        if name == "mkl":
            mkl = _load_mkl()
            mkl.MKL_Set_Num_Threads(ctypes.c_int(_threads.numba_threads()))
            gemm_library.set_gemm({routine: ctypes.cast(getattr(mkl, routine + "_"),
                                                        ctypes.c_void_p).value
                                   for routine in gemm_library.ROUTINES})
        else:
            gemm_library.set_gemm(gemm_library.scipy_gemm())
        _state["name"] = name
        _threads.library_changed()
        return name


def get_blas():
    """The library the CPU kernels' GEMMs run on now: "openblas" or "mkl"."""
    return _state["name"]


def set_blas_if_asked():
    """``set_blas`` of ``FASTGRAD_BLAS`` ("openblas" or "mkl") at the first
    call alone (the first CPU optimizer built): a later ``set_blas`` stands."""
    if _state["env_read"]:
        return
    _state["env_read"] = True
    name = os.environ.get("FASTGRAD_BLAS", "").strip().lower()
    if name:
        set_blas(name)


def mkl_handle():
    """MKL's library handle while MKL runs the kernels' GEMMs, else None."""
    return _state["mkl"] if _state["name"] == "mkl" else None


def _find_mkl_rt():
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name.startswith("libmkl_rt.so"):
            return str(file.locate())
    return ctypes.util.find_library("mkl_rt")


def _load_mkl():
    if _state["mkl"] is not None:
        return _state["mkl"]
    if _state["forked"]:
        raise RuntimeError("set_blas('mkl') in a forked child: GNU OpenMP cannot be used "
                           "after a fork (use the 'spawn' or 'forkserver' start method)")
    layer = os.environ.get("MKL_THREADING_LAYER", "GNU").strip().upper()
    if layer != "GNU":
        raise RuntimeError(f"set_blas('mkl') needs MKL_THREADING_LAYER=GNU (or unset), got "
                           f"{layer!r}: MKL's threads must be GNU OpenMP's, the pool Numba's "
                           "parallel passes use, or the two pools spin against each other")
    try:
        _threads.gnu_openmp()           # MKL's threads are then the passes' pool
    except RuntimeError as exc:
        raise RuntimeError(f"set_blas('mkl'): {exc}") from None
    path = _find_mkl_rt()
    if not path:
        raise RuntimeError("set_blas('mkl'): Intel MKL is not installed "
                           "(pip install \"fastgrad[mkl]\")")
    try:
        mkl = ctypes.CDLL(path)
        set_layer, set_interface = mkl.MKL_Set_Threading_Layer, mkl.MKL_Set_Interface_Layer
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"set_blas('mkl'): cannot load MKL from {path} ({exc})") from None
    # Both must come before MKL's first call; each returns the layer in use.
    if set_layer(ctypes.c_int(_MKL_THREADING_GNU)) != _MKL_THREADING_GNU:
        raise RuntimeError("set_blas('mkl'): MKL did not take its GNU OpenMP layer (an MKL "
                           "routine ran before in this process)")
    if set_interface(ctypes.c_int(_MKL_INTERFACE_LP64)) & 1 != _MKL_INTERFACE_LP64:
        raise RuntimeError("set_blas('mkl'): MKL runs its 64-bit integer interface "
                           "(MKL_INTERFACE_LAYER); the kernels pass 32-bit integers")
    _state["mkl"] = mkl
    if not _state["fork_hook"]:
        os.register_at_fork(after_in_child=_back_to_openblas_in_child)
        _state["fork_hook"] = True
    return mkl


def _back_to_openblas_in_child():
    global _lock
    _lock = threading.Lock()
    _state["forked"] = True
    if _state["name"] != "openblas":
        gemm_library.set_gemm(gemm_library.scipy_gemm())
        _state["name"] = "openblas"
