// Losses: per-row / per-block terms into a float64 device buffer, then one
// deterministic reduction to the mean (fg_mean).  Twins of
// kernels/cpu/losses.py: the same formulas, the loss accumulated in float64,
// the gradient of the mean written in the predictions' dtype (grad may alias
// the input).  The mean stays on the device: nothing syncs.
#include "common.cuh"

// The softmax kernels run one warp per row (blockDim.x a multiple of 32):
// the row of this thread's warp.
__device__ __forceinline__ long long warp_row()
{
    return (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
}

// A label outside [0, cols) (labels already on the device are not checked
// on the host: that would be a read, a sync) is never dereferenced: its row
// gets a NaN loss and gradient and status[0] is set to ERR_BAD_LABEL, which
// makes fg_clip_control skip the update and the host raise.  True then.
template <typename T>
__device__ __forceinline__ bool poison_bad_label(long long lab, long long cols, int lane, T* g,
                                                 double* loss, double* status)
{
    if (lab < 0 || lab >= cols) {
        const T nan = T(fg::inf_d() - fg::inf_d());
        for (long long j = lane; j < cols; j += 32) g[j] = nan;
        if (lane == 0) {
            *loss = (double)nan;
            status[0] = double(fg::ERR_BAD_LABEL);  // every writer writes the same value
        }
        return true;
    }
    return false;
}

// The largest entry of a row, on every lane of its warp.
template <typename T>
__device__ __forceinline__ T warp_row_max(const T* row, long long cols, int lane)
{
    T m = -fg::inf<T>();
    for (long long j = lane; j < cols; j += 32) m = fg::pymax(m, row[j]);
    m = fg::warp_max(m);
    __syncwarp();
    return m;
}

// Softmax cross-entropy, one warp per row (blockDim.x a multiple of 32).
// Stable log-sum-exp: the largest shifted logit is 0, so s lies in
// [1, cols].  row_loss[i] = log(s) - (x_label - max), in float64 as the CPU.
// A label outside [0, cols): poison_bad_label.
template <typename T>
__global__ void fg_softmax_xent(const T* logits, const long long* labels, T* grad,
                                double* row_loss, long long rows, long long cols,
                                double* status)
{
    const int lane = threadIdx.x & 31;
    const long long i = warp_row();
    if (i >= rows) return;                          // whole warps leave together
    const T* row = logits + i * cols;
    T* g = grad + i * cols;
    const long long lab = labels[i];
    if (poison_bad_label(lab, cols, lane, g, row_loss + i, status)) return;
    const T x_label = row[lab];                     // before grad (maybe logits) is written
    const T m = warp_row_max(row, cols, lane);
    // The sum in double, as the CPU: near-certain rows have s = 1 + tiny.
    double s = 0.0;
    for (long long j = lane; j < cols; j += 32) {
        const T e = fg::exp_(row[j] - m);
        g[j] = e;
        s += (double)e;
    }
    s = fg::warp_sum(s);
    const double inv_b = 1.0 / (double)rows;
    if (lane == 0) row_loss[i] = log(s) - ((double)x_label - (double)m);
    const T scale = T(inv_b / s);
    for (long long j = lane; j < cols; j += 32) g[j] *= scale;
    __syncwarp();
    // The label's (p - 1) / B as -(s - e) / (s B) in double: p - 1 in T
    // cancels when p is near 1.  e recomputed exactly as the loop drew it.
    if (lane == 0) {
        const double e_lab = (double)fg::exp_(x_label - m);
        g[lab] = T(-((s - e_lab) / s) * inv_b);
    }
}

// Mean squared error: grad = (2/n) d, partial[block] = sum of d*d (float64).
// blockDim.x == fg::RED_THREADS; gridDim.x depends on n only.
template <typename T>
__global__ void fg_mse(const T* pred, const T* target, T* grad, double* partial, long long n)
{
    __shared__ double sh[fg::RED_THREADS];
    const T two_over_n = T(2.0 / (double)n);
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T d = pred[i] - target[i];
        acc += (double)d * (double)d;
        grad[i] = two_over_n * d;
    }
    const double tot = fg::block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = tot;
}

