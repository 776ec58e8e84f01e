"""Optimizers with built-in gradient clipping: SGD, Adam, AdamW, RMSprop.

Each class is a thin stateful shell over one compiled kernel,
``fastgrad.kernels.cpu.optim.clipped_update``, that does the whole update in
two passes over memory: (1) the global and per-layer gradient norms, (2) clip
by global norm as ``torch.nn.utils.clip_grad_norm_``, clip by value as
``torch.nn.utils.clip_grad_value_``, then the optimizer rule, in place.  The
defaults and the update rules are PyTorch's (``torch.optim``), so a user
moving from ``clip_grad_norm_`` + ``torch.optim.Adam`` gets the same
trajectory, to rounding.

A gradient holding NaN or Inf skips the whole update (parameters, moments and
step count untouched) and is counted; with ``skip_nonfinite=False`` it raises
:class:`fastgrad.errors.NonFiniteGradientError` instead.

Kernel contract (used by ``fastgrad.step.TrainStep``)
-----------------------------------------------------
``opt.step()`` is exactly::

    rule, s0, s1, s2, hp = opt._kernel_args()
    norm, scale, skipped = clipped_update(rule, opt.params, opt.grads, s0, s1,
                                          s2, hp, opt.layer_offsets,
                                          opt._layer_sq, opt._clip_norm,
                                          opt._clip_value)
    stats = opt._commit(norm, scale, skipped, opt._layer_sq)

``_kernel_args()`` fills ``hp`` for the next update ``k = opt.step_count``
(learning rate ``schedule(k)``) and has no other effect; ``_commit`` advances
the step count unless skipped, raises if asked to, and returns the
:class:`StepStats`.  ``opt._clip_norm`` and ``opt._clip_value`` are floats,
``0.0`` meaning "off".  (For ``(param, grad)`` pairs, ``step()`` also copies
the user's arrays into ``opt.params``/``opt.grads`` before and back after.)
"""
from dataclasses import dataclass
import math

import numpy as np

from . import device as _device
from .errors import NonFiniteGradientError
from .kernels.cpu import optim as _k
from .schedules import Schedule, as_schedule, from_config

clipped_update = _k.clipped_update

__all__ = ["StepStats", "Optimizer", "SGD", "Adam", "AdamW", "RMSprop",
           "NonFiniteGradientError", "clipped_update"]


@dataclass(frozen=True)
class StepStats:
    """What one ``opt.step()`` did.

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
    """

    step: int
    lr: float
    grad_norm: float
    clip_scale: float
    clipped: bool
    skipped: bool
    layer_norms: np.ndarray


