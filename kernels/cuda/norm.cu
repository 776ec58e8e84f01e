// LayerNorm and BatchNorm1d inside the dense layer: twins of kernels/cpu/norm.py.
//
// forward, after the GEMM y = x @ W (cuBLAS):
//   pass A  the statistics of t = y + b, in float64, shifted by the first
//           value of each row (layer norm) or column (batch norm) so that
//           the one-pass variance does not cancel; read-only on y:
//             layer norm         fg_layer_stats, one block per row;
//             batch norm, train  fg_batch_stats_partial (column tiles,
//                                blocks.cuh) + fg_batch_stats (one thread a
//                                column: statistics and running statistics);
//             batch norm, eval   fg_batch_eval_stats (the running statistics).
//   pass B  fg_norm_fwd: xhat = (t - mean) * rstd, u = gamma xhat + beta,
//           f(u), dropout and residual as in blocks.cu, in place on y.
// backward:
//   pass 1  fg_norm_grad_unit: t = da * mask * scale * f'(f, u) into dz
//           (u recomputed from xhat), with the column sums dgamma, dbeta;
//           layer norm adds the row sums r1, r2 (fg_layer_grad_rows);
//   pass 2  fg_norm_grad_input: dz through the normalisation, in place,
//           with the Linear's bias gradient db.
// Every sum is float64 in a fixed order (block trees, then partials in
// order): no atomics, the same bits on every run.  Nothing leaves the device.
#include "common.cuh"
#include "activation.cuh"
#include "blocks.cuh"

namespace fg {

// Norm kinds: kernels/spec.py NO_NORM, LAYER, BATCH.
enum { NO_NORM = 0, LAYER = 1, BATCH = 2 };

// Mean and biased variance of ``count`` values from the sums of their
// shifted copies d = t - shift: the CPU's formulas, var clamped at 0.
__device__ __forceinline__ void moments(double s, double s2, long long count, double shift,
                                        double& mu, double& var)
{
    const double m = s / (double)count;
    var = pymax(s2 / (double)count - m * m, 0.0);
    mu = shift + m;
}

}  // namespace fg

// Layer norm statistics of row blockIdx.x of t = y + b.  blockDim.x ==
// fg::RED_THREADS (block_sum's tree).
template <typename T>
__global__ void fg_layer_stats(const T* y, const T* b, T* mean, T* rstd, long long cols, double eps)
{
    __shared__ double sh1[fg::RED_THREADS], sh2[fg::RED_THREADS];
    const long long i = blockIdx.x;
    const T* row = y + i * cols;
    const T shift = row[0] + b[0];
    double s = 0.0, s2 = 0.0;
    for (long long j = threadIdx.x; j < cols; j += fg::RED_THREADS) {
        const T d = (row[j] + b[j]) - shift;          // in the dtype, as the CPU
        s += (double)d;
        s2 += (double)(d * d);
    }
    s = fg::block_sum(s, sh1);
    s2 = fg::block_sum(s2, sh2);
    if (threadIdx.x != 0) return;
    double mu, var;
    fg::moments(s, s2, cols, (double)shift, mu, var);
    mean[i] = T(mu);
    rstd[i] = T(1.0 / sqrt(var + eps));
}

// Batch norm, training: per column tile, the sums of d = t - t[0, j] and d^2
// into part[0] and part[1] (each gridDim.y x cols, see blocks.cuh).
template <typename T>
__global__ void fg_batch_stats_partial(const T* y, const T* b, double* part, long long rows,
                                       long long cols)
{
    __shared__ double sh1[fg::TILE_ROWS][fg::TILE_COLS + 1];
    __shared__ double sh2[fg::TILE_ROWS][fg::TILE_COLS + 1];
    const fg::ColTile tile = fg::col_tile(rows);
    double s = 0.0, s2 = 0.0;
    if (tile.j < cols) {
        const T bj = b[tile.j];
        const double shift = (double)(y[tile.j] + bj);
        for (long long r = tile.r0 + threadIdx.y; r < tile.r1; r += fg::TILE_ROWS) {
            const double d = (double)(y[r * cols + tile.j] + bj) - shift;
            s += d;
            s2 += d * d;
        }
    }
    const double ts = fg::tile_col_sum(s, sh1);
    const double ts2 = fg::tile_col_sum(s2, sh2);
    if (threadIdx.y != 0 || tile.j >= cols) return;
    part[(long long)blockIdx.y * cols + tile.j] = ts;
    part[((long long)gridDim.y + blockIdx.y) * cols + tile.j] = ts2;
}

