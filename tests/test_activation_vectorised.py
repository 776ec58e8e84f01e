"""Every activation's float32 and float64 passes compile to vector code
(float64: all but the exact gelu, whose erfc is libm's), and so do the
elementwise loops of the loss kernels.

The fused passes are fast only if LLVM vectorises their loops: a scalar
libm call or a construct the loop vectoriser gives up on turns a pass that
runs at memory speed into one 10-40x slower, with identical results, so no
accuracy test would notice.  These tests read the optimised LLVM IR of each
activation's loops (the loop functions of ``kernels/cpu/activations.py``
with the activation's scalar functions inlined, exactly what each ladder
branch runs) and require every floating-point operation of the scalar loop
body to appear in a vector loop at least 256 bits wide (8 float32 or 4
float64 lanes) as well; on a CPU with AVX-512, 512 bits wide (16 or 8
lanes: the kernels' pipeline asks for them, kernels/wide_vectors.py).
"""
import math
import re

import numpy as np
import pytest
from llvmlite import binding as llvm
from numba import njit
from numba.core import config

from fastgrad.kernels import spec
from fastgrad.kernels.cpu import activations as acts
from fastgrad.kernels.wide_vectors import PREFER_512, WideVectors

pytestmark = pytest.mark.skipif(
    not (llvm.get_host_cpu_features().get("avx2", False) or "+avx2" in (config.CPU_FEATURES or "")),
    reason="the vector-width check expects AVX2 (8 float32 lanes) or wider; this CPU has no AVX2")

# (mathfn's multiply-adds are calls of llvm.fmuladd: one op each here)
_FLOAT_OP = re.compile(r"^\s*%([\w.$\"]+) = (?:fadd|fsub|fmul|fdiv|fneg|fcmp \w+|select i1"
                       r"|select <\d+ x i1>|(?:tail )?call)(?: \w+)*? (float|double|<(\d+) x (?:float|double)>)"
                       r"(?: @llvm\.fmuladd\.|(?! @))", re.M)
# a call of a float function other than an LLVM intrinsic (Py*: the wrapper's)
_SCALAR_CALL = re.compile(r"call [^@\n]*(?:float|double) @(?!llvm\.|Py)([\w.]+)")
_AVX512 = (llvm.get_host_cpu_features().get("avx512f", False)
           if not config.CPU_FEATURES else "+avx512f" in config.CPU_FEATURES)
_MIN_LANES = {np.float32: 16, np.float64: 8} if _AVX512 else {np.float32: 8, np.float64: 4}
# the kernels' options (kernels/cpu/_jit.py), without the disk cache
_KERNEL = dict(error_model="numpy", pipeline_class=WideVectors)
# float64 passes that stay scalar: erfc float64 is libm (mathfn.py)
_SCALAR_FLOAT64 = {"gelu"}


def _float_ops(ir, min_lanes=8):
    """(distinct scalar float ops, float ops in vectors of >= min_lanes
    lanes, calls of non-intrinsic float functions).

    LLVM unrolls the scalar remainder loop and interleaves the vector one,
    so ops are counted differently: a scalar op is counted once per value
    Numba named (``%.428``; the unrolled copies are ``%.428.us.3`` and so
    on), a vector op once per copy (interleaving only adds to them).
    """
    named = set()
    vector = 0
    for name, kind, lanes in _FLOAT_OP.findall(ir):
        if kind in ("float", "double"):
            source = re.match(r"\.(\d+)", name)
            if source:
                named.add(source.group(1))
        elif int(lanes) >= min_lanes:
            vector += 1
    return len(named), vector, sorted(set(_SCALAR_CALL.findall(ir)))


def _compiled_loops(f, df, needs_z, dtype=np.float32, code=None):
    """The optimised IR of the forward, (keep-z forward) and gradient loops
    of one activation (``code``: the loops its ladder branches run; None: a
    transcendental one's), compiled for ``dtype`` without the disk cache
    (cached code cannot be inspected)."""
    forward_loop, keep_z_loop = ((acts._bias_act_loop, acts._bias_act_keep_z)
                                 if code in spec.MEMORY_BOUND else
                                 (acts._bias_act_blocks, acts._bias_act_keep_z_blocks))
    grad_loop = (acts._grad_row_blocks if code in spec.MEMORY_BOUND_GRADIENT
                 else acts._grad_flat_blocks)

    @njit(**_KERNEL)
    def forward(y, b, alpha):
        forward_loop(y, b, alpha, f)

    @njit(**_KERNEL)
    def forward_keep_z(z, b, out, alpha):
        keep_z_loop(z, b, out, alpha, f)

    @njit(**_KERNEL)
    def gradient(g, a, z, db, alpha):
        grad_loop(g, a, z, db, alpha, df)

    @njit(**_KERNEL)
    def gradient_columns(g, a, z, db, alpha, c0, c1):      # a team's share (pass_team.py)
        acts._grad_loop(g, a, z, db, alpha, df, c0, c1)

    x = np.ones((2, 3), dtype)
    b = np.ones(3, dtype)
    alpha = dtype(0.5)
    loops = {"forward": (forward, (x.copy(), b, alpha)),
             "gradient": (gradient, (x.copy(), x, x, b.copy(), alpha)),
             "gradient by columns": (gradient_columns, (x.copy(), x, x, b.copy(), alpha, 0, 3))}
    if needs_z:
        loops["forward keeping z"] = (forward_keep_z, (x.copy(), b, x.copy(), alpha))
    out = {}
    for name, (kernel, args) in loops.items():
        kernel(*args)
        (ir,) = kernel.inspect_llvm().values()
        out[name] = ir
    return out


