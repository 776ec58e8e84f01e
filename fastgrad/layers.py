"""Layers on one flat parameter buffer.

A model's parameters live in ONE contiguous 1-D array (``model.params``);
every layer's ``W`` and ``b`` are views into it, and the gradients live in a
twin buffer (``model.grads``).  So one kernel updates every parameter, one
reduction gives the global gradient norm, and a checkpoint is a few arrays.

Layer i owns ``params[layer_offsets[i]:layer_offsets[i+1]]``: its ``W``
(row-major ``(n_in, n_out)``) followed by its ``b``, then the parameters of
its epilogue pieces (``fastgrad.epilogue``: norm, weight norm).
"""
import collections
import math
import numbers
import threading
import weakref

import numpy as np

from . import epilogue, interrupts, ops
from .kernels import layout as _layout
from .kernels import spec as _spec
from .backend import backend_for, backend_of
from .optim import COUNTER_BOUND

_SEED_MASK = (1 << 63) - 1     # keeps the seed an int64 for the kernels

INITIALIZERS = ("xavier_uniform", "xavier_normal", "he_uniform", "he_normal", "zeros")


def _init_weights(name, n_in, n_out, rng):
    """float64 weights of shape (n_in, n_out) for initializer ``name``.

    Glorot: limit sqrt(6 / (fan_in + fan_out)), std sqrt(2 / (fan_in + fan_out));
    He: limit sqrt(6 / fan_in), std sqrt(2 / fan_in) (torch's kaiming_* with
    the relu gain).
    """
    shape = (n_in, n_out)
    if name == "xavier_uniform":
        lim = math.sqrt(6.0 / (n_in + n_out))
        return rng.uniform(-lim, lim, shape)
    if name == "xavier_normal":
        return rng.normal(0.0, math.sqrt(2.0 / (n_in + n_out)), shape)
    if name == "he_uniform":
        lim = math.sqrt(6.0 / n_in)
        return rng.uniform(-lim, lim, shape)
    if name == "he_normal":
        return rng.normal(0.0, math.sqrt(2.0 / n_in), shape)
    return np.zeros(shape)


# The layer path keeps the step plans of this many batch sizes per mode
# (training forward, predict), least recently used dropped first.
_MAX_CACHED_BATCH_SIZES = 8


def _dropout_args(seed, layer, counter, p):
    """(key, threshold, scale) of layer ``layer``'s mask at ``counter``."""
    from .kernels.cpu import blocks
    if p <= 0:
        return np.uint64(0), np.uint64(0), 1.0
    return (np.uint64(blocks.dropout_key(seed, layer, counter)), blocks.dropout_threshold(p),
            1.0 / (1.0 - p))


