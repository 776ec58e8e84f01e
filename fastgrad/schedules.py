"""Learning-rate schedules: functions of the update number, described as data.

A schedule maps the update number ``k`` (0 for the first update, as optax
counts) to a learning rate: update ``k`` uses ``schedule(k)``.  Every schedule
is a small object with ``to_config()`` (a JSON-able dict) and
:func:`from_config` rebuilds it, so an optimizer checkpoint stores its
schedule as data, never as pickled code.

The formulas are optax's (``optax.constant_schedule``,
``exponential_decay``, ``cosine_decay_schedule``, ``linear_schedule``,
``join_schedules``, ``warmup_cosine_decay_schedule``) and PyTorch's
``StepLR`` for :func:`step_decay`.
"""
import math

__all__ = ["Schedule", "constant", "exponential_decay", "step_decay",
           "cosine_decay", "linear_warmup", "join", "warmup_cosine_decay",
           "from_config", "as_schedule"]


def _check(cond, msg):
    if not cond:
        raise ValueError(msg)


def _finite_nonneg(name, x):
    x = float(x)
    _check(math.isfinite(x) and x >= 0.0, f"{name} must be a finite number >= 0, got {x!r}")
    return x


def _positive_int(name, x):
    _check(int(x) == x and x > 0, f"{name} must be a positive integer, got {x!r}")
    return int(x)


class Schedule:
    """Base of all schedules: ``sched(k) -> float`` plus a config round trip."""

    kind = None
    _fields = ()

    def __call__(self, k):
        raise NotImplementedError

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
        self.value = _finite_nonneg("value", value)

    def __call__(self, k):
        return self.value


class exponential_decay(Schedule):
    """``lr0 * decay_rate ** (k / decay_steps)`` (Keras, optax).

    With ``staircase=True`` the exponent is ``floor(k / decay_steps)``.
    """

    kind = "exponential_decay"
    _fields = ("lr0", "decay_rate", "decay_steps", "staircase")

    def __init__(self, lr0, decay_rate, decay_steps, staircase=False):
        self.lr0 = _finite_nonneg("lr0", lr0)
        self.decay_rate = _finite_nonneg("decay_rate", decay_rate)
        _check(self.decay_rate > 0, "decay_rate must be > 0")
        self.decay_steps = _positive_int("decay_steps", decay_steps)
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
        self.lr0 = _finite_nonneg("lr0", lr0)
        self.step_size = _positive_int("step_size", step_size)
        self.gamma = _finite_nonneg("gamma", gamma)

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
        self.lr0 = _finite_nonneg("lr0", lr0)
        self.decay_steps = _positive_int("decay_steps", decay_steps)
        self.alpha = _finite_nonneg("alpha", alpha)

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
        self.start = _finite_nonneg("start", start)
        self.end = _finite_nonneg("end", end)
        self.warmup_steps = _positive_int("warmup_steps", warmup_steps)

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
    at update ``decay_steps`` (optax ``warmup_cosine_decay_schedule``)."""
    peak = _finite_nonneg("peak", peak)
    _check(peak > 0, "peak must be > 0")
    _check(decay_steps > warmup_steps, "decay_steps must exceed warmup_steps")
    return join([linear_warmup(start, peak, warmup_steps),
                 cosine_decay(peak, decay_steps - warmup_steps, end / peak)],
                [warmup_steps])


_KINDS = {c.kind: c for c in (constant, exponential_decay, step_decay,
                              cosine_decay, linear_warmup, join)}


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
