"""Loading, compiling and launching the CUDA sources of this package.

Each ``*.cu`` file becomes one ``cupy.RawModule``, built on first use (once
per process and device) from the file's text read through
``importlib.resources`` (the wheel ships the sources as package data).
Local includes (``#include "common.cuh"``, ``"blocks.cuh"``, ...) are pasted
in by text, once each, because NVRTC cannot read include files from a
package reliably (zip installs) and cannot include system headers at all.
CuPy caches the compiled binaries on disk (``~/.cupy/kernel_cache``, keyed
by source, options and architecture), so only the first process after an
install or upgrade pays for NVRTC.

The activations are generated, not written: ``activation_table.cuh`` (the
enum of activation codes, one ``fg::Act<NAME>`` specialisation per row of
``kernels/spec.py`` ``ACTIVATIONS`` from its CUDA forms, and
``FG_EACH_ACTIVATION``) is generated from the spec (``activation_source``)
at load time, with one specialisation per activation registered with CUDA
forms added; its committed copy holds the built-ins, so that every .cu also
compiles on its own (``write_activation_table`` rewrites it; a test fails
while it is stale).  ``emit(directory)`` writes
the sources exactly as NVRTC gets them, for nvcc's compile check.

Templates are instantiated by ``name_expressions`` (``"fg_update<float, 1>"``),
listed below per file.  Options: ``--std=c++17`` and ``--fmad=false`` (a*b+c
rounded twice, as on the CPU: see common.cuh).  CuPy appends ``-ftz=true``
after the caller's options for every RawModule, and NVRTC honours the last
one, so float32 subnormals flush to zero on the GPU (inputs read as zero,
results written as zero); float64 is never flushed.  float32 kernels are
therefore bitwise the CPU's only when no float32 input, intermediate or
result is subnormal (see common.cuh).

Every kernel ``kernel()`` returns checks its launch shape against CUDA's
limits (``check_launch``) and raises ValueError before launching a shape
the device would refuse.
"""
import importlib.resources
import pathlib
import re

import cupy
import numpy as np

from ..spec import ACTIVATIONS, N_ACTIVATIONS, N_RULES, NEEDS_Z

_OPTIONS = ("--std=c++17", "--fmad=false")
_INCLUDE = re.compile(r'^\s*#include\s+"([A-Za-z0-9_.]+)"\s*$', re.MULTILINE)

_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# element types of the device-array helpers (arrays.cu)
ARRAY_CTYPES = {**_DTYPES, np.dtype(np.int64): "long long", np.dtype(np.int32): "int"}
# N_ACTIVATIONS, N_RULES: kernels/spec.py (the instantiation lists below
# cover every code there; the C++ enums are checked against it).

# Activations registered at run time with CUDA forms (fastgrad.registry sets
# them through set_registered_activations): code -> (needs_z, f, df), f and
# df CUDA C expressions of T z, a, alpha.  Each becomes an fg::Act<code>
# specialisation generated like a built-in's, instantiated like one.
_REGISTERED = {}


def _act_codes():
    return list(range(N_ACTIVATIONS)) + sorted(_REGISTERED)


def needs_z(code):
    """True when activation ``code`` (built-in or registered) keeps z."""
    code = int(code)
    return code in NEEDS_Z or (code in _REGISTERED and _REGISTERED[code][0])


def _body(form):
    """A CUDA form as a function body: an expression is returned; a form
    with its own ``return`` statements is pasted as it is."""
    if re.search(r"\breturn\b", form):
        return "\n".join("        " + line for line in form.splitlines())
    return f"        return ({form});"


def _act_struct(tag, keep_z, f, df):
    return "\n".join([
        f"template <> struct Act<{tag}> {{",
        f"    static constexpr bool needs_z = {'true' if keep_z else 'false'};",
        "    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)",
        "    {",
        "        (void)alpha;",
        _body(f),
        "    }",
        "    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)",
        "    {",
        "        (void)a; (void)z; (void)alpha;",
        _body(df),
        "    }",
        "};"])


