"""Learning-rate schedules: functions of the update number, described as data.

A schedule maps the update number ``k`` (0 for the first update, as optax
counts) to a learning rate: update ``k`` uses ``schedule(k)``.  Every schedule
is a small object with ``to_config()`` (a JSON-able dict) and
:func:`from_config` rebuilds it, so an optimizer checkpoint stores its
schedule as data, never as pickled code.

The formulas are optax's (``optax.constant_schedule``,
``exponential_decay``, ``cosine_decay_schedule``, ``linear_schedule``,
``join_schedules``, ``warmup_cosine_decay_schedule``) and PyTorch's
``StepLR`` for :func:`step_decay`; :class:`cosine_annealing`,
:class:`polynomial_decay`, :class:`one_cycle` and :class:`reduce_on_plateau`
follow ``torch.optim.lr_scheduler`` (also under torch's class names).

With parameter groups (``fastgrad.optim``), the optimizer's schedule drives
every group as torch's schedulers drive ``param_groups``
(:meth:`Schedule.group_rate`): a group that sets a float ``lr`` starts its
schedule from that lr as torch's start from each group's ``initial_lr``
(the schedule scaled by ``lr / schedule(0)``, as ``StepLR`` or
``ExponentialLR``), except where torch's scheduler holds a value fixed for
every group: :class:`cosine_annealing` keeps its ``eta_min``,
:class:`reduce_on_plateau` its ``min_lr``, and :class:`one_cycle` replaces
every group's lr by its own cycle (``OneCycleLR`` sets each group's initial
lr to ``max_lr / div_factor``; give a group its own ``one_cycle`` for
another ``max_lr``).  A group may carry a schedule of its own, and a
:class:`reduce_on_plateau` stepped once reduces every group that follows it.
"""
import math
import numbers

__all__ = ["Schedule", "constant", "exponential_decay", "step_decay",
           "cosine_decay", "linear_warmup", "join", "warmup_cosine_decay",
           "cosine_annealing", "polynomial_decay", "one_cycle", "reduce_on_plateau",
           "CosineAnnealingLR", "PolynomialLR", "OneCycleLR", "ReduceLROnPlateau",
           "from_config", "as_schedule"]


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _finite_nonneg(name, x):
    x = float(x)
    _check(math.isfinite(x) and x >= 0.0, f"{name} must be a finite number >= 0, got {x!r}")
    return x


def _count(x):
    # an integer >= 0: Python's or NumPy's, or a whole float (a JSON config's)
    return not isinstance(x, bool) and isinstance(x, numbers.Real) and math.isfinite(x) \
        and int(x) == x and x >= 0


def _positive_int(name, x):
    _check(int(x) == x and x > 0, f"{name} must be a positive integer, got {x!r}")
    return int(x)


# How a field is checked, by name: a name means the same in every schedule.
_FIELD_CHECKS = {
    **dict.fromkeys(("value", "lr0", "max_lr", "decay_rate", "gamma", "alpha", "eta_min",
                     "power", "start", "end", "div_factor", "final_div_factor", "threshold",
                     "min_lr", "eps"), _finite_nonneg),
    **dict.fromkeys(("step_size", "decay_steps", "warmup_steps", "T_max", "total_iters",
                     "total_steps"), _positive_int),
}


class Schedule:
    """Base of all schedules: ``sched(k) -> float`` plus a config round trip."""

    kind = None
    _fields = ()

    def _set_checked(self, **fields):
        # each field checked as _FIELD_CHECKS says, in the order given
        for name, value in fields.items():
            setattr(self, name, _FIELD_CHECKS[name](name, value))

    def __call__(self, k):
        raise NotImplementedError

    def group_rate(self, k, lr, lr0):
        """The rate at update ``k`` of a parameter group that gives the float
        ``lr`` under this schedule, ``lr0`` being ``self(0)`` when the group
        was set (> 0): this schedule scaled by ``lr / lr0``, as torch's
        schedulers scale each group's ``initial_lr``.  Schedules whose torch
        twin holds a value fixed for every group override it."""
        return lr * (self(k) / lr0)

    def to_config(self):
        """JSON-able description: ``{"kind": ..., <fields>}``."""
        cfg = {"kind": self.kind}
        for f in self._fields:
            v = getattr(self, f)
            if isinstance(v, Schedule):
                v = v.to_config()
            elif isinstance(v, (list, tuple)):
                v = [x.to_config() if isinstance(x, Schedule) else x for x in v]
            cfg[f] = v
        return cfg

    @classmethod
    def from_config(cls, cfg):
        return from_config(cfg)

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.to_config() == other.to_config()

    def __repr__(self):
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{type(self).__name__}({args})"


