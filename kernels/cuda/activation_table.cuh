// GENERATED from kernels/spec.py ACTIVATIONS by kernels/cuda/_module.py: do
// not edit.  Regenerate after changing the table with
//   python -c "from fastgrad.kernels.cuda import _module; _module.write_activation_table()"
// (tests/test_registry.py fails while it is stale).  The loader does not read
// this file: it generates the same text at run time, with the activations
// registered with CUDA forms added; the file is here so that every .cu
// compiles on its own with nvcc.
#ifndef FASTGRAD_ACTIVATION_TABLE_CUH
#define FASTGRAD_ACTIVATION_TABLE_CUH
namespace fg {
enum { IDENTITY = 0, RELU = 1, LEAKY_RELU = 2, ELU = 3, SIGMOID = 4, TANH = 5, SOFTPLUS = 6, GELU = 7, SILU = 8, GELU_TANH = 9 };
template <> struct Act<IDENTITY> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (z);
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        return (T(1));
    }
};
template <> struct Act<RELU> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (z < T(0) ? T(0) : z);
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        return (a <= T(0) ? T(0) : T(1));
    }
};
template <> struct Act<LEAKY_RELU> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (z < T(0) ? alpha * z : z);
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        return (a > T(0) ? T(1) : alpha);
    }
};
template <> struct Act<ELU> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (z <= T(0) ? alpha * expm1_(z) : z);
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        return (a <= T(0) ? a + alpha : T(1));
    }
};
template <> struct Act<SIGMOID> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (T(1) / (T(1) + exp_(-z)));
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        return (a * (T(1) - a));
    }
};
template <> struct Act<TANH> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (tanh_(z));
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        return (T(1) - a * a);
    }
};
template <> struct Act<SOFTPLUS> {
    static constexpr bool needs_z = false;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (z > T(20) ? z : (z > T(0) ? z : T(0)) + log1p_(exp_(-abs_(z))));
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        return (a > T(20) ? T(1) : -expm1_(-a));
    }
};
template <> struct Act<GELU> {
    static constexpr bool needs_z = true;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        return (T(0.5) * z * erfc_(-z * T(SQRT1_2)));
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        const T half = T(0.5);
        return half * erfc_(-z * T(SQRT1_2)) + z * (T(INV_SQRT_2PI) * exp_(-(half * z * z)));
    }
};
template <> struct Act<SILU> {
    static constexpr bool needs_z = true;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        const T e = exp_(-abs_(z));
        return z * ((z >= T(0) ? T(1) : e) / (T(1) + e));
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        const T one = T(1);
        const T e = exp_(-abs_(z));
        const bool pos = z >= T(0);
        const T d = one + e;
        const T s = (pos ? one : e) / d;
        return s * (one + z * ((pos ? e : one) / d));
    }
};
template <> struct Act<GELU_TANH> {
    static constexpr bool needs_z = true;
    template <typename T> __device__ __forceinline__ static T f(T z, T alpha)
    {
        (void)alpha;
        const T inner = T(GELU_K) * (z + T(GELU_C) * z * z * z);
        return T(0.5) * z * (T(1) + tanh_(inner));
    }
    template <typename T> __device__ __forceinline__ static T df(T a, T z, T alpha)
    {
        (void)a; (void)z; (void)alpha;
        const T one = T(1), half = T(0.5), k = T(GELU_K), c = T(GELU_C);
        const T t = tanh_(k * (z + c * z * z * z));
        return half * (one + t) + ((half * (one - t * t)) * z) * (k * (one + T(3.0) * c * z * z));
    }
};
}  // namespace fg
#define FG_EACH_ACTIVATION(M, T) M(T, fg::IDENTITY) M(T, fg::RELU) M(T, fg::LEAKY_RELU) M(T, fg::ELU) M(T, fg::SIGMOID) M(T, fg::TANH) M(T, fg::SOFTPLUS) M(T, fg::GELU) M(T, fg::SILU) M(T, fg::GELU_TANH)
#endif  // FASTGRAD_ACTIVATION_TABLE_CUH
