"""Activation functions: one scalar function (and derivative) per activation,
and the fused elementwise passes of the dense layer.

An activation is an integer code (``kernels/spec.py``: ``CODES``, the row
of ``spec.ACTIVATIONS``).  Its scalar functions here are named after it:
``<name>(z, alpha)`` and ``d_<name>(a, z, alpha)``.  Each kernel branches on
the code ONCE, outside its loops, through a *ladder* (:func:`ladder`) built
from that table when this module loads: one branch per activation, each
running a generic loop with that activation's scalar function inlined into
it (by rows; a transcendental activation's passes over blocks of rows, which
take C-contiguous arrays alone), so the compiled loop bodies are
branch-free and vectorised and one compiled kernel per dtype serves every
activation.  A code outside the table raises ValueError in every ladder:
nothing falls through to a default.

Derivatives are written in terms of the saved output ``a`` or, for the
activations whose spec row says ``needs="z"`` (gelu, gelu_tanh, silu), the
pre-activation ``z``, as DESIGN.md's data layout asks.
NaN propagates through every forward (relu(NaN) is NaN, as in PyTorch), so the
non-finite guards downstream see it.

Activations registered at run time (``fastgrad.register_activation``) are
compiled into a private copy of these kernel modules (``fastgrad.registry``
explains how), whose ladders this module also builds, from
``_EXTRA_ACTIVATIONS`` of its package.
"""
import sys

import numpy as np
from numba import njit

from .. import spec
from ..spec import (CODES, DEFAULT_ALPHA, ELU, GELU, GELU_TANH, IDENTITY,  # noqa: F401
                    LEAKY_RELU, NEEDS_Z, RELU, SIGMOID, SILU, SOFTPLUS, TANH)
from . import mathfn
from ._jit import INLINE, JIT

_GELU_K = 0.7978845608028654      # sqrt(2 / pi)
_GELU_C = 0.044715
SOFTPLUS_THRESHOLD = 20.0        # torch's nn.Softplus default: z itself above it

like = mathfn.like


# --- forward: f(z) ------------------------------------------------------------

@njit(**INLINE)
def identity(z, alpha):
    return z


@njit(**INLINE)
def relu(z, alpha):
    return like(z, 0.0) if z < like(z, 0.0) else z


@njit(**INLINE)
def leaky_relu(z, alpha):
    return like(z, alpha) * z if z < like(z, 0.0) else z


@njit(**INLINE)
def elu(z, alpha):
    return like(z, alpha) * mathfn.expm1(z) if z <= like(z, 0.0) else z


@njit(**INLINE)
def sigmoid(z, alpha):
    one = like(z, 1.0)
    return one / (one + mathfn.exp(-z))


@njit(**INLINE)
def tanh(z, alpha):
    return mathfn.tanh(z)


@njit(**INLINE)
def softplus(z, alpha):
    # log(1 + e^z) = max(z, 0) + log1p(e^-|z|): finite for any finite z;
    # z itself above torch's threshold 20 (nn.Softplus(beta=1, threshold=20))
    zero = like(z, 0.0)
    sp = (z if z > zero else zero) + mathfn.log1p(mathfn.exp(-abs(z)))
    return z if z > like(z, SOFTPLUS_THRESHOLD) else sp


@njit(**INLINE)
def gelu(z, alpha):
    # exact: z Phi(z), Phi through erfc (not 1 + erf: no cancellation for
    # z << 0; kernels/cpu/mathfn.py gelu)
    return mathfn.gelu(z)


@njit(**INLINE)
def gelu_tanh(z, alpha):
    # tanh approximation: 0.5 z (1 + tanh(k (z + c z^3)))
    inner = like(z, _GELU_K) * (z + like(z, _GELU_C) * z * z * z)
    return like(z, 0.5) * z * (like(z, 1.0) + mathfn.tanh(inner))


@njit(**INLINE)
def silu(z, alpha):
    # z sigmoid(z), with sigmoid(z) = e / (1 + e) for z < 0 (e = exp(-|z|)):
    # exp never overflows, and z << 0 keeps its tiny value instead of -0.
    one = like(z, 1.0)
    e = mathfn.exp(-abs(z))
    return z * ((one if z >= like(z, 0.0) else e) / (one + e))


# --- derivative: f'(z) from the output a (or z, for needs="z") ------------------

@njit(**INLINE)
def d_identity(a, z, alpha):
    return like(a, 1.0)


