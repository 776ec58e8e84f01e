"""Numba CPU kernels.  Every name here has a twin of the same name in
``fastgrad.kernels.cuda`` that takes the same parameters first (the CUDA
twin may add defaulted scratch parameters after them: ``work``, ``out``,
``ws``, ``counter``); tests/test_backend.py checks both lists."""
from .activations import (CODES, DEFAULT_ALPHA, NEEDS_Z, activation_backward,
                          activation_forward, bias_act, bias_act_grad)
from .blocks import (block_backward, block_backward_epilogue, block_forward,
                     block_forward_epilogue, dropout_key, dropout_mask, dropout_threshold)
from .dense import dense_backward, dense_forward
from .losses import bce_with_logits, mse, softmax_cross_entropy
from .norm import norm_backward_epilogue, norm_forward_epilogue
from .optim import clipped_update
from .reduce import layer_sumsq
from .wnorm import weight_norm_backward, weight_norm_forward

__all__ = [
    "CODES", "DEFAULT_ALPHA", "NEEDS_Z", "activation_backward",
    "activation_forward", "bias_act", "bias_act_grad", "dense_backward",
    "dense_forward", "bce_with_logits", "mse", "softmax_cross_entropy",
    "clipped_update", "layer_sumsq",
    # the epilogue pieces' kernels
    "block_backward", "block_backward_epilogue", "block_forward", "block_forward_epilogue",
    "dropout_key", "dropout_mask", "dropout_threshold", "norm_backward_epilogue",
    "norm_forward_epilogue", "weight_norm_backward", "weight_norm_forward",
]
