"""Each loss kernel's time per element, one thread.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/loss_gbs.py [--rounds 15]

The default losses (``softmax_cross_entropy``, ``bce_with_logits``, ``mse``:
the ones the training step fuses) and the option-taking ones (``*_ex``,
default options) on wide outputs (256x1024) and, for cross-entropy, a
10-class head (256x10), float32 and float64.  Each round times every kernel
once, in turn, on the same input; a kernel's figure is its best round.
Run it under two trees (``PYTHONPATH=OLD_TREE python -P ...``) to compare.
"""
import argparse
import os
import time

os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from fastgrad.kernels.cpu import losses  # noqa: E402


def cases(dtype, rng):
    out = {}
    for rows, cols in ((256, 1024), (256, 10)):
        x = (3 * rng.standard_normal((rows, cols))).astype(dtype)
        labels = rng.integers(0, cols, rows)
        g = np.empty_like(x)
        rt = np.empty(rows)
        out[f"softmax_cross_entropy {rows}x{cols}"] = (
            losses.softmax_cross_entropy, (x, labels, g), x.size)
        out[f"softmax_cross_entropy_ex {rows}x{cols}"] = (
            losses.softmax_cross_entropy_ex,
            (x, labels, np.ones(cols), -100, 0.0, losses.MEAN, g, rt), x.size)
    x = (3 * rng.standard_normal((256, 1024))).astype(dtype)
    t = (rng.random((256, 1024)) < 0.5).astype(dtype)
    g = np.empty_like(x)
    terms = np.empty(x.shape)
    out["bce_with_logits 256x1024"] = (losses.bce_with_logits, (x, t, g), x.size)
    out["bce_with_logits_ex 256x1024"] = (
        losses.bce_with_logits_ex, (x, t, np.ones(1024), losses.MEAN, g, terms), x.size)
    out["mse 256x1024"] = (losses.mse, (x, t, g), x.size)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        work = cases(dtype, rng)
        best = {k: np.inf for k in work}
        for r in range(args.rounds + 1):            # round 0 compiles and warms up
            for k, (f, fargs, n) in work.items():
                t0 = time.perf_counter()
                f(*fargs)
                if r:
                    best[k] = min(best[k], (time.perf_counter() - t0) / n)
        print(np.dtype(dtype).name)
        for k, t in best.items():
            print(f"  {k:<36} {t * 1e9:7.2f} ns / element")


if __name__ == "__main__":
    main()
