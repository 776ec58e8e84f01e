"""``FusedMLP``: a ``torch.nn.Module`` MLP on fastgrad's fused dense kernels.

The forward and backward of the whole MLP are one ``torch.autograd.Function``
whose layers run ``fastgrad.kernels.cpu.dense_torch``: per layer one BLAS
GEMM and ONE elementwise pass (bias + activation forward; activation
derivative + bias gradient backward), on the tensors' storage (no copies;
the weights in torch's ``(n_out, n_in)`` layout).  PyTorch's ``nn.Linear`` +
activation module run a GEMM plus separate passes for the bias, the
activation and each derivative.

The module's children are the ``nn.Linear`` and activation modules of the
equivalent ``nn.Sequential`` (the one ``fastgrad.interop.to_torch`` builds for
``fastgrad.MLP``), under the same indices, so ``state_dict`` keys are
``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ... and a state dict moves
between the two unchanged; :meth:`FusedMLP.to_sequential` builds that
``nn.Sequential``.  The children hold the parameters only; ``forward`` runs
the fused kernels, never the children's forwards.
"""
from types import SimpleNamespace

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..interop import _torch_activation
from ..kernels.cpu import activations as _acts
from ..kernels.cpu.dense_torch import dense_backward_t, dense_forward_t
from ..ops import resolve_activation

__all__ = ["FusedMLP"]


class _FastgradActivation(torch.nn.Module):
    """An activation of fastgrad's registry that torch has no module for: a
    parameter-free placeholder keeping the child indices of the equivalent
    ``nn.Sequential`` (its forward runs fastgrad's kernel, without autograd)."""

    def __init__(self, name, alpha):
        super().__init__()
        self.name, self.alpha = name, alpha

    def forward(self, x):
        from ..ops import activation_forward
        return torch.from_numpy(activation_forward(x.detach().numpy(), self.name, self.alpha))

    def extra_repr(self):
        return f"{self.name!r}, alpha={self.alpha}"


def _torch_module(name, alpha):
    """The torch module of activation ``name`` (None for identity)."""
    try:
        return _torch_activation(SimpleNamespace(activation=name, alpha=alpha), torch)
    except ValueError:
        return _FastgradActivation(name, alpha)


