"""Exceptions of fastgrad."""


class NonFiniteGradientError(FloatingPointError):
    """A gradient held NaN or Inf and the optimizer was built with
    ``skip_nonfinite=False``.  Nothing was updated: parameters, optimizer
    state and step count are as before the call."""
