// The scalar activation functions and their derivatives, for kernels that
// fuse an activation into a larger epilogue (blocks.cu, norm.cu).
//
// The CPU's formulas (kernels/cpu/activations.py) operation by operation,
// with CUDA's precise libm in place of the CPU's float32 polynomials (see
// common.cuh).  The same functions as activations.cu's fg::act_fwd /
// fg::act_deriv: activations.cu can include this header and drop its own
// copy (it cannot be included from here: its kernels and their nvcc
// instantiations would come along).
#ifndef FASTGRAD_ACTIVATION_CUH
#define FASTGRAD_ACTIVATION_CUH

#include "common.cuh"

namespace fg {

constexpr double GELU_K = 0.7978845608028654;   // sqrt(2 / pi)
constexpr double GELU_C = 0.044715;

// True for the activations whose derivative reads z (kernels/cpu/activations.py
// NEEDS_Z): their kernels keep the pre-activation.
template <int ACT>
__device__ __forceinline__ constexpr bool act_needs_z()
{
    return ACT == GELU || ACT == SILU;
}

template <typename T, int ACT>
__device__ __forceinline__ T act_fwd(T z, T alpha)
{
    const T zero = T(0), one = T(1);
    if (ACT == IDENTITY) return z;
    if (ACT == RELU) return z < zero ? zero : z;
    if (ACT == LEAKY_RELU) return z < zero ? alpha * z : z;
    if (ACT == ELU) return z <= zero ? alpha * expm1_(z) : z;
    if (ACT == SIGMOID) return one / (one + exp_(-z));
    if (ACT == TANH) return tanh_(z);
    if (ACT == SOFTPLUS) return (z > zero ? z : zero) + log1p_(exp_(-abs_(z)));
    if (ACT == SILU) {
        // z sigmoid(z), sigmoid(z) = e / (1 + e) for z < 0 (e = exp(-|z|))
        const T e = exp_(-abs_(z));
        return z * ((z >= zero ? one : e) / (one + e));
    }
    // GELU, tanh approximation
    const T inner = T(GELU_K) * (z + T(GELU_C) * z * z * z);
    return T(0.5) * z * (one + tanh_(inner));
}

// f'(z) from the output a (and z, read only for gelu and silu).
template <typename T, int ACT>
__device__ __forceinline__ T act_deriv(T a, T z, T alpha)
{
    const T zero = T(0), one = T(1);
    if (ACT == IDENTITY) return one;
    if (ACT == RELU) return a > zero ? one : zero;
    if (ACT == LEAKY_RELU) return a > zero ? one : alpha;
    if (ACT == ELU) return a > zero ? one : a + alpha;
    if (ACT == SIGMOID) return a * (one - a);
    if (ACT == TANH) return one - a * a;
    if (ACT == SOFTPLUS) return -expm1_(-a);
    if (ACT == SILU) {
        // s (1 + z (1 - s)), s and 1 - s each a ratio of e or 1 over 1 + e
        const T e = exp_(-abs_(z));
        const bool pos = z >= zero;
        const T d = one + e;
        const T s = (pos ? one : e) / d;
        return s * (one + z * ((pos ? e : one) / d));
    }
    // GELU: (1 - t^2) multiplies z first, so a saturated unit gives 0, not inf * 0
    const T half = T(0.5), k = T(GELU_K), c = T(GELU_C);
    const T t = tanh_(k * (z + c * z * z * z));
    return half * (one + t) + ((half * (one - t * t)) * z) * (k * (one + T(3.0) * c * z * z));
}

}  // namespace fg

#endif  // FASTGRAD_ACTIVATION_CUH
