"""PyTorch interop: models both ways, and zero-copy arrays through DLPack.

* :func:`from_torch` turns a ``torch.nn.Sequential`` of ``nn.Linear`` layers,
  each followed by at most one supported activation module, into a fastgrad
  :class:`~fastgrad.Sequential` with the same weights (transposed: torch's
  ``Linear.weight`` is ``(out, in)``, fastgrad's ``W`` is ``(in, out)``).
* :func:`to_torch` builds the equivalent ``nn.Sequential`` (a copy, in the
  model's dtype, on the model's device).
* :func:`as_torch` / :func:`from_dlpack` share memory between NumPy/CuPy
  arrays and torch tensors through DLPack (``torch.from_dlpack``,
  ``np.from_dlpack`` / ``cupy.from_dlpack``): no copy, writes through one are
  seen through the other.  ``as_torch(model.params)`` is the whole model's
  parameters as one torch tensor.

Activations map as::

    nn.ReLU                      relu
    nn.LeakyReLU(negative_slope) leaky_relu(alpha=negative_slope), slope >= 0
    nn.ELU(alpha)                elu(alpha), alpha >= 0
    nn.Sigmoid, nn.Tanh          sigmoid, tanh
    nn.Softplus()                softplus (beta=1, threshold=20 only)
    nn.GELU(approximate="tanh")  gelu
    nn.Identity / nothing        identity

``nn.Softplus`` switches to ``z`` above its ``threshold`` (20); fastgrad's
softplus is ``max(z, 0) + log1p(exp(-|z|))`` everywhere, which differs from
``z`` by less than ``exp(-20) ~ 2.1e-9`` there: below float32 rounding of
``z > 20`` (one ulp is ~1.9e-6), but visible in float64.

torch is imported only inside these functions: fastgrad does not need it.
"""
import numpy as np

from . import device as _device

__all__ = ["from_torch", "to_torch", "as_torch", "from_dlpack"]

_TORCH_DTYPES = ("float32", "float64")


def _torch():
    try:
        import torch
    except ImportError as exc:        # pragma: no cover - depends on the install
        raise ImportError("fastgrad.interop needs PyTorch (pip install torch)") from exc
    return torch


# --- torch -> fastgrad --------------------------------------------------------

def _activation_of(mod, torch):
    """(name, alpha) for a supported activation module, else ValueError."""
    nn = torch.nn
    t = type(mod)
    if t is nn.Identity:
        return "identity", None
    if t is nn.ReLU:
        return "relu", None
    if t is nn.LeakyReLU:
        return "leaky_relu", float(mod.negative_slope)
    if t is nn.ELU:
        return "elu", float(mod.alpha)
    if t is nn.Sigmoid:
        return "sigmoid", None
    if t is nn.Tanh:
        return "tanh", None
    if t is nn.Softplus:
        if float(mod.beta) != 1.0 or float(mod.threshold) != 20.0:
            raise ValueError(f"unsupported module {mod!r}: fastgrad's softplus is "
                             "nn.Softplus(beta=1, threshold=20) only")
        return "softplus", None
    if t is nn.GELU:
        if mod.approximate != "tanh":
            raise ValueError(f"unsupported module {mod!r}: fastgrad's gelu is the tanh "
                             "approximation, nn.GELU(approximate='tanh'); exact erf GELU "
                             "is not implemented")
        return "gelu", None
    return None


def _flatten(seq, torch):
    nn = torch.nn
    out = []
    for mod in seq:
        if type(mod) in (nn.Sequential, nn.ModuleList):
            out.extend(_flatten(mod, torch))
        else:
            out.append(mod)
    return out