class _FusedMLPFunction(torch.autograd.Function):
    """``x -> a_L`` through every layer; inputs ``x, plan, w0, b0, w1, b1, ...``."""

    @staticmethod
    def forward(ctx, x, plan, *wb):
        xs = x.detach().numpy()
        acts, zs = [xs], []
        for i, (code, alpha) in enumerate(plan):
            w = wb[2 * i].detach().numpy()
            b = wb[2 * i + 1].detach().numpy()
            a = np.empty((xs.shape[0], w.shape[0]), w.dtype)
            z = np.empty_like(a) if code in _acts.NEEDS_Z else a
            dense_forward_t(acts[-1], w, b, z, a, code, alpha)
            acts.append(a)
            zs.append(z)
        out = torch.from_numpy(acts[-1])
        ctx.plan = plan
        ctx.hidden = (acts[:-1], zs)       # kept as arrays: the kernels' own buffers
        ctx.save_for_backward(*wb, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        *wb, out = ctx.saved_tensors
        acts, zs = ctx.hidden
        acts = acts + [out.numpy()]
        da = grad_out.detach()
        if da.dtype != out.dtype:
            da = da.to(out.dtype)
        da = da.contiguous().numpy()
        grads = [None] * len(wb)
        dx = None
        for i in range(len(ctx.plan) - 1, -1, -1):
            code, alpha = ctx.plan[i]
            w = wb[2 * i].numpy()
            x, a = acts[i], acts[i + 1]
            dz = np.empty_like(a)
            dw = np.empty_like(w)
            db = np.empty(w.shape[0], w.dtype)
            need_dx = i > 0 or ctx.needs_input_grad[0]
            dx = np.empty_like(x) if need_dx else dz[:0, :0]
            dense_backward_t(x, w, a, zs[i], da, dz, dw, db, dx, code, alpha, need_dx)
            grads[2 * i] = torch.from_numpy(dw)
            grads[2 * i + 1] = torch.from_numpy(db)
            da = dx
        dx = torch.from_numpy(dx) if ctx.needs_input_grad[0] else None
        return (dx, None, *grads)


class FusedMLP(torch.nn.Module):
    """A multilayer perceptron whose forward and backward are fastgrad's fused
    dense kernels, as a ``torch.nn.Module`` (CPU, float32/float64).

    Parameters
    ----------
    sizes : sequence of int
        ``[n_in, hidden..., n_out]`` (at least two entries, all >= 1).
    activation : str
        Hidden activation, any name of fastgrad's registry
        (``fastgrad.kernels.cpu.activations.CODES``).
    output_activation : str or None
        Activation of the last layer (None: identity, e.g. logits).
    alpha : float or None
        Parameter of leaky_relu / elu (None: their defaults).
    dtype : torch.float32 (default) or torch.float64
        The parameters' dtype.

    Notes
    -----
    The weights start as in ``nn.Linear`` (Kaiming-uniform; seed with
    ``torch.manual_seed``).  Inputs are ``(..., n_in)`` tensors of the
    module's dtype on the CPU; other dtypes or devices raise TypeError.
    fastgrad's layer features (norm, dropout, residual, weight norm) are not
    offered by this module; use ``fastgrad.Sequential`` for them.
    """

    def __init__(self, sizes, activation="relu", output_activation=None, alpha=None,
                 dtype=torch.float32):
        super().__init__()
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(n, bool) or not isinstance(n, (int, np.integer))
                                 or n < 1 for n in sizes):
            raise ValueError(f"sizes must be at least two integers >= 1, got {sizes!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        hidden = resolve_activation(activation, alpha)
        last = resolve_activation(output_activation, alpha)
        self.sizes = [int(n) for n in sizes]
        self.activation = activation
        self.output_activation = output_activation
        names = [activation] * (len(sizes) - 2) + [output_activation or "identity"]
        self._plan = tuple([hidden] * (len(sizes) - 2) + [last])
        self._linears = []
        mods = []
        for (n_in, n_out), name, (_, a) in zip(zip(sizes[:-1], sizes[1:]), names, self._plan):
            lin = torch.nn.Linear(n_in, n_out, dtype=dtype)
            mods.append(lin)
            self._linears.append(lin)
            act = _torch_module(name, a)
            if act is not None:
                mods.append(act)
        for i, m in enumerate(mods):
            self.add_module(str(i), m)

    def forward(self, x):
        wb = []
        for lin in self._linears:
            wb += [lin.weight, lin.bias]
        dt = wb[0].dtype
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"FusedMLP expects a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu" or any(t.device.type != "cpu" for t in wb):
            raise TypeError(f"FusedMLP runs on the CPU; got an input on {x.device}")
        if x.dtype != dt or any(t.dtype != dt for t in wb):
            raise TypeError(f"FusedMLP: input dtype {x.dtype}, parameters "
                            f"{sorted({str(t.dtype) for t in wb})}; expected one of "
                            "torch.float32 / torch.float64 for all")
        n_in = self.sizes[0]
        if x.ndim < 1 or x.shape[-1] != n_in:
            raise ValueError(f"FusedMLP: expected input shape (..., {n_in}), got "
                             f"{tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, n_in).contiguous()
        if x2.shape[0] == 0:
            raise ValueError(f"FusedMLP: empty batch of shape {tuple(x.shape)}")
        out = _FusedMLPFunction.apply(x2, self._plan, *(t.contiguous() for t in wb))
        return out.reshape(*lead, self.sizes[-1])

    def to_sequential(self):
        """The equivalent ``torch.nn.Sequential`` (a deep copy of the children:
        the same modules, weights and ``state_dict`` keys)."""
        import copy
        return torch.nn.Sequential(*(copy.deepcopy(m) for m in self.children()))

    def extra_repr(self):
        return (f"sizes={self.sizes}, activation={self.activation!r}, "
                f"output_activation={self.output_activation!r}")
