"""Thread counts: Numba's parallel passes and the BLAS under the GEMMs.

Numba's ``np.dot`` calls SciPy's OpenBLAS and NumPy carries its own; both,
and Numba's own pool, are set together so they do not oversubscribe the
cores (DESIGN.md "Threads": on 2 cores spinning pools starve each other).
"""
import ctypes
import itertools
import os
import threading

import numba
import numpy as np
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

from .kernels import gemm_library

_limiter = None
_kernel_blas = None          # BLAS libraries of Numba's np.dot, found on first use
_kernel_blas_counts = None   # their thread counts' (get, set) functions, found on first use
_kernel_blas_lock = threading.Lock()


def set_num_threads(n):
    """Use ``n`` threads (at most ``NUMBA_NUM_THREADS``) for every BLAS and
    for Numba's parallel passes; returns the count set.

    The BLAS count is the process's; Numba's is the calling thread's (as
    ``numba.set_num_threads``): call it from the thread that trains.  Call
    it from the main thread: OpenBLAS ignores a count set from another
    thread, and that raises RuntimeError here (nothing changed) rather
    than reporting a count the GEMMs do not use.
    """
    global _limiter
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"n must be a positive integer, got {n!r}")
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    n = int(min(n, numba.config.NUMBA_NUM_THREADS))
    limiter = threadpool_limits(limits=n)
    ignored = [lib["filepath"] for lib in threadpool_info() if lib.get("user_api") == "blas"
               and lib.get("internal_api") == "openblas" and lib["num_threads"] != n]
    if ignored:
        limiter.restore_original_limits()
        raise RuntimeError(f"set_num_threads({n}) from thread "
                           f"{threading.current_thread().name!r}: OpenBLAS ignored it "
                           f"({', '.join(os.path.basename(f) for f in ignored)}); call "
                           "fastgrad.set_num_threads from the main thread")
    numba.set_num_threads(n)
    _limiter = limiter
    _pool["generation"] += 1            # step plans refill their pass teams
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
            gemm_library.scipy_cython_blas()        # loads SciPy's BLAS
            root = scipy.__file__.rpartition("scipy")[0]
            libs = [lib for lib in ThreadpoolController().lib_controllers
                    if lib.user_api == "blas"]
            own = [lib for lib in libs if lib.filepath.startswith((root + "scipy/",
                                                                  root + "scipy.libs/"))]
            _kernel_blas = own or libs
    return _kernel_blas


def _thread_count_functions():
    """``[(get, set)]``: the thread count of each of the kernels' BLAS
    libraries.  OpenBLAS's own functions called through ctypes where found
    (threadpoolctl's controller looks their symbols up on every call: its
    get and set took 3.3 us a step, these 0.7), else the controller's
    methods."""
    global _kernel_blas_counts
    libs = _blas_of_kernels()
    with _kernel_blas_lock:
        if _kernel_blas_counts is None:
            _kernel_blas_counts = [_openblas_count_functions(lib)
                                   or (lib.get_num_threads, lib.set_num_threads)
                                   for lib in libs]
    return _kernel_blas_counts


def _openblas_count_functions(lib):
    if lib.internal_api != "openblas":
        return None
    handle = ctypes.CDLL(lib.filepath)
    # SciPy's and NumPy's wheels prefix OpenBLAS's symbols; 64-bit integer
    # builds add a suffix
    for prefix, suffix in itertools.product(("", "scipy_"), ("", "64_")):
        try:
            get = getattr(handle, f"{prefix}openblas_get_num_threads{suffix}")
            set_ = getattr(handle, f"{prefix}openblas_set_num_threads{suffix}")
        except AttributeError:
            continue
        get.restype, get.argtypes = ctypes.c_int, []
        set_.restype, set_.argtypes = None, [ctypes.c_int]
        return get, set_
    return None


