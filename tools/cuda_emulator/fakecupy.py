"""A fake ``cupy`` for the host emulator.

``ndarray`` WRAPS a NumPy array (it is not an np.ndarray subclass), so the
host/device boundary behaves as in CuPy:
  * ``np.asarray(cupy_array)`` raises TypeError (implicit conversion);
  * cupy ops / ufuncs with a plain NumPy array operand raise TypeError;
  * reductions and indexing return 0-d device arrays, never NumPy scalars;
  * ``.get()``, ``cupy.asnumpy``, ``float()``/``bool()``/``int()`` are the
    device->host transfers (counted as syncs; illegal while capturing).
Streams, events, pinned memory and CUDA-graph capture are emulated: while a
stream captures, device work (kernel launches, GEMMs, elementwise ops,
copies) is RECORDED, not run (outputs of recorded ops are NaN-filled until a
replay), and ``graph.launch()`` replays it.  Host syncs during a capture
raise (as CUDA's cudaErrorStreamCaptureUnsupported) and poison the capture.
EMU_CAPTURE_MATMUL=raise makes GEMMs refuse capture (cupy issue 6290).
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


# --- arrays -------------------------------------------------------------------

class MemoryPointer:
    def __init__(self, arr):
        self._arr = arr
        self.ptr = arr.__array_interface__["data"][0]

    def copy_from_host_async(self, src, size, stream=None):
        def go():
            ctypes.memmove(self.ptr, int(src), int(size))
        if _capture is not None:
            # the source is host memory read at replay time (pinned) -- allowed
            pass
        device_work(go)

    def copy_from_host(self, src, size):
        _host_sync("synchronous host->device copy")
        ctypes.memmove(self.ptr, int(src), int(size))

    def copy_to_host_async(self, dst, size, stream=None):
        device_work(lambda: ctypes.memmove(int(dst), self.ptr, int(size)))

    def copy_from_device_async(self, src, size, stream=None):
        device_work(lambda: ctypes.memmove(self.ptr, src.ptr, int(size)))


def _is_host_array(x):
    return isinstance(x, np.ndarray)


def _strict(x, where):
    """Unwrap a device operand; a host (NumPy) array is a TypeError as in CuPy."""
    if isinstance(x, ndarray):
        return x._a
    if _is_host_array(x):
        raise TypeError(f"Unsupported type {type(x)} (a NumPy array passed to cupy {where})")
    if isinstance(x, (list, tuple)):
        return type(x)(_strict(v, where) for v in x)
    return x


def _lenient(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, (list, tuple)):
        return type(x)(_lenient(v) for v in x)
    return x


def _wrap(r):
    if isinstance(r, np.ndarray):
        return _mk(r)
    if isinstance(r, np.generic) and not isinstance(r, (np.str_, np.bytes_)):
        return _mk(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    if isinstance(r, list):
        return [_wrap(v) for v in r]
    return r


def _mk(a):
    w = object.__new__(ndarray)
    w._a = a
    return w


def _compute(fn, *args, **kw):
    """A device op producing new arrays: run now, or (capturing) allocate the
    outputs now (NaN) and record the computation into them."""
    r = fn(*args, **kw)
    if _capture is None:
        return _wrap(r)
    outs = r if isinstance(r, tuple) else (r,)
    holders = []
    for o in outs:
        o = np.asarray(o)
        h = np.empty(o.shape, o.dtype)
        if h.dtype.kind == "f":
            h[...] = np.nan
        holders.append(h)

    def replay():
        rr = fn(*args, **kw)
        for h, o in zip(holders, rr if isinstance(rr, tuple) else (rr,)):
            h[...] = o
    _capture.ops.append(replay)
    res = tuple(_mk(h) for h in holders)
    return res if isinstance(r, tuple) else res[0]


def _inplace(fn):
    device_work(fn)


_BIN = ["add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
        "lshift", "rshift"]
_CMP = ["eq", "ne", "lt", "le", "gt", "ge"]


class ndarray:
    __array_priority__ = 1000

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = np.empty(shape, dtype, order=order)

    # host boundary
    def __array__(self, *a, **k):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def get(self, stream=None, order="C", out=None, blocking=True):
        _host_sync("ndarray.get()")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, copy=True)

    def item(self):
        _host_sync("ndarray.item()")
        return self._a.item()

    def tolist(self):
        _host_sync("ndarray.tolist()")
        return self._a.tolist()

    def __float__(self):
        _host_sync("float(ndarray)")
        return float(self._a)

    def __int__(self):
        _host_sync("int(ndarray)")
        return int(self._a)

    def __complex__(self):
        _host_sync("complex(ndarray)")
        return complex(self._a)

    def __bool__(self):
        _host_sync("bool(ndarray)")
        return bool(self._a)

    def __index__(self):
        _host_sync("operator.index(ndarray)")
        return self._a.__index__()

    def __repr__(self):
        return "cupy-emu:" + repr(self._a)

    __str__ = __repr__

    def __format__(self, spec):
        _host_sync("format(ndarray)")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # metadata
    shape = property(lambda s: s._a.shape)
    dtype = property(lambda s: s._a.dtype)
    size = property(lambda s: s._a.size)
    ndim = property(lambda s: s._a.ndim)
    itemsize = property(lambda s: s._a.itemsize)
    nbytes = property(lambda s: s._a.nbytes)
    strides = property(lambda s: s._a.strides)
    flags = property(lambda s: s._a.flags)
    T = property(lambda s: _mk(s._a.T))
    data = property(lambda s: MemoryPointer(s._a))
    device = property(lambda s: Device(0))

    @property
    def base(self):
        return None if self._a.base is None else _mk(self._a.base)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        for i in range(len(self._a)):
            yield self[i]

    def __hash__(self):
        raise TypeError("unhashable type: 'cupy.ndarray'")

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, *a, **k):
        return self._a.__dlpack__(*a, **k)

    # views (host metadata only)
    def reshape(self, *shape, order="C"):
        r = self._a.reshape(*shape, order=order)
        if not np.shares_memory(r, self._a) and r.size:
            return _compute(lambda: self._a.reshape(*shape, order=order))
        return _mk(r)

    def view(self, *a, **k):
        return _mk(self._a.view(*a, **k))

    def transpose(self, *axes):
        return _mk(self._a.transpose(*axes))

    def swapaxes(self, a, b):
        return _mk(self._a.swapaxes(a, b))

    def squeeze(self, axis=None):
        return _mk(self._a.squeeze(axis))

    def ravel(self, order="C"):
        return self.reshape(-1, order=order)

    def __getitem__(self, key):
        k = _lenient(key)
        r = self._a[k]
        if isinstance(r, np.ndarray) and (r.size == 0 or np.shares_memory(r, self._a)):
            return _mk(r)
        return _compute(lambda: np.asarray(self._a[_lenient(key)]))

    def __setitem__(self, key, value):
        v = _lenient(value)
        if _is_host_array(value) or isinstance(value, (list, tuple)):
            _host_sync("host->device copy in __setitem__")   # pageable memcpy: syncs
            v = np.array(v, copy=True)
        self._a[_lenient(key)]   # shape check now
        _inplace(lambda: self._a.__setitem__(_lenient(key), v))

    def fill(self, v):
        _inplace(lambda: self._a.fill(v))

    def copy(self, order="C"):
        return _compute(lambda: self._a.copy(order=order))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _compute(lambda: self._a.astype(dtype, order=order))

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kw):
                out = kw.get("out")
                args = _strict(args, f"ndarray.{name}")
                kw = {k: _strict(v, f"ndarray.{name}") for k, v in kw.items()}
                if out is not None:
                    _inplace(lambda: attr(*args, **kw))
                    return out
                return _compute(lambda: attr(*args, **kw))
            return method
        return _wrap(attr)

    # numpy protocol
    def __array_ufunc__(self, ufunc, method, *inputs, **kw):
        ins = _strict(inputs, f"ufunc {ufunc.__name__}")
        out = kw.get("out")
        if out is not None:
            kw["out"] = tuple(_strict(o, "out=") for o in out)
            _inplace(lambda: getattr(ufunc, method)(*ins, **kw))
            return out[0] if len(out) == 1 else out
        return _compute(lambda: getattr(ufunc, method)(*ins, **kw))

    def __array_function__(self, func, types_, args, kw):
        name = func.__name__
        if name in ("shape", "ndim", "size"):
            return func(*_lenient(args), **_lenient(kw))
        a = _strict(args, f"function {name}")
        k = {kk: _strict(v, f"function {name}") for kk, v in kw.items()}
        out = kw.get("out")
        if out is not None:
            _inplace(lambda: func(*a, **k))
            return out
        return _compute(lambda: func(*a, **k))


def _binop(name):
    def f(self, other):
        o = _strict(other, f"operator __{name}__")
        return _compute(lambda: getattr(self._a, f"__{name}__")(o))
    f.__name__ = f"__{name}__"
    return f


def _iop(name):
    def f(self, other):
        o = _strict(other, f"operator __i{name}__")
        _inplace(lambda: getattr(self._a, f"__i{name}__")(o))
        return self
    return f


for _n in _BIN:
    setattr(ndarray, f"__{_n}__", _binop(_n))
    setattr(ndarray, f"__r{_n}__", _binop("r" + _n))
    setattr(ndarray, f"__i{_n}__", _iop(_n))
for _n in _CMP:
    setattr(ndarray, f"__{_n}__", _binop(_n))
for _n in ("neg", "pos", "abs", "invert"):
    setattr(ndarray, f"__{_n}__", (lambda n: lambda self: _compute(
        lambda: getattr(self._a, f"__{n}__")()))(_n))
ndarray.__module__ = "cupy"
ndarray.__qualname__ = ndarray.__name__ = "ndarray"


# --- module functions -----------------------------------------------------------------

def asarray(a, dtype=None, order=None, blocking=False):
    if isinstance(a, ndarray):
        if dtype is None or np.dtype(dtype) == a.dtype:
            return a
        return a.astype(dtype)
    _host_sync("cupy.asarray from host memory")
    return _mk(np.array(a, dtype=dtype, copy=True, order=order or "K"))


def array(a, dtype=None, copy=True, order="K", ndmin=0):
    if isinstance(a, ndarray):
        return _compute(lambda: np.array(a._a, dtype=dtype, copy=True, order=order, ndmin=ndmin))
    _host_sync("cupy.array from host memory")
    return _mk(np.array(_lenient(a), dtype=dtype, copy=True, order=order, ndmin=ndmin))


def asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if isinstance(a, ndarray):
        return a.get(out=out)
    return np.asarray(a, order=order)


def _alloc(fn):
    def f(*args, **kw):
        return _mk(fn(*_strict(args, fn.__name__), **kw))
    return f


def _like(fn):
    def f(a, *args, **kw):
        if not isinstance(a, ndarray):
            raise TypeError(f"cupy.{fn.__name__}: {type(a)} is not a cupy.ndarray")
        kw.pop("subok", None)
        return _mk(fn(a._a, *args, **kw))
    return f


def _fill_alloc(fn):
    def f(*args, **kw):
        r = fn(*args, **kw)
        if _capture is None:
            return _mk(r)
        h = np.empty_like(r)
        if h.dtype.kind == "f":
            h[...] = np.nan
        _capture.ops.append(lambda: h.__setitem__(Ellipsis, r))
        return _mk(h)
    return f


class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        obj = getattr(np, name)
        if isinstance(obj, type) or not callable(obj):
            return obj

        def fn(*args, **kw):
            a = _strict(args, f"cupy.{name}")
            out = kw.get("out")
            k = {kk: _strict(v, f"cupy.{name}") for kk, v in kw.items()}
            if out is not None:
                _inplace(lambda: obj(*a, **k))
                return out
            return _compute(lambda: obj(*a, **k))
        fn.__name__ = name
        return fn


def _matmul(a, b, out=None, **kw):
    if _capture is not None and os.environ.get("EMU_CAPTURE_MATMUL") == "raise":
        _capture.bad = _capture.bad or "cuBLAS under capture"
        raise NotImplementedError("cuBLAS calls are not supported while a stream is capturing "
                                  "(emulated cupy issue 6290)")
    A, B_ = _strict(a, "matmul"), _strict(b, "matmul")
    if out is not None:
        O = _strict(out, "matmul out=")
        assert isinstance(out, ndarray)
        want = np.matmul(A, B_).shape if _capture is None else None
        if want is not None and want != O.shape:
            raise ValueError(f"matmul out shape {O.shape} != {want}")
        assert O.dtype == np.result_type(A, B_), ("matmul out dtype", O.dtype, A.dtype, B_.dtype)

        def go():
            r = np.matmul(A, B_)
            O[...] = r
        device_work(go)
        return out
    return _compute(lambda: np.matmul(A, B_))


# --- streams, events, graphs ----------------------------------------------------------

class Stream:
    _stack = []

    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.null = null
        self.ptr = 0 if null else id(self)
        self._graph = None

    def __enter__(self):
        Stream._stack.append(self)
        return self

    def __exit__(self, *exc):
        Stream._stack.pop()

    def use(self):
        Stream._stack[:] = [self]
        return self

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
        _capture = self._graph = _Graph()

    def end_capture(self):
        global _capture
        g, _capture = _capture, None
        if g is None or g is not self._graph:
            raise RuntimeError("cudaErrorIllegalState: the stream is not capturing")
        self._graph = None
        if g.bad:
            raise RuntimeError(f"cudaErrorStreamCaptureInvalidated ({g.bad})")
        return g

    def is_capturing(self):
        return _capture is not None and _capture is self._graph

    def record(self, event=None):
        event = event or Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass


class _Graph:
    def __init__(self):
        self.ops = []
        self.bad = None

    def launch(self, stream=None):
        if _capture is not None:
            raise RuntimeError("graph launch while capturing")
        stats["replays"] += 1
        for op in self.ops:
            op()

    def upload(self, stream=None):
        pass


_NULL = Stream(null=True)


def get_current_stream(device_id=None):
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

    def query(self):
        return self.done

    def synchronize(self):
        if not self.done:
            _host_sync("Event.synchronize()")
        self._synced = True

    @property
    def ptr(self):
        return id(self)


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        assert self.id == 0, "emulator has one device"

    def use(self):
        pass

    def synchronize(self):
        _host_sync("Device.synchronize()")

    def __enter__(self):
        return self

    def __exit__(self, *e):
        pass

    def __int__(self):
        return self.id


class PinnedMemoryPointer(bytearray):
    @property
    def ptr(self):
        return ctypes.addressof((ctypes.c_char * len(self)).from_buffer(self))


def alloc_pinned_memory(size):
    return PinnedMemoryPointer(int(size))


class MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self, stream=None):
        pass

    def malloc(self, size):
        raise NotImplementedError


def unwrap_kernel_arg(name, i, a):
    if isinstance(a, ndarray):
        return a._a
    if isinstance(a, np.ndarray):
        raise TypeError(f"{name} arg {i}: a host NumPy array passed to a CUDA kernel")
    return a


def fake_cupy():
    cp = _Mod("cupy")
    cp.__emulated__ = True
    cp.ndarray = ndarray
    for n in ("empty", "zeros", "ones", "full", "arange", "eye", "linspace"):
        setattr(cp, n, _fill_alloc(getattr(np, n)) if n not in ("empty",) else _alloc(np.empty))
    for n in ("empty_like", "zeros_like", "ones_like", "full_like"):
        f = _like(getattr(np, n))
        if n != "empty_like":
            f = (lambda f_: lambda *a, **k: _fill_wrap(f_, *a, **k))(f)
        setattr(cp, n, f)
    cp.asarray, cp.array, cp.asnumpy, cp.matmul = asarray, array, asnumpy, _matmul
    cp.ascontiguousarray = lambda a, dtype=None: (
        a if isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or
                                                                 np.dtype(dtype) == a.dtype)
        else (asarray(a, dtype) if not isinstance(a, ndarray)
              else _compute(lambda: np.ascontiguousarray(a._a, dtype))))
    cp.get_array_module = lambda *args: cp if any(isinstance(a, ndarray) for a in args) else np
    cp.from_dlpack = lambda t: asarray(np.from_dlpack(t))
    cp.get_default_memory_pool = lambda: MemoryPool()
    cp.get_default_pinned_memory_pool = lambda: MemoryPool()
    for n in ("float16", "float32", "float64", "int32", "int64", "uint64", "bool_", "int8",
              "uint8", "nan", "inf", "pi", "newaxis", "dtype", "finfo", "iinfo", "result_type"):
        setattr(cp, n, getattr(np, n))
    rt = types.ModuleType("cupy.cuda.runtime")
    rt.getDeviceCount = lambda: 1
    rt.getDevice = lambda: 0
    rt.deviceSynchronize = lambda: _host_sync("deviceSynchronize")
    rt.CUDARuntimeError = RuntimeError
    cuda = types.ModuleType("cupy.cuda")
    cuda.runtime = rt
    cuda.Stream, cuda.Event, cuda.Device = Stream, Event, Device
    cuda.get_current_stream = get_current_stream
    cuda.get_elapsed_time = lambda start, end: 1.0     # no device clock here: a placeholder
    cuda.alloc_pinned_memory = alloc_pinned_memory
    cuda.set_pinned_memory_allocator = lambda *a: None
    cuda.set_allocator = lambda *a: None
    cuda.MemoryPool = MemoryPool
    cuda.MemoryPointer = MemoryPointer
    cuda.is_available = lambda: True
    cp.cuda = cuda
    sys.modules["cupy.cuda"] = cuda
    sys.modules["cupy.cuda.runtime"] = rt
    return cp


def _fill_wrap(f, *a, **k):
    r = f(*a, **k)
    if _capture is None:
        return r
    h = np.empty_like(r._a)
    v = r._a.copy()
    _capture.ops.append(lambda: h.__setitem__(Ellipsis, v))
    return _mk(h)
