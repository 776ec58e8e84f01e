// Residual blocks and inverted dropout: twins of kernels/cpu/blocks.py.
//
// forward:  after the GEMM y = x @ W (cuBLAS), ONE pass in place on y:
//           t = y + b, z = t (needs-z activations only), v = f(t), fz = v (residual only),
//           v = mask ? v * scale : 0 (dropout), v += x (residual), y = v.
// backward: ONE pass dz = da * mask * scale * f'(f, z) with the bias
//           gradient's column sums (blocks.cuh: deterministic, no atomics);
//           the mask is regenerated from its key, never stored.
// The activation is a template parameter; dropout and residual are run-time
// flags (uniform over the grid, so the branches cost no divergence).
#include "common.cuh"
#include "activation.cuh"
#include "blocks.cuh"

// out[e] = 1 where the mask keyed ``key`` keeps element e, else 0.
template <typename T>
__global__ void fg_dropout_mask(T* out, long long n, unsigned long long key,
                                unsigned long long thresh)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride)
        out[e] = fg::keep(key, e, thresh) ? T(1) : T(0);
}

// The forward epilogue, grid-stride over rows * cols.  z is written for
// the needs-z activations only (the derivatives that read it) and fz for a residual block
// only (any other layer's backward reads f back from y, which fz may be).
template <typename T, int ACT>
__global__ void fg_block_fwd(T* y, const T* b, const T* x, T* z, T* fz, long long rows,
                             long long cols, double alpha, int drop, unsigned long long key,
                             const long long* counter, unsigned long long thresh, double scale,
                             int residual)
{
    key = fg::step_key(key, counter);
    const long long n = rows * cols;
    const T al = T(alpha), sc = T(scale);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
        const T t = y[e] + b[e % cols];
        if (fg::act_needs_z<ACT>()) z[e] = t;
        const T v = fg::act_fwd<T, ACT>(t, al);
        if (residual) fz[e] = v;
        y[e] = fg::drop_residual(v, x, e, drop != 0, key, thresh, sc, residual != 0);
    }
}

// The backward epilogue: dz = g * f'(f, z) (0 where dropped; dz may be da)
// and the column sums of dz into db, or into part for fg_colsum_cast when
// the rows span several row blocks.  Block (TILE_COLS, TILE_ROWS), grid as
// blocks.cuh describes.
template <typename T, int ACT>
__global__ void fg_block_grad(const T* da, const T* fz, const T* z, T* dz, double* part, T* db,
                              long long rows, long long cols, double alpha, int drop,
                              unsigned long long key, const long long* counter,
                              unsigned long long thresh, double scale, int residual)
{
    key = fg::step_key(key, counter);
    __shared__ double sh[fg::TILE_ROWS][fg::TILE_COLS + 1];
    const T al = T(alpha), sc = T(scale), inv = T(1.0 / scale);
    const fg::ColTile tile = fg::col_tile(rows);
    double s = 0.0;
    if (tile.j < cols) {
        for (long long r = tile.r0 + threadIdx.y; r < tile.r1; r += fg::TILE_ROWS) {
            const long long e = r * cols + tile.j;
            T g, f, t = T(0);
            if (fg::drop_grad(da[e], fz[e], e, drop != 0, key, thresh, sc, inv, residual != 0,
                              g, f))
                t = g * fg::act_deriv<T, ACT>(f, fg::act_needs_z<ACT>() ? z[e] : T(0), al);
            dz[e] = t;
            s += (double)t;
        }
    }
    fg::store_col_sum(s, sh, part, 0, db, cols, tile.j);
}

// What a fused training step (kernels/cuda/step_blocks.py) changes outside
// the parameters, settled by its update's skip decision ctl[CTL_SKIP] on the
// device: an applied update advances the dropout step ``*counter`` (null:
// none kept), a skipped one puts back the batch-norm running statistics
// saved before the forward (n = 0: none).  One thread an element.
__global__ void fg_commit_forward(const double* ctl, long long* counter, double* run_mean,
                                  double* run_var, const double* saved_mean,
                                  const double* saved_var, long long n)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const bool skipped = ctl[fg::CTL_SKIP] != 0.0;
    if (i == 0 && counter && !skipped) *counter += 1;
    if (i < n && skipped) {
        run_mean[i] = saved_mean[i];
        run_var[i] = saved_var[i];
    }
}

#ifndef __CUDACC_RTC__
// nvcc compile check only (.ci/run): instantiate every kernel the Python
// loader names (_module.py), so that nvcc --ptx type-checks each body.
#define FG_INST_ACT(T, A)                                                                     \
    template __global__ void fg_block_fwd<T, A>(T*, const T*, const T*, T*, T*, long long,    \
                                                long long, double, int, unsigned long long,   \
                                                const long long*, unsigned long long, double, \
                                                int);                                         \
    template __global__ void fg_block_grad<T, A>(const T*, const T*, const T*, T*, double*,   \
                                                 T*, long long, long long, double, int,       \
                                                 unsigned long long, const long long*,        \
                                                 unsigned long long, double, int);
#define FG_INST_ALL(T)                                                                        \
    FG_EACH_ACTIVATION(FG_INST_ACT, T)                                            \
    template __global__ void fg_dropout_mask<T>(T*, long long, unsigned long long,            \
                                                unsigned long long);                          \
    template __global__ void fg_colsum_cast<T>(const double*, long long, long long, T*);
FG_INST_ALL(float)
FG_INST_ALL(double)
#endif
