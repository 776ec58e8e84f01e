"""Who should own the cores during a step: BLAS's threads or the step's own
pool?  Interleaved rounds on the four benchmark workloads and on MLPs drawn
at random (widths 32-2048, depth 2-9, batch 32-256, every activation and
loss: shapes nothing was tuned on).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/threads_compare.py

Contenders, each the same float32 step (clip 1.0, Adam):

- ``serial-<n>t``: ``TrainStep(threads=None)``, BLAS (and Numba) at n threads;
- ``shards-<n>``: ``TrainStep(threads=n)``, n batch shards on Numba's pool,
  BLAS on one thread inside the step;
- ``gemm-<n>t``: the step's bare GEMMs at n BLAS threads (the floor).

Ratios are per round against ``serial-1t``, then the median over rounds.
"""
import argparse
import functools
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import WORKLOADS, data, make_gemm_floor  # noqa: E402

ACTIVATIONS = ["relu", "tanh", "gelu", "softplus", "elu", "sigmoid", "leaky_relu", "silu"]
LOSSES = ["softmax_cross_entropy", "mse", "bce_with_logits"]


def untuned(n, seed=2026):
    """``n`` MLP workloads drawn at random (fixed seed)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        depth = int(rng.integers(2, 10))
        widths = [int(2 ** rng.uniform(5, 11)) for _ in range(depth + 1)]
        batch = int(rng.choice([32, 48, 64, 100, 128, 200, 256]))
        act = str(rng.choice(ACTIVATIONS))
        loss = str(rng.choice(LOSSES))
        out[f"draw{i}"] = (widths, batch, act, loss)
    return out


def make_step(sizes, batch, act, loss, threads):
    import fastgrad as fg
    from fastgrad.losses import LOSSES as L
    model = fg.MLP(sizes, activation=act, seed=0)
    step = fg.TrainStep(model, L[loss](), fg.Adam(model, lr=1e-3, clip_norm=1.0),
                        threads=threads)
    x, y = data(sizes, batch, loss)          # binary targets for bce_with_logits
    return functools.partial(step, x, y)


def timed(fn, reps):
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per workload round")
    args = ap.parse_args()
    import fastgrad as fg
    cores = os.cpu_count() or 1
    counts = list(range(1, cores + 1))
    work = dict(WORKLOADS)
    work.update(untuned(args.draws))
    print("| workload | " + " | ".join(
        [f"serial-{n}t" for n in counts] + [f"shards-{n}" for n in counts[1:]]
        + [f"gemm-{n}t" for n in counts]) + " |")
    print("|---" * (1 + 3 * len(counts) - 1) + "|")
    for name, (sizes, batch, act, loss) in work.items():
        fns = {}
        for n in counts:
            fns[f"serial-{n}t"] = (make_step(sizes, batch, act, loss, None), n)
        for n in counts[1:]:
            fns[f"shards-{n}"] = (make_step(sizes, batch, act, loss, n), cores)
        for n in counts:
            fns[f"gemm-{n}t"] = (make_gemm_floor(sizes, batch, act, loss), n)
        for fn, n in fns.values():
            fg.set_num_threads(n)
            for _ in range(3):
                fn()
        fg.set_num_threads(1)
        one = timed(fns["serial-1t"][0], 3)
        reps = max(2, int(args.budget / len(fns) / max(one, 1e-6)))
        per = {c: [] for c in fns}
        for _ in range(args.rounds):
            for c, (fn, n) in fns.items():
                fg.set_num_threads(n)
                # untimed calls first: the previous contender's BLAS threads
                # spin on for a while after its last GEMM and would steal a
                # core from this one (the fight DESIGN.md "Threads" describes)
                timed(fn, max(1, reps // 3))
                per[c].append(timed(fn, reps))
        fg.set_num_threads(cores)
        base = np.array(per["serial-1t"])
        cells = []
        for c in per:
            t = np.array(per[c])
            cells.append(f"{np.median(t) * 1e3:.3g} ms ({np.median(t / base):.2f})")
        desc = f"{name}: {'-'.join(map(str, sizes))} b{batch} {act} {loss}"
        print(f"| {desc} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
