"""Compilation options shared by every CPU kernel, and the on-disk cache.

``error_model="numpy"`` lets loops with a float division vectorise (under the
default "python" model a division by zero must raise, which blocks SIMD).
No ``fastmath``: NaN and Inf must stay visible to the non-finite guards.  The
one exception is ``reassoc`` alone on the float64 sums of kernels/cpu/reduce.py
(``REASSOC``: the gradient norm's and the losses'), which lets them add in
vector lanes and keeps NaN and Inf.

``cache=True`` keeps compiled code on disk across processes, in the first
writable place of Numba's list: ``NUMBA_CACHE_DIR``, ``__pycache__`` next to
the sources, a user cache directory under ``HOME``.  Where none is writable
(a read-only install with a read-only or missing HOME, common in
containers), Numba would refuse to define the kernels at all ("cannot cache
function"); fastgrad then compiles them without a disk cache, saying so in
one RuntimeWarning.  A cache entry that cannot be read back (a truncated or
garbled file) is treated as a miss for fastgrad's kernels: the entry is
dropped, the kernel recompiled and the entry written again, with one
RuntimeWarning, instead of every later run failing.

Numba saves an entry without a lock: it reads the function's index, picks
the first free data-file number, writes the index, then the data.  Two
processes compiling at once (MPI ranks, test workers on a cold cache) can
both pick the same number and leave an index whose key points at the other
process's code; the per-model copies of this package share their index
files, so the other code may be another model's (a dropout model trained
without dropout).  For this package's kernels a save holds an exclusive
``fcntl`` lock on the cache directory's ``fastgrad.lock``, and an entry whose
code was compiled for another copy of the package (a cache poisoned before)
is a miss: the function's index is dropped and the kernel recompiled, with
one RuntimeWarning.

Numba keys a cache entry on the function's own bytecode and file stamp
only, so a kernel would not see an edit to a module it calls (mathfn, the
activation table in ``kernels/spec.py`` its ladders are generated from).
For this package's kernels the key also holds a hash of the sources of
``kernels/spec.py`` and ``kernels/cpu/*.py``: any edit there recompiles
every kernel instead of reusing stale code.
"""
import contextlib
import hashlib
import os
import sys
import warnings

try:
    import fcntl
except ImportError:                  # pragma: no cover - not POSIX: Numba's own behaviour
    fcntl = None

_PACKAGE = __name__.rpartition(".")[0]      # fastgrad.kernels.cpu
_KERNELS = _PACKAGE.rpartition(".")[0] + "."  # fastgrad.kernels. (and its copies of cpu)


def _probe():      # pragma: no cover - never called; a function to locate a cache for
    pass


def _cache_available():
    """True when Numba finds a writable cache location for this package's
    kernels (they all live in this directory, as ``_probe`` does).  Probed
    once per process: the copies of this package built per model
    (``fastgrad.registry``) run this module again and take the answer (and
    the one warning) of the first."""
    from numba.core.caching import Cache, FunctionCache
    known = getattr(Cache, "_fastgrad_cache_available", None)
    if known is not None:
        return known
    try:
        FunctionCache(_probe)
        Cache._fastgrad_cache_available = True
    except RuntimeError as exc:        # "cannot cache function ...: no locator available"
        warnings.warn(f"fastgrad: no writable Numba cache directory ({exc}); the kernels are "
                      "compiled without a disk cache in this process. Set NUMBA_CACHE_DIR to "
                      "a writable directory to keep them across runs.", RuntimeWarning,
                      stacklevel=2)
        Cache._fastgrad_cache_available = False
    return Cache._fastgrad_cache_available


_warned_corrupt = []
_warned_foreign = []


def _module_of(cache):
    return getattr(getattr(cache, "_py_func", None), "__module__", "") or ""


def _discard(cache, warned, what):
    """A miss: drop ``cache``'s index, so that the recompiled kernel writes
    a fresh one, and say ``what`` happened (once a process per kind)."""
    _drop_index(cache)
    if not warned:
        warned.append(True)
        warnings.warn(f"fastgrad: {what}; the kernel is recompiled and cached again.",
                      RuntimeWarning, stacklevel=3)
    return None


