"""Epoch callbacks of :func:`fastgrad.fit` (Keras's names and meanings).

A callback is an object with any of

* ``on_train_begin(step, history)``: before the first epoch; ``history``
  already holds every key the epochs will fill, so a callback can refuse a
  metric that will never come (``ValueError`` before any training);
* ``on_epoch_end(epoch, history, step)``: after each epoch's figures (and
  validation) are in ``history``; returning True stops training; callbacks
  whose ``saves_state`` is True (ModelCheckpoint) run after the others, so
  that a checkpoint holds their changes of its epoch (a plateau cut) in
  either order of the list;
* ``on_train_end(step, history)``: after the last epoch (also an early one);
  callbacks whose ``changes_model_at_end`` is True (EarlyStopping restoring
  the best weights) run after the others, so that ModelCheckpoint's last
  save holds the last epoch's weights in either order of the list.

``step`` is the :class:`fastgrad.TrainStep` being trained (``step.model``,
``step.opt``).  Plain callables passed to ``fit(callbacks=...)`` stay
per-step hooks ``f(step_index, loss, stats)``.
"""
import math
import numbers

__all__ = ["Callback", "EarlyStopping", "ModelCheckpoint", "ReduceLROnPlateau"]


class Callback:
    """Base class: every hook does nothing."""

    def on_train_begin(self, step, history):
        pass

    def on_epoch_end(self, epoch, history, step):
        return False

    def on_train_end(self, step, history):
        pass


def _monitored(monitor, history):
    if monitor not in history:
        raise ValueError(f"monitor {monitor!r} is not a metric of this fit; it records "
                         f"{sorted(history)} (val_* needs validation_data)")


