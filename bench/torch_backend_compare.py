"""fastgrad as PyTorch's CPU backend (issue #18), in interleaved rounds.

Two comparisons inside a torch program, each contender at thread counts 1..cores:

* the clipped Adam update of a torch training loop: ``fastgrad.torch.Adam(
  clip_norm=1.0).step()`` against ``clip_grad_norm_(1.0)`` +
  ``torch.optim.Adam(fused=True).step()`` on the same float32 parameters
  with gradients set, at 1M and 16M parameters spread over 64 tensors (32
  square weight matrices and their biases);
* forward + backward of an MLP: ``fastgrad.torch.FusedMLP`` against the
  equivalent ``nn.Sequential`` of ``nn.Linear`` + activation (same weights),
  at an mnist-like shape (784-256-256-10, relu, batch 128) and a deep-narrow
  one (8 layers 256-256, tanh, batch 64).

Each round times every contender (median of its repetitions); a ratio is the
torch contender's time over fastgrad's best thread count in the same round,
and the tables report the median of those ratios (> 1: fastgrad faster).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/torch_backend_compare.py \\
        [--write] [--json out.json]

``--write`` replaces the ``torch_backend`` block of bench/RESULTS.md;
``--json`` writes every figure to a file.  The pytest-benchmark twins of
these workloads are in bench/bench_torch_backend.py.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))          # also under `python -P`
from report import cpu_model  # noqa: E402
from timing import timed  # noqa: E402

RESULTS = HERE / "RESULTS.md"
COMMAND = ("env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P "
           "bench/torch_backend_compare.py --write")

# name -> (total parameters wanted, number of weight matrices)
OPTIM_WORKLOADS = {"adam-1M": (1_000_000, 32), "adam-16M": (16_000_000, 32)}
# name -> (sizes, batch, activation)
MLP_WORKLOADS = {"mlp-mnist": ([784, 256, 256, 10], 128, "relu"),
                 "mlp-deep": ([256] * 9, 64, "tanh")}
SMOKE_OPTIM = {"adam-1M": (2_000, 4), "adam-16M": (5_000, 4)}
SMOKE_MLP = {"mlp-mnist": ([12, 8, 8, 3], 4, "relu"), "mlp-deep": ([8] * 4, 3, "tanh")}
TARGETS = {"adam-1M": 2.0, "adam-16M": 1.3, "mlp-mnist": 1.5, "mlp-deep": 1.5}


def optim_tensors(n_params, n_mats, seed=0):
    """float32 parameters (``n_mats`` square weights and their biases, about
    ``n_params`` entries) with gradients set (norm above 1: clipping acts)."""
    import torch
    k = max(1, int((n_params / n_mats) ** 0.5))
    g = torch.Generator().manual_seed(seed)
    params = []
    for _ in range(n_mats):
        for shape in ((k, k), (k,)):
            p = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.05)
            p.grad = torch.randn(shape, generator=g) * 0.01
            params.append(p)
    return params


def make_optim(workload, contender, smoke=False):
    """A callable doing one clipped Adam update of ``contender``
    (``fastgrad``, ``fastgrad-parallel`` (``opt.parallel = True``) or
    ``torch-fused``; thread counts are set by the caller)."""
    import torch
    n, mats = (SMOKE_OPTIM if smoke else OPTIM_WORKLOADS)[workload]
    params = optim_tensors(n, mats)
    if contender in ("fastgrad", "fastgrad-parallel"):
        import fastgrad.torch as fgt
        opt = fgt.Adam(params, lr=1e-3, clip_norm=1.0)
        opt.parallel = contender == "fastgrad-parallel"
        return opt.step
    if contender == "torch-fused":
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return step
    raise ValueError(contender)


def make_mlp(workload, contender, smoke=False):
    """A callable doing forward + backward of the workload's MLP."""
    import torch
    import fastgrad.torch as fgt
    sizes, batch, act = (SMOKE_MLP if smoke else MLP_WORKLOADS)[workload]
    torch.manual_seed(0)
    model = fgt.FusedMLP(sizes, activation=act)
    if contender == "torch":
        model = model.to_sequential()
    elif contender != "fastgrad":
        raise ValueError(contender)
    x = torch.randn(batch, sizes[0])
    dy = torch.randn(batch, sizes[-1])
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        model(x).backward(dy)
    return step


