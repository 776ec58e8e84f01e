"""Former home of the epilogue pieces' step (dropout, residual blocks, norm,
weight norm), kept so that imports of its names go on working.

Plain and models with epilogue pieces now run ONE driver, ``step`` (``forward_backward``,
``train_step``, ``train_steps``), specialised at compile time on the layer
features its package serves; the names below are that driver (its
arguments: the step plan of ``step.step_plan`` after the plain step's).
"""
from .step import forward_backward as forward_backward_blocks  # noqa: F401
from .step import train_step as train_step_blocks  # noqa: F401
from .step import train_steps as train_steps_blocks  # noqa: F401
