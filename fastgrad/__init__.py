"""fastgrad: fused compiled kernels for training dense networks, with
gradient clipping and gradient-health reporting built in.

>>> import fastgrad as fg
>>> model = fg.MLP([784, 256, 10], activation="relu")
"""
from . import ops
from .device import (DeviceUnavailableError, available_devices, get_device,
                     set_device)
from .layers import MLP, Dense, Sequential
from .losses import MSE, BCEWithLogits, SoftmaxCrossEntropy

__version__ = "0.1.0"

__all__ = [
    "ops", "DeviceUnavailableError", "available_devices", "get_device",
    "set_device", "MLP", "Dense", "Sequential", "MSE", "BCEWithLogits",
    "SoftmaxCrossEntropy",
]
