"""Interleaved-rounds comparison of the clipped Adam update; prints markdown.

The host alternates fast and slow phases within seconds, so the contenders
run in short alternating rounds and every ratio is taken within a round,
then the median over rounds is reported.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE \
        python bench/optim_compare.py [--rounds 15] [--sizes 1M,16M] [--threads 1] [--pause 0]

``--pause`` (0.3 s unless given) waits that many seconds before each
contender's turn and runs it once untimed: the previous contender's threads
(OpenBLAS's workers, GNU OpenMP's, PyTorch's) stop spinning first, so each
is timed as it runs alone rather than against the pool of whatever ran
before it.  Without it, on 2 cores, each contender's first calls share the
cores with the spinning threads of the one before: at 1M parameters
fastgrad's update read 1.35-2.23 ms and torch's 2.49-2.55 ms, against 0.64
and 1.18 ms with the pause (bench/RESULTS.md, "Clipped Adam update").
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_optim as B  # noqa: E402


def _parse_size(s):
    return int(s[:-1]) << 20 if s.endswith("M") else int(s)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--sizes", default="1M,16M")
    ap.add_argument("--threads", type=int, default=None, help="numba/torch/BLAS threads")
    ap.add_argument("--pause", type=float, default=0.3,
                    help="seconds of rest before each contender's turn (then one untimed call)")
    args = ap.parse_args()
    if args.threads:
        import numba
        numba.set_num_threads(args.threads)
        try:
            import torch
            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    print("| size | contender | median ms | GB/s (32 B/param) | % of its ceiling | "
          "x fastgrad (default) time | x fastgrad serial time |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n = _parse_size(size)
        runs = {}
        for name, make in B.CONTENDERS.items():
            try:
                runs[name] = make(n)
            except BaseException as e:     # pytest.skip for missing peers
                print(f"<!-- {name} skipped: {e} -->")
                continue
            runs[name]()
            runs[name]()
        reps = 10 if n < (1 << 22) else 2
        times = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, run in runs.items():
                if args.pause:
                    time.sleep(args.pause)
                    run()
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                times[k].append((time.perf_counter() - t0) / reps)
        T = {k: np.array(v) for k, v in times.items()}
        for k in runs:
            med = np.median(T[k])
            gbs = B.BYTES_PER_PARAM * n / med / 1e9
            # the parallel contenders (fastgrad's default where it chose its
            # team, and the peers, which use every thread they are given)
            # against the parallel ceiling
            parallel = k.endswith("parallel") or k in ("torch", "jax") or (
                k == "fastgrad" and runs[k].__self__.parallel)
            ref = "ceiling-parallel" if parallel else "ceiling"
            ceil = np.median(T[ref] / T[k]) * 100
            speed = np.median(T[k] / T["fastgrad"])
            speed_par = np.median(T[k] / T["fastgrad-serial"])
            label = k
            if k == "fastgrad":
                label = f"fastgrad (default: {'team' if parallel else 'serial'})"
            if k == "torch":
                label = f"torch Adam({getattr(runs[k], 'torch_flavour', '?')}) + clip_grad_norm_"
            if k == "jax":
                label = "optax chain(clip_by_global_norm, adam), jit"
            print(f"| {size} | {label} | {med * 1e3:.2f} | {gbs:.1f} | {ceil:.0f} % | "
                  f"{speed:.2f} | {speed_par:.2f} |")


if __name__ == "__main__":
    main()
