"""The CUDA code's contact with CuPy, checked against the real wheel.

The host emulator's fake CuPy (tools/cuda_emulator/fakecupy.py) is only as
good as it is strict: whatever it offers must exist in real CuPy, with the
same keywords, or the CUDA tests pass here and crash on a GPU.  And every
``cupy``/``cp``/``xp`` name the package itself calls must exist in CuPy.
Both are checked here against ``cupy-cuda13x`` (a test dependency: it
imports without a GPU or driver).
"""
import ast
import contextlib
import glob
import importlib
import inspect
import os
import re
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR = os.path.join(ROOT, "tools", "cuda_emulator")


@pytest.fixture(scope="module")
def real():
    cupy = pytest.importorskip("cupy", reason="cupy-cuda13x is a test dependency "
                                               "(pip install -e '.[test]')")
    if getattr(cupy, "__emulated__", False):
        pytest.skip("this process runs the emulated cupy; the check needs the real wheel")
    return cupy


@pytest.fixture(scope="module")
def fake(real):
    sys.path.insert(0, EMULATOR)
    try:
        import emu
        import fakecupy
    finally:
        sys.path.remove(EMULATOR)
    cp = emu.make_cupy()
    cp._submodules = fakecupy.submodules(cp)
    return cp, fakecupy, emu


# -- signatures of Cython and Python callables -------------------------------------

_SIG_START = re.compile(r"^[\w.]+\(")


def _doc_params(obj):
    """Parameter names from a docstring signature line ``name(a, b=1, *, c=2)``
    (Cython callables carry their signature there; when several lines near
    the top are signatures, the last is the specific one)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    found = None
    for line in doc.splitlines()[:4]:
        if not _SIG_START.match(line):
            continue
        depth, body = 0, ""
        for ch in line[line.index("(") + 1:]:
            if ch == ")" and depth == 0:
                break
            depth += (ch in "([{") - (ch in ")]}")
            body += ch
        found = body
    if found is None:
        return None
    names, depth, tok = [], 0, ""
    for ch in found.replace("\\*", "*") + ",":
        if ch == "," and depth == 0:
            tok = tok.split("=")[0].strip()
            if tok.startswith("**"):
                return "any"
            if tok not in ("", "/", "*"):
                names.append(tok.split()[-1].lstrip("*"))
            tok = ""
            continue
        depth += (ch in "([{") - (ch in ")]}")
        tok += ch
    return names


def real_params(obj):
    """The keyword names ``obj`` accepts, or "any" (it takes **kwargs)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        names = _doc_params(obj)
        if names is None:
            init = getattr(obj, "__init__", None)
            names = _doc_params(init) if init is not None else None
        if names is None and isinstance(obj, type):
            names = _doc_params(obj)
        assert names is not None, f"no signature for {obj!r}"
        return names
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return "any"
    return [p.name for p in sig.parameters.values() if p.kind is not p.VAR_POSITIONAL]


def fake_params(obj):
    if hasattr(obj, "keywords") and not inspect.isclass(obj):
        return list(obj.keywords)
    sig = inspect.signature(obj)
    return [p.name for p in sig.parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]


def assert_keywords_exist(name, fake_obj, real_obj):
    mine, theirs = fake_params(fake_obj), real_params(real_obj)
    if theirs == "any":
        return
    missing = [k for k in mine if k not in theirs and k != "self"]
    assert not missing, f"{name}: keywords {missing} are not CuPy's (it takes {theirs})"


def documented_attributes(cls):
    """Attributes a Cython class documents (``~Cls.name`` under Attributes)."""
    doc = cls.__doc__ or ""
    return set(re.findall(r"~\w+\.(\w+)", doc))


# -- the fake's surface against the real one -------------------------------------------

_MODULES = ["", "cuda", "cuda.runtime", "cuda.nccl"]
_CLASSES = {   # fakecupy class -> real path (some reached only as return values)
    "ndarray": "ndarray",
    "Stream": "cuda.Stream", "Event": "cuda.Event", "Device": "cuda.Device",
    "MemoryPointer": "cuda.MemoryPointer", "PinnedMemoryPointer": "cuda.PinnedMemoryPointer",
    "Graph": "cuda.graph.Graph",
}
# Python-object machinery every class has; not part of an API.
_OBJECT_NAMES = {"__dict__", "__module__", "__weakref__", "__doc__", "__qualname__",
                 "__slots__", "__init__", "__annotations__", "__firstlineno__",
                 "__static_attributes__", "keywords"}


