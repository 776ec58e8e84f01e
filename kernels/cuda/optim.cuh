// The per-element optimizer rules of pass 2 (device functions), shared by
// optim.cu (flat buffers) and multi_tensor.cu (many separate arrays).
// Order of operations: kernels/cpu/optim.py (see optim.cu).
#include "common.cuh"

namespace fg {

// torch.lerp's CPU formula, branch-free as in kernels/cpu/optim.py _lerp.
template <typename T>
__device__ __forceinline__ T lerp_(T a, T b, bool lt, T c) { return (lt ? a : b) + c * (b - a); }

template <typename T>
__device__ __forceinline__ T clip_(T g, T sc, T ncv, T cv) { return pymin(pymax(g * sc, ncv), cv); }

template <typename T, bool DECOUPLED>
__device__ __forceinline__ void adam(T* p, const T* g, T* m, T* v, T* vmax, const double* hp,
                                     T sc, T cv, long long i0, long long n, long long stride)
{
    const T ncv = -cv;
    const double lr = hp[HP_LR];
    const double wd = hp[HP_WEIGHT_DECAY];
    const T l2 = DECOUPLED ? T(0.0) : T(wd);
    const T decay = DECOUPLED ? T(1.0 - lr * wd) : T(1.0);
    const double w1 = 1.0 - hp[HP_BETA1];
    const bool lt1 = w1 < 0.5;
    const T c1 = lt1 ? T(w1) : T(-(1.0 - w1));
    const T b2 = T(hp[HP_BETA2]);
    const T w2 = T(1.0 - hp[HP_BETA2]);
    const T eps = T(hp[HP_EPS]);
    const T nstep = T(-(lr / hp[HP_BIAS_CORR1]));
    const T bc2s = T(sqrt(hp[HP_BIAS_CORR2]));
    const bool ams = hp[HP_AMSGRAD] != 0.0;
    for (long long i = i0; i < n; i += stride) {
        T gi = clip_(g[i], sc, ncv, cv);
        const T pi = p[i] * decay;
        gi = gi + l2 * pi;
        const T mi = lerp_(m[i], gi, lt1, c1);
        const T vi = v[i] * b2 + w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        T vd = vi;
        if (ams) {
            vd = pymax(vmax[i], vi);
            vmax[i] = vd;
        }
        p[i] = pi + nstep * (mi / (sqrt_(vd) / bc2s + eps));
    }
}

template <typename T>
__device__ __forceinline__ void sgd(T* p, const T* g, T* buf, const double* hp, T sc, T cv,
                                    long long i0, long long n, long long stride)
{
    const T ncv = -cv;
    const T nlr = T(-hp[HP_LR]);
    const T wd = T(hp[HP_WEIGHT_DECAY]);
    const T mom = T(hp[HP_MOMENTUM]);
    const T w = T(1.0 - hp[HP_DAMPENING]);
    if (hp[HP_MOMENTUM] == 0.0) {
        for (long long i = i0; i < n; i += stride) {
            const T pi = p[i];
            const T gi = clip_(g[i], sc, ncv, cv) + wd * pi;
            p[i] = pi + nlr * gi;
        }
        return;
    }
    const bool first = hp[HP_FIRST] != 0.0;
    const bool nesterov = hp[HP_NESTEROV] != 0.0;
    for (long long i = i0; i < n; i += stride) {
        const T pi = p[i];
        const T gi = clip_(g[i], sc, ncv, cv) + wd * pi;
        const T bi = first ? gi : buf[i] * mom + w * gi;   // torch: first buffer = g, undampened
        buf[i] = bi;
        const T d = nesterov ? gi + mom * bi : bi;
        p[i] = pi + nlr * d;
    }
}

template <typename T>
__device__ __forceinline__ void rmsprop(T* p, const T* g, T* sq, T* buf, T* gavg, const double* hp,
                                        T sc, T cv, long long i0, long long n, long long stride)
{
    const T ncv = -cv;
    const T nlr = T(-hp[HP_LR]);
    const T wd = T(hp[HP_WEIGHT_DECAY]);
    const T alpha = T(hp[HP_ALPHA]);
    const double wa = 1.0 - hp[HP_ALPHA];
    const T wsq = T(wa);
    const bool lta = wa < 0.5;
    const T ca = lta ? T(wa) : T(-(1.0 - wa));
    const T eps = T(hp[HP_EPS]);
    const T mom = T(hp[HP_MOMENTUM]);
    const bool centered = hp[HP_CENTERED] != 0.0;
    const bool use_mom = hp[HP_MOMENTUM] > 0.0;
    for (long long i = i0; i < n; i += stride) {
        const T pi = p[i];
        const T gi = clip_(g[i], sc, ncv, cv) + wd * pi;
        const T si = sq[i] * alpha + wsq * gi * gi;
        sq[i] = si;
        T avg;
        if (centered) {
            const T ai = lerp_(gavg[i], gi, lta, ca);
            gavg[i] = ai;
            // an overflowed squares' average: variance inf, not inf - inf
            // (kernels/cpu/optim.py)
            avg = sqrt_(si == inf<T>() ? si : si + (-ai) * ai) + eps;
        } else {
            avg = sqrt_(si) + eps;
        }
        if (use_mom) {
            const T bi = buf[i] * mom + gi / avg;
            buf[i] = bi;
            p[i] = pi + nlr * bi;
        } else {
            p[i] = pi + nlr * (gi / avg);
        }
    }
}

}  // namespace fg

namespace fg {

template <int RULE> constexpr bool unknown_rule = false;

// Pass 2's per-element work on elements [i0, n) step stride of one buffer:
// clip by ctl's scale, clip by value, then rule RULE (fg_update and the
// multi-tensor fg_mt_update both run exactly this, so their results are
// bitwise equal).  The caller has checked ctl[CTL_SKIP].
template <typename T, int RULE>
__device__ __forceinline__ void rule_update(T* p, const T* g, T* s0, T* s1, T* s2,
                                            const double* hp, const double* ctl,
                                            double clip_value, long long i0, long long n,
                                            long long stride)
{
    // maximize (torch): the rule sees -g; clipping is symmetric, so negate the scale
    const T sc = hp[HP_MAXIMIZE] != 0.0 ? T(-ctl[CTL_SCALE]) : T(ctl[CTL_SCALE]);
    const T cv = clip_value > 0.0 ? T(clip_value) : inf<T>();
    // one branch per rule code (tests/test_registry.py); another code does not compile
    if constexpr (RULE == ADAM) adam<T, false>(p, g, s0, s1, s2, hp, sc, cv, i0, n, stride);
    else if constexpr (RULE == ADAMW) adam<T, true>(p, g, s0, s1, s2, hp, sc, cv, i0, n, stride);
    else if constexpr (RULE == SGD) sgd<T>(p, g, s0, hp, sc, cv, i0, n, stride);
    else if constexpr (RULE == RMSPROP) rmsprop<T>(p, g, s0, s1, s2, hp, sc, cv, i0, n, stride);
    else static_assert(unknown_rule<RULE>, "fg::rule_update: no update for this rule code");
}

}  // namespace fg