// Binary cross-entropy on logits: loss max(x,0) - x t + log1p(exp(-|x|)),
// grad (sigmoid(x) - t) / n; both finite for any finite logit.
template <typename T>
__global__ void fg_bce_with_logits(const T* logits, const T* target, T* grad, double* partial,
                                   long long n)
{
    __shared__ double sh[fg::RED_THREADS];
    const T zero = T(0), one = T(1);
    const T inv_n = T(1.0 / (double)n);
    double acc = 0.0;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T x = logits[i], t = target[i];
        const T e = fg::exp_(-fg::abs_(x));          // in (0, 1]
        acc += (double)((x > zero ? x : zero) - x * t + fg::log1p_(e));
        const T sig = x >= zero ? one / (one + e) : e / (one + e);
        grad[i] = (sig - t) * inv_n;
    }
    const double tot = fg::block_sum(acc, sh);
    if (threadIdx.x == 0) partial[blockIdx.x] = tot;
}

// out[0] = (sum of x[0..n) in a fixed order) / div.  One block of
// fg::RED_THREADS threads: thread t adds x[t], x[t + 256], ... in order, then
// the block tree.  T is a dummy (double) so that NVRTC names it like the rest.
template <typename T>
__global__ void fg_mean(const T* x, long long n, T* out, double div)
{
    __shared__ double sh[fg::RED_THREADS];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += fg::RED_THREADS) acc += (double)x[i];
    const double tot = fg::block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] = T(tot / div);
}

// --- losses with PyTorch's options (twins of the *_ex kernels of
// kernels/cpu/losses.py).  reduction: 0 none, 1 mean, 2 sum.  Per-row or
// per-element float64 terms, the gradient of the reduced loss (for none: of
// the sum of the terms); the host reduces the terms with fg_mean / fg_sum_over.
enum { RED_NONE = 0, RED_MEAN = 1, RED_SUM = 2 };

// out[0] = sum of weight[label] over the rows whose label is not ignore_index:
// the divisor of torch's weighted mean.  One block of fg::RED_THREADS.  A
// label outside [0, cols) is not read through (the row kernel flags it).
template <typename T>
__global__ void fg_xent_weight_sum(const long long* labels, const T* weight, long long rows,
                                   long long cols, long long ignore_index, T* out)
{
    __shared__ double sh[fg::RED_THREADS];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < rows; i += fg::RED_THREADS) {
        const long long lab = labels[i];
        if (lab != ignore_index && lab >= 0 && lab < cols) acc += (double)weight[lab];
    }
    const double tot = fg::block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] = T(tot);
}

// Cross-entropy with class weights, ignore_index and label smoothing, one
// warp per row as fg_softmax_xent.  With e = smoothing / cols a row of label
// y costs (1 - smoothing) w_y (-log p_y) + e sum_c w_c (-log p_c); its
// gradient is A p_c - a_c (a_c the coefficient of -log p_c, A their sum),
// times 1 / denom[0] for the mean.  Ignored rows: zero loss and gradient.
template <typename T>
__global__ void fg_softmax_xent_ex(const T* logits, const long long* labels,
                                   const double* weight, long long ignore_index,
                                   double smoothing, int reduction, const double* denom,
                                   T* grad, double* row_loss, long long rows, long long cols,
                                   double* status)
{
    const int lane = threadIdx.x & 31;
    const long long i = warp_row();
    if (i >= rows) return;                          // whole warps leave together
    const T* row = logits + i * cols;
    T* g = grad + i * cols;
    const long long lab = labels[i];
    if (lab == ignore_index) {
        for (long long j = lane; j < cols; j += 32) g[j] = T(0);
        if (lane == 0) row_loss[i] = 0.0;
        return;
    }
    if (poison_bad_label(lab, cols, lane, g, row_loss + i, status)) return;
    const T x_label = row[lab];                     // before grad (maybe logits) is written
    const T m = warp_row_max(row, cols, lane);
    double s = 0.0, wz = 0.0, w_all = 0.0;          // wz: sum_c w_c (x_c - max)
    for (long long j = lane; j < cols; j += 32) {
        const T d = row[j] - m;
        wz += weight[j] * (double)d;
        w_all += weight[j];
        const T e = fg::exp_(d);
        g[j] = e;
        s += (double)e;
    }
    s = fg::warp_sum(s);
    wz = fg::warp_sum(wz);
    w_all = fg::warp_sum(w_all);
    const double gscale = reduction == RED_MEAN ? 1.0 / denom[0] : 1.0;
    const double eps_c = smoothing / (double)cols;
    const double log_s = log(s);
    const double w_y = weight[lab];
    if (lane == 0) {
        const double nll = log_s - ((double)x_label - (double)m);
        // without smoothing the term is skipped: wz is -inf for a -inf logit
        row_loss[i] = (1.0 - smoothing) * w_y * nll
                      + (smoothing != 0.0 ? eps_c * (w_all * log_s - wz) : 0.0);
    }
    const double a_y = (1.0 - smoothing) * w_y + eps_c * w_y;
    const double A = (1.0 - smoothing) * w_y + eps_c * w_all;
    for (long long j = lane; j < cols; j += 32)
        g[j] = T((A * ((double)g[j] / s) - eps_c * weight[j]) * gscale);
    __syncwarp();
    // The label's term as -a_y (1 - p_y) + (A - a_y) p_y, 1 - p_y = (s - e_y) / s
    // in double: A p_y - a_y cancels when p_y is near 1.
    if (lane == 0) {
        const double e_lab = (double)fg::exp_(x_label - m);
        g[lab] = T((-a_y * ((s - e_lab) / s) + (A - a_y) * (e_lab / s)) * gscale);
    }
}

