"""Loss objects: ``loss, dy = loss_fn(y, target)``, mean over the batch.

Each takes PyTorch's options (``reduction``, and the class weights,
``ignore_index``, ``label_smoothing`` and ``pos_weight`` of its torch twin)
when it is built, fixed from then on (AttributeError);
:attr:`Loss.options` lists those set away from their defaults.  The fused
training step computes the default losses only: a :class:`fastgrad.TrainStep`
given a loss with options runs the layer path instead (``model(x)``,
``loss_fn``, ``model.backward``, ``opt.step()``: the same kernels, launched
one by one), and ``cuda_graph=True`` refuses it.
"""
import numpy as np

from . import ops


class Loss:
    """Base: calling returns ``(loss, dloss/dy)``; ``name`` picks the kernel."""
    name = None
    _defaults = {"reduction": "mean"}

    def __init__(self, reduction="mean"):
        # "none" gives per-sample losses, which a training loop cannot step
        # on: that stays on the functional path (fastgrad.ops).
        self.reduction = ops.check_reduction(reduction, ("mean", "sum"))

    def __setattr__(self, name, value):
        # A TrainStep chooses its kernels from the options once: a later
        # write would reach fit's validation and not the training step.
        if name in self._defaults and name in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.{name} is fixed once the loss is "
                                 f"built; build a new loss with {name}={value!r}")
        object.__setattr__(self, name, value)

    @property
    def options(self):
        """The options set away from their defaults, name -> value."""
        out = {}
        for key, default in self._defaults.items():
            v = getattr(self, key)
            if v is not default and not (isinstance(v, (str, int, float)) and v == default):
                out[key] = v
        return out

    def __call__(self, y, target):
        return getattr(ops, self.name)(y, target, **self.options)

    def divisor(self, target):
        """What this loss's mean divides a batch's summed loss by (host
        ``target``): a mean over many batches weighs each by it, as the one
        mean over all their samples would (``fastgrad.fit``,
        ``fastgrad.evaluate``).  Here the target's elements, as torch's
        elementwise means (MSELoss, BCEWithLogitsLoss) count them."""
        return int(target.size)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({args})"


class SoftmaxCrossEntropy(Loss):
    """Softmax over the last axis + cross-entropy on integer class labels
    (torch.nn.CrossEntropyLoss on logits).

    Parameters
    ----------
    weight : (classes,) array, optional
        Per-class rescaling; the mean divides by the summed weights of the
        labels (as torch).
    ignore_index : int
        Label of rows that cost nothing (default -100, as torch).
    label_smoothing : float in [0, 1]
    reduction : "mean" (default) or "sum"
    """
    name = "softmax_cross_entropy"
    _defaults = {"weight": None, "ignore_index": -100, "label_smoothing": 0.0,
                 "reduction": "mean"}

    def __init__(self, weight=None, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
        super().__init__(reduction)
        self.weight = None if weight is None else _vector(weight, "weight")
        self.ignore_index = ops.check_ignore_index(ignore_index)
        self.label_smoothing = ops.check_label_smoothing(label_smoothing)

    def kept(self, target):
        """``(labels, mask)``: host labels and where they are not
        ``ignore_index`` (any numeric dtype, as ``ops.as_labels`` takes)."""
        labels = np.asarray(target)
        return labels, labels != self.ignore_index

    def divisor(self, target):
        """The batch's labels other than ``ignore_index``: their number, or
        their summed class weights (the divisor of torch's mean)."""
        labels, kept = self.kept(target)
        if self.weight is None:
            return int(kept.sum())
        # whole-number floats index as the integers they are (checked labels)
        return float(self.weight[labels[kept].astype(np.int64)].sum())

    def __call__(self, y, target):
        return ops.softmax_cross_entropy(y, target, weight=self.weight,
                                         ignore_index=self.ignore_index,
                                         label_smoothing=self.label_smoothing,
                                         reduction=self.reduction)


class MSE(Loss):
    """Mean squared error over all elements (torch.nn.MSELoss);
    ``reduction="sum"`` sums instead."""
    name = "mse"


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss).

    Parameters
    ----------
    pos_weight : number or (outputs,) array, optional
        Weight of the positive term, per output column.
    reduction : "mean" (default) or "sum"
    """
    name = "bce_with_logits"
    _defaults = {"pos_weight": None, "reduction": "mean"}

    def __init__(self, pos_weight=None, reduction="mean"):
        super().__init__(reduction)
        self.pos_weight = None if pos_weight is None else _vector(pos_weight, "pos_weight",
                                                                  scalar_ok=True)


def _vector(w, name, scalar_ok=False):
    """A weight vector as float64 NumPy (the call moves it to the device);
    a scalar stays a float where it may be broadcast."""
    arr = np.asarray(w.detach().cpu().numpy() if hasattr(w, "detach") else w)
    if arr.ndim == 0 and scalar_ok:
        return float(ops.class_weights(arr, 1, name, scalar_ok=True)[0])
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array (one per class), got shape {arr.shape}")
    return ops.class_weights(arr, arr.shape[0], name)


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, MSE, BCEWithLogits)}
