"""Subnormal numbers on every device: float64 keeps them everywhere, float32
keeps them in the CPU's ``fastgrad.ops`` kernels and flushes them on CUDA
(the CPU's float32 training kernels flush them too unless
``fg.set_flush_denormal(False)``: tests/test_denormals.py).

CuPy compiles every RawModule with ``-ftz=true`` (appended after the
loader's options, so it cannot be turned off there): in float32 kernels
every arithmetic operation, comparison and float->double conversion reads a
subnormal input as zero and writes a subnormal result as zero (a plain copy,
or a product by 1 the compiler removed, keeps it).  float64 is never
flushed.  On the CPU, ``fastgrad.ops``' kernels keep subnormals in both;
its float32 update (``clipped_update``, the GPU's reference below) flushes
them as the GPU does, so the comparisons on flushed inputs hold either way.
Hence:

* float64, every device: results are the float64 reference's on the raw
  inputs, subnormal ones included (a flushed result would be 100% off).
* float32 on CUDA (the tests marked ``cuda`` below; ``-ftz=true`` cannot
  be turned off there): a result equals the CPU's computed on the flushed
  inputs (up to the usual float32 agreement of the two libms).  Against the
  CPU on the raw inputs, a result moves by at most the flushed input times
  the local slope -- about the smallest normal float32 (``TINY``) for the
  activations and the updates -- except where a derivative branches at
  zero: at a subnormal forward output ``a``, relu, leaky_relu and elu
  backward take the branch of ``a == 0`` on the GPU.

The host emulator (tools/cuda_emulator) flushes the same way, through x86's
FTZ/DAZ bits during float32 launches.
"""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import device as fg_device
from fastgrad import ops, reference
from fastgrad.backend import backend_for
from fastgrad.kernels.cpu import activations as cpu_act
from fastgrad.kernels.cpu import optim as cpu_optim
from fastgrad.kernels.cpu.activations import CODES

from conftest import ACTIVATIONS, RULES, rtol_of, to_numpy
from conftest import OPTIMIZERS as _OPT_CLS

TINY = float(np.finfo(np.float32).tiny)          # smallest normal float32, 2**-126
TINY64 = float(np.finfo(np.float64).tiny)
# Without weight decay, a gradient element reaches the state alone (a decay
# term p * wd would swallow a subnormal one); with it, p is read twice.
_OPT_KW = {"sgd": dict(lr=0.05, momentum=0.9), "adam": dict(lr=1e-2),
           "adamw": dict(lr=1e-2, amsgrad=True),
           "rmsprop": dict(lr=1e-2, momentum=0.9, centered=True)}
_OPT_KW_DECAY = {"sgd": dict(lr=0.05, momentum=0.9, weight_decay=1e-3),
                 "adam": dict(lr=1e-2, weight_decay=1e-2), "adamw": dict(lr=1e-2, weight_decay=0.1),
                 "rmsprop": dict(lr=1e-2, momentum=0.9, centered=True, weight_decay=1e-3)}


def subnormal32(rng, n):
    """n random float32 subnormals of both signs (random mantissas, never 0)."""
    bits = rng.integers(1, 1 << 23, n, dtype=np.uint32) | (rng.integers(0, 2, n, dtype=np.uint32) << 31)
    return bits.view(np.float32)


def subnormal64(rng, n):
    """n random float64 subnormals of both signs, in [1e-310, TINY64) so that
    one rounding is at most ~5e-14 relative."""
    return (rng.uniform(1e-310, TINY64, n) * rng.choice([-1.0, 1.0], n)).astype(np.float64)


def flush(x):
    """float32 ``x`` with its subnormals replaced by zeros of their sign (the GPU's reading)."""
    x = np.asarray(x, np.float32)
    return np.where(np.abs(x) < TINY, np.copysign(np.float32(0), x), x).astype(np.float32)


def assert_no_subnormal(x, what):
    x = to_numpy(x)
    bad = (x != 0) & (np.abs(x) < TINY)
    assert not bad.any(), f"{what}: {int(bad.sum())} subnormal results, e.g. {x[bad][:3]}"


def assert_within(got, want, atol, rtol, what):
    """|got - want| <= atol + rtol |want| elementwise (atol may be an array)."""
    got, want = np.asarray(to_numpy(got), np.float64), np.asarray(want, np.float64)
    err = np.abs(got - want)
    ok = (got == want) | (err <= atol + rtol * np.abs(want))
    if not ok.all():
        i = np.argwhere(~ok)[0]
        i = tuple(i)
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.size} elements off; first at "
                             f"{i}: got {got[i]!r}, want {want[i]!r}")