@njit(**INLINE)
def d_relu(a, z, alpha):
    # a NaN passes the gradient on, as torch's (its test is a <= 0)
    return like(a, 0.0) if a <= like(a, 0.0) else like(a, 1.0)


@njit(**INLINE)
def d_leaky_relu(a, z, alpha):
    return like(a, 1.0) if a > like(a, 0.0) else like(a, alpha)


@njit(**INLINE)
def d_elu(a, z, alpha):
    return a + like(a, alpha) if a <= like(a, 0.0) else like(a, 1.0)


@njit(**INLINE)
def d_sigmoid(a, z, alpha):
    return a * (like(a, 1.0) - a)


@njit(**INLINE)
def d_tanh(a, z, alpha):
    return like(a, 1.0) - a * a


@njit(**INLINE)
def d_softplus(a, z, alpha):
    # sigmoid(z) = 1 - e^-a, exact for small a; 1 above the threshold (torch;
    # read from a, so also for z in (20 - 2.1e-9, 20], whose a exceeds 20)
    d = -mathfn.expm1(-a)
    return like(a, 1.0) if a > like(a, SOFTPLUS_THRESHOLD) else d


@njit(**INLINE)
def d_gelu(a, z, alpha):
    # Phi(z) + z phi(z): float32 with one exp shared by both terms, float64
    # through libm's erfc and exp (kernels/cpu/mathfn.py gelu_grad)
    return mathfn.gelu_grad(z)


@njit(**INLINE)
def d_gelu_tanh(a, z, alpha):
    # 0.5 (1 + t) + 0.5 z (1 - t^2) k (1 + 3 c z^2).  (1 - t^2) multiplies z
    # first, so a saturated unit gives 0 rather than inf * 0 for |z| to 1e6.
    one, half, k, c = like(z, 1.0), like(z, 0.5), like(z, _GELU_K), like(z, _GELU_C)
    t = mathfn.tanh(k * (z + c * z * z * z))
    return half * (one + t) + ((half * (one - t * t)) * z) * (k * (one + like(z, 3.0) * c * z * z))


@njit(**INLINE)
def d_silu(a, z, alpha):
    # s (1 + z (1 - s)), s = sigmoid(z).  1 - s = 1 / (1 + e) for z < 0 and
    # e / (1 + e) for z >= 0 (e = exp(-|z|)): neither side cancels.
    one = like(z, 1.0)
    e = mathfn.exp(-abs(z))
    pos = z >= like(z, 0.0)
    d = one + e
    s = (one if pos else e) / d
    return s * (one + z * ((e if pos else one) / d))


# --- the fused passes -----------------------------------------------------------
#
# The loops run in place on ONE array: LLVM vectorises a loop over two array
# arguments only behind a run-time check that they do not overlap, and called
# in place through two arguments that check fails and the scalar fallback
# runs, 4-8x slower (measured: bias+relu over 256x1024 float32, 143 us through
# two arguments, 18.5 us through one).

@njit(**JIT)
def _copy(src, dst):
    # An explicit loop, not ``dst[:] = src``: Numba's slice assignment drags
    # in the formatting of its shape-mismatch message, seconds of compile time.
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            dst[i, j] = src[i, j]


@njit(**INLINE)
def _bias_act_loop(y, b, alpha, f):
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            y[i, j] = f(y[i, j] + b[j], alpha)


# A transcendental activation's passes run f (or f') over blocks of rows as
# one flat run (the bias added, or db summed, row by row beside it while the
# block sits in L1): the vector loop's scalar remainder then comes once a
# block, not once a row.  At 512-bit vectors (kernels/wide_vectors.py) a row
# of 57 outputs left 9 of them to the scalar loop.  The memory-bound passes
# (spec.MEMORY_BOUND, MEMORY_BOUND_GRADIENT) keep the one pass per row.
# Either way every value is computed and rounded as before, and db summed
# in the same order (rows, or blocks of DB_ROWS rows: below): the same bits.
ROW_BLOCK = 2048          # outputs in a block of rows (one row at the least)


