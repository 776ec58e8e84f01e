// Weight normalisation (Salimans & Kingma 2016), W = g v / ||v|| per column
// of the (n_in, n_out) weight: twin of kernels/cpu/wnorm.py.
//
// forward:  fg_coldot_partial (sum of v^2 per column, column tiles as in
//           blocks.cuh), fg_wn_inv_norm (1/||v_j||, float64), fg_wn_apply
//           (W = v * (g_j / ||v_j||)).
// backward: fg_coldot_partial (sum of dW v per column), fg_wn_dg
//           (dg_j = inv_norm_j * sum), fg_wn_grad
//           (dv = a_j dW - (a_j dg_j inv_norm_j) v with a_j = g_j inv_norm_j).
// Sums are float64 in a fixed order; the elementwise passes promote to
// float64 exactly where the CPU's expressions do (inv_norm is float64).
#include "common.cuh"
#include "blocks.cuh"

// part[blockIdx.y * cols + j] = the sum of a[i, j] * b[i, j] over this
// tile's rows, in float64 (the products rounded in the dtype, as the CPU).
template <typename T>
__global__ void fg_coldot_partial(const T* a, const T* b, double* part, long long rows,
                                  long long cols)
{
    __shared__ double sh[fg::TILE_ROWS][fg::TILE_COLS + 1];
    const fg::ColTile tile = fg::col_tile(rows);
    double s = 0.0;
    if (tile.j < cols) {
        for (long long r = tile.r0 + threadIdx.y; r < tile.r1; r += fg::TILE_ROWS) {
            const long long e = r * cols + tile.j;
            s += (double)(a[e] * b[e]);
        }
    }
    const double tot = fg::tile_col_sum(s, sh);
    if (threadIdx.y == 0 && tile.j < cols) part[(long long)blockIdx.y * cols + tile.j] = tot;
}

// inv_norm[j] = 1 / sqrt(sum of column j's partials).  T is a dummy
// (double) so that NVRTC names it like the rest.
template <typename T>
__global__ void fg_wn_inv_norm(const T* part, long long nblk, long long cols, T* inv_norm)
{
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < cols) inv_norm[j] = 1.0 / sqrt(fg::sum_partials(part, nblk, cols, j));
}

// dg[j] = inv_norm[j] * (sum of column j's partials of dW v).
template <typename T>
__global__ void fg_wn_dg(const double* part, long long nblk, long long cols,
                         const double* inv_norm, T* dg)
{
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < cols) dg[j] = T(fg::sum_partials(part, nblk, cols, j) * inv_norm[j]);
}

// W = v * (g_j * inv_norm_j), grid-stride over n = rows * cols.
template <typename T>
__global__ void fg_wn_apply(const T* v, const T* g, const double* inv_norm, T* W, long long n,
                            long long cols)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long j = e % cols;
        W[e] = T((double)v[e] * ((double)g[j] * inv_norm[j]));
    }
}

// dv = a dW - (a dg inv_norm) v, a = g_j inv_norm_j (dg already final).
template <typename T>
__global__ void fg_wn_grad(const T* v, const T* g, const double* inv_norm, const T* dW,
                           const T* dg, T* dv, long long n, long long cols)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long j = e % cols;
        const double a = (double)g[j] * inv_norm[j];
        dv[e] = T(a * (double)dW[e] - (a * (double)dg[j] * inv_norm[j]) * (double)v[e]);
    }
}

#ifndef __CUDACC_RTC__
// nvcc compile check only (.ci/run): the loader's name_expressions (_module.py).
#define FG_INST(T)                                                                              \
    template __global__ void fg_coldot_partial<T>(const T*, const T*, double*, long long,      \
                                                  long long);                                  \
    template __global__ void fg_wn_dg<T>(const double*, long long, long long, const double*,   \
                                         T*);                                                  \
    template __global__ void fg_wn_apply<T>(const T*, const T*, const double*, T*, long long,  \
                                            long long);                                        \
    template __global__ void fg_wn_grad<T>(const T*, const T*, const double*, const T*,        \
                                           const T*, T*, long long, long long);
FG_INST(float)
FG_INST(double)
template __global__ void fg_wn_inv_norm<double>(const double*, long long, long long, double*);
#endif