class one_blas_thread:
    """Context manager: the block runs with the kernels' BLAS on one thread,
    so that a step's own thread pool owns the cores (DESIGN.md "Threads");
    the previous counts are restored on the way out.  MKL is left as it
    is: the one caller, :class:`sharded_step_blas`, runs the kernels' GEMMs
    on OpenBLAS (finding MKL's controller took ~0.6 ms a call).  A class,
    not a generator: entered once a sharded step, where a generator's
    context cost ~1 us more."""

    def __enter__(self):
        self._counts = _thread_count_functions()
        self._before = [get() for get, _ in self._counts]
        for _, set_ in self._counts:
            set_(1)
        return self

    def __exit__(self, *exc):
        for (_, set_), n in zip(self._counts, self._before):
            set_(n)


class sharded_step_blas(one_blas_thread):
    """What the sharded step's kernels run under (``TrainStep(threads=n)``):
    :class:`one_blas_thread`, and the kernels' GEMMs on SciPy's OpenBLAS
    even where MKL runs the others (``fastgrad.set_blas``).  On the shards'
    narrow GEMMs MKL saved 4-7 %, and called from the pool's threads after
    ``torch.set_num_threads`` or PyTorch's own parallel steps in the
    process it took 18x as long (bench/RESULTS.md "The shards on the pass
    team").  The library is the process's: a step another thread runs
    meanwhile calls OpenBLAS too, as it finds OpenBLAS on one thread."""

    def __enter__(self):
        from . import blas          # (which imports this module)
        super().__enter__()
        self._chosen = None
        if blas.mkl_handle() is not None:
            try:
                chosen = gemm_library.gemm_addresses()
                gemm_library.set_gemm(gemm_library.scipy_gemm())
                self._chosen = chosen
            except BaseException:
                super().__exit__()
                raise
        return self

    def __exit__(self, *exc):
        try:
            if self._chosen is not None:
                gemm_library.set_gemm(self._chosen)
        finally:
            super().__exit__(*exc)


def _pthreads_openblas():
    """``[(controller, ctypes handle)]`` of the kernels' OpenBLAS libraries
    built with pthreads: those whose threads fastgrad can share."""
    return [(lib, ctypes.CDLL(lib.filepath)) for lib in _blas_of_kernels()
            if lib.internal_api == "openblas" and lib.threading_layer == "pthreads"]


# -- one pool: the kernels' BLAS runs its parallel jobs on Numba's threads ------

_pool_lock = threading.Lock()
# "generation" counts the changes a step plan's pass team must follow
# (sharing on or off, a fork, fastgrad.set_num_threads): TrainStep refills
# its plan when it moved (kernels/cpu/pass_team.py).
_pool = {"libraries": None, "why_not": None, "fork_hook": False, "forked": False,
         "generation": 0, "start": None, "env_read": False}
_pool_lock_word = None      # the callback's spin lock (an int32 it reaches by symbol)


def gnu_openmp():
    """``{name: address}`` of the GNU OpenMP (and libc) functions a team on
    Numba's OpenMP pool calls (``kernels/cpu/blas_pool.py``'s symbols), or
    RuntimeError saying why there is no such pool."""
    from numba.np.ufunc.parallel import _launch_threads
    _launch_threads()
    if numba.threading_layer() != "omp":
        raise RuntimeError(f"Numba's threading layer is {numba.threading_layer()!r}, "
                           "not 'omp' (OpenMP's teams run every job at once)")
    try:
        gomp = ctypes.CDLL("libgomp.so.1")
        libc = ctypes.CDLL(None)
        return {name: ctypes.cast(function, ctypes.c_void_p).value for name, function in (
            ("IN_PARALLEL", gomp.omp_in_parallel), ("THREAD_NUM", gomp.omp_get_thread_num),
            ("DYNAMIC", gomp.omp_get_dynamic), ("THREAD_LIMIT", gomp.omp_get_thread_limit),
            ("PARALLEL", gomp.GOMP_parallel), ("YIELD", libc.sched_yield))}
    except (OSError, AttributeError) as exc:
        raise RuntimeError(f"GNU OpenMP (libgomp.so.1) not usable here ({exc})") from None


