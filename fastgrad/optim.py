"""Optimizers with built-in gradient clipping: SGD, Adam, AdamW, RMSprop.

Each class is a thin stateful shell over one compiled kernel,
``fastgrad.kernels.cpu.optim.clipped_update``, that does the whole update in
two passes over memory: (1) the global and per-layer gradient norms, (2) clip
by global norm as ``torch.nn.utils.clip_grad_norm_``, clip by value as
``torch.nn.utils.clip_grad_value_``, then the optimizer rule, in place.  The
defaults and the update rules are PyTorch's (``torch.optim``), so a user
moving from ``clip_grad_norm_`` + ``torch.optim.Adam`` gets the same
trajectory, to rounding.

A gradient whose global norm is not finite -- one holding NaN or Inf, or
one so large that its norm overflows (above ~1.8e308 in the float64 sum) --
skips the whole update (parameters, moments and
step count untouched) and is counted; with ``skip_nonfinite=False`` it raises
:class:`fastgrad.errors.NonFiniteGradientError` instead.

The norm is summed in float64 for float32 gradients too, where torch sums a
float32 gradient's norm in float32: above ~1.8e19 torch's norm is inf, so
``clip_grad_norm_`` returns inf and zeroes the gradients, while fastgrad's
norm is finite and the step is clipped to ``clip_norm`` as any other (and
not skipped).

Kernel contract (used by ``fastgrad.step.TrainStep``)
-----------------------------------------------------
``opt.step()`` is exactly::

    rule, s0, s1, s2, hp = opt._kernel_args()
    norm, scale, skipped = clipped_update(rule, opt.params, opt.grads, s0, s1,
                                          s2, hp, opt._offsets,
                                          opt._layer_sq, opt._clip_norm,
                                          opt._clip_value)
    stats = opt._commit(norm, scale, skipped, opt._layer_sq)

``_kernel_args()`` fills ``hp`` for the next update ``k = opt.step_count``
(learning rate ``schedule(k)``) and has no other effect: one row, or with
several parameter groups one row per contiguous segment of the flat buffer
(each group's values, the segment's end in ``HP_END``; see
``fastgrad.kernels.cpu.optim``), so every step kernel takes the same five
values whatever the groups; ``_commit`` advances
the step count unless skipped, raises if asked to, and returns the
:class:`StepStats`.  ``opt._clip_norm`` and ``opt._clip_value`` are floats,
``0.0`` meaning "off".  (For ``(param, grad)`` pairs, ``step()`` updates the
user's arrays in place with ``kernels.cpu.multi_tensor.multi_clipped_update``,
bitwise the same result (``opt.parallel``: its parallel twin); only pairs
that are not contiguous are still copied into ``opt.params``/``opt.grads``
before and back after.  CuPy pairs, which must be contiguous, go through
``kernels.cuda.multi_tensor`` with the CUDA book-keeping described next.)

On CUDA nothing in a step waits for the device
----------------------------------------------
The skip decision is made on the device, so the host does not know the
step count of the update it is about to queue (earlier queued updates may
have been skipped).  The device keeps the count; ``_kernel_args()`` returns
a table of ``hp`` rows for every count the device can be at (from the last
count the host has read back to that plus the number of updates still in
flight; a fixed 17 rows, the unused ones marked -1, so that a CUDA graph can
replay it), and the clip kernel picks the row of its count (see
``fastgrad.kernels.cuda.optim``); with several parameter groups each row
holds one block per segment of the flat buffer.  ``_commit`` queues an
asynchronous copy of the update's control block and layer norms into pinned
host memory and returns a :class:`StepStats` that fills itself from it when
first read.  The host reads records back without waiting whenever they have
arrived (at each ``_kernel_args``), and waits only when 16 updates are in
flight, when a
user reads a value that depends on them (a StepStats field, ``step_count``,
``n_skipped``, ``lr``, ``state_dict``), or after every update with
``skip_nonfinite=False`` (it must raise at the update that failed).
TrainStep passes ``opt._device_buffers()`` to its fused CUDA step, so that
the step writes the optimizer's record (and its loss into it).  This
book-keeping is the device's: the optimizer holds its backend's update
records (``fastgrad.backend``: ``HostRecords`` on the CPU, ``DeviceRecords``
on CUDA) and never tests the device.
"""
from collections.abc import Mapping, MutableMapping
import math
import numbers
import threading

import numpy as np

from . import device as _device
from . import interrupts
from . import threads as _threads
from .backend import backend_of
from .errors import NonFiniteGradientError
from .kernels import spec as _spec
from .kernels.cpu import optim as _k
from .schedules import Schedule, as_schedule, constant, from_config

clipped_update = _k.clipped_update

__all__ = ["StepStats", "Optimizer", "SGD", "Adam", "AdamW", "RMSprop",
           "NonFiniteGradientError", "clipped_update"]


_FIELDS = ("step", "lr", "grad_norm", "clip_scale", "clipped", "skipped", "layer_norms")


class StepStats:
    """What one ``opt.step()`` (or one TrainStep) did.

    Attributes
    ----------
    step : int
        Updates applied so far, this one included (unchanged when skipped).
    lr : float
        Learning rate of this update (``schedule(step - 1)`` if applied).
    grad_norm : float
        Global L2 norm of the gradient before clipping: the value
        ``torch.nn.utils.clip_grad_norm_`` returns (NaN/Inf when skipped).
    clip_scale : float
        Factor norm clipping applied to the gradient: 1.0 when the norm is
        within ``clip_norm`` or clipping is off, 0.0 when skipped.
    clipped : bool
        True when norm clipping scaled the gradient down.
    skipped : bool
        True when the gradient was non-finite and nothing was updated.
    layer_norms : numpy.ndarray
        L2 norm of each layer's gradient (before clipping), float64.
    ready : bool
        True when the values are on the host.  On the CPU always; on CUDA
        they arrive asynchronously, and reading any field of an update that
        is not ``ready`` waits for the device to finish it (PyTorch's
        ``tensor.item()``).

    Read-only; equal when all fields are equal.
    """

    __slots__ = ("_values", "_loss", "_source")

    def __init__(self, step, lr, grad_norm, clip_scale, clipped, skipped, layer_norms):
        self._fill((int(step), float(lr), float(grad_norm), float(clip_scale), bool(clipped),
                    bool(skipped), np.asarray(layer_norms, np.float64)), None)

    @classmethod
    def _of(cls, step, lr, grad_norm, clip_scale, clipped, skipped, layer_sq):
        """Stats of values already of their types (int, float, float, float,
        bool, bool): the per-step path, without the constructor's
        conversions.  ``layer_sq``: the squared layer norms as the bytes of
        float64 values; their roots are taken when first read (a NumPy call
        just after a large kernel costs several microseconds: its code and
        data are out of the caches)."""
        stats = object.__new__(cls)
        stats._values = (step, lr, grad_norm, clip_scale, clipped, skipped, layer_sq)
        stats._loss = stats._source = None
        return stats

    @classmethod
    def _pending(cls, source):
        """Stats that ``source._fetch_stats(stats)`` will fill (via ``_fill``)."""
        stats = object.__new__(cls)
        stats._values, stats._loss, stats._source = None, None, source
        return stats

    def _fill(self, values, loss):
        self._values, self._loss, self._source = values, loss, None

    def _get(self):
        values = self._values
        if values is None:
            self._source._fetch_stats(self)
            values = self._values
        if type(values[6]) is bytes:            # squared layer norms (_of)
            values = self._values = values[:6] + (np.sqrt(np.frombuffer(values[6])),)
        return values

    @property
    def ready(self):
        return self._values is not None or self._source._stats_ready(self)

    step = property(lambda self: self._get()[0])
    lr = property(lambda self: self._get()[1])
    grad_norm = property(lambda self: self._get()[2])
    clip_scale = property(lambda self: self._get()[3])
    clipped = property(lambda self: self._get()[4])
    skipped = property(lambda self: self._get()[5])
    layer_norms = property(lambda self: self._get()[6])

    def __eq__(self, other):
        if not isinstance(other, StepStats):
            return NotImplemented
        a, b = self._get(), other._get()
        return a[:6] == b[:6] and np.array_equal(a[6], b[6])

    __hash__ = None

    def __reduce__(self):               # pickles the values (waits for a pending update)
        return StepStats, self._get()

    def __repr__(self):
        if self._values is None and not self.ready:
            return "StepStats(<on the device>)"
        return "StepStats(" + ", ".join(f"{n}={v!r}" for n, v in zip(_FIELDS, self._get())) + ")"


# -- hyper-parameters: one table of specs per optimizer class ------------------
#
# Every hyper-parameter is a _Hyper attribute: reading it gives the current
# value, writing it re-validates the whole configuration (some checks involve
# two values, e.g. Nesterov needs momentum) and then re-derives everything the
# kernel reads from it (the clip floats, which state buffers exist), so that a
# write takes effect at the next update and in checkpoints, and no write can
# leave the kernel a buffer of the wrong size.  A class names its rule in
# ``kind``; ``Optimizer.__init_subclass__`` reads the rule's row of
# kernels/spec.py UPDATE_RULES (code, state buffers, hyper-parameters) and
# installs the attributes.

def _real(name, x):
    """``x`` as a float; TypeError for anything but a real number."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r:.60}")
    return float(x)


def _nonneg(name, x):
    x = _real(name, x)
    if not (x >= 0.0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return x


#: Counters (update and dropout steps) stay below this: training from one
#: still counts in int64 (the kernels'), as checkpoints require.
COUNTER_BOUND = 2 ** 62


def _count(name, x):
    """``x`` as an int in [0, 2**62) (a counter); ValueError otherwise."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not \
            0 <= x < COUNTER_BOUND:
        raise ValueError(f"{name} must be an integer in [0, 2**62), got {x!r}")
    return int(x)


def _settled_counter(name, doc, on_set=None):
    """The optimizer property ``name`` over the attribute ``_<name>``: every
    update in flight is read back first (``_settle``), a value set must be
    an integer >= 0 and is passed to ``on_set(opt, value)`` too."""
    attr = "_" + name

    def get(self):
        self._settle()
        return getattr(self, attr)

    def set(self, value):
        value = _count(name, value)
        with self._lock:            # not between an epoch chunk's updates and its count
            self._settle()
            setattr(self, attr, value)
            if on_set is not None:
                on_set(self, value)
    return property(get, set, doc=doc)


def _fraction(name, x):
    x = _real(name, x)
    if not 0.0 <= x <= 1.0:          # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1], got {x!r}")
    return x


