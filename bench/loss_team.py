"""The fused step's loss on its thread team against the calling thread alone.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/loss_team.py [--rounds 9]

The default losses as a ``TrainStep`` runs them (``pass_team.loss_on_team``:
``pass_team.loss`` in the training kernels' floating-point mode), on outputs of the benchmark
nets' shapes: once with the plan's team (OpenBLAS's workers, or the shared
pool's threads with ``--shared``), once with a plan of 0 threads (the same
member on the calling thread).  Each round times both in turn, 50 calls
each, and keeps each one's best call; the figure is the median over rounds
of the per-round ratio team / calling thread, so that the host's drift
between rounds leaves it alone.  The two give the same loss and gradient,
bitwise (tests/test_pass_team.py).
"""
import argparse
import time

import numpy as np

import fastgrad as fg
from fastgrad import threads as fg_threads
from fastgrad.kernels import layout, spec
from fastgrad.kernels.cpu import pass_team

# (loss, rows, columns): wide outputs of the untuned nets (bench/untuned_compare.py,
# seeds 19 and 1205), a 1000-class head and the mnist-shaped 10-class head
SHAPES = [("bce_with_logits", 141, 1837), ("bce_with_logits", 51, 1149),
          ("bce_with_logits", 146, 643), ("mse", 135, 958), ("mse", 34, 329),
          ("softmax_cross_entropy", 256, 1000), ("softmax_cross_entropy", 52, 97),
          ("softmax_cross_entropy", 128, 10)]


def _plan(dtype, threads):
    plan = np.zeros(layout.PLAN_HEADER, np.int64)
    plan[layout.PLAN_POOL_THREADS], plan[layout.PLAN_POOL_START], \
        plan[layout.PLAN_POOL_BLAS] = fg_threads.pass_team()
    pass_team.fill_members(plan, dtype)
    plan[layout.PLAN_POOL_THREADS] = threads
    return plan


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--shared", action="store_true", help="the shared pool's team")
    args = ap.parse_args()
    if args.shared and not fg.share_blas_pool():
        raise SystemExit(f"the BLAS pool cannot be shared here: {fg.blas_pool_status()[1]}")
    threads = fg_threads.pass_team()[0]
    if threads < 2:
        raise SystemExit(f"no thread team here: {fg.pass_team_status()}")
    dtype = np.float32
    alone, team = _plan(dtype, 0), _plan(dtype, threads)
    rng = np.random.default_rng(0)
    print(f"{fg.pass_team_status()[1]}, {threads} threads, float32; team / calling thread, "
          f"median of {args.rounds} rounds")
    for name, rows, cols in SHAPES:
        out = (3 * rng.standard_normal((rows, cols))).astype(dtype)
        labels = rng.integers(0, cols, rows)
        target = (rng.random((rows, cols)) < 0.3).astype(dtype)
        if name == "softmax_cross_entropy":
            target = np.zeros((0, cols), dtype)
        else:
            labels = np.zeros(0, np.int64)
        grad = np.empty_like(out)
        kind = spec.LOSS_CODES[name]
        best = {}
        ratios = []
        for r in range(args.rounds + 1):           # round 0 compiles and warms up
            for which, plan in (("alone", alone), ("team", team)):
                times = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    pass_team.loss_on_team(plan, kind, out, labels, target, grad)
                    times.append(time.perf_counter() - t0)
                best[which] = min(times)
            if r:
                ratios.append(best["team"] / best["alone"])
        print(f"  {name:<22} {rows:>4}x{cols:<5} ({rows * cols:>7} outputs)  "
              f"calling thread {best['alone'] * 1e6:8.1f} us  team {best['team'] * 1e6:8.1f} us"
              f"  ratio {np.median(ratios):.2f}")


if __name__ == "__main__":
    main()
