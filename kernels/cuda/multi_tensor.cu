// Clipped optimizer updates over many separate arrays, in place: twin of
// kernels/cpu/multi_tensor.py, on the device.
//
// The arrays arrive as device int64 arrays of data addresses (CuPy's
// a.data.ptr), with their sizes and, per tensor, the hp block it uses
// (parameter groups).  Launches, no host sync:
//   fg_mt_sumsq_partial  grid (gx, tensors): block (bx, t) sums elements
//                        [bx*CHUNK, +CHUNK) of tensor t into
//                        partial[t * gx + bx] -- the very partials
//                        reduce.cu's fg_seg_sumsq_partial writes for the
//                        same data laid out flat, one layer per tensor, so
//                        reduce.cu's fg_seg_sumsq_final then gives bitwise
//                        the flat kernel's per-tensor and global norms;
//   fg_clip_control      (optim.cu) scale / skip / hp row into ctl and hp;
//   fg_mt_update         grid (bx, tensors): fg::rule_update (optim.cuh,
//                        the flat fg_update's code) on each tensor.
// Both kernels stride over tensors in grid y, so any number of tensors
// fits CUDA's 65535 limit on grid y.
#include "common.cuh"
#include "optim.cuh"

template <typename T>
__global__ void fg_mt_sumsq_partial(const long long* g_addr, const long long* sizes,
                                    long long n_tensors, double* partial)
{
    __shared__ double sh[fg::RED_THREADS];
    for (long long t = blockIdx.y; t < n_tensors; t += gridDim.y) {
        const double tot = fg::chunk_sumsq(reinterpret_cast<const T*>(g_addr[t]),
                                           (long long)blockIdx.x * FG_SUMSQ_CHUNK, sizes[t], sh);
        if (threadIdx.x == 0) partial[t * gridDim.x + blockIdx.x] = tot;
        __syncthreads();                   // sh is reused by the next tensor
    }
}

// s_addr is (3, n_tensors): each tensor's s0, s1, s2 (0 where the rule
// keeps none: never read).  hp holds one HP_SIZE block per parameter-group
// segment; tensor t uses block rows[t].
template <typename T, int RULE>
__global__ void fg_mt_update(const long long* p_addr, const long long* g_addr,
                             const long long* s_addr, const long long* sizes,
                             const long long* rows, long long n_tensors, const double* hp,
                             const double* ctl, double clip_value)
{
    if (ctl[fg::CTL_SKIP] != 0.0) return;          // non-finite norm: touch nothing
    const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long t = blockIdx.y; t < n_tensors; t += gridDim.y) {
        fg::rule_update<T, RULE>(reinterpret_cast<T*>(p_addr[t]),
                                 reinterpret_cast<const T*>(g_addr[t]),
                                 reinterpret_cast<T*>(s_addr[t]),
                                 reinterpret_cast<T*>(s_addr[n_tensors + t]),
                                 reinterpret_cast<T*>(s_addr[2 * n_tensors + t]),
                                 hp + rows[t] * fg::HP_SIZE, ctl, clip_value, i0, sizes[t],
                                 stride);
    }
}

#ifndef __CUDACC_RTC__
template __global__ void fg_mt_sumsq_partial<float>(const long long*, const long long*,
                                                    long long, double*);
template __global__ void fg_mt_sumsq_partial<double>(const long long*, const long long*,
                                                     long long, double*);
#define FG_MT_INST(T, R)                                                                     \
    template __global__ void fg_mt_update<T, R>(const long long*, const long long*,          \
                                                const long long*, const long long*,          \
                                                const long long*, long long, const double*,  \
                                                const double*, double);
FG_EACH_RULE(FG_MT_INST, float)
FG_EACH_RULE(FG_MT_INST, double)
#endif
