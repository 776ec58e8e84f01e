"""PyTorch interop: models both ways, and zero-copy arrays through DLPack.

* :func:`from_torch` turns a ``torch.nn.Sequential`` of layers -- each an
  ``nn.Linear`` (plain or weight-normalised), then optionally
  ``BatchNorm1d``/``LayerNorm``, one supported activation module and
  ``nn.Dropout``, or a :class:`ResidualBlock` around one such square layer --
  into a fastgrad :class:`~fastgrad.Sequential` with the same weights
  (transposed: torch's ``Linear.weight`` is ``(out, in)``, fastgrad's ``W``
  is ``(in, out)``).
* :func:`to_torch` builds the equivalent ``nn.Sequential`` (a copy, in the
  model's dtype, on the model's device); ``from_torch(to_torch(model))`` is
  the same model bit for bit.
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
    nn.GELU()                    gelu (exact, erf)
    nn.GELU(approximate="tanh")  gelu_tanh
    nn.SiLU                      silu
    nn.Identity / nothing        identity

``nn.Softplus`` switches to ``z`` above its ``threshold`` (20), and so does
fastgrad's softplus: the two agree there in float32 and float64 alike.

The table is ``fastgrad.registry`` (each activation's ``torch`` twin); an
activation registered with ``torch=`` maps both ways too.

torch is imported only inside these functions: fastgrad does not need it.
"""
import numpy as np

from . import device as _device
from . import epilogue as _epilogue
from . import registry as _registry
from .backend import backend_of

__all__ = ["from_torch", "to_torch", "as_torch", "from_dlpack"]

_TORCH_DTYPES = ("float32", "float64")


def _torch():
    try:
        import torch
    except ImportError as exc:        # pragma: no cover - depends on the install
        raise ImportError("fastgrad.interop needs PyTorch: pip install 'fastgrad[peers]' "
                          "(torch 2.13.0; README: its CPU build)") from exc
    return torch


# --- torch -> fastgrad --------------------------------------------------------

def _kwargs_text(kwargs):
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _activation_of(mod, torch):
    """(name, alpha) for a module an activation of ``fastgrad.registry``
    names as its torch twin, else None; ValueError when the class matches
    but a setting does not (e.g. Softplus(beta=2))."""
    cls = type(mod)
    if getattr(torch.nn, cls.__name__, None) is not cls:
        cls_matches = []
    else:
        cls_matches = [s for s in _registry.specs()
                       if s.torch is not None and s.torch.module == cls.__name__]
    for spec in cls_matches:
        if all(getattr(mod, k, None) == v for k, v in spec.torch.kwargs.items()):
            alpha = None if spec.torch.alpha is None else float(getattr(mod, spec.torch.alpha))
            return spec.name, alpha
    if cls_matches:
        forms = " or ".join(f"nn.{s.torch.module}({_kwargs_text(s.torch.kwargs)}) ({s.name})"
                            for s in cls_matches)
        raise ValueError(f"unsupported module {mod!r}: fastgrad has {forms} only")
    return None


def _is_residual_block(mod):
    # By identity: a user's own class of that name may compute anything
    # (relu(x + body(x)), ...).  A block pickled by another process is this
    # class too: unpickling looks it up as fastgrad.interop.ResidualBlock.
    return type(mod) is _residual_class()


def _flatten(seq, torch):
    nn = torch.nn
    out = []
    for mod in seq:
        if type(mod) in (nn.Sequential, nn.ModuleList):
            out.extend(_flatten(mod, torch))
        else:
            out.append(mod)
    return out


def _host(t, torch):
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _pieces(place):
    return [p for p in _epilogue.PIECES if p.torch.place == place]


class _Spec:
    """One fastgrad Dense being read from torch modules: its Linear, the
    epilogue pieces' settings and the module each piece was read from."""

    def __init__(self, lin, torch):
        self.lin = lin
        self.settings = _epilogue.defaults()
        self.settings.update(activation="identity", alpha=None)
        self.found = {}                # piece name -> its module (or what it read)
        for piece in _pieces("linear"):
            got = piece.torch.read(lin, torch, lin.out_features)
            if got is not None:
                self.found[piece.name] = got
                self.settings.update({f.name: got[f.name] for f in piece.fields})
        # What came last: 0 the Linear, i + 1 the i-th "after" piece, a
        # whole wrapping block (nothing may follow it in the same layer).
        self.stage = 0


_AFTER = _pieces("after")
_WRAPPED = len(_AFTER) + 1


