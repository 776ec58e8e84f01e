"""Where a step's parallel passes run, compared on the same work: each
configuration in its own child process (the pool is a process-wide
switch), two of them alternating round by round; ratios are the second
over the first in neighbouring rounds, then the median over rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/pool_compare.py \
        [--rounds 3] [--modes own,blas]

Modes: ``own``, OpenBLAS's own threads run the GEMMs and fastgrad's passes
run serially (``FASTGRAD_PASS_TEAM=0``); ``blas``, the default: the passes
on a team of OpenBLAS's own workers; ``shared``, OpenBLAS's jobs and the
passes on Numba's OpenMP pool (``fastgrad.share_blas_pool``).

Per workload (the four benchmark workloads and MLPs drawn at random):
``step``, a default ``TrainStep`` call; ``loop``, ``TrainStep.gradients``
then ``opt.step()`` (which runs its update on the team from 2^15
parameters); ``gemms``, the step's bare GEMMs.
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from threads_compare import untuned  # noqa: E402
from workloads import WORKLOADS, data, make_gemm_floor  # noqa: E402


def _best_block(fn, budget):
    fn()
    t = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t, 1e-6)
    reps = max(3, int(budget / 5 / once))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def child(mode, draws, budget):
    import fastgrad as fg
    from fastgrad.losses import LOSSES
    os.environ["FASTGRAD_PASS_TEAM"] = "0" if mode == "own" else "1"
    shared = fg.share_blas_pool(mode == "shared")
    if mode == "shared" and not shared:
        raise SystemExit(f"cannot share the pool: {fg.blas_pool_status()[1]}")
    work = dict(WORKLOADS)
    work.update(untuned(draws))
    out = {}
    for name, (sizes, batch, act, loss) in work.items():
        model = fg.MLP(sizes, activation=act, seed=0)
        opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
        step = fg.TrainStep(model, LOSSES[loss](), opt)
        x, y = data(sizes, batch, loss)

        def loop():
            step.gradients(x, y)
            opt.step()
        out[name] = {"step": _best_block(functools.partial(step, x, y), budget),
                     "loop": _best_block(loop, budget),
                     "gemms": _best_block(make_gemm_floor(sizes, batch, act, loss), budget),
                     "parallel update": opt.parallel}
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.4, help="seconds per timing")
    ap.add_argument("--child", choices=["own", "blas", "shared"])
    ap.add_argument("--modes", default="own,blas", help="two of own, blas, shared")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.draws, args.budget)
    base, other = args.modes.split(",")
    runs = {base: [], other: []}
    for _ in range(args.rounds):
        for mode in runs:
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--draws",
                                   str(args.draws), "--budget", str(args.budget)],
                                  capture_output=True, text=True, env=os.environ)
            if done.returncode:
                raise SystemExit(done.stderr)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
    names = list(runs[base][0])
    print(f"| workload | what | {base} ms | {other} ms | {other} / {base} (per round) |")
    print("|---|---|---|---|---|")
    for name in names:
        for what in ("step", "loop", "gemms"):
            own = [r[name][what] for r in runs[base]]
            shared = [r[name][what] for r in runs[other]]
            ratios = [s / o for s, o in zip(shared, own)]
            note = " (parallel update)" if what == "loop" and runs[other][0][name][
                "parallel update"] else ""
            print(f"| {name} | {what}{note} | {statistics.median(own) * 1e3:.3g} | "
                  f"{statistics.median(shared) * 1e3:.3g} | {statistics.median(ratios):.2f} "
                  f"({min(ratios):.2f}-{max(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