def _assert_vectorised(loops, label, dtype=np.float32):
    lanes = _MIN_LANES[dtype]
    for name, ir in loops.items():
        scalar, vector, calls = _float_ops(ir, lanes)
        assert not calls, f"{label} {name}: the {dtype.__name__} loop calls {calls} (scalar code)"
        assert vector >= scalar > 0, (
            f"{label} {name}: {scalar} float ops in the scalar loop but only {vector} in "
            f"vectors of {lanes}+ lanes: the loop is not (fully) vectorised")


@pytest.mark.parametrize("code", range(spec.N_ACTIVATIONS),
                         ids=[a.name for a in spec.ACTIVATIONS])
def test_float32_passes_vectorise(code):
    a = spec.ACTIVATIONS[code]
    loops = _compiled_loops(getattr(acts, a.name), getattr(acts, "d_" + a.name), a.needs == "z",
                            code=code)
    _assert_vectorised(loops, a.name)


@pytest.mark.parametrize("code", [c for c, a in enumerate(spec.ACTIVATIONS)
                                  if a.name not in _SCALAR_FLOAT64],
                         ids=[a.name for a in spec.ACTIVATIONS if a.name not in _SCALAR_FLOAT64])
def test_float64_passes_vectorise(code):
    a = spec.ACTIVATIONS[code]
    loops = _compiled_loops(getattr(acts, a.name), getattr(acts, "d_" + a.name), a.needs == "z",
                            np.float64, code)
    _assert_vectorised(loops, a.name, np.float64)


def test_float64_scalar_list_is_current():
    """The float64 passes listed as scalar still are (remove a name from
    _SCALAR_FLOAT64 once its loops vectorise)."""
    for name in _SCALAR_FLOAT64:
        a = spec.ACTIVATIONS[spec.CODES[name]]
        loops = _compiled_loops(getattr(acts, name), getattr(acts, "d_" + name), a.needs == "z",
                                np.float64, spec.CODES[name])
        with pytest.raises(AssertionError, match="calls|not .*vectorised"):
            _assert_vectorised(loops, name, np.float64)


def test_a_scalar_activation_is_caught():
    """The check fails on a loop that does not vectorise: erf through libm."""
    @njit(inline="always")
    def scalar_gelu(z, alpha):
        half = np.float32(0.5)
        return z * (np.float32(1.0) + math.erf(z * np.float32(0.7071067811865476))) * half

    @njit(inline="always")
    def d_scalar_gelu(a, z, alpha):
        return np.float32(0.5) * (np.float32(1.0) + math.erf(z * np.float32(0.7071067811865476)))

    loops = _compiled_loops(scalar_gelu, d_scalar_gelu, True)
    for name, ir in loops.items():
        with pytest.raises(AssertionError, match="calls|not .*vectorised"):
            _assert_vectorised({name: ir}, "scalar_gelu")


# --- losses -----------------------------------------------------------------------------------
# A loss kernel sums its float64 terms in element order (a scalar loop, by
# design: the sum must not depend on the vector width); its elementwise work
# (exp, log1p, the gradient) runs in loops of its own that must vectorise.
# The test: no scalar exp / log1p call is left, and the vector loops hold at
# least the exp polynomial's worth of float operations.

def _loss_ir(kernel, dtype):
    from fastgrad.kernels.cpu import losses
    f = njit(**_KERNEL)(getattr(losses, kernel).py_func)
    x = np.ones((3, 5), dtype)
    if kernel.startswith("softmax_cross_entropy"):
        labels = np.zeros(3, np.int64)
        args = ((x, labels, x.copy()) if kernel == "softmax_cross_entropy" else
                (x, labels, np.ones(5), -100, 0.1, losses.MEAN, x.copy(), np.zeros(3)))
    else:
        args = ((x, x, x.copy()) if kernel == "bce_with_logits" else
                (x, x, np.ones(5), losses.MEAN, x.copy(), np.zeros((3, 5))))
    f(*args)
    (ir,) = f.inspect_llvm().values()
    return ir


def _assert_loss_vectorised(ir, label, dtype):
    _, vector, calls = _float_ops(ir, _MIN_LANES[dtype])
    scalar_math = [c for c in calls if re.search(r"exp|log1p", c)]
    assert not scalar_math, f"{label}: scalar {scalar_math} calls left in the loss"
    assert vector >= 15, f"{label}: only {vector} vector float ops: the elementwise loops are scalar"


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kernel", ["softmax_cross_entropy", "bce_with_logits",
                                    "softmax_cross_entropy_ex", "bce_with_logits_ex"])
def test_loss_elementwise_loops_vectorise(kernel, dtype):
    _assert_loss_vectorised(_loss_ir(kernel, dtype), kernel, dtype)


def test_a_one_pass_loss_is_caught():
    """The check fails on the one-pass form (exp and the float64 sum in one
    loop), which LLVM leaves scalar."""
    from fastgrad.kernels.cpu import mathfn

    @njit(**_KERNEL)
    def one_pass_bce(x, t, g):
        total = 0.0
        for i in range(x.size):
            e = mathfn.exp(-abs(x[i]))
            total += np.float64(max(x[i], np.float32(0)) - x[i] * t[i] + mathfn.log1p(e))
            g[i] = np.float32(1) / (np.float32(1) + e) - t[i]
        return total

    x = np.ones(7, np.float32)
    one_pass_bce(x, x, x.copy())
    (ir,) = one_pass_bce.inspect_llvm().values()
    with pytest.raises(AssertionError, match="vector float ops"):
        _assert_loss_vectorised(ir, "one_pass_bce", np.float32)