def _read_layers(mods, torch, where=""):
    """[_Spec] of a flat list of torch modules, in fastgrad's layer grammar:
    Linear, then optionally a norm, an activation, a Dropout."""
    nn = torch.nn
    specs = []
    for i, mod in enumerate(mods):
        name = f"{where}{i}"
        if type(mod) is nn.Linear or (isinstance(mod, nn.Linear)
                                      and nn.utils.parametrize.is_parametrized(mod)):
            specs.append(_Spec(mod, torch))   # parametrized: weight_norm's ParametrizedLinear
            continue
        if _is_residual_block(mod):
            inner = _read_layers(_flatten(mod.body, torch), torch, where=f"{name}.body.")
            if len(inner) != 1:
                raise ValueError(f"module {name} ({type(mod).__name__}) holds {len(inner)} "
                                 "Linear layers; a fastgrad residual block wraps exactly one")
            spec = inner[0]
            if spec.settings["residual"]:
                raise ValueError(f"module {name}: a residual block inside a residual block "
                                 "(x + (x + f(x))) has no fastgrad form")
            if spec.lin.in_features != spec.lin.out_features:
                raise ValueError(f"module {name}: a residual block needs a square Linear, got "
                                 f"{spec.lin!r}")
            spec.settings["residual"], spec.stage = True, _WRAPPED
            specs.append(spec)
            continue
        last = specs[-1] if specs else None
        if last is None:
            raise ValueError(f"module {name} ({mod!r}) comes before any nn.Linear; "
                             "fastgrad layers start with a Linear")
        if last.stage == _WRAPPED:
            raise ValueError(f"module {name} ({mod!r}) follows a residual block; put it "
                             "inside the block's body or after a Linear")
        for stage, piece in enumerate(_AFTER, 1):
            try:
                got = piece.torch.read(mod, torch, last.lin.out_features)
            except ValueError as exc:
                raise ValueError(f"module {name}: {exc}") from None
            if got is not None:
                break
        else:
            raise ValueError(f"unsupported module {name}: {mod!r}; from_torch converts "
                             "nn.Linear (plain or weight-normalised), BatchNorm1d, LayerNorm, "
                             "Dropout, fastgrad.interop.ResidualBlock and the activations "
                             f"{_torch_activation_list()}")
        if got == {"activation": "identity", "alpha": None}:
            continue                         # nn.Identity: nothing to record
        if last.stage >= stage:
            raise ValueError(f"module {name} ({mod!r}) {piece.torch.misplaced}")
        last.settings.update(got)
        last.found[piece.name], last.stage = mod, stage
        try:
            piece.check(
                {f.name: last.settings[f.name] for f in piece.fields},
                last.lin.in_features, last.lin.out_features)
        except ValueError as exc:
            raise ValueError(f"module {name} ({mod!r}): {exc}") from None
    return specs


def from_torch(seq, dtype=None, device=None):
    """A fastgrad Sequential with the layers and weights of a torch model.

    Parameters
    ----------
    seq : torch.nn.Sequential (or nn.ModuleList; nested ones are flattened)
        Layers in fastgrad's grammar: ``nn.Linear``, then optionally
        ``nn.BatchNorm1d`` / ``nn.LayerNorm`` (eps 1e-5; batch norm with
        momentum 0.1, its running statistics copied), a supported activation
        (see the module docstring), ``nn.Dropout``; a
        :class:`ResidualBlock` wraps one such square layer.  The Linear may
        be weight-normalised over ``dim=0``
        (``torch.nn.utils.parametrizations.weight_norm`` or the older
        ``torch.nn.utils.weight_norm``).  ``Linear(bias=False)`` gets a zero
        bias.  What :func:`to_torch` emits reads back bit for bit.
    dtype : "float32" | "float64" | None
        None: the Linear weights' dtype (float32 or float64, all alike).
    device : "auto" | "cpu" | "cuda" | None
        Where the fastgrad model lives (None: ``fastgrad.get_device()``).

    Returns
    -------
    fastgrad.Sequential
        A copy: later changes to either model do not reach the other.  Its
        layers record ``init="zeros"`` (the weights come from torch); the
        model is in the torch module's mode (train or eval), as a copy of
        the module would be.

    Raises
    ------
    TypeError
        ``seq`` is not an nn.Sequential, or the weights' dtype is not
        float32/float64 (with ``dtype=None``) or differs between layers.
    ValueError
        An unsupported module or setting (named in the message: Softplus
        with beta != 1, BatchNorm1d with another
        momentum, ...), modules out of fastgrad's order, or no Linear at all.
    """
    torch = _torch()
    from .layers import Sequential, dense_from_settings

    nn = torch.nn
    if not isinstance(seq, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"from_torch expects a torch.nn.Sequential, got {type(seq).__name__}")
    specs = _read_layers(_flatten(seq, torch), torch)
    if not specs:
        raise ValueError("the torch model holds no nn.Linear layer")
    if dtype is None:
        names = set()
        for sp in specs:
            tensors = [t for _, t in sp.lin.named_parameters()]
            names |= {str(t.dtype).replace("torch.", "") for t in tensors}
        if len(names) != 1:
            raise TypeError(f"the Linear layers mix dtypes {sorted(names)}; pass dtype=")
        name = names.pop()
        if name not in _TORCH_DTYPES:
            raise TypeError(f"unsupported weight dtype {name}; expected float32 or float64 "
                            "(or pass dtype= to convert)")
        dtype = name
    layers = [dense_from_settings(sp.lin.in_features, sp.lin.out_features, "zeros",
                                  sp.settings) for sp in specs]
    model = Sequential(layers, dtype=dtype, device=device)
    xp = model._xp

    def copy(dst, t):
        dst[...] = xp.asarray(_host(t, torch))

    with torch.no_grad():
        for layer, sp in zip(model.layers, specs):
            if not layer.weight_norm:
                copy(layer.W, sp.lin.weight.T)
            if sp.lin.bias is not None:
                copy(layer.b, sp.lin.bias)
            for piece in _epilogue.PIECES:
                if piece.name in sp.found and piece.torch.load is not None:
                    piece.torch.load(layer, sp.found[piece.name], copy)
    model._refresh_weight_norm()
    model.train(bool(seq.training))
    return model