// Batch norm, training: column j's statistics from nblk row-block partials,
// and the running statistics (momentum, unbiased variance, as PyTorch).
template <typename T>
__global__ void fg_batch_stats(const double* part, long long nblk, const T* y, const T* b, T* mean,
                               T* rstd, double* run_mean, double* run_var, long long rows,
                               long long cols, double eps, double momentum)
{
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    const double s = fg::sum_partials(part, nblk, cols, j);
    const double s2 = fg::sum_partials(part + nblk * cols, nblk, cols, j);
    double mu, var;
    fg::moments(s, s2, rows, (double)(y[j] + b[j]), mu, var);
    mean[j] = T(mu);
    rstd[j] = T(1.0 / sqrt(var + eps));
    run_mean[j] = (1.0 - momentum) * run_mean[j] + momentum * mu;
    run_var[j] = (1.0 - momentum) * run_var[j]
                 + momentum * (var * (double)rows / (double)(rows - 1));
}

// Batch norm, eval: normalise with the running statistics (left untouched).
template <typename T>
__global__ void fg_batch_eval_stats(const double* run_mean, const double* run_var, T* mean, T* rstd,
                                    long long cols, double eps)
{
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    mean[j] = T(run_mean[j]);
    rstd[j] = T(1.0 / sqrt(run_var[j] + eps));
}

// Pass B, grid-stride over rows * cols, in place on y.  mean/rstd are per
// row (layer norm) or per column (batch norm); fz is written for a residual
// block only (as in blocks.cu).
template <typename T, int ACT>
__global__ void fg_norm_fwd(T* y, const T* b, const T* x, T* xhat, T* fz, const T* gamma,
                            const T* beta, const T* mean, const T* rstd, long long rows,
                            long long cols, int per_row, double alpha, int drop,
                            unsigned long long key, const long long* counter,
                            unsigned long long thresh, double scale, int residual)
{
    key = fg::step_key(key, counter);
    const long long n = rows * cols;
    const T al = T(alpha), sc = T(scale);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const long long i = e / cols, j = e - i * cols;
        const long long st = per_row ? i : j;
        const T xh = (y[e] + b[j] - mean[st]) * rstd[st];
        xhat[e] = xh;
        const T v = fg::act_fwd<T, ACT>(gamma[j] * xh + beta[j], al);
        if (residual) fz[e] = v;
        y[e] = fg::drop_residual(v, x, e, drop != 0, key, thresh, sc, residual != 0);
    }
}

// Pass 1: t = g * f'(f, u) into dz (dz may be da), with the column sums
// dgamma = sum t xhat and dbeta = sum t (into part[0], part[1] when the rows
// span several row blocks).  u = gamma xhat + beta is recomputed (the same
// bits as the forward's) for the needs-z activations only.
template <typename T, int ACT>
__global__ void fg_norm_grad_unit(const T* da, const T* fz, const T* xhat, const T* gamma,
                                  const T* beta, T* dz, double* part, T* dgamma, T* dbeta,
                                  long long rows, long long cols, double alpha, int drop,
                                  unsigned long long key, const long long* counter,
                                  unsigned long long thresh, double scale, int residual)
{
    key = fg::step_key(key, counter);
    __shared__ double shg[fg::TILE_ROWS][fg::TILE_COLS + 1];
    __shared__ double shb[fg::TILE_ROWS][fg::TILE_COLS + 1];
    const T al = T(alpha), sc = T(scale), inv = T(1.0 / scale);
    const fg::ColTile tile = fg::col_tile(rows);
    double sg = 0.0, sb = 0.0;
    if (tile.j < cols) {
        const T gj = gamma[tile.j], bj = beta[tile.j];
        for (long long r = tile.r0 + threadIdx.y; r < tile.r1; r += fg::TILE_ROWS) {
            const long long e = r * cols + tile.j;
            const T xh = xhat[e];
            T g, f, t = T(0);
            if (fg::drop_grad(da[e], fz[e], e, drop != 0, key, thresh, sc, inv, residual != 0,
                              g, f))
                t = g * fg::act_deriv<T, ACT>(f, fg::act_needs_z<ACT>() ? gj * xh + bj : T(0),
                                              al);
            dz[e] = t;
            sg += (double)(t * xh);
            sb += (double)t;
        }
    }
    fg::store_col_sum(sg, shg, part, 0, dgamma, cols, tile.j);
    fg::store_col_sum(sb, shb, part, 1, dbeta, cols, tile.j);
}

