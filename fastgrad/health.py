"""Gradient-health monitoring from the optimizer's step statistics.

Every number here comes from :class:`fastgrad.optim.StepStats`, which the
norm pass of the update kernel fills anyway: monitoring costs no extra pass
over the gradient.

>>> mon = GradientMonitor(layer_names=["dense0", "dense1"])
>>> for x, y in batches:                                  # doctest: +SKIP
...     ...; stats = opt.step(); mon.record(stats)
>>> print(mon.summary())                                  # doctest: +SKIP
"""
from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["GradientMonitor", "HealthEvent"]


@dataclass(frozen=True)
class HealthEvent:
    """One flag raised by :meth:`GradientMonitor.record`.

    ``kind`` is ``"nonfinite"`` (NaN/Inf gradient, update skipped),
    ``"explosion"`` (global norm above ``explode_factor`` x its running
    median) or ``"vanishing"`` (a layer's norm below ``vanish_floor``);
    ``index`` is the record number (0-based), ``layer`` the layer index for
    vanishing (else ``None``), ``value`` the offending norm and ``threshold``
    the bound it crossed.
    """

    kind: str
    index: int
    layer: object
    value: float
    threshold: float


class GradientMonitor:
    """Records step statistics and flags exploding or vanishing gradients.

    Parameters
    ----------
    explode_factor : float
        A finite global norm above ``explode_factor`` times the median of the
        last ``window`` finite norms is an explosion.
    window : int
        Length of the running-median window (at least ``min_history``).
    min_history : int
        No explosion is flagged before this many finite norms were seen
        (the first steps of training are legitimately large).  A median of
        0 (gradients exactly zero so far) flags nothing.
    vanish_floor : float
        A layer whose gradient norm is below this is vanishing.
    layer_names : list of str, optional
        Names for the summary (default ``layer 0``, ``layer 1``, ...).
    """

    def __init__(self, explode_factor=10.0, window=100, min_history=10,
                 vanish_floor=1e-8, layer_names=None):
        for name, value in (("explode_factor", explode_factor), ("vanish_floor", vanish_floor)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float,
                                                                              np.number)):
                raise TypeError(f"{name} must be a number, got {value!r}")
        for name, value in (("window", window), ("min_history", min_history)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if not explode_factor > 1.0:
            raise ValueError(f"explode_factor must be > 1, got {explode_factor!r}")
        if min_history < 1 or window < min_history:
            # the median's window holds at most `window` norms: with fewer
            # than min_history, no explosion was ever flagged
            raise ValueError(f"need 1 <= min_history <= window, got min_history "
                             f"{min_history!r}, window {window!r}")
        if not vanish_floor >= 0.0:
            raise ValueError(f"vanish_floor must be >= 0, got {vanish_floor!r}")
        self.explode_factor = float(explode_factor)
        self.window = int(window)
        self.min_history = int(min_history)
        self.vanish_floor = float(vanish_floor)
        self.layer_names = None if layer_names is None else list(layer_names)
        self._recent = deque(maxlen=self.window)
        self.grad_norms = []
        self.clip_scales = []
        self.layer_norms = []
        self.lrs = []
        self.skipped = []
        self.events = []

    def __len__(self):
        return len(self.grad_norms)

    def record(self, stats):
        """Add one :class:`~fastgrad.optim.StepStats`; returns the list of
        :class:`HealthEvent` it raised (empty when healthy).  On CUDA this
        reads the stats, so it waits for that step: record every k-th step,
        or the stats of steps that are ``ready``, to keep the GPU fed."""
        i = len(self.grad_norms)
        norm = float(stats.grad_norm)
        layers = np.asarray(stats.layer_norms, np.float64).copy()
        self.grad_norms.append(norm)
        self.clip_scales.append(float(stats.clip_scale))
        self.layer_norms.append(layers)
        self.lrs.append(float(stats.lr))
        self.skipped.append(bool(stats.skipped))
        new = []
        if stats.skipped or not np.isfinite(norm):
            new.append(HealthEvent("nonfinite", i, None, norm, float("nan")))
        else:
            if len(self._recent) >= self.min_history:
                bound = self.explode_factor * float(np.median(self._recent))
                if norm > bound > 0.0:
                    new.append(HealthEvent("explosion", i, None, norm, bound))
            self._recent.append(norm)
            for li in np.flatnonzero(layers < self.vanish_floor):
                new.append(HealthEvent("vanishing", i, int(li), float(layers[li]),
                                       self.vanish_floor))
        self.events.extend(new)
        return new

    update = record

    def count(self, kind):
        """Number of events of ``kind`` recorded so far."""
        return sum(e.kind == kind for e in self.events)

    @property
    def healthy(self):
        """True while no event was raised."""
        return not self.events

    def _name(self, li):
        if self.layer_names is not None and li < len(self.layer_names):
            return self.layer_names[li]
        return f"layer {li}"

    def summary(self):
        """A plain-text report: counts, norm statistics, flagged layers."""
        n = len(self.grad_norms)
        if n == 0:
            return "GradientMonitor: no steps recorded"
        norms = np.array(self.grad_norms)
        fin = norms[np.isfinite(norms)]
        scales = np.array(self.clip_scales)
        n_skip = int(np.sum(self.skipped))
        n_clip = int(np.sum((scales < 1.0) & ~np.array(self.skipped)))
        lines = [f"GradientMonitor: {n} steps, {n_skip} skipped (non-finite), "
                 f"{n_clip} clipped ({100.0 * n_clip / n:.1f}%)"]
        if fin.size:
            lines.append(f"  global grad norm: min {fin.min():.3g}  median {np.median(fin):.3g}"
                         f"  max {fin.max():.3g}  last {norms[-1]:.3g}")
        for kind in ("nonfinite", "explosion", "vanishing"):
            ev = [e for e in self.events if e.kind == kind]
            if ev:
                steps = sorted({e.index for e in ev})
                shown = ", ".join(map(str, steps[:8])) + (" ..." if len(steps) > 8 else "")
                lines.append(f"  {kind}: {len(ev)} event(s) at steps {shown}")
        if not self.events:
            lines.append("  healthy: no explosion, no vanishing layer")
        widths = {a.size for a in self.layer_norms}
        if len(widths) == 1 and self.layer_norms[0].size:
            L = np.vstack(self.layer_norms)
            ok = np.isfinite(L)
            lines.append("  per-layer grad norm (median / min / last):")
            vanish = {e.layer for e in self.events if e.kind == "vanishing"}
            for li in range(L.shape[1]):
                col = L[ok[:, li], li]
                med = f"{np.median(col):.3g}" if col.size else "nan"
                mn = f"{col.min():.3g}" if col.size else "nan"
                flag = "  <- vanishing" if li in vanish else ""
                lines.append(f"    {self._name(li):>12}: {med} / {mn} / {L[-1, li]:.3g}{flag}")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()
