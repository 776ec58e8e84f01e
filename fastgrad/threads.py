"""Thread counts: Numba's parallel passes and the BLAS under the GEMMs.

Numba's ``np.dot`` calls SciPy's OpenBLAS and NumPy carries its own; both,
and Numba's own pool, are set together so they do not oversubscribe the
cores (DESIGN.md "Threads": on 2 cores spinning pools starve each other).
"""
from contextlib import contextmanager
import threading

import numba
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

_limiter = None
_kernel_blas = None          # BLAS libraries of Numba's np.dot, found on first use
_kernel_blas_lock = threading.Lock()


def set_num_threads(n):
    """Use ``n`` threads for Numba's parallel passes and for every BLAS."""
    global _limiter
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    _limiter = threadpool_limits(limits=n)
    return n


def get_num_threads():
    """(numba threads, [threads of each BLAS library found])."""
    return numba.get_num_threads(), [lib["num_threads"] for lib in threadpool_info()
                                     if lib.get("user_api") == "blas"]


def _blas_of_kernels():
    """threadpoolctl's controllers of the BLAS that Numba's ``np.dot`` calls:
    SciPy's (``scipy.linalg.cython_blas``), which a wheel install bundles
    apart from NumPy's; every BLAS found when SciPy's cannot be told apart."""
    global _kernel_blas
    with _kernel_blas_lock:
        if _kernel_blas is None:
            import scipy
            import scipy.linalg.cython_blas  # noqa: F401  (loads SciPy's BLAS)
            root = scipy.__file__.rpartition("scipy")[0]
            libs = [lib for lib in ThreadpoolController().lib_controllers
                    if lib.user_api == "blas"]
            own = [lib for lib in libs if lib.filepath.startswith((root + "scipy/",
                                                                  root + "scipy.libs/"))]
            _kernel_blas = own or libs
    return _kernel_blas


@contextmanager
def one_blas_thread():
    """Run the block with the kernels' BLAS on one thread, so that a step's
    own thread pool owns the cores (DESIGN.md "Threads"); restores the
    previous counts.  Costs about a microsecond per library."""
    libs = _blas_of_kernels()
    before = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)