def _nonneg(name, x):
    x = float(x)
    if not (x >= 0.0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return x


def _clip_arg(name, x):
    if x is None:
        return None
    x = float(x)
    if not x > 0.0:   # also refuses NaN
        raise ValueError(f"{name} must be > 0 (None disables it), got {x!r}")
    return x


class Optimizer:
    """Base class: binds the parameters, holds state, runs the fused kernel.

    Parameters
    ----------
    params : model or list of (param, grad) pairs
        A model with flat 1-D contiguous ``params`` and ``grads`` of one
        dtype (float32 or float64) and optional ``layer_offsets`` (int64,
        ``n_layers + 1`` boundaries); or a list of ``(param, grad)`` NumPy
        arrays of any shapes, updated in place, each pair one "layer".
    lr : float or fastgrad.schedules.Schedule
        Update ``k`` (from 0) uses ``lr(k)``.
    clip_norm : float or None
        Scale the gradient by ``min(1, clip_norm / (norm + 1e-6))``.
    clip_value : float or None
        Then clamp each gradient entry to ``[-clip_value, clip_value]``.
    skip_nonfinite : bool
        True skips non-finite gradients (counted in ``n_skipped``); False
        raises :class:`NonFiniteGradientError` (nothing updated either way).
    """

    kind = None
    rule = None
    state_names = ()
    _defaults = {}

    def __init__(self, params, lr, *, clip_norm=None, clip_value=None,
                 skip_nonfinite=True, **hyper):
        self._bind(params)
        self.step_count = 0
        self.n_skipped = 0
        self.n_calls = 0
        self._hp = np.zeros(_k.HP_SIZE, np.float64)
        self._layer_sq = self._xp.zeros(self.layer_offsets.size - 1, np.float64)
        self._lr_now = float("nan")
        self._empty = self._xp.empty(0, self.params.dtype)
        self.state = {}
        self._configure(dict(self._defaults, lr=lr, clip_norm=clip_norm,
                             clip_value=clip_value,
                             skip_nonfinite=skip_nonfinite, **hyper))

    # -- binding ------------------------------------------------------------
    def _bind(self, params):
        self._pairs = None
        if hasattr(params, "params") and hasattr(params, "grads"):
            p, g = params.params, params.grads
            dev = _device.device_of(p)
            if _device.device_of(g) != dev:
                raise TypeError(f"params on {dev} but grads on {_device.device_of(g)}")
            if not (isinstance(p, np.ndarray) or dev == "cuda"):
                raise TypeError(f"model.params must be a NumPy or CuPy array, got {type(p).__name__}")
            if p.dtype not in (np.float32, np.float64) or g.dtype != p.dtype:
                raise TypeError(f"params and grads must share dtype float32 or float64, "
                                f"got {p.dtype} and {g.dtype}")
            if p.ndim != 1 or g.shape != p.shape:
                raise ValueError(f"params and grads must be 1-D of one length, "
                                 f"got shapes {p.shape} and {g.shape}")
            if not (p.flags.c_contiguous and g.flags.c_contiguous and p.flags.writeable):
                raise ValueError("params and grads must be contiguous and params writeable")
            off = getattr(params, "layer_offsets", None)
            off = (np.array([0, p.size], np.int64) if off is None
                   else np.ascontiguousarray(off, dtype=np.int64))
            if (off.ndim != 1 or off.size < 2 or off[0] != 0 or off[-1] != p.size
                    or np.any(np.diff(off) < 0)):
                raise ValueError(f"layer_offsets must rise from 0 to {p.size}, got {off}")
            self.params, self.grads, self.layer_offsets = p, g, off
            self._use_device(dev)
            return
        pairs = list(params)
        if not pairs:
            raise ValueError("no parameters to optimize")
        checked = []
        for i, pair in enumerate(pairs):
            try:
                p, g = pair
            except (TypeError, ValueError):
                raise TypeError(f"entry {i}: expected a (param, grad) pair") from None
            if not (isinstance(p, np.ndarray) and isinstance(g, np.ndarray)):
                raise TypeError(f"pair {i}: param and grad must be NumPy arrays")
            if p.shape != g.shape:
                raise ValueError(f"pair {i}: grad shape {g.shape} != param shape {p.shape}")
            if not p.flags.writeable:
                raise ValueError(f"pair {i}: param is read-only")
            checked.append((p, g))
        dt = checked[0][0].dtype
        if dt not in (np.float32, np.float64) or any(
                p.dtype != dt or g.dtype != dt for p, g in checked):
            raise TypeError("all params and grads must share dtype float32 or float64")
        sizes = [p.size for p, _ in checked]
        self._pairs = checked
        self.layer_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.params = np.empty(self.layer_offsets[-1], dt)
        self.grads = np.empty_like(self.params)
        self._use_device("cpu")
        self._gather_params()

    def _use_device(self, dev):
        """The array module and update kernel of the parameters' device."""
        self.device = dev
        self._xp = _device.array_module(dev)
        self._update = self._serial_update = _device.kernels(dev).clipped_update

    @property
    def parallel(self):
        """Run both passes of ``step()`` on Numba's threads (CPU; default off).

        Bitwise the same result as the serial kernel.  It pays only where the
        update runs on its own: the Adam update alone on 2 threads took
        0.27 ms instead of 0.50 ms at 1M parameters and 9.1 instead of
        10.4 ms at 16M, but in a training loop whose GEMMs run on OpenBLAS's
        threads the two thread pools fight for the cores and the loop got
        slower (0.56-0.86x; even with ``OMP_WAIT_POLICY=PASSIVE`` it gained
        nothing), so it is off by default and TrainStep always runs serial.
        """
        return self._update is not self._serial_update

    @parallel.setter
    def parallel(self, on):
        if on and self.device != "cpu":
            raise ValueError("parallel applies to the CPU kernels; CUDA runs on the GPU anyway")
        self._update = _k.clipped_update_parallel if on else self._serial_update

    def _gather_params(self):
        off = self.layer_offsets
        for i, (p, _) in enumerate(self._pairs):
            self.params[off[i]:off[i + 1]] = p.ravel()

    def _gather_grads(self):
        off = self.layer_offsets
        for i, (_, g) in enumerate(self._pairs):
            self.grads[off[i]:off[i + 1]] = g.ravel()

    def _scatter_params(self):
        off = self.layer_offsets
        for i, (p, _) in enumerate(self._pairs):
            p[...] = self.params[off[i]:off[i + 1]].reshape(p.shape)

    # -- hyper-parameters and state --------------------------------------------
    def _configure(self, hyper):
        """Validate and set every hyper-parameter (construction and load)."""
        unknown = set(hyper) - set(self._defaults) - {"lr", "clip_norm", "clip_value",
                                                      "skip_nonfinite"}
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown argument(s) {sorted(unknown)}")
        lr = hyper["lr"]
        self.lr_schedule = from_config(lr) if isinstance(lr, dict) else as_schedule(lr)
        self.clip_norm = _clip_arg("clip_norm", hyper["clip_norm"])
        self.clip_value = _clip_arg("clip_value", hyper["clip_value"])
        self._clip_norm = self.clip_norm or 0.0
        self._clip_value = self.clip_value or 0.0
        self.skip_nonfinite = bool(hyper["skip_nonfinite"])
        self._configure_rule(hyper)
        self._alloc_state()

    def _configure_rule(self, hyper):
        raise NotImplementedError

    def _needed_state(self):
        """Names of the state buffers the current hyper-parameters use."""
        raise NotImplementedError

    def _alloc_state(self):
        need = self._needed_state()
        for name in self.state_names:
            cur = self.state.get(name)
            if name in need:
                if cur is None or cur.size != self.params.size:
                    self.state[name] = self._xp.zeros_like(self.params)
            else:
                self.state.pop(name, None)

    def _buffers(self):
        return tuple(self.state.get(n, self._empty) for n in self.state_names) + \
            (self._empty,) * (3 - len(self.state_names))

    @property
    def hyper(self):
        """Hyper-parameters as a JSON-able dict (the schedule as its config)."""
        h = {"lr": self.lr_schedule.to_config() if isinstance(self.lr_schedule, Schedule)
             else None,
             "clip_norm": self.clip_norm, "clip_value": self.clip_value,
             "skip_nonfinite": self.skip_nonfinite}
        h.update({k: getattr(self, k) for k in self._defaults})
        return h

    @property
    def lr(self):
        """Learning rate of the next update."""
        return float(self.lr_schedule(self.step_count))

    def state_dict(self):
        """Checkpoint: ``{"kind", "step", "n_skipped", "n_calls", "hyper",
        "state"}``; ``state`` maps names to array copies, everything else is
        JSON-able (tuples become lists).  No pickle needed."""
        hyper = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hyper.items()}
        return {"kind": self.kind, "step": int(self.step_count),
                "n_skipped": int(self.n_skipped), "n_calls": int(self.n_calls),
                "hyper": hyper,
                "state": {k: _device.to_numpy(v).copy() for k, v in self.state.items()}}

    def load_state_dict(self, sd):
        """Restore :meth:`state_dict` output; arrays are copied into the
        existing buffers, so compiled steps holding them stay valid."""
        if sd.get("kind") != self.kind:
            raise ValueError(f"checkpoint is for {sd.get('kind')!r}, not {self.kind!r}")
        hyper = dict(sd["hyper"])
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        arrays = sd.get("state", {})
        self._configure(hyper)
        for name, buf in self.state.items():
            if name not in arrays:
                raise ValueError(f"checkpoint lacks state {name!r}")
            a = np.asarray(arrays[name])
            if a.shape != buf.shape:
                raise ValueError(f"state {name!r}: shape {a.shape} != {buf.shape}")
            if not np.can_cast(a.dtype, buf.dtype, casting="same_kind"):
                raise ValueError(f"state {name!r}: dtype {a.dtype} does not fit {buf.dtype}")
            buf[...] = self._xp.asarray(a, dtype=buf.dtype)
        self.step_count = int(sd["step"])
        self.n_skipped = int(sd.get("n_skipped", 0))
        self.n_calls = int(sd.get("n_calls", 0))

    # -- the update -------------------------------------------------------------
    def _fill_hp(self, hp, k):
        raise NotImplementedError

    def _kernel_args(self):
        """``(rule, s0, s1, s2, hp)`` for the next update ``k = step_count``."""
        k = self.step_count
        lr = float(self.lr_schedule(k))
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"the schedule gave lr={lr!r} at update {k}")
        self._lr_now = lr
        hp = self._hp
        hp[:] = 0.0
        hp[_k.HP_LR] = lr
        self._fill_hp(hp, k)
        s0, s1, s2 = self._buffers()
        return self.rule, s0, s1, s2, hp

    def _commit(self, norm, scale, skipped, layer_sq):
        """Book-keep one kernel call; returns its :class:`StepStats`.

        On CUDA the kernel's outputs are device scalars; reading them here is
        the step's device-to-host synchronisation (the step count and the
        next update's bias corrections depend on the skip decision), one
        read for the three scalars and the per-layer norms together."""
        if self.device != "cpu":
            xp = _device.array_module(self.device)
            host = _device.to_numpy(xp.concatenate([xp.stack([norm, scale, skipped]),
                                                    layer_sq]))
            norm, scale, skipped, layer_sq = host[0], host[1], host[2], host[3:]
        skipped = bool(skipped)
        norm, scale = float(norm), float(scale)
        self.n_calls += 1
        if skipped:
            self.n_skipped += 1
        else:
            self.step_count += 1
        stats = StepStats(step=self.step_count, lr=self._lr_now, grad_norm=float(norm),
                          clip_scale=float(scale), clipped=(not skipped) and scale < 1.0,
                          skipped=skipped,
                          layer_norms=np.sqrt(layer_sq))
        self.last_stats = stats
        if skipped and not self.skip_nonfinite:
            raise NonFiniteGradientError(
                f"non-finite gradient norm {norm} at update {self.step_count}; "
                "parameters and optimizer state were left unchanged")
        return stats

    def step(self):
        """Apply one clipped update from the current gradients.

        Returns
        -------
        StepStats
        """
        if self._pairs is not None:
            self._gather_params()
            self._gather_grads()
        rule, s0, s1, s2, hp = self._kernel_args()
        norm, scale, skipped = self._update(
            rule, self.params, self.grads, s0, s1, s2, hp, self.layer_offsets,
            self._layer_sq, self._clip_norm, self._clip_value)
        if self._pairs is not None and not skipped:
            self._scatter_params()
        return self._commit(norm, scale, skipped, self._layer_sq)

    def zero_grad(self):
        """Set the gradients to zero (the user's arrays for pairs)."""
        if self._pairs is not None:
            for _, g in self._pairs:
                g[...] = 0
        self.grads[...] = 0

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({args})"


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
    rule = _k.SGD
    state_names = ("momentum_buffer",)
    _defaults = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0}

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, clip_norm=None, clip_value=None, skip_nonfinite=True):
        super().__init__(params, lr, clip_norm=clip_norm, clip_value=clip_value,
                         skip_nonfinite=skip_nonfinite, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)

    def _configure_rule(self, h):
        self.momentum = _nonneg("momentum", h["momentum"])
        self.dampening = float(h["dampening"])
        self.weight_decay = _nonneg("weight_decay", h["weight_decay"])
        self.nesterov = bool(h["nesterov"])
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def _needed_state(self):
        return {"momentum_buffer"} if self.momentum != 0 else set()

    def _fill_hp(self, hp, k):
        hp[_k.HP_WEIGHT_DECAY] = self.weight_decay
        hp[_k.HP_MOMENTUM] = self.momentum
        hp[_k.HP_DAMPENING] = self.dampening
        hp[_k.HP_NESTEROV] = float(self.nesterov)
        hp[_k.HP_FIRST] = float(k == 0)


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
    rule = _k.ADAM
    state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, clip_norm=None, clip_value=None, skip_nonfinite=True):
        super().__init__(params, lr, clip_norm=clip_norm, clip_value=clip_value,
                         skip_nonfinite=skip_nonfinite, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad)

    def _configure_rule(self, h):
        b1, b2 = (float(b) for b in h["betas"])
        for name, b in (("beta1", b1), ("beta2", b2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        self.betas = (b1, b2)
        self.eps = _nonneg("eps", h["eps"])
        self.weight_decay = _nonneg("weight_decay", h["weight_decay"])
        self.amsgrad = bool(h["amsgrad"])

    def _needed_state(self):
        return set(self.state_names) if self.amsgrad else {"exp_avg", "exp_avg_sq"}

    def _fill_hp(self, hp, k):
        b1, b2 = self.betas
        t = k + 1
        hp[_k.HP_WEIGHT_DECAY] = self.weight_decay
        hp[_k.HP_BETA1] = b1
        hp[_k.HP_BETA2] = b2
        hp[_k.HP_EPS] = self.eps
        hp[_k.HP_BIAS_CORR1] = 1.0 - b1 ** t
        hp[_k.HP_BIAS_CORR2] = 1.0 - b2 ** t
        hp[_k.HP_AMSGRAD] = float(self.amsgrad)


class AdamW(Adam):
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter,
    "Decoupled Weight Decay Regularization", ICLR 2019), as
    ``torch.optim.AdamW``: ``p <- p * (1 - lr * weight_decay)`` first, then the
    Adam update of :class:`Adam` without the L2 term.  Default decay 1e-2.
    """

    kind = "adamw"
    rule = _k.ADAMW
    _defaults = dict(Adam._defaults, weight_decay=1e-2)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, clip_norm=None, clip_value=None, skip_nonfinite=True):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, clip_norm=clip_norm,
                         clip_value=clip_value, skip_nonfinite=skip_nonfinite)


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
    rule = _k.RMSPROP
    state_names = ("square_avg", "momentum_buffer", "grad_avg")
    _defaults = {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                 "centered": False}

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, *, clip_norm=None, clip_value=None,
                 skip_nonfinite=True):
        super().__init__(params, lr, clip_norm=clip_norm, clip_value=clip_value,
                         skip_nonfinite=skip_nonfinite, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered)

    def _configure_rule(self, h):
        self.alpha = _nonneg("alpha", h["alpha"])
        if self.alpha > 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        self.eps = _nonneg("eps", h["eps"])
        self.weight_decay = _nonneg("weight_decay", h["weight_decay"])
        self.momentum = _nonneg("momentum", h["momentum"])
        self.centered = bool(h["centered"])

    def _needed_state(self):
        need = {"square_avg"}
        if self.momentum > 0:
            need.add("momentum_buffer")
        if self.centered:
            need.add("grad_avg")
        return need

    def _fill_hp(self, hp, k):
        hp[_k.HP_WEIGHT_DECAY] = self.weight_decay
        hp[_k.HP_ALPHA] = self.alpha
        hp[_k.HP_EPS] = self.eps
        hp[_k.HP_MOMENTUM] = self.momentum
        hp[_k.HP_CENTERED] = float(self.centered)
