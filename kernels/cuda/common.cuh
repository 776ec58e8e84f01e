// Shared device helpers of fastgrad's CUDA kernels.
//
// Header-free on purpose: NVRTC (which compiles these sources at run time
// through cupy.RawModule) cannot include system headers.  The Python loader
// (fastgrad/kernels/cuda/_module.py) pastes this file in place of its
// #include line; nvcc (the CI compile check) resolves the #include itself.
//
// Math: precise CUDA libm (expf, tanhf, log1pf, ... <= 2 ulp; sqrtf and
// division IEEE-rounded) -- not the CPU's float32 polynomials.  CPU float32
// and GPU float32 therefore agree to ~1e-6 relative on transcendental
// results, and exactly on +, *, /, sqrt.  The modules are compiled with
// --fmad=false so that a*b+c rounds twice as on the CPU (Numba, no
// fastmath): the memory-bound passes lose nothing, and the optimizer update
// is then bitwise the CPU's for the same inputs -- in float32 only while no
// input, intermediate or result is subnormal.
//
// Subnormals: CuPy appends -ftz=true after the loader's options for every
// RawModule, so float32 arithmetic, comparisons and float->double
// conversions read subnormal operands as zero and write subnormal results
// as zero (plain copies keep them); the CPU keeps them.  A float32 result
// is then the CPU's on the flushed inputs, within the smallest normal
// float32 of the CPU's own for the activations and updates (a derivative
// that branches at 0, e.g. relu's, takes the a == 0 branch for a subnormal
// output).  float64 is never flushed.  tests/test_subnormals.py.
#ifndef FASTGRAD_COMMON_CUH
#define FASTGRAD_COMMON_CUH

