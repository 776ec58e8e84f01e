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
constexpr double SQRT1_2 = 0.7071067811865476;  // 1 / sqrt(2)
constexpr double INV_SQRT_2PI = 0.3989422804014327;

// Activation codes: kernels/spec.py ACTIVATIONS (row index), checked by
// tests/test_registry.py.
enum { IDENTITY = 0, RELU = 1, LEAKY_RELU = 2, ELU = 3, SIGMOID = 4, TANH = 5,
       SOFTPLUS = 6, GELU = 7, SILU = 8, GELU_TANH = 9 };

// Every code above, for the explicit instantiations that nvcc compiles in the
// .cu files (NVRTC instantiates kernels/cuda/_module.py's name_expressions,
// which come from kernels/spec.py).
#define FG_EACH_ACTIVATION(M, T)                                                   \
    M(T, fg::IDENTITY) M(T, fg::RELU) M(T, fg::LEAKY_RELU) M(T, fg::ELU)             \
    M(T, fg::SIGMOID) M(T, fg::TANH) M(T, fg::SOFTPLUS) M(T, fg::GELU) M(T, fg::SILU) \
    M(T, fg::GELU_TANH)

// One specialisation per activation code:
// f(z, alpha), df(a, z, alpha) -- f'(z) from the output a, or from z when
// needs_z (then the kernels keep the pre-activation).  There is no primary
// definition: a code without its specialisation does not compile, so no
// code can fall through to another activation.
template <int ACT> struct Act;

template <> struct Act<IDENTITY> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T) { return z; }
    template <typename T> __device__ __forceinline__ static T df(T, T, T) { return T(1); }
};

template <> struct Act<RELU> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T)
    { return z < T(0) ? T(0) : z; }
    template <typename T> __device__ __forceinline__ static T df(T a, T, T)
    { return a > T(0) ? T(1) : T(0); }
};

template <> struct Act<LEAKY_RELU> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    { return z < T(0) ? alpha * z : z; }
    template <typename T> __device__ __forceinline__ static T df(T a, T, T alpha)
    { return a > T(0) ? T(1) : alpha; }
};

template <> struct Act<ELU> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    { return z <= T(0) ? alpha * expm1_(z) : z; }
    template <typename T> __device__ __forceinline__ static T df(T a, T, T alpha)
    { return a > T(0) ? T(1) : a + alpha; }
};

template <> struct Act<SIGMOID> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T)
    { return T(1) / (T(1) + exp_(-z)); }
    template <typename T> __device__ __forceinline__ static T df(T a, T, T)
    { return a * (T(1) - a); }
};

template <> struct Act<TANH> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T) { return tanh_(z); }
    template <typename T> __device__ __forceinline__ static T df(T a, T, T)
    { return T(1) - a * a; }
};

template <> struct Act<SOFTPLUS> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T)
    { return (z > T(0) ? z : T(0)) + log1p_(exp_(-abs_(z))); }
    template <typename T> __device__ __forceinline__ static T df(T a, T, T)
    { return -expm1_(-a); }
};

// Exact GELU, z Phi(z) with Phi(z) = erfc(-z / sqrt 2) / 2 (no cancellation
// for z << 0); f' = Phi(z) + z phi(z).
template <> struct Act<GELU> {
    static constexpr bool needs_z = true;
    template <typename T> __device__ __forceinline__ static T f(T z, T)
    { return T(0.5) * z * erfc_(-z * T(SQRT1_2)); }
    template <typename T> __device__ __forceinline__ static T df(T, T z, T)
    {
        const T half = T(0.5);
        return half * erfc_(-z * T(SQRT1_2)) + z * (T(INV_SQRT_2PI) * exp_(-(half * z * z)));
    }
};

template <> struct Act<SILU> {
    static constexpr bool needs_z = true;
    // z sigmoid(z), sigmoid(z) = e / (1 + e) for z < 0 (e = exp(-|z|))
    template <typename T> __device__ __forceinline__ static T f(T z, T)
    {
        const T e = exp_(-abs_(z));
        return z * ((z >= T(0) ? T(1) : e) / (T(1) + e));
    }
    // s (1 + z (1 - s)), s and 1 - s each a ratio of e or 1 over 1 + e
    template <typename T> __device__ __forceinline__ static T df(T, T z, T)
    {
        const T one = T(1);
        const T e = exp_(-abs_(z));
        const bool pos = z >= T(0);
        const T d = one + e;
        const T s = (pos ? one : e) / d;
        return s * (one + z * ((pos ? e : one) / d));
    }
};

// GELU, tanh approximation.  (1 - t^2) multiplies z first in f', so a
// saturated unit gives 0, not inf * 0.
template <> struct Act<GELU_TANH> {
    static constexpr bool needs_z = true;
    template <typename T> __device__ __forceinline__ static T f(T z, T)
    {
        const T inner = T(GELU_K) * (z + T(GELU_C) * z * z * z);
        return T(0.5) * z * (T(1) + tanh_(inner));
    }
    template <typename T> __device__ __forceinline__ static T df(T, T z, T)
    {
        const T one = T(1), half = T(0.5), k = T(GELU_K), c = T(GELU_C);
        const T t = tanh_(k * (z + c * z * z * z));
        return half * (one + t) + ((half * (one - t * t)) * z) * (k * (one + T(3.0) * c * z * z));
    }
};

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

#endif  // FASTGRAD_ACTIVATION_CUH
