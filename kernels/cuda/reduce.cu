// Squared norms of a flat gradient, per layer segment and global: pass 1 of
// every clipped update (twin of kernels/cpu/reduce.py).
//
// Accumulation is float64 whatever the gradient's dtype, as on the CPU (one
// FMA-free multiply-add per element loaded: memory bound even where float64
// runs at 1/64 rate).  Deterministic two-level reduction, no atomics:
//   fg_seg_sumsq_partial  grid (gx, n_layers): block (bx, l) sums elements
//                         [offsets[l] + bx*CHUNK, +CHUNK) of layer l (each
//                         thread in order, then the block tree) into
//                         partial[l * gx + bx]; gx = the largest layer's
//                         chunk count (blocks past a layer's end write 0).
//   fg_seg_sumsq_final    one block: layer_sq[l] = fixed-order sum of its
//                         partials; total[0] = sum of layer_sq in layer order.
// The result depends on the layout (offsets) only, never on the launch order.
#include "common.cuh"

template <typename T>
__global__ void fg_seg_sumsq_partial(const T* g, const long long* offsets, double* partial)
{
    __shared__ double sh[fg::RED_THREADS];
    const int l = blockIdx.y;
    const double tot = fg::chunk_sumsq(g, offsets[l] + (long long)blockIdx.x * FG_SUMSQ_CHUNK,
                                       offsets[l + 1], sh);
    if (threadIdx.x == 0) partial[(long long)l * gridDim.x + blockIdx.x] = tot;
}

// T is a dummy (double) so that NVRTC names every kernel the same way.
template <typename T>
__global__ void fg_seg_sumsq_final(const T* partial, long long gx, long long n_layers,
                                   T* layer_sq, T* total)
{
    __shared__ double sh[fg::RED_THREADS];
    double run = 0.0;
    for (long long l = 0; l < n_layers; ++l) {
        double acc = 0.0;
        for (long long b = threadIdx.x; b < gx; b += fg::RED_THREADS) acc += partial[l * gx + b];
        const double s = fg::block_sum(acc, sh);
        __syncthreads();                   // sh is reused by the next layer
        run += s;
        if (threadIdx.x == 0) layer_sq[l] = s;
    }
    if (threadIdx.x == 0) total[0] = run;
}

#ifndef __CUDACC_RTC__
template __global__ void fg_seg_sumsq_partial<float>(const float*, const long long*, double*);
template __global__ void fg_seg_sumsq_partial<double>(const double*, const long long*, double*);
template __global__ void fg_seg_sumsq_final<double>(const double*, long long, long long, double*,
                                                    double*);
#endif
