"""Is the parallel update worth making the default?  ``opt.step()`` with the
serial kernel, the parallel one (static chunks) and a parallel one with
dynamic chunks (``numba.set_parallel_chunksize(1)``: a thread slowed by
another pool takes fewer chunks), inside a training loop whose GEMMs run on
OpenBLAS's threads (``TrainStep.gradients`` then ``opt.step()``), and
``opt.step()`` alone right after such a loop (BLAS's workers still
spinning).  Interleaved rounds; ratios to the serial kernel in each round.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/update_in_loop.py [ROUNDS] [270K,1M,4M,16M]

With ``FASTGRAD_SHARE_BLAS_POOL=1`` the GEMMs' jobs run on Numba's pool
(``fastgrad.share_blas_pool``): one pool instead of two.
"""
import sys, time
import numpy as np
import numba
from numba import njit, prange
import fastgrad as fg
from fastgrad.kernels.cpu import optim as K
from fastgrad.kernels.cpu.reduce import layer_sumsq_parallel, BLOCK
from fastgrad.kernels.cpu._jit import JIT

@njit(**dict(JIT, parallel=True))
def _upd_dyn(rule, p, g, s0, s1, s2, hp, scale, clip_value):
    n = p.shape[0]
    old = numba.set_parallel_chunksize(1)
    for c in prange((n + K.CHUNK - 1) // K.CHUNK):
        lo = c * K.CHUNK
        K.update_segments(rule, p, g, s0, s1, s2, hp, scale, clip_value, lo, min(lo + K.CHUNK, n))
    numba.set_parallel_chunksize(old)

@njit(**JIT)
def dyn(rule, p, g, s0, s1, s2, hp, offsets, layer_sq, clip_norm, clip_value):
    norm = np.sqrt(layer_sumsq_parallel(g, offsets, layer_sq))
    if not np.isfinite(norm):
        return norm, 0.0, True
    scale = K.clip_scale(norm, clip_norm)
    _upd_dyn(rule, p, g, s0, s1, s2, hp, scale, clip_value)
    return norm, scale, False

SHAPES = {"270K": ([784, 256, 256, 10], 128), "1M": ([1024, 640, 512, 10], 128),
          "4M": ([2048, 1024, 1024, 1024, 10], 64), "16M": ([4096, 2048, 2048, 2048, 10], 32)}

def main(rounds=9, which=None):
    rng = np.random.default_rng(0)
    for name, (sizes, B) in SHAPES.items():
        if which and name not in which:
            continue
        model = fg.MLP(sizes, activation="relu", dtype=np.float32, seed=0)
        opt = fg.Adam(model, lr=1e-4, clip_norm=1.0)
        step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), opt)
        x = rng.standard_normal((B, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], B)
        serial, par = opt._serial_update, K.clipped_update_parallel
        kinds = {"serial": serial, "parallel": par, "dynamic": dyn}
        n = sum(p.size for p in model.parameters())
        reps = max(3, int(3e7 / n))
        res = {("loop", k): [] for k in kinds}
        res.update({("alone", k): [] for k in kinds})
        for r in range(rounds + 1):
            for k, fn in kinds.items():
                opt._parallel_asked = k != "serial"     # a fixed choice, then its kernel
                opt._update = fn
                step.gradients(x, y); opt.step()
                t = time.perf_counter()
                for _ in range(reps):
                    step.gradients(x, y)
                    opt.step()
                tl = (time.perf_counter() - t) / reps
                t = time.perf_counter()
                for _ in range(reps):
                    opt.step()
                ta = (time.perf_counter() - t) / reps
                if r:
                    res[("loop", k)].append(tl); res[("alone", k)].append(ta)
        for mode in ("loop", "alone"):
            base = np.array(res[(mode, "serial")])
            cells = []
            for k in kinds:
                a = np.array(res[(mode, k)])
                cells.append(f"{k} {np.median(a)*1e3:.3f} ms ({np.median(a/base):.2f})")
            print(f"| {name} ({n/1e6:.2f}M) | {mode} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9, sys.argv[2].split(",") if len(sys.argv) > 2 else None)