class _Flat:
    """The model contract of an optimizer: flat params and grads, layer offsets."""

    def __init__(self, p, g, offsets):
        self.params, self.grads, self.layer_offsets = p, g, offsets


def _pre_activations(rng, shape):
    """float32 z: subnormals, +-0, values whose activation is subnormal on
    the CPU (leaky_relu and gelu just above TINY, sigmoid/softplus near
    -90), the boundary TINY itself and ordinary values, shuffled."""
    n = int(np.prod(shape))
    parts = [subnormal32(rng, n // 3), np.array([0.0, -0.0, TINY, -TINY], np.float32),
             -rng.uniform(1e-37, 1e-36, n // 10), rng.uniform(TINY, 2 * TINY, n // 10),
             rng.uniform(-103.0, -87.0, n // 10)]
    rest = n - sum(p.size for p in parts)
    parts.append(rng.standard_normal(rest) * 3)
    z = np.concatenate([np.asarray(p, np.float32) for p in parts])
    rng.shuffle(z)
    return z.reshape(shape)


def _cpu_forward(z, code, alpha):
    out = np.empty_like(z)
    cpu_act.activation_forward(z, out, code, alpha)
    return out


def _cpu_backward(da, a, z, code, alpha):
    dz, db = np.empty_like(da), np.empty(da.shape[1], da.dtype)
    cpu_act.bias_act_grad(da, a, z, dz, db, code, alpha)
    return dz, db


def _gpu_backward(cuda_be, kc, da, a, z, code, alpha):
    dz, db = cuda_be.alloc(da.shape, da.dtype), cuda_be.alloc(da.shape[1], da.dtype)
    dev = cuda_be.to_device
    kc.bias_act_grad(dev(da), dev(a), dev(z), dz, db, code, alpha)
    return to_numpy(dz), to_numpy(db)


# --- float64 on every device: kept ---------------------------------------------------------

# a few units in the last place of a subnormal float64 (4.9e-324 each): the
# kernels and the reference may round a subnormal result differently
SUB64_ATOL = 8 * float(np.nextafter(0.0, 1.0))
# fastgrad's (torch's) state names -> fastgrad.reference.optimizer_step's
REF_STATE = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "vmax",
             "momentum_buffer": "b", "square_avg": "s", "grad_avg": "a"}


@pytest.mark.parametrize("rule", RULES)
def test_float64_update_keeps_subnormals(device, rng, rule):
    """Subnormal parameters and gradients (weight decay on, so p is read
    twice): the device's params and state follow the float64 reference,
    the subnormal state elements (e.g. Adam's m = (1 - beta1) g) kept."""
    n = 1000
    p = rng.standard_normal(n)
    p[rng.choice(n, n // 3, replace=False)] = subnormal64(rng, n // 3)
    grads = []
    for _ in range(4):
        g = rng.standard_normal(n)
        g[rng.choice(n, n // 3, replace=False)] = subnormal64(rng, n // 3)
        grads.append(g)
    be = backend_for(device)
    flat = _Flat(be.to_device(p.copy()), be.alloc(n, np.float64, fill=0),
                 np.array([0, 100, 101, n], np.int64))
    kw = dict(_OPT_KW_DECAY[rule])
    # clip_norm far above the norm: the norm path runs and the scale is 1
    opt = _OPT_CLS[rule](flat, clip_norm=1e6, **kw)
    lr = kw.pop("lr")
    p_ref, state, kept = p.copy(), {}, 0
    # A state element that is a sum of terms which nearly cancel (m = b1 m +
    # (1 - b1) g) may be off by a few ulp of those terms, not of itself: its
    # bound grows with what went into it (g, and p where weight decay adds
    # it to g), and stays subnormal-tight where every term was subnormal.
    coupled = 0.0 if rule == "adamw" else kw["weight_decay"]
    terms = np.zeros(n)
    for t, g in enumerate(grads, start=1):
        flat.grads[...] = be.to_device(g)
        st = opt.step()
        assert not st.skipped and st.clip_scale == 1.0
        terms += np.abs(g) + coupled * np.abs(p_ref)
        p_ref = reference.optimizer_step(rule, p_ref, g, state, t, lr, **kw)
        assert st.grad_norm == pytest.approx(np.linalg.norm(g), rel=1e-13)
        assert_within(flat.params, p_ref, 1e-13, 1e-10, f"{rule} p at update {t}")
        atol = SUB64_ATOL + 4 * np.finfo(np.float64).eps * terms
        for name, buf in opt.state.items():
            want = state[REF_STATE[name]]
            assert_within(buf, want, atol, 1e-10, f"{rule} {name} at update {t}")
            kept += int(((want != 0) & (np.abs(want) < TINY64)).sum())
    assert kept > 0, "no subnormal state to keep"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_activations_keep_subnormals(device, rng, activation):
    """float64 subnormal inputs are not flushed: forward and backward
    (subnormal z and upstream gradients) are the reference's to float64's
    tolerance relative to each element."""
    xp, k = fg_device.array_module(device), fg_device.kernels(device)
    code, alpha = CODES[activation], ops.resolve_activation(activation)[1]
    rows, cols = 70, 33
    z = subnormal64(rng, rows * cols).reshape(rows, cols)
    a = xp.full(z.shape, np.nan)
    k.activation_forward(xp.asarray(z), a, code, alpha)
    assert_within(a, reference.activation(z, activation, alpha), SUB64_ATOL,
                  rtol_of(np.float64), f"{activation} forward")
    da = subnormal64(rng, rows * cols).reshape(rows, cols)
    dz, db = xp.full(z.shape, np.nan), xp.full(cols, np.nan)
    k.bias_act_grad(xp.asarray(da), a, xp.asarray(z), dz, db, code, alpha)
    dz_ref = da * reference.activation_grad(z, activation, alpha)
    assert_within(dz, dz_ref, SUB64_ATOL, rtol_of(np.float64), f"{activation} dz")
    assert_within(db, dz_ref.sum(axis=0), rows * SUB64_ATOL, 1e-11, f"{activation} db")
    assert (to_numpy(dz) != 0).any()


# --- float32 activations on CUDA: flushed ----------------------------------------------------

def _forward_atol(z, activation, alpha):
    """Per-element bound of |GPU - CPU| for f(z) in float32: TINY where the
    flush acts (z or the exact f(z) subnormal), else the usual agreement of
    the two float32 libms (conftest.RTOL: 1e-5 times max(1, |z|))."""
    exact = np.abs(reference.activation(z, activation, alpha))
    z = np.abs(np.asarray(z, np.float64))
    return np.where((z < TINY) | (exact < TINY), TINY, rtol_of(np.float32) * np.maximum(1.0, z))


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_float32_forward_flushes_within_tiny(cuda_be, kc, rng, activation):
    """f(z) on the GPU vs the CPU, z in and around the subnormal range: within
    TINY (plus 1e-5 relative) wherever z or the CPU's f(z) is subnormal,
    the usual float32 agreement elsewhere; the same against the CPU on
    flushed z; never a subnormal result."""
    code, alpha = CODES[activation], ops.resolve_activation(activation)[1]
    z = _pre_activations(rng, (13, 97))
    out = cuda_be.alloc(z.shape, np.float32)
    kc.activation_forward(cuda_be.to_device(z), out, code, alpha)
    rtol = rtol_of(np.float32)
    atol = _forward_atol(z, activation, alpha)
    assert_within(out, _cpu_forward(z, code, alpha), atol, rtol, f"{activation} vs CPU")
    assert_within(out, flush(_cpu_forward(flush(z), code, alpha)), atol, rtol,
                  f"{activation} vs CPU on flushed z")
    assert_no_subnormal(out, activation)
    # bias_act adds a subnormal bias first: z + b is flushed, then f
    b = subnormal32(rng, z.shape[1])
    zg = cuda_be.to_device(z)
    kc.bias_act(zg, cuda_be.to_device(b), out, code, alpha)
    zc, ac = z.copy(), np.empty_like(z)
    cpu_act.bias_act(zc, b, ac, code, alpha)
    assert_within(zg, zc, 2 * TINY, 0.0, f"{activation}: z + b")
    assert_no_subnormal(zg, f"{activation}: z + b")
    atol = _forward_atol(zc, activation, alpha)
    assert_within(out, ac, atol + TINY, rtol, f"{activation} bias_act vs CPU")
    assert_within(out, flush(_cpu_forward(to_numpy(zg), code, alpha)), atol, rtol,
                  f"{activation} bias_act vs CPU on the flushed sum")


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_float32_backward_subnormal_gradients(cuda_be, kc, rng, activation):
    """Subnormal upstream gradients da through ordinary a, z: dz within
    TINY * max(1, |f'|) of the CPU's (|f'| <= 1.13, gelu), db within that
    per summed row.  Element by element dz is the CPU's on the flushed da
    (zero) or on the raw one: a product by a factor 1 the compiler removed
    (identity's f', relu's selected 1) is a copy, and copies never flush."""
    code, alpha = CODES[activation], ops.resolve_activation(activation)[1]
    rows, cols = 150, 37
    z = (rng.standard_normal((rows, cols)) * 3).astype(np.float32)
    a = _cpu_forward(z, code, alpha)
    da = subnormal32(rng, rows * cols).reshape(rows, cols)
    dz, db = _gpu_backward(cuda_be, kc, da, a, z, code, alpha)
    dz_c, db_c = _cpu_backward(da, a, z, code, alpha)
    # (a few float32 roundings of f' and of the product above the float64 f')
    slope = np.maximum(1.0, np.abs(reference.activation_grad(z, activation, alpha)))
    slope *= 1 + 4 * np.finfo(np.float32).eps
    assert_within(dz, dz_c, TINY * slope, 0.0, f"{activation} dz vs CPU")
    assert_within(db, db_c, TINY * slope.sum(axis=0), 0.0, f"{activation} db vs CPU")
    dz_f, _ = _cpu_backward(flush(da), a, z, code, alpha)
    either = (dz == dz_f) | (dz == dz_c)
    assert either.all(), f"{activation}: dz at {np.argwhere(~either)[0]} is neither"


@pytest.mark.cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cuda_float32_backward_subnormal_outputs(cuda_be, kc, rng, activation):
    """Subnormal forward outputs a (and z for gelu) with ordinary da: the GPU
    computes the CPU's derivative at the flushed a, z -- for relu,
    leaky_relu and elu the branch of a == 0, which the CPU on raw subnormal
    a > 0 does not take."""
    code, alpha = CODES[activation], ops.resolve_activation(activation)[1]
    z = _pre_activations(rng, (64 * 2 + 3, 29))
    a = _cpu_forward(z, code, alpha)                 # the CPU's own, subnormals kept
    da = rng.standard_normal(z.shape).astype(np.float32)
    dz, db = _gpu_backward(cuda_be, kc, da, a, z, code, alpha)
    dz_f, db_f = _cpu_backward(da, flush(a), flush(z), code, alpha)
    rtol = rtol_of(np.float32)
    atol = TINY + rtol * np.abs(da) * (1 + np.abs(z))      # the float32 bound, per element
    assert_within(dz, flush(dz_f), atol, rtol, f"{activation} dz vs CPU on flushed a, z")
    db_atol = atol.sum(axis=0)
    assert_within(db, db_f, db_atol, rtol, f"{activation} db vs CPU on flushed a, z")
    assert_no_subnormal(dz, f"{activation} dz")
    if activation == "relu":                         # the branch, stated
        pos = (a > 0) & (a < TINY)
        assert pos.any()
        dz_raw, _ = _cpu_backward(da, a, z, code, alpha)
        np.testing.assert_array_equal(dz_raw[pos], da[pos])
        np.testing.assert_array_equal(dz[pos], 0.0)


# --- float32 updates on CUDA: flushed ------------------------------------------------------

def _run_updates(cuda_be, rule, p, grads, cpu_grads, kw):
    """Updates on the GPU with ``grads`` and on the CPU with ``cpu_grads``
    (one per step), from the same ``p``; returns the host copies of (GPU p
    and state, CPU p and state, GPU norms, CPU norms)."""
    from fastgrad.kernels.cuda import optim as kopt
    offsets = np.array([0, 100, 101, p.size], np.int64)
    flat = _Flat(p.copy(), np.zeros_like(p), offsets)
    # clip_norm far above the norm: the norm path runs and the scale is
    # exactly 1 on both sides, so the updates can be compared bitwise
    opt = _OPT_CLS[rule](flat, clip_norm=1e6, **kw)
    pg = cuda_be.to_device(p)
    sg = [cuda_be.to_device(s) for s in opt._kernel_args()[1:4]]
    lsq = cuda_be.alloc(offsets.size - 1, np.float64)
    norms_g, norms_c = [], []
    for g_gpu, g_cpu in zip(grads, cpu_grads):
        flat.grads[:] = g_cpu
        rule_code, s0, s1, s2, hp = opt._kernel_args()
        ng, _, sk = kopt.clipped_update(rule_code, pg, cuda_be.to_device(g_gpu), *sg, hp,
                                        offsets, lsq,
                                        opt._clip_norm, opt._clip_value)
        norm, scale, skipped = cpu_optim.clipped_update(
            rule_code, flat.params, flat.grads, s0, s1, s2, hp, offsets, opt._layer_sq,
            opt._clip_norm, opt._clip_value)
        opt._commit(norm, scale, skipped, opt._layer_sq)
        assert not bool(sk) and not skipped and scale == 1.0
        norms_g.append(float(ng))
        norms_c.append(norm)
    state_c = [s.copy() for s in opt._kernel_args()[1:4]]
    return ([to_numpy(pg)] + [to_numpy(s) for s in sg], [flat.params] + state_c,
            np.array(norms_g), np.array(norms_c))


@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_cuda_float32_update_with_subnormal_gradients(cuda_be, rng, rule):
    """Gradients with subnormal elements: the GPU update is bitwise the CPU
    update on the flushed gradients (those elements update as for g = 0)."""
    n = 1000
    p = rng.standard_normal(n).astype(np.float32)
    grads = []
    for _ in range(4):
        g = rng.standard_normal(n).astype(np.float32)
        idx = rng.choice(n, n // 3, replace=False)
        g[idx] = subnormal32(rng, idx.size)
        grads.append(g)
    gpu, cpu, ng, nc = _run_updates(cuda_be, rule, p, grads, [flush(g) for g in grads],
                                    _OPT_KW[rule])
    for got, want, what in zip(gpu, cpu, ("p", "s0", "s1", "s2")):
        np.testing.assert_array_equal(got, want, err_msg=f"{rule} {what}")
        assert_no_subnormal(got, f"{rule} {what}")
    np.testing.assert_allclose(ng, nc, rtol=1e-13)


@pytest.mark.cuda
@pytest.mark.parametrize("rule", RULES)
def test_cuda_float32_update_with_subnormal_parameters(cuda_be, rng, rule):
    """Parameters with subnormal elements (read as zero by the GPU, also in
    weight decay): within TINY of the CPU's update on the raw parameters."""
    n = 1000
    p = rng.standard_normal(n).astype(np.float32)
    idx = rng.choice(n, n // 3, replace=False)
    p[idx] = subnormal32(rng, idx.size)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    gpu, cpu, ng, nc = _run_updates(cuda_be, rule, p, grads, grads, _OPT_KW_DECAY[rule])
    for got, want, what in zip(gpu, cpu, ("p", "s0", "s1", "s2")):
        assert_within(got, want, TINY, 0.0, f"{rule} {what}")
    np.testing.assert_allclose(ng, nc, rtol=1e-13)


# --- the flush itself, on any CUDA kernel ------------------------------------------------------

_PROBE = r"""
template <typename T>
__global__ void fg_probe(const T* x, T* out, double s)
{
    // Products before, between and after barriers (the emulator switches
    // threads there): each thread scales its element by s at run time.
    const int i = threadIdx.x;
    out[i] = x[i] * T(s);
    __syncthreads();
    out[blockDim.x + i] = x[i] * T(s);
    __syncthreads();
    out[2 * blockDim.x + i] = x[i] * T(s);
}
"""


@pytest.mark.cuda
def test_flush_applies_to_float_instantiations_only(cp, cuda_be, rng):
    """A float32 kernel flushes through its barriers; its double twin keeps
    subnormals; the host's own float32 arithmetic keeps them after the
    launch (the emulator restores the host's floating-point mode)."""
    mod = cp.RawModule(code=_PROBE, options=("--std=c++17",),
                       name_expressions=["fg_probe<float>", "fg_probe<double>"])
    x32 = np.concatenate([subnormal32(rng, 29), np.float32([1.5, -TINY, 0.0])])
    out32 = cuda_be.alloc(3 * x32.size, np.float32, fill=np.nan)
    mod.get_function("fg_probe<float>")((1,), (x32.size,),
                                        (cuda_be.to_device(x32), out32, np.float64(1.0)))
    np.testing.assert_array_equal(to_numpy(out32), np.tile(flush(x32), 3))
    x64 = subnormal64(rng, 32)
    out64 = cuda_be.alloc(3 * x64.size, np.float64, fill=np.nan)
    mod.get_function("fg_probe<double>")((1,), (x64.size,),
                                         (cuda_be.to_device(x64), out64, np.float64(1.0)))
    np.testing.assert_array_equal(to_numpy(out64), np.tile(x64, 3))
    half = np.float32(TINY) * np.float32(0.5)        # host arithmetic after a float32 launch
    assert half == np.float32(2.0 ** -127)
