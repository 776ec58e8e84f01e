"""A dense layer's epilogue pieces: the one table of its features.

A :class:`~fastgrad.Dense` computes ``z = x W + b`` and then its *epilogue*,
the pieces of :data:`PIECES`, which apply in this order::

    weight_norm   W = g v / ||v||, before the GEMM      (Dense(weight_norm=True))
    norm          u = gamma xhat + beta                  (Dense(norm="layer"/"batch"))
    activation    f(u)                                   (Dense(activation=...))
    dropout       f * mask / (1 - p)                     (Dense(dropout=p))
    residual      y = x + ...                            (Residual(Dense(n, n)))

:data:`PIECES` lists them as their parameters lie in a layer's slice (norm's
``gamma``, ``beta`` before weight norm's ``g``).  Each piece declares, in
one :class:`Piece` entry:

* its settings: the ``Dense`` attributes, constructor arguments and
  checkpoint fields (:class:`Field`: name, JSON types, the value of a file
  written before the field existed, renames of older format versions), and
  how a value is checked (``check``: ValueError for a bad one);
* its slice of the layer's parameters (:class:`Slot`, after ``W`` and ``b``
  in :data:`PIECES` order; ``kernels/layout.py`` computes the same offsets
  for the kernels, and ``tests/test_epilogue.py`` checks that they agree)
  and its model buffers (batch norm's running statistics);
* its torch mapping (:class:`TorchMapping`: the ``torch.nn`` modules it
  becomes in :func:`fastgrad.interop.to_torch` and is read from in
  :func:`~fastgrad.interop.from_torch`);
* its float64 reference (functions of :mod:`fastgrad.reference`);
* its plan flag: the per-layer value the compiled step reads
  (:func:`plan_flags`).

The activation is a piece too, but the plain dense kernels run it: a layer
*with epilogue pieces* (``Dense.has_epilogue``, the old ``extended``) is
one that has some other piece on, and runs the epilogue kernels
(``kernels/*/blocks``, ``norm``, ``wnorm``).

Adding a piece: its kernels (CPU and CUDA, and the fused step), one entry
here, its reference in ``fastgrad/reference.py``, and tests; see
CONTRIBUTING.md.
"""
import numbers
from typing import Callable, NamedTuple, Optional, Tuple

import numpy as np

from .kernels.spec import NORM_EPS, NORM_KINDS, NORM_MOMENTUM

__all__ = ["Piece", "Slot", "Buffer", "Field", "TorchMapping", "PIECES", "piece", "names",
           "CORE_SLOTS", "param_slots", "layer_size", "layer_buffers", "plan_flags", "used_pieces",
           "check_config", "config_of", "has_epilogue", "REQUIRED"]

REQUIRED = object()
"""``Field.absent`` of a field every checkpoint has (a file without it is refused)."""


class Slot(NamedTuple):
    """A parameter array of a layer: a slice of the model's flat buffers."""
    name: str                 # layer attribute and state-dict suffix ("gamma")
    grad: str                 # layer attribute of its gradient view ("dgamma")
    matrix: bool = False      # (n_in, n_out) row-major; else n_out long
    fill: Optional[float] = None   # value written when the layer is placed (None: left as is)


class Buffer(NamedTuple):
    """Model state that is not a parameter (no gradient, not optimised):
    ``model.<name>`` (float64, one entry per output unit of every layer),
    viewed as ``layer.<name>``, saved as the checkpoint tensor ``<name>``."""
    name: str
    fill: float


class Field(NamedTuple):
    """A setting of a piece: Dense attribute, constructor argument and key
    of the layer's entry in a checkpoint's metadata."""
    name: str
    types: tuple              # JSON types a checkpoint may hold (bool is not int here)
    absent: object = REQUIRED  # value of files written before the field existed
    # {format version v: {old value: value}}: files older than v meant the new value
    renamed_before: Optional[dict] = None