def _mode(mode, monitor):
    if mode == "auto":
        return "max" if "acc" in monitor else "min"
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    return mode


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    Parameters
    ----------
    monitor : str
        A key of the history, e.g. "val_loss" (default), "val_accuracy", "loss".
    mode : "auto" | "min" | "max"
        "auto": "max" for accuracies, "min" otherwise.
    patience : int
        Epochs without improvement after which training stops, as Keras
        counts them: after ``patience`` of them (0 and 1 both stop at the
        first), never at the first epoch.
    min_delta : float
        An improvement must beat the best by more than this.
    restore_best_weights : bool
        When training ends, load the parameters and batch-norm running
        statistics of the best epoch back into the model (default True).
        The optimizer's state is left as it is.
    baseline : float or None
        As Keras 3's: an epoch that improves on the best but not on
        ``baseline`` is recorded as the best and does not reset the wait
        (the count of epochs since the best beat the baseline); training
        stops at the first epoch without improvement once that count has
        reached ``patience``.
    start_from_epoch : int
        Epochs before this one (0-based) are not watched (a warm-up).

    After training, ``best``, ``best_epoch`` (0-based) and
    ``stopped_epoch`` (None if it ran to the end) say what happened.
    """

    def __init__(self, monitor="val_loss", mode="auto", patience=0, min_delta=0.0,
                 restore_best_weights=True, baseline=None, start_from_epoch=0):
        self.monitor = monitor
        self.mode = _mode(mode, monitor)
        if isinstance(patience, bool) or not isinstance(patience, numbers.Integral) \
                or patience < 0:
            raise ValueError(f"patience must be an integer >= 0, got {patience!r}")
        self.patience = int(patience)
        min_delta = float(min_delta)
        if not (math.isfinite(min_delta) and min_delta >= 0):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.min_delta = min_delta
        self.restore_best_weights = bool(restore_best_weights)
        if baseline is not None:
            baseline = float(baseline)
            if math.isnan(baseline):
                raise ValueError("baseline must be a number or None, got nan")
        self.baseline = baseline
        if isinstance(start_from_epoch, bool) \
                or not isinstance(start_from_epoch, numbers.Integral) or start_from_epoch < 0:
            raise ValueError(f"start_from_epoch must be an integer >= 0, got {start_from_epoch!r}")
        self.start_from_epoch = int(start_from_epoch)

    @property
    def changes_model_at_end(self):
        """It restores the best weights when training ends."""
        return self.restore_best_weights

    def on_train_begin(self, step, history):
        _monitored(self.monitor, history)
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch, self.stopped_epoch, self.wait, self._best_state = None, None, 0, None

    def _improved(self, value, reference):
        if self.mode == "min":
            return value < reference - self.min_delta
        return value > reference + self.min_delta

    def on_epoch_end(self, epoch, history, step):
        if epoch < self.start_from_epoch:
            return False
        value = history[self.monitor][-1]
        self.wait += 1
        if self._improved(value, self.best):
            self.best, self.best_epoch = value, epoch
            if self.restore_best_weights:
                # A copy: the state dict's arrays are views of the live model.
                self._best_state = {k: v.copy() for k, v in step.model.state_dict().items()}
            if self.baseline is None or self._improved(value, self.baseline):
                self.wait = 0
            return False
        if self.wait >= self.patience and epoch > 0:      # Keras's test
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, step, history):
        if self.restore_best_weights and self._best_state is not None:
            step.model.load_state_dict(self._best_state)


class ModelCheckpoint(Callback):
    """Save the model and optimizer with :func:`fastgrad.save` every
    ``every`` epochs (and after the last epoch when ``save_last``).

    ``path`` may hold ``{epoch}`` (1-based), e.g. ``"run-{epoch:03d}.fgz"``,
    and, as Keras's, the epoch's figures by their history keys, e.g.
    ``"w-{epoch:02d}-{val_loss:.3f}.fgz"``, for one file per checkpoint;
    otherwise each save replaces the last (atomically).  ``saved`` lists
    the paths written.
    """

    saves_state = True          # fit runs it after the other epoch callbacks

    def __init__(self, path, every=1, save_last=True):
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.path, self.every, self.save_last = str(path), int(every), bool(save_last)
        self.saved = []
        self._last_saved = None

    def _path(self, epoch, history):
        figures = {k: v[-1] for k, v in history.items() if v}
        return self.path.format(**dict(figures, epoch=epoch + 1))

    def _save(self, epoch, step):
        from .io import save
        path = self._path(epoch, self._history)
        save(path, step.model, step.opt)
        self.saved.append(path)
        self._last_saved = epoch

    def on_train_begin(self, step, history):
        self.saved, self._last_saved, self._epoch = [], None, None
        self._history = history
        # a bad pattern fails before training, naming what it may hold
        try:
            self.path.format(**dict(dict.fromkeys(history, 0), epoch=1))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"ModelCheckpoint path {self.path!r}: {type(e).__name__} {e}; "
                             f"it may hold {{epoch}} and this fit's history keys "
                             f"{sorted(history)} (write a literal brace as {{{{ or }}}})") from None

    def on_epoch_end(self, epoch, history, step):
        self._epoch = epoch
        if (epoch + 1) % self.every == 0:
            self._save(epoch, step)
        return False

    def on_train_end(self, step, history):
        if self.save_last and self._epoch is not None and self._last_saved != self._epoch:
            self._save(self._epoch, step)


class ReduceLROnPlateau(Callback):
    """Feed ``monitor`` to the optimizer's plateau schedule after each epoch.

    The optimizer must have been built with a
    :class:`fastgrad.schedules.ReduceLROnPlateau` learning rate, e.g.
    ``fg.Adam(model, lr=fg.schedules.ReduceLROnPlateau(1e-3, patience=2))``;
    its ``factor``, ``patience``, ``cooldown`` ... are the schedule's, and it
    scales the lr the optimizer uses from the next update on.  ``reductions``
    lists the (0-based) epochs after which the lr was cut.

    ``mode`` ("auto": "max" for accuracies, "min" otherwise, as Keras) must
    be the schedule's: fit refuses a schedule in "min" mode fed
    ``val_accuracy``, which would cut the lr while the accuracy rises.
    """

    def __init__(self, monitor="val_loss", mode="auto"):
        self.monitor = monitor
        self.mode = _mode(mode, monitor)
        self.reductions = []

    def on_train_begin(self, step, history):
        from .schedules import reduce_on_plateau
        _monitored(self.monitor, history)
        sched = getattr(step.opt, "lr_schedule", None)
        if not isinstance(sched, reduce_on_plateau):
            raise ValueError("the ReduceLROnPlateau callback drives the optimizer's schedule: "
                             "build the optimizer with lr=fastgrad.schedules.ReduceLROnPlateau"
                             f"(...), not {sched!r}")
        if sched.mode != self.mode:
            raise ValueError(f"monitor {self.monitor!r} improves in mode {self.mode!r} but the "
                             f"optimizer's plateau schedule has mode {sched.mode!r}: build it "
                             f"with ReduceLROnPlateau(..., mode={self.mode!r})")
        self._sched = sched

    def on_epoch_end(self, epoch, history, step):
        if self._sched.step(history[self.monitor][-1]):
            self.reductions.append(epoch)
        return False
