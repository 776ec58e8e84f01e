"""A strict fake ``cupy`` for the host emulator: the backend's surface only.

fastgrad's CUDA backend touches CuPy for allocation and copies (``empty``,
``zeros``, ``asarray``, ``asnumpy``, the ``ndarray`` metadata and views,
``get``, ``fill``, ``astype``), kernel launch (``RawModule``, emu.py), GEMM
(``matmul``: cuBLAS) and streams, events, graphs and pinned memory.  Every
other array operation is one of fastgrad's own kernels (the CUDA backend's
``arrays.py``), so this fake offers no array arithmetic at all: no ufuncs,
operators, reductions or array functions -- a name left out is an
AttributeError, an operator or NumPy function on a device array a
TypeError.  What it offers it checks as CuPy does, and
``tests/test_cupy_surface.py`` checks every name, method, attribute and
keyword offered here against the real ``cupy-cuda13x`` wheel (which imports
without a GPU), and every CuPy name the package uses against this fake.

``ndarray`` WRAPS a NumPy array (it is not an np.ndarray subclass), so the
host/device boundary behaves as in CuPy:
  * ``np.asarray(cupy_array)`` raises TypeError (no implicit conversion);
  * ``device_array[...] = numpy_array`` raises TypeError (CuPy accepts
    scalars and device arrays only), and so does a NumPy operand of matmul;
  * ``flags`` has only ``c_contiguous``, ``f_contiguous``, ``owndata``;
  * indexing returns device arrays, never NumPy scalars;
  * ``.get()``, ``cupy.asnumpy``, ``float()``/``bool()``/``int()`` are the
    device->host transfers (counted as syncs; illegal while capturing).
Streams, events, pinned memory and CUDA-graph capture are emulated: while a
stream captures, device work (kernel launches, GEMMs, device-to-device
copies) is RECORDED, not run (outputs of recorded ops are NaN-filled until
a replay), and ``graph.launch()`` replays it.  Host syncs and asynchronous
host<->device copies during a capture raise and poison the capture.
GEMMs (cuBLAS) refuse capture, as CuPy's do (cupy issue 6290).
``cupy.cuda.nccl`` is present with ``available = False``, as in a wheel
installed without libnccl.
"""
import ctypes
import os
import sys
import types

import numpy as np

stats = {"syncs": 0, "captures": 0, "replays": 0}
_capture = None          # the _Graph being recorded, or None


class CaptureError(RuntimeError):
    pass


def device_work(thunk):
    """Run ``thunk`` now, or record it into the graph being captured."""
    if _capture is not None:
        _capture.ops.append(thunk)
    else:
        thunk()


sync_log = []
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _host_sync(what):
    stats["syncs"] += 1
    if os.environ.get("EMU_TRACE_SYNC"):
        import traceback
        fr = [f for f in traceback.extract_stack()[:-2] if _REPO in f.filename]
        sync_log.append((what, tuple(f"{os.path.relpath(f.filename, _REPO)}:{f.lineno}"
                                     for f in fr[-3:])))
    if _capture is not None:
        _capture.bad = _capture.bad or what
        raise CaptureError(f"cudaErrorStreamCaptureUnsupported: {what} while the stream is "
                           "capturing")


def _refuse_during_capture(what):
    # Stricter than CuPy on purpose: CuPy's copy_*_async has no capture
    # check, and CUDA records a copy from pinned memory as a graph node,
    # which would freeze one staging-ring slot's address into the graph
    # (every replay would read that slot).  The graphed step must stage
    # its inputs before it replays, never inside the capture.
    if _capture is not None:
        _capture.bad = _capture.bad or what
        raise CaptureError(f"cudaErrorStreamCaptureUnsupported: {what} while the stream is "
                           "capturing (the emulator refuses it: a graph would keep this "
                           "copy's host address)")


# --- memory -------------------------------------------------------------------

def _address(mem):
    """CuPy's copy functions take an int or a ctypes.c_void_p."""
    if isinstance(mem, int):
        return mem
    if isinstance(mem, ctypes.c_void_p):
        return mem.value
    raise TypeError(f"a host pointer (int or ctypes.c_void_p) expected, got {type(mem)}")


