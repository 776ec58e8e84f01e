"""PyTorch interop: from_torch / to_torch parity and DLPack sharing."""
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch interop: torch is not installed (pip install 'fastgrad[peers]')")
nn = torch.nn

import fastgrad as fg                                        # noqa: E402
from fastgrad.interop import as_torch, from_dlpack, from_torch, to_torch   # noqa: E402

TOL = {"float32": 1e-5, "float64": 1e-12}
DTYPES = ("float32", "float64")

# torch module factory and the fastgrad (activation, alpha) it maps to.
TORCH_ACTS = {
    "identity": (lambda: nn.Identity(), "identity", 0.0),
    "relu": (lambda: nn.ReLU(), "relu", 0.0),
    "leaky_relu": (lambda: nn.LeakyReLU(0.23), "leaky_relu", 0.23),
    "elu": (lambda: nn.ELU(alpha=0.6), "elu", 0.6),
    "sigmoid": (lambda: nn.Sigmoid(), "sigmoid", 0.0),
    "tanh": (lambda: nn.Tanh(), "tanh", 0.0),
    "softplus": (lambda: nn.Softplus(), "softplus", 0.0),
    "gelu": (lambda: nn.GELU(), "gelu", 0.0),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh", 0.0),
    "silu": (lambda: nn.SiLU(), "silu", 0.0),
}


def _close(got, ref, dtype, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    tol = TOL[dtype]
    err = np.max(np.abs(got - ref) / (1.0 + np.abs(ref)))
    assert err <= tol, f"{what}: max rel err {err:.3g} > {tol:g}"


def _torch_out(seq, x):
    with torch.no_grad():
        return seq(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", sorted(TORCH_ACTS))
def test_from_torch_matches_torch(rng, dtype, act):
    make, name, alpha = TORCH_ACTS[act]
    torch.manual_seed(int(rng.integers(1 << 31)))
    tdt = getattr(torch, dtype)
    seq = nn.Sequential(nn.Linear(7, 12), make(), nn.Linear(12, 9, bias=False), make(),
                        nn.Linear(9, 4)).to(tdt)
    model = from_torch(seq)
    assert model.dtype == np.dtype(dtype)
    assert [l.activation for l in model.layers] == [name, name, "identity"]
    assert model.layers[0].alpha == pytest.approx(alpha)
    np.testing.assert_array_equal(model.layers[0].W, seq[0].weight.detach().numpy().T)
    assert np.all(model.layers[1].b == 0)                   # bias=False -> zero bias
    x = rng.standard_normal((5, 7)).astype(dtype)
    _close(model.predict(x), _torch_out(seq, x), dtype, f"from_torch {act}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", sorted(TORCH_ACTS))
def test_to_torch_matches_fastgrad(rng, dtype, act):
    _, name, alpha = TORCH_ACTS[act]
    model = fg.MLP([6, 10, 8, 3], activation=name, alpha=alpha if alpha else None,
                   init="xavier_normal", dtype=dtype, seed=int(rng.integers(1 << 30)))
    model.params[...] += rng.normal(0, 0.1, model.n_params).astype(dtype)   # non-zero biases
    seq = to_torch(model)
    assert isinstance(seq, nn.Sequential)
    linears = [m for m in seq if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    assert all(m.weight.dtype == getattr(torch, dtype) for m in linears)
    np.testing.assert_array_equal(linears[1].weight.detach().numpy(), model.layers[1].W.T)
    np.testing.assert_array_equal(linears[1].bias.detach().numpy(), model.layers[1].b)
    x = rng.standard_normal((5, 6)).astype(dtype)
    _close(_torch_out(seq, x), model.predict(x), dtype, f"to_torch {act}")
    # A copy: the torch model does not share the fastgrad buffer.
    with torch.no_grad():
        linears[0].weight.zero_()
    assert np.any(model.layers[0].W != 0)
    # And back again gives the same model.
    with torch.no_grad():
        linears[0].weight.copy_(torch.from_numpy(model.layers[0].W.T.copy()))
    back = from_torch(seq)
    np.testing.assert_array_equal(back.params, model.params)
    assert [l.activation for l in back.layers] == [l.activation for l in model.layers]


def test_from_torch_dtype_conversion_and_nesting(rng):
    seq = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2))
    m64 = from_torch(seq, dtype="float64")
    assert m64.dtype == np.float64 and len(m64.layers) == 2
    np.testing.assert_array_equal(m64.layers[0].W, seq[0][0].weight.detach().double().numpy().T)
    half = nn.Sequential(nn.Linear(3, 4)).to(torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        from_torch(half)
    m = from_torch(half, dtype="float32")
    np.testing.assert_array_equal(m.layers[0].b, half[0].bias.float().detach().numpy())


@pytest.mark.parametrize("bad, match", [
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Hardtanh()), "Hardtanh"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Dropout(0.1)), "Dropout"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.2)), "BatchNorm1d"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softplus(beta=2.0)), "Softplus"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Softplus(threshold=10.0)), "Softplus"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.LeakyReLU(-0.1)), "LeakyReLU"),
    (lambda: nn.Sequential(nn.ReLU(), nn.Linear(3, 4)), "before any nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Tanh()), "follows another"),
    (lambda: nn.Sequential(nn.Tanh()), "before any nn.Linear"),
    (lambda: nn.Sequential(), "no nn.Linear"),
    (lambda: nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)), "expects 5 inputs"),
])
def test_from_torch_refuses_unsupported(bad, match):
    with pytest.raises(ValueError, match=match):
        from_torch(bad())