def _resolve(mod, path):
    """``mod.a.b`` for path "a.b"; a submodule that is reached only by
    importing it (``from cupy.cuda import nccl``) is imported -- from the
    fake's own table when ``mod`` is the fake."""
    obj = mod
    fake_modules = getattr(mod, "_submodules", None)
    for part in filter(None, path.split(".")):
        if inspect.ismodule(obj) and not hasattr(obj, part):
            name = f"{obj.__name__}.{part}"
            if fake_modules is not None:
                if name not in fake_modules:
                    raise AttributeError(name)
                obj = fake_modules[name]
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    obj = importlib.import_module(name)
            except ImportError:
                raise AttributeError(name) from None
            continue
        obj = getattr(obj, part)
    return obj


def _public(ns):
    return sorted(n for n in ns if not n.startswith("_") and n != "keywords")


@pytest.mark.parametrize("path", _MODULES)
def test_fake_module_names_exist_in_cupy(fake, real, path):
    cp, _, _ = fake
    mine = _resolve(cp, path)
    theirs = _resolve(real, path)
    def exists(n):
        if hasattr(theirs, n):
            return True
        try:      # a submodule CuPy loads on import only (``from cupy.cuda import nccl``)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(f"{theirs.__name__}.{n}")
            return True
        except ImportError:
            return False
    missing = [n for n in _public(vars(mine)) if not exists(n)]
    assert not missing, f"cupy.{path or ''}: the fake offers {missing}, real CuPy has none"


@pytest.mark.parametrize("path", _MODULES)
def test_fake_function_keywords_are_cupys(fake, real, path):
    cp, _, _ = fake
    mine, theirs = _resolve(cp, path), _resolve(real, path)
    for n in _public(vars(mine)):
        obj = getattr(mine, n)
        if inspect.ismodule(obj) or inspect.isclass(obj) or not callable(obj):
            continue
        assert_keywords_exist(f"cupy.{path + '.' if path else ''}{n}", obj, getattr(theirs, n))


@pytest.mark.parametrize("fake_path", sorted(_CLASSES))
def test_fake_class_members_exist_in_cupy(fake, real, fake_path):
    _, fakecupy, _ = fake
    mine, theirs = getattr(fakecupy, fake_path), _resolve(real, _CLASSES[fake_path])
    names = set()
    for klass in type.mro(mine):
        if klass in (object, bytearray):
            continue
        names |= {n for n in vars(klass) if n not in _OBJECT_NAMES and not
                  (n.startswith("_") and not n.startswith("__"))}
    documented = documented_attributes(theirs)
    missing = sorted(n for n in names if not hasattr(theirs, n) and n not in documented)
    assert not missing, f"{fake_path}: the fake offers {missing}, real CuPy has none"
    for n in sorted(names):
        obj = inspect.getattr_static(mine, n)
        if isinstance(obj, (property, staticmethod, classmethod)) or not callable(obj):
            continue
        if n.startswith("__"):
            continue      # operators: existence checked above; CuPy's take what NumPy's do
        assert_keywords_exist(f"{fake_path}.{n}", obj, getattr(theirs, n))


def test_fake_instance_attributes_exist_in_cupy(fake, real):
    """Attributes the fake sets in ``__init__`` (``Stream.ptr``, ``Device.id``)."""
    cp, _, _ = fake
    for fake_path, obj in [("Stream", cp.cuda.Stream()), ("Event", cp.cuda.Event()),
                           ("Device", cp.cuda.Device(0)), ("MemoryPointer", cp.empty(3).data)]:
        theirs = _resolve(real, _CLASSES[fake_path])
        documented = documented_attributes(theirs)
        missing = [n for n in _public(vars(obj)) if not hasattr(theirs, n) and n not in documented]
        assert not missing, f"{fake_path} instances carry {missing}, real CuPy's do not"


def test_flags_are_cupys(fake, real):
    cp, _, _ = fake
    from cupy._core.flags import Flags
    mine = cp.empty((2, 3)).flags
    assert {n for n in dir(mine) if not n.startswith("_")} <= set(dir(Flags))
    with pytest.raises(AttributeError):
        mine.writeable                                  # noqa: B018 -- CuPy has none


def test_raw_module_and_kernel_match_cupys(fake, real):
    _, _, emu = fake
    assert_keywords_exist("RawModule", emu.RawModule, real.RawModule)
    assert_keywords_exist("RawModule.get_function", emu.RawModule.get_function,
                          real.RawModule.get_function)
    assert_keywords_exist("RawKernel.__call__", emu.Kernel.__call__, real.RawKernel.__call__)


# -- what the fake refuses, as CuPy does ------------------------------------------------