class MemoryPointer:
    def __init__(self, arr):
        self._arr = arr
        self.ptr = arr.__array_interface__["data"][0]

    def copy_from_host_async(self, mem, size, stream=None):
        _refuse_during_capture("asynchronous host->device copy")
        src = _address(mem)
        device_work(lambda: ctypes.memmove(self.ptr, src, int(size)))

    def copy_to_host_async(self, mem, size, stream=None):
        _refuse_during_capture("asynchronous device->host copy")
        dst = _address(mem)
        device_work(lambda: ctypes.memmove(dst, self.ptr, int(size)))

    def copy_from_device_async(self, src, size, stream=None):
        if not isinstance(src, MemoryPointer):
            raise TypeError(f"a cupy.cuda.MemoryPointer expected, got {type(src)}")
        src_ptr = src.ptr           # a device-to-device copy: capturable
        device_work(lambda: ctypes.memmove(self.ptr, src_ptr, int(size)))


class Flags:
    """CuPy's ``ndarray.flags``: three read-only booleans, no ``writeable``."""

    __slots__ = ("_c", "_f", "_own")

    def __init__(self, a):
        self._c, self._f, self._own = (bool(a.flags.c_contiguous), bool(a.flags.f_contiguous),
                                       a.base is None)

    c_contiguous = property(lambda s: s._c)
    f_contiguous = property(lambda s: s._f)
    owndata = property(lambda s: s._own)

    def __getitem__(self, name):
        return {"C_CONTIGUOUS": self._c, "F_CONTIGUOUS": self._f, "OWNDATA": self._own}[name]


# --- arrays -------------------------------------------------------------------

