"""silu (x sigmoid(x), PyTorch's nn.SiLU): the float32 kernels' maximum error
over the whole float32 line, float64 to rounding, the extremes and the
non-finite inputs as PyTorch has them, and whole-MLP parity with PyTorch in
float64.  The generic parametrised suites (test_kernels, test_step,
test_epilogue_pieces, the CUDA twins) cover silu through ACTIVATIONS."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import ops, reference
from fastgrad.kernels.cpu import activations as A

from conftest import to_numpy
from test_mathfn import sweep

F32 = np.finfo(np.float32)


def _kernels(z, xp=np):
    """(f(z), f'(z)) from the fused kernels on a 1-D float array."""
    z2 = xp.asarray(np.ascontiguousarray(z).reshape(1, -1))
    a = ops.activation_forward(z2, "silu")
    g = ops.activation_backward(xp.ones(z2.shape, z2.dtype), a, z2, "silu")
    return to_numpy(a).ravel(), to_numpy(g).ravel()


def _logistic64(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0, e) / (1.0 + e)


def test_needs_z_helper_matches_needs_z():
    """The compiled steps select 'keep z' with needs_z(); the Python side
    with NEEDS_Z.  Both must name the same activations (gelu, gelu_tanh, silu)."""
    for name, code in A.CODES.items():
        assert bool(A.needs_z(code)) == (code in A.NEEDS_Z), name
    assert A.NEEDS_Z == {A.CODES["gelu"], A.CODES["gelu_tanh"], A.CODES["silu"]}


def test_silu_float32_whole_range():
    """Max error of the float32 kernels (vectorised exp of mathfn) over every
    4099th float32 bit pattern, against the float64 reference.  Where
    exp(-|z|) and the result are normal floats the forward is within 4 ulp
    relative and f' within 4 ulp of its terms s (1 + |z| (1 - s)) (f'
    crosses 0 at z = -1.28, so no relative bound holds there); where either
    is subnormal (z < -87.3, or |f(z)| < 1.2e-38) the error is absolute,
    below 1e-42."""
    x = sweep()
    x = x[np.isfinite(x)]
    a, g = _kernels(x)
    assert a.dtype == np.float32 and g.dtype == np.float32
    z = x.astype(np.float64)
    with np.errstate(all="ignore"):
        fr = reference.activation(z, "silu")
        gr = reference.activation_grad(z, "silu")
    s = _logistic64(z)
    normal = np.exp(-np.abs(z)) >= F32.tiny
    fwd = normal & (np.abs(fr) >= F32.tiny)
    ferr = np.abs(a.astype(np.float64) - fr)
    rel = ferr[fwd] / np.abs(fr[fwd])
    worst = x[fwd][rel.argmax()]
    assert rel.max() <= 4 * F32.eps, f"forward {rel.max() / F32.eps:.2f} ulp at {worst}"
    assert ferr[~fwd].max() <= 1e-42, f"forward abs err {ferr[~fwd].max():.3g}"
    gerr = np.abs(g.astype(np.float64) - gr)
    terms = s * (1.0 + np.abs(z) * (1.0 - s))
    grel = gerr[normal] / terms[normal]
    worst = x[normal][grel.argmax()]
    assert grel.max() <= 4 * F32.eps, f"f' {grel.max() / F32.eps:.2f} ulp at {worst}"
    assert gerr[~normal].max() <= 1e-42, f"f' abs err {gerr[~normal].max():.3g}"


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 63,
                    reason="the float64 check needs an 80-bit (or wider) np.longdouble")
def test_silu_float64_to_rounding(rng):
    """float64 keeps libm: forward within 3 ulp of f, f' within 3 ulp of its
    terms, against the same formulas in long double (measured 1.9 and 2.65
    over 2M points of [-40, 0]; the float64 reference itself is off by up
    to ~1.5, so kernel and reference once read 2.73 apart at z = 2.1619:
    seed 2978357560), on |z| log-uniform from 1e-300 to 1e3, both signs,
    where e = exp(-|z|) is a normal float.  Below z = -708.4 e is
    subnormal: kernel and reference each round it to the subnormal grid
    (2^-1074), and f = z e (normal down to z = -715) carries |z| times that
    error, absolute; a band of z in (-745, -708.4) always checks that
    bound."""
    F64 = np.finfo(np.float64)
    LD = np.longdouble
    z = np.concatenate([rng.choice([-1.0, 1.0], 20000) * 10.0 ** rng.uniform(-300, 3, 20000),
                        rng.uniform(-40, 40, 20000), -rng.uniform(708.4, 745.0, 2000)])
    a, g = _kernels(z)
    fr = reference.activation(z, "silu")
    gr = reference.activation_grad(z, "silu")
    sub = np.exp(-np.abs(z)) < F64.tiny
    assert sub.sum() >= 2000
    zl = z.astype(LD)
    el = np.exp(-np.abs(zl))
    sl = np.where(zl >= 0, LD(1), el) / (LD(1) + el)
    f_exact = zl * sl
    g_exact = sl * (LD(1) + zl * (np.where(zl >= 0, el, LD(1)) / (LD(1) + el)))
    ok = (np.abs(fr) > 0) & ~sub
    rel = (np.abs(a.astype(LD) - f_exact)[ok] / np.abs(f_exact[ok])).astype(np.float64)
    assert rel.max() <= 3 * F64.eps, f"forward {rel.max() / F64.eps:.2f} ulp"
    sub_ulp = float(np.nextafter(0.0, 1.0))
    assert (np.abs(a - fr)[sub] <= 2 * F64.eps * np.abs(fr[sub])
            + 2 * np.abs(z[sub]) * sub_ulp).all()
    s = _logistic64(z)
    terms = s * (1.0 + np.abs(z) * (1.0 - s))
    ok = (terms > 0) & ~sub
    grel = (np.abs(g.astype(LD) - g_exact)[ok] / terms[ok]).astype(np.float64)
    assert grel.max() <= 3 * F64.eps, f"f' {grel.max() / F64.eps:.2f} ulp of its terms"
    assert (np.abs(g - gr)[sub] <= 2 * F64.eps * terms[sub]
            + 2 * (1.0 + np.abs(z[sub])) * sub_ulp).all()