class TorchMapping(NamedTuple):
    """How a piece maps to ``torch.nn`` (both directions).

    ``place``: "linear" (changes the ``nn.Linear`` itself), "after" (modules
    following the Linear in :data:`PIECES` order) or "wrap" (a module
    around the layer's modules).  ``to_torch(layer, mods, torch)`` returns the
    layer's new module list; ``read(mod, torch, n_out)`` the piece's
    settings for a module it owns (a dict), None for a module not its own,
    and raises ValueError for its module with settings fastgrad lacks;
    ``load(layer, mod, copy)`` copies the module's state into the placed
    layer.  ``misplaced``: the error text when its module comes out of
    order."""
    modules: Tuple[str, ...]
    place: str
    to_torch: Callable
    read: Optional[Callable] = None
    load: Optional[Callable] = None
    misplaced: str = ""


class Piece(NamedTuple):
    """One epilogue piece: everything fastgrad knows of it outside its kernels."""
    name: str
    fields: Tuple[Field, ...]
    check: Callable           # (settings dict, n_in, n_out) -> dict of layer attributes
    on: Callable              # (settings mapping) -> bool: the piece is present
    torch: TorchMapping
    reference: Tuple[str, ...]     # fastgrad.reference functions (forward, backward)
    plan: Tuple[str, Callable, type]   # (name, settings -> value, dtype) the step reads
    slots: Tuple[Slot, ...] = ()   # parameters after W and b, when on
    renames: Tuple[Tuple[str, Slot], ...] = ()   # core slots it replaces, when on
    buffers: Tuple[Buffer, ...] = ()   # model buffers, when buffers_on
    buffers_on: Optional[Callable] = None   # (settings) -> bool; None: when on
    plain: bool = False       # the plain dense kernels run it (no epilogue kernels needed)


# --- the settings of each piece ----------------------------------------------

def _check_norm(s, n_in, n_out):
    norm = s["norm"]
    if not (norm is None or (isinstance(norm, str) and norm in NORM_KINDS)):
        raise ValueError(f"norm must be None, 'layer' or 'batch', got {norm!r}")
    return {"norm": norm}


def _check_activation(s, n_in, n_out):
    from . import ops
    name = "identity" if s["activation"] is None else s["activation"]
    code, alpha = ops.resolve_activation(name, s["alpha"])
    return {"activation": name, "alpha": alpha, "code": code}