# --- fastgrad -> torch --------------------------------------------------------

def _torch_activation_list():
    return ", ".join(f"{s.torch.module}({_kwargs_text(s.torch.kwargs)})"
                     for s in _registry.specs() if s.torch is not None)


def _torch_activation(layer, torch):
    """The activation module of ``layer`` (anything with ``activation`` and
    ``alpha``), None for identity: the activation piece's torch mapping
    (``fastgrad.torch`` builds its children with it)."""
    mods = _epilogue.piece("activation").torch.to_torch(layer, [], torch)
    return mods[0] if mods else None


_RESIDUAL_CLASS = []


def _residual_class():
    """The torch module class of a residual block, built on first use so
    that importing fastgrad never imports torch."""
    if not _RESIDUAL_CLASS:
        nn = _torch().nn

        class ResidualBlock(nn.Module):
            """``y = x + body(x)``: a fastgrad residual block in torch.

            ``body`` is an ``nn.Sequential`` of one square Linear and what
            follows it in fastgrad's order (norm, activation, dropout).
            """

            def __init__(self, body):
                super().__init__()
                if not isinstance(body, nn.Sequential):
                    body = nn.Sequential(body)
                self.body = body

            def forward(self, x):
                return x + self.body(x)

        ResidualBlock.__module__ = __name__
        ResidualBlock.__qualname__ = "ResidualBlock"
        _RESIDUAL_CLASS.append(ResidualBlock)
    return _RESIDUAL_CLASS[0]


def __getattr__(name):
    # fastgrad.interop.ResidualBlock: the class needs torch, so it is made
    # on first access (PEP 562), not at import.
    if name == "ResidualBlock":
        return _residual_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def to_torch(model):
    """The equivalent ``torch.nn.Sequential``: a copy of the weights and state.

    Each Dense becomes ``nn.Linear(n_in, n_out)`` (``weight = W.T``,
    ``bias = b``) -- weight-normalised layers through
    ``torch.nn.utils.parametrizations.weight_norm`` with fastgrad's ``v``
    and ``g`` as its ``original1`` / ``original0`` -- then its
    ``BatchNorm1d`` (with the running statistics) or ``LayerNorm``, its
    activation module (none for identity) and its ``nn.Dropout``; a
    residual block becomes a :class:`ResidualBlock` around those.  In the
    model's dtype and on its device (a CUDA model gives CUDA tensors,
    through DLPack), in the model's train/eval mode.  :func:`from_torch`
    reads the result back bit for bit (the running statistics of a float32
    model round to float32 in torch, as torch keeps them in the module's
    dtype).  See the module docstring for the softplus threshold.
    """
    torch = _torch()
    from .layers import Sequential

    if not isinstance(model, Sequential):
        raise TypeError(f"to_torch expects a fastgrad Sequential/MLP, got {type(model).__name__}")
    nn = torch.nn
    dtype = getattr(torch, np.dtype(model.dtype).name)
    blocks = []
    model._refresh_weight_norm()     # the effective W of weight-normalised layers
    # The Linear, then each piece on: those changing the Linear, those
    # following it (in epilogue order), those wrapping the layer's modules.
    order = _pieces("linear") + _pieces("after") + _pieces("wrap")
    with torch.no_grad():
        for layer in model.layers:
            W = as_torch(layer.W)
            lin = nn.Linear(layer.n_in, layer.n_out, dtype=dtype, device=W.device)
            lin.bias.copy_(as_torch(layer.b))
            lin.weight.copy_(W.T)
            mods = [lin]
            settings = _epilogue.config_of(layer)
            for piece in order:
                if piece.on(settings):
                    mods = piece.torch.to_torch(layer, mods, torch)
            blocks.extend(mods)
    return nn.Sequential(*blocks).train(model.training)


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
    return backend_of(tensor).xp.from_dlpack(tensor)      # numpy or cupy
