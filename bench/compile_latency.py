"""Compile latency, each figure in a fresh process:

* ``import fastgrad`` alone;
* building the mnist-shaped TrainStep (784-256-256-10, relu, softmax CE,
  Adam + clip_norm) and running its first step, with an empty Numba cache
  ("cold") and again with the cache the cold run left on disk ("warm").

    python bench/compile_latency.py [--repeat 3]

Targets (issue: TrainStep): warm <= 1.5 s, cold <= 10 s; (issue: own the
cores) cold <= 5 s.  "its CPU s" is the process's CPU time over the same
span (``time.process_time``): on a shared host it moves less than the wall
time.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

IMPORT = ("import time; t, c = time.perf_counter(), time.process_time(); import fastgrad; "
          "print(time.perf_counter() - t, time.process_time() - c)")
FIRST_STEP = """
import time
t, c = time.perf_counter(), time.process_time()
import numpy as np
import fastgrad as fg
model = fg.MLP([784, 256, 256, 10], activation="relu", seed=0)
step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-3, clip_norm=1.0))
x = np.zeros((128, 784), np.float32); y = np.zeros(128, np.int64)
step(x, y)
print(time.perf_counter() - t, time.process_time() - c)
"""


def run(code, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    inner, cpu = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    return inner, time.perf_counter() - t, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = {"import fastgrad": [], "first step, cold cache": [], "first step, warm cache": []}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as cache:
            rows["import fastgrad"].append(run(IMPORT, cache))
            rows["first step, cold cache"].append(run(FIRST_STEP, cache))
            rows["first step, warm cache"].append(run(FIRST_STEP, cache))
    print("| what (fresh process) | in-process s (median) | its CPU s (median) "
          "| whole process s (median) |")
    print("|---|---|---|---|")
    for name, vals in rows.items():
        inner, whole, cpu = (sorted(v[i] for v in vals)[len(vals) // 2] for i in (0, 1, 2))
        print(f"| {name} | {inner:.2f} | {cpu:.2f} | {whole:.2f} |")


if __name__ == "__main__":
    main()