def dropout_rate(p):
    """``p`` as a float in [0, 1); ValueError otherwise."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {p!r}")
    return float(p)


def _check_dropout(s, n_in, n_out):
    return {"dropout": dropout_rate(s["dropout"])}


def _check_residual(s, n_in, n_out):
    residual = s["residual"]
    if not isinstance(residual, (bool, np.bool_)):
        raise ValueError(f"residual must be True or False, got {residual!r}")
    if residual and n_in != n_out:
        raise ValueError(f"a residual block needs n_in == n_out, got {n_in}, {n_out}")
    return {"residual": bool(residual)}


def _check_weight_norm(s, n_in, n_out):
    wn = s["weight_norm"]
    if not isinstance(wn, (bool, np.bool_)):
        raise ValueError(f"weight_norm must be True or False, got {wn!r}")
    return {"weight_norm": bool(wn)}


# --- torch, each piece's side (torch is passed in: fastgrad never imports it) ---

def _as_torch(a):
    from .interop import as_torch
    return as_torch(a)


def _norm_to_torch(layer, mods, torch):
    nn, W = torch.nn, mods[0].weight
    kw = {"dtype": W.dtype, "device": W.device}
    nm = (nn.BatchNorm1d(layer.n_out, **kw) if layer.norm == "batch"
          else nn.LayerNorm(layer.n_out, **kw))
    nm.weight.copy_(_as_torch(layer.gamma))
    nm.bias.copy_(_as_torch(layer.beta))
    if layer.norm == "batch":
        from .device import to_numpy
        nm.running_mean.copy_(torch.as_tensor(to_numpy(layer.running_mean).copy()))
        nm.running_var.copy_(torch.as_tensor(to_numpy(layer.running_var).copy()))
    return mods + [nm]


def _norm_read(mod, torch, n_out):
    nn = torch.nn
    if type(mod) is nn.BatchNorm1d:
        if not (mod.affine and mod.track_running_stats and mod.eps == NORM_EPS
                and mod.momentum == NORM_MOMENTUM):
            raise ValueError(f"unsupported module {mod!r}: fastgrad's batch norm is "
                             "BatchNorm1d(n, eps=1e-5, momentum=0.1, affine=True, "
                             "track_running_stats=True)")
        kind, width = "batch", mod.num_features
    elif type(mod) is nn.LayerNorm:
        if not (mod.elementwise_affine and mod.bias is not None and mod.eps == NORM_EPS
                and len(mod.normalized_shape) == 1):
            raise ValueError(f"unsupported module {mod!r}: fastgrad's layer norm is "
                             "LayerNorm(n, eps=1e-5) with its affine weight and bias")
        kind, width = "layer", mod.normalized_shape[0]
    else:
        return None
    if width != n_out:
        raise ValueError(f"module {mod!r} normalises {width} features but its Linear gives "
                         f"{n_out}")
    return {"norm": kind}


def _norm_load(layer, mod, copy):
    copy(layer.gamma, mod.weight)
    copy(layer.beta, mod.bias)
    if layer.norm == "batch":
        copy(layer.running_mean, mod.running_mean)
        copy(layer.running_var, mod.running_var)


def _activation_to_torch(layer, mods, torch):
    from . import registry
    spec = registry.get(layer.activation)
    if spec is None or spec.torch is None:
        raise ValueError(f"activation {layer.activation!r} has no torch equivalent "
                         "(register it with torch=TorchTwin(...))")
    if spec.name == "identity":
        return mods
    kwargs = dict(spec.torch.kwargs)
    if spec.torch.alpha is not None:
        kwargs[spec.torch.alpha] = layer.alpha
    cls = getattr(torch.nn, spec.torch.module, None)
    if not isinstance(cls, type):
        raise ValueError(f"activation {layer.activation!r}: its torch twin names "
                         f"torch.nn.{spec.torch.module}, which this torch does not have")
    return mods + [cls(**kwargs)]


def _activation_read(mod, torch, n_out):
    from .interop import _activation_of
    act = _activation_of(mod, torch)
    return None if act is None else {"activation": act[0], "alpha": act[1]}


def _dropout_to_torch(layer, mods, torch):
    # Same rate and placement; torch draws its own masks.
    return mods + [torch.nn.Dropout(layer.dropout)]


def _dropout_read(mod, torch, n_out):
    if type(mod) is not torch.nn.Dropout:
        return None
    p = float(mod.p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"module {mod!r}: fastgrad's dropout needs p in [0, 1)")
    return {"dropout": p}


def _residual_to_torch(layer, mods, torch):
    from .interop import _residual_class
    return [_residual_class()(torch.nn.Sequential(*mods))]


def _weight_norm_to_torch(layer, mods, torch):
    lin = torch.nn.utils.parametrizations.weight_norm(mods[0], dim=0)
    plist = lin.parametrizations.weight
    plist.original0.copy_(_as_torch(layer.g).reshape(layer.n_out, 1))
    plist.original1.copy_(_as_torch(layer.v).T)
    return [lin] + mods[1:]


def _weight_norm_read(lin, torch, n_out):
    """``{"weight_norm": True, "v": (out, in), "g": (out,)}`` (float64 torch
    tensors) of a weight-normalised Linear, None for a plain one.

    Reads ``torch.nn.utils.parametrizations.weight_norm``
    (``parametrizations.weight.original0/1``) and the older
    ``torch.nn.utils.weight_norm`` (``weight_g``, ``weight_v``), both over
    ``dim=0`` (one norm per output unit, fastgrad's)."""
    par = getattr(lin, "parametrizations", None)
    if par is not None and "weight" in par:
        plist = par["weight"]
        kinds = [type(p).__name__ for p in plist]
        if kinds != ["_WeightNorm"] or getattr(plist[0], "dim", 0) != 0:
            raise ValueError(f"unsupported parametrization {kinds} of {lin!r}: fastgrad reads "
                             "weight_norm(module, dim=0) only")
        g, v = plist.original0, plist.original1
    elif hasattr(lin, "weight_g") and hasattr(lin, "weight_v"):
        g, v = lin.weight_g, lin.weight_v
    else:
        return None
    if tuple(g.shape) != (n_out, 1):
        raise ValueError(f"weight_norm of {lin!r} is not over dim=0 (g has shape "
                         f"{tuple(g.shape)})")
    return {"weight_norm": True, "v": v, "g": g.reshape(n_out)}


def _weight_norm_load(layer, found, copy):
    copy(layer.v, found["v"].T)
    copy(layer.g, found["g"])


# --- the table ---------------------------------------------------------------

_BOOL = (bool,)
_NUMBER = (int, float)

PIECES = (
    Piece("norm",
          fields=(Field("norm", (str, type(None)), None),),
          check=_check_norm,
          on=lambda s: s["norm"] is not None,
          slots=(Slot("gamma", "dgamma", fill=1.0), Slot("beta", "dbeta")),
          buffers=(Buffer("running_mean", 0.0), Buffer("running_var", 1.0)),
          buffers_on=lambda s: s["norm"] == "batch",
          torch=TorchMapping(("BatchNorm1d", "LayerNorm"), "after", _norm_to_torch,
                             _norm_read, _norm_load,
                             "must directly follow its nn.Linear (fastgrad normalises before "
                             "the activation)"),
          reference=("norm_forward", "norm_backward"),
          plan=("norms", lambda s: NORM_KINDS[s["norm"]], np.int64)),
    Piece("activation",
          fields=(Field("activation", (str,), renamed_before={2: {"gelu": "gelu_tanh"}}),
                  Field("alpha", _NUMBER)),
          check=_check_activation,
          on=lambda s: True,
          # the built-ins' modules; each activation's twin is its registry entry's
          torch=TorchMapping(("Identity", "ReLU", "LeakyReLU", "ELU", "Sigmoid", "Tanh",
                              "Softplus", "GELU", "SiLU"), "after",
                             _activation_to_torch, _activation_read, None,
                             "follows another activation or a Dropout; fastgrad layers take "
                             "one activation, before dropout"),
          reference=("activation", "activation_grad"),
          plan=("codes", lambda s: _check_activation(s, 0, 0)["code"], np.int64),
          plain=True),
    Piece("dropout",
          fields=(Field("dropout", _NUMBER, 0.0),),
          check=_check_dropout,
          on=lambda s: s["dropout"] > 0,
          torch=TorchMapping(("Dropout",), "after", _dropout_to_torch, _dropout_read, None,
                             "follows another Dropout"),
          reference=("dropout_mask", "block_forward", "block_backward"),
          plan=("drops", lambda s: s["dropout"], np.float64)),
    Piece("residual",
          fields=(Field("residual", _BOOL, False),),
          check=_check_residual,
          on=lambda s: s["residual"],
          torch=TorchMapping(("fastgrad.interop.ResidualBlock",), "wrap", _residual_to_torch),
          reference=("block_forward", "block_backward"),
          plan=("residual", lambda s: int(s["residual"]), np.int64)),
    Piece("weight_norm",
          fields=(Field("weight_norm", _BOOL, False),),
          check=_check_weight_norm,
          on=lambda s: s["weight_norm"],
          slots=(Slot("g", "dg"),),
          torch=TorchMapping(("torch.nn.utils.parametrizations.weight_norm",), "linear",
                             _weight_norm_to_torch, _weight_norm_read, _weight_norm_load),
          reference=("weight_norm", "weight_norm_backward"),
          plan=("wn", lambda s: int(s["weight_norm"]), np.int64),
          # the parameter where W would be is the direction v; W is recomputed
          renames=(("W", Slot("v", "dv", matrix=True)),)),
)

_BY_NAME = {p.name: p for p in PIECES}
assert len(_BY_NAME) == len(PIECES)

# Every layer owns W then b; the pieces' slots follow, in PIECES order.
CORE_SLOTS = (Slot("W", "dW", matrix=True), Slot("b", "db"))

FIELDS = tuple(f for p in PIECES for f in p.fields)
FIELD_NAMES = tuple(f.name for f in FIELDS)


def names():
    """The piece names, in :data:`PIECES` order (their slots' order)."""
    return tuple(_BY_NAME)


def piece(name):
    """The :class:`Piece` called ``name``; ValueError for an unknown one."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown epilogue piece {name!r}; expected one of "
                         f"{list(_BY_NAME)}") from None


# --- settings ----------------------------------------------------------------

def defaults():
    """``{field: value}`` of every field that has an ``absent`` value (the
    value of a file without it: the piece off); the activation's fields,
    which every file has, are left out."""
    return {f.name: f.absent for f in FIELDS if f.absent is not REQUIRED}


def check_config(settings, n_in, n_out):
    """The layer attributes for ``settings`` (every field of every piece;
    an unknown name raises ValueError), each piece's ``check`` applied."""
    unknown = set(settings) - set(FIELD_NAMES)
    if unknown:
        raise ValueError(f"unknown epilogue setting(s) {sorted(unknown)}; the pieces "
                         f"{list(_BY_NAME)} have {list(FIELD_NAMES)}")
    attrs = {}
    for p in PIECES:
        attrs.update(p.check({f.name: settings[f.name] for f in p.fields}, n_in, n_out))
    return attrs


def config_of(layer):
    """A layer's settings, ``{field: value}`` over every piece (a Residual
    reads as its Dense)."""
    return {name: getattr(layer, name) for name in FIELD_NAMES}


def _settings(layer_or_config):
    return layer_or_config if isinstance(layer_or_config, dict) else config_of(layer_or_config)


def has_epilogue(layer_or_config):
    """True when some piece the plain kernels do not run is on."""
    s = _settings(layer_or_config)
    return any(p.on(s) for p in PIECES if not p.plain)


def upgrade(settings, version):
    """``settings`` of a checkpoint of format ``version`` as this version
    reads them (each field's ``renamed_before``)."""
    out = dict(settings)
    for f in FIELDS:
        for before, table in sorted((f.renamed_before or {}).items()):
            if version < before and out.get(f.name) in table:
                out[f.name] = table[out[f.name]]
    return out


# --- layout ------------------------------------------------------------------

def param_slots(layer_or_config, n_in, n_out, offset=0):
    """``[(Slot, start, stop)]`` of a layer at ``offset``: W (or v) and b,
    then every piece's slots in PIECES order.  ``kernels/layout.py`` is the
    kernels' copy of this arithmetic."""
    s = _settings(layer_or_config)
    on = [p for p in PIECES if p.on(s)]
    renamed = {name: slot for p in on for name, slot in p.renames}
    slots = [renamed.get(slot.name, slot) for slot in CORE_SLOTS]
    for p in on:
        slots.extend(p.slots)
    out, start = [], offset
    for slot in slots:
        stop = start + (n_in * n_out if slot.matrix else n_out)
        out.append((slot, start, stop))
        start = stop
    return out


def layer_size(layer_or_config, n_in, n_out):
    """How many parameters a layer with these settings owns."""
    return param_slots(layer_or_config, n_in, n_out)[-1][2]


def layer_buffers(layer_or_config):
    """The buffers (:class:`Buffer`) a layer views in its model's state."""
    s = _settings(layer_or_config)
    return tuple(b for p in PIECES if (p.on if p.buffers_on is None else p.buffers_on)(s)
                 for b in p.buffers)


def view_names():
    """Every layer attribute that is a view of the model's arrays under
    some settings: parameter slots, their gradients, buffers."""
    slots = CORE_SLOTS + tuple(x for p in PIECES for x in p.slots + tuple(r for _, r in p.renames))
    return frozenset([x.name for x in slots] + [x.grad for x in slots]
                     + [b.name for p in PIECES for b in p.buffers])


# --- plan --------------------------------------------------------------------

def plan_flags(layers):
    """``{flag name: array over layers}``: what the compiled step reads of
    each piece (``codes``, ``norms``, ``drops``, ``residual``, ``wn``)."""
    out = {}
    for p in PIECES:
        name, value, dtype = p.plan
        out[name] = np.asarray([value(_settings(layer)) for layer in layers], dtype)
    return out


def used_pieces(layers):
    """The pieces beyond the plain kernels' that some of ``layers`` has on
    (a frozenset of names): what a model's step is compiled for."""
    settings = [_settings(layer) for layer in layers]
    return frozenset(p.name for p in PIECES
                     if not p.plain and any(p.on(s) for s in settings))


def describe():
    """A one-line-per-piece text of the table (for docs and ``repr``)."""
    return "\n".join(f"{p.name:12s} fields {[f.name for f in p.fields]}, torch "
                     f"{list(p.torch.modules)}, reference {list(p.reference)}, plan "
                     f"{p.plan[0]!r}" for p in PIECES)