def _strict(x, where):
    """Unwrap a device operand; a host (NumPy) array is a TypeError as in CuPy."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (a NumPy array passed to cupy {where})")
    return x


def _basic_key(key, where):
    """Basic indexing only (integers, slices, ``...``, None): an index
    array or mask is a gather or scatter, array arithmetic the backend does
    with its own kernels."""
    for k in key if isinstance(key, tuple) else (key,):
        if not (k is None or k is Ellipsis or isinstance(k, (slice, int, np.integer))) \
                or isinstance(k, bool):
            raise TypeError(f"{where}: the emulated CuPy offers basic indexing only, got "
                            f"{type(k).__name__}")
    return key


def _lenient(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_lenient(v) for v in x)
    return x


def _mk(a):
    w = object.__new__(ndarray)
    w._a = a
    return w


def _compute(fn):
    """A device op producing a new array: run now, or (capturing) allocate
    the output now (NaN) and record the computation into it."""
    r = np.asarray(fn())
    if _capture is None:
        return _mk(r)
    h = np.empty(r.shape, r.dtype)
    if h.dtype.kind == "f":
        h[...] = np.nan
    _capture.ops.append(lambda: h.__setitem__(Ellipsis, fn()))
    return _mk(h)


class ndarray:
    __array_priority__ = 1000

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = np.empty(shape, dtype, order=order)

    # host boundary
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        _host_sync("ndarray.get()")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, copy=True, order=order)

    def __float__(self):
        _host_sync("float(ndarray)")
        return float(self._a)

    def __int__(self):
        _host_sync("int(ndarray)")
        return int(self._a)

    def __bool__(self):
        _host_sync("bool(ndarray)")
        return bool(self._a)

    def __repr__(self):
        return "cupy-emu:" + repr(self._a)

    __str__ = __repr__

    # metadata
    shape = property(lambda s: s._a.shape)
    dtype = property(lambda s: s._a.dtype)
    size = property(lambda s: s._a.size)
    ndim = property(lambda s: s._a.ndim)
    itemsize = property(lambda s: s._a.itemsize)
    strides = property(lambda s: s._a.strides)
    flags = property(lambda s: Flags(s._a))
    T = property(lambda s: _mk(s._a.T))
    data = property(lambda s: MemoryPointer(s._a))

    def __len__(self):
        return len(self._a)

    def __hash__(self):
        raise TypeError("unhashable type: 'cupy.ndarray'")

    # CuPy compares elementwise, which this fake does not offer; Python's
    # identity fallback would answer silently instead
    def __eq__(self, other):
        raise TypeError("the emulated CuPy has no array comparisons")

    __ne__ = __eq__

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        return self._a.__dlpack__()

    # views (host metadata only)
    def reshape(self, *shape, order="C"):
        r = self._a.reshape(*shape, order=order)
        if not np.shares_memory(r, self._a) and r.size:
            return _compute(lambda: self._a.reshape(*shape, order=order))
        return _mk(r)

    def ravel(self, order="C"):
        return self.reshape(-1, order=order)

    def __getitem__(self, key):
        k = _basic_key(key, "ndarray.__getitem__")
        # basic indexing is a view in CuPy, of a single element too (a 0-d
        # array, where NumPy gives a scalar copy): a trailing ``...`` makes
        # NumPy's a view as well
        k = k if isinstance(k, tuple) else (k,)
        if not any(x is Ellipsis for x in k):
            k = k + (Ellipsis,)
        return _mk(self._a[k])

    def __setitem__(self, key, value):
        if isinstance(value, (np.ndarray, list, tuple)):
            # CuPy fills from scalars only; arrays must already be on the device.
            raise TypeError(f"Unsupported type {type(value)} (cupy refuses a host array as the "
                            "value of __setitem__: copy it to the device first, e.g. "
                            "cupy.asarray)")
        k = _basic_key(key, "ndarray.__setitem__")
        v = _lenient(value)
        self._a[k]   # shape check now
        device_work(lambda: self._a.__setitem__(k, v))

    def fill(self, value):
        if isinstance(value, (np.ndarray, list, tuple, ndarray)):
            raise TypeError(f"Unsupported type {type(value)} (ndarray.fill takes a scalar)")
        device_work(lambda: self._a.fill(value))

    def copy(self, order="C"):
        return _compute(lambda: self._a.copy(order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _compute(lambda: self._a.astype(dtype, order=order))

    # NumPy's ufuncs and functions on a device array: the emulator offers
    # no array arithmetic, so every one is a TypeError (real CuPy computes
    # some; fastgrad reaches the device through its backend instead)
    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        return NotImplemented

    def __array_function__(self, func, types_, args, kw):
        return NotImplemented


ndarray.__module__ = "cupy"
ndarray.__qualname__ = ndarray.__name__ = "ndarray"


# --- module functions -----------------------------------------------------------

def _alloc_result(r):
    """A freshly allocated device array holding ``r`` (recorded while capturing)."""
    if _capture is None:
        return _mk(r)
    h = np.empty_like(r)
    if h.dtype.kind == "f":
        h[...] = np.nan
    _capture.ops.append(lambda: h.__setitem__(Ellipsis, r))
    return _mk(h)


def empty(shape, dtype=float, order="C"):
    return _mk(np.empty(shape, dtype, order=order))


def zeros(shape, dtype=float, order="C"):
    return _alloc_result(np.zeros(shape, dtype, order=order))


def ones(shape, dtype=float, order="C"):
    return _alloc_result(np.ones(shape, dtype, order=order))


def full(shape, fill_value, dtype=None, order="C"):
    if isinstance(fill_value, (np.ndarray, list, tuple)):
        raise TypeError(f"Unsupported type {type(fill_value)} (cupy.full takes a scalar)")
    return _alloc_result(np.full(shape, _lenient(fill_value), dtype, order=order))


def _device_operand(a, where):
    if not isinstance(a, ndarray):
        raise TypeError(f"cupy.{where}: {type(a)} is not a cupy.ndarray")
    return a._a


def empty_like(prototype, dtype=None, order="K", subok=None, shape=None):
    return _mk(np.empty_like(_device_operand(prototype, "empty_like"), dtype, order,
                             shape=shape))


def zeros_like(a, dtype=None, order="K", subok=None, shape=None):
    return _alloc_result(np.zeros_like(_device_operand(a, "zeros_like"), dtype, order,
                                       shape=shape))


def asarray(a, dtype=None, order=None, *, copy=None, blocking=False):
    if isinstance(a, ndarray):
        # as CuPy's array(a, dtype, copy=False, order=order): a copy where
        # the order asked for is not the array's (or copy=True)
        flags = a._a.flags
        layout = str(order).upper() if order is not None else "K"
        if copy or (layout == "C" and not flags.c_contiguous) or (
                layout == "F" and not flags.f_contiguous):
            return _compute(lambda: np.array(a._a, dtype=dtype, copy=True, order=layout))
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return a.astype(dtype)
    _host_sync("cupy.asarray from host memory")
    return _mk(np.array(a, dtype=dtype, copy=True, order=order or "K"))


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return _compute(lambda: np.array(obj._a, dtype=dtype, copy=True, order=order,
                                         ndmin=ndmin))
    _host_sync("cupy.array from host memory")
    return _mk(np.array(_lenient(obj), dtype=dtype, copy=True, order=order, ndmin=ndmin))


def ascontiguousarray(a, dtype=None):
    if isinstance(a, ndarray) and a._a.flags.c_contiguous and (dtype is None or
                                                                np.dtype(dtype) == a.dtype):
        return a
    if not isinstance(a, ndarray):
        return asarray(a, dtype)
    return _compute(lambda: np.ascontiguousarray(a._a, dtype))


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    if isinstance(a, ndarray):
        return a.get(out=out, order=order)
    return np.asarray(a, order=order)


def matmul(*args, out=None, dtype=None, casting="same_kind", axes=None, axis=None,
           keepdims=False, signature=None, order="K"):
    if _capture is not None:
        # CuPy's cuBLAS wrapper checks the stream before any CUDA call and
        # raises; the capture itself stays valid (cupy issue 6290).
        raise NotImplementedError("calling cuBLAS API during stream capture is currently "
                                  "unsupported")
    a, b = args
    A, B_ = _strict(a, "matmul"), _strict(b, "matmul")
    if out is not None:
        if not isinstance(out, ndarray):
            raise TypeError(f"matmul: out must be a cupy.ndarray, got {type(out)}")
        O = out._a
        want = (A.shape[0], B_.shape[-1]) if A.ndim == 2 and B_.ndim == 2 else None
        if want is not None and want != O.shape:
            raise ValueError(f"matmul out shape {O.shape} != {want}")
        assert O.dtype == np.result_type(A, B_), ("matmul out dtype", O.dtype, A.dtype, B_.dtype)

        def go():
            O[...] = np.matmul(A, B_)
        device_work(go)
        return out
    return _compute(lambda: np.matmul(A, B_))


# --- streams, events, graphs ----------------------------------------------------------

class Stream:
    _stack = []

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=None):
        self.null = null
        self.ptr = 0 if null else id(self)
        self._graph = None

    def __enter__(self):
        Stream._stack.append(self)
        return self

    def __exit__(self, *exc):
        Stream._stack.pop()

    def synchronize(self):
        _host_sync("Stream.synchronize()")

    def begin_capture(self, mode=None):
        global _capture
        if self.null:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: cannot capture the legacy "
                               "default stream")
        if _capture is not None:
            raise RuntimeError("cudaErrorIllegalState: already capturing")
        if get_current_stream() is not self:
            raise RuntimeError("emulator: capture must be on the current stream")
        stats["captures"] += 1
        _capture = self._graph = Graph()

    def end_capture(self):
        global _capture
        g, _capture = _capture, None
        if g is None or g is not self._graph:
            raise RuntimeError("cudaErrorIllegalState: the stream is not capturing")
        self._graph = None
        if g.bad:
            raise RuntimeError(f"cudaErrorStreamCaptureInvalidated ({g.bad})")
        return g

class Graph:
    def __init__(self):
        self.ops = []
        self.bad = None

    def launch(self, stream=None):
        if _capture is not None:
            raise RuntimeError("graph launch while capturing")
        stats["replays"] += 1
        for op in self.ops:
            op()


_NULL = Stream(null=True)


def get_current_stream(device_id=-1):
    return Stream._stack[-1] if Stream._stack else _NULL


_events_recorded = 0


class Event:
    """Work runs at once here, so every event has completed; but with
    EMU_EVENT_LAG=n an event reports ``done`` only once n later events have
    been recorded (or it was synchronized): the host then sees the device
    n steps behind, as on a GPU busy with queued work."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self._stamp = None
        self._synced = True
        self.ptr = id(self)

    def record(self, stream=None):
        global _events_recorded
        if _capture is not None:
            return   # event record nodes are allowed in graphs
        _events_recorded += 1
        self._stamp = _events_recorded
        self._synced = False

    @property
    def done(self):
        if self._synced or self._stamp is None:
            return True
        return _events_recorded - self._stamp >= int(os.environ.get("EMU_EVENT_LAG", "0"))

    def synchronize(self):
        if not self.done:
            _host_sync("Event.synchronize()")
        self._synced = True


