"""Each activation's fused passes in GB/s, against the relu pass.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/activation_gbs.py [--rounds 15]

``bias_act`` (forward, in place: z += b, z = f(z); 2 arrays moved) and
``bias_act_grad`` (dz = da f', db = sum dz, in place on da; 4 arrays: da,
a, z, dz) over 256x1024, one thread (the passes are serial).  Every round
times every activation once, in turn, on a fresh copy of the same random
input (an in-place pass run again on its own output would feed it other
values: gelu's output, fed back, drifts towards subnormals); a pass's
figure is its best round.  Ratio = time / relu's time in the same dtype.
"""
import argparse
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from fastgrad.kernels import spec  # noqa: E402
from fastgrad.kernels.cpu import activations  # noqa: E402

SHAPE = (256, 1024)


def measure(dtype, rounds, names):
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal(SHAPE).astype(dtype)
    b = (0.1 * rng.standard_normal(SHAPE[1])).astype(dtype)
    da0 = rng.standard_normal(SHAPE).astype(dtype)
    z, a, da = np.empty_like(z0), np.empty_like(z0), np.empty_like(z0)
    db = np.empty(SHAPE[1], dtype)
    codes = {n: spec.CODES[n] for n in names}
    alphas = {n: dtype(spec.DEFAULT_ALPHA.get(n, 0.0)) for n in names}
    best = {n: [np.inf, np.inf] for n in names}
    for r in range(rounds + 1):          # round 0 compiles and warms up
        for n in names:
            np.copyto(z, z0)
            t0 = time.perf_counter()
            activations.bias_act(z, b, z, codes[n], alphas[n])
            t_fwd = time.perf_counter() - t0
            np.copyto(a, z)
            np.copyto(z, z0)
            z += b
            np.copyto(da, da0)
            t0 = time.perf_counter()
            activations.bias_act_grad(da, a, z, da, db, codes[n], alphas[n])
            t_grad = time.perf_counter() - t0
            if r:
                best[n][0] = min(best[n][0], t_fwd)
                best[n][1] = min(best[n][1], t_grad)
    return best


def report(dtype, best):
    nbytes = np.dtype(dtype).itemsize * SHAPE[0] * SHAPE[1]
    relu = best.get("relu")
    print(np.dtype(dtype).name)
    for n, (tf, tg) in best.items():
        rf = f" ({tf / relu[0]:5.2f}x relu)" if relu else ""
        rg = f" ({tg / relu[1]:5.2f}x relu)" if relu else ""
        print(f"  {n:11s} fwd {2 * nbytes / tf / 1e9:6.1f} GB/s{rf}  "
              f"grad {4 * nbytes / tg / 1e9:6.1f} GB/s{rg}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--activations", default=",".join(a.name for a in spec.ACTIVATIONS))
    args = parser.parse_args()
    names = args.activations.split(",")
    for dt in args.dtypes.split(","):
        report(np.dtype(dt).type, measure(np.dtype(dt).type, args.rounds, names))


if __name__ == "__main__":
    main()