def _clip_arg(name, x):
    if x is None:
        return None
    x = _real(name, x)
    if not x > 0.0:   # also refuses NaN
        raise ValueError(f"{name} must be > 0 (None disables it), got {x!r}")
    return x


def _flag(name, x):
    # Only real booleans: bool("False") is True, so a string is refused.
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(x).__name__} {x!r:.60}")
    return bool(x)


def _betas(name, x):
    if isinstance(x, (str, bytes)) or not hasattr(x, "__len__") or len(x) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {type(x).__name__} {x!r:.60}")
    out = []
    for i, b in enumerate(x):
        b = _real(f"beta{i + 1}", b)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"beta{i + 1} must be in [0, 1) ({name}[{i}]), got {b!r}")
        out.append(b)
    return tuple(out)


# The validators a rule's hyper-parameter names in kernels/spec.py UPDATE_RULES.
_CHECKS = {"nonneg": _nonneg, "fraction": _fraction, "flag": _flag, "betas": _betas}


class _Spec:
    """A hyper-parameter: its default and its validator ``check(name, value)``
    (returns the normalised value or raises TypeError/ValueError naming it)."""

    __slots__ = ("default", "check")

    def __init__(self, default, check):
        self.default, self.check = default, check


class _Hyper:
    """The attribute of one hyper-parameter (see the comment above)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, opt, owner=None):
        if opt is None:
            return self
        groups = opt._groups
        if groups and self.name in groups[0].values:
            return groups[0].values[self.name]      # per-group keys: group 0's
        return opt._values[self.name]

    def __set__(self, opt, value):
        opt._set_hyper({self.name: value})


class _ReadOnly:
    """A class constant (``kind``, ``rule``, ``state_names``) that an
    instance cannot shadow: the kernel's buffer layout depends on it."""

    def __init__(self, value):
        self.value = value

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, opt, owner=None):
        return self.value

    def __set__(self, opt, value):
        raise AttributeError(f"{type(opt).__name__}.{self.name} is read-only "
                             "(build a new optimizer instead)")


class _StateView(Mapping):
    """``opt.state``: the optimizer's state buffers, read-only as a mapping.

    The arrays themselves are writable in place (``opt.state["exp_avg"][...]
    = 0``); replacing or deleting an entry is refused, because the update
    kernel indexes every buffer over the whole parameter vector.
    """

    __slots__ = ("_d",)

    def __init__(self, d):
        self._d = d

    def __getitem__(self, name):
        return self._d[name]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)

    def __setitem__(self, name, value=None):
        raise TypeError("opt.state entries cannot be replaced or deleted (the update kernel "
                        "indexes them over all parameters); write in place "
                        "(opt.state[name][...] = x) or use load_state_dict")

    __delitem__ = __setitem__

    def __repr__(self):
        return f"{{{', '.join(f'{k!r}: <{v.dtype}[{v.size}]>' for k, v in self._d.items())}}}"


def _lr_arg(name, x):
    """A learning rate: a float >= 0, a Schedule or a schedule's config dict;
    returns the Schedule (a float becomes a constant one)."""
    if isinstance(x, Mapping):
        return from_config(dict(x))
    return as_schedule(x)


class _LearningRate(_Hyper):
    """``opt.lr``: reads the learning rate of the next update (a float; group
    0's with several groups); writing a float or a Schedule replaces the
    schedule of every group (validated): a float makes the rate constant,
    the schedule ends (in torch a scheduler left attached would go on
    from the written value at its next step)."""

    def __get__(self, opt, owner=None):
        if opt is None:
            return self
        return opt._group_lr(0, opt.step_count)


# PyTorch's implementation switches, accepted at the values that mean what
# fastgrad always does: name -> (accepted values, why another is refused).
_TORCH_NOOP_FLAGS = {
    "foreach": ((None, False), "fastgrad's update is always one fused kernel; pass foreach=None"),
    "fused": ((None, False), "fastgrad's update is always fused; pass fused=None"),
    "capturable": ((False,), "fastgrad keeps no step tensors to capture; pass capturable=False"),
    "differentiable": ((False,), "fastgrad's update is not differentiable; "
                                 "pass differentiable=False"),
}


def _to_host(x):
    """A torch tensor (any device) or array-like as something NumPy reads."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


def _offset_in(arr, flat):
    """Where the array ``arr`` starts in the 1-D buffer ``flat`` (in
    elements), or None when it is not a contiguous view into it."""
    if getattr(arr, "dtype", None) != flat.dtype or not arr.flags.c_contiguous:
        return None
    if isinstance(arr, np.ndarray) and isinstance(flat, np.ndarray):
        a, f = arr.__array_interface__["data"][0], flat.__array_interface__["data"][0]
    elif hasattr(arr, "data") and hasattr(arr.data, "ptr") and hasattr(flat.data, "ptr"):
        a, f = arr.data.ptr, flat.data.ptr          # CuPy
    else:
        return None
    off, rem = divmod(a - f, flat.itemsize)
    if rem or off < 0 or off + arr.size > flat.size:
        return None
    return int(off)


def _check_torch_flags(flags):
    """Refuse a PyTorch switch set to a value fastgrad does not implement."""
    for name, value in flags.items():
        accepted, why = _TORCH_NOOP_FLAGS[name]
        if not any(value is a for a in accepted):
            raise ValueError(f"{name}={value!r}: {why}")


class _ParamGroup(MutableMapping):
    """One entry of ``opt.param_groups``: a live view of one parameter
    group's hyper-parameters under torch's keys.

    Reading gives the current values (``"lr"``: the group's learning rate
    of the next update); writing a key goes through the optimizer's
    validation (TypeError/ValueError naming it; nothing changes when
    refused) and takes effect at the next update, so torch's ``for g in
    opt.param_groups: g["lr"] *= 0.5`` works as in torch.  Writing
    ``"lr"`` (a float or a Schedule) replaces this group's schedule.
    ``"params"`` is read-only; keys cannot be added or deleted.
    """

    __slots__ = ("_opt", "_index")

    def __init__(self, opt, index=0):
        self._opt, self._index = opt, index

    def _keys(self):
        return ("lr",) + tuple(self._opt._specs) + ("maximize", "params")

    def __getitem__(self, key):
        opt = self._opt
        if key == "lr":
            return opt._group_lr(self._index, opt.step_count)
        if key == "params":
            return opt._group_params(self._index)
        if key in self._keys():
            return opt._groups[self._index].values[key]
        raise KeyError(key)

    def __setitem__(self, key, value):
        if key == "params" or key not in self._keys():
            raise KeyError(f"param_groups entries have the keys {list(self._keys())}; "
                           f"{key!r} cannot be set" + (" (read-only)" if key == "params" else ""))
        self._opt._set_group(self._index, {key: value})

    def __delitem__(self, key):
        raise TypeError("param_groups entries cannot lose keys")

    def __iter__(self):
        return iter(self._keys())

    def __len__(self):
        return len(self._keys())

    def __repr__(self):
        return repr({k: (f"<{len(v)} arrays>" if k == "params" else v) for k, v in self.items()})


_COMMON_SPECS = {"lr": _Spec(1e-3, _lr_arg),
                 "clip_norm": _Spec(None, _clip_arg), "clip_value": _Spec(None, _clip_arg),
                 "skip_nonfinite": _Spec(True, _flag), "maximize": _Spec(False, _flag)}


def _torch_layout_of(model, offsets):
    """Where each tensor of torch's parameter list lies in the flat buffer:
    ``[(offset, torch shape, transposed)]`` in the order of
    ``model.to_torch().parameters()`` (a fastgrad Sequential/MLP), else one
    1-D tensor per layer of ``layer_offsets``.

    torch keeps ``Linear.weight`` as ``(n_out, n_in)``, the transpose of
    fastgrad's ``W``; a weight-normalised Linear lists ``bias`` before its
    parametrization's ``original0`` (g, shape ``(n_out, 1)``) and
    ``original1`` (v, transposed).
    """
    per_layer = [(int(offsets[i]), (int(offsets[i + 1] - offsets[i]),), False)
                 for i in range(offsets.size - 1)]
    named = getattr(model, "named_parameters", None)
    if named is None or not hasattr(model, "layers"):
        return per_layer
    where, off = {}, 0
    for name, arr in named():          # buffer order, consecutive
        where[name] = (off, arr.shape)
        off += arr.size
    if off != offsets[-1]:             # not a fastgrad Sequential's layout
        return per_layer
    layout = []
    for i in range(len(model.layers)):
        def entry(short, shape=None, transposed=False):
            o, fshape = where[f"layers.{i}.{short}"]
            layout.append((o, tuple(shape or (fshape[::-1] if transposed else fshape)),
                           transposed))
        if f"layers.{i}.v" in where:
            entry("b")
            entry("g", shape=(where[f"layers.{i}.g"][1][0], 1))
            entry("v", transposed=True)
        else:
            entry("W", transposed=True)
            entry("b")
        if f"layers.{i}.gamma" in where:
            entry("gamma")
            entry("beta")
    return layout


# Keys a parameter group may set: the rule's own hyper-parameters plus these
# (torch's per-group keys).  Clipping and the non-finite policy are the
# optimizer's: norm clipping is global, as ``clip_grad_norm_`` over all
# parameters before ``opt.step()``.
_GROUP_COMMON = ("lr", "maximize")
_OPTIMIZER_WIDE = ("clip_norm", "clip_value", "skip_nonfinite")


class _Group:
    """One parameter group of an optimizer: where its parameters lie in the
    flat buffer and its hyper-parameters.

    ``values`` holds the rule's hyper-parameters and ``maximize``, and
    ``"lr"``: the group's own Schedule, or None when the group follows the
    optimizer's schedule (``opt.lr_schedule``), times ``num / den`` when
    ``lr_scale = (num, den)`` (a float lr given to a group of an optimizer
    whose lr is a schedule: torch's schedulers scale each group's initial
    lr).  ``since``: the update count at which the group's newest state
    buffer started (0, or the count when a changed value first needed it):
    an update rule whose torch twin counts no steps treats the update at
    that count as its first (SGD sets a new momentum buffer to the
    gradient, as torch does where a tensor has none).
    """

    __slots__ = ("ranges", "values", "lr_scale", "since")

    def __init__(self, ranges, values, lr_scale=None):
        self.ranges, self.values, self.lr_scale = ranges, values, lr_scale
        self.since = 0


def _is_group_list(x):
    """torch's spelling: a list (or tuple) of dicts, one per group."""
    return isinstance(x, (list, tuple)) and bool(x) and all(isinstance(d, Mapping) for d in x)