def get_elapsed_time(start_event, end_event):
    return 1.0     # no device clock here: a placeholder


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        assert self.id == 0, "emulator has one device"

    def use(self):
        pass

    def synchronize(self):
        _host_sync("Device.synchronize()")


class PinnedMemoryPointer(bytearray):
    @property
    def ptr(self):
        return ctypes.addressof((ctypes.c_char * len(self)).from_buffer(self))

    @property
    def size(self):
        return len(self)


def alloc_pinned_memory(size):
    return PinnedMemoryPointer(int(size))


def unwrap_kernel_arg(name, i, a):
    if isinstance(a, ndarray):
        return a._a
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name} arg {i}: a host NumPy array passed to a CUDA kernel")
    return a


# --- the module -----------------------------------------------------------------

# The module's functions: allocation, copies, GEMM and the few array functions
# fastgrad, its tests, benchmarks and GPU tools call (README: the audit).
_FUNCTIONS = (empty, zeros, ones, full, empty_like, zeros_like, asarray, array,
              ascontiguousarray, asnumpy, matmul)


def fake_cupy():
    """A new fake ``cupy`` module object (not installed in ``sys.modules``)."""
    cp = types.ModuleType("cupy")
    cp.__emulated__ = True
    cp.ndarray = ndarray
    for f in _FUNCTIONS:
        setattr(cp, f.__name__, f)

    rt = types.ModuleType("cupy.cuda.runtime")
    rt.getDeviceCount = lambda: 1
    rt.getDevice = lambda: 0
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = False      # as a wheel without libnccl: the module imports, empty
    cuda = types.ModuleType("cupy.cuda")
    # cupy.cuda.nccl is reached only by importing it, as in CuPy
    cuda.runtime, cuda._nccl = rt, nccl
    cuda.Stream, cuda.Event, cuda.Device = Stream, Event, Device
    for f in (get_current_stream, get_elapsed_time, alloc_pinned_memory):
        setattr(cuda, f.__name__, f)
    cp.cuda = cuda
    if _AUDIT_PATH:
        _audit_install(cp)
    return cp