def from_torch(seq, dtype=None, device=None):
    """A fastgrad Sequential with the layers and weights of a torch model.

    Parameters
    ----------
    seq : torch.nn.Sequential (or nn.ModuleList; nested ones are flattened)
        ``nn.Linear`` layers, each followed by at most one supported
        activation module (see the module docstring); a Linear followed by
        none (or by ``nn.Identity``) gets the identity.  ``Linear(bias=False)``
        gets a zero bias.
    dtype : "float32" | "float64" | None
        None: the Linear weights' dtype (float32 or float64, all alike).
    device : "auto" | "cpu" | "cuda" | None
        Where the fastgrad model lives (None: ``fastgrad.get_device()``).

    Returns
    -------
    fastgrad.Sequential
        A copy: later changes to either model do not reach the other.  Its
        layers record ``init="zeros"`` (the weights come from torch).

    Raises
    ------
    TypeError
        ``seq`` is not an nn.Sequential, or the weights' dtype is not
        float32/float64 (with ``dtype=None``) or differs between layers.
    ValueError
        An unsupported module (named in the message: Dropout, BatchNorm,
        exact nn.GELU(), Softplus with beta != 1, ...), an activation with
        no Linear before it, two activations in a row, or no Linear at all.
    """
    torch = _torch()
    from . import ops
    from .layers import Dense, Sequential

    nn = torch.nn
    if not isinstance(seq, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"from_torch expects a torch.nn.Sequential, got {type(seq).__name__}")
    specs = []          # [linear, activation name, alpha, has an activation module]
    for i, mod in enumerate(_flatten(seq, torch)):
        if type(mod) is nn.Linear:
            specs.append([mod, "identity", None, False])
            continue
        act = _activation_of(mod, torch)
        if act is None:
            raise ValueError(f"unsupported module {i}: {mod!r}; from_torch converts nn.Linear "
                             "and the activations ReLU, LeakyReLU, ELU, Sigmoid, Tanh, "
                             "Softplus, GELU(approximate='tanh'), Identity")
        if act[0] == "identity":
            continue
        if not specs:
            raise ValueError(f"module {i} ({mod!r}) comes before any nn.Linear; "
                             "fastgrad layers are Linear + activation")
        if specs[-1][3]:
            raise ValueError(f"module {i} ({mod!r}) follows another activation; fastgrad "
                             "layers take one activation each")
        specs[-1][1:] = [act[0], act[1], True]
        try:
            ops.resolve_activation(act[0], act[1])
        except ValueError as exc:
            raise ValueError(f"module {i} ({mod!r}): {exc}") from None
    if not specs:
        raise ValueError("the torch model holds no nn.Linear layer")
    if dtype is None:
        names = {str(lin.weight.dtype).replace("torch.", "") for lin, *_ in specs}
        if len(names) != 1:
            raise TypeError(f"the Linear layers mix dtypes {sorted(names)}; pass dtype=")
        name = names.pop()
        if name not in _TORCH_DTYPES:
            raise TypeError(f"unsupported weight dtype {name}; expected float32 or float64 "
                            "(or pass dtype= to convert)")
        dtype = name
    layers = [Dense(lin.in_features, lin.out_features, activation=act, alpha=alpha, init="zeros")
              for lin, act, alpha, _ in specs]
    model = Sequential(layers, dtype=dtype, device=device)
    xp = model._xp
    with torch.no_grad():
        for layer, (lin, *_rest) in zip(layers, specs):
            w = lin.weight.detach().to(device="cpu", dtype=torch.float64).numpy()
            layer.W[...] = xp.asarray(w.T)
            if lin.bias is not None:
                b = lin.bias.detach().to(device="cpu", dtype=torch.float64).numpy()
                layer.b[...] = xp.asarray(b)
    return model


# --- fastgrad -> torch --------------------------------------------------------

def _torch_activation(layer, torch):
    nn = torch.nn
    name = layer.activation
    if name == "identity":
        return None
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope=layer.alpha)
    if name == "elu":
        return nn.ELU(alpha=layer.alpha)
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name == "softplus":
        return nn.Softplus()
    if name == "gelu":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation {name!r} has no torch equivalent")   # pragma: no cover