def test_reference_silu_is_the_textbook_formula(rng):
    """The oracle itself: z sigmoid(z) and s (1 + z (1 - s)) where the naive
    formulas are exact enough, and its derivative against central
    differences of its forward."""
    z = rng.uniform(-30, 30, 1000)
    s = 1.0 / (1.0 + np.exp(-z))
    np.testing.assert_allclose(reference.activation(z, "silu"), z * s, rtol=1e-14, atol=1e-300)
    np.testing.assert_allclose(reference.activation_grad(z, "silu"), s * (1 + z * (1 - s)),
                               rtol=1e-12, atol=1e-14)
    h = 1e-6
    fd = (reference.activation(z + h, "silu") - reference.activation(z - h, "silu")) / (2 * h)
    np.testing.assert_allclose(reference.activation_grad(z, "silu"), fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_extremes_and_non_finite_like_torch(device, xp, dtype):
    """Finite and accurate at +-1e4 (no overflow, no NaN); at +-inf and NaN
    NaN where torch.nn.functional.silu gives NaN: f(-inf) = NaN (-inf * 0),
    f(inf) = inf, f'(inf) = NaN (inf * 0), as gelu's f(-inf) and f'(inf)."""
    torch = pytest.importorskip("torch")
    z = np.array([-np.inf, -1e4, -1e3, -88.8, -1.0, -0.0, 0.0, 1.0, 88.8, 1e3, 1e4, np.inf,
                  np.nan], dtype)
    a, g = _kernels(z, xp)
    t = torch.tensor(z, requires_grad=True)
    y = torch.nn.functional.silu(t)
    y.sum().backward()
    ta, tg = y.detach().numpy(), t.grad.numpy()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(ta))
    np.testing.assert_array_equal(np.isnan(g), np.isnan(tg))
    assert np.isnan(a[0]) and a[-2] == np.inf and np.isnan(g[-2])
    mid = slice(1, -2)
    assert np.isfinite(a[mid]).all() and np.isfinite(g[mid]).all()
    # the finite values against the reference, not torch: torch's float32
    # silu(-88.8) underflows to -0, the CPU's keeps -2.4e-37.  The GPU
    # flushes float32 subnormals (common.cuh): exp(-88.8) = 3e-39 reads as
    # 0 there, so f and f' are 0 where |f| < 88.8 * 1.2e-38 ~ 1e-36.
    rtol = 1e-6 if dtype == np.float32 else 1e-15
    atol = 1.1e-36 if device == "cuda" and dtype == np.float32 else 0.0
    zm = z[mid].astype(np.float64)
    np.testing.assert_allclose(a[mid], reference.activation(zm, "silu"), rtol=rtol, atol=atol)
    np.testing.assert_allclose(g[mid], reference.activation_grad(zm, "silu"), rtol=rtol,
                               atol=atol)


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
def test_silu_mlp_matches_torch_float64(rng, norm):
    """A whole silu MLP (the fused dense path, or the normalised one) and its
    to_torch twin: forward, dx and every dW, db to 1e-10; from_torch of the
    torch model gives the same parameters and activations back."""
    torch = pytest.importorskip("torch")
    from fastgrad.interop import from_torch, to_torch
    model = fg.MLP([7, 11, 9, 4], activation="silu", dtype="float64", norm=norm,
                   seed=int(rng.integers(1 << 30)))
    model.params[...] += rng.normal(0, 0.3, model.n_params)      # non-zero biases
    seq = to_torch(model).train()
    assert sum(isinstance(m, torch.nn.SiLU) for m in seq) == 2
    x = rng.standard_normal((6, 7)) * 2.0
    dy = rng.standard_normal((6, 4))
    y = model.forward(x)
    dx = model.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = seq(xt)
    yt.backward(torch.tensor(dy))
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    linears = [m for m in seq if isinstance(m, torch.nn.Linear)]
    for layer, lin in zip(model.layers, linears):
        np.testing.assert_allclose(layer.dW, lin.weight.grad.numpy().T, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(layer.db, lin.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    back = from_torch(seq.eval())
    assert [l.activation for l in back.layers] == ["silu", "silu", "identity"]