// Binary cross-entropy on logits with pos_weight (one per column):
// l = (1 - t) x + (1 + (pw - 1) t) softplus(-x), dl/dx = lw sigmoid(x) - pw t.
template <typename T>
__global__ void fg_bce_with_logits_ex(const T* logits, const T* target, const double* pos_weight,
                                      T* grad, double* terms, long long n, long long cols,
                                      double gscale)
{
    const T zero = T(0), one = T(1), gs = T(gscale);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T x = logits[i], t = target[i];
        const T pw = T(pos_weight[i % cols]);
        const T lw = one + (pw - one) * t;
        const T e = fg::exp_(-fg::abs_(x));          // in (0, 1]
        const T sp_neg = fg::log1p_(e) + (x < zero ? -x : zero);
        terms[i] = (double)((one - t) * x) + (double)lw * (double)sp_neg;
        const T sig = x >= zero ? one / (one + e) : e / (one + e);
        grad[i] = (lw * sig - pw * t) * gs;
    }
}

// Squared error with a reduction: terms d*d (double), grad two * d.
template <typename T>
__global__ void fg_mse_ex(const T* pred, const T* target, T* grad, double* terms, long long n,
                          double two)
{
    const T tw = T(two);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const T d = pred[i] - target[i];
        terms[i] = (double)d * (double)d;
        grad[i] = tw * d;
    }
}

// out[0] = (sum of x[0..n) in fg_mean's fixed order) / div[0]: the weighted
// mean, its divisor left on the device.
template <typename T>
__global__ void fg_sum_over(const T* x, long long n, const T* div, T* out)
{
    __shared__ double sh[fg::RED_THREADS];
    double acc = 0.0;
    for (long long i = threadIdx.x; i < n; i += fg::RED_THREADS) acc += (double)x[i];
    const double tot = fg::block_sum(acc, sh);
    if (threadIdx.x == 0) out[0] = T(tot / (double)div[0]);
}

#ifndef __CUDACC_RTC__
#define FG_INST(T)                                                                             \
    template __global__ void fg_softmax_xent<T>(const T*, const long long*, T*, double*,      \
                                                long long, long long, double*);               \
    template __global__ void fg_mse<T>(const T*, const T*, T*, double*, long long);           \
    template __global__ void fg_bce_with_logits<T>(const T*, const T*, T*, double*, long long);
FG_INST(float)
FG_INST(double)
template __global__ void fg_mean<double>(const double*, long long, double*, double);
#define FG_INST_EX(T)                                                                          \
    template __global__ void fg_softmax_xent_ex<T>(const T*, const long long*, const double*, \
                                                   long long, double, int, const double*, T*, \
                                                   double*, long long, long long, double*);   \
    template __global__ void fg_bce_with_logits_ex<T>(const T*, const T*, const double*, T*,  \
                                                      double*, long long, long long, double); \
    template __global__ void fg_mse_ex<T>(const T*, const T*, T*, double*, long long, double);
FG_INST_EX(float)
FG_INST_EX(double)
template __global__ void fg_xent_weight_sum<double>(const long long*, const double*, long long,
                                                    long long, long long, double*);
template __global__ void fg_sum_over<double>(const double*, long long, const double*, double*);
#endif
