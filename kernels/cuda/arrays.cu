// Device-array helpers of the CUDA backend (kernels/cuda/arrays.py): the few
// array operations fastgrad's CUDA path needs besides its GEMMs and fused
// kernels, as its own launches instead of CuPy's array library.  Every pass
// is a grid-stride loop over its elements; none reads back to the host.

// dst[i] += src[i] (the residual gradient dx += da; accumulated grads).
template <typename T>
__global__ void fg_add_into(T* dst, const T* src, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = dst[i] + src[i];
}

// dst[i] = src[i] (a device-to-device copy a graph can capture).
template <typename T>
__global__ void fg_copy_into(T* dst, const T* src, long long n)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = src[i];
}

// dst[i] = src[i] when flag[0] != 0, else dst is left alone: a select on a
// decision that stays in device memory (an update's skip flag).
template <typename T>
__global__ void fg_copy_if(T* dst, const T* src, const double* flag, long long n)
{
    if (flag[0] == 0.0) return;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = src[i];
}

// Rows of src gathered into dst: dst[r, :] = src[idx[r], :] for r < n_idx,
// rows of row_len elements.  An index outside [0, n_src) leaves its row of
// dst alone (never a read out of bounds; the host checks its orders).
template <typename T>
__global__ void fg_gather_rows(const T* src, const long long* idx, T* dst, long long n_idx,
                               long long row_len, long long n_src)
{
    const long long n = n_idx * row_len;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long r = e / row_len;
        const long long s = idx[r];
        if (s >= 0 && s < n_src) dst[e] = src[s * row_len + (e - r * row_len)];
    }
}

#ifndef __CUDACC_RTC__
// nvcc compile check only (.ci/run): the loader's name_expressions (_module.py).
#define FG_INST(T)                                                                       \
    template __global__ void fg_add_into<T>(T*, const T*, long long);                   \
    template __global__ void fg_copy_into<T>(T*, const T*, long long);                  \
    template __global__ void fg_copy_if<T>(T*, const T*, const double*, long long);     \
    template __global__ void fg_gather_rows<T>(const T*, const long long*, T*, long long, \
                                               long long, long long);
FG_INST(float)
FG_INST(double)
FG_INST(long long)
FG_INST(int)
#endif
