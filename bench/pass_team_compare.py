"""The step's passes on the shared pool's threads against the serial passes
(kernels/cpu/pass_team.py), in one process with the pool shared.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -P bench/pass_team_compare.py [--rounds 5]

1. The activation passes alone: ``bias_act_step`` and the gradient pass,
   serial and on the team (a plan with the pool's threads), per activation
   and shape, best of interleaved rounds.
2. The clipped Adam update alone: serial, on the team
   (``pass_team.clipped_update``) and the optimizers' parallel kernel
   (``optim.clipped_update_parallel``, Numba's parfor), per model size;
   ratios are medians over interleaved rounds.
3. Whole steps: each workload's ``TrainStep`` with every pass on its plan's
   team, with the update kept serial (``PLAN_POOL_SPLIT_UPDATE`` 0), with every
   pass serial (``PLAN_POOL_THREADS`` 0), and its bare GEMMs, interleaved;
   ratios are medians over rounds.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from numba import njit

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from timing import timed  # noqa: E402
from untuned_compare import draw  # noqa: E402
from workloads import make_fastgrad, make_gemm_floor  # noqa: E402

import fastgrad as fg  # noqa: E402
from fastgrad import threads as fg_threads  # noqa: E402
from fastgrad.kernels import layout as K  # noqa: E402
from fastgrad.kernels.cpu import activations as A  # noqa: E402
from fastgrad.kernels.cpu import optim as O  # noqa: E402
from fastgrad.kernels.cpu import pass_team  # noqa: E402
from fastgrad.kernels.spec import CODES  # noqa: E402

PASS_SHAPES = [(146, 999), (130, 265), (46, 1633), (256, 1024)]
PASS_ACTIVATIONS = ["relu", "tanh", "softplus", "gelu", "silu"]
# the untuned workloads (bench/untuned_compare.py) plus four wider ones
EXTRA = {"w1": ([784, 1024, 1024, 10], 256, "gelu", "softmax_cross_entropy"),
         "w2": ([256, 512, 512, 512, 256], 128, "silu", "mse"),
         "w3": ([512, 2048, 512], 64, "gelu_tanh", "mse"),
         "w4": ([784, 1024, 1024, 10], 256, "tanh", "softmax_cross_entropy")}
# models of 5K to 17M parameters for the update alone
UPDATE_SIZES = [[40, 64, 40], [37, 211, 3, 64], [100, 128, 25], [41, 300, 77, 5],
                [259, 265, 64], [37, 270, 48, 42, 999, 58, 643], [784, 512, 512, 10],
                [784, 1024, 1024, 10], [512, 2048, 1024, 512], [2048] * 5]


@njit
def _forward(plan, z, b, out, act, alpha):
    threads = pass_team.team_size(plan, z.size, act)
    if threads:
        pass_team.forward(plan, threads, z, b, out, act, alpha)
    else:
        A.bias_act_step(z, b, out, act, alpha)


@njit
def _gradient(plan, g, a, z, db, act, alpha):
    threads = pass_team.gradient_team_size(plan, g, act)
    if threads:
        pass_team.gradient(plan, threads, g, a, z, db, act, alpha)
    else:
        A.bias_act_grad_inplace(g, a, z, db, act, alpha)


def _team_plan():
    plan = np.zeros(K.PLAN_HEADER, np.int64)
    plan[K.PLAN_POOL_THREADS], plan[K.PLAN_POOL_START], plan[K.PLAN_POOL_BLAS] = \
        fg_threads.pass_team()
    pass_team.fill_members(plan, np.float32)
    plan[K.PLAN_POOL_SPLIT_UPDATE] = 1
    return plan


def updates(rounds):
    plan = _team_plan()
    print(f"\nthe clipped Adam update alone, float32, {plan[K.PLAN_POOL_THREADS]} threads; "
          f"medians of {rounds} interleaved rounds")
    print("| layer sizes | parameters | serial us | team / serial | parfor / serial |\n"
          "|---|---|---|---|---|")
    for sizes in UPDATE_SIZES:
        model = fg.MLP(sizes, seed=0)
        opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
        model.grads[...] = np.random.default_rng(0).standard_normal(model.grads.size) * 1e-3
        opt.step()
        rule, s0, s1, s2, hp = opt._kernel_args()
        args = (rule, opt._params, opt._grads, s0, s1, s2, hp, opt._offsets,
                np.zeros(len(opt._offsets) - 1), 1.0, 0.0)
        kernels = {"serial": lambda: O.clipped_update(*args),
                   "team": lambda: pass_team.clipped_update_on_team(plan, *args),
                   "parfor": lambda: O.clipped_update_parallel(*args)}
        for fn in kernels.values():
            fn()
        reps = max(5, int(0.05 / timed(kernels["serial"], 3)))
        per = {k: [] for k in kernels}
        for _ in range(rounds):
            for name, fn in kernels.items():
                per[name].append(timed(fn, reps))
        t, s, p = (np.array(per[k]) for k in ("team", "serial", "parfor"))
        print(f"| {'-'.join(map(str, sizes))} | {opt._params.size:,} | {np.median(s) * 1e6:.1f} | "
              f"{np.median(t / s):.2f} | {np.median(p / s):.2f} |", flush=True)


def passes(rounds, reps=200):
    team = _team_plan()
    serial = np.zeros_like(team)
    rng = np.random.default_rng(0)
    print(f"passes alone, float32, {team[K.PLAN_POOL_THREADS]} threads; us, best of {rounds} "
          "rounds")
    for act in PASS_ACTIVATIONS:
        code = CODES[act]
        for B, n in PASS_SHAPES:
            z = rng.standard_normal((B, n)).astype(np.float32)
            b = np.zeros(n, np.float32)
            out = np.empty_like(z) if A.needs_z(code) else z
            g, db, zero = z.copy(), b.copy(), np.zeros_like(z)   # a = z = 0: no underflow
            best = {}
            for _ in range(rounds):
                for name, plan in (("serial", serial), ("team", team)):
                    _forward(plan, z, b, out, code, 0.1)
                    f = timed(lambda: _forward(plan, z, b, out, code, 0.1), reps)
                    gr = timed(lambda: _gradient(plan, g, zero, zero, db, code, 0.1), reps)
                    old = best.get(name, (f, gr))
                    best[name] = (min(f, old[0]), min(gr, old[1]))
            (sf, sg), (tf, tg) = best["serial"], best["team"]
            print(f"  {act:9s} {B:4d}x{n:<5d} forward {sf * 1e6:7.1f} -> {tf * 1e6:7.1f} "
                  f"({tf / sf:.2f}x)   gradient {sg * 1e6:7.1f} -> {tg * 1e6:7.1f} ({tg / sg:.2f}x)")


def steps(names, rounds):
    workloads = dict(draw(10), **EXTRA)
    print(f"\nwhole steps: every pass on the team, the update kept serial, every pass "
          f"serial, and the bare GEMMs (2 threads); {rounds} interleaved rounds; ms are medians")
    print("| workload | team ms | serial update ms | serial ms | GEMMs ms | team / serial | "
          "team / serial update | team / GEMMs | serial / GEMMs |\n|---|---|---|---|---|---|---|---|---|")
    for name in names:
        sizes, batch, act, loss = workloads[name]
        run = make_fastgrad(sizes, batch, act, loss)
        gemms = make_gemm_floor(sizes, batch, act, loss)
        for _ in range(3):
            run()
            gemms()
        plan = run.train_step._fixed_args[2][9]
        threads, split = int(plan[K.PLAN_POOL_THREADS]), int(plan[K.PLAN_POOL_SPLIT_UPDATE])
        reps = max(5, int(0.3 / timed(run, 3)))
        per = {"team": [], "update": [], "serial": [], "gemm": []}
        for _ in range(rounds):
            for mode in per:
                fn = gemms if mode == "gemm" else run
                plan[K.PLAN_POOL_THREADS] = 0 if mode == "serial" else threads
                plan[K.PLAN_POOL_SPLIT_UPDATE] = 0 if mode == "update" else split
                timed(fn, 3)
                per[mode].append(timed(fn, reps))
        plan[K.PLAN_POOL_THREADS], plan[K.PLAN_POOL_SPLIT_UPDATE] = threads, split
        t, u, s, g = (np.array(per[k]) for k in ("team", "update", "serial", "gemm"))
        print(f"| {name}: {'-'.join(map(str, sizes))} b{batch} {act} {loss} | "
              f"{np.median(t) * 1e3:.3g} | {np.median(u) * 1e3:.3g} | {np.median(s) * 1e3:.3g} | "
              f"{np.median(g) * 1e3:.3g} | {np.median(t / s):.2f} | {np.median(t / u):.2f} | "
              f"{np.median(t / g):.2f} | {np.median(s / g):.2f} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workloads", default="u0,u1,u2,u3,u4,u5,u6,u7,u8,u9,w1,w2,w3,w4")
    ap.add_argument("--smoke", action="store_true",
                    help="one shape, one model, one workload, one round")
    args = ap.parse_args(argv)
    if not fg.share_blas_pool():
        print(f"the pool cannot be shared here: {fg.blas_pool_status()[1]}")
        return 0
    try:
        if fg.get_num_threads()[0] < 2:
            print("Numba runs one thread here: no team to compare")
        elif args.smoke:
            global PASS_SHAPES, PASS_ACTIVATIONS, UPDATE_SIZES
            PASS_SHAPES, PASS_ACTIVATIONS = [(130, 265)], ["gelu"]
            UPDATE_SIZES = [[259, 265, 64]]
            passes(1, reps=3)
            updates(1)
            steps(["u6"], 1)
        else:
            passes(args.rounds)
            updates(args.rounds)
            steps(args.workloads.split(","), args.rounds)
    finally:
        fg.share_blas_pool(False)       # the process's other callers get OpenBLAS's threads back
    return 0


if __name__ == "__main__":
    sys.exit(main())