def test_from_torch_refuses_non_sequential():
    with pytest.raises(TypeError, match="nn.Sequential"):
        from_torch(nn.Linear(3, 4))
    mixed = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    with pytest.raises(TypeError, match="mix dtypes"):
        from_torch(mixed)


def test_to_torch_refuses_non_model():
    with pytest.raises(TypeError, match="fastgrad Sequential"):
        to_torch(nn.Linear(3, 4))


# --- DLPack ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_params_shared_with_torch_through_dlpack(dtype):
    model = fg.MLP([4, 5, 3], dtype=dtype)
    t = as_torch(model.params)
    assert t.dtype == getattr(torch, dtype) and t.shape == (model.n_params,)
    assert t.data_ptr() == model.params.ctypes.data
    # torch -> fastgrad
    t[0] = 42.0
    t[-1] = -3.5
    assert model.params[0] == 42.0 and model.layers[0].W[0, 0] == 42.0
    assert model.layers[-1].b[-1] == -3.5
    # fastgrad -> torch
    model.layers[1].W[...] = 0.25
    lo = int(model.layer_offsets[1])
    assert torch.all(t[lo:lo + 15] == 0.25)
    # An in-place torch op on the whole buffer.
    t.mul_(2.0)
    assert model.params[0] == 84.0
    # And back: from_dlpack gives a NumPy view of the same memory.
    a = from_dlpack(t)
    assert isinstance(a, np.ndarray) and np.shares_memory(a, model.params)
    a[1] = 7.0
    assert t[1].item() == 7.0 and model.params[1] == 7.0


def test_from_dlpack_of_parameter_and_checks():
    lin = nn.Linear(3, 2)
    w = from_dlpack(lin.weight)                     # requires_grad: detached, same memory
    w[0, 0] = 9.0
    assert lin.weight[0, 0].item() == 9.0
    with pytest.raises(TypeError, match="DLPack"):
        from_dlpack([1.0, 2.0])
    with pytest.raises(TypeError, match="NumPy or CuPy"):
        as_torch([1.0, 2.0])
    ro = np.zeros(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        as_torch(ro)
    assert isinstance(from_dlpack(torch.zeros(2), device="cpu"), np.ndarray)
    if "cuda" in fg.available_devices():
        with pytest.raises(ValueError, match="lives on 'cpu'"):
            from_dlpack(torch.zeros(2), device="cuda")


@pytest.mark.cuda
def test_cuda_round_trip(rng):
    cupy = pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    seq = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 2)).double().cuda()
    model = from_torch(seq, device="cuda")
    assert isinstance(model.params, cupy.ndarray)
    x = rng.standard_normal((4, 5))
    got = cupy.asnumpy(model.predict(cupy.asarray(x)))
    ref = seq(torch.from_numpy(x).cuda()).detach().cpu().numpy()
    _close(got, ref, "float64", "cuda from_torch")
    back = to_torch(model)
    assert back[0].weight.is_cuda
    t = as_torch(model.params)
    t[0] = 5.0
    assert float(model.params[0]) == 5.0


def test_from_torch_reads_only_fastgrads_residual_block():
    """A user's class named ResidualBlock computing relu(x + body(x)) was read
    as x + body(x) (outputs 0.57 off), and a block nested in a block as one
    block (2x + f(x) in torch): both are refused now."""
    import torch
    from fastgrad.interop import ResidualBlock, from_torch

    class UsersBlock(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            return torch.relu(x + self.body(x))
    UsersBlock.__name__ = UsersBlock.__qualname__ = "ResidualBlock"

    def body():
        return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    for block in (UsersBlock(body()), ResidualBlock(torch.nn.Sequential(ResidualBlock(body())))):
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), block, torch.nn.Linear(4, 2))
        with pytest.raises(ValueError, match="unsupported module|inside a residual block"):
            from_torch(net)
    # fastgrad's own block still converts, and computes what torch does
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), ResidualBlock(body()),
                              torch.nn.Linear(4, 2)).double()
    x = np.random.default_rng().standard_normal((5, 3))
    np.testing.assert_allclose(from_torch(net).predict(x),
                               net(torch.from_numpy(x)).detach().numpy(), rtol=1e-12)