namespace fg {

// The C++ mirrors of kernels/spec.py (tests/test_registry.py parses these
// enums and fails on any difference; the activation codes are in
// activation.cuh).  Optimizer rule codes and hp slots: spec.UPDATE_RULES
// (its row index is the code), spec.HP_*.
enum { SGD = 0, ADAM = 1, ADAMW = 2, RMSPROP = 3 };
// Every rule in code order: nvcc's instantiation lists of optim.cu and
// multi_tensor.cu (checked against spec.UPDATE_RULES too).
#define FG_EACH_RULE(M, T) M(T, fg::SGD) M(T, fg::ADAM) M(T, fg::ADAMW) M(T, fg::RMSPROP)
enum { HP_LR = 0, HP_WEIGHT_DECAY = 1, HP_BETA1 = 2, HP_BETA2 = 3, HP_EPS = 4,
       HP_BIAS_CORR1 = 5, HP_BIAS_CORR2 = 6, HP_AMSGRAD = 7, HP_MOMENTUM = 8,
       HP_DAMPENING = 9, HP_NESTEROV = 10, HP_FIRST = 11, HP_ALPHA = 12,
       HP_CENTERED = 13, HP_UPDATE = 14, HP_MAXIMIZE = 15, HP_END = 16,
       HP_SIZE = 17 };

// Control block of one update (kernels/cuda/optim.py CTL_*), the record the
// host reads back without a sync.  The clip kernel writes norm, scale, skip
// (1.0 when the update is skipped), the step count after the update, its
// learning rate and the error code; the update kernel reads scale and skip.
// STATUS is raised by a loss kernel that met bad input (a label out of
// range) and cleared by the clip kernel; LOSS is the step's mean loss.
enum { CTL_NORM = 0, CTL_SCALE = 1, CTL_SKIP = 2, CTL_STEP = 3, CTL_LR = 4, CTL_ERROR = 5,
       CTL_STATUS = 6, CTL_LOSS = 7, CTL_SIZE = 8 };
// CTL_ERROR / CTL_STATUS codes.
enum { ERR_NONE = 0, ERR_BAD_LABEL = 1, ERR_NO_HP_ROW = 2 };

// Threads per block of the reductions; their trees assume exactly this.
constexpr int RED_THREADS = 256;

// Gradient elements per block of the squared-norm pass (reduce.cu and
// multi_tensor.cu: both cut each layer / tensor at the same points).
#define FG_SUMSQ_CHUNK 8192

__device__ __forceinline__ float  exp_(float x)    { return expf(x); }
__device__ __forceinline__ double exp_(double x)   { return exp(x); }
__device__ __forceinline__ float  expm1_(float x)  { return expm1f(x); }
__device__ __forceinline__ double expm1_(double x) { return expm1(x); }
__device__ __forceinline__ float  log1p_(float x)  { return log1pf(x); }
__device__ __forceinline__ double log1p_(double x) { return log1p(x); }
__device__ __forceinline__ float  tanh_(float x)   { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x)  { return tanh(x); }
__device__ __forceinline__ float  erfc_(float x)   { return erfcf(x); }
__device__ __forceinline__ double erfc_(double x)  { return erfc(x); }
__device__ __forceinline__ float  sqrt_(float x)   { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x)  { return sqrt(x); }
__device__ __forceinline__ float  abs_(float x)    { return fabsf(x); }
__device__ __forceinline__ double abs_(double x)   { return fabs(x); }

// Python's max(a, b) / min(a, b) (Numba's builtins): the first argument
// unless the second compares greater / smaller.
template <typename T> __device__ __forceinline__ T pymax(T a, T b) { return b > a ? b : a; }
template <typename T> __device__ __forceinline__ T pymin(T a, T b) { return b < a ? b : a; }

__device__ __forceinline__ double inf_d() { return __longlong_as_double(0x7ff0000000000000LL); }
template <typename T> __device__ __forceinline__ T inf() { return T(inf_d()); }

// NaN and +-Inf fail this test (NaN compares false).
__device__ __forceinline__ bool finite_d(double x) { return fabs(x) <= 1.7976931348623157e308; }

// Sum of one double per thread over a block of RED_THREADS threads, in a
// fixed tree: the result depends on the inputs' positions only, never on
// scheduling.  Every thread must call it; thread 0 gets the total.
__device__ __forceinline__ double block_sum(double v, double* sh)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int h = RED_THREADS / 2; h > 0; h >>= 1) {
        if (threadIdx.x < h) sh[threadIdx.x] += sh[threadIdx.x + h];
        __syncthreads();
    }
    return sh[0];
}

// Sum of squares, in double, of g[lo, min(lo + FG_SUMSQ_CHUNK, end)) over a
// block of RED_THREADS threads: each thread adds its strided elements in
// order, then block_sum's tree.  The one chunk sum of reduce.cu and
// multi_tensor.cu, so both give the same partials for the same data.
// Every thread must call it; thread 0 gets the total.
template <typename T>
__device__ __forceinline__ double chunk_sumsq(const T* g, long long lo, long long end, double* sh)
{
    const long long hi = lo + FG_SUMSQ_CHUNK < end ? lo + FG_SUMSQ_CHUNK : end;
    double acc = 0.0;
    for (long long i = lo + threadIdx.x; i < hi; i += RED_THREADS) {
        const double x = (double)g[i];
        acc += x * x;
    }
    return block_sum(acc, sh);
}

// Warp butterflies: x + y == y + x bitwise, so every lane ends with the same
// value and the order is fixed by the lane layout.
template <typename T> __device__ __forceinline__ T warp_sum(T v)
{
    for (int h = 16; h > 0; h >>= 1) v += __shfl_xor_sync(0xffffffffu, v, h);
    return v;
}
template <typename T> __device__ __forceinline__ T warp_max(T v)
{
    for (int h = 16; h > 0; h >>= 1) v = pymax(v, __shfl_xor_sync(0xffffffffu, v, h));
    return v;
}

}  // namespace fg

#endif  // FASTGRAD_COMMON_CUH
