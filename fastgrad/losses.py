"""Loss objects: ``loss, dy = loss_fn(y, target)``, mean over the batch."""
from . import ops


class Loss:
    """Base: calling returns ``(loss, dloss/dy)``; ``name`` picks the kernel."""
    name = None

    def __call__(self, y, target):
        return getattr(ops, self.name)(y, target)

    def __repr__(self):
        return f"{type(self).__name__}()"


class SoftmaxCrossEntropy(Loss):
    """Softmax over the last axis + cross-entropy on integer class labels
    (torch.nn.CrossEntropyLoss on logits)."""
    name = "softmax_cross_entropy"


class MSE(Loss):
    """Mean squared error over all elements (torch.nn.MSELoss)."""
    name = "mse"


class BCEWithLogits(Loss):
    """Binary cross-entropy on logits (torch.nn.BCEWithLogitsLoss)."""
    name = "bce_with_logits"


LOSSES = {cls.name: cls for cls in (SoftmaxCrossEntropy, MSE, BCEWithLogits)}
