"""Dense layer against its BLAS floor, interleaved so host noise cancels.

The CPU hosts this project runs on alternate between fast and slow phases within
seconds, so timing contender A for ten seconds and then contender B compares two
different machines.  This script runs every contender for a few repetitions in
short rounds, back to back, takes each round's median per contender, and
reports the median over rounds of the per-round ratio to the floor.

The floor is the bare GEMM work of the layer through the same BLAS Numba uses
(``np.dot(x, W, out)`` inside ``@njit``, which calls SciPy's OpenBLAS):
forward: one GEMM ``x @ W``; forward+backward: the three GEMMs ``x @ W``,
``x.T @ dz`` and ``dz @ W.T``.

The NumPy contender runs on NumPy's own bundled OpenBLAS, a second library
with its own thread pool; interleaving it closely with SciPy's OpenBLAS at 2
threads makes the two pools' spinning workers starve each other (see
``park_blas_threads``).  So NumPy runs in its own group against its own floor,
the same three GEMMs through ``np.matmul(..., out=)``.

Targets (batch 256, 1024->1024, relu, float32): fused forward <= 1.10x the
bare GEMM, forward+backward <= 1.15x the three bare GEMMs.

Run (OPENBLAS_CORETYPE and friends can slow both sides by a third; leave them
out, and compare only within one run)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE /work/venv/bin/python bench/dense_compare.py

Options: ``--rounds``, ``--reps``, ``--threads 1 2``, ``--no-breakdown``.
"""
import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import numba
import numpy as np
import scipy
from numba import njit
from threadpoolctl import threadpool_info, threadpool_limits

import fastgrad
from fastgrad import ops
from fastgrad.kernels import cpu as K
from fastgrad.kernels.cpu.activations import RELU

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # also under `python -P`
from report import cpu_model  # noqa: E402

BATCH = 256
SHAPES = [(64, 64), (784, 256), (1024, 1024)]
TARGETS = {"fwd": 1.10, "fwd+bwd": 1.15}      # for 1024->1024, fastgrad kernel


# --- the floor: bare GEMMs through Numba's BLAS ------------------------------

@njit(nogil=True)
def gemm(x, W, out):
    np.dot(x, W, out)


@njit(nogil=True)
def gemm_xT_dz(x, dz, dW):
    np.dot(x.T, dz, dW)


@njit(nogil=True)
def gemm_dz_WT(dz, W, dx):
    np.dot(dz, W.T, dx)


@njit(nogil=True)
def gemm3(x, W, z, dz, dW, dx):
    np.dot(x, W, z)
    np.dot(x.T, dz, dW)
    np.dot(dz, W.T, dx)


# --- contenders -------------------------------------------------------------

def numpy_forward(x, W, b):
    return np.maximum(x @ W + b, np.float32(0))


def numpy_fwd_bwd(x, W, b, da):
    a = np.maximum(x @ W + b, np.float32(0))
    dz = da * (a > 0)
    return a, x.T @ dz, dz.sum(axis=0), dz @ W.T


def numpy_gemm3(x, W, z, dz, dW, dx):
    np.matmul(x, W, out=z)
    np.matmul(x.T, dz, out=dW)
    np.matmul(dz, W.T, out=dx)


