"""fastgrad: fused compiled kernels for training dense networks, with
gradient clipping and gradient-health reporting built in.

>>> import fastgrad as fg
>>> model = fg.MLP([784, 256, 10], activation="relu")
>>> step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, clip_norm=1.0))
"""
from . import callbacks, health, interop, ops, registry, schedules
from .blas import get_blas, set_blas
from .device import (DeviceUnavailableError, available_devices, get_device,
                     get_flush_denormal, set_device, set_flush_denormal)
from .errors import NonFiniteGradientError
from .interop import from_torch
from .io import load, save
from .layers import MLP, Dense, Residual, Sequential
from .losses import MSE, BCEWithLogits, SoftmaxCrossEntropy
from .optim import SGD, Adam, AdamW, RMSprop, StepStats
from .registry import register_activation
from .step import TrainStep, evaluate, fit
from .threads import (blas_pool_status, get_num_threads, pass_team_status, set_num_threads,
                      share_blas_pool)

__version__ = "0.1.0"

__all__ = [
    "callbacks", "health", "interop", "from_torch", "load", "save", "ops", "schedules", "DeviceUnavailableError", "available_devices",
    "get_device", "set_device", "get_flush_denormal", "set_flush_denormal",
    "NonFiniteGradientError", "MLP", "Dense", "Residual",
    "Sequential", "MSE", "BCEWithLogits", "SoftmaxCrossEntropy", "SGD", "Adam",
    "AdamW", "RMSprop", "StepStats", "TrainStep", "evaluate", "fit",
    "get_num_threads", "set_num_threads", "share_blas_pool", "blas_pool_status",
    "get_blas", "set_blas",
    "pass_team_status", "registry",
    "register_activation",
]