def test_fake_refuses_what_cupy_refuses(fake):
    cp, fakecupy, _ = fake
    a = cp.zeros((2, 3), np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        a[...] = np.ones((2, 3), np.float32)            # a host array as the value
    a[...] = np.float32(2.0)                            # a scalar is fine
    a[...] = cp.ones((2, 3), np.float32)                # so is a device array
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    with pytest.raises(TypeError):
        a + np.ones((2, 3), np.float32)
    with pytest.raises(AttributeError):
        a.flags.writeable                               # noqa: B018
    with pytest.raises(AttributeError):
        cp.einsum                                       # noqa: B018 -- no fall-through
    with pytest.raises(AttributeError):
        a.tobytes                                       # noqa: B018
    with pytest.raises(TypeError):
        np.linalg.norm(a)                               # not dispatched to the fake
    with pytest.raises(TypeError, match="NumPy array"):
        cp.matmul(a.T, np.ones((2, 3), np.float32))     # a host operand


def test_basic_indexing_is_a_view_as_in_cupy(fake):
    # CuPy's a[i, j] is a 0-d view (NumPy's a scalar copy): the fake gave a
    # copy, so a write through it reached the array on a GPU only
    cp, _, _ = fake
    a = cp.zeros((2, 3), np.float32)
    e = a[1, 2]
    assert isinstance(e, cp.ndarray) and e.shape == ()
    e[...] = 5.0
    a[0][1:][...] = 3.0
    a[:, None, 0][...] = 1.0
    assert a.get().tolist() == [[1.0, 3.0, 3.0], [1.0, 0.0, 5.0]]


def test_launch_dimensions_are_tuples_as_in_cupy(fake, real):
    """CuPy's Function.__call__ declares ``tuple grid, tuple block``: an int
    or a list raises TypeError there (checked on the wheel, which raises it
    before it needs a GPU); the emulator's kernels and fastgrad's launch
    check raise the same."""
    from types import SimpleNamespace

    from cupy.cuda import function

    from fastgrad.kernels.cuda import _module
    _, _, emu = fake
    cupys = function.Function.__new__(function.Function)
    for grid, block, what in ((7, (256,), "grid"), ([3], (256,), "grid"),
                              ((3,), [32], "block")):
        with pytest.raises(TypeError) as want:
            cupys(grid, block, ())
        message = str(want.value)
        assert message.startswith(f"Argument '{what}' has incorrect type"), message
        with pytest.raises(TypeError, match=re.escape(message)):
            emu.Kernel._run(SimpleNamespace(name="k"), grid, block, ())
        with pytest.raises(TypeError, match=re.escape(message)):
            _module.check_launch("k", grid, block)


def test_fake_refuses_async_copies_during_capture(fake):
    """Stricter than CuPy, on purpose (fakecupy._refuse_during_capture): a
    captured copy from pinned memory would keep one staging slot's address
    in the graph."""
    cp, fakecupy, _ = fake
    dev = cp.zeros(4, np.float64)
    pinned = cp.cuda.alloc_pinned_memory(32)
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        s.begin_capture()
        with pytest.raises(RuntimeError, match="capturing"):
            dev.data.copy_from_host_async(pinned.ptr, 32, s)
        with pytest.raises(RuntimeError, match="Invalidated"):
            s.end_capture()
        s.begin_capture()
        with pytest.raises(RuntimeError, match="capturing"):
            dev.data.copy_to_host_async(pinned.ptr, 32, s)
        with contextlib.suppress(RuntimeError):
            s.end_capture()


# -- the package's own CuPy calls against the real wheel ---------------------------------

# Names that hold CuPy (or the array module of a CUDA model) in the package.
_CUPY_ROOTS = {"cupy", "cp", "xp", "_cupy", "_xp"}


def _chain(node):
    """``a.b.c`` as ["a", "b", "c"] (``self._cupy.x`` as ["_cupy", "x"]), else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Attribute):
        return None
    else:
        return None
    parts.reverse()
    if len(parts) > 2 and parts[0] == "self":
        parts = parts[1:]
    return parts


def _package_sources():
    for d in ("fastgrad", "kernels"):
        yield from sorted(glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True))


def _cupy_uses():
    """(file, line, dotted cupy name, keyword names) of every CuPy use."""
    uses = []
    for path in _package_sources():
        tree = ast.parse(open(path, encoding="utf-8").read(), path)
        aliases = {}          # local name -> dotted cupy path
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "cupy":
                        aliases[(a.asname or a.name).split(".")[0]] = \
                            a.name if a.asname else "cupy"
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cupy":
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        calls = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            parts = _chain(node)
            if not parts:
                continue
            root = parts[0]
            if root in aliases:
                dotted = aliases[root].split(".") + parts[1:]
            elif root in _CUPY_ROOTS:
                dotted = ["cupy"] + parts[1:]
            elif root == "_nccl":
                dotted = ["cupy", "cuda", "nccl"] + parts[1:]
            else:
                continue
            call = calls.get(id(node))
            kws = [k.arg for k in call.keywords if k.arg] if call is not None else []
            uses.append((os.path.relpath(path, ROOT), node.lineno, ".".join(dotted), kws))
    return uses


def _nccl_has(name):
    """CuPy's NCCL binding imports only where libnccl is installed; its
    Python-visible names are in the compiled module all the same."""
    import cupy_backends
    libs = glob.glob(os.path.join(os.path.dirname(cupy_backends.__file__), "cuda", "libs",
                                  "nccl*.so"))
    return bool(libs) and name.encode() in open(libs[0], "rb").read()


def _problems(real, uses):
    seen, problems = set(), []
    for path, line, dotted, kws in uses:
        parts = dotted.split(".")
        if parts[:3] == ["cupy", "cuda", "nccl"] and len(parts) > 3:
            if not _nccl_has(parts[3]):
                problems.append(f"{path}:{line}: {dotted} is not in CuPy's NCCL binding")
            continue
        try:
            obj = _resolve(real, ".".join(parts[1:]))
        except AttributeError:
            problems.append(f"{path}:{line}: {dotted} does not exist in CuPy {real.__version__}")
            continue
        if kws and (dotted, tuple(kws)) not in seen:
            seen.add((dotted, tuple(kws)))
            theirs = real_params(obj)
            bad = [k for k in kws if theirs != "any" and k not in theirs]
            if bad:
                problems.append(f"{path}:{line}: {dotted}(..., {', '.join(bad)}=...) -- "
                                f"CuPy's takes {theirs}")
    return problems


def test_package_cupy_calls_exist_in_cupy(real):
    uses = _cupy_uses()
    assert len(uses) > 50, "the scan found too few CuPy uses: is it still reading the package?"
    problems = _problems(real, uses)
    assert not problems, "\n".join(problems)


def test_scan_catches_what_cupy_lacks(real, tmp_path, monkeypatch):
    """The scan itself can fail: a name or a keyword CuPy lacks is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import cupy as cp\n\ncp.no_such_function(1)\n"
                   "cp.zeros(3, no_such_keyword=1)\ncp.cuda.nccl.NoSuchThing\n")
    monkeypatch.setattr(sys.modules[__name__], "_package_sources", lambda: [str(bad)])
    problems = "\n".join(_problems(real, _cupy_uses()))
    assert "cupy.no_such_function does not exist" in problems
    assert "no_such_keyword" in problems
    assert "NoSuchThing" in problems