def _as_items(x):
    """A group's ``"params"`` as a list (a single array, name or pair is one)."""
    if isinstance(x, (str, bytes)) or hasattr(x, "shape"):
        return [x]
    if isinstance(x, tuple) and len(x) == 2 and all(hasattr(a, "shape") for a in x):
        return [x]                               # one (param, grad) pair
    if isinstance(x, Mapping):
        raise TypeError("a group's 'params' must be arrays or names, got a dict")
    try:
        return list(x)
    except TypeError:
        raise TypeError(f"a group's 'params' must be a list of arrays or names, got "
                        f"{type(x).__name__}") from None


def _resolve_torch_spelling(groups):
    """``fg.Adam([{"params": ...}, ...])``: the thing to bind (a model found
    from the views, or the (param, grad) pairs in group order) and the
    groups with their ``"params"`` as given."""
    from .layers import model_of
    groups = [dict(d) for d in groups]
    for i, d in enumerate(groups):
        if "params" not in d:
            raise ValueError(f"param group {i} has no 'params'")
        d["params"] = _as_items(d["params"])
    items = [x for d in groups for x in d["params"]]
    if items and all(isinstance(x, tuple) and len(x) == 2 for x in items):
        return items, groups                    # (param, grad) pairs, group by group
    model = None
    for x in items:
        if hasattr(x, "shape"):
            model = model_of(x)
            if model is not None:
                break
    if model is None:
        raise TypeError("fg.<Optimizer>([{'params': ...}, ...]): the groups' params must be "
                        "views of one fastgrad model (model.weights(), model.parameters(), "
                        "...) or (param, grad) pairs; for parameter names pass the model: "
                        "fg.<Optimizer>(model, param_groups=[...])")
    return model, groups


_CLASSES = {}        # kind -> the Optimizer class of that update rule


def optimizer_classes():
    """``{kind: class}``: the optimizer class of every update rule, in the
    order of kernels/spec.py ``UPDATE_RULES``."""
    return {name: _CLASSES[name] for name in _spec.RULES}


