"""Compile latency, each figure in a fresh process:

* ``import fastgrad`` alone;
* building the mnist-shaped TrainStep (784-256-256-10, relu, softmax CE,
  Adam + clip_norm) and running its first step, with an empty Numba cache
  ("cold") and again with the cache the cold run left on disk ("warm").

    python bench/compile_latency.py [--repeat 3]

Targets (issue: TrainStep): warm <= 1.5 s, cold <= 10 s; (issue: own the
cores) cold <= 5 s, warm <= 0.6 s.  "its CPU s" is the process's CPU time
over the same span (``time.process_time``): on a shared host it moves less
than the wall time.  The last column is the CPU time of the whole process
and of the compile worker it waited for (``fastgrad._compile_worker``: on a
cold cache a second process compiles the pass team's members meanwhile).

Python's bytecode cache is on, as in an installed package (pip compiles the
``.pyc`` files at install; an editable install writes them on first
import): the processes run without ``PYTHONDONTWRITEBYTECODE``, which some
machines set and which makes every process compile fastgrad's sources
again (~0.08 s of each figure), and an untimed import writes them first.
The floor row is the same span for a program that only imports NumPy and
Numba and calls one cached ``@njit`` GEMM function: what any Numba program
pays before fastgrad's own code (Numba's target set-up imports
``scipy.linalg`` for BLAS on the first compile or cache load; fastgrad loads
SciPy's BLAS module alone, which spares its steps that import, so they can
come in under the floor).
"""
import argparse
import os
import resource
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


FLOOR = """
import time
t, c = time.perf_counter(), time.process_time()
import numpy as np
import numba  # noqa: F401
import floor_kernel
a = np.zeros((128, 784), np.float32); b = np.zeros((784, 256), np.float32)
floor_kernel.gemm(a, b, np.zeros((128, 256), np.float32))
print(time.perf_counter() - t, time.process_time() - c)
"""
FLOOR_KERNEL = """
import numpy as np
from numba import njit


@njit(cache=True)
def gemm(a, b, out):
    np.dot(a, b, out)
    return out.sum()
"""


def _children_cpu():
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def run(code, cache_dir, path=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([path] + [p for p in [env.get("PYTHONPATH")] if p])
    t, c = time.perf_counter(), _children_cpu()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    inner, cpu = (float(v) for v in out.stdout.strip().splitlines()[-1].split())
    return inner, time.perf_counter() - t, cpu, _children_cpu() - c


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = {"import fastgrad": [], "first step, cold cache": [], "first step, warm cache": [],
            "floor: NumPy + Numba + one cached GEMM function, warm cache": []}
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, "floor_kernel.py"), "w") as f:
            f.write(FLOOR_KERNEL)
        run(IMPORT, scratch)                 # writes the bytecode caches (untimed)
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory() as cache:
                rows["import fastgrad"].append(run(IMPORT, cache))
                rows["first step, cold cache"].append(run(FIRST_STEP, cache))
                rows["first step, warm cache"].append(run(FIRST_STEP, cache))
                run(FLOOR, cache, path=scratch)          # fills the floor's cache (untimed)
                rows["floor: NumPy + Numba + one cached GEMM function, warm cache"].append(
                    run(FLOOR, cache, path=scratch))
    print("| what (fresh process) | in-process s (median) | its CPU s (median) "
          "| whole process s (median) | CPU s with its workers, whole process (median) |")
    print("|---|---|---|---|---|")
    for name, vals in rows.items():
        inner, whole, cpu, total = (sorted(v[i] for v in vals)[len(vals) // 2]
                                    for i in range(4))
        print(f"| {name} | {inner:.2f} | {cpu:.2f} | {whole:.2f} | {total:.2f} |")


if __name__ == "__main__":
    main()