# Array arithmetic CuPy has and the emulated one does not offer: fastgrad's
# CUDA path runs its own kernels for these (kernels/cuda/arrays.py).
_NOT_OFFERED = ("add", "subtract", "multiply", "sqrt", "exp", "maximum", "isfinite", "sum",
                "where", "take", "copyto", "stack", "concatenate", "dot", "arange", "all",
                "any", "round", "array_equal", "allclose", "get_array_module", "float32")


def test_fake_offers_only_the_backend_surface(fake):
    """The fake is allocation, copies, launch, GEMM and streams: array
    arithmetic is refused (tools/cuda_emulator/README.md), so a library
    change that reaches for CuPy's array library fails here and under the
    emulator instead of quietly growing the fake."""
    cp, _, _ = fake
    a = cp.zeros(3)
    for op in (lambda: a + a, lambda: a - a, lambda: a * 2, lambda: a ** 2, lambda: a == a,
               lambda: a != 0, lambda: a < a, lambda: np.sqrt(a), lambda: np.sum(a),
               lambda: np.take(a, [0])):
        with pytest.raises(TypeError):
            op()
    with pytest.raises(TypeError):
        a += a
    for name in _NOT_OFFERED:
        assert not hasattr(cp, name), name
    for name in ("mean", "view", "item", "sum", "max", "min", "argmax", "all"):
        assert not hasattr(a, name), name


def test_package_cupy_uses_are_the_fake_surface(fake):
    """Every CuPy name the package itself uses is one the fake offers (the
    NCCL binding aside: the fake is a wheel without libnccl), so the
    package's contact with CuPy is the backend's surface."""
    cp, _, _ = fake
    missing = []
    for path, line, dotted, _ in _cupy_uses():
        parts = dotted.split(".")
        if parts[:3] == ["cupy", "cuda", "nccl"]:
            continue
        try:
            _resolve(cp, ".".join(parts[1:]))
        except AttributeError:
            missing.append(f"{path}:{line}: {dotted}")
    assert not missing, "the package uses CuPy beyond the emulated surface:\n" + \
        "\n".join(missing)
