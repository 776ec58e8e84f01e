"""Former home of the CUDA step of models with epilogue pieces (dropout,
residual blocks, norm, weight norm), kept so that imports of its names go
on working.

Plain models and models with epilogue pieces now run ONE CUDA driver,
``step`` (``forward_backward``, ``train_step``, ``GraphedTrainStep``,
``Workspace``), reading the step plan as the CPU driver does; the names
below are that driver (its arguments: the step plan of ``step.step_plan``
after the plain step's, then ``ws``, ``gemm``, ``counter``, ``commit``).
"""
from .step import GraphedTrainStep as GraphedTrainStepBlocks  # noqa: F401
from .step import Workspace as BlocksWorkspace  # noqa: F401
from .step import forward_backward as forward_backward_blocks  # noqa: F401
from .step import train_step as train_step_blocks  # noqa: F401
