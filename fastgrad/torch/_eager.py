"""Run fastgrad's torch-side entry points eagerly under ``torch.compile``.

Their work is Numba kernels on the tensors' storage, which TorchDynamo
cannot trace (it failed inside Numba's dispatcher, on NumPy scalars, or
mistraced the optimizer's state gathering).  Marked ``not_traced``, a call
is a graph break: the compiled graph runs up to it, the function runs as
plain Python, the graph resumes after it.  ``torch.compiler.disable`` is
taken only while compiling, since importing TorchDynamo costs ~1 s.
"""
import functools

import torch


def not_traced(fn):
    disabled = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(
                fn, reason=f"fastgrad's {fn.__qualname__} runs Numba kernels: a graph break"))
        return disabled[0](*args, **kwargs)

    return run