def make_case(n_in, n_out, seed=0):
    """Inputs, preallocated buffers and the contenders for one shape."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    x = rng.standard_normal((BATCH, n_in), dtype=f32)
    W = (rng.standard_normal((n_in, n_out), dtype=f32) * f32(np.sqrt(2.0 / n_in)))
    b = rng.standard_normal(n_out, dtype=f32) * f32(0.1)
    da = rng.standard_normal((BATCH, n_out), dtype=f32)
    a = np.empty((BATCH, n_out), f32)
    dz = np.empty_like(a)
    dW = np.empty_like(W)
    db = np.empty(n_out, f32)
    dx = np.empty_like(x)
    scratch = np.empty_like(a)       # GEMM output of the floor / pass breakdown
    scratch2 = np.empty_like(a)

    def kern_fwd():
        K.dense_forward(x, W, b, a, a, RELU, 0.0)

    # As fastgrad.layers calls them: forward with z is a (epilogue in place on
    # the GEMM output), backward with dz is da (in place on the incoming grad).
    g = da.copy()

    def kern_fwd_bwd():
        K.dense_forward(x, W, b, a, a, RELU, 0.0)
        K.dense_backward(x, W, a, a, g, g, dW, db, dx, RELU, 0.0, True)

    def ops_fwd():
        ops.dense_forward(x, W, b, "relu")

    def ops_fwd_bwd():
        a_, z_ = ops.dense_forward(x, W, b, "relu")
        ops.dense_backward(x, W, a_, z_, da, "relu")

    kern_fwd_bwd()                   # a, dz hold realistic values for the passes
    scratch[...] = a
    # Two groups, one per OpenBLAS library (see the module docstring): the
    # first entry of each group is that group's floor.
    contenders = {
        "fwd": [
            {"gemm floor": lambda: gemm(x, W, scratch),
             "fastgrad kernel": kern_fwd,
             "fastgrad.ops": ops_fwd},
            {"numpy gemm floor": lambda: np.matmul(x, W, out=scratch),
             "numpy": lambda: numpy_forward(x, W, b)},
        ],
        "fwd+bwd": [
            {"gemm floor": lambda: gemm3(x, W, scratch, dz, dW, dx),
             "fastgrad kernel": kern_fwd_bwd,
             "fastgrad.ops": ops_fwd_bwd},
            {"numpy gemm floor": lambda: numpy_gemm3(x, W, scratch, dz, dW, dx),
             "numpy": lambda: numpy_fwd_bwd(x, W, b, da)},
        ],
    }
    # One pass or one GEMM at a time: where the fused layer's time goes.
    # bias_act runs in place on a copy of the GEMM output, as in the kernel.
    nbytes = a.nbytes
    passes = {
        "x@W (gemm)": (lambda: gemm(x, W, scratch), None),
        "bias+relu pass, in place": (lambda: K.bias_act(scratch2, b, scratch2, RELU, 0.0),
                           2 * nbytes + b.nbytes),
        "relu' + db pass, dz separate": (lambda: K.bias_act_grad(da, a, a, dz, db, RELU, 0.0),
                                         3 * nbytes + db.nbytes),
        "relu' + db pass, dz is da": (lambda: K.bias_act_grad(g, a, a, g, db, RELU, 0.0),
                                      3 * nbytes + db.nbytes),
        "x.T@dz (gemm)": (lambda: gemm_xT_dz(x, dz, dW), None),
        "dz@W.T (gemm)": (lambda: gemm_dz_WT(dz, W, dx), None),
        "memcpy (a->scratch)": (lambda: np.copyto(scratch2, a), 2 * nbytes),
    }
    scratch2[...] = scratch
    return contenders, passes


def gemm_flops(n_in, n_out):
    return 2.0 * BATCH * n_in * n_out


# --- the interleaved timer ---------------------------------------------------

def interleave(funcs, rounds, reps, warmup=3):
    """{name: [per-round median seconds]}; the order rotates every round."""
    names = list(funcs)
    for f in funcs.values():
        for _ in range(warmup):
            f()
    out = {n: [] for n in names}
    clock = time.perf_counter
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            f = funcs[n]
            ts = []
            for _ in range(reps):
                t0 = clock()
                f()
                ts.append(clock() - t0)
            out[n].append(statistics.median(ts))
    return out


def park_blas_threads():
    """Let idle OpenBLAS workers stop spinning before another library runs.

    NumPy and SciPy each bundle their own OpenBLAS, each with its own worker
    pool; an idle worker busy-waits for ~2**28 cycles (~0.1 s here) after its
    last GEMM.  On two cores a spinning NumPy worker takes the core that
    SciPy's worker needs and the GEMM stalls on scheduler ticks (4 ms), so
    contenders on different BLAS libraries are never interleaved closely.
    """
    time.sleep(0.3)


def ratio_median(num, den):
    return statistics.median(a / b for a, b in zip(num, den))


# --- report ------------------------------------------------------------------

def header():
    lines = [
        f"# fastgrad dense layer vs the BLAS GEMM floor — {datetime.date.today().isoformat()}",
        "",
        f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; "
        f"Python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"numba {numba.__version__} (threading layer: {numba.config.THREADING_LAYER}), "
        f"fastgrad {fastgrad.__version__}",
    ]
    for lib in threadpool_info():
        lines.append(
            f"- {lib['user_api']}: {lib['internal_api']} {lib.get('version')} "
            f"arch={lib.get('architecture')} threading={lib.get('threading_layer')} "
            f"({os.path.basename(lib['filepath'])})")
    env = {k: v for k, v in os.environ.items()
           if k.startswith(("OPENBLAS", "OMP_", "NUMBA_", "MKL_", "GOTO"))}
    lines.append(f"- BLAS/OpenMP environment: {env or 'none set'}")
    lines.append(f"- command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--no-breakdown", action="store_true")
    args = p.parse_args(argv)

    cases = {s: make_case(*s) for s in SHAPES}     # compiles everything first
    print(header())
    print(f"- method: {args.rounds} rounds x {args.reps} reps per contender, order "
          "rotating; per-round medians; 'x floor' is the median of per-round ratios; "
          "GFLOP/s counts the GEMM flops only (2*B*in*out per GEMM); "
          "fastgrad rows against the GEMM floor through Numba's (SciPy's) OpenBLAS, "
          "numpy rows against the same GEMMs through NumPy's OpenBLAS")
    verdicts = []
    for nt in args.threads:
        with threadpool_limits(limits=nt):
            numba.set_num_threads(nt)
            print(f"\n## {nt} thread{'s' if nt > 1 else ''}\n")
            print("| shape (B x in -> out) | pass | contender | median ms | GFLOP/s | x floor |")
            print("|---|---|---|---:|---:|---:|")
            breakdown = []
            for (n_in, n_out), (contenders, passes) in cases.items():
                shape = f"{BATCH} x {n_in} -> {n_out}"
                for mode, groups in contenders.items():
                    flops = gemm_flops(n_in, n_out) * (1 if mode == "fwd" else 3)
                    for funcs in groups:
                        park_blas_threads()
                        res = interleave(funcs, args.rounds, args.reps)
                        floor = next(iter(res.values()))
                        for name, ts in res.items():
                            med = statistics.median(ts)
                            ratio = ratio_median(ts, floor)
                            print(f"| {shape} | {mode} | {name} | {med * 1e3:.4f} | "
                                  f"{flops / med / 1e9:.1f} | {ratio:.3f} |")
                            if (n_in, n_out) == (1024, 1024) and name == "fastgrad kernel":
                                verdicts.append((nt, mode, ratio))
                if not args.no_breakdown:
                    park_blas_threads()
                    res = interleave({n: f for n, (f, _) in passes.items()},
                                     args.rounds, args.reps)
                    breakdown.append((shape, n_in, n_out, passes, res))
                sys.stdout.flush()
            if breakdown:
                print(f"\nPer-pass breakdown, {nt} thread(s): each pass alone, "
                      "interleaved the same way\n")
                print("| shape | pass | median us | GFLOP/s | GB/s |")
                print("|---|---|---:|---:|---:|")
                for shape, n_in, n_out, passes, res in breakdown:
                    for name, ts in res.items():
                        med = statistics.median(ts)
                        nbytes = passes[name][1]
                        gf = (f"{gemm_flops(n_in, n_out) / med / 1e9:.1f}"
                              if nbytes is None else "")
                        gb = f"{nbytes / med / 1e9:.1f}" if nbytes else ""
                        print(f"| {shape} | {name} | {med * 1e6:.1f} | {gf} | {gb} |")
    print("\n## Targets (256 x 1024 -> 1024, relu, float32, fastgrad kernel)\n")
    for nt, mode, ratio in verdicts:
        tgt = TARGETS[mode]
        ok = "met" if ratio <= tgt else "MISSED"
        print(f"- {nt} thread(s), {mode}: {ratio:.3f}x floor (target <= {tgt:.2f}x): {ok}")


if __name__ == "__main__":
    main()