class constant(Schedule):
    """``value`` at every update."""

    kind = "constant"
    _fields = ("value",)

    def __init__(self, value):
        self._set_checked(value=value)

    def __call__(self, k):
        return self.value


class exponential_decay(Schedule):
    """``lr0 * decay_rate ** (k / decay_steps)`` (Keras, optax).

    With ``staircase=True`` the exponent is ``floor(k / decay_steps)``.
    """

    kind = "exponential_decay"
    _fields = ("lr0", "decay_rate", "decay_steps", "staircase")

    def __init__(self, lr0, decay_rate, decay_steps, staircase=False):
        self._set_checked(lr0=lr0, decay_rate=decay_rate)
        _check(self.decay_rate > 0, "decay_rate must be > 0")
        self._set_checked(decay_steps=decay_steps)
        self.staircase = bool(staircase)

    def __call__(self, k):
        e = k / self.decay_steps
        if self.staircase:
            e = math.floor(e)
        return self.lr0 * self.decay_rate ** e


class step_decay(Schedule):
    """``lr0 * gamma ** (k // step_size)`` (``torch.optim.lr_scheduler.StepLR``)."""

    kind = "step_decay"
    _fields = ("lr0", "step_size", "gamma")

    def __init__(self, lr0, step_size, gamma=0.1):
        self._set_checked(lr0=lr0, step_size=step_size, gamma=gamma)

    def __call__(self, k):
        return self.lr0 * self.gamma ** (k // self.step_size)


class cosine_decay(Schedule):
    """``lr0 * ((1 - alpha) * 0.5 * (1 + cos(pi * min(k, T) / T)) + alpha)``,
    ``T = decay_steps`` (optax ``cosine_decay_schedule``; SGDR, Loshchilov &
    Hutter 2017, without restarts).  Stays at ``alpha * lr0`` after ``T``.
    """

    kind = "cosine_decay"
    _fields = ("lr0", "decay_steps", "alpha")

    def __init__(self, lr0, decay_steps, alpha=0.0):
        self._set_checked(lr0=lr0, decay_steps=decay_steps, alpha=alpha)

    def __call__(self, k):
        t = min(k, self.decay_steps) / self.decay_steps
        c = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.lr0 * ((1.0 - self.alpha) * c + self.alpha)


class linear_warmup(Schedule):
    """Linear from ``start`` at ``k = 0`` to ``end`` at ``k = warmup_steps``,
    then ``end`` (optax ``linear_schedule``)."""

    kind = "linear_warmup"
    _fields = ("start", "end", "warmup_steps")

    def __init__(self, start, end, warmup_steps):
        self._set_checked(start=start, end=end, warmup_steps=warmup_steps)

    def __call__(self, k):
        frac = 1.0 - min(max(k, 0), self.warmup_steps) / self.warmup_steps
        return (self.start - self.end) * frac + self.end


class join(Schedule):
    """Schedules one after another (optax ``join_schedules``).

    ``schedules[i + 1]`` takes over at update ``boundaries[i]`` and is called
    with ``k - boundaries[i]``, so each piece counts from its own start.
    """

    kind = "join"
    _fields = ("schedules", "boundaries")

    def __init__(self, schedules, boundaries):
        schedules = [as_schedule(s) for s in schedules]
        boundaries = [int(b) for b in boundaries]
        _check(len(schedules) == len(boundaries) + 1,
               f"join needs len(boundaries) + 1 schedules, got {len(schedules)} "
               f"schedules and {len(boundaries)} boundaries")
        _check(all(b >= 0 for b in boundaries)
               and all(a < b for a, b in zip(boundaries, boundaries[1:])),
               f"boundaries must be increasing and >= 0, got {boundaries}")
        self.schedules = schedules
        self.boundaries = boundaries

    def __call__(self, k):
        start = 0
        sched = self.schedules[0]
        for b, s in zip(self.boundaries, self.schedules[1:]):
            if k >= b:
                start, sched = b, s
        return sched(k - start)


def warmup_cosine_decay(peak, warmup_steps, decay_steps, start=0.0, end=0.0):
    """Linear warmup from ``start`` to ``peak``, then cosine decay to ``end``
    at update ``decay_steps`` (optax ``warmup_cosine_decay_schedule``);
    ``warmup_steps=0`` starts the decay at ``peak``."""
    peak = _finite_nonneg("peak", peak)
    _check(peak > 0, "peak must be > 0")
    _check(_count(warmup_steps), f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    _check(decay_steps > warmup_steps, "decay_steps must exceed warmup_steps")
    if warmup_steps == 0:
        return cosine_decay(peak, decay_steps, end / peak)
    return join([linear_warmup(start, peak, warmup_steps),
                 cosine_decay(peak, decay_steps - warmup_steps, end / peak)],
                [warmup_steps])


# --- PyTorch's lr_scheduler family -------------------------------------------
# Update k uses ``schedule(k)``; torch's scheduler gives the lr of update k
# after k calls of ``scheduler.step()`` (one per optimizer step), so the two
# sequences line up index by index.

class cosine_annealing(Schedule):
    """``eta_min + (lr0 - eta_min) * (1 + cos(pi * k / T_max)) / 2`` for every
    ``k`` (``torch.optim.lr_scheduler.CosineAnnealingLR``).

    Unlike :class:`cosine_decay`, which holds its floor after the horizon
    (optax), this one continues the cosine past ``T_max``: the lr climbs back
    to ``lr0`` at ``2 T_max``, as torch's does.  A parameter group that
    gives its own lr anneals from it to the same ``eta_min``.
    """

    kind = "cosine_annealing"
    _fields = ("lr0", "T_max", "eta_min")

    def __init__(self, lr0, T_max, eta_min=0.0):
        self._set_checked(lr0=lr0, T_max=T_max, eta_min=eta_min)

    def __call__(self, k):
        return self._anneal(k, self.lr0)

    def _anneal(self, k, lr0):
        return self.eta_min + (lr0 - self.eta_min) * (
            1.0 + math.cos(math.pi * k / self.T_max)) / 2.0

    def group_rate(self, k, lr, lr0):
        # torch anneals each group from its own initial lr to the one eta_min
        return self._anneal(k, lr)


class polynomial_decay(Schedule):
    """``lr0 * (1 - min(k, total_iters) / total_iters) ** power``
    (``torch.optim.lr_scheduler.PolynomialLR``): 0 from ``total_iters`` on."""

    kind = "polynomial_decay"
    _fields = ("lr0", "total_iters", "power")

    def __init__(self, lr0, total_iters=5, power=1.0):
        self._set_checked(lr0=lr0, total_iters=total_iters, power=power)

    def __call__(self, k):
        return self.lr0 * (1.0 - min(k, self.total_iters) / self.total_iters) ** self.power


class one_cycle(Schedule):
    """The 1cycle policy (Smith & Topin 2017), as
    ``torch.optim.lr_scheduler.OneCycleLR``.

    From ``max_lr / div_factor`` up to ``max_lr`` over the first
    ``pct_start * total_steps - 1`` updates, then down to
    ``max_lr / div_factor / final_div_factor`` at update ``total_steps - 1``;
    ``three_phase=True`` comes back to the initial lr first (symmetrically)
    and only then falls to the minimum.  ``anneal_strategy``: "cos" or
    "linear".  Like torch, asking for update ``k > total_steps`` raises
    ValueError.  Only the learning rate cycles: torch's momentum cycling
    (``cycle_momentum``) has no counterpart here.  Every parameter group
    that follows it gets this cycle, whatever lr the group gives (torch's
    ``OneCycleLR`` overwrites each group's lr with ``max_lr /
    div_factor``); a group given its own ``one_cycle`` has another
    ``max_lr``, as torch's list of them.
    """

    kind = "one_cycle"
    _fields = ("max_lr", "total_steps", "pct_start", "anneal_strategy", "div_factor",
               "final_div_factor", "three_phase")

    def __init__(self, max_lr, total_steps, pct_start=0.3, anneal_strategy="cos",
                 div_factor=25.0, final_div_factor=1e4, three_phase=False):
        self._set_checked(max_lr=max_lr, total_steps=total_steps)
        pct_start = float(pct_start)
        _check(0.0 <= pct_start <= 1.0, f"pct_start must be in [0, 1], got {pct_start!r}")
        self.pct_start = pct_start
        _check(anneal_strategy in ("cos", "linear"),
               f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
        self.anneal_strategy = anneal_strategy
        self._set_checked(div_factor=div_factor, final_div_factor=final_div_factor)
        _check(self.div_factor > 0 and self.final_div_factor > 0,
               "div_factor and final_div_factor must be > 0")
        self.three_phase = bool(three_phase)
        initial = self.max_lr / self.div_factor
        low = initial / self.final_div_factor
        up_end = self.pct_start * self.total_steps - 1
        if self.three_phase:
            self._phases = [(up_end, initial, self.max_lr),
                            (2 * self.pct_start * self.total_steps - 2, self.max_lr, initial),
                            (self.total_steps - 1, initial, low)]
        else:
            self._phases = [(up_end, initial, self.max_lr),
                            (self.total_steps - 1, self.max_lr, low)]

    def __call__(self, k):
        if k > self.total_steps:
            raise ValueError(f"one_cycle asked for update {k}, past its total_steps "
                             f"{self.total_steps}")
        start = 0.0
        for i, (end, lr_a, lr_b) in enumerate(self._phases):
            if k <= end or i == len(self._phases) - 1:
                pct = (k - start) / (end - start)
                if self.anneal_strategy == "cos":
                    return lr_b + (lr_a - lr_b) / 2.0 * (math.cos(math.pi * pct) + 1)
                return (lr_b - lr_a) * pct + lr_a
            start = end
        raise AssertionError("unreachable")     # pragma: no cover

    def group_rate(self, k, lr, lr0):
        # torch's OneCycleLR overwrites every group's initial lr with
        # max_lr / div_factor: the group's own lr is not used
        return self(k)


class reduce_on_plateau(Schedule):
    """Scale a learning rate down when a metric stops improving
    (``torch.optim.lr_scheduler.ReduceLROnPlateau``).

    ``sched(k) = max(base(k) * scale, min_lr)`` (``base(k)`` itself where
    that is below ``min_lr``: torch never raises a rate); ``base`` is ``lr`` (a
    float or another schedule) and ``scale`` starts at 1.  Call
    :meth:`step` with the metric once per epoch (``fastgrad.step.fit`` does
    with its ``ReduceLROnPlateau`` callback): after more than ``patience``
    epochs without improvement (better than the best by ``threshold``,
    relative or absolute, in ``mode`` "min" or "max") the rate is cut,
    ``scale`` multiplied by ``factor``, then ``cooldown`` epochs pass before
    bad epochs count again.  As in torch, each parameter group decides on
    its own rate: a cut that would lower it by no more than ``eps`` (one
    already at ``min_lr``, a tiny rate) is skipped for that group alone.
    The updates at which cuts were decided (``state["reductions"]``) are
    part of the config, so a checkpointed optimizer resumes them.
    """

    kind = "reduce_on_plateau"
    _fields = ("lr", "mode", "factor", "patience", "threshold", "threshold_mode", "cooldown",
               "min_lr", "eps", "state")

    def __init__(self, lr, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0.0, eps=1e-8, state=None):
        self.lr = from_config(lr) if isinstance(lr, dict) else as_schedule(lr)
        _check(mode in ("min", "max"), f"mode must be 'min' or 'max', got {mode!r}")
        _check(threshold_mode in ("rel", "abs"),
               f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor = float(factor)
        _check(0.0 <= self.factor < 1.0, f"factor must be in [0, 1), got {factor!r}")
        _check(int(patience) == patience and patience >= 0,
               f"patience must be an integer >= 0, got {patience!r}")
        _check(int(cooldown) == cooldown and cooldown >= 0,
               f"cooldown must be an integer >= 0, got {cooldown!r}")
        self.patience, self.cooldown = int(patience), int(cooldown)
        self._set_checked(threshold=threshold, min_lr=min_lr, eps=eps)
        st = dict(state or {})
        # a checkpoint's progress, checked: a scale of -3 made the lr 0
        for key in ("num_bad_epochs", "cooldown_counter", "last_epoch", "last_k"):
            _check(_count(st.get(key, 0)),
                   f"state {key} must be an integer >= 0, got {st.get(key)!r}")
        self._last_k = int(st.get("last_k", 0))
        if "reductions" in st:
            cuts = st["reductions"]
            _check(isinstance(cuts, (list, tuple)) and all(_count(k) for k in cuts),
                   f"state reductions must be a list of integers >= 0, got {cuts!r}")
            self.reductions = [int(k) for k in cuts]
        else:
            # fastgrad 0.1.0's checkpoints keep one scale for every group:
            # as that many cuts at the last update
            scale = float(st.get("scale", 1.0))
            _check(0.0 <= scale <= 1.0, f"state scale must be in [0, 1], got {scale!r}")
            cuts = (0 if scale == 1.0 else 1 if scale == 0.0 or self.factor == 0.0
                    else max(1, round(math.log(scale) / math.log(self.factor))))
            self.reductions = [self._last_k] * cuts
        self._scales = {}       # a group's scale, by its lr: (cuts seen, scale)
        best = st.get("best")
        self.best = (math.inf if mode == "min" else -math.inf) if best is None else float(best)
        _check(not math.isnan(self.best), "state best must be a number or null, got nan")
        self.num_bad_epochs = int(st.get("num_bad_epochs", 0))
        self.cooldown_counter = int(st.get("cooldown_counter", 0))
        self.last_epoch = int(st.get("last_epoch", 0))

    @property
    def state(self):
        """The progress so far (JSON-able: an infinite best is None)."""
        return {"reductions": list(self.reductions),
                "best": self.best if math.isfinite(self.best) else None,
                "num_bad_epochs": self.num_bad_epochs, "cooldown_counter": self.cooldown_counter,
                "last_epoch": self.last_epoch, "last_k": self._last_k}

    @property
    def scale(self):
        """The factor the base rate has been cut by so far."""
        return self._scale_of(None, self.lr)

    def __call__(self, k):
        self._last_k = k
        return self._reduced(self.lr(k), self.scale)

    def _reduced(self, base, scale):
        # torch lowers a rate to max(rate * factor, min_lr) and never raises
        # it: one that starts below min_lr stays where it is
        return min(base, max(base * scale, self.min_lr))

    def _scale_of(self, key, rate):
        """The scale of the group whose unreduced rate at update k is
        ``rate(k)``: torch's test at each cut, on that group's own rate.
        Remembered per group (``key``) until the next cut."""
        seen, scale = self._scales.get(key, (0, 1.0))
        if seen != len(self.reductions):
            for k in self.reductions[seen:]:
                old = self._reduced(rate(k), scale)
                if old - max(old * self.factor, self.min_lr) > self.eps:
                    scale *= self.factor
            self._scales[key] = (len(self.reductions), scale)
        return scale

    def group_rate(self, k, lr, lr0):
        # each group follows the base schedule from its own lr, cut where its
        # own rate allows, down to the one min_lr (torch's for all groups)
        self._last_k = k
        base0 = self.lr(0)
        if base0 > 0.0:
            def rate(j):
                return self.lr.group_rate(j, lr, base0)
            return self._reduced(rate(k), self._scale_of(lr, rate))
        return lr * (self(k) / lr0)     # a base from 0 (min_lr > 0): scaled whole

    def _is_better(self, a):
        if self.mode == "min":
            return a < (self.best * (1.0 - self.threshold) if self.threshold_mode == "rel"
                        else self.best - self.threshold)
        return a > (self.best * (1.0 + self.threshold) if self.threshold_mode == "rel"
                    else self.best + self.threshold)

    def step(self, metric):
        """Record one epoch's ``metric``; returns True when the lr was reduced.

        A NaN metric never counts as an improvement (as in torch)."""
        current = float(metric)
        self.last_epoch += 1
        if self._is_better(current):
            self.best, self.num_bad_epochs = current, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
            before = self.scale
            self.reductions.append(self._last_k)
            return self.scale < before
        return False


# The torch spellings of the same schedules.
CosineAnnealingLR = cosine_annealing
PolynomialLR = polynomial_decay
OneCycleLR = one_cycle
ReduceLROnPlateau = reduce_on_plateau

_KINDS = {c.kind: c for c in (constant, exponential_decay, step_decay,
                              cosine_decay, linear_warmup, join, cosine_annealing,
                              polynomial_decay, one_cycle, reduce_on_plateau)}


def from_config(cfg):
    """Rebuild a schedule from ``Schedule.to_config()`` output (a float gives
    a constant).  Unknown kinds raise ``ValueError``: configs are data."""
    if isinstance(cfg, (int, float)):
        return constant(cfg)
    if not isinstance(cfg, dict) or cfg.get("kind") not in _KINDS:
        raise ValueError(f"not a schedule config: {cfg!r}")
    cls = _KINDS[cfg["kind"]]
    kw = {f: cfg[f] for f in cls._fields if f in cfg}
    if cls is join:
        kw["schedules"] = [from_config(s) for s in kw["schedules"]]
    return cls(**kw)


def as_schedule(lr):
    """A float (>= 0) becomes :class:`constant`; a schedule passes through."""
    if isinstance(lr, Schedule):
        return lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        try:
            import numpy as np
            if isinstance(lr, np.generic) and np.isrealobj(lr):
                return constant(float(lr))
        except ImportError:  # pragma: no cover
            pass
        raise TypeError(f"lr must be a float or a fastgrad.schedules.Schedule, got {type(lr).__name__}")
    _check(lr >= 0 and math.isfinite(lr), f"lr must be a finite number >= 0, got {lr!r}")
    return constant(lr)
