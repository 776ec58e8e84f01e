"""The CPU kernels' compile pipeline (kernels/wide_vectors.py) and the
activation passes that run f over blocks of rows (kernels/cpu/activations.py).

Every kernel asks LLVM for 512-bit vectors; a transcendental activation's
passes run f (or f') over blocks of rows as one flat run, and must give the
bits the one-row-at-a-time passes give: every value computed as before and
db summed in row order.  (The vector width of each activation's loops is
tested in tests/test_activation_vectorised.py.)
"""
import importlib
import pkgutil
import re

import numpy as np
import pytest
from numba import njit
from numba.core.compiler import Compiler
from numba.core.dispatcher import Dispatcher

import fastgrad.kernels.cpu as cpu
from fastgrad.kernels import spec
from fastgrad.kernels.cpu import activations as acts
from fastgrad.kernels.cpu import pass_team
from fastgrad.kernels.wide_vectors import PREFER_512, WideVectors

DTYPES = (np.float32, np.float64)
# rows x columns: one column; 57 (a vector remainder in every row); a block
# of 292 rows and a partial one; a row wider than a block (a block a row)
SHAPES = ((1, 1), (5, 57), (300, 7), (3, acts.ROW_BLOCK + 1), (37, 130), (0, 9), (4, 0))


def _kernels():
    for info in pkgutil.iter_modules(cpu.__path__):
        module = importlib.import_module(f"{cpu.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.__module__ == module.__name__:
                yield f"{info.name}.{name}", value


# Kernels whose loops run along one row keep Numba's own pipeline (JIT_ROWS)
_ROWS_KERNELS = {"losses.softmax_cross_entropy_ex", "norm.norm_forward_epilogue",
                 "norm.norm_backward_epilogue", "blocks.dropout_key", "blocks.dropout_mask",
                 "blocks.block_forward_epilogue", "blocks.block_backward_epilogue",
                 "blocks.block_forward", "blocks.block_backward", "wnorm.weight_norm_forward",
                 "wnorm.weight_norm_backward"}


def test_every_kernel_compiles_with_wide_vectors():
    """Every compiled kernel of kernels/cpu (those inlined into their
    callers compile with the caller's) and the pass team's members, but the
    listed ones along rows.  (The ``parallel=True`` kernels name the
    pipeline too, but lower through Numba's parfor lowering, without the
    attribute: kernels/wide_vectors.py.)"""
    kernels = [(name, k) for name, k in _kernels() if k.targetoptions.get("inline") != "always"]
    assert len(kernels) > 50
    rows = {name for name, k in kernels if k._compiler.pipeline_class is Compiler}
    others = [name for name, k in kernels
              if k._compiler.pipeline_class is not WideVectors and name not in rows]
    assert not others, f"kernels compiled with neither pipeline: {others}"
    assert rows == _ROWS_KERNELS
    pass_team.member_addresses(np.float32)
    members = [m for (dtype, _), m in pass_team._members.items() if dtype == np.float32]
    assert len(members) == len(pass_team.KINDS)
    assert all(m._compiler.pipeline_class is WideVectors for m in members)


def test_the_pipeline_marks_each_function():
    @njit(error_model="numpy", pipeline_class=WideVectors)
    def scale(x):
        for i in range(x.shape[0]):
            x[i] *= np.float32(2)

    x = np.arange(5, dtype=np.float32)
    scale(x)
    np.testing.assert_array_equal(x, np.arange(5, dtype=np.float32) * 2)
    (ir,) = scale.inspect_llvm().values()
    # the function's definition (not its Python or C wrapper's) names its
    # attribute group: "define ... @_ZN<...>scale<...>(...) ... #N {"
    groups = re.findall(r"^define [^@]*@_ZN[^(]*scale[^(]*\(.*\) [^#]*#(\d+) \{", ir, re.M)
    assert groups, "the function's definition is not in its IR"
    for n in groups:
        (attributes,) = re.findall(rf"^attributes #{n} = \{{(.*)\}}", ir, re.M)
        assert PREFER_512 in attributes


def _rows_alone(kernel, arrays, row_args):
    """``kernel`` run on each row of ``arrays`` as a one-row array (its own
    block), the rows put back together."""
    out = [np.empty_like(a) for a in arrays]
    for i in range(arrays[0].shape[0]):
        rows = [a[i:i + 1].copy() for a in arrays]
        kernel(*row_args(rows))
        for o, r in zip(out, rows):
            o[i] = r[0]
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{c}" for r, c in SHAPES])
@pytest.mark.parametrize("act", [a.name for a in spec.ACTIVATIONS])
def test_blocks_of_rows_give_the_rows_bits(act, shape, dtype):
    rng = np.random.default_rng([shape[0], shape[1], spec.CODES[act]])
    code, alpha = spec.CODES[act], dtype(spec.DEFAULT_ALPHA.get(act, 0.0))
    z0 = (3 * rng.standard_normal(shape)).astype(dtype)
    b = rng.standard_normal(shape[1]).astype(dtype)

    y = z0.copy()
    acts.bias_act(y, b, y, code, alpha)
    (y_rows,) = _rows_alone(lambda r: acts.bias_act(r, b, r, code, alpha), [z0],
                            lambda rows: rows)
    np.testing.assert_array_equal(y, y_rows)

    z, out = z0.copy(), np.empty_like(z0)
    acts.bias_act(z, b, out, code, alpha)
    z_rows, out_rows = _rows_alone(lambda zr, o: acts.bias_act(zr, b, o, code, alpha),
                                   [z0, np.empty_like(z0)], lambda rows: rows)
    np.testing.assert_array_equal(out, out_rows)
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(z, z_rows)

    g0 = rng.standard_normal(shape).astype(dtype)
    g, db = g0.copy(), np.full(shape[1], np.nan, dtype)
    acts.bias_act_grad_inplace(g, out, z, db, code, alpha)
    # db: within blocks of DB_ROWS rows the rows' db added in row order,
    # from 0; the blocks' sums added in block order
    assert acts.blocks_db(code)
    per_block = acts.DB_ROWS
    db_sum, part = None, np.zeros(shape[1], dtype)
    for i in range(shape[0]):
        gi, dbi = g0[i:i + 1].copy(), np.empty(shape[1], dtype)
        acts.bias_act_grad_inplace(gi, out[i:i + 1], z[i:i + 1], dbi, code, alpha)
        np.testing.assert_array_equal(g[i], gi[0])
        part = (part + dbi).astype(dtype)
        if (i + 1) % per_block == 0 or i + 1 == shape[0]:
            db_sum = part if db_sum is None else (db_sum + part).astype(dtype)
            part = np.zeros(shape[1], dtype)
    np.testing.assert_array_equal(db, part if db_sum is None else db_sum)

    g2, db2 = g0.copy(), np.full(shape[1], np.nan, dtype)
    if shape[0] == 0:
        db2 = np.zeros(shape[1], dtype)      # (a team's pass writes no block: db is zeros)
    else:
        # a team's blocks of rows, each into its own partial sums: the same bits
        # (two shares: the first block, then the rest)
        parts = np.full((max(1, -(-shape[0] // acts.DB_ROWS)), shape[1]), np.nan, dtype)
        first = min(shape[0], acts.DB_ROWS)
        acts.bias_act_grad_row_blocks(g2, out, z, parts[:1], code, alpha, 0, first)
        acts.bias_act_grad_row_blocks(g2, out, z, parts[1:], code, alpha, first, shape[0])
        db2 = parts[0].copy()
        for k in range(1, parts.shape[0]):
            db2 = (db2 + parts[k]).astype(dtype)
    # a built-in gradient has no share by columns (a registered one's: below)
    with pytest.raises(ValueError):
        acts.bias_act_grad_columns(g0.copy(), out, z, db2.copy(), code, alpha, 0, shape[1])
    np.testing.assert_array_equal(g2, g)
    np.testing.assert_array_equal(db2, db)


@pytest.fixture
def softsign64():
    """A registered activation whose derivative returns float64 on float32
    arrays (its float64 constants), as a user's may."""
    from fastgrad import registry

    @njit
    def f(z, alpha):
        return z / (1.0 + abs(z))

    @njit
    def df(a, z, alpha):
        return (1.0 - abs(a)) * (1.0 - abs(a))

    name = "softsign64_test"
    registry.register_activation(name, f, df)
    yield registry.get(name).code
    registry._forget(name)


def test_a_registered_gradient_adds_its_unrounded_values(softsign64):
    """The serial gradient of a registered activation gives the team's
    column loop's bits: db adds f' g before g's rounding (the blocked loop
    added the rounded g: 80 of 130 columns differed by up to 1.2e-6)."""
    from fastgrad import registry
    kernels = registry.cpu_kernels(codes=(softsign64,)).activations
    rng = np.random.default_rng(5)
    shape = (64, 130)
    a = np.tanh(rng.standard_normal(shape)).astype(np.float32)
    g0 = rng.standard_normal(shape).astype(np.float32)
    g1, db1 = g0.copy(), np.empty(shape[1], np.float32)
    kernels.bias_act_grad_inplace(g1, a, a, db1, softsign64, 0.0)
    g2, db2 = g0.copy(), np.empty(shape[1], np.float32)
    kernels.bias_act_grad_columns(g2, a, a, db2, softsign64, 0.0, 0, 64)
    kernels.bias_act_grad_columns(g2, a, a, db2, softsign64, 0.0, 64, shape[1])
    np.testing.assert_array_equal(g1, g2)
    np.testing.assert_array_equal(db1, db2)
    t = g0.astype(np.float64) * (1.0 - np.abs(a.astype(np.float64))) ** 2
    db_ref = np.zeros(shape[1], np.float32)
    for i in range(shape[0]):
        db_ref = (db_ref.astype(np.float64) + t[i]).astype(np.float32)    # db += t, then rounded
    np.testing.assert_array_equal(db1, db_ref)


@pytest.mark.parametrize("act", ["gelu", "softplus", "relu"])
def test_the_public_ops_take_any_layout(act):
    """The blocked loops take C-contiguous arrays; fastgrad.ops copies any
    other layout first (a strided view, Fortran order): the same bits."""
    from fastgrad import ops
    rng = np.random.default_rng(9)
    big = (3 * rng.standard_normal((40, 150))).astype(np.float32)
    da = rng.standard_normal((40, 75)).astype(np.float32)
    for z in (big[:, ::2], np.asfortranarray(big[:, :75])):
        assert not z.flags.c_contiguous
        zc = np.ascontiguousarray(z)
        a = ops.activation_forward(z, act)
        np.testing.assert_array_equal(a, ops.activation_forward(zc, act))
        dz = ops.activation_backward(np.asfortranarray(da), a, z, act)
        np.testing.assert_array_equal(dz, ops.activation_backward(da, a, zc, act))
