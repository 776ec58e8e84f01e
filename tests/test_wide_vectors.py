"""The CPU kernels' compile pipeline (kernels/wide_vectors.py): every
kernel asks LLVM for 512-bit vectors.  (The vector width of each
activation's loops is tested in tests/test_activation_vectorised.py.)
"""
import importlib
import pkgutil
import re

import numpy as np
from numba import njit
from numba.core.dispatcher import Dispatcher

import fastgrad.kernels.cpu as cpu
from fastgrad.kernels.cpu import pass_team
from fastgrad.kernels.wide_vectors import PREFER_512, WideVectors


def _kernels():
    for info in pkgutil.iter_modules(cpu.__path__):
        module = importlib.import_module(f"{cpu.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Dispatcher) and value.__module__ == module.__name__:
                yield f"{info.name}.{name}", value


def test_every_kernel_compiles_with_wide_vectors():
    """Every compiled kernel of kernels/cpu (those inlined into their
    callers compile with the caller's) and the pass team's members."""
    kernels = [(name, k) for name, k in _kernels() if k.targetoptions.get("inline") != "always"]
    assert len(kernels) > 50
    others = [name for name, k in kernels if k._compiler.pipeline_class is not WideVectors]
    assert not others, f"kernels compiled without kernels/wide_vectors.py's pipeline: {others}"
    pass_team.member_addresses(np.float32)
    members = [m for (dtype, _), m in pass_team._members.items() if dtype == np.float32]
    assert len(members) == len(pass_team.KINDS)
    assert all(m._compiler.pipeline_class is WideVectors for m in members)


def test_the_pipeline_marks_each_function():
    @njit(error_model="numpy", pipeline_class=WideVectors)
    def scale(x):
        for i in range(x.shape[0]):
            x[i] *= np.float32(2)

    x = np.arange(5, dtype=np.float32)
    scale(x)
    np.testing.assert_array_equal(x, np.arange(5, dtype=np.float32) * 2)
    (ir,) = scale.inspect_llvm().values()
    # the function's definition (not its Python or C wrapper's) names its
    # attribute group: "define ... @_ZN<...>scale<...>(...) ... #N {"
    groups = re.findall(r"^define [^@]*@_ZN[^(]*scale[^(]*\(.*\) [^#]*#(\d+) \{", ir, re.M)
    assert groups, "the function's definition is not in its IR"
    for n in groups:
        (attributes,) = re.findall(rf"^attributes #{n} = \{{(.*)\}}", ir, re.M)
        assert PREFER_512 in attributes