def activation_source(registered=True):
    """The C++ of ``activation_table.cuh``, generated from kernels/spec.py
    ACTIVATIONS (and, with ``registered``, the registered activations' CUDA
    forms): the enum of codes, one ``fg::Act`` specialisation per
    activation, and ``FG_EACH_ACTIVATION``, the list nvcc's explicit
    instantiations expand."""
    names = [a.name.upper() for a in ACTIVATIONS]
    extra = sorted(_REGISTERED.items()) if registered else []
    out = [_TABLE_HEADER,
           "#ifndef FASTGRAD_ACTIVATION_TABLE_CUH",
           "#define FASTGRAD_ACTIVATION_TABLE_CUH",
           "namespace fg {",
           "enum { " + ", ".join(f"{n} = {code}" for code, n in enumerate(names)) + " };"]
    for a, n in zip(ACTIVATIONS, names):
        out.append(_act_struct(n, a.needs == "z", *a.cuda))
    for code, (keep_z, f, df) in extra:
        out.append(_act_struct(code, keep_z, f, df))
    out.append("}  // namespace fg")
    each = [f"M(T, fg::{n})" for n in names] + [f"M(T, {c})" for c, _ in extra]
    out.append("#define FG_EACH_ACTIVATION(M, T) " + " ".join(each))
    out.append("#endif  // FASTGRAD_ACTIVATION_TABLE_CUH")
    return "\n".join(out) + "\n"


_TABLE_HEADER = """\
// GENERATED from kernels/spec.py ACTIVATIONS by kernels/cuda/_module.py: do
// not edit.  Regenerate after changing the table with
//   python -c "from fastgrad.kernels.cuda import _module; _module.write_activation_table()"
// (tests/test_registry.py fails while it is stale).  The loader does not read
// this file: it generates the same text at run time, with the activations
// registered with CUDA forms added; the file is here so that every .cu
// compiles on its own with nvcc."""


def write_activation_table():
    """Rewrite ``activation_table.cuh`` (the built-in activations) from the
    spec; returns its path."""
    path = pathlib.Path(__file__).with_name("activation_table.cuh")
    path.write_text(activation_source(registered=False), encoding="utf-8")
    return path


def set_registered_activations(table):
    """Compile ``table`` ({code: (needs_z, f_expr, df_expr)}) into the
    activation kernels from the next launch on (modules are rebuilt)."""
    global NAMES
    table = {int(c): (bool(v[0]), str(v[1]), str(v[2])) for c, v in table.items()}
    if table == _REGISTERED:
        return
    _REGISTERED.clear()
    _REGISTERED.update(table)
    NAMES = _names()
    _modules.clear()
    _kernels.clear()


def _names():
    """name_expressions per source file (every instantiation a wrapper uses)."""
    acts, losses, reduce_, optim, multi = [], [], [], [], []
    for t in _DTYPES.values():
        for a in _act_codes():
            acts += [f"fg_bias_act<{t}, {a}>", f"fg_bias_act_grad<{t}, {a}>"]
        acts.append(f"fg_colsum<{t}>")
        losses += [f"fg_softmax_xent<{t}>", f"fg_mse<{t}>", f"fg_bce_with_logits<{t}>"]
        losses += [f"fg_softmax_xent_ex<{t}>", f"fg_bce_with_logits_ex<{t}>", f"fg_mse_ex<{t}>"]
        reduce_.append(f"fg_seg_sumsq_partial<{t}>")
        optim += [f"fg_update<{t}, {r}>" for r in range(N_RULES)]
        multi.append(f"fg_mt_sumsq_partial<{t}>")
        multi += [f"fg_mt_update<{t}, {r}>" for r in range(N_RULES)]
    losses += ["fg_mean<double>", "fg_xent_weight_sum<double>", "fg_sum_over<double>"]
    reduce_.append("fg_seg_sumsq_final<double>")
    optim.append("fg_clip_control<double>")
    gemm = [f"fg_gemm<{t}, {ta}, {tb}>" for t in _DTYPES.values()
            for ta, tb in ((0, 0), (1, 0), (0, 1))]
    arrays = [f"fg_{k}<{t}>" for t in ARRAY_CTYPES.values()
              for k in ("add_into", "copy_into", "copy_if", "gather_rows")]
    return {"arrays.cu": arrays, "activations.cu": acts, "losses.cu": losses, "reduce.cu": reduce_,
            "optim.cu": optim, "multi_tensor.cu": multi, "gemm.cu": gemm, **_epilogue_names()}


def _epilogue_names():
    """name_expressions of the epilogue sources (blocks, norm, wnorm)."""
    blocks, norm, wnorm = [], [], []
    for t in _DTYPES.values():
        for a in _act_codes():
            blocks += [f"fg_block_fwd<{t}, {a}>", f"fg_block_grad<{t}, {a}>"]
            norm += [f"fg_norm_fwd<{t}, {a}>", f"fg_norm_grad_unit<{t}, {a}>"]
        blocks += [f"fg_dropout_mask<{t}>", f"fg_colsum_cast<{t}>"]
        norm += [f"fg_{k}<{t}>" for k in ("layer_stats", "batch_stats_partial", "batch_stats",
                                          "batch_eval_stats", "layer_grad_rows",
                                          "norm_grad_input", "colsum_cast")]
        wnorm += [f"fg_{k}<{t}>" for k in ("coldot_partial", "wn_dg", "wn_apply", "wn_grad")]
    wnorm.append("fg_wn_inv_norm<double>")
    blocks.append("fg_commit_forward")
    return {"blocks.cu": blocks, "norm.cu": norm, "wnorm.cu": wnorm}


