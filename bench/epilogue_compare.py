"""Epilogue pieces (dropout, residual, norms, weight norm) on the deep
workload, interleaved rounds; prints a markdown table.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/epilogue_compare.py [--threads 2]

Variants (bench/epilogue_workloads.py): plain, batch norm on every hidden
layer, residual blocks on the 8 x 256 hidden layers, dropout 0.1 after every
hidden activation.  As in step_compare.py the contenders run round-robin in
short rounds (the host alternates fast and slow phases); every round's median
per contender and variant is divided by (a) fastgrad's plain step and (b)
fastgrad's step of the same variant, from the same round, and the table
reports the medians of those ratios.  It sets OMP_WAIT_POLICY=PASSIVE (unless
set) so that PyTorch's idle OpenMP workers do not spin between rounds.
"""
import argparse
import os
import sys
import time

# Before torch (libgomp) loads: its idle OpenMP workers otherwise spin on the
# 2 cores after every op and starve the OpenBLAS threads of the contenders
# that run next in the round (measured: fastgrad's deep step 10 ms alone,
# 20-190 ms right after torch's).  Passive waiting costs torch nothing here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import cpu_model  # noqa: E402
from timing import timed  # noqa: E402
from epilogue_workloads import CONTENDERS, DEEP, VARIANTS  # noqa: E402

TARGET = 1.15      # a layer kind may cost at most 15 % over fastgrad's plain step


def run(variants, contenders, rounds, budget_s):
    sizes, batch, act, loss = DEEP
    fns = {}
    for v in variants:
        for c in contenders:
            try:
                fn = CONTENDERS[c](v, sizes, batch, act, loss)
                for _ in range(3):
                    fn()                        # compile / warm up
                fns[(v, c)] = fn
            except ImportError as exc:
                print(f"# {v}: {c} skipped ({exc})", file=sys.stderr)
    one = timed(fns[("plain", "fastgrad")], 5)
    reps = max(3, min(100, int(budget_s / max(rounds, 1) / max(one, 1e-6) / len(fns) / 2)))
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            per[k].append(timed(fn, reps))
    plain = np.array(per[("plain", "fastgrad")])
    rows = []
    for (v, c), ts in per.items():
        t = np.array(ts)
        same = np.array(per[(v, "fastgrad")]) if (v, "fastgrad") in per else None
        rows.append((v, c, np.median(t) * 1e3, np.median(t / plain),
                     np.median(t / same) if same is not None else float("nan")))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per thread count")
    args = ap.parse_args()
    if "plain" not in args.variants or "fastgrad" not in args.contenders:
        ap.error("the ratios need the plain variant and the fastgrad contender")
    import fastgrad as fg
    from threadpoolctl import threadpool_info
    blas = {(i["internal_api"], i.get("architecture")) for i in threadpool_info() if i["user_api"] == "blas"}
    sizes, batch, act, loss = DEEP
    print(f"# {time.strftime('%Y-%m-%d')} · {cpu_model()} · "
          f"{os.cpu_count()} cores · BLAS {sorted(blas)} · "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} · "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"# deep workload {sizes[0]} -> {len(sizes) - 2} x {sizes[1]} -> {sizes[-1]}, batch "
          f"{batch}, {act}, {loss}, Adam lr 1e-3 + clip_norm 1.0, float32")
    for n in args.threads:
        fg.set_num_threads(n)
        try:
            import torch
            torch.set_num_threads(n)
        except ImportError:
            pass
        rows = run(args.variants, args.contenders, args.rounds, args.budget)
        print(f"\n## {n} thread(s)\n")
        print("| variant | contender | median ms | x fastgrad plain | x fastgrad same variant "
              "| fastgrad <= 1.15 x plain |")
        print("|---|---|---|---|---|---|")
        for v, c, ms, vs_plain, vs_same in rows:
            met = ("yes" if vs_plain <= TARGET else "no") if c == "fastgrad" and v != "plain" else ""
            print(f"| {v} | {c} | {ms:.3f} | {vs_plain:.2f} | {vs_same:.2f} | {met} |")


if __name__ == "__main__":
    main()