def _tolerate_bad_entries():
    """Make a cache entry of this package's kernels that fails to load, or
    holds another copy's code, a miss.

    Numba raises whatever unpickling a damaged index or data file raises
    (UnpicklingError, EOFError, ...), on every run.  The wrapper only
    changes that for functions of this package; other code using Numba in
    the same process sees Numba's own behaviour.
    """
    from numba.core.caching import Cache
    if getattr(Cache, "_fastgrad_tolerant", False):
        return
    original = Cache.load_overload

    def load_overload(self, sig, target_context):
        try:
            loaded = original(self, sig, target_context)
        except Exception as exc:
            module = _module_of(self)
            if not module.startswith(_KERNELS):
                raise
            # (saving reads the index first and would fail on it again)
            return _discard(self, _warned_corrupt,
                            f"an unreadable Numba cache entry for {self._name} "
                            f"({type(exc).__name__}: {exc}) was discarded")
        module = _module_of(self)
        compiled_for = getattr(getattr(loaded, "fndesc", None), "modname", module)
        if module.startswith(_KERNELS) and compiled_for != module:
            # Two unlocked saves collided (before the lock below): the key
            # names this copy, the data another's, which another key may
            # name too.  A fresh index: no key keeps the shared data file.
            return _discard(self, _warned_foreign,
                            f"the Numba cache entry for {self._name} held code compiled for "
                            f"{compiled_for}, not {module}")
        return loaded

    Cache.load_overload = load_overload
    Cache._fastgrad_tolerant = True


@contextlib.contextmanager
def _cache_dir_lock(cache):
    """An exclusive lock on ``fastgrad.lock`` in ``cache``'s directory, for
    the span of one save; none where the file cannot be opened (the save
    then fails or succeeds as Numba's own would)."""
    path = getattr(getattr(cache, "_cache_file", None), "_cache_path", None)
    fd = None
    if fcntl is not None and path is not None:
        lock = os.path.join(path, "fastgrad.lock")
        for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):   # flock needs no write access
            try:
                fd = os.open(lock, flags, 0o666)
                break
            except OSError:
                pass
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass       # a file system without flock (Lustre without -o flock): unlocked
        yield
    finally:
        os.close(fd)                 # releases the lock


def _drop_index(cache):
    index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
    if index:
        with _cache_dir_lock(cache):
            try:
                os.unlink(index)
            except OSError:
                pass


def _lock_saves():
    """Hold the cache directory's lock while Numba saves an entry of this
    package's kernels (read the index, pick a data file, write both)."""
    from numba.core.caching import Cache
    # Marked on the class: a second wrapper (each copy of this package runs
    # this module again; another tool may have wrapped the method since)
    # would take the lock again on a second descriptor and wait forever.
    if getattr(Cache, "_fastgrad_locked", False):
        return
    original = Cache.save_overload

    def save_overload(self, sig, data):
        if not _module_of(self).startswith(_KERNELS):
            return original(self, sig, data)
        with _cache_dir_lock(self):
            return original(self, sig, data)

    Cache.save_overload = save_overload
    Cache._fastgrad_locked = True


_fingerprint = []


def _sources_fingerprint():
    if not _fingerprint:
        here = os.path.dirname(os.path.abspath(__file__))
        h = hashlib.sha256()
        shared = ("spec.py", "layout.py", "wide_vectors.py")
        for path in [os.path.join(os.path.dirname(here), f) for f in shared] + sorted(
                os.path.join(here, f) for f in os.listdir(here) if f.endswith(".py")):
            with open(path, "rb") as fh:
                h.update(fh.read())
        _fingerprint.append(h.hexdigest())
    return _fingerprint[0]


def _key_on_sources():
    """Add the sources' fingerprint to the cache key of this package's kernels."""
    from numba.core.caching import Cache
    if getattr(Cache, "_fastgrad_sources", False):
        return
    original = Cache._index_key

    def _index_key(self, sig, codegen):
        key = original(self, sig, codegen)
        module = getattr(getattr(self, "_py_func", None), "__module__", "") or ""
        if module.startswith(_KERNELS):
            # Copies of this package built for a subset of the activations
            # (fastgrad.registry.cpu_kernels) compile the same files to other
            # code.  Numba names cache files after the module, which already
            # parts them; the variant in the key keeps them apart even if
            # two copies ever shared a name.
            package = sys.modules.get(module.rpartition(".")[0])
            key = key + (_sources_fingerprint(), getattr(package, "_VARIANT", ""))
        return key

    Cache._index_key = _index_key
    Cache._fastgrad_sources = True