def _pool_libraries():
    """The kernels' OpenBLAS libraries that accept a threads callback, or
    raise RuntimeError saying why the pool cannot be shared."""
    system = gnu_openmp()
    found = []
    for lib, handle in _pthreads_openblas():
        try:
            found.append((lib, handle.openblas_set_threads_callback_function,
                          ctypes.cast(handle.exec_blas_async, ctypes.c_void_p).value,
                          ctypes.cast(handle.exec_blas_async_wait, ctypes.c_void_p).value,
                          ctypes.addressof(ctypes.c_int.in_dll(handle, "blas_num_threads"))))
        except AttributeError:      # OpenBLAS before 0.3.27
            continue
    if len(found) != 1:
        raise RuntimeError(f"{len(found)} pthreads OpenBLAS libraries with a threads callback "
                           "under Numba's np.dot (one expected)")
    return system, found[0]


def share_blas_pool(on=True):
    """Run the kernels' OpenBLAS parallel jobs on Numba's OpenMP threads.

    With it on, one thread pool owns the cores: the threads that run a
    GEMM's jobs are the ones fastgrad's parallel passes use next, and
    OpenBLAS's own workers, which spin after each call and slowed the
    passes that followed (DESIGN.md "Threads"), stay asleep.  GEMM results
    are bitwise those of OpenBLAS's own threads (the same split of the work).
    fastgrad's parallel passes (``fastgrad.kernels.cpu.pass_team``) then
    run on a GNU OpenMP team of those threads instead of OpenBLAS's own
    workers (the default team): as fast, by measure.  It is for programs
    that also run Numba's own parallel loops, whose OpenMP threads would
    spin against OpenBLAS's.

    Off by default, because it changes the process, not only fastgrad:
    every caller of SciPy's BLAS then runs on GNU OpenMP's threads, and a
    process that has used GNU OpenMP cannot run an OpenMP region in a child
    it forks (Numba's OpenMP layer stops such a child: "fork() called
    from a process already using GNU OpenMP").  A forked child gets
    OpenBLAS's own threads back (and fastgrad's team on them); code of
    its own that runs Numba's parallel loops there would be stopped.
    Use the "spawn" or "forkserver" start method with it.  Also turned on
    when the first CPU optimizer is built if ``FASTGRAD_SHARE_BLAS_POOL=1``.
    ``share_blas_pool(False)`` gives OpenBLAS its own threads back.

    Returns whether the pool is shared now; where it cannot be (Numba's
    threading layer is not OpenMP, no OpenBLAS 0.3.27+ with pthreads
    under Numba's ``np.dot``), ``blas_pool_status()`` says why.
    """
    if not isinstance(on, (bool, np.bool_)):
        raise TypeError(f"share_blas_pool(on): on must be True or False, got {on!r}")
    with _pool_lock:
        if not on:
            if _pool["libraries"]:
                _pool["libraries"][1](None)
                _pool["libraries"] = None
                _pool["generation"] += 1
            return False
        if _pool["libraries"]:
            return True
        if _pool["forked"]:
            _pool["why_not"] = "forked child: GNU OpenMP cannot be used after a fork"
            return False
        try:
            system, (lib, set_callback, run_async, wait, workers) = _pool_libraries()
        except RuntimeError as exc:
            _pool["why_not"] = str(exc)
            return False
        import llvmlite.binding as llvm
        from .kernels.cpu import blas_pool
        global _pool_lock_word
        if _pool_lock_word is None:
            _pool_lock_word = ctypes.c_int32(0)
        for name, address in system.items():
            llvm.add_symbol(getattr(blas_pool, name), address)
        for symbol, address in ((blas_pool.BLAS_ASYNC, run_async),
                                (blas_pool.BLAS_WAIT, wait),
                                (blas_pool.BLAS_WORKERS, workers),
                                (blas_pool.LOCK, ctypes.addressof(_pool_lock_word))):
            llvm.add_symbol(symbol, address)
        llvm.add_symbol(blas_pool.MEMBER, blas_pool.team_member_address())
        set_callback(ctypes.c_void_p(blas_pool.run_jobs_address()))
        _pool["libraries"] = (lib, set_callback)
        _pool["why_not"] = None
        _pool["start"] = system["PARALLEL"]
        _pool["generation"] += 1
        if not _pool["fork_hook"]:
            os.register_at_fork(after_in_child=_unshare_in_child)
            _pool["fork_hook"] = True
        return True