def _fixed(name, doc):
    """A model attribute that cannot be rebound: every layer's ``W``/``b``,
    the optimizer and compiled steps hold views of (or references to) the
    array, so a new array would silently detach them from training."""
    private = "_" + name

    def get(self):
        return getattr(self, private)

    def refuse(self, value):
        raise AttributeError(f"model.{name} cannot be replaced: the layers, optimizers and "
                             f"TrainSteps of this model use this very array; write into it "
                             f"instead (model.{name}[...] = values)")

    return property(get, refuse, doc=doc)


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class Dense:
    """Fully connected layer ``a = activation(x @ W + b)``.

    Parameters
    ----------
    n_in, n_out : int
        Input and output widths (``W`` is ``(n_in, n_out)``, as in Keras/Flax).
    activation : str or None
        identity (None), relu, leaky_relu, elu, sigmoid, tanh, softplus, gelu
        (exact, erf), gelu_tanh (tanh approximation), silu, or a name added by
        :func:`fastgrad.register_activation` (``fastgrad.registry.names()``).
    alpha : float, optional
        Slope of leaky_relu (default 0.01) or scale of elu (default 1.0).
    init : str
        xavier_uniform, xavier_normal, he_uniform, he_normal or zeros.
        Biases start at zero.
    dropout : float
        Inverted dropout after the activation, ``y = f(z) * mask / (1 - p)``,
        in training mode only; ``p`` in [0, 1).  0 (default) is no dropout
        at all (the plain kernels, bit for bit).
    norm : None, "layer" or "batch"
        Normalisation between ``x W + b`` and the activation, as
        ``nn.Sequential(nn.Linear, nn.LayerNorm / nn.BatchNorm1d, act)``
        (eps 1e-5; batch norm: momentum 0.1, running statistics used in eval
        mode and by ``predict``).  Its affine ``gamma`` (ones) and ``beta``
        (zeros) follow ``b`` in the flat buffer.
    weight_norm : bool
        Weight normalisation, ``W = g v / ||v||`` per output unit (column):
        the parameters are ``v`` (where ``W`` would be) and ``g`` (the
        layer's last ``n_out`` entries, starting at ``||v||`` so that ``W``
        starts as the initializer drew it).  ``W`` and ``dW`` are then the
        effective weight and its gradient, recomputed by each layer-path
        forward and backward (``model.forward``/``predict``/``backward``; a
        TrainStep leaves them as they were); ``v``, ``g``, ``dv``, ``dg``
        are the views into the flat buffers.

    Notes
    -----
    A Dense has no storage of its own until a :class:`Sequential` places it
    in the model's flat buffer; from then on its arrays (``W``, ``b``,
    ``dW``, ``db``, ...) cannot be rebound (AttributeError: the model,
    optimizer and compiled steps use the flat buffers), only written in
    place, and its settings (widths, activation, alpha, dropout, norm,
    residual, weight_norm) are fixed (AttributeError).
    """

    # every array a placed layer views: its parameter slots, their
    # gradients and its buffers, whatever its pieces (fastgrad.epilogue)
    _VIEWS = epilogue.view_names()

    # the settings the model's buffers, plans and compiled steps are laid
    # out for: fixed once the layer is placed
    _SETTINGS = frozenset(("n_in", "n_out", "code") + tuple(epilogue.FIELD_NAMES))

    def __setattr__(self, name, value):
        placed = self.__dict__.get("_placed", False)
        # ``layer.dW += x`` adds in place, then sets the same array back: allowed.
        if placed and name in Dense._VIEWS and value is not self.__dict__.get(name):
            raise AttributeError(f"layer.{name} cannot be replaced: it belongs to the model's "
                                 f"flat buffers; write into it instead (layer.{name}[...] = "
                                 "values)")
        if placed and name in Dense._SETTINGS and not _same_setting(value,
                                                                    self.__dict__.get(name)):
            raise AttributeError(f"layer.{name} is fixed once the layer is in a model: its "
                                 "buffers and compiled steps are laid out for it; build a "
                                 f"new model with the {name} you want (model.eval() turns "
                                 "dropout off)")
        given = self.__dict__.get("_given")
        if given is not None and not placed and name in Dense._SETTINGS:
            # before placement a setting may change: checked and resolved as
            # the constructor does (the activation's code, its default alpha);
            # written alone, the kernels kept the old code and dropout=1.5 ran
            if name in ("n_in", "n_out", "code"):
                raise AttributeError(f"layer.{name} is fixed: build a new Dense")
            given = dict(given, **{name: value})
            for key, resolved in epilogue.check_config(given, self.n_in, self.n_out).items():
                object.__setattr__(self, key, resolved)
            object.__setattr__(self, "_given", given)
            return
        object.__setattr__(self, name, value)

    def __init__(self, n_in, n_out, activation="relu", alpha=None, init="he_normal",
                 dropout=0.0, norm=None, weight_norm=False):
        self.n_in = _positive_int(n_in, "n_in")
        self.n_out = _positive_int(n_out, "n_out")
        if init not in INITIALIZERS:
            raise ValueError(f"unknown initializer {init!r}; expected one of {list(INITIALIZERS)}")
        # The epilogue pieces' settings (residual: set by Residual, y = x + layer(x)).
        settings = {"activation": activation, "alpha": alpha, "dropout": dropout, "norm": norm,
                    "residual": False, "weight_norm": weight_norm}
        for name, value in epilogue.check_config(settings, self.n_in, self.n_out).items():
            setattr(self, name, value)
        self.init = init
        for name in Dense._VIEWS:
            setattr(self, name, None)
        self._given = settings          # as given (alpha None: the activation's default)

    @property
    def has_epilogue(self):
        """True when this layer has epilogue pieces beyond its activation
        (dropout, residual, norm, weight norm: ``fastgrad.epilogue``), which
        run in the epilogue kernels."""
        return epilogue.has_epilogue(self)

    extended = property(lambda self: self.has_epilogue,
                        doc="The former name of :attr:`has_epilogue` (kept).")

    @property
    def n_params(self):
        return epilogue.layer_size(self, self.n_in, self.n_out)

    def _bind(self, params, grads, offset):
        """Make the layer's parameter slots (W, b, then its pieces': gamma,
        beta, g; ``fastgrad.epilogue.param_slots``, the order of
        ``kernels/layout.py``) views into the flat buffers at ``offset``;
        returns the end."""
        end = offset
        for slot, start, end in epilogue.param_slots(self, self.n_in, self.n_out, offset):
            shape = (self.n_in, self.n_out) if slot.matrix else (self.n_out,)
            setattr(self, slot.name, params[start:end].reshape(shape))
            setattr(self, slot.grad, grads[start:end].reshape(shape))
            if slot.fill is not None:
                getattr(self, slot.name)[...] = slot.fill
        if self.weight_norm:
            be = backend_of(params)
            xp = be.xp
            # The effective weight and its gradient: scratch, not parameters.
            self.W, self.dW = xp.empty_like(self.v), xp.empty_like(self.v)
            self._inv_norm = xp.empty(self.n_out)
            self._wnorm = be.epilogue_kernels()[2]
        return end

    def _weight_norm_forward(self):
        self._wnorm.weight_norm_forward(self.v, self.g, self.W, self._inv_norm)

    def __repr__(self):
        extra = f", dropout={self.dropout!r}" if self.dropout else ""
        extra += f", norm={self.norm!r}" if self.norm else ""
        extra += ", weight_norm=True" if self.weight_norm else ""
        return (f"Dense({self.n_in}, {self.n_out}, activation={self.activation!r}, "
                f"init={self.init!r}{extra})")


def _same_setting(value, current):
    return type(value) is type(current) and value == current


_dropout_rate = epilogue.dropout_rate


