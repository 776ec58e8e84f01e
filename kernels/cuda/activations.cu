// Activation epilogues: bias + activation forward, and dz = da * f' with the
// bias gradient.  Twins of kernels/cpu/activations.py; the activation is a
// template parameter (one instantiation per code and dtype), so each kernel
// body is branch-free in the activation.
//
// The scalar functions are the CPU's formulas operation by operation, with
// CUDA's precise libm in place of the CPU's float32 polynomials (see
// common.cuh): float32 results agree with the CPU to ~1e-6 relative.
#include "common.cuh"
#include "activation.cuh"

// t = z + b (row-broadcast; + 0 when b is null, as the CPU's
// activation_forward), zout = t when zout is non-null, out = f(t).
// In place: out == z and zout null.  Grid-stride over rows * cols.
template <typename T, int ACT>
__global__ void fg_bias_act(const T* z, const T* b, T* zout, T* out,
                            long long rows, long long cols, double alpha)
{
    const long long n = rows * cols;
    const T al = T(alpha);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T t = z[i] + (b != nullptr ? b[i % cols] : T(0));
        if (zout != nullptr) zout[i] = t;
        out[i] = fg::act_fwd<T, ACT>(t, al);
    }
}

// Rows per block of the bias-gradient pass; block = (32 columns, 8 rows).
#define FG_GRAD_ROWS 64

// dz = da * f'(a, z) (dz may be da) and, when dbp is non-null, the column
// sums of dz over each block of FG_GRAD_ROWS rows: row block r into
// dbp[r * cols + j] (the bias gradient itself when the rows make one row
// block, else partial sums that fg_colsum adds in row-block order).  Each
// thread sums its rows in order and the 8 row-threads meet in a fixed tree:
// deterministic, no atomics, whatever the grid.  Grid-stride over the row
// blocks in y (gridDim.y may be smaller than their number: CUDA caps it at
// 65535); the loop bounds depend on blockIdx.y only, so every thread of a
// block reaches the same barriers.
template <typename T, int ACT>
__global__ void fg_bias_act_grad(const T* da, const T* a, const T* z, T* dz, T* dbp,
                                 long long rows, long long cols, double alpha)
{
    __shared__ T sh[8][33];
    const T al = T(alpha);
    const long long j = (long long)blockIdx.x * 32 + threadIdx.x;
    const long long n_row_blocks = (rows + FG_GRAD_ROWS - 1) / FG_GRAD_ROWS;
    for (long long by = blockIdx.y; by < n_row_blocks; by += gridDim.y) {
        const long long r0 = by * FG_GRAD_ROWS;
        const long long r1 = r0 + FG_GRAD_ROWS < rows ? r0 + FG_GRAD_ROWS : rows;
        T s = T(0);
        if (j < cols) {
            for (long long r = r0 + threadIdx.y; r < r1; r += 8) {
                const long long i = r * cols + j;
                const T g = da[i] * fg::act_deriv<T, ACT>(a[i], z[i], al);
                dz[i] = g;
                s += g;
            }
        }
        if (dbp == nullptr) continue;  // uniform over the grid
        sh[threadIdx.y][threadIdx.x] = s;
        __syncthreads();
        for (int h = 4; h > 0; h >>= 1) {
            if ((int)threadIdx.y < h) sh[threadIdx.y][threadIdx.x] += sh[threadIdx.y + h][threadIdx.x];
            __syncthreads();
        }
        // No barrier before the next row block: after the tree's last one only
        // thread (x, 0) reads sh[0][x], and it alone writes it next.
        if (threadIdx.y == 0 && j < cols) dbp[by * cols + j] = sh[0][threadIdx.x];
    }
}

// out[j] = sum over r of part[r * cols + j], r in order (one thread a column).
template <typename T>
__global__ void fg_colsum(const T* part, T* out, long long nrows, long long cols)
{
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    T s = part[j];
    for (long long r = 1; r < nrows; ++r) s += part[r * cols + j];
    out[j] = s;
}

#ifndef __CUDACC_RTC__
// nvcc compile check only (.ci/run): instantiate every kernel the Python
// loader names, so that nvcc --ptx type-checks each body.  NVRTC builds the
// same list from name_expressions instead.
#define FG_INST_ACT(T, A)                                                                        \
    template __global__ void fg_bias_act<T, A>(const T*, const T*, T*, T*, long long, long long, \
                                               double);                                          \
    template __global__ void fg_bias_act_grad<T, A>(const T*, const T*, const T*, T*, T*,        \
                                                    long long, long long, double);
#define FG_INST_ALL(T)                                                            \
    FG_EACH_ACTIVATION(FG_INST_ACT, T)                                            \
    template __global__ void fg_colsum<T>(const T*, T*, long long, long long);
FG_INST_ALL(float)
FG_INST_ALL(double)
#endif