def _unshare_in_child():
    # The child of a process that used GNU OpenMP cannot start a team; the
    # locks may be held by threads that do not exist in the child.
    global _pool_lock
    _pool_lock = threading.Lock()
    _pool["forked"] = True
    _pool["why_not"] = "forked child: GNU OpenMP cannot be used after a fork"
    _pool["generation"] += 1
    if _pool["libraries"]:
        _pool["libraries"][1](None)
        _pool["libraries"] = None


def share_blas_pool_if_asked():
    """``share_blas_pool()`` when ``FASTGRAD_SHARE_BLAS_POOL=1``, at the
    first call alone (the first CPU optimizer built): a later
    ``share_blas_pool(False)`` stands."""
    if _pool["env_read"]:
        return
    _pool["env_read"] = True
    if os.environ.get("FASTGRAD_SHARE_BLAS_POOL", "").strip() == "1":
        share_blas_pool()


PARALLEL_UPDATE_MIN_PARAMS = 1 << 15
"""From this many parameters ``opt.step()`` runs its update on the step's
thread team (``kernels/cpu/pass_team.py``), as a ``TrainStep`` does (its
``MIN_UPDATE``): 0.68-0.70x the serial update at 36K parameters, where
Numba's parfor kernel took 1.24-1.37x and broke even only at 100-200K
(bench/RESULTS.md, "The update on the pool"); in steps of 17-30K
parameters the team's update made 8 of 9 nets 6-22 % slower ("The update's
team from 2^15 parameters")."""


def blas_pool_shared():
    return _pool["libraries"] is not None


def pool_generation():
    """A number that changes whenever a step's pass team must be chosen again."""
    return _pool["generation"]


_blas_team_found = {}
_blas_team_lock = threading.Lock()


def _blas_team():
    """``(gotoblas_pthread, &blas_cpu_number)``: what a step's pass team
    needs to run on the kernels' OpenBLAS's own workers while the pool is
    not shared (``kernels/cpu/pass_team.py``), or None where that BLAS is
    not one pthreads OpenBLAS with at least one worker."""
    with _blas_team_lock:
        if not _blas_team_found:
            _blas_team_found.update(_find_blas_team())
    found = _blas_team_found
    # gotoblas_pthread would hang without a worker (blas_num_threads 1);
    # set_num_threads can add some later, and OpenBLAS never drops them
    if found.get("threads") is None or found["threads"].value < 2:
        return None
    return found["run"], found["cpus"]


def _find_blas_team():
    libs = _pthreads_openblas()
    if len(libs) != 1:
        return {"why_not": f"{len(libs)} pthreads OpenBLAS libraries under np.dot"}
    handle = libs[0][1]
    try:
        return {"run": ctypes.cast(handle.gotoblas_pthread, ctypes.c_void_p).value,
                "cpus": ctypes.addressof(ctypes.c_int.in_dll(handle, "blas_cpu_number")),
                "threads": ctypes.c_int.in_dll(handle, "blas_num_threads")}
    except (AttributeError, ValueError) as exc:
        return {"why_not": f"OpenBLAS without gotoblas_pthread ({exc})"}


