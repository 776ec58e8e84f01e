"""CuPy twins of ``fastgrad.kernels.cpu`` (same names and signatures).

Imported only when the CUDA device is used; ``import fastgrad`` never
imports CuPy.  Without CuPy this package raises an ImportError naming the
extra to install.  Sources: ``*.cu`` beside this file (shipped in the
wheel), compiled on first use by NVRTC and cached on disk by CuPy.
"""
try:
    import cupy  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "fastgrad.kernels.cuda needs CuPy: install the CUDA extra, "
        "pip install 'fastgrad[cuda]' (cupy-cuda13x)") from exc

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
    # the epilogue pieces (twins of kernels/cpu/blocks.py, norm.py, wnorm.py)
    "dropout_key", "dropout_threshold", "dropout_mask", "block_forward_epilogue",
    "block_backward_epilogue", "block_forward", "block_backward",
    "norm_forward_epilogue", "norm_backward_epilogue",
    "weight_norm_forward", "weight_norm_backward",
]