class Residual(Dense):
    """Residual block ``y = x + layer(x)`` around a square :class:`Dense`.

    Parameters
    ----------
    layer : Dense
        With ``n_in == n_out``; its dropout (if any) applies to ``f(z)``
        before the skip is added: ``y = x + dropout(f(x W + b))``.

    The block is its Dense with the residual epilogue piece on
    (``fastgrad.epilogue``): it is a Dense itself and shares the wrapped
    layer's state, so ``block.W is block.layer.W`` and an attribute set on
    one is set on the other.  The wrapped layer itself is ``block.layer``.
    """

    # the wrapped Dense, kept outside the shared __dict__
    __slots__ = ("_layer",)

    def __init__(self, layer):
        if not isinstance(layer, Dense):
            raise TypeError(f"Residual wraps a fastgrad.Dense, got {type(layer).__name__}")
        if layer.n_in != layer.n_out:
            raise ValueError(f"a residual block needs n_in == n_out, got Dense({layer.n_in}, "
                             f"{layer.n_out})")
        if layer.residual:
            raise ValueError("this Dense is already inside a Residual")
        if layer.W is not None:
            raise ValueError("this Dense already belongs to a model")
        layer.residual = True
        _share_state(self, layer)

    def __reduce__(self):
        # copies and pickles keep the block and its Dense one state
        return _residual_around, (self._layer,)

    @property
    def layer(self):
        """The wrapped :class:`Dense` (same state as the block)."""
        return self._layer

    def __repr__(self):
        return f"Residual({Dense.__repr__(self)})"


def _share_state(block, layer):
    """One state under two names: the block's attributes are the layer's."""
    object.__setattr__(block, "__dict__", layer.__dict__)
    object.__setattr__(block, "_layer", layer)
    return block


def _residual_around(layer):
    """The Residual of a Dense that already is a residual block's (unpickling)."""
    return _share_state(Residual.__new__(Residual), layer)


def dense_from_settings(n_in, n_out, init, settings):
    """A Dense (in a :class:`Residual` when ``settings["residual"]``) with
    the epilogue pieces' ``settings`` (``fastgrad.epilogue.FIELD_NAMES``):
    how checkpoints and ``from_torch`` build layers."""
    kwargs = {k: v for k, v in settings.items() if k != "residual"}
    layer = Dense(n_in, n_out, init=init, **kwargs)
    return Residual(layer) if settings.get("residual") else layer


def _unwrap(layer):
    return layer.layer if isinstance(layer, Residual) else layer


class StateDictError(ValueError, RuntimeError):
    """A state dict that :meth:`Sequential.load_state_dict` refuses.

    A ValueError (fastgrad's bad-input error) and a RuntimeError (what torch's
    ``load_state_dict`` raises), so code written for either catches it."""


IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def _layer_parameters(layer):
    """(short name, view, is the dense weight) of a layer's parameters, in
    buffer order (``fastgrad.epilogue.param_slots``)."""
    layer = _unwrap(layer)
    return [(slot.name, getattr(layer, slot.name), slot.matrix)
            for slot, _, _ in epilogue.param_slots(layer, layer.n_in, layer.n_out)]


# Models by their flat parameter buffer, so that torch's spelling
# ``fg.Adam([{"params": model.weights()}, ...])`` finds the model from views.
_MODELS = weakref.WeakValueDictionary()


def models_using(code):
    """How many live models have a layer of activation ``code`` (after a
    garbage collection: a model dropped in a reference cycle is not live)."""
    import gc
    gc.collect()
    return sum(any(layer.code == code for layer in m.layers) for m in list(_MODELS.values()))


def model_of(array):
    """The fastgrad model whose flat parameter buffer ``array`` is a view
    of (or is), else None."""
    base = array
    while getattr(base, "base", None) is not None:
        base = base.base
    model = _MODELS.get(id(base))
    return model if model is not None and model.params is base else None


