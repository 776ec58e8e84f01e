"""Data-parallel step time: 1 process x 2 threads vs 2 processes x 1 thread.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/distributed_compare.py

Same global batch on both sides (mnist 128, wide 256: local batch 64 / 128
per process).  The one-process side is ``TrainStep`` with
``fastgrad.set_num_threads(2)``; the two-process side is
``fastgrad.distributed.DataParallel`` under ``mpiexec -n 2``, one thread per
process.  Inside the loop the gradient scaling + allreduce is timed
separately (``dp.last_comm_seconds``: it includes waiting for the slower
rank); a separate loop times the bare ``Allreduce`` of the gradient buffer
after a barrier (pure transfer).  The two sides alternate in ROUNDS rounds,
each in a fresh process, and the table reports medians over all steps.

Scaling efficiency = t(1 process x 2 threads) / t(2 processes x 1 thread):
1.0 means the two single-thread processes are as fast as one two-thread
process on the same global batch.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import cpu_model  # noqa: E402
from workloads import WORKLOADS, data  # noqa: E402

HERE = os.path.abspath(__file__)
DEFAULT = ["mnist", "wide"]


def build(name, batch, dtype="float32"):
    import fastgrad as fg
    from fastgrad.losses import LOSSES
    sizes, _, act, loss = WORKLOADS[name]
    model = fg.MLP(sizes, activation=act, seed=0, dtype=dtype)
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    return fg.TrainStep(model, LOSSES[loss](), opt), sizes, loss


def role_single(names, steps):
    import fastgrad as fg
    fg.set_num_threads(2)
    out = {}
    for name in names:
        gbatch = WORKLOADS[name][1]
        step, sizes, loss = build(name, gbatch)
        x, y = data(sizes, gbatch, loss)
        for _ in range(3):
            step(x, y)
        t = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step(x, y)
            t.append(time.perf_counter() - t0)
        out[name] = {"step": t}
    print("RESULT " + json.dumps(out), flush=True)


def role_rank(names, steps):
    import fastgrad as fg
    from fastgrad import distributed as dist
    fg.set_num_threads(1)
    r, w = dist.init()
    comm = dist._comm
    out = {}
    for name in names:
        gbatch = WORKLOADS[name][1]
        local = gbatch // w
        step, sizes, loss = build(name, local)
        dp = dist.DataParallel(step)
        x, y = data(sizes, gbatch, loss)        # the global batch; this rank's slice below
        xs, ys = x[r * local:(r + 1) * local], y[r * local:(r + 1) * local]
        for _ in range(3):
            dp(xs, ys)
        t, c = [], []
        comm.Barrier()
        for _ in range(steps):
            t0 = time.perf_counter()
            dp(xs, ys)
            t.append(time.perf_counter() - t0)
            c.append(dp.last_comm_seconds)
        # The bare allreduce of the gradient buffer (after a barrier, so no
        # waiting for a slower rank is counted).
        from mpi4py import MPI
        buf = step.opt.grads.copy()
        bare = []
        for _ in range(max(5, steps // 2)):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            bare.append(time.perf_counter() - t0)
        res = {"step": t, "comm": c, "bare": bare, "n_params": int(step.opt.params.size)}
        allres = comm.gather(res, root=0)
        if r == 0:
            # A step ends when the slowest rank's does: take the max per step.
            out[name] = {k: np.max([a[k] for a in allres], axis=0).tolist()
                         for k in ("step", "comm", "bare")}
            out[name]["n_params"] = res["n_params"]
    if r == 0:
        print("RESULT " + json.dumps(out), flush=True)


def _env(threads):
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):   # they slow BLAS by a third
        env.pop(var, None)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    return env


def _result(cmd, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


def mpiexec():
    local = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return local if os.path.exists(local) else shutil.which("mpiexec")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", default=DEFAULT)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--role", choices=["main", "single", "rank"], default="main",
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "single":
        return role_single(args.workloads, args.steps)
    if args.role == "rank":
        return role_rank(args.workloads, args.steps)

    launcher = mpiexec()
    if launcher is None:
        raise SystemExit("no mpiexec: pip install 'fastgrad[distributed]'")
    common = [HERE, "--workloads", *args.workloads, "--steps", str(args.steps)]
    single = [sys.executable] + common + ["--role", "single"]
    # No --oversubscribe: it makes Open MPI yield the core while polling, which
    # measured a 1 MB allreduce at 14 ms instead of 0.14 ms.
    multi = [launcher, "-n", "2", sys.executable] + common + ["--role", "rank"]
    acc = {"single": {}, "multi": {}}
    for _ in range(args.rounds):
        for side, cmd, env in (("single", single, _env(2)), ("multi", multi, _env(1))):
            res = _result(cmd, env)
            for name, d in res.items():
                slot = acc[side].setdefault(name, {})
                for k, v in d.items():
                    if isinstance(v, list):
                        slot.setdefault(k, []).extend(v)
                    else:
                        slot[k] = v

    import fastgrad as fg
    from threadpoolctl import threadpool_info
    blas = sorted({(i["internal_api"], i.get("architecture")) for i in threadpool_info()
                   if i["user_api"] == "blas"})
    ver = subprocess.run([launcher, "--version"], capture_output=True, text=True,
                         env=_env(1)).stdout.splitlines()[0]
    print(f"# {time.strftime('%Y-%m-%d')} · fastgrad {fg.__version__} · "
          f"{cpu_model()} · {os.cpu_count()} cores · "
          f"BLAS {blas} · {ver} · float32 · Adam + clip_norm · "
          f"{args.rounds} rounds x {args.steps} steps per side\n")
    print("| workload | params | global batch | 1 proc x 2 thr, ms | 2 proc x 1 thr, ms "
          "| scaling efficiency | scale+allreduce in step, ms (share) | bare allreduce, ms "
          "(share) | allreduce GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.workloads:
        s, m = acc["single"][name], acc["multi"][name]
        ts, tm = np.median(s["step"]), np.median(m["step"])
        tc, tb = np.median(m["comm"]), np.median(m["bare"])
        nbytes = 4 * m["n_params"]
        print(f"| {name} | {m['n_params']:,} | {WORKLOADS[name][1]} | {ts * 1e3:.2f} | "
              f"{tm * 1e3:.2f} | {ts / tm:.2f} | {tc * 1e3:.2f} ({tc / tm:.0%}) | "
              f"{tb * 1e3:.2f} ({tb / tm:.0%}) | {nbytes / tb / 1e9:.1f} |")


if __name__ == "__main__":
    main()
