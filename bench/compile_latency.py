"""Compile latency, each figure in a fresh process:

* ``import fastgrad`` alone;
* building the mnist-shaped TrainStep (784-256-256-10, relu, softmax CE,
  Adam + clip_norm) and running its first step, with an empty Numba cache
  ("cold") and again with the cache the cold run left on disk ("warm").

    python bench/compile_latency.py [--repeat 3]

Targets (issue: TrainStep): warm <= 1.5 s, cold <= 10 s.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

IMPORT = "import time; t = time.perf_counter(); import fastgrad; print(time.perf_counter() - t)"
FIRST_STEP = """
import time
t = time.perf_counter()
import numpy as np
import fastgrad as fg
model = fg.MLP([784, 256, 256, 10], activation="relu", seed=0)
step = fg.TrainStep(model, fg.SoftmaxCrossEntropy(), fg.Adam(model, lr=1e-3, clip_norm=1.0))
x = np.zeros((128, 784), np.float32); y = np.zeros(128, np.int64)
step(x, y)
print(time.perf_counter() - t)
"""


def run(code, cache_dir):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1]), time.perf_counter() - t


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
    print("| what (fresh process) | in-process s (median) | whole process s (median) |")
    print("|---|---|---|")
    for name, vals in rows.items():
        inner = sorted(v[0] for v in vals)[len(vals) // 2]
        whole = sorted(v[1] for v in vals)[len(vals) // 2]
        print(f"| {name} | {inner:.2f} | {whole:.2f} |")


if __name__ == "__main__":
    main()