NAMES = _names()
_modules = {}      # (file, device id) -> RawModule
_kernels = {}      # (file, name, device id) -> RawKernel


def source(filename):
    """The text of ``filename`` with its local includes pasted in (once each),
    ``activation_table.cuh`` generated from the spec and the registered
    activations: what NVRTC compiles."""
    pkg = importlib.resources.files(__package__)
    seen = set()

    def expand(text):
        def repl(m):
            name = m.group(1)
            if name in seen:
                return ""
            seen.add(name)
            if name == "activation_table.cuh":
                # generated now: the built-ins and the registered activations
                return activation_source()
            return expand(pkg.joinpath(name).read_text(encoding="utf-8"))
        return _INCLUDE.sub(repl, text)

    return expand(pkg.joinpath(filename).read_text(encoding="utf-8"))


def emit(directory):
    """Write ``source(f)`` of every ``*.cu`` of this package into
    ``directory`` (created if missing), under the same names: the exact
    sources NVRTC compiles, self-contained, for nvcc's compile check
    (.ci/run: ``python -c "from fastgrad.kernels.cuda import _module;
    _module.emit('DIR')"``).  Returns the paths written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pkg = importlib.resources.files(__package__)
    written = []
    for entry in sorted(pkg.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".cu"):
            path = directory / entry.name
            path.write_text(source(entry.name), encoding="utf-8")
            written.append(path)
    return written


def module(filename):
    """The RawModule of ``filename`` on the current device (built lazily)."""
    key = (filename, cupy.cuda.runtime.getDevice())
    mod = _modules.get(key)
    if mod is None:
        mod = _modules[key] = cupy.RawModule(code=source(filename), options=_OPTIONS,
                                             name_expressions=NAMES[filename])
    return mod


# CUDA's launch limits (every GPU since compute capability 3.0).  Kernels
# whose row count sets grid y grid-stride over their row blocks, and their
# wrappers cap grid y at MAX_GRID_Y (tests lower it to reach that loop on
# small shapes; check_launch reads it at each launch).
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535
MAX_GRID_Z = 65535
MAX_BLOCK = (1024, 1024, 64)
MAX_BLOCK_THREADS = 1024


def _xyz(dims, what):
    """(x, y, z) of a launch dimension given as CuPy takes it: a tuple of one
    to three ints, missing ones 1 (CuPy's ``Function.__call__`` declares
    ``tuple grid, tuple block``: an int or a list is a TypeError there)."""
    if type(dims) is not tuple:
        raise TypeError(f"Argument '{what}' has incorrect type (expected tuple, got "
                        f"{type(dims).__name__})")
    n = len(dims)
    if n == 1:
        return dims[0], 1, 1
    if n == 2:
        return dims[0], dims[1], 1
    if n == 3:
        return dims
    raise ValueError(f"a launch dimension has 1 to 3 components, got {dims}")


def _launch_problem(grid, block):
    """The first limit a (grid, block) launch breaks, in words."""
    limits = (("grid x", grid[0], MAX_GRID_X), ("grid y", grid[1], MAX_GRID_Y),
              ("grid z", grid[2], MAX_GRID_Z), ("block x", block[0], MAX_BLOCK[0]),
              ("block y", block[1], MAX_BLOCK[1]), ("block z", block[2], MAX_BLOCK[2]))
    for what, got, most in limits:
        if not 1 <= got <= most:
            return f"{what} must be in [1, {most}], got {got}"
    return (f"a block has at most {MAX_BLOCK_THREADS} threads, got "
            f"{block[0]} x {block[1]} x {block[2]} = {block[0] * block[1] * block[2]}")


def check_launch(name, grid, block):
    """Raise ValueError naming kernel ``name`` and the limit when ``grid`` or
    ``block`` is outside what CUDA can launch."""
    gx, gy, gz = _xyz(grid, "grid")
    bx, by, bz = _xyz(block, "block")
    if not (1 <= gx <= MAX_GRID_X and 1 <= gy <= MAX_GRID_Y and 1 <= gz <= MAX_GRID_Z
            and 1 <= bx and 1 <= by and 1 <= bz and bx * by * bz <= MAX_BLOCK_THREADS
            and bx <= MAX_BLOCK[0] and by <= MAX_BLOCK[1] and bz <= MAX_BLOCK[2]):
        g, b = tuple(int(v) for v in (gx, gy, gz)), tuple(int(v) for v in (bx, by, bz))
        raise ValueError(f"cannot launch {name} with grid {g}, block {b}: "
                         f"{_launch_problem(g, b)} (CUDA's launch limits)")


class CheckedKernel:
    """A compiled kernel whose launches are checked by ``check_launch``
    first: a launch CUDA would refuse (a grid that grew with the data past
    65535 blocks in y, say) raises a ValueError saying which kernel and
    which limit, instead of a driver error after the fact or nothing at
    all.  Other attributes are the wrapped kernel's."""

    __slots__ = ("kernel", "name")

    def __init__(self, kernel, name):
        self.kernel = kernel
        self.name = name

    def __call__(self, grid, block, args, **kwargs):
        check_launch(self.name, grid, block)
        return self.kernel(grid, block, args, **kwargs)

    def __getattr__(self, attr):
        if attr in CheckedKernel.__slots__:      # not set yet (a copy): no recursion
            raise AttributeError(attr)
        return getattr(self.kernel, attr)