_tolerate_bad_entries()
_lock_saves()
_key_on_sources()


# Every kernel's pipeline (kernels/wide_vectors.py): outside this package,
# so that its copies (fastgrad.registry) share the one Numba pass it registers.
from ..wide_vectors import WideVectors as WIDE_VECTORS  # noqa: E402
from numba.core.compiler import Compiler  # noqa: E402  (Numba's own pipeline)

# A private copy of this package built for registered activations
# (fastgrad.registry) says _NO_DISK_CACHE: Numba could not tell when a
# user's scalar function changed.
_NO_DISK_CACHE = getattr(sys.modules.get(_PACKAGE), "_NO_DISK_CACHE", False)
JIT = dict(cache=not _NO_DISK_CACHE and _cache_available(), error_model="numpy", nogil=True,
           pipeline_class=WIDE_VECTORS)

# Kernels whose loops run along one row of a matrix (a norm's or a block's
# features, a cross-entropy's classes: often fewer than 64) keep Numba's own
# pipeline: at 512 bits a loop runs its vector body only from 16 (with
# LLVM's interleaving, up to 64) iterations, and cross-entropy with options
# over 10 classes took 1.8x as long (bench/RESULTS.md, "512-bit vectors").
JIT_ROWS = dict(JIT, pipeline_class=Compiler)

# Helpers called from compiled code alone: no Python or C wrapper (a cold
# first step compiles each wrapper, ~0.05 s apiece, for nothing).
INNER = dict(JIT, no_cpython_wrapper=True, no_cfunc_wrapper=True)

# Scalar helpers are inlined into their callers at Numba IR level, so that an
# activation code passed as a constant is folded away and each loop compiles
# to a branch-free, vectorisable body.
INLINE = dict(inline="always")


def served_codes(package, kind, every):
    """The ``kind`` codes (``"RULES"``, ``"LOSSES"``) the kernels of
    ``package`` serve: ``every`` one, or in a copy of this package built for
    one model (``fastgrad.registry.cpu_kernels``) its ``_ONLY_<kind>``."""
    only = getattr(sys.modules.get(package), "_ONLY_" + kind, None)
    return tuple(c for c in sorted(every) if only is None or c in only)


def code_ladder(name, params, key, branches, error):
    """An inlined function ``name(<params>)`` returning ``kernel(<args>)``
    of the branch in ``branches`` (``(code, kernel, args)`` triples) whose
    code equals the parameter ``key``; any other code raises
    ``ValueError(error)``.  Generated source, so that a copy of the package
    serving fewer codes has no call to (and compiles none of) the others'
    kernels: Numba types every call in a function, taken or not."""
    from numba import njit
    env = {}
    lines = [f"def {name}({params}):"]
    for i, (code, kernel, args) in enumerate(branches):
        env[f"_kernel{i}"] = kernel
        lines += [f"    if {key} == {int(code)}:", f"        return _kernel{i}({args})"]
    lines.append(f"    raise ValueError({error!r})")
    exec(compile("\n".join(lines), f"<fastgrad {name}>", "exec"), env)
    return njit(**INLINE)(env[name])


def served_ladder(name, params, key, kernels, package, kind, codes, table, what):
    """The ladder (:func:`code_ladder`) over a table's codes served by the
    kernels of ``package`` (:func:`served_codes`), and those codes.

    ``kernels`` maps every code of ``codes`` (``{name: code}``, the table
    ``kernels/spec.py`` calls ``table``) to its ``(kernel, args)``; a code
    missing there fails at import.  ``what`` names a code in the error
    message (``"update rule"``, ``"loss"``)."""
    assert set(kernels) == set(codes.values()), f"a {what} of kernels/spec.py has no kernel here"
    served = served_codes(package, kind, codes.values())
    ladder = code_ladder(name, params, key, [(code,) + kernels[code] for code in served],
                         not_served(codes, served, table, what))
    return ladder, served


def not_served(codes, served, table, what):
    """The message for a code of ``codes`` (``kernels/spec.py``'s ``table``)
    outside ``served``: raised by a ladder inside a kernel, or by the
    drivers' checks before one starts."""
    return (f"{what} code not served by these kernels: they serve "
            f"{[n for n, c in codes.items() if c in served]} (kernels/spec.py {table}; a "
            f"model's copy of the kernels serves the model's {what} alone)")
