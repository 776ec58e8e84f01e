"""The Numba pipeline every CPU kernel compiles with: Numba's nopython
pipeline, its lowering marking each function it emits with LLVM's
``"prefer-vector-width"="512"``.

LLVM's tuning for Intel cores with AVX-512 prefers 256-bit vectors (the
first such cores slowed down while their 512-bit units were busy), so
Numba's loops used half the registers' width.  A training step pays the
512-bit cost anyway: OpenBLAS's SKYLAKEX kernels run its GEMMs on those
units.  The transcendental passes (mathfn's polynomials in the activations
and losses) run 1.1-1.4x faster at 512 bits (bench/RESULTS.md, "512-bit
vectors").  On a core without AVX-512 the attribute asks for a width the
core does not have and changes nothing.  Kernels with ``parallel=True``
lower through Numba's parfor lowering, without it (opt-in paths).

A module of its own, outside ``kernels/cpu``: the copies of that package
built per model (fastgrad.registry) import this one module, and Numba
registers a pass class once by name.
"""
from numba.core import lowering
from numba.core.compiler import CompilerBase, DefaultPassBuilder
from numba.core.compiler_machinery import register_pass
from numba.core.typed_passes import NativeLowering

#: LLVM's function attribute asking the loop vectoriser for 512-bit vectors.
PREFER_512 = '"prefer-vector-width"="512"'


class _WideLower(lowering.Lower):
    def lower_normal_function(self, fndesc):
        super().lower_normal_function(fndesc)
        for fn in self.module.functions:
            if not fn.is_declaration:
                # set.add: llvmlite's attribute set accepts LLVM's named
                # attributes alone, and writes whatever it holds as it is
                set.add(fn.attributes, PREFER_512)


@register_pass(mutates_CFG=True, analysis_only=False)
class _WideLowering(NativeLowering):
    _name = "fastgrad_wide_vectors_lowering"

    @property
    def lowering_class(self):
        return _WideLower


class WideVectors(CompilerBase):
    """Numba's nopython pipeline with :data:`PREFER_512` on every function
    it lowers (``pipeline_class`` of ``njit`` and ``cfunc``)."""

    def define_pipelines(self):
        pipeline = DefaultPassBuilder.define_nopython_pipeline(self.state)
        pipeline.passes = [(_WideLowering if p is NativeLowering else p, note)
                           for p, note in pipeline.passes]
        return [pipeline]