class Optimizer:
    """Base class: binds the parameters, holds state, runs the fused kernel.

    Parameters
    ----------
    params : model, list of (param, grad) pairs, or list of group dicts
        A model with flat 1-D contiguous ``params`` and ``grads`` of one
        dtype (float32 or float64) and optional ``layer_offsets`` (int64,
        ``n_layers + 1`` boundaries); or a list of ``(param, grad)`` NumPy
        arrays of any shapes, updated in place, each pair one "layer" (or
        C-contiguous CuPy arrays, all on the GPU: updated in place by the
        CUDA multi-tensor kernel); or
        torch's spelling, a list of group dicts (as ``param_groups``) whose
        ``"params"`` are views of one fastgrad model (the model is found
        from them; names alone need the model and ``param_groups=``) or
        ``(param, grad)`` pairs (listed group after group).
    lr : float or fastgrad.schedules.Schedule
        Update ``k`` (from 0) uses ``lr(k)``.
    clip_norm : float or None
        Scale the gradient by ``min(1, clip_norm / (norm + 1e-6))``.
    clip_value : float or None
        Then clamp each gradient entry to ``[-clip_value, clip_value]``.
    skip_nonfinite : bool
        True skips non-finite gradients (counted in ``n_skipped``); False
        raises :class:`NonFiniteGradientError` (nothing updated either way;
        on CUDA, False makes each update wait for the device's verdict).
    maximize : bool
        Ascend instead of descend, as torch's ``maximize=True``: the rule
        sees the negated (clipped) gradient.  Clipping and the reported
        norms are those of the gradient as given, as with torch's
        ``clip_grad_norm_`` before a maximizing step.
    param_groups : list of dict, optional
        Parameter groups, as torch's: ``[{"params": [...], "weight_decay":
        0.0, ...}, ...]``.  ``"params"`` lists parameters of ``params`` by
        view (``model.weights()``, ``model.biases_and_norms()``,
        ``model.parameters()``; the arrays of (param, grad) pairs) or by
        name (``model.named_parameters()``; ``params[i]`` for pairs); every
        parameter must be in exactly one group (ValueError naming it).
        The other keys are the rule's hyper-parameters, ``lr`` and
        ``maximize``; unset keys take the optimizer's values (the
        constructor's arguments), unknown keys raise ValueError naming
        them.  ``clip_norm``, ``clip_value`` and ``skip_nonfinite`` are the
        optimizer's: norm clipping is over all groups, as
        ``clip_grad_norm_`` over all parameters, and a non-finite gradient
        anywhere skips the whole update.  A group's ``"lr"`` may be a
        Schedule (its own); a float under a scheduled optimizer lr starts
        that schedule from it as torch's LR schedulers start from each
        group's initial lr (``fastgrad.schedules.Schedule.group_rate``: the
        schedule scaled by ``lr / schedule(0)``, with cosine annealing's
        ``eta_min`` and plateau's ``min_lr`` held, and one-cycle's own
        cycle for every group); a float under a float lr is simply the
        group's.  One update runs all groups (on CUDA one launch of
        pass 2 per contiguous segment; ``TrainStep(cuda_graph=True)``
        needs one group).
    foreach, fused, capturable, differentiable
        PyTorch's implementation switches, accepted only at the values that
        describe what fastgrad always does (``foreach``/``fused``: None or
        False; ``capturable``/``differentiable``: False) so that code
        spelling them out runs unchanged; they have no effect.  Any other
        value raises ValueError naming the argument.

    ``opt.lr`` reads the learning rate of the next update (group 0's);
    writing it (a float >= 0 or a Schedule) replaces the schedule of every
    group, validated, from the next update on: a float where a schedule was
    makes the rate constant: the schedule ends there, where a torch
    scheduler left attached would go on from the written value (set a
    schedule instead to keep one).
    ``StepStats.lr`` is group 0's rate.

    Every hyper-parameter (``clip_norm``, ``momentum``, ``betas``,
    ``amsgrad``, ...) is an attribute that can be set after construction
    (per-group ones: read from group 0, written to every group):
    the value is validated as in the constructor (TypeError/ValueError
    naming it) and takes effect at the next update and in checkpoints;
    state buffers a new value needs start as in a fresh optimizer: at
    zero, and SGD's momentum buffer takes the gradient itself at its first
    update, as torch's does where a tensor has none (per group).
    ``kind``, ``rule``, ``state_names``, ``params``, ``grads``,
    ``layer_offsets``, ``device`` and the ``state`` mapping are read-only
    (AttributeError; the state arrays are writable in place).

    ``step()`` holds a lock shared with the model (when built on a fastgrad
    model), so that calls from several threads, and a
    :class:`fastgrad.TrainStep` on the same model, run one after the other.
    """

    kind = _ReadOnly(None)
    rule = _ReadOnly(None)
    state_names = _ReadOnly(())
    lr = _LearningRate()
    clip_norm = _Hyper()
    clip_value = _Hyper()
    skip_nonfinite = _Hyper()
    maximize = _Hyper()
    _specs = {}          # the rule's own hyper-parameters: name -> _Spec
    _defaults = {}       # name -> default, derived from _specs
    _torch = None        # the rule's spec.TorchOptim

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None:
            # everything rule-specific comes from the rule's spec row
            if kind not in _spec.RULES:
                raise ValueError(f"{cls.__name__}.kind: {kind!r} is not an update rule of "
                                 f"kernels/spec.py UPDATE_RULES {sorted(_spec.RULES)}")
            row = _spec.UPDATE_RULES[_spec.RULES[kind]]
            cls.rule = _spec.RULES[kind]
            # (a class constant read past the rule's descriptor, once a step)
            cls._per_update_fill = staticmethod(_spec.per_update_filler(cls.rule))
            cls.state_names = tuple(s.name for s in row.state)
            cls._specs = {h.name: _Spec(h.default, _CHECKS[h.check]) for h in row.hyper}
            cls._torch = row.torch
            _CLASSES.setdefault(kind, cls)      # the built-in class; a user's subclass is not
        for name in ("kind", "rule", "state_names"):
            value = cls.__dict__.get(name)
            if name in cls.__dict__ and not isinstance(value, _ReadOnly):
                const = _ReadOnly(value)
                const.__set_name__(cls, name)
                setattr(cls, name, const)
        for name in cls._specs:
            if not isinstance(getattr(cls, name, None), _Hyper):
                attr = _Hyper()
                attr.__set_name__(cls, name)
                setattr(cls, name, attr)
        cls._defaults = {name: spec.default for name, spec in cls._specs.items()}

    def __init__(self, params, lr, *, clip_norm=None, clip_value=None,
                 skip_nonfinite=True, maximize=False, foreach=None, fused=None,
                 capturable=False, differentiable=False, param_groups=None, **hyper):
        _check_torch_flags({"foreach": foreach, "fused": fused, "capturable": capturable,
                            "differentiable": differentiable})
        if _is_group_list(params):
            if param_groups is not None:
                raise TypeError("the parameter groups are given twice: pass a list of group "
                                "dicts or a model with param_groups=[...], not both")
            params, param_groups = _resolve_torch_spelling(params)
        elif param_groups is not None:
            if isinstance(param_groups, (str, bytes, Mapping)) or not _is_group_list(
                    list(param_groups) if hasattr(param_groups, "__iter__") else None):
                raise TypeError("param_groups must be a non-empty list of dicts "
                                "({'params': [...], <hyper-parameter>: value, ...}), got "
                                f"{type(param_groups).__name__}")
            param_groups = list(param_groups)
        self._records = None
        self._values = {}
        self._state = {}
        self._state_args = None      # _buffers(), kept until the state changes
        self._hp_rows_known = {}     # group -> (values, group values, merged, row)
        self._hp_view = None         # a memoryview of a one-row _hp (_fill_row)
        self._groups = None
        self._seg_group = None
        self._bind(params)
        self._step_count = 0
        self._n_skipped = 0
        self.n_calls = 0
        self._layer_sq = self._records.layer_sq
        self._lr_now = float("nan")
        self._empty = self._xp.empty(0, self.params.dtype)
        self._configure(dict(self._defaults, lr=lr, clip_norm=clip_norm,
                             clip_value=clip_value, skip_nonfinite=skip_nonfinite,
                             maximize=maximize, **hyper))
        groups = self._build_groups(param_groups)
        if len(groups) == 1 and param_groups is not None:
            # One group spans everything: its values become the optimizer's.
            g = groups[0]
            changes = {k: v for k, v in g.values.items() if k != "lr"}
            if g.values["lr"] is not None:
                changes["lr"] = g.values["lr"]
            self._set_hyper(changes)
            g.values = {k: (self._values[k] if k != "lr" else None) for k in g.values}
        self._install_groups(groups)

    # -- binding ------------------------------------------------------------
    def _bind(self, params):
        self._pairs = self._multi = self._multi_state = None
        # A model's lock is shared by its optimizers and TrainSteps.
        self._lock = getattr(params, "_lock", None) or threading.RLock()
        if hasattr(params, "params") and hasattr(params, "grads"):
            p, g = params.params, params.grads
            be = backend_of(p)
            if backend_of(g) is not be:
                raise TypeError(f"params on {be.name} but grads on {backend_of(g).name}")
            if not be.is_array(p):
                raise TypeError(f"model.params must be a NumPy or CuPy array, got {type(p).__name__}")
            if p.dtype not in (np.float32, np.float64) or g.dtype != p.dtype:
                raise TypeError(f"params and grads must share dtype float32 or float64, "
                                f"got {p.dtype} and {g.dtype}")
            if p.ndim != 1 or g.shape != p.shape:
                raise ValueError(f"params and grads must be 1-D of one length, "
                                 f"got shapes {p.shape} and {g.shape}")
            # CuPy arrays have no read-only flag (their flags are c_contiguous,
            # f_contiguous and owndata only): only NumPy params can be read-only.
            if not (p.flags.c_contiguous and g.flags.c_contiguous and be.writeable(p)):
                raise ValueError("params and grads must be contiguous and params writeable")
            off = getattr(params, "layer_offsets", None)
            off = (np.array([0, p.size], np.int64) if off is None
                   else np.ascontiguousarray(off, dtype=np.int64))
            if (off.ndim != 1 or off.size < 2 or off[0] != 0 or off[-1] != p.size
                    or np.any(np.diff(off) < 0)):
                raise ValueError(f"layer_offsets must rise from 0 to {p.size}, got {off}")
            # A private copy: a later in-place write into the model's array
            # cannot make the kernel index outside the parameters.
            self._params, self._grads, self._offsets = p, g, off.copy()
            self._target = params           # what a copy is built on again
            self._torch_layout = _torch_layout_of(params, self._offsets)
            self._model = params if hasattr(params, "parameters") else None
            self._use_backend(be)
            return
        pairs = list(params)
        if not pairs:
            raise ValueError("no parameters to optimize")
        checked = []
        be = None
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                # an array of 2 rows unpacked as a pair: row 1 stepped row 0
                raise TypeError(f"entry {i}: expected a (param, grad) pair (a tuple), got "
                                f"{type(pair).__name__}; fastgrad's optimizers take a model "
                                "or (param, grad) pairs (torch's parameters: fastgrad.torch)")
            p, g = pair
            pair_be = backend_of(p)
            if not (pair_be.is_array(p) and pair_be.is_array(g)):
                raise TypeError(f"pair {i}: param and grad must be NumPy arrays or CuPy "
                                f"arrays, got {type(p).__name__} and {type(g).__name__}")
            if be is not None and pair_be is not be:
                raise TypeError(f"pair {i}: on {pair_be.name}, but pair 0 is on {be.name}: "
                                "all pairs must be on one device")
            be = pair_be
            if p.shape != g.shape:
                raise ValueError(f"pair {i}: grad shape {g.shape} != param shape {p.shape}")
            be.check_pair(i, p, g)
            checked.append((p, g))
        dt = checked[0][0].dtype
        if dt not in (np.float32, np.float64) or any(
                p.dtype != dt or g.dtype != dt for p, g in checked):
            raise TypeError("all params and grads must share dtype float32 or float64")
        # a tensor listed twice would be updated twice and counted twice in
        # the norm (torch refuses one in two groups)
        spans = sorted((be.memory_span(p) + (i,) for i, (p, _) in enumerate(checked)))
        for k, (_, hi, i) in enumerate(spans):
            for lo, _, j in spans[k + 1:]:
                if lo >= hi:
                    break
                if be.shares_memory(checked[i][0], checked[j][0]):
                    raise ValueError(f"pairs {min(i, j)} and {max(i, j)}: their params share "
                                     "memory (a tensor listed twice?); list each once")
        sizes = [p.size for p, _ in checked]
        self._pairs = self._target = checked
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._torch_layout = [(int(o), p.shape, False)
                              for o, (p, _) in zip(self._offsets, checked)]
        self._params = be.xp.empty(int(self._offsets[-1]), dt)
        self._grads = be.xp.empty_like(self._params)
        self._use_backend(be)
        self._gather_params()
        # pairs updated in place (their addresses taken once), else copied
        self._multi = be.bind_pairs(checked, self._offsets)

    def _use_backend(self, be):
        """The array module, update kernel and read-back of the parameters' device."""
        self._backend = be
        self._xp = be.xp
        self._update = self._serial_update = be.update_kernels(self.rule).clipped_update
        self._parallel_asked = None         # None: chosen per step (``parallel``)
        self._parallel_kernel = None
        be.optimizer_built()
        # at most one segment per parameter, whatever the groups
        self._records = be.update_records(self, len(self._param_entries()))

    # Read-only: the kernel indexes all of them over the same length.
    @property
    def params(self):
        """Flat parameters (1-D, read-only attribute).  For (param, grad)
        pairs: a copy of the pairs' values, refreshed at each read."""
        if self._pairs is not None:
            # the user's arrays are the parameters: the update writes them,
            # and so may the user between steps
            self._gather_params()
        return self._params

    @property
    def grads(self):
        """Flat gradients (1-D, read-only attribute).  For (param, grad)
        pairs a staging buffer, filled only by ``_gather_grads`` (pairs
        updated in place never need it; code that gathers, works on it and
        writes back, as ``fastgrad.distributed`` does, must not see it
        refilled behind its back)."""
        return self._grads

    @property
    def layer_offsets(self):
        """Layer boundaries in ``params`` (int64; a read-only view)."""
        view = self._offsets.view()
        view.flags.writeable = False
        return view
    device = property(lambda self: self._backend.name, doc='"cpu" or "cuda".')
    backend = property(lambda self: self._backend,
                       doc="The device's backend (``fastgrad.backend``).")

    @property
    def state(self):
        """State buffers by name (a read-only mapping of arrays writable in place)."""
        return _StateView(self._state)

    def _device_buffers(self):
        """The device buffers the CUDA update kernel works in (``ws``)."""
        return self._records.buffers

    # -- counters (on CUDA, read back from the device) ------------------------
    step_count = _settled_counter("step_count",
                                  "Updates applied so far (skipped ones not counted).",
                                  lambda self, k: self._records.set_step(k))
    n_skipped = _settled_counter("n_skipped", "Updates skipped for a non-finite gradient.")

    def _settle(self):
        """Read back every update in flight (CUDA; waits for the device)."""
        self._records.settle()

    @property
    def parallel(self):
        """Whether ``step()`` runs both passes of the update on several
        threads (CPU).

        Bitwise the same result as the serial kernel.  By default (``None``)
        it is chosen per step: on when the step has a thread team
        (``fastgrad.threads.team_threads``: more than one thread, OpenBLAS's
        own workers or the shared pool of ``fastgrad.share_blas_pool``) and
        there are at least ``fastgrad.threads.PARALLEL_UPDATE_MIN_PARAMS``
        (2^15) parameters; off otherwise.  The update then runs on that
        team, as a ``TrainStep``'s does (``fastgrad.kernels.cpu.pass_team``:
        its norm split by blocks, its elementwise pass by ranges).
        ``False`` fixes the serial kernel, ``True`` Numba's parfor kernel
        (its OpenMP threads spin against OpenBLAS's after each GEMM: in a
        training loop on 2 cores it was 1.1-11x slower, bench/RESULTS.md
        "One pool"); ``None`` restores the default.  A ``TrainStep`` runs its
        update on the step's own team unless this is ``False``;
        ``TrainStep(threads=n)`` always runs the update on its own threads.
        An optimizer over contiguous ``(param, grad)`` pairs, updated in
        place, leaves ``None`` serial on OpenBLAS's own workers and parallel
        (Numba's parfor kernel) only on the shared pool.
        """
        if self._multi is not None:
            return self._backend.pairs_parallel(self)
        return self._chosen_update() is not self._serial_update

    @parallel.setter
    def parallel(self, on):
        if on is not None and not isinstance(on, bool):
            raise TypeError(f"parallel must be True, False or None, got {on!r}")
        self._parallel_asked = on
        self._update = self._backend.parallel_update(self.rule) if on else self._serial_update

    def _chosen_update(self):
        """The update kernel ``step()`` runs now."""
        # wants_parallel_update asks for the team (~3 us of Python) only for
        # an update large enough to use it: 6 us of a small net's opt.step()
        if self._parallel_asked is None:
            return self._automatic_update()
        return self._update

    def _automatic_update(self):
        if self._backend.wants_parallel_update(self._params.size):
            # the team kernel on the shared pool (bound to its threads: chosen
            # again when the pool or the thread count changes), else parfor's
            generation = _threads.pool_generation()
            if self._parallel_kernel is None or self._parallel_kernel[0] != generation:
                kernel = self._backend.team_update(self.rule, self._params.dtype)
                self._parallel_kernel = (generation, kernel or
                                         self._backend.parallel_update(self.rule))
            return self._parallel_kernel[1]
        return self._serial_update

    # (the flat buffers directly: reading the params property gathers)
    def _gather_params(self):
        off = self._offsets
        for i, (p, _) in enumerate(self._pairs):
            self._params[off[i]:off[i + 1]] = p.ravel()

    def _gather_grads(self):
        off = self._offsets
        for i, (_, g) in enumerate(self._pairs):
            self._grads[off[i]:off[i + 1]] = g.ravel()

    def _scatter_params(self):
        off = self._offsets
        for i, (p, _) in enumerate(self._pairs):
            p[...] = self._params[off[i]:off[i + 1]].reshape(p.shape)

    # -- hyper-parameters and state --------------------------------------------
    def _configure(self, hyper):
        """Validate and set every hyper-parameter (construction and load)."""
        unknown = set(hyper) - set(self._defaults) - set(_COMMON_SPECS)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown argument(s) {sorted(unknown)}")
        self._set_hyper(hyper)

    def _set_hyper(self, changes):
        """Validate the configuration with ``changes`` applied, then commit it:
        nothing changes when a value is refused.  A per-group key (the rule's
        hyper-parameters, ``maximize``, ``lr``) is set in every group."""
        with self._lock:        # read, check and commit as one: another thread's write kept
            self._set_hyper_locked(changes)

    def _set_hyper_locked(self, changes):
        specs = dict(_COMMON_SPECS, **self._specs)
        values = dict(self._values, **changes)
        missing = set(specs) - set(values)
        if missing:
            raise TypeError(f"{type(self).__name__}: missing hyper-parameter(s) {sorted(missing)}")
        checked = {name: specs[name].check(name, values[name]) for name in specs}
        self._check_combination(checked)
        groups = self._groups or []
        new_values = []
        for g in groups:
            v = dict(g.values, **{k: checked[k] for k in changes if k in g.values})
            if "lr" in changes:
                v["lr"] = None              # every group follows the new schedule
            self._check_combination(self._merged(v, checked))
            new_values.append(v)
        with self._lock:
            self._settle()      # updates in flight finish on the old buffers
            for g, v in zip(groups, new_values):
                self._note_new_state(g, v, checked)
            self._values = checked
            for g, v in zip(groups, new_values):
                g.values = v
                if "lr" in changes:
                    g.lr_scale = None
            # The kernel reads plain floats, 0.0 meaning "off".
            self._clip_norm = checked["clip_norm"] or 0.0
            self._clip_value = checked["clip_value"] or 0.0
            self._alloc_state()

    @staticmethod
    def _merged(group_values, values):
        """A group's values over the optimizer's (``lr`` stays the optimizer's)."""
        return dict(values, **{k: v for k, v in group_values.items() if k != "lr"})

    def _check_group_value(self, i, key, value):
        """One per-group value validated (the group's lr: its Schedule)."""
        if key == "lr":
            return _lr_arg("lr", value)
        spec = self._specs.get(key) or _COMMON_SPECS[key]
        return spec.check(key, value)

    def _set_group(self, i, changes):
        """Write per-group keys of group ``i`` (validated; all or nothing)."""
        if len(self._groups) == 1:
            # One group spans everything: its values are the optimizer's.
            return self._set_hyper(changes)
        g = self._groups[i]
        v, lr_scale = dict(g.values), g.lr_scale
        for key, value in changes.items():
            v[key] = self._check_group_value(i, key, value)
            if key == "lr":
                lr_scale = None
        self._check_combination(self._merged(v, self._values))
        with self._lock:
            self._settle()
            self._note_new_state(g, v, self._values)
            g.values, g.lr_scale = v, lr_scale
            self._alloc_state()

    def _check_combination(self, values):
        """Checks that involve several hyper-parameters (ValueError)."""
        _spec.check_rule_values(self.rule, values)

    def _needed_state_of(self, values):
        """Names of the state buffers the hyper-parameters ``values`` use."""
        return set(_spec.rule_state(self.rule, values))

    def _note_new_state(self, group, values, opt_values):
        """Before ``group`` takes ``values`` (under the optimizer's
        ``opt_values``): a state buffer they need and its values did not
        starts at the next update (``_Group.since``)."""
        before = self._needed_state_of(self._merged(group.values, self._values))
        if self._needed_state_of(self._merged(values, opt_values)) - before:
            group.since = self._step_count

    def _update_number(self, k, group):
        """``t`` of the rule's per-update hp terms for update ``k`` of group
        ``group``: ``k + 1``; for a rule whose torch twin counts no steps
        (it can only ask ``t == 1``), 1 at the group's first update with a
        new state buffer and 2 otherwise."""
        if self._torch is None or self._torch.counts_steps:
            return k + 1
        return 1 if k == self._groups[group].since else 2

    def _needed_state(self):
        """Names of the state buffers the current hyper-parameters use: of
        every group (a buffer spans all parameters; unused parts stay 0)."""
        if not self._groups:
            return self._needed_state_of(self._values)
        need = set()
        for g in self._groups:
            need |= self._needed_state_of(self._merged(g.values, self._values))
        return need

    def _alloc_state(self):
        self._state_args = None
        need = self._needed_state()
        for name in self.state_names:
            cur = self._state.get(name)
            if name in need:
                if cur is None or cur.size != self._params.size:
                    self._state[name] = self._xp.zeros_like(self._params)
            else:
                self._state.pop(name, None)

    def _buffers(self):
        if self._state_args is None:
            self._state_args = tuple(self._state.get(n, self._empty)
                                     for n in self.state_names) + \
                (self._empty,) * (3 - len(self.state_names))
        return self._state_args

    # -- parameter groups --------------------------------------------------------
    def _param_entries(self):
        """``[(name, lo, hi, array)]`` of every parameter in buffer order,
        covering the flat buffer: the model's ``named_parameters()``, the
        (param, grad) pairs (``params[i]``), else one entry per layer."""
        if self._pairs is not None:
            return [(f"params[{i}]", int(self._offsets[i]), int(self._offsets[i + 1]), p)
                    for i, (p, _) in enumerate(self._pairs)]
        if self._model is not None:
            entries = []
            for name, arr in self._model.named_parameters():
                lo = _offset_in(arr, self.params)
                if lo is None:
                    break
                entries.append((name, lo, lo + arr.size, arr))
            entries.sort(key=lambda e: e[1])
            ends = [0] + [e[2] for e in entries]
            if entries and all(e[1] == end for e, end in zip(entries, ends)) \
                    and ends[-1] == self.params.size:
                return entries
        off = self._offsets
        return [(f"layer {i}", int(off[i]), int(off[i + 1]), self.params[off[i]:off[i + 1]])
                for i in range(off.size - 1)]

    def _match(self, item, entries, by_name, gi):
        """Index in ``entries`` of one item of group ``gi``'s ``"params"``."""
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"param group {gi}: {item!r} is not a parameter of this "
                                 f"optimizer (names: {[e[0] for e in entries][:8]}...)")
            return by_name[item]
        if isinstance(item, tuple) and len(item) == 2 and self._pairs is not None:
            item = item[0]                           # a (param, grad) pair
        if not hasattr(item, "shape"):
            raise TypeError(f"param group {gi}: 'params' holds a {type(item).__name__}; "
                            "expected arrays (model.weights(), ...) or parameter names")
        for i, e in enumerate(entries):
            if e[3] is item:
                return i
        lo = None if self._pairs is not None else _offset_in(item, self.params)
        for i, e in enumerate(entries):
            if lo == e[1] and item.size == e[2] - e[1]:
                return i
        raise ValueError(f"param group {gi}: an array of shape {tuple(item.shape)} is not a "
                         "parameter of this optimizer (pass the views model.parameters(), "
                         "model.weights(), model.biases_and_norms() return, or names)")

    def _build_groups(self, spec):
        """The :class:`_Group` list of ``param_groups`` (None: one group of
        everything following the optimizer's values); everything checked."""
        n = self.params.size
        base = {k: self._values[k] for k in self._specs}
        base["maximize"] = self._values["maximize"]
        base["lr"] = None
        if spec is None:
            return [_Group([(0, n)], base)]
        entries = self._param_entries()
        by_name = {e[0]: i for i, e in enumerate(entries)}
        owner = {}
        groups = []
        for gi, d in enumerate(spec):
            if not isinstance(d, Mapping):
                raise TypeError(f"param group {gi} must be a dict, got {type(d).__name__}")
            if "params" not in d:
                raise ValueError(f"param group {gi} has no 'params'")
            items = _as_items(d["params"])
            if not items:
                raise ValueError(f"param group {gi} has no parameters")
            for item in items:
                i = self._match(item, entries, by_name, gi)
                if i in owner:
                    raise ValueError(f"parameter {entries[i][0]} is in param groups "
                                     f"{owner[i]} and {gi}; every parameter must be in "
                                     "exactly one group")
                owner[i] = gi
            values, lr_scale, unknown = dict(base), None, []
            for key, x in d.items():
                if key == "params":
                    continue
                if key in _TORCH_NOOP_FLAGS:
                    _check_torch_flags({key: x})
                elif key in _OPTIMIZER_WIDE:
                    raise ValueError(f"param group {gi}: {key} is set on the optimizer, not "
                                     "per group (clipping is over all parameters, as "
                                     "clip_grad_norm_ before opt.step())")
                elif key == "lr":
                    values["lr"], lr_scale = self._group_lr_arg(gi, x)
                elif key in values:
                    values[key] = self._check_group_value(gi, key, x)
                else:
                    unknown.append(key)
            if unknown:
                raise ValueError(f"param group {gi}: {type(self).__name__} has no "
                                 f"hyper-parameter(s) {sorted(unknown)}")
            self._check_combination(self._merged(values, self._values))
            groups.append(_Group([], values, lr_scale))
        missing = [entries[i][0] for i in range(len(entries)) if i not in owner]
        if missing:
            raise ValueError(f"parameter(s) {missing} are in no param group; every parameter "
                             "must be in exactly one group")
        for i, (_, lo, hi, _) in enumerate(entries):
            ranges = groups[owner[i]].ranges
            if ranges and ranges[-1][1] == lo:
                ranges[-1] = (ranges[-1][0], hi)      # adjacent: one segment
            else:
                ranges.append((lo, hi))
        return groups

    def _group_lr_arg(self, gi, x):
        """``(own schedule, lr_scale)`` of a group's ``"lr"``: a Schedule (or
        its config) is the group's own; a float under a constant optimizer lr
        is a constant; a float under a schedule starts that schedule from
        ``x`` as torch's schedulers start from each group's initial lr
        (``Schedule.group_rate``), which needs ``schedule(0) > 0``."""
        if isinstance(x, (Schedule, Mapping)):
            return _lr_arg("lr", x), None
        x = _nonneg(f"param group {gi}: lr", x)
        default = self._values["lr"]
        if isinstance(default, constant):
            return constant(x), None
        s0 = float(default(0))
        if not s0 > 0.0:
            raise ValueError(f"param group {gi}: lr={x!r} would scale the optimizer's schedule "
                             f"by lr / schedule(0), but the schedule starts at {s0!r}; give the "
                             "group its own schedule ({'lr': fg.schedules...})")
        return None, (x, s0)

    def _install_groups(self, groups):
        """Make ``groups`` the optimizer's (the kernel's segment rows, the
        torch order of the parameters, the state buffers they need)."""
        segs = sorted((lo, hi, gi) for gi, g in enumerate(groups) for lo, hi in g.ranges)
        end = 0
        for lo, hi, _ in segs:
            if lo != end or hi < lo:
                raise ValueError(f"parameter groups must cover the {self.params.size} "
                                 f"parameters once, in ranges; got {[s[:2] for s in segs]}")
            end = hi
        if end != self.params.size:
            raise ValueError(f"parameter groups cover {end} of {self.params.size} parameters")
        n_seg = 1 if len(groups) == 1 else sum(hi > lo for lo, hi, _ in segs)
        self._records.check_segments(n_seg)
        with self._lock:
            self._settle()
            self._groups = groups
            if len(groups) == 1:
                self._hp = np.zeros(_k.HP_SIZE, np.float64)
                self._hp_view = memoryview(self._hp)
                self._seg_group = None
            else:
                segs = [s for s in segs if s[1] > s[0]]
                self._seg_group = np.array([gi for _, _, gi in segs], np.int64)
                self._seg_ends = np.array([hi for _, hi, _ in segs], np.float64)
                self._hp = np.zeros((len(segs), _k.HP_SIZE), np.float64)
                self._hp_view = None
                self._group_rows = np.zeros((len(groups), _k.HP_SIZE), np.float64)
            self._records.set_layout(self._hp.shape, 0 if self._seg_group is None else
                                     int(np.flatnonzero(self._seg_group == 0)[0]))
            # torch numbers the parameters group after group.
            starts = np.array([lo for lo, _, _ in segs], np.int64)
            seg_of = [segs[int(np.searchsorted(starts, off, "right")) - 1][2]
                      for off, _, _ in self._torch_layout]
            self._torch_order = [[pos for pos, g in enumerate(seg_of) if g == gi]
                                 for gi in range(len(groups))]
            self._alloc_state()

    @property
    def hyper(self):
        """Hyper-parameters as a JSON-able dict (the schedule as its config):
        the optimizer's own, which groups take unless they set theirs."""
        h = dict(self._values)
        h["lr"] = self.lr_schedule.to_config()
        return h

    @property
    def param_groups(self):
        """torch's ``param_groups``: a list of live dict-like groups.

        One group spanning every parameter unless the optimizer was built
        with several (``param_groups=[...]`` or torch's list of dicts).
        ``group[name] = v`` validates ``v`` and sets that group's value from
        the next update on (``group["lr"]``: a float or a Schedule replaces
        the group's schedule).  With one group, ``group[name] = v`` is
        ``setattr(opt, name, v)``.  ``opt.<name> = v`` (``opt.lr`` too)
        sets every group; reading ``opt.<name>`` gives group 0's value.
        """
        return [_ParamGroup(self, i) for i in range(len(self._groups))]

    def _group_params(self, i=0):
        """The parameters of group ``i`` as arrays: the user's for (param,
        grad) pairs, else the model's ``parameters()`` views, else flat
        views."""
        ranges = self._groups[i].ranges
        return [e[3] for e in self._param_entries()
                if any(lo <= e[1] and e[2] <= hi for lo, hi in ranges)]

    def _group_lr(self, i, k):
        """Group ``i``'s learning rate at update ``k``."""
        g = self._groups[i] if self._groups else None
        own = None if g is None else g.values["lr"]
        if own is not None:
            return float(own(k))
        schedule = self._values["lr"]
        if g is not None and g.lr_scale is not None:
            num, den = g.lr_scale
            return float(schedule.group_rate(k, num, den))
        return float(schedule(k))

    @property
    def lr_schedule(self):
        """The optimizer's learning-rate schedule (update ``k`` uses
        ``lr_schedule(k)``): every group's unless it has its own (a group
        given a float lr under a schedule follows
        ``lr_schedule.group_rate``).  Settable like ``lr`` (sets every group)."""
        return self._values["lr"]

    @lr_schedule.setter
    def lr_schedule(self, schedule):
        self._set_hyper({"lr": schedule})

    def _groups_state(self):
        """The groups as JSON-able data (fastgrad checkpoints)."""
        out = []
        for g in self._groups:
            hyper = {k: (list(v) if isinstance(v, tuple) else v)
                     for k, v in g.values.items() if k != "lr"}
            own = g.values["lr"]
            out.append({"ranges": [[int(lo), int(hi)] for lo, hi in g.ranges], "hyper": hyper,
                        "lr": None if own is None else own.to_config(),
                        "lr_scale": None if g.lr_scale is None else list(g.lr_scale)})
        return out

    def _groups_from_state(self, data):
        """:meth:`_groups_state` output back as checked :class:`_Group` s."""
        if not isinstance(data, (list, tuple)) or not data:
            raise ValueError("checkpoint groups: expected a non-empty list")
        groups = []
        for gi, d in enumerate(data):
            if not isinstance(d, Mapping) or not {"ranges", "hyper"} <= set(d):
                raise ValueError(f"checkpoint group {gi}: expected ranges and hyper")
            try:
                ranges = [(int(lo), int(hi)) for lo, hi in d["ranges"]]
            except (TypeError, ValueError):
                raise ValueError(f"checkpoint group {gi}: ranges must be [lo, hi] pairs") \
                    from None
            hyper = dict(d["hyper"])
            keys = set(self._specs) | {"maximize"}
            if set(hyper) != keys:
                raise ValueError(f"checkpoint group {gi}: fields {sorted(hyper)} do not match "
                                 f"{sorted(keys)}")
            values = {k: self._check_group_value(gi, k, x) for k, x in hyper.items()}
            values["lr"] = None if d.get("lr") is None else _lr_arg("lr", d["lr"])
            scale = d.get("lr_scale")
            if scale is not None:
                num, den = (_nonneg("lr_scale", x) for x in scale)
                if not den > 0:
                    raise ValueError(f"checkpoint group {gi}: lr_scale needs a positive base")
                scale = (num, den)
            self._check_combination(self._merged(values, self._values))
            groups.append(_Group(ranges, values, scale))
        return groups

    def state_dict(self, format="fastgrad"):
        """The optimizer's state.

        Parameters
        ----------
        format : "fastgrad" (default) or "torch"
            ``"fastgrad"``: the checkpoint ``{"kind", "step", "n_skipped",
            "n_calls", "hyper", "state"}``; ``state`` maps names to flat
            array copies, everything else is JSON-able (tuples become
            lists).  No pickle needed.  With several parameter groups (or a
            group with its own lr) also ``"groups"``: per group its
            ``ranges`` in the flat buffer, ``hyper``, own ``lr`` schedule
            config (or None) and ``lr_scale``.

            ``"torch"``: torch's structure, loadable by the matching
            ``torch.optim`` class built on ``model.to_torch().parameters()``
            (or on the (param, grad) pairs' tensors, in order), grouped as
            this optimizer (torch numbers the parameters group after group,
            each group's in ``to_torch()`` order):
            ``{"state": {i: {...}}, "param_groups": [{..., "params": [0, 1,
            ...]}, ...]}``, state tensors under torch's names (``exp_avg``,
            ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``,
            ``square_avg``, ``grad_avg``; ``step`` as a float32 scalar
            tensor, none for SGD) with torch's shapes (weights transposed),
            copies as CPU torch tensors (needs torch).  The group's ``lr`` is
            the learning rate of the next update (torch keeps schedules
            outside the optimizer); clipping has no torch counterpart in the
            optimizer and is not included.  Before the first update
            ``state`` is empty, as torch's.
        """
        if format not in ("fastgrad", "torch"):
            raise ValueError(f'format must be "fastgrad" or "torch", got {format!r}')
        with self._lock:        # one update's state, not a step in another thread's
            if format == "torch":
                return self._torch_state_dict()
            return self._state_dict()

    def _state_dict(self):
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hyper.items()}
        sd = {"kind": self.kind, "step": int(self.step_count),
              "n_skipped": int(self.n_skipped), "n_calls": int(self.n_calls),
              "hyper": hyper,
              "state": {k: _device.to_numpy(v).copy() for k, v in self.state.items()}}
        g = self._groups[0]
        if len(self._groups) > 1 or g.lr_scale is not None or g.values["lr"] is not None:
            sd["groups"] = self._groups_state()
        if any(g.since for g in self._groups):
            # a buffer started mid-run (SGD's momentum turned on): its first
            # update, still to come or past, is part of the trajectory
            sd["since"] = [int(g.since) for g in self._groups]
        return sd

    def load_state_dict(self, sd):
        """Restore :meth:`state_dict` output, in either format; arrays are
        copied into the existing buffers, so compiled steps holding them
        stay valid.

        A dict with ``param_groups`` is read as torch's structure (from
        ``torch.optim.<Rule>.state_dict()`` over ``model.to_torch()``'s
        parameters, or ``state_dict(format="torch")``): it must have as
        many groups as this optimizer, each with as many parameters (torch
        numbers them group after group, each group's in ``to_torch()``
        order); each group's hyper-parameters replace this optimizer's
        group's (``lr`` becomes a constant learning rate; ``clip_norm``,
        ``clip_value`` and ``skip_nonfinite`` are kept; with one group they
        are the optimizer's), the state tensors are copied in (transposed back) and
        ``step`` becomes ``step_count``.  torch's SGD keeps no step count:
        ``step_count`` becomes 1 when it holds momentum buffers (only
        "buffer set or not" matters to the rule), else 0.  Everything is
        checked before anything changes (ValueError/TypeError).

        A fastgrad checkpoint with ``"groups"`` restores its parameter
        groups; one without (a single group, or written before groups
        existed) loads as one group.
        """
        if isinstance(sd, Mapping) and "param_groups" in sd:
            return self._load_torch_state_dict(sd)
        if not isinstance(sd, Mapping):
            raise TypeError(f"state dict: expected a mapping, got {type(sd).__name__}")
        if sd.get("kind") != self.kind:
            raise ValueError(f"checkpoint is for {sd.get('kind')!r}, not {self.kind!r}")
        if not isinstance(sd.get("hyper"), Mapping):
            raise ValueError(f"checkpoint hyper: expected a mapping, got {sd.get('hyper')!r:.80}")
        if "step" not in sd:
            raise ValueError("checkpoint lacks 'step'")
        counts = {key: _count(f"checkpoint {key}", sd.get(key, 0))
                  for key in ("step", "n_skipped", "n_calls")}
        arrays = sd.get("state", {})
        if not isinstance(arrays, Mapping):
            raise ValueError("checkpoint state: expected a mapping of arrays")
        hyper = dict(sd["hyper"])
        hyper.setdefault("maximize", False)     # checkpoints from before maximize
        with self._lock:
            self._settle()      # updates in flight finish before the state is replaced
            saved = self._snapshot()
            try:
                self._load_checked(sd, hyper, arrays, counts)
            except BaseException:
                self._restore(saved)            # a refused checkpoint changes nothing
                raise

    def _load_checked(self, sd, hyper, arrays, counts):
        self._configure(hyper)
        # A checkpoint without groups (one group, or written before groups
        # existed) loads as one group.
        data = sd.get("groups")
        self._install_groups(self._build_groups(None) if data is None
                             else self._groups_from_state(data))
        since = sd.get("since")
        if since is not None and not (
                isinstance(since, (list, tuple)) and len(since) == len(self._groups)
                and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                        and 0 <= s <= counts["step"] for s in since)):
            raise ValueError(f"checkpoint since: expected {len(self._groups)} update counts "
                             f"in [0, step], got {since!r:.80}")
        for name, buf in self.state.items():
            if name not in arrays:
                raise ValueError(f"checkpoint lacks state {name!r}")
            a = np.asarray(arrays[name])
            if a.shape != buf.shape:
                raise ValueError(f"state {name!r}: shape {a.shape} != {buf.shape}")
            if not np.can_cast(a.dtype, buf.dtype, casting="same_kind"):
                raise ValueError(f"state {name!r}: dtype {a.dtype} does not fit {buf.dtype}")
        for name, buf in self.state.items():
            buf[...] = self._xp.asarray(arrays[name], dtype=buf.dtype)
        self.step_count = counts["step"]
        for g, s in zip(self._groups, since or [0] * len(self._groups)):
            g.since = int(s)    # where a new buffer's first update is still to come
        self.n_skipped = counts["n_skipped"]
        self.n_calls = counts["n_calls"]

    def _snapshot(self):
        """What a load changes: values, groups, state and counters."""
        return (dict(self._values),
                [(g.ranges, g.values, g.lr_scale, g.since) for g in self._groups],
                {n: buf.copy() for n, buf in self._state.items()},
                (self._step_count, self._n_skipped, self.n_calls))

    def _restore(self, saved):
        values, groups, state, (step, skipped, calls) = saved
        self._set_hyper(values)
        restored = []
        for ranges, v, lr_scale, since in groups:
            g = _Group(ranges, v, lr_scale)
            g.since = since
            restored.append(g)
        self._install_groups(restored)
        for name, arr in state.items():
            self._state[name][...] = arr
        self._step_count, self._n_skipped, self.n_calls = step, skipped, calls

    # -- torch's state-dict structure ---------------------------------------------
    def _torch_group(self, i=0):
        """Group ``i``'s hyper-parameters as torch's param_groups entry."""
        values = self._groups[i].values
        group = {"lr": self._group_lr(i, self.step_count)}
        group.update((name, values[name]) for name in self._specs)
        group["maximize"] = values["maximize"]
        group.update(self._torch.group_keys)
        return group

    def _no_torch_twin(self):
        if self._torch is None:
            raise ValueError(f"{type(self).__name__} has no torch.optim counterpart: its state "
                             "has no torch structure")

    def _torch_state_dict(self):
        self._no_torch_twin()
        try:
            import torch
        except ImportError:
            raise ImportError('state_dict(format="torch") needs PyTorch '
                              "(pip install 'fastgrad[peers]')") from None
        with self._lock:
            step = self.step_count          # settles updates in flight
            state, groups, idx = {}, [], 0
            # torch numbers the parameters group after group
            for gi, positions in enumerate(self._torch_order):
                ids = []
                # torch keeps a buffer for the parameters of the groups that
                # use it alone; where a rule counts no steps (SGD), a buffer
                # whose first update is still to come is "no buffer" (None):
                # a zero one would make torch's next step a momentum step
                group = self._groups[gi]
                kept = [n for n in self.state_names if n in self._state and n in
                        self._needed_state_for(self._merged(group.values, self._values))]
                started = self._torch.counts_steps or group.since < step
                for pos in positions:
                    off, shape, transposed = self._torch_layout[pos]
                    if step > 0:
                        entry = {}
                        if self._torch.counts_steps:
                            entry["step"] = torch.tensor(float(step), dtype=torch.float32)
                        for name in self.state_names:
                            if name in kept and started:
                                entry[name] = torch.from_numpy(
                                    self._tensor_of(self._state[name], off, shape, transposed))
                            elif not self._torch.counts_steps:
                                entry[name] = None      # torch's SGD: "no buffer" explicitly
                        state[idx] = entry
                    ids.append(idx)
                    idx += 1
                group = self._torch_group(gi)
                group["params"] = ids
                groups.append(group)
            return {"state": state, "param_groups": groups}

    def _tensor_of(self, flat, off, shape, transposed):
        """The tensor at ``off`` of a flat buffer, in torch's shape (a copy)."""
        n = int(np.prod(shape))
        a = _device.to_numpy(flat[off:off + n])
        a = a.reshape(shape[::-1]).T if transposed else a.reshape(shape)
        return np.ascontiguousarray(a).copy()

    def _torch_group_values(self, gi, group):
        """A torch param_groups entry (without ``params``) as checked values
        of this optimizer (``lr`` a float)."""
        group = dict(group)
        # torch keys that tell rules apart (Adam's decoupled_weight_decay:
        # AdamW); absent ones are taken as this rule's
        for key, want in self._torch.group_keys.items():
            if key in _TORCH_NOOP_FLAGS or key not in group:
                continue
            got = group.pop(key)
            if got != want:
                twins = (r.torch for r in _spec.UPDATE_RULES if r.torch)
                other = next((t.cls for t in twins
                              if key in t.group_keys and t.group_keys[key] == got),
                             f"{key}={got!r}")
                raise ValueError(f"torch state dict is for {other}, not {type(self).__name__}")
        flags = {k: group.pop(k) for k in list(group) if k in _TORCH_NOOP_FLAGS}
        _check_torch_flags(flags)
        group.pop("initial_lr", None)        # set by torch's LR schedulers
        unknown = set(group) - set(self._specs) - {"lr", "maximize"}
        if unknown:
            raise ValueError(f"torch state dict: {type(self).__name__} has no "
                             f"hyper-parameter(s) {sorted(unknown)} (param group {gi})")
        hyper = dict(self._values, **self._groups[gi].values) if len(self._groups) > 1 \
            else dict(self._values)
        hyper["lr"] = self._group_lr(gi, self._step_count)
        hyper.update(group)       # the validators make torch's 0 (for 0.0) a float
        specs = dict(_COMMON_SPECS, **self._specs)
        checked = {k: specs[k].check(k, hyper[k]) for k in specs}
        self._check_combination(checked)
        return checked

    def _load_torch_state_dict(self, sd):
        self._no_torch_twin()
        groups = sd["param_groups"]
        n_groups = len(self._groups)
        if not isinstance(groups, (list, tuple)) or len(groups) != n_groups:
            n = len(groups) if isinstance(groups, (list, tuple)) else type(groups).__name__
            have = "one parameter group" if n_groups == 1 else f"{n_groups} parameter groups"
            raise ValueError(f"torch state dict: this optimizer has {have}, got {n}")
        # Validate every group on a scratch copy first.
        pos_of, checked_groups = {}, []
        for gi, group in enumerate(groups):
            if not isinstance(group, Mapping):
                raise TypeError(f"torch state dict: param_groups[{gi}] must be a dict")
            group = dict(group)
            ids = list(group.pop("params", []))
            positions = self._torch_order[gi]
            if len(ids) != len(positions):
                which = "the group" if n_groups == 1 else f"param group {gi}"
                raise ValueError(f"torch state dict: {which} has {len(ids)} parameters, this "
                                 f"optimizer {len(positions)} (built on "
                                 "model.to_torch().parameters(), grouped alike?)")
            for idx, pos in zip(ids, positions):
                pos_of[idx] = pos
            checked_groups.append(self._torch_group_values(gi, group))
        need = set()
        group_of, need_of = {}, []
        for gi, checked in enumerate(checked_groups):
            need_of.append(self._needed_state_for(checked))
            need |= need_of[-1]
            for pos in self._torch_order[gi]:
                group_of[pos] = gi
        state = sd.get("state", {})
        arrays, steps = {}, set()
        for idx, pos in pos_of.items():
            entry = state.get(idx, {}) if isinstance(state, Mapping) else None
            if entry is None or not isinstance(entry, Mapping):
                raise TypeError(f"torch state dict: state[{idx}] must be a dict")
            off, shape, transposed = self._torch_layout[pos]
            if "step" in entry:
                steps.add(float(np.asarray(_to_host(entry["step"]))))
            for name, value in entry.items():
                if name == "step" or value is None:
                    continue
                if name not in self.state_names:
                    raise ValueError(f"torch state dict: state[{idx}] has {name!r}, which "
                                     f"{type(self).__name__} does not keep")
                a = np.asarray(_to_host(value))
                if a.shape != tuple(shape):
                    raise ValueError(f"torch state dict: state[{idx}][{name!r}] has shape "
                                     f"{a.shape}, expected {tuple(shape)}")
                if not np.can_cast(a.dtype, self.params.dtype, casting="same_kind"):
                    raise ValueError(f"torch state dict: state[{idx}][{name!r}] dtype "
                                     f"{a.dtype} does not fit {self.params.dtype}")
                arrays.setdefault(name, {})[pos] = a.T.ravel() if transposed else a.ravel()
        # torch keeps a buffer for the parameters of the groups that use it
        # (SGD: from their first momentum step on, so some may have none)
        unstarted = set()           # groups whose buffer is still to start
        for name, parts in arrays.items():
            if name not in need:
                raise ValueError(f"torch state dict holds {name!r}, which these "
                                 f"hyper-parameters do not use")
            for pos in parts:
                if name not in need_of[group_of[pos]]:
                    raise ValueError(f"torch state dict holds {name!r} for a parameter of "
                                     f"param group {group_of[pos]}, whose hyper-parameters "
                                     "do not use it")
        for gi, names in enumerate(need_of):
            for name in names:
                have = sum(pos in arrays.get(name, {}) for pos in self._torch_order[gi])
                if have == 0 and not self._torch.counts_steps:
                    unstarted.add(gi)
                elif have != len(self._torch_order[gi]) and (have or arrays):
                    raise ValueError(f"torch state dict: {name!r} is kept for {have} of the "
                                     f"{len(self._torch_order[gi])} parameters of param "
                                     f"group {gi}")
        if len(steps) > 1:
            raise ValueError(f"torch state dict: parameters are at different steps "
                             f"{sorted(steps)}; fastgrad keeps one step count")
        if steps:
            step = steps.pop()
            if step != int(step) or step < 0:
                raise ValueError(f"torch state dict: step must be a whole number >= 0, "
                                 f"got {step}")
            step = int(step)
        else:
            step = 1 if arrays else 0
        missing = need - set(arrays)
        if step > 0 and missing and self._torch.counts_steps:
            raise ValueError(f"torch state dict lacks state {sorted(missing)}")
        with self._lock:
            self._settle()
            if n_groups == 1:
                self._set_hyper(dict(checked_groups[0]))
            else:
                # The optimizer's own values stay; each group gets its own,
                # its lr as a constant (torch keeps schedules outside).
                for g, checked in zip(self._groups, checked_groups):
                    g.values = {k: checked[k] for k in g.values if k != "lr"}
                    g.values["lr"] = checked["lr"]
                    g.lr_scale = None
                self._alloc_state()
            for name, buf in self._state.items():
                buf[...] = 0
                for pos, flat in arrays.get(name, {}).items():
                    off = self._torch_layout[pos][0]
                    buf[off:off + flat.size] = self._xp.asarray(flat, dtype=buf.dtype)
            self.step_count = step
            for gi, g in enumerate(self._groups):
                # a group without its buffer starts it at the next update
                g.since = step if gi in unstarted else 0

    def _needed_state_for(self, values):
        """Names of the state buffers the hyper-parameters ``values`` use."""
        return self._needed_state_of(values)

    # -- the update -------------------------------------------------------------
    def _fill_hp(self, hp, k, v, group=0):
        """The rule's slots of ``hp`` for update ``k`` of group ``group``
        under the values ``v``."""
        _spec.fill_hp(self.rule, hp, v, self._update_number(k, group))

    def _fill_row(self, hp, k, group=0):
        """Fill ``hp`` for update ``k`` with group ``group``'s values;
        returns its learning rate."""
        lr = self._group_lr(group, k)
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"the schedule gave lr={lr!r} at update {k}")
        values = self._groups[group].values
        # Values are never changed in place (every write installs new
        # dicts), so a row filled under the same dicts needs only what
        # changes with the update count: a third of the time, which is a
        # tiny net's step's critical path.  (The rule is a class constant.)
        known = self._hp_rows_known.get(group)
        if known is not None and known[0] is self._values and known[1] is values:
            # the step's own row through a memoryview: just after a kernel,
            # NumPy's item assignment is the costlier call (its code is out
            # of the caches; bench/RESULTS.md, "Python just after the kernel")
            row = self._hp_view if hp is self._hp else hp       # (None: _hp has rows)
            row[:] = known[3]
            row[_k.HP_LR] = lr
            self._per_update_fill(row, known[2], self._update_number(k, group))
            row[_k.HP_UPDATE] = k
        else:
            v = self._merged(values, self._values)
            hp[:] = 0.0
            hp[_k.HP_LR] = lr
            hp[_k.HP_MAXIMIZE] = float(v["maximize"])
            self._fill_hp(hp, k, v, group)
            self._hp_rows_known[group] = (self._values, values, v, memoryview(hp.copy()))
            hp[_k.HP_UPDATE] = k
        return lr

    def _fill_update(self, hp, k):
        """Fill ``hp`` (shaped as ``self._hp``: one row, or one row per
        segment with parameter groups) for update ``k``; returns group 0's
        learning rate."""
        if self._seg_group is None:
            return self._fill_row(hp, k)
        rows = self._group_rows
        lr = None
        for gi in range(rows.shape[0]):
            lr_g = self._fill_row(rows[gi], k, gi)
            lr = lr_g if lr is None else lr
        np.take(rows, self._seg_group, axis=0, out=hp)
        hp[:, _k.HP_END] = self._seg_ends
        return lr

    def _fill_updates(self, rows, lrs, k0):
        """Fill ``rows[r]`` for update ``k0 + r`` as :meth:`_fill_update`
        does, and ``lrs[r]`` with its learning rate, for every row.

        For a compiled epoch, which takes a row per step: with one group the
        first row is filled in full and the others copy it, rewriting only
        what changes with the update count (lr, the rule's per-update terms,
        the update index) -- the same values at a third of the cost.
        """
        n = rows.shape[0]
        if n == 0:
            return
        if self._seg_group is not None:
            for r in range(n):
                lrs[r] = self._fill_update(rows[r], k0 + r)
            return
        lrs[0] = self._fill_row(rows[0], k0)
        rows[1:] = rows[0]
        v = self._merged(self._groups[0].values, self._values)
        for r in range(1, n):
            k = k0 + r
            lr = self._group_lr(0, k)
            if not (lr >= 0.0 and math.isfinite(lr)):
                raise ValueError(f"the schedule gave lr={lr!r} at update {k}")
            row = rows[r]
            row[_k.HP_LR] = lr
            self._per_update_fill(row, v, self._update_number(k, 0))
            row[_k.HP_UPDATE] = k
            lrs[r] = lr

    def _kernel_args(self):
        """``(rule, s0, s1, s2, hp)`` for the next update ``k = step_count``:
        the arguments every update and step kernel takes after the buffers.
        ``hp`` is one row, or with several parameter groups one row per
        segment of the flat buffer (``kernels.cpu.optim``); on CUDA the
        table of rows for every ``k`` the device can be at (see the module
        docstring)."""
        state = self._state_args
        s0, s1, s2 = self._buffers() if state is None else state
        return self.rule, s0, s1, s2, self._records.hp_rows()

    def _commit(self, norm, scale, skipped, layer_sq, with_loss=False):
        """Book-keep one kernel call; returns its :class:`StepStats`.

        On CUDA the kernel's outputs stay on the device: this queues the
        copy of the update's record and returns StepStats that fill
        themselves from it (``with_loss``: the record holds the step's loss).
        """
        self.n_calls += 1
        return self._records.commit(norm, scale, skipped, layer_sq, with_loss)

    def step(self):
        """Apply one clipped update from the current gradients.

        Returns
        -------
        StepStats
        """
        with self._lock, interrupts.hold:   # a Ctrl-C lands after the book-keeping
            if self._multi is not None:
                return self._step_in_place()
            if self._pairs is not None:
                self._gather_params()
                self._gather_grads()
            rule, s0, s1, s2, hp = self._kernel_args()
            norm, scale, skipped = self._chosen_update()(
                rule, self._params, self.grads, s0, s1, s2, hp, self._offsets,
                self._layer_sq, self._clip_norm, self._clip_value,
                **self._records.update_kwargs)
            if self._pairs is not None and not skipped:
                self._scatter_params()
            return self._commit(norm, scale, skipped, self._layer_sq)

    def _step_in_place(self):
        """``step()`` for contiguous (param, grad) pairs: one multi-tensor
        kernel call on the user's arrays and per-pair views of the flat state
        buffers (the backend's ``update_pairs``), bitwise the flat kernel's
        result, with no copies; on CUDA nothing waits for the device."""
        norm, scale, skipped = self._backend.update_pairs(self)
        return self._commit(norm, scale, skipped, self._layer_sq)

    def __reduce__(self):
        # copy.deepcopy and pickle: built again on the copied model (or
        # pairs), then loaded with this state, as fastgrad.load does (the
        # lock and compiled kernels cannot be copied)
        with self._lock:
            return _rebuilt_optimizer, (type(self), self._target, self.state_dict(),
                                        self._parallel_asked)

    def zero_grad(self):
        """Set the gradients to zero (the user's arrays for pairs)."""
        with self._lock:
            if self._pairs is not None:
                for _, g in self._pairs:
                    g[...] = 0
            self._grads[...] = 0

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"