def to_torch(model):
    """The equivalent ``torch.nn.Sequential``: a copy of the weights.

    Each Dense becomes ``nn.Linear(n_in, n_out)`` (``weight = W.T``,
    ``bias = b``) followed by its activation module (none for identity), in
    the model's dtype (float32 or float64) and on its device (a CUDA model
    gives CUDA tensors, through DLPack).  See the module docstring for the
    softplus threshold.
    """
    torch = _torch()
    from .layers import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"to_torch expects a fastgrad Sequential/MLP, got {type(model).__name__}")
    nn = torch.nn
    dtype = getattr(torch, np.dtype(model.dtype).name)
    mods = []
    for i, layer in enumerate(model.layers):
        if layer.residual:
            raise ValueError(f"layer {i} is a residual block, which a torch.nn.Sequential "
                             "cannot express")
    model._refresh_weight_norm()     # the effective W of weight-normalised layers
    with torch.no_grad():
        for layer in model.layers:
            W = as_torch(layer.W)
            lin = nn.Linear(layer.n_in, layer.n_out, dtype=dtype, device=W.device)
            lin.weight.copy_(W.T)
            lin.bias.copy_(as_torch(layer.b))
            mods.append(lin)
            if layer.norm:
                nm = (nn.BatchNorm1d(layer.n_out, dtype=dtype, device=W.device)
                      if layer.norm == "batch"
                      else nn.LayerNorm(layer.n_out, dtype=dtype, device=W.device))
                nm.weight.copy_(as_torch(layer.gamma))
                nm.bias.copy_(as_torch(layer.beta))
                if layer.norm == "batch":
                    nm.running_mean.copy_(torch.as_tensor(_device.to_numpy(layer.running_mean).copy()))
                    nm.running_var.copy_(torch.as_tensor(_device.to_numpy(layer.running_var).copy()))
                mods.append(nm)
            act = _torch_activation(layer, torch)
            if act is not None:
                mods.append(act)
            if layer.dropout > 0:
                # Same rate and placement; torch draws its own masks.
                mods.append(nn.Dropout(layer.dropout))
    return nn.Sequential(*mods)


# --- DLPack -------------------------------------------------------------------

def as_torch(array):
    """A torch tensor sharing memory with a NumPy or CuPy array (DLPack).

    No copy: writing through the tensor changes the array and back.  Read-only
    NumPy arrays are refused (DLPack cannot mark them read-only).
    """
    torch = _torch()
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        raise ValueError("as_torch: the array is read-only; DLPack would hand torch a "
                         "writeable view (pass array.copy())")
    if not hasattr(array, "__dlpack__"):
        raise TypeError(f"as_torch expects a NumPy or CuPy array, got {type(array).__name__}")
    return torch.from_dlpack(array)


def from_dlpack(tensor, device=None):
    """A NumPy (CPU) or CuPy (CUDA) array sharing memory with ``tensor``.

    ``tensor`` is anything with ``__dlpack__`` (a torch tensor, a JAX array,
    ...); a torch tensor that requires grad is detached first (same memory).
    ``device`` ("cpu" | "cuda" | None) only checks where the tensor lives:
    None takes the tensor's own device.  No copy is made.
    """
    if not hasattr(tensor, "__dlpack__"):
        raise TypeError(f"from_dlpack expects a DLPack-capable tensor, got "
                        f"{type(tensor).__name__}")
    if getattr(tensor, "requires_grad", False) and hasattr(tensor, "detach"):
        tensor = tensor.detach()
    where = _device.device_of(tensor)
    if device is not None and _device.resolve(device) != where:
        raise ValueError(f"from_dlpack: the tensor lives on {where!r}, not {device!r}; "
                         "move it first (a copy)")
    if where == "cuda":
        import cupy
        return cupy.from_dlpack(tensor)
    return np.from_dlpack(tensor)
