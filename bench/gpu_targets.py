"""Issue 6's three GPU targets in one short run, for a lent GPU machine.

    python bench/gpu_targets.py [--rounds 9] [--json out.json] [--smoke]

1. Clipped Adam (``fg.Adam(clip_norm=1.0).step()`` on N float32 parameters)
   against the device's copy bandwidth.  Bytes per parameter: the norm pass
   reads g (4 B), the update reads g, p, m, v and writes p, m, v (28 B):
   32 B.  Copy bandwidth: a 1 GiB device-to-device copy, bytes read plus
   written.  Target: >= 85 % of the copy's rate.
2. Fused forward (``fastgrad.kernels.cuda.dense_forward``: GEMM + bias +
   relu) against a bare ``cupy.matmul`` of the same shape.  Target <= 1.1x.
   Also fastgrad's own GEMM (``gemm.cu``, used by graphed steps) against it.
3. Whole training step (``fg.TrainStep``, batch on the GPU; eager, and with
   ``cuda_graph=True``) against PyTorch
   eager on the GPU (same MLP, ``clip_grad_norm_(1.0)``, fused Adam) on the
   workloads of width <= 256 (bench/workloads.py: tiny, mnist, deep).  Wall
   time per step over blocks of steps with a device sync at each end (the
   host's launch work counts: at these widths it is most of a step).
   Target: torch / fastgrad >= 3.  Also whether the graph was captured
   (GEMMs through fastgrad's own kernel), and whether CuPy lets cuBLAS
   GEMMs be captured at all (cupy#6290; ``GraphedTrainStep(gemm="cublas")``).

Device times come from CUDA events, wall times from ``perf_counter`` between
syncs; contenders alternate in short rounds and every ratio is the median of
per-round ratios (METHOD.md of the device tool; RESULTS.md).  ``--smoke``
runs miniature sizes once (CI-style check of the code paths; no numbers).
``--json`` is rewritten after every measurement ("complete": false until the
end), so a run stopped by its time box still leaves what it measured; a
measurement that raises is recorded with its error and the others go on
(exit status 1).
"""
import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastgrad as fg                                   # noqa: E402
from workloads import WORKLOADS, SMOKE_WORKLOADS, data, make_fastgrad, make_torch  # noqa: E402

STEP_WORKLOADS = ("tiny", "mnist", "deep")


def _cupy():
    import cupy
    return cupy


def device_ms(fn, n):
    """Mean device time of ``fn`` over n calls (CUDA events)."""
    cp = _cupy()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / n


def wall_ms(fn, n, sync):
    """Wall time per call of ``fn`` over n calls, synced at both ends."""
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return (time.perf_counter() - t) * 1e3 / n


def calls_for(fn, timer, sync, target_ms):
    """How many calls make a block of about ``target_ms``."""
    fn()
    sync()
    one = max(timer(fn, 3), 1e-3)
    return max(3, int(target_ms / one))


def interleaved(contenders, timer, rounds, target_ms, sync):
    """{name: [ms per round]} with the contenders alternating every round."""
    n = {k: calls_for(f, timer, sync, target_ms) for k, f in contenders.items()}
    out = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, f in contenders.items():
            out[k].append(timer(f, n[k]))
    return out


def ratio(times, num, den):
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


class _Flat:
    def __init__(self, p, g, offsets):
        self.params, self.grads, self.layer_offsets = p, g, offsets


def adam_vs_copy(n_params, rounds, target_ms):
    cp = _cupy()
    rng = np.random.default_rng(0)
    n_copy = (1 << 28) if n_params >= (1 << 20) else n_params     # 1 GiB of float32
    src = cp.asarray(rng.standard_normal(n_copy, dtype=np.float32))
    dst = cp.empty(n_copy, np.float32)
    p = cp.asarray(rng.standard_normal(n_params, dtype=np.float32))
    g = cp.asarray(rng.standard_normal(n_params, dtype=np.float32))
    third = n_params // 3
    offsets = np.array([0, third, 2 * third, n_params], np.int64)
    opt = fg.Adam(_Flat(p, g, offsets), lr=1e-3, clip_norm=1.0)
    # the copy floor: a device-to-device memcpy of n_copy float32
    t = interleaved({"copy": lambda: dst.data.copy_from_device_async(src.data, 4 * n_copy),
                     "adam": opt.step},
                    device_ms, rounds, target_ms, cp.cuda.Device().synchronize)
    copy_gbs = 2 * 4 * n_copy / statistics.median(t["copy"]) / 1e6
    adam_gbs = 32 * n_params / statistics.median(t["adam"]) / 1e6
    per_round = statistics.median(
        (32 * n_params / a) / (8 * n_copy / c) for a, c in zip(t["adam"], t["copy"]))
    return {"n_params": n_params, "copy_GBps": copy_gbs, "adam_GBps": adam_gbs,
            "adam_ms": statistics.median(t["adam"]), "fraction_of_copy": per_round}


