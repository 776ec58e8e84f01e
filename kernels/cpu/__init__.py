"""Numba CPU kernels.  Every name here has a twin of the same signature in
``fastgrad.kernels.cuda``."""
from .activations import (CODES, DEFAULT_ALPHA, NEEDS_Z, activation_backward,
                          activation_forward, bias_act, bias_act_grad)
from .dense import dense_backward, dense_forward
from .losses import bce_with_logits, mse, softmax_cross_entropy
from .optim import clipped_update
from .reduce import layer_sumsq

__all__ = [
    "CODES", "DEFAULT_ALPHA", "NEEDS_Z", "activation_backward",
    "activation_forward", "bias_act", "bias_act_grad", "dense_backward",
    "dense_forward", "bce_with_logits", "mse", "softmax_cross_entropy",
    "clipped_update", "layer_sumsq",
]
