"""Whole-step comparison in interleaved rounds, each peer at its best
configuration on this machine; prints Markdown tables and, with --write,
regenerates the tables in bench/RESULTS.md and the README's headline.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/step_compare.py --write

The host alternates fast and slow phases within seconds, so contenders run
round-robin in short rounds; each round's median per contender is divided by
the fastgrad median of the same round, and the tables report the median of
those ratios (and the median time).  fastgrad (``fastgrad-<n>t``) and
PyTorch (``torch-<n>t``) run at every thread count from 1 to the number of
cores, and the headline takes each one's best per workload, with the GEMM
floor (``gemm-floor-<n>t``) at fastgrad's best count; NumPy runs at the
process's default thread count; JAX keeps its own thread pool.
"""
import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import cpu_model, write_block  # noqa: E402
from timing import timed  # noqa: E402
from workloads import CONTENDERS, WORKLOADS, gemm_flops  # noqa: E402

RESULTS = HERE / "RESULTS.md"
README = HERE.parent / "README.md"
COMMAND = "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/step_compare.py --write"
DESCRIBE = {
    "tiny": "tiny 32-64-64-1, batch 64, tanh, MSE",
    "mnist": "mnist 784-256-256-10, batch 128, relu, CE",
    "deep": "deep 256-8x256-10, batch 256, tanh, CE",
    "wide": "wide 1024-2048-2048-1024, batch 256, relu, MSE",
}


def thread_counts():
    return list(range(1, (os.cpu_count() or 1) + 1))


def make(contender, sizes, batch, act, loss):
    """(callable, library whose threads to set or None, thread count)."""
    m = re.match(r"^(torch|fastgrad|gemm-floor)-(\d+)t$", contender)
    if m:
        # the floor's BLAS threads are set as fastgrad's are (fg.set_num_threads)
        lib = "torch" if m.group(1) == "torch" else "fastgrad"
        return CONTENDERS[m.group(1)](sizes, batch, act, loss), lib, int(m.group(2))
    return CONTENDERS[contender](sizes, batch, act, loss), None, None


class Threads:
    """Switch fastgrad's (Numba + BLAS) or PyTorch's thread count for one
    contender, and back to the process defaults afterwards."""

    def __init__(self):
        import fastgrad as fg
        self.fg, self.fg_default = fg, os.cpu_count() or 1
        try:
            import torch
            self.torch, self.torch_default = torch, torch.get_num_threads()
        except ImportError:
            self.torch = None

    def use(self, lib, n):
        if lib == "fastgrad":
            self.fg.set_num_threads(n)
        elif lib == "torch":
            self.torch.set_num_threads(n)

    def reset(self, lib):
        if lib == "fastgrad":
            self.fg.set_num_threads(self.fg_default)
        elif lib == "torch":
            self.torch.set_num_threads(self.torch_default)


