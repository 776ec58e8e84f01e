// Host emulation of the CUDA execution model, just enough for fastgrad's
// toolkit kernels: blocks run one after another; the threads of a block run
// as ucontext fibers on one OS thread, switching at __syncthreads (with a
// check that every thread of the block reaches the same barriers).
#include <ucontext.h>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>         // _mm_getcsr / _mm_setcsr: the float32 flush below
#else
#error "harness.h emulates the GPU's float32 flush (-ftz=true) through x86's MXCSR only"
#endif
#include <cmath>
#include <math.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __CUDACC_RTC__ 1

struct dim3_ { unsigned x = 1, y = 1, z = 1; };
static dim3_ threadIdx, blockIdx, blockDim, gridDim;

inline double __longlong_as_double(long long x) { double d; std::memcpy(&d, &x, 8); return d; }

namespace emu {
struct Fiber { ucontext_t ctx; int state; };   // 0 ready, 1 at a barrier, 2 done, 3 warp barrier
static ucontext_t sched;
static std::vector<Fiber> fibers;
static std::vector<std::vector<char>> stacks;
static int current = -1;
static std::function<void()> body;
static int error = 0;
static long long barriers = 0;

static void entry() { body(); fibers[current].state = 2; }

inline void sync()
{
    ++barriers;
    fibers[current].state = 1;
    swapcontext(&fibers[current].ctx, &sched);
}

inline void warp_sync()
{
    fibers[current].state = 3;
    swapcontext(&fibers[current].ctx, &sched);
}

static unsigned long long shfl_slot[1024];

inline void run(unsigned gx, unsigned gy, unsigned bx, unsigned by)
{
    const unsigned n = bx * by;
    if (fibers.size() < n) fibers.resize(n);
    while (stacks.size() < n) stacks.emplace_back(1 << 18);
    gridDim = {gx, gy, 1};
    blockDim = {bx, by, 1};
    for (unsigned byi = 0; byi < gy; ++byi)
        for (unsigned bxi = 0; bxi < gx; ++bxi) {
            blockIdx = {bxi, byi, 0};
            for (unsigned t = 0; t < n; ++t) {
                Fiber& f = fibers[t];
                getcontext(&f.ctx);
                f.ctx.uc_stack.ss_sp = stacks[t].data();
                f.ctx.uc_stack.ss_size = stacks[t].size();
                f.ctx.uc_link = &sched;
                makecontext(&f.ctx, entry, 0);
                f.state = 0;
            }
            for (;;) {
                for (unsigned t = 0; t < n; ++t) {
                    if (fibers[t].state != 0) continue;
                    current = (int)t;
                    threadIdx = {t % bx, t / bx, 0};
                    swapcontext(&sched, &fibers[t].ctx);
                }
                unsigned at_barrier = 0, done = 0, at_warp = 0;
                for (unsigned t = 0; t < n; ++t) {
                    if (fibers[t].state == 1) ++at_barrier;
                    else if (fibers[t].state == 2) ++done;
                    else if (fibers[t].state == 3) ++at_warp;
                }
                if (done == n) break;
                if (at_warp) {
                    for (unsigned w = 0; w * 32 < n; ++w) {
                        unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, c = 0;
                        for (unsigned t = lo; t < hi; ++t) c += fibers[t].state == 3;
                        if (c == 0) continue;
                        if (c != 32) {
                            std::fprintf(stderr, "emu: full-mask warp op with %u of 32 lanes "
                                         "(block (%u,%u), warp %u, blockDim %u)\n", c, bxi, byi, w, n);
                            error = 2;
                            return;
                        }
                        for (unsigned t = lo; t < hi; ++t) fibers[t].state = 0;
                    }
                    continue;
                }
                if (done != 0) {
                    std::fprintf(stderr, "emu: barrier divergence in block (%u,%u)\n", bxi, byi);
                    error = 1;
                    return;
                }
                for (unsigned t = 0; t < n; ++t) fibers[t].state = 0;
            }
        }
}

template <typename... A, std::size_t... I>
void call_with(void (*k)(A...), void** args, std::index_sequence<I...>)
{
    k(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <typename A> constexpr char code()
{
    if constexpr (std::is_pointer_v<A>) {
        using P = std::remove_cv_t<std::remove_pointer_t<A>>;
        if constexpr (std::is_same_v<P, float>) return 'f';
        else if constexpr (std::is_same_v<P, double>) return 'd';
        else if constexpr (std::is_same_v<P, long long>) return 'l';
        else if constexpr (std::is_same_v<P, int>) return 'n';
        else return '?';
    } else if constexpr (std::is_same_v<A, int>) return 'i';
    else if constexpr (std::is_same_v<A, long long>) return 'q';
    else if constexpr (std::is_same_v<A, unsigned long long>) return 'Q';
    else if constexpr (std::is_same_v<A, double>) return 'D';
    else return '?';
}

template <typename... A>
const char* signature(void (*)(A...))
{
    static const char s[] = {code<A>()..., 0};
    return s;
}

// CuPy compiles every module with -ftz=true (after the caller's options), so
// float32 kernels flush subnormal inputs and results to zero on the GPU.
// x86's MXCSR FTZ (bit 15: subnormal results become 0) and DAZ (bit 6:
// subnormal inputs read as 0) do the same here.  They apply to float64 too,
// which the GPU does not flush: an accepted approximation, set only for
// kernels instantiated with float.  The fibers take the MXCSR of the thread
// that made them (glibc's getcontext saves it, swapcontext restores it) and
// run() makes them inside the launch, after this is set.
inline unsigned flush_subnormals()
{
    const unsigned saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u);
    return saved;
}

template <typename... A>
int launch(void (*k)(A...), unsigned gx, unsigned gy, unsigned bx, unsigned by, void** args,
           bool flush)
{
    error = 0;
    body = [=] { call_with(k, args, std::index_sequence_for<A...>{}); };
    const unsigned saved = flush ? flush_subnormals() : 0u;
    run(gx, gy, bx, by);
    if (flush) _mm_setcsr(saved);      // the caller's mode back (Python's, unflushed)
    return error;
}
}  // namespace emu

#define __syncthreads() emu::sync()

inline void __syncwarp(unsigned mask = 0xffffffffu)
{
    if (mask != 0xffffffffu) { std::fprintf(stderr, "emu: partial warp mask\n"); std::abort(); }
    emu::warp_sync();
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask)
{
    static_assert(sizeof(T) <= 8, "shfl of a wide type");
    if (mask != 0xffffffffu) { std::fprintf(stderr, "emu: partial warp mask\n"); std::abort(); }
    const unsigned t = (unsigned)emu::current;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu::shfl_slot[t] = bits;
    emu::warp_sync();
    const unsigned src = (t & ~31u) | ((t & 31u) ^ (unsigned)(lane_mask & 31));
    bits = emu::shfl_slot[src];
    emu::warp_sync();
    T r;
    std::memcpy(&r, &bits, sizeof(T));
    return r;
}