def kernel(filename, name):
    """One instantiated kernel, e.g. ``kernel("optim.cu", "fg_update<float, 1>")``,
    as a ``CheckedKernel``."""
    key = (filename, name, cupy.cuda.runtime.getDevice())
    k = _kernels.get(key)
    if k is None:
        k = _kernels[key] = CheckedKernel(module(filename).get_function(name), name)
    return k


_scratch = {}      # (name, device id) -> float64 device array


def scratch(name, size=1):
    """A float64 device array nobody reads back, one per name and device:
    the target of optional outputs (a status flag, an unmatched step
    count).  Allocated once, outside any graph capture."""
    key = (name, cupy.cuda.runtime.getDevice())
    buf = _scratch.get(key)
    if buf is None:
        buf = _scratch[key] = cupy.zeros(size, np.float64)
    return buf


def ctype(dtype):
    """"float" or "double" for a float32/float64 dtype; TypeError otherwise."""
    try:
        return _DTYPES[np.dtype(dtype)]
    except KeyError:
        raise TypeError(f"CUDA kernels take float32 or float64, got {np.dtype(dtype)}") from None


# Elementwise launches: 256 threads, grid-stride; the cap keeps a few waves
# of blocks on the largest GPUs without launching millions of tiny blocks.
THREADS = 256
MAX_BLOCKS = 8192
# Must match the .cu files.
RED_THREADS = 256          # common.cuh fg::RED_THREADS
GRAD_ROWS = 64             # activations.cu FG_GRAD_ROWS
SUMSQ_CHUNK = 8192         # common.cuh FG_SUMSQ_CHUNK
# Column sums of the epilogue kernels (blocks.cuh): blocks of (32, 8)
# threads, each over COL_ROWS rows of 32 columns.
TILE = (32, 8)             # blocks.cuh fg::TILE_COLS, fg::TILE_ROWS
COL_ROWS = 64              # blocks.cuh fg::COL_ROWS
# Blocks of the elementwise losses' first reduction level: a function of n
# only (never of the GPU), so the float64 loss is bitwise reproducible
# across runs and devices.
LOSS_MAX_BLOCKS = 1024

NULL = np.uint64(0)        # a null pointer argument


def blocks(n, cap=MAX_BLOCKS):
    return int(max(1, min(cap, -(-int(n) // THREADS))))


def launch_elementwise(filename, name, n, args):
    """Launch the grid-stride kernel ``name`` of ``filename`` over ``n`` items
    (``blocks(n)`` blocks of ``THREADS``); nothing when ``n`` is 0."""
    if n:
        kernel(filename, name)((blocks(n),), (THREADS,), args)


def cover(n):
    """Blocks of THREADS giving each of ``n`` items its own thread (no cap:
    for kernels that are not grid-stride, e.g. one thread a column)."""
    return int(max(1, -(-int(n) // THREADS)))


def i64(x):
    return np.int64(x)


def f64(x):
    return np.float64(x)


def u64(x):
    """A 64-bit unsigned kernel argument (dropout keys and thresholds)."""
    return np.uint64(x)


def flag(x):
    """A boolean kernel argument, passed as a C ``int``."""
    return np.int32(1 if x else 0)


def col_grid(rows, cols):
    """(grid, block) of a column-sum pass over a (rows, cols) array
    (blocks.cuh); at least one row block, which writes zeros for no rows."""
    nblk = max(1, -(-int(rows) // COL_ROWS))
    if nblk > MAX_GRID_Y:           # these kernels are not grid-stride in y
        raise ValueError(f"column sums over {rows} rows: at most {MAX_GRID_Y * COL_ROWS} supported")
    return (-(-int(cols) // TILE[0]), nblk), TILE