def submodules(cp):
    """The ``sys.modules`` entries that importing the fake must add."""
    return {"cupy": cp, "cupy.cuda": cp.cuda, "cupy.cuda.runtime": cp.cuda.runtime,
            "cupy.cuda.nccl": cp.cuda._nccl}


# --- usage audit (EMU_AUDIT=file) -------------------------------------------------
#
# Which of the names above are reached, and from where: the first frame outside
# this emulator and NumPy, classified as the library (fastgrad/, kernels/), the
# tests or the benchmarks.  One "name<TAB>caller-kind" line per distinct pair is
# appended to the file at exit (tools/cuda_emulator/README.md, the audit).

_AUDIT_PATH = os.environ.get("EMU_AUDIT")
_audit_seen = set()


def _caller_kind():
    here = os.path.dirname(os.path.abspath(__file__))
    f = sys._getframe(2)
    while f is not None:
        fn = os.path.abspath(f.f_code.co_filename)
        if not fn.startswith(here) and f"{os.sep}numpy{os.sep}" not in fn:
            rel = os.path.relpath(fn, _REPO)
            top = rel.split(os.sep)[0]
            if top in ("fastgrad", "kernels"):       # fastgrad/kernels included
                return "library"
            return top if top in ("tests", "bench", "tools") else "other"
        f = f.f_back
    return "other"


def _audited(name, fn):
    def wrapper(*args, **kw):
        key = (name, _caller_kind())
        _audit_seen.add(key)
        return fn(*args, **kw)
    wrapper.__name__ = getattr(fn, "__name__", name)
    wrapper.__qualname__ = getattr(fn, "__qualname__", name)
    wrapper.__wrapped__ = fn
    if hasattr(fn, "keywords"):
        wrapper.keywords = fn.keywords
    return wrapper


def _audit_install(cp):
    import atexit
    global _audit_classes_done
    if _audit_classes_done:     # the classes are shared by every fake module made
        return _audit_module(cp)
    _audit_classes_done = True
    _audit_module(cp)
    for cls, prefix in ((ndarray, "ndarray."), (Stream, "cuda.Stream."), (Event, "cuda.Event."),
                        (Graph, "cuda.graph.Graph."), (MemoryPointer, "cuda.MemoryPointer."),
                        (Device, "cuda.Device."), (PinnedMemoryPointer,
                                                   "cuda.PinnedMemoryPointer.")):
        for n, obj in list(vars(cls).items()):
            if n in ("__init__", "__repr__", "__str__", "__array_ufunc__",
                     "__array_function__", "__hash__") or n.startswith("_") and \
                    not n.startswith("__"):
                continue
            if isinstance(obj, property):
                setattr(cls, n, property(_audited(prefix + n, obj.fget)))
            elif callable(obj) and not isinstance(obj, type):
                setattr(cls, n, _audited(prefix + n, obj))
        if cls is not ndarray:
            cls.__init__ = _audited(prefix + "__init__", cls.__init__)

    def dump():
        with open(_AUDIT_PATH, "a") as fh:
            for name, kind in sorted(_audit_seen):
                fh.write(f"{name}\t{kind}\n")
    atexit.register(dump)


_audit_classes_done = False


def _audit_module(cp):
    for mod, prefix in ((cp, ""), (cp.cuda, "cuda."), (cp.cuda.runtime, "cuda.runtime.")):
        for n in list(vars(mod)):
            obj = getattr(mod, n)
            if callable(obj) and not isinstance(obj, (type, types.ModuleType)) \
                    and not n.startswith("_"):
                setattr(mod, n, _audited(prefix + n, obj))