def forward_vs_gemm(batch, n_in, n_out, rounds, target_ms):
    cp = _cupy()
    from fastgrad.kernels.cuda import dense_forward
    rng = np.random.default_rng(1)
    x = cp.asarray(rng.standard_normal((batch, n_in), dtype=np.float32))
    W = cp.asarray(rng.standard_normal((n_in, n_out), dtype=np.float32) / np.sqrt(n_in)
                   ).astype(np.float32)
    b = cp.asarray(rng.standard_normal(n_out, dtype=np.float32))
    z, a = cp.empty((batch, n_out), np.float32), cp.empty((batch, n_out), np.float32)
    from fastgrad.kernels.cuda.gemm import gemm
    relu = fg.ops.resolve_activation("relu")[0]
    zo = cp.empty_like(z)
    t = interleaved({"gemm": lambda: cp.matmul(x, W, out=z),
                     "fused": lambda: dense_forward(x, W, b, a, a, relu, 0.0),
                     "own_gemm": lambda: gemm(x, W, zo)},
                    device_ms, rounds, target_ms, cp.cuda.Device().synchronize)
    ref = np.maximum(cp.asnumpy(x).astype(np.float64) @ cp.asnumpy(W) + cp.asnumpy(b), 0)
    err = float(np.linalg.norm(cp.asnumpy(a) - ref) / np.linalg.norm(ref))
    return {"shape": [batch, n_in, n_out], "gemm_ms": statistics.median(t["gemm"]),
            "fused_ms": statistics.median(t["fused"]), "fused_over_gemm": ratio(t, "fused", "gemm"),
            "own_gemm_over_cublas": ratio(t, "own_gemm", "gemm"),
            "rel_error_vs_float64": err}


def _graphed(sizes, batch, act, loss, gemm="cublas"):
    """A GraphedTrainStep (GEMMs: ``gemm``) on the buffers of a TrainStep
    built as fastgrad's contender is; returns (callable, the object)."""
    from fastgrad.kernels.cuda.step import GraphedTrainStep
    from fastgrad.losses import LOSSES
    model = fg.MLP(sizes, activation=act, seed=0, device="cuda")
    opt = fg.Adam(model, lr=1e-3, clip_norm=1.0)
    ts = fg.TrainStep(model, LOSSES[loss](), opt)
    args, _ = ts._driver_args(batch)       # model, buffers and step plan
    s0, s1, s2 = opt._buffers()
    g = GraphedTrainStep(ts._loss_kind, *args, opt.rule, s0, s1, s2, opt._layer_sq,
                         opt._clip_norm, opt._clip_value, batch, gemm=gemm)
    xn, yn = data(sizes, batch, loss)
    x = model._xp.asarray(xn)
    labels = model._xp.asarray(yn) if yn.dtype.kind == "i" else g.labels
    target = g.target if yn.dtype.kind == "i" else model._xp.asarray(yn)
    hp, k = np.zeros(fg.optim._k.HP_SIZE), [0]

    def step():
        opt._fill_row(hp, k[0])
        k[0] += 1
        g(x, labels, target, hp)
    return step, g


def step_vs_torch(name, rounds, target_ms, smoke):
    cp = _cupy()
    sizes, batch, act, loss = (SMOKE_WORKLOADS if smoke else WORKLOADS)[name]
    contenders = {"fastgrad": make_fastgrad(sizes, batch, act, loss, device="cuda")}
    contenders["fastgrad_graph"] = make_fastgrad(sizes, batch, act, loss, device="cuda",
                                                 cuda_graph=True)
    for _ in range(3):
        contenders["fastgrad_graph"]()
    graphed = next(iter(contenders["fastgrad_graph"].train_step._graphs.values()))
    # Does CuPy let cuBLAS GEMMs be captured (cupy#6290)?  Three calls tell.
    cublas_step, cublas_graphed = _graphed(sizes, batch, act, loss)
    for _ in range(3):
        cublas_step()
    torch_note = None
    try:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA here")
        contenders["torch"] = make_torch(sizes, batch, act, loss, device="cuda")
    except Exception as exc:            # ImportError, or no CUDA build
        torch_note = f"{type(exc).__name__}: {exc}"

    def sync():
        cp.cuda.Device().synchronize()
        if "torch" in contenders:
            torch.cuda.synchronize()
    t = interleaved(contenders, lambda f, n: wall_ms(f, n, sync), rounds, target_ms, sync)
    out = {"workload": name, "sizes": sizes, "batch": batch,
           **{f"{k}_ms": statistics.median(v) for k, v in t.items()},
           "graph_captured": graphed.graph is not None,
           "graph_fallback": graphed.fallback_reason,
           "cublas_graph_captured": cublas_graphed.graph is not None,
           "cublas_graph_fallback": cublas_graphed.fallback_reason, "torch": torch_note}
    if "torch" in t:
        out["torch_over_fastgrad"] = ratio(t, "torch", "fastgrad")
        out["torch_over_fastgrad_graph"] = ratio(t, "torch", "fastgrad_graph")
    return out


