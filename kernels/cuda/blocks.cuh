// Device helpers shared by the epilogue kernels (blocks.cu, norm.cu,
// wnorm.cu): the counter-based dropout mask, the dropout/residual tail of a
// forward unit and the dropout head of its backward, and the deterministic
// column sums over (32 x 8)-thread tiles.
#ifndef FASTGRAD_BLOCKS_CUH
#define FASTGRAD_BLOCKS_CUH

#include "common.cuh"

namespace fg {

// --- dropout mask: twin of kernels/cpu/blocks.py _keep ------------------------------
//
// Element e of the mask keyed ``key`` draws splitmix64's finalizer of
// key + (e + 1) * golden (uint64 wrap-around, as on the CPU) and keeps the
// unit iff its top 53 bits are >= thresh = ceil(p * 2^53).  Integers only,
// so the GPU draws the CPU's mask bit for bit.

constexpr unsigned long long GOLDEN = 0x9E3779B97F4A7C15ull;

__device__ __forceinline__ unsigned long long splitmix_fin(unsigned long long z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ bool keep(unsigned long long key, long long e, unsigned long long thresh)
{
    return (splitmix_fin(key + ((unsigned long long)e + 1ull) * GOLDEN) >> 11) >= thresh;
}

// The key of a mask whose dropout step lives in device memory (a fused step:
// the step advances only when its update is applied, which the host does not
// know yet): ``key`` is then the layer's key (kernels/spec.py
// dropout_layer_key) and the step's key is derived from ``*counter`` as the
// CPU's dropout_key derives it.  A null ``counter`` keeps ``key``, a step key
// passed by value.
__device__ __forceinline__ unsigned long long step_key(unsigned long long key,
                                                       const long long* counter)
{
    return counter ? splitmix_fin((key ^ (unsigned long long)*counter) + GOLDEN) : key;
}

// The tail of a forward unit after the activation: v * scale or 0 (dropout),
// then + x[e] (residual).  ``scale`` is already the dtype's, as the CPU's
// like(v, scale).
template <typename T>
__device__ __forceinline__ T drop_residual(T v, const T* x, long long e, bool drop,
                                           unsigned long long key, unsigned long long thresh,
                                           T scale, bool residual)
{
    if (drop) v = keep(key, e, thresh) ? v * scale : T(0);
    if (residual) v = v + x[e];
    return v;
}

// The head of a backward unit: false for a dropped unit (its dz is 0);
// otherwise g = da (times scale under dropout) and f = the activation's
// output.  A residual block kept f(z) in fz; any other layer's fz is its
// output y, i.e. f * scale where dropout kept the unit, so f = fz * inv_scale
// (inv_scale = 1/scale rounded once in float64, then cast to the dtype).
template <typename T>
__device__ __forceinline__ bool drop_grad(T da, T fz, long long e, bool drop,
                                          unsigned long long key, unsigned long long thresh,
                                          T scale, T inv_scale, bool residual, T& g, T& f)
{
    g = da;
    f = fz;
    if (!drop) return true;
    if (!keep(key, e, thresh)) return false;
    g = da * scale;
    if (!residual) f = fz * inv_scale;
    return true;
}

// --- deterministic column sums --------------------------------------------------------
//
// A column-sum pass runs on blocks of (TILE_COLS, TILE_ROWS) threads over a
// grid (ceil(cols / TILE_COLS), ceil(rows / COL_ROWS)): block (bx, by) owns
// 32 columns of rows [by * COL_ROWS, (by + 1) * COL_ROWS).  Each thread adds
// its rows in order (float64), the 8 row-threads meet in a fixed tree, and
// the block writes one float64 partial per column and sum; a second launch
// adds the row blocks' partials in order (sum_partials).  One row block
// writes the result itself.  The grid depends on the shape only, so a
// shape's sums are the same bits on every run and every GPU; no atomics.

constexpr int TILE_COLS = 32;
constexpr int TILE_ROWS = 8;
constexpr int COL_ROWS = 64;          // kernels/cuda/_module.py COL_ROWS

// Sum of one double per thread over the TILE_ROWS threads of a column, in a
// fixed tree.  Every thread of the block must call it (it syncs); the total
// is returned to the threads with threadIdx.y == 0 (0 elsewhere).  ``sh``
// is this call's own shared array: two sums in one kernel take two arrays.
__device__ __forceinline__ double tile_col_sum(double s, double (*sh)[TILE_COLS + 1])
{
    sh[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    for (int h = TILE_ROWS / 2; h > 0; h >>= 1) {
        if ((int)threadIdx.y < h) sh[threadIdx.y][threadIdx.x] += sh[threadIdx.y + h][threadIdx.x];
        __syncthreads();
    }
    return threadIdx.y == 0 ? sh[0][threadIdx.x] : 0.0;
}

// This tile's rows [r0, r1) and column j.
struct ColTile {
    long long j, r0, r1;
};

__device__ __forceinline__ ColTile col_tile(long long rows)
{
    ColTile t;
    t.j = (long long)blockIdx.x * TILE_COLS + threadIdx.x;
    t.r0 = (long long)blockIdx.y * COL_ROWS;
    t.r1 = t.r0 + COL_ROWS < rows ? t.r0 + COL_ROWS : rows;
    return t;
}

// Sum number ``slot`` of this tile (every thread calls; see tile_col_sum):
// into out[j] (cast to the dtype) when one row block covers the rows, else
// into part[(slot * gridDim.y + blockIdx.y) * cols + j] for sum_partials.
template <typename T>
__device__ __forceinline__ void store_col_sum(double s, double (*sh)[TILE_COLS + 1], double* part,
                                              int slot, T* out, long long cols, long long j)
{
    const double tot = tile_col_sum(s, sh);
    if (threadIdx.y != 0 || j >= cols) return;
    if (gridDim.y == 1) out[j] = T(tot);
    else part[((long long)slot * gridDim.y + blockIdx.y) * cols + j] = tot;
}

// Column j of nrows row-block partials (row-major, ``cols`` wide), in order.
__device__ __forceinline__ double sum_partials(const double* part, long long nrows, long long cols,
                                               long long j)
{
    double s = part[j];
    for (long long r = 1; r < nrows; ++r) s += part[r * cols + j];
    return s;
}

}  // namespace fg

// out[j] = the sum of nrows partials of column j, cast to the dtype (one
// thread a column): the second launch of a multi-block column sum.
template <typename T>
__global__ void fg_colsum_cast(const double* part, long long nrows, long long cols, T* out)
{
    const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < cols) out[j] = T(fg::sum_partials(part, nrows, cols, j));
}

#endif  // FASTGRAD_BLOCKS_CUH