class Sequential:
    """A stack of :class:`Dense` layers on one flat parameter buffer.

    Parameters
    ----------
    layers : list of Dense or Residual
    dtype : "float32" (default) or "float64"
    device : "auto" | "cpu" | "cuda" | None (None: ``fastgrad.get_device()``)
    seed : int
        Seeds the initializers (the same seed gives the same weights) and the
        dropout masks.

    A model starts in training mode (``model.train()``): ``forward`` applies
    dropout and advances ``model.dropout_step``, the counter the masks are
    drawn from.  ``model.eval()`` turns dropout off; ``predict`` never drops.

    ``params``, ``grads``, ``layer_offsets``, ``running_mean`` and
    ``running_var`` cannot be rebound (AttributeError): the layers' views,
    optimizers and TrainSteps hold these very arrays.  Write into them in
    place (``model.params[...] = values``); ``layer_offsets`` is a
    read-only view.  ``forward``, ``backward`` and
    ``predict`` hold the model's lock (shared with its optimizers and
    TrainSteps), so calls from several threads do not interleave.
    """

    params = _fixed("params", "The flat parameter buffer (1-D; writable in place only).")
    grads = _fixed("grads", "The flat gradient buffer (1-D; writable in place only).")

    @property
    def layer_offsets(self):
        """Layer boundaries in ``params`` (int64; a read-only view: the
        kernels index with the model's own array)."""
        view = self._layer_offsets.view()
        view.flags.writeable = False
        return view

    @layer_offsets.setter
    def layer_offsets(self, value):
        raise AttributeError("model.layer_offsets cannot be replaced: the layers' views, "
                             "optimizers and TrainSteps are laid out by it")
    running_mean = _fixed("running_mean", "Batch-norm running means (float64, all layers).")
    running_var = _fixed("running_var", "Batch-norm running variances (float64, all layers).")

    def __init__(self, layers, dtype="float32", device=None, seed=0):
        layers = list(layers)
        if not layers:
            raise ValueError("a model needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Dense):
                raise TypeError(f"layer {i} is a {type(layer).__name__}, expected fastgrad.Dense")
            if i and layer.n_in != layers[i - 1].n_out:
                raise ValueError(f"layer {i} expects {layer.n_in} inputs but layer {i - 1} "
                                 f"gives {layers[i - 1].n_out}")
            if any(_unwrap(layer) is _unwrap(other) for other in layers[:i]):
                raise ValueError(f"layer {i} appears twice; create a new Dense per position")
            if not isinstance(layer, Residual) and layer.residual:
                raise ValueError(f"layer {i} is the Dense of a Residual; pass the Residual")
            if layer.W is not None:
                raise ValueError(f"layer {i} already belongs to a model")
        self.layers = layers
        self.dtype = ops.check_dtype(dtype)
        self._backend = backend_for(device)
        # CUDA refuses registered activations without CUDA forms, saying so
        self._backend.check_activations([layer.code for layer in layers])
        xp = self._xp = self._backend.xp
        offsets = [0]
        for layer in layers:
            offsets.append(offsets[-1] + layer.n_params)
        # One lock per model, shared by its optimizers and TrainSteps: a
        # step, an update or a forward/backward runs whole, one at a time.
        self._lock = threading.RLock()
        self._layer_offsets = np.asarray(offsets, dtype=np.int64)
        self._params = xp.zeros(offsets[-1], self.dtype)
        self._grads = xp.zeros(offsets[-1], self.dtype)
        _MODELS[id(self._params)] = self
        for layer, off in zip(layers, offsets):
            layer._bind(self.params, self.grads, off)
        self.seed = seed
        rng = np.random.default_rng(seed)
        for layer in layers:
            W = _init_weights(layer.init, layer.n_in, layer.n_out, rng).astype(self.dtype)
            layer.W[...] = xp.asarray(W)
            if layer.weight_norm:
                # v as drawn, g = ||v|| per column: W starts as drawn (as
                # torch.nn.utils.weight_norm starts).
                layer.v[...] = layer.W
                g = np.sqrt((W.astype(np.float64) ** 2).sum(axis=0)).astype(self.dtype)
                layer.g[...] = xp.asarray(g)
                layer._weight_norm_forward()
        self._cache = None
        self._driver_config = None        # the layer path's driver: _layer_driver
        self._step_driver = (None, None)  # (codes, pieces), a TrainStep's driver of them
        # Batch-norm running statistics: model state outside the parameters
        # (no gradient, not updated by the optimizer), one pair per layer.
        width = sum(layer.n_out for layer in layers)
        self._running_mean = xp.zeros(width, np.float64)
        self._running_var = xp.ones(width, np.float64)
        self._has_batch_norm = any(epilogue.layer_buffers(layer) for layer in layers)
        off = 0
        for layer in layers:
            for buf in epilogue.layer_buffers(layer):
                setattr(layer, buf.name, getattr(self, buf.name)[off:off + layer.n_out])
            off += layer.n_out
            _unwrap(layer)._placed = True      # its arrays are views from now on
        self.training = True
        self._dropout_on_device = None
        self.dropout_step = 0
        if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
            self._mask_seed = int(seed) & _SEED_MASK
        else:
            # A seed the masks cannot be derived from (None, a SeedSequence):
            # draw one from the generator that seeded the weights.
            self._mask_seed = int(rng.integers(0, 2 ** 63))

    # -- modes -----------------------------------------------------------------
    @property
    def has_epilogue(self):
        """True when some layer has epilogue pieces beyond its activation
        (dropout, residual, norm, weight norm)."""
        return any(layer.has_epilogue for layer in self.layers)

    extended = property(lambda self: self.has_epilogue,
                        doc="The former name of :attr:`has_epilogue` (kept).")

    def train(self, mode=True):
        """Training mode (dropout on); returns the model, as in PyTorch."""
        if not isinstance(mode, (bool, np.bool_)):
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        with self._lock:                # never in the middle of a step or an epoch's chunk
            self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode (dropout off); returns the model."""
        return self.train(False)

    def _step_snapshot(self):
        """What a training forward changes besides the parameters: the
        dropout counter and (in training mode) the batch-norm running
        statistics.  A TrainStep restores it when its update is skipped."""
        bn = self.training and self._has_batch_norm
        # the host's counter read in place where it rules (the property, a
        # call more, once a step)
        counter = self._dropout_step if self._dropout_on_device is None else self.dropout_step
        return (counter, self._running_mean.copy() if bn else None,
                self._running_var.copy() if bn else None)

    def _restore_snapshot(self, snap):
        self.dropout_step, mean, var = snap
        if mean is not None:
            self._running_mean[...] = mean
            self._running_var[...] = var

    @property
    def dropout_step(self):
        """The dropout counter: masks are drawn from it and every training
        step advances it (a skipped update does not).  A fused CUDA
        TrainStep keeps it in device memory, where its skip decision is:
        reading it then waits for the steps queued so far."""
        dev = self._dropout_on_device
        if dev is not None:
            self._dropout_on_device = None
            self._dropout_step = int(dev[0])
        return self._dropout_step

    @dropout_step.setter
    def dropout_step(self, value):
        if type(value) is not int:           # the steps' own writes are ints: one check
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"dropout_step must be an integer in [0, 2**62), got "
                                 f"{value!r}")
            value = int(value)
        self._store_dropout_step(value)

    def _store_dropout_step(self, value):
        """Make the int ``value`` the dropout counter, the host's from now on."""
        if not 0 <= value < COUNTER_BOUND:
            raise ValueError(f"dropout_step must be an integer in [0, 2**62), got {value!r}")
        with self._lock:                      # not between a chunk's steps and its count
            self._dropout_on_device = None    # the host's value rules from now on
            self._dropout_step = value

    def _next_dropout_step(self):
        """The counter value this training forward draws its masks from.

        Every training-mode forward (layer path or TrainStep, with dropout
        or not) advances it once, so a model's mask sequence depends only
        on how many training steps it has run."""
        # the host's counter read in place where it rules, and no setter's
        # type checks of an int of our own: two calls less, once a step
        c = self._dropout_step if self._dropout_on_device is None else self.dropout_step
        self._store_dropout_step(c + 1)
        return c

    # -- shape facts -------------------------------------------------------
    @property
    def sizes(self):
        """Layer widths, input first: ``[n_in, hidden..., n_out]``."""
        return [self.layers[0].n_in] + [layer.n_out for layer in self.layers]

    device = property(lambda self: self._backend.name,
                      doc='The device the model lives on, "cpu" or "cuda" (read-only).')
    backend = property(lambda self: self._backend,
                       doc="The device's backend (``fastgrad.backend``), chosen once.")

    @property
    def n_params(self):
        return int(self.layer_offsets[-1])

    def _input(self, x):
        arr = ops.as_array(x, "x", self.dtype, shape=(None, self.layers[0].n_in), xp=self._xp)
        if arr.shape[0] == 0:
            raise ValueError("x: empty batch")
        return arr

    def _kernels(self):
        return self._backend.model_kernels([layer.code for layer in self.layers])

    # -- compute -------------------------------------------------------------
    # The layer path (forward, backward, predict) runs the device's step
    # driver without its loss and update: the driver's forward and backward
    # (kernels/cpu/step.py, kernels/cuda/step.py) on the step plan of these
    # layers, compiled for their pieces alone.

    def _layer_driver(self):
        """``(driver, sizes, codes, alphas, flags, needs_z, plans)`` of the
        layers as they are now, rebuilt when an activation or a piece
        setting changes; ``plans`` caches the step plans by (batch size,
        keep)."""
        key = tuple((layer.code, layer.alpha, layer.dropout, layer.norm, layer.residual,
                     layer.weight_norm) for layer in self.layers)
        cfg = self._driver_config
        if cfg is None or cfg[0] != key:
            codes = np.asarray([k[0] for k in key], np.int64)
            features = epilogue.used_pieces(self.layers)
            # The driver of this model's TrainStep when it was built for the
            # same activations and pieces: its helpers are compiled already
            # (a cold predict after training compiles the forward alone).
            built_for, driver = self._step_driver
            if built_for != (tuple(codes.tolist()), features):
                driver = self._backend.step_kernels(codes, rules=(), losses=(),
                                                    features=features)[0]
            cfg = self._driver_config = (
                key, driver, np.asarray(self.sizes, np.int64), codes,
                np.asarray([k[1] for k in key], np.float64), epilogue.plan_flags(self.layers),
                any(ops.needs_z(c) for c in codes), collections.OrderedDict())
        return cfg[1:]

    def _run(self, x, keep, counter=None):
        """The layer path's forward: ``(output, cache)``.  Dropout draws its
        masks from ``counter``; None: no dropout, and batch norm uses its
        running statistics."""
        driver, sizes, codes, alphas, flags, needs_z, plans = self._layer_driver()
        xp, B = self._xp, x.shape[0]
        training = counter is not None
        if training and B == 1 and (flags["norms"] == _spec.BATCH).any():
            raise ValueError("batch norm in training mode needs more than 1 sample per batch "
                             "(got a batch of 1), as in PyTorch; use model.eval()")
        entry = plans.get((B, keep))
        if entry is None:
            # the last few batch sizes' plans (and device workspaces)
            while len(plans) >= 2 * _MAX_CACHED_BATCH_SIZES:
                plans.popitem(last=False)
            entry = plans[(B, keep)] = self._layer_plan(driver, sizes, flags, B)
        else:
            plans.move_to_end((B, keep))
        plan, fplan, n_acts, kw = entry
        plan[_layout.PLAN_SEED] = self._mask_seed
        plan[_layout.PLAN_COUNTER] = counter if training else 0
        plan[_layout.PLAN_TRAINING] = training
        # per call: the output and what backward reads are this call's own
        acts = xp.empty(n_acts, self.dtype)
        epilogue_scratch = n_acts > B * int(sizes[1:].sum())
        zs = xp.empty(B * int(sizes[1:].sum()), self.dtype) if needs_z or epilogue_scratch \
            else acts
        if epilogue_scratch:
            self._refresh_weight_norm()       # layer.W: the effective weight, as documented
        out = driver.forward(x, self._params, sizes, codes, alphas, self._layer_offsets, acts, zs,
                             plan, fplan, self._running_mean, self._running_var, **kw)
        return out, ((x, acts, zs, entry) if keep else None)

    def _layer_plan(self, driver, sizes, flags, B):
        """``(plan, fplan, n_acts, driver keywords)`` of the layer path at
        batch size B (the device's workspace where it has one).  Its passes
        run on the calling thread (through the pass team's members where
        ``driver`` runs them so: kernels/cpu/pass_team.py)."""
        # acts are allocated per call (_run): the plan alone here
        plan, fplan, _ = _layout.step_plan(
            sizes, B, self.n_params, flags["drops"], flags["residual"], flags["norms"],
            flags["wn"], self.dtype, self._mask_seed, empty=lambda n, dt: None)
        self._backend.fill_pass_team(plan, driver, self.dtype, team=False)
        ws = self._backend.step_workspace(B, sizes, self._layer_offsets, None, self.dtype, None,
                                          plan=(plan, fplan))
        return plan, fplan, _layout.acts_size(plan), ({} if ws is None else {"ws": ws})

    def _refresh_weight_norm(self):
        """Recompute the effective W of every weight-normalised layer."""
        for layer in self.layers:
            if layer.weight_norm:
                layer._weight_norm_forward()

    def forward(self, x):
        """Training forward: returns the output and keeps what backward needs.

        In training mode this draws fresh dropout masks (one step of
        ``model.dropout_step``); in eval mode it applies no dropout.

        The returned output and the input (when it is already a contiguous
        array of the model's dtype) are kept, not copied, for
        :meth:`backward`: writing into either before it changes the
        gradients (where torch would raise "modified by an inplace
        operation"); write into copies."""
        x = self._input(x)
        with self._lock:
            counter = self.dropout_step if self.training else None
            out, self._cache = self._run(x, keep=True, counter=counter)
            if self.training:       # advanced once the forward ran (a refused one
                self._next_dropout_step()      # would shift every later mask)
        return out

    def predict(self, x):
        """Inference forward: returns the output and keeps nothing."""
        x = self._input(x)
        with self._lock:
            return self._run(x, keep=False)[0]

    def backward(self, dy, accumulate=False, input_grad=True):
        """Back-propagate ``dy = dL/dy`` through the last :meth:`forward`.

        Writes ``model.grads`` (overwrites; ``accumulate=True`` adds), and
        returns ``dL/dx`` of the input (None with ``input_grad=False``,
        which skips the first layer's ``dx`` GEMM).
        """
        with self._lock:
            return self._backward(dy, accumulate, input_grad)

    def _backward(self, dy, accumulate, input_grad):
        if self._cache is None:
            raise RuntimeError("backward() needs a forward() first (model(x) in eval mode is "
                               "predict(), which keeps nothing: model.forward(x) back-propagates "
                               "in eval mode too)")
        x, acts, zs, (plan, fplan, n_acts, kw) = self._cache
        driver, sizes, codes, alphas, flags, _, _ = self._layer_driver()
        xp, B, n_out = self._xp, x.shape[0], int(sizes[-1])
        da = ops.as_array(dy, "dy", self.dtype, shape=(B, n_out), xp=xp)
        strides = 3 if flags["residual"].any() else 2
        delta = xp.empty(strides * B * int(sizes[1:].max()), self.dtype)
        delta[:B * n_out] = da.reshape(-1)
        grads = xp.empty_like(self._grads) if accumulate else self._grads
        dx = xp.empty((B if input_grad else 0, int(sizes[0])), self.dtype)
        driver.backward(x, self._params, grads, sizes, codes, alphas, self._layer_offsets, acts,
                        zs, delta, plan, fplan, self._running_mean, self._running_var, dx, **kw)
        if flags["wn"].any():
            # layer.dW: the effective weight's gradient, which the driver
            # left in its scratch (laid out like params: kernels/layout.py)
            base = int(plan[_layout.PLAN_DWEFF])
            for layer, off in zip(self.layers, self._layer_offsets.tolist()):
                if layer.weight_norm:
                    n = layer.n_in * layer.n_out
                    layer.dW[...] = acts[base + off:base + off + n].reshape(layer.dW.shape)
        if accumulate:
            self._backend.add_into(self._grads, grads)
        return dx if input_grad else None

    def zero_grad(self, set_to_none=True):
        """Zero every gradient (``model.grads``, the flat buffer).

        ``backward`` overwrites the gradients unless ``accumulate=True``,
        so a plain loop needs no ``zero_grad``; it matters before a series
        of accumulating backward calls.  ``set_to_none`` is accepted for
        PyTorch's spelling: the gradients are one flat buffer that always
        exists, so they are zeroed either way.
        """
        with self._lock:
            self.grads[...] = 0

    # -- PyTorch habits: calling, parameters, state dicts ------------------------
    def __call__(self, x):
        """``model(x)``: :meth:`forward` in training mode (keeps what
        :meth:`backward` needs, draws dropout masks), :meth:`predict` in eval
        mode (keeps nothing), as a torch module follows ``model.training``.
        In eval mode it also drops what an earlier forward kept: a torch user
        back-propagates the last call, so :meth:`backward` then raises
        instead of returning the earlier batch's gradients."""
        if self.training:
            return self.forward(x)
        with self._lock:
            self._cache = None
        return self.predict(x)

    def named_parameters(self):
        """Yield ``(name, view)`` for every parameter array, in buffer order.

        Names are ``layers.{i}.W`` and ``layers.{i}.b`` (``W`` is
        ``(n_in, n_out)``, the transpose of torch's ``Linear.weight``), then
        ``layers.{i}.gamma`` / ``layers.{i}.beta`` for normalised layers; a
        weight-normalised layer has ``layers.{i}.v`` (where ``W`` would be)
        and ``layers.{i}.g`` instead of ``W`` (its ``W`` is recomputed, not a
        parameter).  The views share memory with ``model.params``: writing
        through one changes the model.
        """
        for i, layer in enumerate(self.layers):
            for name, arr, _ in _layer_parameters(layer):
                yield f"layers.{i}.{name}", arr

    def parameters(self):
        """Yield every parameter array (views into ``model.params``); see
        :meth:`named_parameters` for their order."""
        for _, arr in self.named_parameters():
            yield arr

    def weights(self):
        """The dense weight of every layer, as a list of views: ``W``, or
        ``v`` for a weight-normalised layer (see :meth:`named_parameters`).

        With :meth:`biases_and_norms` it splits the parameters for the usual
        AdamW recipe, weight decay on the weights only::

            fg.AdamW(model, param_groups=[
                {"params": model.weights(), "weight_decay": 0.1},
                {"params": model.biases_and_norms(), "weight_decay": 0.0}])
        """
        return [arr for layer in self.layers for _, arr, weight in _layer_parameters(layer)
                if weight]

    def biases_and_norms(self):
        """Every parameter :meth:`weights` leaves out, as a list of views:
        biases ``b``, normalisation gains and shifts ``gamma``/``beta``, and
        the magnitudes ``g`` of weight-normalised layers."""
        return [arr for layer in self.layers for _, arr, weight in _layer_parameters(layer)
                if not weight]

    def named_buffers(self):
        """Yield ``(name, view)`` for the state that is not a parameter: the
        batch-norm running statistics ``layers.{i}.running_mean`` and
        ``layers.{i}.running_var`` (float64, views into ``model.running_mean``
        / ``model.running_var``)."""
        for i, layer in enumerate(self.layers):
            for buf in epilogue.layer_buffers(layer):
                yield f"layers.{i}.{buf.name}", getattr(layer, buf.name)

    def state_dict(self):
        """The model's state as a plain ``dict`` of arrays, name -> array.

        Parameters (:meth:`named_parameters`) then buffers
        (:meth:`named_buffers`).  As torch's ``state_dict``, the arrays are
        views that share memory with the model: keep a snapshot with
        ``{k: v.copy() for k, v in model.state_dict().items()}``.
        """
        out = dict(self.named_parameters())
        out.update(self.named_buffers())
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy the arrays of ``state_dict`` into the model (as torch).

        Parameters
        ----------
        state_dict : mapping of name -> array-like (NumPy, CuPy on a CUDA
            model, or anything ``numpy.asarray`` reads, e.g. CPU torch tensors)
        strict : bool
            True (default): the keys must be exactly :meth:`state_dict`'s;
            False: missing keys keep their values and unexpected keys are
            ignored.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, lists of names, as torch's.

        Raises
        ------
        StateDictError (a ValueError and a RuntimeError)
            With ``strict=True``, missing or unexpected keys (all listed, in
            torch's wording); with either ``strict``, a known key whose array
            has the wrong shape or is not real numbers.  Everything is checked
            before anything is copied: a refused dict leaves the model as it
            was.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict must be a mapping of name -> array, got "
                            f"{type(state_dict).__name__}")
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        if strict:
            if unexpected:
                errors.append("Unexpected key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in unexpected) + ".")
            if missing:
                errors.append("Missing key(s) in state_dict: "
                              + ", ".join(f'"{k}"' for k in missing) + ".")
        values = {}
        for name, dst in own.items():
            if name not in state_dict:
                continue
            src = state_dict[name]
            if hasattr(src, "detach"):           # a torch tensor: to host NumPy
                src = src.detach().cpu().numpy()
            arr = self._xp.asarray(src)
            if arr.dtype.kind not in "fiu":
                errors.append(f"{name}: expected real numbers, got dtype {arr.dtype}")
            elif tuple(arr.shape) != tuple(dst.shape):
                errors.append(f"size mismatch for {name}: copying an array of shape "
                              f"{tuple(arr.shape)}, the shape in the current model is "
                              f"{tuple(dst.shape)}")
            else:
                values[name] = arr
        if errors:
            raise StateDictError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                                 + "\n\t".join(errors))
        # never between a step's forward and its update; a Ctrl-C lands
        # after the whole copy (it left some layers loaded, others not)
        with self._lock, interrupts.hold:
            for name, arr in values.items():
                own[name][...] = arr
            self._refresh_weight_norm()  # W of weight-normalised layers from the new v, g
        return IncompatibleKeys(missing, unexpected)

    def to_torch(self):
        """The equivalent ``torch.nn.Sequential`` (a copy of the weights);
        see :func:`fastgrad.interop.to_torch`."""
        from .interop import to_torch
        return to_torch(self)

    def __repr__(self):
        body = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"{type(self).__name__}([\n  {body}\n], dtype={self.dtype.name!r}, device={self.device!r})"

    def __reduce__(self):
        # copy.deepcopy and pickle, as torch modules allow (a best-weights
        # snapshot, an EMA copy): a new model of the same class, layers,
        # dtype, device and seed with this one's parameters, gradients,
        # running statistics, dropout counter and mode (not its lock,
        # compiled kernels or the last forward's cache)
        with self._lock:
            specs = [(layer.n_in, layer.n_out, layer.init, epilogue.config_of(layer))
                     for layer in self.layers]
            to_host = self._backend.to_host
            arrays = {name: np.array(to_host(getattr(self, name)))
                      for name in ("params", "grads", "running_mean", "running_var")}
            state = {"dropout_step": self.dropout_step, "mask_seed": self._mask_seed,
                     "training": self.training,
                     # a weight-normalised layer's dW: the last backward's
                     "dW": [np.array(to_host(layer.dW)) if layer.weight_norm else None
                            for layer in self.layers],
                     # a subclass's own attributes
                     "extra": {k: v for k, v in self.__dict__.items()
                               if k not in _model_attributes()}}
        return _rebuilt_model, (type(self), specs, self.dtype.name, self.device, self.seed,
                                arrays, state)


def _model_attributes():
    """The attributes ``Sequential.__init__`` sets (every one a model has)."""
    if not _MODEL_ATTRIBUTES:
        _MODEL_ATTRIBUTES.update(Sequential([Dense(1, 1)], device="cpu").__dict__)
    return _MODEL_ATTRIBUTES


_MODEL_ATTRIBUTES = set()


def model_of_settings(cls, specs, dtype, device, seed):
    """A model of class ``cls`` (Sequential or a subclass) whose layers are
    ``specs``, ``(n_in, n_out, init, epilogue settings)`` each, with zero
    parameters (no random draws: the caller writes them next) and the
    initializer names kept: how checkpoints and copies rebuild a model."""
    layers = [dense_from_settings(n_in, n_out, "zeros", settings)
              for n_in, n_out, _, settings in specs]
    model = cls.__new__(cls)
    Sequential.__init__(model, layers, dtype=dtype, device=device, seed=seed)
    for layer, (_, _, init, _) in zip(layers, specs):
        layer.init = init
    return model


def _rebuilt_model(cls, specs, dtype, device, seed, arrays, state):
    """The model :meth:`Sequential.__reduce__` describes."""
    model = model_of_settings(cls, specs, dtype, device, seed)
    layers = model.layers
    for name, values in arrays.items():
        getattr(model, name)[...] = model._xp.asarray(values)
    model._refresh_weight_norm()          # layer.W of weight-normalised layers
    for layer, dW in zip(layers, state["dW"]):
        if dW is not None:
            layer.dW[...] = model._xp.asarray(dW)
    model.dropout_step = state["dropout_step"]
    model._mask_seed = state["mask_seed"]
    model.training = state["training"]
    model.__dict__.update(state["extra"])
    return model


class MLP(Sequential):
    """A multi-layer perceptron ``sizes[0] -> ... -> sizes[-1]``.

    Hidden layers use ``activation``; the last uses ``output_activation``
    (None: identity, the logits for a softmax loss).  ``dropout=p`` puts
    inverted dropout after every hidden layer's activation;
    ``residual=True`` wraps every hidden layer whose width does not change
    (``n_in == n_out``) in a :class:`Residual` block, and needs at least one.
    ``norm`` ("layer" or "batch") normalises every hidden layer before its
    activation; ``weight_norm=True`` weight-normalises every layer.
    """

    def __init__(self, sizes, activation="relu", output_activation=None, init="he_normal",
                 dtype="float32", device=None, seed=0, alpha=None, dropout=0.0, residual=False,
                 norm=None, weight_norm=False):
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"sizes needs at least an input and an output width, got {sizes}")
        sizes = [_positive_int(s, f"sizes[{i}]") for i, s in enumerate(sizes)]
        ops.resolve_activation(activation, alpha)   # checked even when no hidden layer uses it
        epilogue.check_config({"activation": activation, "alpha": alpha, "dropout": dropout,
                               "norm": norm, "residual": False, "weight_norm": weight_norm},
                              1, 1)                 # so are the hidden layers' settings
        n = len(sizes) - 1
        dropout = _dropout_rate(dropout)
        layers = [Dense(sizes[i], sizes[i + 1],
                        activation=activation if i < n - 1 else output_activation,
                        alpha=alpha if i < n - 1 else None, init=init,
                        dropout=dropout if i < n - 1 else 0.0,
                        norm=norm if i < n - 1 else None, weight_norm=weight_norm)
                  for i in range(n)]
        if residual:
            square = [i for i in range(n - 1) if sizes[i] == sizes[i + 1]]
            if not square:
                raise ValueError(f"residual=True needs hidden layers of equal consecutive "
                                 f"widths (n_in == n_out), got sizes {sizes}")
            for i in square:
                layers[i] = Residual(layers[i])
        super().__init__(layers, dtype=dtype, device=device, seed=seed)