def save(res, path):
    """Write ``res`` to ``path`` atomically (a time-out or a crash between
    sections leaves the previous, complete file)."""
    if path is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, default=str))
    os.replace(tmp, path)


def run_item(res, section, fn, *args):
    """One measurement of a section; an exception is recorded in its place
    (and printed) so that the sections after it still run.  Returns the
    result dict, or None if it failed."""
    t = time.perf_counter()
    try:
        r = fn(*args)
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        res[section].append({"args": [str(a) for a in args], "error": err,
                             "traceback": traceback.format_exc(limit=6)})
        res["errors"] += 1
        print(f"{section} {args[0]}: FAILED {err}", flush=True)
        return None
    r["seconds"] = time.perf_counter() - t
    res[section].append(r)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--block-ms", type=float, default=40.0, help="length of one timed block")
    ap.add_argument("--json", type=Path, help="write every figure here (after every section)")
    ap.add_argument("--smoke", action="store_true", help="miniature sizes, one round")
    args = ap.parse_args(argv)
    if "cuda" not in fg.available_devices():
        print(f"no GPU: {fg.device._cuda_problem()}")
        return 2
    rounds, block = (1, 0.01) if args.smoke else (args.rounds, args.block_ms)
    rt = _cupy().cuda.runtime
    res = {"device": rt.getDeviceProperties(0)["name"].decode()
           if hasattr(rt, "getDeviceProperties") else "?",
           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "complete": False, "errors": 0, "adam": [], "forward": [], "step": []}
    save(res, args.json)
    for n in ((1 << 12,) if args.smoke else (1 << 24, 1 << 26)):
        r = run_item(res, "adam", adam_vs_copy, n, rounds, block)
        save(res, args.json)
        if r:
            print(f"clipped Adam {n:>10d} params: {r['adam_GBps']:8.1f} GB/s, copy "
                  f"{r['copy_GBps']:8.1f} GB/s -> {100 * r['fraction_of_copy']:5.1f} % "
                  f"(target >= 85 %)", flush=True)
    for shape in (((16, 24, 8),) if args.smoke else
                  ((256, 1024, 1024), (128, 784, 256), (256, 256, 256), (4096, 4096, 4096))):
        r = run_item(res, "forward", forward_vs_gemm, *shape, rounds, block)
        save(res, args.json)
        if r:
            print(f"fused forward {shape}: {r['fused_ms'] * 1e3:8.1f} us vs GEMM "
                  f"{r['gemm_ms'] * 1e3:8.1f} us -> {r['fused_over_gemm']:.3f}x (target <= 1.1), "
                  f"rel. error {r['rel_error_vs_float64']:.1e}; own GEMM (graphs) "
                  f"{r['own_gemm_over_cublas']:.2f}x cuBLAS", flush=True)
    for name in STEP_WORKLOADS:
        r = run_item(res, "step", step_vs_torch, name, rounds, block, args.smoke)
        save(res, args.json)
        if not r:
            continue
        vs = (f"torch/fastgrad {r['torch_over_fastgrad']:.2f}x (target >= 3), with graph "
              f"{r['torch_over_fastgrad_graph']:.2f}x" if "torch_over_fastgrad" in r
              else f"torch: {r['torch']}")
        print(f"step {name:6s}: fastgrad {r['fastgrad_ms'] * 1e3:8.1f} us, graph "
              f"{r['fastgrad_graph_ms'] * 1e3:8.1f} us (captured: {r['graph_captured']}), "
              f"{vs}", flush=True)
        if r["graph_fallback"]:
            print(f"    graph fallback: {r['graph_fallback']}")
        print(f"    graph with cuBLAS GEMMs: "
              f"{'captured' if r['cublas_graph_captured'] else r['cublas_graph_fallback']}")
    res["complete"] = True
    save(res, args.json)
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
