"""Whole-step comparison in interleaved rounds, each peer at its best
configuration on this machine; prints Markdown tables and, with --write,
regenerates the tables in bench/RESULTS.md and the README's headline.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/step_compare.py --write

The host alternates fast and slow phases within seconds, so contenders run
round-robin in short rounds; each round's median per contender is divided by
the fastgrad median of the same round, and the tables report the median of
those ratios (and the median time).  fastgrad, NumPy and the GEMM floor run
at the process's default thread count (``--threads`` sets it); PyTorch runs
at every thread count from 1 to the number of cores (``torch-<n>t``) and the
headline takes its best per workload; JAX keeps its own thread pool.
"""
import argparse
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
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


def timed(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def torch_threads():
    return list(range(1, (os.cpu_count() or 1) + 1))


def make(contender, sizes, batch, act, loss):
    """(callable, thread count for torch or None)."""
    m = re.match(r"^torch-(\d+)t$", contender)
    if m:
        return CONTENDERS["torch"](sizes, batch, act, loss), int(m.group(1))
    return CONTENDERS[contender](sizes, batch, act, loss), None


def run(workloads, contenders, rounds, budget_s):
    """{workload: {contender: (median s, median ratio to fastgrad)}}."""
    try:
        import torch
        torch_default = torch.get_num_threads()
    except ImportError:
        torch = None
    out = {}
    for name in workloads:
        sizes, batch, act, loss = WORKLOADS[name]
        fns = {}
        for c in contenders:
            try:
                fn, n = make(c, sizes, batch, act, loss)
            except ImportError as exc:
                print(f"# {name}: {c} skipped ({exc})", file=sys.stderr)
                continue
            if n is not None:
                torch.set_num_threads(n)
            for _ in range(3):
                fn()                           # compile / warm up
            fns[c] = (fn, n)
        if torch is not None:
            torch.set_num_threads(torch_default)
        one = timed(fns["fastgrad"][0], 5)
        reps = max(3, min(200, int(budget_s / max(rounds, 1) / max(one, 1e-6) / len(fns) / 4)))
        per = {c: [] for c in fns}
        for _ in range(rounds):
            for c, (fn, n) in fns.items():
                if n is not None:
                    torch.set_num_threads(n)
                per[c].append(timed(fn, reps))
                if n is not None:
                    torch.set_num_threads(torch_default)
        base = np.array(per["fastgrad"])
        out[name] = {c: (float(np.median(t)), float(np.median(np.array(t) / base)))
                     for c, t in per.items()}
    return out


def best_torch(results):
    """(contender, thread count) of the fastest PyTorch thread count."""
    ts = [(r[1], c) for c, r in results.items() if c.startswith("torch-")]
    if not ts:
        return None, None
    _, c = min(ts)
    return c, int(c[len("torch-"):-1])


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
    return (f"{time.strftime('%Y-%m-%d')} · {platform.processor() or platform.machine()} · "
            f"{os.cpu_count()} cores · BLAS {'; '.join(blas)} · fastgrad {fg.get_num_threads()[0]} "
            f"threads · numba {numba.__version__} · {' · '.join(peers)} · "
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


def headline_table(results):
    lines = ["| whole training step | fastgrad | vs JAX jit | vs PyTorch eager, best thread count "
             "| vs its own GEMMs |", "|---|---|---|---|---|"]
    for name, res in results.items():
        fast = res["fastgrad"][0]
        jax = f"{res['jax'][1]:.2f}x" if "jax" in res else "-"
        tc, tn = best_torch(res)
        torch = f"{res[tc][1]:.2f}x ({tn} thread{'s' if tn > 1 else ''})" if tc else "-"
        floor = f"{1 / res['gemm-floor'][1]:.2f}x the floor" if "gemm-floor" in res else "-"
        lines.append(f"| {DESCRIBE.get(name, name)} | {fast * 1e3:.3g} ms | {jax} | {torch} | {floor} |")
    return "\n".join(lines)


def replace_block(path, tag, text):
    """Replace what lies between ``<!-- tag:begin -->`` and ``<!-- tag:end -->``."""
    src = path.read_text()
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    if begin not in src or end not in src:
        raise SystemExit(f"{path}: markers {begin} ... {end} not found")
    head, rest = src.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    ap.add_argument("--contenders", nargs="+", default=None,
                    help="default: fastgrad gemm-floor numpy torch-1t..torch-<cores>t jax")
    ap.add_argument("--threads", type=int, default=None,
                    help="fastgrad's (and BLAS's) thread count (default: the process default)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per workload")
    ap.add_argument("--note", default="", help="a sentence on the conditions, printed with the tables")
    ap.add_argument("--write", action="store_true",
                    help="regenerate the tables in bench/RESULTS.md and the README's headline")
    args = ap.parse_args()
    import fastgrad as fg
    if args.threads:
        fg.set_num_threads(args.threads)
    contenders = args.contenders or (["fastgrad", "gemm-floor", "numpy"]
                                     + [f"torch-{n}t" for n in torch_threads()] + ["jax"])
    results = run(args.workloads, contenders, args.rounds, args.budget)
    head = header()
    detail = "\n".join([
        f"    {COMMAND}", "", f"`{head}`", "",
        "fastgrad, NumPy and the GEMM floor at the default thread count; PyTorch at "
        "each thread count (`torch-<n>t`); JAX with its own pool.  Sorted fastest "
        "first within each workload; \"x fastgrad time\" > 1 means slower than fastgrad "
        "(median of per-round ratios)." + (f"  {args.note}" if args.note else ""), "",
        detail_table(results)])
    note = f" {args.note}" if args.note else ""
    headline = "\n".join([headline_table(results), "",
                          f"<sub>{head}.{note} Regenerate: `{COMMAND}`</sub>"])
    print(detail)
    print()
    print(headline)
    if args.write:
        replace_block(RESULTS, "step_compare", detail + "\n\n" + headline)
        replace_block(README, "headline", headline)
        print(f"\nwrote {RESULTS} and {README}", file=sys.stderr)


if __name__ == "__main__":
    main()