def run(workloads, contenders, rounds, budget_s):
    """{workload: {contender: (median s, median ratio to the best fastgrad)}}
    and {workload: name of the best fastgrad contender}."""
    threads = Threads()
    out, base_of = {}, {}
    for name in workloads:
        sizes, batch, act, loss = WORKLOADS[name]
        fns = {}
        for c in contenders:
            try:
                fn, lib, n = make(c, sizes, batch, act, loss)
            except ImportError as exc:
                print(f"# {name}: {c} skipped ({exc})", file=sys.stderr)
                continue
            threads.use(lib, n)
            for _ in range(3):
                fn()                           # compile / warm up
            threads.reset(lib)
            fns[c] = (fn, lib, n)
        # The per-call step at each thread count; fastgrad-epoch (run_epoch,
        # several steps per call, timed per step) is not a base.
        fast = [c for c in fns if re.match(r"^fastgrad-\d+t$", c)]
        one = timed(fns[fast[0]][0], 5)
        reps = max(3, min(200, int(budget_s / max(rounds, 1) / max(one, 1e-6) / len(fns) / 4)))
        per = {c: [] for c in fns}
        for _ in range(rounds):
            for c, (fn, lib, n) in fns.items():
                threads.use(lib, n)
                steps = getattr(fn, "steps", 1)
                per[c].append(timed(fn, max(1, reps // steps)) / steps)
                threads.reset(lib)
        base = min(fast, key=lambda c: np.median(per[c]))
        ref = np.array(per[base])
        base_of[name] = base
        out[name] = {c: (float(np.median(t)), float(np.median(np.array(t) / ref)))
                     for c, t in per.items()}
    return out, base_of


def best_of(results, lib):
    """(contender, thread count) of ``lib``'s fastest thread count."""
    ts = [(r[0], c) for c, r in results.items() if c.startswith(lib + "-")]
    if not ts:
        return None, None
    _, c = min(ts)
    return c, int(c[len(lib) + 1:-1])


def header():
    import numba
    from threadpoolctl import threadpool_info
    import fastgrad as fg
    blas = sorted({f"{i['internal_api']} {i.get('version')} ({i.get('architecture')} kernel)"
                   for i in threadpool_info() if i["user_api"] == "blas"})
    peers = []
    for mod in ("torch", "jax"):
        try:
            peers.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return (f"{time.strftime('%Y-%m-%d')} · {cpu_model()} · "
            f"{os.cpu_count()} cores · BLAS {'; '.join(blas)} · fastgrad {fg.__version__} · "
            f"numba {numba.__version__} · {' · '.join(peers)} · "
            f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')} · "
            f"load average {os.getloadavg()[0]:.1f} at the end of the run")


def detail_table(results):
    lines = ["| workload | contender | median ms | x fastgrad time | GEMM GFLOP/s |",
             "|---|---|---|---|---|"]
    for name, res in results.items():
        sizes, batch, _, _ = WORKLOADS[name]
        for c, (t, ratio) in sorted(res.items(), key=lambda kv: kv[1][0]):
            lines.append(f"| {name} | {c} | {t * 1e3:.4f} | {ratio:.2f} | "
                         f"{gemm_flops(sizes, batch) / t / 1e9:.1f} |")
    return "\n".join(lines)


def _threads(n):
    return f"{n} thread{'s' if n > 1 else ''}"


def headline_table(results, base_of):
    lines = ["| whole training step | fastgrad, best thread count | vs JAX jit "
             "| vs PyTorch eager, best thread count | vs its own GEMMs |",
             "|---|---|---|---|---|"]
    for name, res in results.items():
        base = base_of[name]
        fast = res[base][0]
        n_fast = int(base[len("fastgrad-"):-1])
        jax = f"{res['jax'][1]:.2f}x" if "jax" in res else "-"
        tc, tn = best_of(res, "torch")
        torch = f"{res[tc][1]:.2f}x ({_threads(tn)})" if tc else "-"
        floor = res.get(f"gemm-floor-{n_fast}t")      # at fastgrad's thread count
        floor = f"{1 / floor[1]:.2f}x the floor" if floor else "-"
        lines.append(f"| {DESCRIBE.get(name, name)} | {fast * 1e3:.3g} ms ({_threads(n_fast)}) "
                     f"| {jax} | {torch} | {floor} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--contenders", nargs="+", default=None,
                    help="default: fastgrad-<n>t gemm-floor-<n>t numpy torch-<n>t jax, n = 1..cores")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per workload")
    ap.add_argument("--note", default="", help="a sentence on the conditions, printed with the tables")
    ap.add_argument("--write", action="store_true",
                    help="regenerate the tables in bench/RESULTS.md and the README's headline")
    args = ap.parse_args()
    counts = thread_counts()
    contenders = args.contenders or ([f"fastgrad-{n}t" for n in counts]
                                     + ["fastgrad-epoch"]
                                     + [f"gemm-floor-{n}t" for n in counts] + ["numpy"]
                                     + [f"torch-{n}t" for n in counts] + ["jax"])
    results, base_of = run(args.workloads, contenders, args.rounds, args.budget)
    head = header()
    detail = "\n".join([
        f"    {COMMAND}", "", f"`{head}`", "",
        "fastgrad (`fastgrad-<n>t`; `fastgrad-epoch`: `TrainStep.run_epoch` over 64 "
        "batches, per step, default threads), its GEMMs alone (`gemm-floor-<n>t`) and PyTorch "
        "(`torch-<n>t`) at each thread count, NumPy at the default thread count, JAX with "
        "its own pool.  Sorted "
        "fastest first within each workload; \"x fastgrad time\" is the time over the fastest "
        "fastgrad thread count's (median of per-round ratios; > 1: slower than fastgrad)." + (f"  {args.note}" if args.note else ""), "",
        detail_table(results)])
    note = f" {args.note}" if args.note else ""
    headline = "\n".join([headline_table(results, base_of), "",
                          f"<sub>{head}.{note} Regenerate: `{COMMAND}`</sub>"])
    print(detail)
    print()
    print(headline)
    if args.write:
        write_block(RESULTS, "step_compare", detail + "\n\n" + headline)
        write_block(README, "headline", headline)
        print(f"\nwrote {RESULTS} and {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
