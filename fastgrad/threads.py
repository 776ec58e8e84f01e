"""Thread counts: Numba's parallel passes and the BLAS under the GEMMs.

Numba's ``np.dot`` calls SciPy's OpenBLAS and NumPy carries its own; both,
and Numba's own pool, are set together so they do not oversubscribe the
cores (DESIGN.md "Threads": on 2 cores spinning pools starve each other).
"""
import numba
from threadpoolctl import threadpool_info, threadpool_limits

_limiter = None


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