def _threads(lib, n):
    import torch
    import fastgrad as fg
    if lib == "fastgrad":
        fg.set_num_threads(n)          # BLAS (and Numba) threads of FusedMLP's GEMMs
    else:
        torch.set_num_threads(n)


def run(rounds, budget_s, smoke=False, workloads=None):
    """{workload: {contender-<n>t: (median s, median ratio to fastgrad's best)}}."""
    import torch
    counts = list(range(1, (os.cpu_count() or 1) + 1))
    jobs = {w: (make_optim, ["fastgrad", "fastgrad-parallel", "torch-fused"])
            for w in OPTIM_WORKLOADS}
    jobs.update({w: (make_mlp, ["fastgrad", "torch"]) for w in MLP_WORKLOADS})
    jobs = {w: j for w, j in jobs.items() if workloads is None or w in workloads}
    torch_default = torch.get_num_threads()
    out = {}
    for name, (make, kinds) in jobs.items():
        fns = {}
        for kind in kinds:
            lib = "fastgrad" if kind.startswith("fastgrad") else "torch"
            for n in counts:
                fn = make(name, kind, smoke)
                _threads(lib, n)
                for _ in range(3):
                    fn()                       # compile / warm up
                fns[f"{kind}-{n}t"] = (fn, lib, n)
        one = timed(fns[f"fastgrad-{counts[0]}t"][0], 3)
        reps = max(3, min(100, int(budget_s / rounds / max(one, 1e-6) / len(fns))))
        per = {c: [] for c in fns}
        for _ in range(rounds):
            for c, (fn, lib, n) in fns.items():
                _threads(lib, n)
                per[c].append(timed(fn, reps))
        _threads("fastgrad", os.cpu_count() or 1)
        torch.set_num_threads(torch_default)
        fast = [c for c in per if c.startswith("fastgrad")]
        base = min(fast, key=lambda c: np.median(per[c]))
        ref = np.array(per[base])
        out[name] = {c: (float(np.median(t)), float(np.median(np.array(t) / ref)))
                     for c, t in per.items()}
    return out


def header():
    import numba
    import torch
    import fastgrad as fg
    return (f"{time.strftime('%Y-%m-%d')} · {cpu_model()} · "
            f"{os.cpu_count()} cores · fastgrad {fg.__version__} · numba {numba.__version__} · "
            f"torch {torch.__version__} · load average {os.getloadavg()[0]:.1f} at the end")


def tables(results):
    lines = ["| workload | contender | median ms | x fastgrad's best time |", "|---|---|---|---|"]
    for name, res in results.items():
        for c, (t, r) in sorted(res.items(), key=lambda kv: kv[1][0]):
            lines.append(f"| {name} | {c} | {t * 1e3:.3f} | {r:.2f} |")
    head = ["", "| workload | fastgrad best | torch best | speed-up | target | met |",
            "|---|---|---|---|---|---|"]
    for name, res in results.items():
        fb = min((v[0], c) for c, v in res.items() if c.startswith("fastgrad-"))
        tb = min((v[1], c) for c, v in res.items() if not c.startswith("fastgrad-"))
        ratio = tb[0]
        head.append(f"| {name} | {fb[0] * 1e3:.3f} ms ({fb[1]}) | {res[tb[1]][0] * 1e3:.3f} ms "
                    f"({tb[1]}) | {ratio:.2f}x | >= {TARGETS[name]}x | "
                    f"{'yes' if ratio >= TARGETS[name] else 'no'} |")
    return "\n".join(lines + head)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=None, choices=list(TARGETS))
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--budget", type=float, default=6.0, help="seconds per workload")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one quick round")
    ap.add_argument("--note", default="", help="a sentence on the conditions")
    ap.add_argument("--write", action="store_true",
                    help="replace the torch_backend block of bench/RESULTS.md")
    ap.add_argument("--json", type=Path, help="write the figures to this file")
    args = ap.parse_args()
    if args.smoke:
        args.rounds, args.budget = 1, 0.2
    results = run(args.rounds, args.budget, args.smoke, args.workloads)
    text = "\n".join([f"    {COMMAND}", "", f"`{header()}`" + (f" {args.note}" if args.note else ""),
                      "", tables(results)])
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"header": header(), "note": args.note,
                                         "results": results}, indent=1))
    if args.write:
        from report import write_block
        write_block(RESULTS, "torch_backend", text)
        print(f"\nwrote {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
