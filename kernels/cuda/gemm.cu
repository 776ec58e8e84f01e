// fastgrad's own GEMM, for training steps captured in a CUDA graph.
//
// CuPy refuses cuBLAS while a stream is capturing (cupy/cupy#6290: its
// cuBLAS binding raises NotImplementedError), so a step whose GEMMs go
// through cupy.matmul cannot become a graph.  This kernel can.  It is a
// plain shared-memory tiled GEMM, meant for the small widths where a step
// is bound by launches, not for peak FLOP/s (cuBLAS stays the GEMM of the
// eager step).  Row-major C = op(A) op(B) with op(A) = A or A^T (TA), op(B)
// = B or B^T (TB): the step needs h W, h^T dz and dz W^T.  A block computes
// a 64 x 64 tile of C with 256 threads, 4 x 4 results per thread, stepping
// through K in slices of 16 staged in shared memory; past 65535 row tiles
// it strides down its column of tiles (grid y is capped).  Products
// accumulate in T in increasing k: the same inputs give the same bits.
#include "common.cuh"

namespace fg {
constexpr int GEMM_M = 64, GEMM_N = 64, GEMM_K = 16, GEMM_THREADS = 256;
}

template <typename T, int TA, int TB>
__global__ void fg_gemm(const T* A, const T* B, T* C, long long M, long long N, long long K,
                        long long lda, long long ldb, long long ldc)
{
    using namespace fg;
    __shared__ T As[GEMM_K][GEMM_M + 1];        // As[k][i] = op(A)[i0 + i][k0 + k]
    __shared__ T Bs[GEMM_K][GEMM_N + 1];        // Bs[k][j] = op(B)[k0 + k][j0 + j]
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    const long long j0 = (long long)blockIdx.x * GEMM_N;
    // Grid-stride over the row tiles in y (CUDA caps gridDim.y at 65535, so
    // M can need more tiles than the grid has rows of blocks).  The bounds
    // depend on blockIdx.y only: every thread reaches the same barriers, and
    // the K loop ends on one, so the next tile's staging never overwrites
    // slices still being read.
    const long long n_row_tiles = (M + GEMM_M - 1) / GEMM_M;
    for (long long by = blockIdx.y; by < n_row_tiles; by += gridDim.y) {
        const long long i0 = by * GEMM_M;
        T acc[4][4];
        for (int r = 0; r < 4; ++r)
            for (int c = 0; c < 4; ++c) acc[r][c] = T(0);
        for (long long k0 = 0; k0 < K; k0 += GEMM_K) {
            // Stage the slices; consecutive threads read consecutive addresses.
            for (int e = threadIdx.x; e < GEMM_M * GEMM_K; e += GEMM_THREADS) {
                const int i = TA ? e % GEMM_M : e / GEMM_K;
                const int k = TA ? e / GEMM_M : e % GEMM_K;
                const long long gi = i0 + i, gk = k0 + k;
                T v = T(0);
                if (gi < M && gk < K) v = TA ? A[gk * lda + gi] : A[gi * lda + gk];
                As[k][i] = v;
            }
            for (int e = threadIdx.x; e < GEMM_K * GEMM_N; e += GEMM_THREADS) {
                const int j = TB ? e / GEMM_K : e % GEMM_N;
                const int k = TB ? e % GEMM_K : e / GEMM_N;
                const long long gj = j0 + j, gk = k0 + k;
                T v = T(0);
                if (gj < N && gk < K) v = TB ? B[gj * ldb + gk] : B[gk * ldb + gj];
                Bs[k][j] = v;
            }
            __syncthreads();
            for (int k = 0; k < GEMM_K; ++k) {
                T a[4], b[4];
                for (int r = 0; r < 4; ++r) a[r] = As[k][ty + 16 * r];
                for (int c = 0; c < 4; ++c) b[c] = Bs[k][tx + 16 * c];
                for (int r = 0; r < 4; ++r)
                    for (int c = 0; c < 4; ++c) acc[r][c] = acc[r][c] + a[r] * b[c];
            }
            __syncthreads();
        }
        for (int r = 0; r < 4; ++r) {
            const long long i = i0 + ty + 16 * r;
            if (i >= M) break;
            for (int c = 0; c < 4; ++c) {
                const long long j = j0 + tx + 16 * c;
                if (j < N) C[i * ldc + j] = acc[r][c];
            }
        }
    }
}

#ifndef __CUDACC_RTC__
#define FG_INST(T, TA, TB)                                                                  \
    template __global__ void fg_gemm<T, TA, TB>(const T*, const T*, T*, long long, long long, \
                                                long long, long long, long long, long long);
FG_INST(float, 0, 0) FG_INST(float, 1, 0) FG_INST(float, 0, 1)
FG_INST(double, 0, 0) FG_INST(double, 1, 0) FG_INST(double, 0, 1)
#endif
