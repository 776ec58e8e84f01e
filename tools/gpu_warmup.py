"""Fill the compile caches once, before tools/gpu_session.sh starts its
parallel test workers.  Each worker would otherwise compile the same
kernels again, at the same time, inside the tests' time box -- and Numba's
cache index is read, extended and rewritten without a lock, so processes
that first compile different signatures of one function at the same time
can overwrite each other's entries.  Hence one process, Numba's work serial.

    python tools/gpu_warmup.py

1. NVRTC: every ``kernels/cuda/*.cu`` with every ``name_expressions`` entry,
   built through fastgrad's loader (``_module.kernel``); CuPy stores the
   binaries in its kernel cache (``~/.cupy/kernel_cache``), where the
   workers find them.  The sources compile in parallel threads: NVRTC
   releases the GIL.
2. Numba (``cache=True``: ``__pycache__`` beside ``kernels/cpu``) while
   NVRTC runs: a few training steps of small CPU models in float32 and
   float64 over every loss, optimizer rule and epilogue piece -- the CPU
   twins the cuda tests compare against.
3. The same steps on CUDA (eager and graphed), which also fills CuPy's
   cache with its own elementwise kernels that fastgrad calls.

Each item is timed; a failing item is named with its error and the others
go on.  Exit status 1 if any item failed.  On the host emulator
(``PYTHONPATH=tools/cuda_emulator EMU_CUPY=1``) step 1 compiles with g++.
"""
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SIZES = [12, 24, 24, 5]
BATCH = 8
LOSSES = ("SoftmaxCrossEntropy", "MSE", "BCEWithLogits")
OPTIMIZERS = (("Adam", dict(lr=1e-3, clip_norm=1.0)),
              ("AdamW", dict(lr=1e-3, weight_decay=1e-2, clip_value=0.5)),
              ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True, clip_norm=1.0)),
              ("RMSprop", dict(lr=1e-3, momentum=0.9, centered=True)))
TOOLKIT = (dict(norm="batch", dropout=0.1, residual=True, weight_norm=True),
           dict(norm="layer", residual=True))

failures = []


def item(label, fn):
    """Run one warm-up item, timed; a failure is recorded, not raised."""
    t = time.perf_counter()
    try:
        fn()
    except Exception as exc:
        failures.append(label)
        print(f"  FAILED {label} ({time.perf_counter() - t:.1f} s): {type(exc).__name__}: {exc}",
              flush=True)
        traceback.print_exc(limit=3, file=sys.stdout)
        return
    print(f"  ok     {label} ({time.perf_counter() - t:.1f} s)", flush=True)


def compile_source(filename):
    """Every instantiation of one .cu file, through the loader."""
    from fastgrad.kernels.cuda import _module
    for name in _module.NAMES[filename]:
        _module.kernel(filename, name)


def _batch(loss, dtype, device):
    import fastgrad as fg
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(dtype)
    if loss == "SoftmaxCrossEntropy":
        y = rng.integers(0, SIZES[-1], BATCH)
    else:
        y = rng.random((BATCH, SIZES[-1])).astype(dtype)
    if device == "cuda":
        xp = fg.device.array_module("cuda")
        return xp.asarray(x), xp.asarray(y)
    return x, y


def train(device, dtype, loss="SoftmaxCrossEntropy", opt=OPTIMIZERS[0], layers=None,
          graph=False, steps=3):
    """A few TrainStep calls (a graphed step captures on its second call),
    its gradients alone, then the layer path: forward, backward, one
    optimizer step, and inference."""
    import fastgrad as fg
    model = fg.MLP(SIZES, activation="gelu", dtype=dtype, device=device, seed=0,
                   **(layers or {}))
    opt_cls, opt_kw = opt
    optimizer = getattr(fg, opt_cls)(model, **opt_kw)
    loss_fn = getattr(fg, loss)()
    kw = dict(cuda_graph=True) if graph else {}
    step = fg.TrainStep(model, loss_fn, optimizer, **kw)
    x, y = _batch(loss, dtype, device)
    for _ in range(steps):
        step(x, y)
    step.gradients(x, y)
    out = model.forward(x)
    _, dy = loss_fn(out, y)
    model.backward(dy)
    optimizer.step().grad_norm          # reads the step's record back: waits for the device
    model.eval()
    model.predict(x)


def workloads(device):
    """(label, thunk) of every warm-up run on ``device``."""
    runs = []
    for dtype in (np.float32, np.float64):
        d = np.dtype(dtype).name
        for loss in LOSSES:
            runs.append((f"{device} {d} TrainStep {loss}",
                         lambda dtype=dtype, loss=loss: train(device, dtype, loss)))
        for opt in OPTIMIZERS[1:]:
            runs.append((f"{device} {d} TrainStep {opt[0]}",
                         lambda dtype=dtype, opt=opt: train(device, dtype, opt=opt)))
        for layers in TOOLKIT:
            runs.append((f"{device} {d} epilogue {layers}",
                         lambda dtype=dtype, layers=layers: train(device, dtype, layers=layers)))
    if device == "cuda":
        runs.append(("cuda float32 TrainStep(cuda_graph=True)",
                     lambda: train("cuda", np.float32, graph=True)))
    return runs


def main():
    t0 = time.perf_counter()
    import fastgrad as fg
    from fastgrad.kernels.cuda import _module
    cuda = "cuda" in fg.available_devices()
    print(f"fastgrad from {fg.__file__}; CUDA: {cuda}", flush=True)
    pool = ThreadPoolExecutor(max_workers=len(_module.NAMES))
    futures = {}
    if cuda:
        print(f"-- NVRTC: {len(_module.NAMES)} sources in parallel threads", flush=True)
        futures = {f: (pool.submit(compile_source, f), time.perf_counter())
                   for f in _module.NAMES}
    else:
        failures.append("CUDA unavailable")
        print(f"  FAILED no CUDA: {fg.device._cuda_problem()}", flush=True)
    print("-- Numba: CPU steps (meanwhile)", flush=True)
    for label, fn in workloads("cpu"):
        item(label, fn)
    for f, (fut, t) in futures.items():
        # The thread has run since t; item() times only the wait that is left.
        item(f"NVRTC {f} ({len(_module.NAMES[f])} kernels)", fut.result)
    pool.shutdown()
    if cuda:
        print("-- CUDA steps (CuPy's own kernels, cuBLAS handles, graph capture)", flush=True)
        for label, fn in workloads("cuda"):
            item(label, fn)
    print(f"WARMUP {'OK' if not failures else 'FAILED: ' + ', '.join(failures)} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
