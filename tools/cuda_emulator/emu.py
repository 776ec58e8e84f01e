"""Run fastgrad's CUDA wrappers on the host: a fake ``cupy`` (NumPy arrays)
and kernels compiled from the loader's own source text (_module.source,
name_expressions) by g++ against harness.h.  Launch arguments are checked
against each kernel's C signature; arrays are passed through guarded copies
(NaN-filled pads around each buffer, aliasing kept) and out-of-bounds
writes into the pads raise."""
import ctypes
import hashlib
import os
import subprocess
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PAD = 4096


from fakecupy import device_work, fake_cupy, submodules, unwrap_kernel_arg  # noqa: E402


_libs = {}


def _lib(filename, code=None, names=None):
    if code is None:
        from fastgrad.kernels.cuda import _module as m
        code, names = m.source(filename), m.NAMES[filename]
    key = (filename, hashlib.sha1(code.encode()).hexdigest())
    if key in _libs:
        return _libs[key]
    src = [open(os.path.join(HERE, "harness.h")).read(), code]
    for i, n in enumerate(names):
        flush = "true" if "<float" in n else "false"      # the GPU's -ftz=true (harness.h)
        src.append(f'extern "C" int launch_{i}(unsigned gx, unsigned gy, unsigned bx, unsigned by,'
                   f' void** a) {{ return emu::launch(&{n}, gx, gy, bx, by, a, {flush}); }}')
        src.append(f'extern "C" const char* sig_{i}() {{ return emu::signature(&{n}); }}')
    text = "\n".join(src)
    tag = hashlib.sha1(text.encode()).hexdigest()[:12]
    so = os.path.join(HERE, f"{filename}.{tag}.so")
    if not os.path.exists(so):
        cpp = os.path.join(HERE, f"{filename}.{tag}.cpp")
        open(cpp, "w").write(text)
        subprocess.run(["g++", "-std=c++17", "-O1", "-g", "-ffp-contract=off", "-fPIC", "-shared",
                        "-Wall", "-Wno-unused-function", "-o", so, cpp], check=True)
    lib = ctypes.CDLL(so)
    table = {}
    for i, n in enumerate(names):
        f = getattr(lib, f"launch_{i}")
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.c_uint] * 4 + [ctypes.POINTER(ctypes.c_void_p)]
        s = getattr(lib, f"sig_{i}")
        s.restype = ctypes.c_char_p
        table[n] = (f, s().decode())
    _libs[key] = table
    return table


_PTR = {"f": np.float32, "d": np.float64, "l": np.int64, "n": np.int32}
_SCALAR = {"i": (np.int32, ctypes.c_int), "q": (np.int64, ctypes.c_longlong),
           "Q": (np.uint64, ctypes.c_ulonglong), "D": (np.float64, ctypes.c_double)}

stats = {"launches": 0}


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


class Kernel:
    def __init__(self, filename, name, code=None, names=None):
        self.name = name
        self.fn, self.sig = _lib(filename, code, names)[name]

    def __call__(self, grid, block, args, *, shared_mem=0):
        if shared_mem:
            raise NotImplementedError("the emulator launches without dynamic shared memory")
        args = tuple(unwrap_kernel_arg(self.name, i, a) for i, a in enumerate(args))
        device_work(lambda: self._run(grid, block, args))

    def _run(self, grid, block, args):
        for what, dims in (("grid", grid), ("block", block)):
            if type(dims) is not tuple:        # as CuPy's Function.__call__ (tuple grid, block)
                raise TypeError(f"Argument '{what}' has incorrect type (expected tuple, got "
                                f"{type(dims).__name__})")
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        assert grid[2] == 1 and block[2] == 1, (self.name, grid, block)
        assert all(int(g) >= 1 for g in grid) and all(int(b) >= 1 for b in block), (self.name, grid, block)
        assert grid[1] <= 65535 and block[0] * block[1] <= 1024, (self.name, grid, block)
        assert len(args) == len(self.sig), f"{self.name}: {len(args)} args for signature {self.sig}"
        keep, ptrs, roots = [], [], {}
        for i, (a, c) in enumerate(zip(args, self.sig)):
            if c in _PTR:
                if isinstance(a, np.uint64) and int(a) == 0:
                    v = ctypes.c_void_p(0)
                else:
                    assert isinstance(a, np.ndarray), f"{self.name} arg {i}: pointer wanted, got {type(a)}"
                    assert a.dtype == _PTR[c], f"{self.name} arg {i}: {a.dtype} for {c}*"
                    r = _root(a)
                    if id(r) not in roots:
                        assert r.flags.c_contiguous, f"{self.name} arg {i}: non-contiguous buffer"
                        buf = np.full(r.nbytes + 2 * PAD, 0xFF, np.uint8)
                        buf[PAD:PAD + r.nbytes] = np.frombuffer(r.tobytes(), np.uint8)
                        roots[id(r)] = (r, buf)
                    r, buf = roots[id(r)]
                    off = a.__array_interface__["data"][0] - r.__array_interface__["data"][0]
                    assert 0 <= off <= r.nbytes, (self.name, i, off)
                    v = ctypes.c_void_p(buf.ctypes.data + PAD + off)
            else:
                want, ct = _SCALAR[c]
                assert type(a) is want, f"{self.name} arg {i}: {type(a).__name__} for {c} ({want.__name__})"
                v = ct(a.item())
            keep.append(v)
            ptrs.append(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p))
        arr = (ctypes.c_void_p * len(ptrs))(*[p.value for p in ptrs])
        rc = self.fn(*[int(g) for g in grid[:2]], *[int(b) for b in block[:2]], arr)
        assert rc == 0, f"{self.name}: emulator error {rc}"
        stats["launches"] += 1
        for r, buf in roots.values():
            assert (buf[:PAD] == 0xFF).all() and (buf[-PAD:] == 0xFF).all(), \
                f"{self.name}: out-of-bounds write"
            if r.size:
                r.reshape(-1)[:] = np.frombuffer(buf[PAD:PAD + r.nbytes].tobytes(), r.dtype)
        del keep


class RawModule:
    """cupy.RawModule stand-in: the code text is compiled by g++ (emu tag from its hash)."""

    def __init__(self, *, code=None, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 name_expressions=None, jitify=False):
        if code is None:
            raise NotImplementedError("the emulator compiles RawModule(code=...) only")
        self.code, self.names = code, list(name_expressions or ())
        self.tag = "mod" + hashlib.sha1(code.encode()).hexdigest()[:8]
        m = sys.modules.get("fastgrad.kernels.cuda._module")
        for f, n in (getattr(m, "NAMES", None) or {}).items():
            if list(n) == self.names:
                self.tag = f          # the .cu name: reuses the compiled .so cache

    def get_function(self, name):
        return Kernel(self.tag, name, self.code, self.names)


def make_cupy():
    cp = fake_cupy()
    cp.RawModule = RawModule
    return cp


def install():
    """Fake cupy in sys.modules (its RawModule compiles with g++)."""
    if "cupy" not in sys.modules or sys.modules["cupy"] is None:
        sys.modules.update(submodules(make_cupy()))