def team_threads():
    """The threads a step's pass team can get: those of the shared pool, or
    OpenBLAS's own workers plus the caller when the pool is not shared (a
    step takes no more than OpenBLAS is told to use at the time:
    :func:`pass_team_status` says how many that is now); 0
    (serial passes) when Numba runs one thread, when OpenBLAS has no worker
    to share, or with ``FASTGRAD_PASS_TEAM=0`` in the environment (read
    whenever a step plan is filled)."""
    return _team()[0]


def _team():
    """``(threads, team, why_not)`` the step plans are built for: the team's
    capacity (its driver caps each pass at OpenBLAS's count of the moment,
    so a plan filled under a temporary limit keeps its team)."""
    threads = numba_threads()
    if threads < 2:
        return 0, None, "one thread (fastgrad.set_num_threads, NUMBA_NUM_THREADS)"
    if os.environ.get("FASTGRAD_PASS_TEAM", "").strip() == "0":
        return 0, None, "FASTGRAD_PASS_TEAM=0 in the environment"
    if blas_pool_shared() or _mkl_on_gnu_openmp():
        return threads, "shared pool", None
    if _blas_team():
        return threads, "openblas workers", None
    return 0, None, _blas_team_found.get("why_not") or \
        "OpenBLAS runs one thread here: no worker to share"


def pass_team_status():
    """``(threads, team, why_not)`` of the thread team a CPU step gets now
    for the passes it splits (activations, update; see the guide's
    "Threads"): ``team`` is ``"shared pool"`` (``share_blas_pool``) or
    ``"openblas workers"`` (as many as OpenBLAS is told to use now,
    threadpoolctl's limits included); without a team, ``(0, None, why)``:
    the passes run on the calling thread alone."""
    threads, team, why_not = _team()
    if team == "openblas workers":
        # a step's passes take no more than OpenBLAS's count at that moment
        # (the driver reads it before each pass): threadpoolctl's limits
        now = ctypes.c_int.from_address(_blas_team()[1]).value
        if now < 2:
            return 0, None, (f"OpenBLAS is limited to {now} thread now (threadpoolctl, "
                             "fastgrad.set_num_threads): the passes run on the calling thread")
        threads = min(threads, now)
    return threads, team, why_not


def pass_team():
    """``(threads, start, blas)`` of a step plan's team (kernels/cpu/
    pass_team.py, ``PLAN_POOL_*``): :func:`team_threads`; the start,
    ``GOMP_parallel`` on the shared pool, else OpenBLAS's
    ``gotoblas_pthread``; and for OpenBLAS's team the address of its thread
    count (0 on the shared pool).  All 0 (serial passes) without a team."""
    threads = team_threads()
    if not threads:
        return 0, 0, 0
    if blas_pool_shared():
        return threads, _pool["start"], 0
    if _mkl_on_gnu_openmp():
        return threads, gnu_openmp()["PARALLEL"], 0
    start, blas = _blas_team()
    return threads, start, blas


def shard_team():
    """``(threads, start, blas)`` of the sharded step's team, which runs its
    shards (:func:`pass_team`'s; on OpenBLAS's workers, as many as it keeps
    rather than as many as it is told to use now: the shards run with BLAS
    on one thread)."""
    threads, start, blas = pass_team()
    if blas:
        threads = min(threads, _blas_team_found["threads"].value)
    return threads, start, blas


numba_threads = numba.get_num_threads


def _mkl_on_gnu_openmp():
    """Whether MKL runs the kernels' GEMMs (``fastgrad.set_blas``): its
    threads are GNU OpenMP's pool, so the passes' team is one of that pool."""
    from . import blas
    return blas.mkl_handle() is not None


def library_changed():
    """The kernels' BLAS library changed (``fastgrad.set_blas``): step plans
    choose their team again."""
    with _pool_lock:
        _pool["generation"] += 1


def blas_pool_status():
    """``(shared, why_not)``: whether the kernels' BLAS runs on Numba's
    threads, and if not, why (``None`` before anything asked)."""
    return blas_pool_shared(), _pool["why_not"]
