"""Whole-step comparison in interleaved rounds; prints a markdown table.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/step_compare.py [--threads 1 2]

The host alternates fast and slow phases within seconds, so contenders run
round-robin in short rounds; each round's median per contender is divided by
the fastgrad median of the same round, and the table reports the median of
those ratios (and the median time).
"""
import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import CONTENDERS, WORKLOADS, gemm_flops  # noqa: E402


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def run(workloads, contenders, rounds, budget_s):
    rows = []
    for name in workloads:
        sizes, batch, act, loss = WORKLOADS[name]
        fns = {}
        for c in contenders:
            try:
                fns[c] = CONTENDERS[c](sizes, batch, act, loss)
                for _ in range(3):
                    fns[c]()                    # compile / warm up
            except ImportError as exc:
                print(f"# {name}: {c} skipped ({exc})", file=sys.stderr)
        one = timed(fns["fastgrad"], 5)
        reps = max(3, min(200, int(budget_s / max(rounds, 1) / max(one, 1e-6) / len(fns) / 4)))
        per = {c: [] for c in fns}
        for _ in range(rounds):
            for c, fn in fns.items():
                per[c].append(timed(fn, reps))
        base = np.array(per["fastgrad"])
        flops = gemm_flops(sizes, batch)
        for c in fns:
            t = np.array(per[c])
            rows.append((name, c, np.median(t) * 1e3, np.median(t / base), flops / np.median(t) / 1e9))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS))
    ap.add_argument("--threads", nargs="+", type=int, default=[2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per workload and thread count")
    args = ap.parse_args()
    import fastgrad as fg
    from threadpoolctl import threadpool_info
    blas = {(i["internal_api"], i.get("architecture")) for i in threadpool_info() if i["user_api"] == "blas"}
    print(f"# {time.strftime('%Y-%m-%d')} · {platform.processor() or platform.machine()} · "
          f"{os.cpu_count()} cores · BLAS {sorted(blas)} · "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')}")
    for n in args.threads:
        fg.set_num_threads(n)
        try:
            import torch
            torch.set_num_threads(n)
        except ImportError:
            pass
        rows = run(args.workloads, args.contenders, args.rounds, args.budget)
        print(f"\n## {n} thread(s)\n")
        print("| workload | contender | median ms | x fastgrad time | GEMM GFLOP/s |")
        print("|---|---|---|---|---|")
        for name, c, ms, ratio, gf in rows:
            print(f"| {name} | {c} | {ms:.4f} | {ratio:.2f} | {gf:.1f} |")


if __name__ == "__main__":
    main()