// Layer norm, pass 1's row sums over row blockIdx.x of t (in dz):
// r1 = sum t gamma, r2 = sum t gamma xhat.  blockDim.x == fg::RED_THREADS.
template <typename T>
__global__ void fg_layer_grad_rows(const T* dz, const T* xhat, const T* gamma, double* r1,
                                   double* r2, long long cols)
{
    __shared__ double sh1[fg::RED_THREADS], sh2[fg::RED_THREADS];
    const long long i = blockIdx.x;
    double s1 = 0.0, s2 = 0.0;
    for (long long j = threadIdx.x; j < cols; j += fg::RED_THREADS) {
        const T gx = dz[i * cols + j] * gamma[j];
        s1 += (double)gx;
        s2 += (double)(gx * xhat[i * cols + j]);
    }
    s1 = fg::block_sum(s1, sh1);
    s2 = fg::block_sum(s2, sh2);
    if (threadIdx.x == 0) {
        r1[i] = s1;
        r2[i] = s2;
    }
}

// Pass 2, in place on dz (holding pass 1's t): the gradient through the
// normalisation, in the dtype with the CPU's factors (layer norm's row means
// r1/n, r2/n and batch norm's 1/B rounded to the dtype once), and the column
// sums db.  rstd is per row for layer norm, per column for batch norm.
template <typename T>
__global__ void fg_norm_grad_input(T* dz, const T* xhat, const T* gamma, const T* rstd,
                                   const T* dgamma, const T* dbeta, const double* r1,
                                   const double* r2, double* part, T* db, long long rows,
                                   long long cols, int kind, int batch_stats)
{
    __shared__ double sh[fg::TILE_ROWS][fg::TILE_COLS + 1];
    const fg::ColTile tile = fg::col_tile(rows);
    double s = 0.0;
    if (tile.j < cols) {
        const long long j = tile.j;
        const T gj = gamma[j];
        const T inv_b = T(1.0 / (double)rows);
        for (long long r = tile.r0 + threadIdx.y; r < tile.r1; r += fg::TILE_ROWS) {
            const long long e = r * cols + j;
            const T t = dz[e], xh = xhat[e];
            T w;
            if (kind == fg::LAYER) {
                // rstd (dxhat - mean_j dxhat - xhat mean_j(dxhat xhat))
                const T c1 = T(r1[r] / (double)cols), c2 = T(r2[r] / (double)cols);
                w = rstd[r] * (gj * t - (c1 + xh * c2));
            } else if (batch_stats) {
                // per column: sum_i dxhat = gamma dbeta, sum_i dxhat xhat = gamma dgamma
                w = rstd[j] * gj * (t - (dbeta[j] + xh * dgamma[j]) * inv_b);
            } else {
                w = rstd[j] * gj * t;
            }
            dz[e] = w;
            s += (double)w;
        }
    }
    fg::store_col_sum(s, sh, part, 0, db, cols, tile.j);
}

#ifndef __CUDACC_RTC__
// nvcc compile check only (.ci/run): the loader's name_expressions (_module.py).
#define FG_INST_ACT(T, A)                                                                      \
    template __global__ void fg_norm_fwd<T, A>(T*, const T*, const T*, T*, T*, const T*,       \
                                               const T*, const T*, const T*, long long,        \
                                               long long, int, double, int,                    \
                                               unsigned long long, const long long*,           \
                                               unsigned long long, double, int);               \
    template __global__ void fg_norm_grad_unit<T, A>(const T*, const T*, const T*, const T*,   \
                                                     const T*, T*, double*, T*, T*, long long, \
                                                     long long, double, int,                   \
                                                     unsigned long long, const long long*,     \
                                                     unsigned long long, double, int);
#define FG_INST_ALL(T)                                                                         \
    FG_EACH_ACTIVATION(FG_INST_ACT, T)                                            \
    template __global__ void fg_layer_stats<T>(const T*, const T*, T*, T*, long long, double); \
    template __global__ void fg_batch_stats_partial<T>(const T*, const T*, double*, long long, \
                                                       long long);                             \
    template __global__ void fg_batch_stats<T>(const double*, long long, const T*, const T*,   \
                                               T*, T*, double*, double*, long long, long long, \
                                               double, double);                                \
    template __global__ void fg_batch_eval_stats<T>(const double*, const double*, T*, T*,      \
                                                    long long, double);                        \
    template __global__ void fg_layer_grad_rows<T>(const T*, const T*, const T*, double*,      \
                                                   double*, long long);                        \
    template __global__ void fg_norm_grad_input<T>(T*, const T*, const T*, const T*, const T*, \
                                                   const T*, const double*, const double*,     \
                                                   double*, T*, long long, long long, int,     \
                                                   int);                                       \
    template __global__ void fg_colsum_cast<T>(const double*, long long, long long, T*);
FG_INST_ALL(float)
FG_INST_ALL(double)
#endif
