// Clipped optimizer updates on flat buffers: twin of kernels/cpu/optim.py
// (same rule codes, hp slots, state buffers s0/s1/s2 and order of
// operations; see its docstring for the table of buffers).
//
// No host round-trip inside a step: fg_clip_control turns the squared norm
// (written by reduce.cu) into the control block ctl (common.cuh CTL_*) in
// device memory, and fg_update reads ctl and the hyper-parameters hp from
// device memory and returns at once when the step is skipped.
//
// The step count lives on the device too.  The host cannot know it without
// waiting (it does not know whether the updates it queued were skipped), so
// it uploads a table of hp rows, one per update index it may be at (row r
// made for k = table[0][HP_UPDATE] + r; unused rows -1), and fg_clip_control
// copies the row of the device's count into hp.  A captured CUDA graph thus
// replays with each step's learning rate and bias corrections.  With
// parameter groups a table row holds one HP_SIZE block per segment of the
// flat buffer (width = n_segments * HP_SIZE; the first block's HP_UPDATE
// names the count) and fg_update runs once per segment on its block.
//
// Compiled with --fmad=false (see common.cuh): every + and * rounds as in
// Numba without fastmath, sqrt and / are IEEE-rounded, so given the same
// inputs the update is bitwise the CPU's: float64 always, float32 while no
// value is subnormal (float32 subnormals flush to zero here, common.cuh).
#include "common.cuh"
#include "optim.cuh"

// One thread.  From the squared norm: ctl = {norm, scale, skip, step, lr,
// error}; scale is min(1, clip_norm / (norm + 1e-6)) as torch's
// clip_grad_norm_ (clip_norm <= 0: no clipping).  The update is skipped for
// a non-finite norm, for bad input flagged in ctl[CTL_STATUS] by the loss,
// or when the table has no row for the device's step count (a host bug,
// reported as ERR_NO_HP_ROW).  With match_step == 0 the table's one row is
// used as it is.  step[0] (updates applied so far) advances unless skipped.
// A row is width values (HP_SIZE per segment); ctl's lr is hp[lr_slot].
template <typename T>
__global__ void fg_clip_control(const T* total_sq, T* ctl, double clip_norm, const T* table,
                                long long n_rows, long long width, long long lr_slot,
                                long long match_step, T* hp, T* step)
{
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    long long row = 0;
    bool lost = false;
    if (match_step) {
        row = (long long)(step[0] - table[fg::HP_UPDATE]);
        // Unused rows carry HP_UPDATE = -1 (the table has a fixed size so
        // that a captured graph can replay it): a row must name the count.
        lost = row < 0 || row >= n_rows || table[row * width + fg::HP_UPDATE] != step[0];
    }
    if (lost) row = 0;
    for (long long k = 0; k < width; ++k) hp[k] = table[row * width + k];
    const double status = ctl[fg::CTL_STATUS];
    ctl[fg::CTL_STATUS] = T(0.0);                   // consumed: the next step starts clean
    const double norm = sqrt((double)total_sq[0]);
    const bool skip = !fg::finite_d(norm) || status != 0.0 || lost;
    double scale = 1.0;
    if (skip) scale = 0.0;
    else if (clip_norm > 0.0) scale = fg::pymin(1.0, clip_norm / (norm + 1e-6));
    if (!skip) step[0] = step[0] + T(1.0);
    ctl[fg::CTL_NORM] = T(norm);
    ctl[fg::CTL_SCALE] = T(scale);
    ctl[fg::CTL_SKIP] = T(skip ? 1.0 : 0.0);
    ctl[fg::CTL_STEP] = step[0];
    ctl[fg::CTL_LR] = hp[lr_slot];
    ctl[fg::CTL_ERROR] = T(lost ? double(fg::ERR_NO_HP_ROW) : status);
}

// Pass 2: clip by the scale in ctl, clip by value, then rule RULE, in place
// on p and the state buffers (unused ones may be null / size 0: never read).
// clip_value <= 0 disables clip-by-value (an infinite bound).
template <typename T, int RULE>
__global__ void fg_update(T* p, const T* g, T* s0, T* s1, T* s2, const double* hp,
                          const double* ctl, double clip_value, long long n)
{
    if (ctl[fg::CTL_SKIP] != 0.0) return;          // non-finite norm: touch nothing
    const long long i0 = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    fg::rule_update<T, RULE>(p, g, s0, s1, s2, hp, ctl, clip_value, i0, n, stride);
}

#ifndef __CUDACC_RTC__
#define FG_INST(T, R)                                                                        \
    template __global__ void fg_update<T, R>(T*, const T*, T*, T*, T*, const double*,       \
                                             const double*, double, long long);
FG_EACH_RULE(FG_INST, float)
FG_EACH_RULE(FG_INST, double)
template __global__ void fg_clip_control<double>(const double*, double*, double, const double*,
                                                 long long, long long, long long, long long,
                                                 double*, double*);
#endif
