// The scalar activation functions and their derivatives, for kernels that
// fuse an activation into a larger epilogue (activations.cu, blocks.cu,
// norm.cu).
//
// The activations themselves are not written here: each row of
// kernels/spec.py ACTIVATIONS carries its CUDA forms (f and f' as C++ text,
// the CPU's formulas operation by operation, with CUDA's precise libm in
// place of the CPU's float32 polynomials, see common.cuh), and
// kernels/cuda/_module.py generates from that table activation_table.cuh
// (included at the end): the enum of activation codes (IDENTITY = 0, ...),
// one fg::Act<NAME> specialisation per row and FG_EACH_ACTIVATION, nvcc's
// instantiation list.  The loader generates the same text at run time, with
// one specialisation per activation registered with CUDA forms added.
#ifndef FASTGRAD_ACTIVATION_CUH
#define FASTGRAD_ACTIVATION_CUH

#include "common.cuh"

namespace fg {

constexpr double GELU_K = 0.7978845608028654;   // sqrt(2 / pi)
constexpr double GELU_C = 0.044715;
constexpr double SQRT1_2 = 0.7071067811865476;  // 1 / sqrt(2)
constexpr double INV_SQRT_2PI = 0.3989422804014327;

// One specialisation per activation code (generated, see above):
// f(z, alpha), df(a, z, alpha) -- f'(z) from the output a, or from z when
// needs_z (then the kernels keep the pre-activation).  There is no primary
// definition: a code without its specialisation does not compile, so no
// code can fall through to another activation.
template <int ACT> struct Act;

// True for the activations whose derivative reads z (kernels/spec.py
// NEEDS_Z): their kernels keep the pre-activation.
template <int ACT>
__device__ __forceinline__ constexpr bool act_needs_z() { return Act<ACT>::needs_z; }

template <typename T, int ACT>
__device__ __forceinline__ T act_fwd(T z, T alpha) { return Act<ACT>::template f<T>(z, alpha); }

// f'(z) from the output a (and z, read only when act_needs_z).
template <typename T, int ACT>
__device__ __forceinline__ T act_deriv(T a, T z, T alpha)
{
    return Act<ACT>::template df<T>(a, z, alpha);
}

}  // namespace fg

#include "activation_table.cuh"

#endif  // FASTGRAD_ACTIVATION_CUH