def _rebuilt_optimizer(cls, target, state, parallel):
    opt = cls(target)
    opt.load_state_dict(state)
    if parallel is not None:
        opt.parallel = parallel
    return opt


class SGD(Optimizer):
    r"""Stochastic gradient descent with momentum (PyTorch's ``torch.optim.SGD``).

    With ``g`` the clipped gradient, for update ``t = 1, 2, ...``::

        g <- g + weight_decay * p
        b <- g                                   (t = 1)
        b <- momentum * b + (1 - dampening) * g  (t > 1)
        d <- g + momentum * b  if nesterov else b   (d = g if momentum == 0)
        p <- p - lr * d

    Nesterov momentum as in Sutskever et al., "On the importance of
    initialization and momentum in deep learning", ICML 2013.
    """

    kind = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, clip_norm=None, clip_value=None, skip_nonfinite=True,
                 maximize=False, foreach=None, fused=None,
                 capturable=False, differentiable=False, param_groups=None):
        super().__init__(params, lr, clip_norm=clip_norm, clip_value=clip_value,
                         skip_nonfinite=skip_nonfinite, maximize=maximize, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable,
                         param_groups=param_groups,
                         momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR
    2015), as PyTorch's ``torch.optim.Adam``; AMSGrad (Reddi et al., "On the
    Convergence of Adam and Beyond", ICLR 2018) with ``amsgrad=True``.

    With ``g`` the clipped gradient, for update ``t = 1, 2, ...``::

        g <- g + weight_decay * p                    (L2, into the moments)
        m <- m + (1 - beta1) * (g - m)
        v <- beta2 * v + (1 - beta2) * g * g
        vmax <- max(vmax, v)                          (amsgrad; then v := vmax)
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """

    kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, clip_norm=None, clip_value=None, skip_nonfinite=True,
                 maximize=False, foreach=None, fused=None,
                 capturable=False, differentiable=False, param_groups=None):
        super().__init__(params, lr, clip_norm=clip_norm, clip_value=clip_value,
                         skip_nonfinite=skip_nonfinite, maximize=maximize, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable,
                         param_groups=param_groups,
                         betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad)


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization", ICLR 2019), as
    ``torch.optim.AdamW``: ``p <- p * (1 - lr * weight_decay)`` first, then the
    Adam update of :class:`Adam` without the L2 term.  Default decay 1e-2.
    """

    kind = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, clip_norm=None, clip_value=None, skip_nonfinite=True,
                 maximize=False, foreach=None, fused=None,
                 capturable=False, differentiable=False, param_groups=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, clip_norm=clip_norm,
                         clip_value=clip_value, skip_nonfinite=skip_nonfinite,
                         maximize=maximize, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable,
                         param_groups=param_groups)


class RMSprop(Optimizer):
    r"""RMSprop (Hinton, Lecture 6e of "Neural Networks for Machine Learning",
    2012; centered variant: Graves, "Generating Sequences With Recurrent Neural
    Networks", 2013), as PyTorch's ``torch.optim.RMSprop``.

    With ``g`` the clipped gradient::

        g <- g + weight_decay * p
        s <- alpha * s + (1 - alpha) * g * g
        a <- a + (1 - alpha) * (g - a)               (centered)
        d <- sqrt(s - a * a) + eps  if centered else sqrt(s) + eps
        b <- momentum * b + g / d;  p <- p - lr * b  (momentum > 0)
        p <- p - lr * g / d                          (otherwise)
    """

    kind = "rmsprop"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, *, clip_norm=None, clip_value=None,
                 skip_nonfinite=True, maximize=False, foreach=None, fused=None,
                 capturable=False, differentiable=False, param_groups=None):
        super().__init__(params, lr, clip_norm=clip_norm, clip_value=clip_value,
                         skip_nonfinite=skip_nonfinite, maximize=maximize, foreach=foreach, fused=fused,
                         capturable=capturable, differentiable=differentiable,
                         param_groups=param_groups,
                         alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered)