@njit(**INLINE)
def _rows_per_block(cols):
    return max(1, ROW_BLOCK // max(cols, 1))


@njit(**INLINE)
def _add_bias(y, b, i0, i1):
    for i in range(i0, i1):
        yi = y[i]
        for j in range(yi.shape[0]):
            yi[j] += b[j]


@njit(**INLINE)
def _bias_act_blocks(y, b, alpha, f):
    rows, cols = y.shape
    flat = y.reshape(rows * cols)
    block = _rows_per_block(cols)
    for i0 in range(0, rows, block):
        i1 = min(rows, i0 + block)
        _add_bias(y, b, i0, i1)
        run = flat[i0 * cols:i1 * cols]
        for k in range(run.shape[0]):
            run[k] = f(run[k], alpha)


@njit(**INLINE)
def _grad_loop(g, a, z, db, alpha, df, c0, c1):
    # Columns c0..c1-1: a team splits the pass by columns (kernels/cpu/
    # pass_team.py), each db[j] summed over the rows in order by one thread.
    # Row slices, not g[i, j] over range(c0, c1): Numba's negative-index
    # wraparound on such a j stops the loop vectorising (7x slower).
    dbs = db[c0:c1]
    for j in range(dbs.shape[0]):
        dbs[j] = 0
    for i in range(g.shape[0]):
        gi, ai, zi = g[i, c0:c1], a[i, c0:c1], z[i, c0:c1]
        for j in range(gi.shape[0]):
            t = gi[j] * df(ai[j], zi[j], alpha)
            gi[j] = t
            dbs[j] += t


@njit(**INLINE)
def _grad_rows(g, a, z, db, alpha, df):
    _grad_loop(g, a, z, db, alpha, df, 0, g.shape[1])


# The built-in gradients sum db in blocks of DB_ROWS rows: each block's
# rows summed in order into a row of partial sums, and the blocks' rows
# added in block order.  A team (kernels/cpu/pass_team.py) splits such
# a pass by blocks of rows, each thread writing its blocks' partial sums,
# and gets the serial pass's bits for any thread count.  Split by columns
# instead, the cache line at each share's edge was written by both threads
# in every row (2-16x slower; bench/RESULTS.md "Activation passes on the
# pool").
DB_ROWS = 8


@njit(**INLINE)
def _grad_row_block(g, a, z, part, alpha, df, i0, i1):
    # rows i0..i1-1 (a block), each in one pass: f', g, and its sum beside
    cols = g.shape[1]
    for j in range(cols):
        part[j] = 0
    for i in range(i0, i1):
        gi, ai, zi = g[i], a[i], z[i]
        for j in range(cols):
            t = gi[j] * df(ai[j], zi[j], alpha)
            gi[j] = t
            part[j] += t


@njit(**INLINE)
def _flat_rows(cols):
    # rows of a transcendental f''s flat run: whole blocks, ~ROW_BLOCK outputs
    return max(1, ROW_BLOCK // max(cols * DB_ROWS, 1)) * DB_ROWS


@njit(**INLINE)
def _df_flat(g, a, z, alpha, df, i0, i1):
    # g *= f' over rows i0..i1-1 as one flat run (the vector loop's
    # remainder once a run, not once a row)
    rows, cols = g.shape
    lo, hi = i0 * cols, i1 * cols
    gr = g.reshape(rows * cols)[lo:hi]
    ar, zr = a.reshape(rows * cols)[lo:hi], z.reshape(rows * cols)[lo:hi]
    for k in range(gr.shape[0]):
        gr[k] = gr[k] * df(ar[k], zr[k], alpha)


@njit(**INLINE)
def _sum_rows(g, part, i0, i1):
    cols = g.shape[1]
    for j in range(cols):
        part[j] = 0
    for i in range(i0, i1):
        gi = g[i]
        for j in range(cols):
            part[j] += gi[j]


@njit(**INLINE)
def _grad_row_range(g, a, z, parts, alpha, df, i0, i1):
    """Rows i0..i1-1 (i0 on a block's edge), the sums of their k-th block
    into ``parts[k]``: a team's share (kernels/cpu/pass_team.py)."""
    for r0 in range(i0, i1, DB_ROWS):
        _grad_row_block(g, a, z, parts[(r0 - i0) // DB_ROWS], alpha, df, r0,
                        min(i1, r0 + DB_ROWS))


@njit(**INLINE)
def _grad_flat_range(g, a, z, parts, alpha, df, i0, i1):
    """:func:`_grad_row_range` for a transcendental f': flat runs of whole
    blocks, then each block's rows summed."""
    per = _flat_rows(g.shape[1])
    for r0 in range(i0, i1, per):
        r1 = min(i1, r0 + per)
        _df_flat(g, a, z, alpha, df, r0, r1)
        for b0 in range(r0, r1, DB_ROWS):
            _sum_rows(g, parts[(b0 - i0) // DB_ROWS], b0, min(r1, b0 + DB_ROWS))


@njit(**INLINE)
def add_part(db, part):
    """db += part over db's length: the blocks' partial sums, in block order."""
    for j in range(db.shape[0]):
        db[j] += part[j]


# The serial passes: the first block's sums straight into db (no rows:
# zeros), each other block's into one row and added.
@njit(**INLINE)
def _grad_row_blocks(g, a, z, db, alpha, df):
    rows, cols = g.shape
    part = np.empty(cols if rows > DB_ROWS else 0, g.dtype)
    for i0 in range(0, max(rows, 1), DB_ROWS):
        _grad_row_block(g, a, z, db if i0 == 0 else part, alpha, df, i0,
                        min(rows, i0 + DB_ROWS))
        if i0 > 0:
            add_part(db, part)


@njit(**INLINE)
def _grad_flat_blocks(g, a, z, db, alpha, df):
    rows, cols = g.shape
    part = np.empty(cols if rows > DB_ROWS else 0, g.dtype)
    per = _flat_rows(cols)
    for r0 in range(0, max(rows, 1), per):
        r1 = min(rows, r0 + per)
        _df_flat(g, a, z, alpha, df, r0, r1)
        for b0 in range(r0, max(r1, 1), DB_ROWS):
            _sum_rows(g, db if b0 == 0 else part, b0, min(r1, b0 + DB_ROWS))
            if b0 > 0:
                add_part(db, part)


@njit(**INLINE)
def _bias_act_keep_z(z, b, out, alpha, f):
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            t = z[i, j] + b[j]
            z[i, j] = t
            out[i, j] = f(t, alpha)


@njit(**INLINE)
def _bias_act_keep_z_blocks(z, b, out, alpha, f):
    rows, cols = z.shape
    zf, of = z.reshape(rows * cols), out.reshape(rows * cols)
    block = _rows_per_block(cols)
    for i0 in range(0, rows, block):
        i1 = min(rows, i0 + block)
        _add_bias(z, b, i0, i1)
        zr, orun = zf[i0 * cols:i1 * cols], of[i0 * cols:i1 * cols]
        for k in range(zr.shape[0]):
            orun[k] = f(zr[k], alpha)


# --- the ladders: from the activation table to the loops ---------------------------

def _entries():
    """(code, forward, derivative, needs z) per activation these kernels
    serve: the built-ins of ``spec.ACTIVATIONS`` (scalar functions found
    here by name), then those the package was loaded with (registered ones,
    see the module docstring)."""
    here = globals()
    package = sys.modules[__package__]
    # A copy of the package built for the activations one model uses
    # (fastgrad.registry.cpu_kernels) compiles only their loops: every
    # other code raises, and a cold first step compiles far less.
    only = getattr(package, "_ONLY_ACTIVATIONS", None)
    table = [(code, here[a.name], here["d_" + a.name], a.needs == "z")
             for code, a in enumerate(spec.ACTIVATIONS) if only is None or code in only]
    extra = getattr(package, "_EXTRA_ACTIVATIONS", ())
    return tuple(table) + tuple(extra)


ENTRIES = _entries()


@njit(**INLINE)
def _unknown(act):
    raise ValueError("unknown activation code (not in kernels/spec.py ACTIVATIONS "
                     "nor registered)")


def ladder(loop, params, call, only_z=False, cheap_loop=None, cheap=spec.MEMORY_BOUND,
           pick=None):
    """An inlined ``ladder(<params>)`` that runs ``loop(<call>)`` once, for
    the activation whose code is the parameter ``act`` (``cheap_loop``,
    where given, for the codes in ``cheap``).

    ``call`` names the activation's functions ``{f}`` (forward), ``{df}``
    (derivative) and ``{keep_z}`` (``True`` when its derivative reads z, a
    constant in each branch).  ``only_z``: branches for the activations
    whose derivative reads z alone.  ``pick(code, keep_z)``, where given,
    names each code's loop instead (None: no branch for it).  The source is
    generated from ``ENTRIES`` -- an ``if``/``elif`` per code, then a
    ``raise`` -- and compiled with
    ``inline="always"``, so a kernel that calls the ladder is cached on disk
    as one function (``_jit`` keys the cache on the table's sources too).
    """
    if pick is None:
        def pick(code, keep_z):
            if only_z and not keep_z:
                return None
            return (cheap_loop or loop) if code in cheap else loop
    env = {"_unknown": _unknown}
    lines = [f"def _ladder({params}):"]
    for code, f, df, keep_z in ENTRIES:
        chosen = pick(code, keep_z)
        if chosen is None:
            continue
        env[f"_f{code}"], env[f"_df{code}"], env[f"_loop{code}"] = f, df, chosen
        args = call.format(f=f"_f{code}", df=f"_df{code}", keep_z=keep_z)
        run = f"_loop{code}"
        lines += [f"    {'if' if len(lines) == 1 else 'elif'} act == {code}:",
                  f"        {run}({args})"]
    lines += ["    else:" if len(lines) > 1 else "    if True:", "        _unknown(act)"]
    name = f"<fastgrad ladder of {getattr(loop, '__name__', params)}>"
    exec(compile("\n".join(lines), name, "exec"), env)
    return njit(**INLINE)(env["_ladder"])


def _needs_z_source():
    codes = [code for code, _, _, keep_z in ENTRIES if keep_z]
    test = " or ".join(f"act == {c}" for c in codes) or "False"
    env = {}
    exec(compile(f"def needs_z(act):\n    return {test}\n", "<fastgrad needs_z>", "exec"), env)
    return env["needs_z"]


needs_z = njit(**INLINE)(_needs_z_source())
needs_z.__doc__ = "True for the activations whose derivative reads ``z`` (``NEEDS_Z``)."


def _served_source():
    test = " or ".join(f"act == {code}" for code, *_ in ENTRIES) or "False"
    env = {}
    exec(compile(f"def served(act):\n    return {test}\n", "<fastgrad served>", "exec"), env)
    return env["served"]


served = njit(**INLINE)(_served_source())
served.__doc__ = ("True for the activation codes these kernels serve (where the ladders "
                  "raise for any other).")

_bias_act_ladder = ladder(_bias_act_blocks, "y, b, alpha, act", "y, b, alpha, {f}",
                          cheap_loop=_bias_act_loop)
# bias_act (the public kernel): a separate ``out`` keeps z for every
# activation; the step's bias_act_step compiles the needs-z loops alone.
_keep_z_ladder = ladder(_bias_act_keep_z_blocks, "z, b, out, alpha, act",
                        "z, b, out, alpha, {f}", cheap_loop=_bias_act_keep_z)
_needs_z_ladder = ladder(_bias_act_keep_z_blocks, "z, b, out, alpha, act",
                         "z, b, out, alpha, {f}", only_z=True)
# The gradients: built-in ones sum db in blocks of rows (DB_ROWS),
# registered ones by rows.  A registered derivative may return
# float64 on float32 arrays (a float64 constant or alpha in it): the
# per-row loop adds that unrounded value into db, as the team's column loop
# does; the blocked loops would add g's rounded one.
_REGISTERED = frozenset(code for code, *_ in ENTRIES if code >= spec.FIRST_CUSTOM_CODE)


def blocks_db(code):
    """Whether the gradient of activation ``code`` sums db in blocks of
    ``DB_ROWS`` rows (a built-in derivative: a team splits the pass by those
    blocks) rather than over all rows in order (a registered one: a team
    splits it by columns, if it reads z)."""
    return code not in _REGISTERED


def _serial_gradient(code, keep_z):
    if blocks_db(code):
        return _grad_row_blocks if code in spec.MEMORY_BOUND_GRADIENT else _grad_flat_blocks
    return _grad_rows


_grad_ladder = ladder(None, "g, a, z, db, alpha, act", "g, a, z, db, alpha, {df}",
                      pick=_serial_gradient)
# A team's share of the pass (kernels/cpu/pass_team.py), each its own
# ladder so that each kernel compiles only the loops it runs: by columns
# (registered activations), or blocks of rows into partial sums.
_grad_columns_ladder = ladder(
    _grad_loop, "g, a, z, db, alpha, act, c0, c1", "g, a, z, db, alpha, {df}, c0, c1",
    pick=lambda code, keep_z: None if blocks_db(code) else _grad_loop)
_grad_block_ladder = ladder(
    None, "g, a, z, parts, alpha, act, i0, i1", "g, a, z, parts, alpha, {df}, i0, i1",
    pick=lambda code, keep_z: None if not blocks_db(code) else (
        _grad_row_range if code in spec.MEMORY_BOUND_GRADIENT else _grad_flat_range))


def _blocks_db_source():
    codes = [code for code, _, _, keep_z in ENTRIES if blocks_db(code)]
    test = " or ".join(f"act == {c}" for c in codes) or "False"
    env = {}
    exec(compile(f"def blocks_db_code(act):\n    return {test}\n", "<fastgrad blocks_db>",
                 "exec"), env)
    return env["blocks_db_code"]


blocks_db_code = njit(**INLINE)(_blocks_db_source())
blocks_db_code.__doc__ = ("True for the activation codes whose gradient sums db in blocks of "
                          "rows (:func:`blocks_db`).")


@njit(**JIT)
def bias_act(z, b, out, act, alpha):
    """One pass: ``z += b`` (row-broadcast bias), ``out = f(z)``.

    2-D C-contiguous arrays.  ``out`` may be ``z`` itself (the dense forward
    runs in place on the GEMM's output); a separate ``out`` keeps ``z`` for
    activations whose derivative needs it (``NEEDS_Z``).  An unknown ``act``
    raises ValueError.
    """
    if out.ctypes.data != z.ctypes.data:
        _keep_z_ladder(z, b, out, alpha, act)
    else:
        _bias_act_ladder(z, b, alpha, act)


@njit(**JIT)
def bias_act_step(z, b, out, act, alpha):
    """:func:`bias_act` as the training step calls it: ``out`` is ``z``
    unless the activation's derivative reads z (``NEEDS_Z``), so only those
    activations' keep-z loops are compiled (any other activation with a
    separate ``out`` raises ValueError, as an unknown code does)."""
    if out.ctypes.data != z.ctypes.data:
        _needs_z_ladder(z, b, out, alpha, act)
    else:
        _bias_act_ladder(z, b, alpha, act)


@njit(**JIT)
def bias_act_grad(da, a, z, dz, db, act, alpha):
    """One pass: ``dz = da * f'`` (from ``a``, or ``z`` for ``NEEDS_Z``) and
    ``db = dz.sum(axis=0)``.  ``dz`` may be ``da`` itself (one pass); a
    separate ``dz`` costs a copy first.  An unknown ``act`` raises ValueError."""
    if dz.ctypes.data != da.ctypes.data:
        _copy(da, dz)
    _grad_ladder(dz, a, z, db, alpha, act)


@njit(**JIT)
def bias_act_grad_inplace(da, a, z, db, act, alpha):
    """:func:`bias_act_grad` with ``dz`` = ``da``: the training step's form,
    which does not compile the copy it never needs."""
    _grad_ladder(da, a, z, db, alpha, act)


@njit(**JIT)
def bias_act_grad_columns(da, a, z, db, act, alpha, c0, c1):
    """:func:`bias_act_grad_inplace` on the columns ``c0 .. c1 - 1`` alone
    (``db[c0:c1]``): a team's share of the pass, bitwise the same values,
    for an activation whose db is not summed in blocks of rows (else
    ValueError: :func:`bias_act_grad_row_blocks`)."""
    _grad_columns_ladder(da, a, z, db, alpha, act, c0, c1)


@njit(**JIT)
def bias_act_grad_row_blocks(da, a, z, parts, act, alpha, i0, i1):
    """:func:`bias_act_grad_inplace` on the rows ``i0 .. i1 - 1`` alone
    (``i0`` a multiple of ``DB_ROWS``), the db of their k-th block of
    ``DB_ROWS`` rows into ``parts[k]``: a team's share of the pass of an
    activation whose db is summed in blocks of rows (:func:`blocks_db`;
    else ValueError), bitwise the same values."""
    if i1 > i0 and (i0 % DB_ROWS != 0 or parts.shape[0] * DB_ROWS < i1 - i0):
        raise ValueError("rows not on a block's edge, or fewer rows of parts than blocks")
    _grad_block_ladder(da, a, z, parts, alpha, act, i0, i1)


@njit(**JIT)
def activation_forward(z, out, act, alpha):
    """out = f(z) elementwise on 2-D C-contiguous arrays (``z`` is kept)."""
    _copy(z, out)
    bias_act(out, np.zeros(z.shape[1], z.dtype), out, act, alpha)


@njit(**JIT)
def activation_backward(da, a, z, dz, act, alpha):
    """dz = da * f'(z), with f' read from the output ``a`` (``z`` for ``NEEDS_Z``)."""
    bias_act_grad(da, a, z, dz, np.empty(da.shape[1], da.dtype), act, alpha)
