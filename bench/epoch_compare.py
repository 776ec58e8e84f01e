"""Per-step time of small nets: ``TrainStep.run_epoch`` against the per-step
loop, JAX jit and PyTorch eager, in interleaved rounds.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/epoch_compare.py

Contenders, each running the same float32 step (forward, loss, backward,
clip by global norm 1.0, Adam lr 1e-3):

* ``run_epoch`` -- one ``TrainStep.run_epoch`` call over ``--steps``
  batches (batches gathered in compiled code, no shuffle), timed per step;
* ``step loop`` -- ``step(x, y)`` in a Python loop over the same batches
  (pre-sliced, so the loop's cost is the call: checks, schedule, StepStats);
* ``jax`` -- JAX jit + optax of one step on a fixed batch (bench/workloads.py);
* ``torch-1t`` -- PyTorch eager at one thread, fused Adam + clip_grad_norm_.

Each round times every contender once; the table gives the median time per
step and the median over rounds of each one's time divided by run_epoch's
in the same round.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from workloads import CONTENDERS, data  # noqa: E402

NETS = {
    # name: (sizes, batch, activation, loss)
    "32-64-64-10 b32": ([32, 64, 64, 10], 32, "relu", "softmax_cross_entropy"),
    "32-64-64-1 b64 tanh mse": ([32, 64, 64, 1], 64, "tanh", "mse"),
}


def make_loop(sizes, batch, act, loss, steps):
    import fastgrad as fg
    from fastgrad.losses import LOSSES
    model = fg.MLP(sizes, activation=act, seed=0)
    step = fg.TrainStep(model, LOSSES[loss](), fg.Adam(model, lr=1e-3, clip_norm=1.0))
    X, Y = data(sizes, batch * steps, loss)
    batches = [(X[i:i + batch], Y[i:i + batch]) for i in range(0, len(X), batch)]

    def run():
        for x, y in batches:
            step(x, y)
    return run


def contenders(sizes, batch, act, loss, steps):
    """{name: (callable, steps per call)}; peers that are not installed are left out."""
    out = {"run_epoch": (CONTENDERS["fastgrad-epoch"](sizes, batch, act, loss, steps=steps),
                         steps),
           "step loop": (make_loop(sizes, batch, act, loss, steps), steps)}
    for name, key in (("jax", "jax"), ("torch-1t", "torch")):
        try:
            out[name] = (CONTENDERS[key](sizes, batch, act, loss), 1)
        except ImportError as exc:
            print(f"# {name} skipped ({exc})", file=sys.stderr)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=256, help="batches per run_epoch call")
    args = ap.parse_args()
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass
    print("| net | contender | median us / step | x run_epoch's time |")
    print("|---|---|---|---|")
    for name, (sizes, batch, act, loss) in NETS.items():
        fns = contenders(sizes, batch, act, loss, args.steps)
        for fn, _ in fns.values():
            for _ in range(3):
                fn()                      # compile / warm up
        per = {c: [] for c in fns}
        for _ in range(args.rounds):
            for c, (fn, steps) in fns.items():
                reps = max(1, args.steps // steps)      # about the same work per contender
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
                per[c].append((time.perf_counter() - t) / (reps * steps))
        ref = np.array(per["run_epoch"])
        for c, ts in sorted(per.items(), key=lambda kv: np.median(kv[1])):
            print(f"| {name} | {c} | {np.median(ts) * 1e6:.1f} | "
                  f"{np.median(np.array(ts) / ref):.2f} |")


if __name__ == "__main__":
    main()
