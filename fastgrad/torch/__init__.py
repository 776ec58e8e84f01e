"""fastgrad as PyTorch's fast CPU backend: fused optimizers and a fused MLP.

Switching a torch training loop to fastgrad's fused, clipped update takes
two lines::

    import fastgrad.torch as fgt
    opt = fgt.Adam(model.parameters(), lr=1e-3, clip_norm=1.0)
    # ... loss.backward(); opt.step()     (no clip_grad_norm_ line)

:class:`Adam`, :class:`AdamW`, :class:`SGD` and :class:`RMSprop` are
``torch.optim.Optimizer`` subclasses with PyTorch's constructor arguments,
``param_groups``, ``zero_grad``, ``state_dict``/``load_state_dict`` in
PyTorch's format (the state tensors are the ones ``torch.optim`` keeps, under
its names), so ``torch.optim.lr_scheduler`` works unchanged and a
``torch.optim.Adam`` state dict loads into :class:`Adam` and back.  One step
is ONE compiled call (``fastgrad.kernels.cpu.multi_tensor``) over the
tensors where they are (their storage, no copy): the global and per-tensor
gradient norms, the scaling by ``clip_norm`` of ``clip_grad_norm_``, the
clamp by ``clip_value`` of ``clip_grad_value_``, the non-finite skip and the
rule of every parameter group.  ``opt.stats`` is the step's
:class:`fastgrad.StepStats`.

:class:`FusedMLP` is a ``torch.nn.Module`` whose forward and backward run
fastgrad's fused dense kernels on the tensors' storage.

Only float32 and float64 CPU tensors are supported (one dtype per
optimizer); CUDA tensors are refused with a ``TypeError`` (use PyTorch's own
fused optimizers there).  Importing ``fastgrad`` never imports this module.
"""
try:
    import torch as _torch  # noqa: F401
except ImportError as exc:
    raise ImportError("fastgrad.torch needs PyTorch: pip install 'fastgrad[peers]' "
                      "(torch 2.13.0; README: its CPU build)") from exc

from .mlp import FusedMLP  # noqa: E402
from .optim import SGD, Adam, AdamW, RMSprop  # noqa: E402

__all__ = ["Adam", "AdamW", "SGD", "RMSprop", "FusedMLP"]
