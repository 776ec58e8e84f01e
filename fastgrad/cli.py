"""The ``fastgrad`` command: ``demo`` (train on real data), ``explode`` (the
explosion lab), ``lab`` (the stability lab, :mod:`fastgrad.lab`), ``bench``
(the benchmark suite).

Bad options print a one-line reason and exit with status 2 (argparse's
convention); no traceback reaches the user for a mistyped option.
"""
import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from . import registry as _registry
from .kernels import spec as _spec

OPTIMIZERS = tuple(_spec.RULES)          # kernels/spec.py UPDATE_RULES, in code order


def _int_from(least, what):
    """An argparse type: an integer >= ``least``, described as ``what``."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_from(1, "a positive integer")
_nonneg_int = _int_from(0, "an integer >= 0")


def _depth(text):
    # the residual-block configurations need two hidden layers of one width
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 hidden layers (the residual "
                                         f"configurations need two), got {text!r}")
    return value


_EXAMPLES = "pip install 'fastgrad[examples]'"
_NO_SKLEARN = f"fastgrad's examples train on scikit-learn's digits: {_EXAMPLES}"
#: The examples' SGD (demo, explode, lab) uses heavy-ball momentum.
SGD_MOMENTUM = 0.9


def _check_outputs(**paths):
    """Refuse, before any training, a missing scikit-learn (the digits), an
    output path whose folder cannot be made or written, or a plot that
    matplotlib is missing for or cannot write in its extension (``paths``:
    option name -> (path or None, is_plot))."""
    import importlib.util
    if importlib.util.find_spec("sklearn") is None:
        raise SystemExit(_NO_SKLEARN)
    formats = None
    for option, (path, is_plot) in paths.items():
        if not path:
            continue
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--{option} {str(path)!r}: cannot make its folder "
                             f"({exc.strerror or exc})") from None
        # opened for appending (and removed again if new): a folder, a
        # read-only file or a file system that takes no files (/proc) are
        # found now, not after the training (os.access says yes to root)
        probe = path.resolve()          # a symlink's target: the link itself stays
        existed = probe.exists()
        try:
            with open(probe, "ab"):
                pass
        except OSError as exc:
            raise ValueError(f"--{option} {str(path)!r}: cannot be written "
                             f"({exc.strerror or exc})") from None
        if not existed:
            probe.unlink()
        if is_plot:
            if formats is None:
                try:
                    from matplotlib.figure import Figure
                    formats = set(Figure().canvas.get_supported_filetypes())
                except ImportError:
                    raise SystemExit(f"--{option} {str(path)!r}: plots need matplotlib: "
                                     f"{_EXAMPLES}") from None
            ext = path.suffix.lstrip(".").lower()
            if formats and ext not in formats:
                raise ValueError(f"--{option} {str(path)!r}: matplotlib cannot write "
                                 f"{ext or 'a file without an extension'!r}; use one of "
                                 f"{sorted(formats)}")


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _hidden(text):
    try:
        widths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated widths like 128,64, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive widths, got {text!r}")
    return widths


def load_digits_split(seed, test_fraction=0.2):
    """scikit-learn's bundled 8x8 digits (1,797 images, no download), scaled
    to [0, 1] and split into stratified train/test sets."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise SystemExit(_NO_SKLEARN)
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y.astype(np.int64), test_size=test_fraction,
                            random_state=seed, stratify=y)


def make_optimizer(name, model, lr, clip_norm, clip_value=None):
    import fastgrad as fg
    cls = fg.optim.optimizer_classes()[name]
    kw = {}
    if name == "sgd":
        kw["momentum"] = SGD_MOMENTUM
    return cls(model, lr=lr, clip_norm=clip_norm or None, clip_value=clip_value, **kw)


def _optimizer_label(name):
    return f"sgd (momentum {SGD_MOMENTUM:g})" if name == "sgd" else name


def _layer_label(monitor, li):
    names = monitor.layer_names
    return names[li] if names is not None and li < len(names) else f"layer {li}"


def _running_mean(x, w, log=False):
    """(steps, running mean over ``w`` steps) of ``x``; geometric with
    ``log`` (for log-scale axes); non-finite values leave gaps."""
    x = np.asarray(x, np.float64)
    if w < 2 or x.size < 2 * w:
        return np.arange(x.size), x
    ok = np.isfinite(x) & ((x > 0) if log else True)
    v = np.where(ok, np.log(np.where(ok, x, 1.0)) if log else x, np.nan)
    m = np.convolve(v, np.ones(w) / w, "valid")
    return np.arange(w - 1, x.size), np.exp(m) if log else m


def plot_health(monitor, path, title, clip_norm=None, losses=None):
    """The gradient health of a run as a PNG: the training loss (when
    ``losses`` is given), the global gradient norm with clipped and skipped
    steps marked, and each layer's gradient norm in its own panel, named as
    the terminal summary names them (``monitor.layer_names``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(len(monitor.grad_norms))
    norms = np.asarray(monitor.grad_norms, np.float64)
    layers = np.asarray(monitor.layer_norms, np.float64)
    if layers.ndim != 2:                     # no steps, or layers of varying count
        layers = np.zeros((len(steps), 0))
    panels = (["loss"] if losses is not None else []) + ["global", "layers"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), dpi=110)
    ax = dict(zip(panels, np.atleast_1d(axes)))

    if losses is not None:
        loss = np.asarray(losses, np.float64)
        a = ax["loss"]
        a.plot(np.arange(loss.size), loss, color="tab:blue", lw=0.6, alpha=0.45, label="per step")
        # A running mean over ~2 % of the run shows the trend through batch noise.
        w = max(1, loss.size // 50)
        if w > 1:
            a.plot(*_running_mean(loss, w), color="tab:blue", lw=1.6, label=f"mean of {w} steps")
        if (loss[np.isfinite(loss)] > 0).all():
            a.set_yscale("log")
        a.set_xlabel("step")
        a.set_ylabel("training loss")
        a.set_title("loss")
        a.legend(fontsize=7)

    # Per-step norms jump by 10x between batches; each curve is drawn faint
    # per step and bold as a running geometric mean, so that lines close to
    # each other stay distinguishable.
    w = max(1, len(steps) // 50)
    a = ax["global"]
    a.plot(steps, norms, color="black", lw=0.6, alpha=0.35 if w > 1 else 1.0)
    a.plot(*_running_mean(norms, w, log=True), color="black", lw=1.4,
           label="global norm" + (f" (mean of {w} steps)" if w > 1 else ""))
    clipped = np.asarray(monitor.clip_scales) < 1.0
    skipped = np.asarray(monitor.skipped, bool)
    clipped &= ~skipped
    if clipped.any():
        a.scatter(steps[clipped], norms[clipped], s=10, color="tab:orange", zorder=3,
                  label=f"clipped ({int(clipped.sum())})")
    finite = np.isfinite(norms)
    top = float(np.max(norms[finite])) if finite.any() else 1.0
    if skipped.any():
        a.scatter(steps[skipped], np.full(int(skipped.sum()), top), marker="x", s=30,
                  color="red", zorder=4, label=f"skipped, non-finite ({int(skipped.sum())})")
    if clip_norm:
        a.axhline(clip_norm, color="tab:orange", ls="--", lw=0.8, label=f"clip_norm {clip_norm:g}")
    a.set_title("global gradient norm")

    a = ax["layers"]
    cmap = plt.get_cmap("tab10" if layers.shape[1] <= 10 else "tab20")
    for li in range(layers.shape[1]):
        colour = cmap(li % cmap.N)
        if w > 1:
            a.plot(steps, layers[:, li], lw=0.5, alpha=0.2, color=colour)
        a.plot(*_running_mean(layers[:, li], w, log=True), lw=1.4, color=colour,
               label=_layer_label(monitor, li))
    a.set_title("per-layer gradient norm" + (f" (mean of {w} steps)" if w > 1 else ""))

    for key in ("global", "layers"):
        a = ax[key]
        a.set_yscale("log")
        a.set_xlabel("step")
        a.set_ylabel("L2 norm (before clipping)")
        a.legend(fontsize=7, ncol=2 if key == "layers" and layers.shape[1] > 6 else 1, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_demo(args):
    import fastgrad as fg
    from fastgrad.health import GradientMonitor

    _check_outputs(out=(args.out, True))
    from . import distributed as dist
    mpi = dist.launched_by_mpi()     # under mpiexec: data parallel, --batch-size per process
    if mpi:
        dist.init()                  # first: it picks this rank's GPU
    device = fg.set_device(args.device)
    Xtr, Xte, ytr, yte = load_digits_split(args.seed)
    sizes = [Xtr.shape[1]] + args.hidden + [10]
    model = fg.MLP(sizes, activation=args.activation, init=args.init, seed=args.seed, device=device)
    opt = make_optimizer(args.optimizer, model, args.lr, args.clip_norm)
    loss_fn = fg.SoftmaxCrossEntropy()
    step = fg.TrainStep(model, loss_fn, opt)
    fit, is_root, procs = fg.fit, True, 1
    if mpi:
        step, fit = dist.DataParallel(step), dist.fit
        is_root, procs = dist.rank() == 0, dist.world_size()
    say = print if is_root else (lambda *a, **k: None)
    monitor = GradientMonitor(layer_names=[f"dense{i}" for i in range(len(model.layers))])
    say(f"fastgrad {fg.__version__} on {device}"
        f"{f' x {procs} processes' if procs > 1 else ''}: MLP {sizes}, {args.activation}, "
        f"{_optimizer_label(args.optimizer)} lr={args.lr:g} clip_norm={args.clip_norm:g}; "
        f"digits: {len(Xtr)} train / {len(Xte)} test")
    losses = []                         # read back after training (no wait per step)

    def record(k, loss, st):
        monitor.record(st)
        losses.append(loss)

    # A cold Numba cache compiles for seconds before the first step: the
    # progress bar says so; without a bar, one line on stderr does.
    from contextlib import nullcontext
    from .step import CompileNotice
    notice = (CompileNotice(lambda msg: print(f"fastgrad: {msg}", file=sys.stderr, flush=True),
                            once=True)
              if args.no_progress and is_root else nullcontext())
    t0 = time.perf_counter()
    with notice:
        history = fit(step, Xtr, ytr, epochs=args.epochs, batch_size=args.batch_size,
                      seed=args.seed, progress=not args.no_progress, callbacks=[record])
    seconds = time.perf_counter() - t0
    result = fg.evaluate(model, loss_fn, Xte, yte)
    n_steps = len(monitor)
    say(f"trained {args.epochs} epochs ({n_steps} steps) in {seconds:.2f} s "
        f"({n_steps / seconds:.3g} steps/s, including compilation on a cold cache)")
    say(f"final train loss {history['loss'][-1]:.4f}; test loss {result['loss']:.4f}; "
        f"test accuracy {result['accuracy']:.4f}")
    say(monitor.summary())
    if is_root:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        plot_health(monitor, out, f"fastgrad demo: MLP {sizes}, {args.activation}, "
                    f"{_optimizer_label(args.optimizer)} lr={args.lr:g}, "
                    f"clip_norm={args.clip_norm:g}",
                    clip_norm=args.clip_norm or None, losses=[float(v) for v in losses])
        say(f"gradient-health plot: {out}")
    return 0


# --- the explosion lab --------------------------------------------------------

@dataclass(frozen=True)
class ExplodeRow:
    """One configuration of the explosion lab (all on the same network and data)."""
    label: str
    optimizer: str = "sgd"
    lr: float = 0.5
    activation: str = "relu"
    init: str = "he_normal"
    naive_std: Optional[float] = None   # overwrite every W with N(0, std^2): a naive init
    clip_norm: Optional[float] = None
    clip_value: Optional[float] = None
    decay: Optional[Tuple[float, int]] = None   # exponential lr decay (rate, steps)
    norm: Optional[str] = None          # "batch" | "layer" on every hidden layer
    weight_norm: bool = False
    dropout: float = 0.0
    residual: bool = False


EXPLODE_ROWS = [
    ExplodeRow("naive N(0,1) init, SGD lr 0.05", lr=0.05, naive_std=1.0),
    ExplodeRow("  + clip by norm 1.0", lr=0.05, naive_std=1.0, clip_norm=1.0),
    ExplodeRow("  + clip by value 0.01", lr=0.05, naive_std=1.0, clip_value=0.01),
    ExplodeRow("He init, SGD lr 0.5"),
    ExplodeRow("  + clip by norm 1.0", clip_norm=1.0),
    ExplodeRow("  + exponential lr decay (x0.5 / 2 steps)", decay=(0.5, 2)),
    ExplodeRow("He init, SGD lr 0.1 + clip by norm 1.0", lr=0.1, clip_norm=1.0),
    ExplodeRow("Xavier init + tanh, SGD lr 0.05", lr=0.05, activation="tanh", init="xavier_normal"),
    ExplodeRow("He init, Adam lr 1e-3 + clip by norm 1.0", optimizer="adam", lr=1e-3, clip_norm=1.0),
    # The layer-level remedies, on the same network and data.
    ExplodeRow("naive N(0,1) init, SGD lr 0.05 + batch norm", lr=0.05, naive_std=1.0, norm="batch"),
    ExplodeRow("He init, SGD lr 0.5 + batch norm", norm="batch"),
    ExplodeRow("He init, SGD lr 0.5 + layer norm", norm="layer"),
    ExplodeRow("He init, SGD lr 0.5 + weight norm", weight_norm=True),
    ExplodeRow("He init, SGD lr 0.5 + residual", residual=True),
    ExplodeRow("  + clip by norm 1.0", residual=True, clip_norm=1.0),
    ExplodeRow("He init, Adam lr 1e-3 + clip by norm 1.0 + dropout 0.1", optimizer="adam",
               lr=1e-3, clip_norm=1.0, dropout=0.1),
]


def run_explode_row(row, data, depth, width, epochs, batch_size, seed, device):
    """Train one configuration of the lab; returns (result dict, monitor).

    ``seed`` seeds the initialisation, the dropout masks and the shuffling;
    the result's ``losses`` holds the training loss of every step.

    Trains in training mode (dropout on, batch statistics) and evaluates in
    eval mode (no dropout, batch norm's running statistics)."""
    import math

    import fastgrad as fg
    from fastgrad.health import GradientMonitor
    Xtr, Xte, ytr, yte = data
    sizes = [Xtr.shape[1]] + [width] * depth + [10]
    model = fg.MLP(sizes, activation=row.activation, init=row.init, seed=seed, device=device,
                   norm=row.norm, weight_norm=row.weight_norm, dropout=row.dropout,
                   residual=row.residual)
    if row.naive_std is not None:
        # What a first attempt often does: unit-variance weights whatever the
        # fan-in.  Each relu layer then multiplies the signal by ~sqrt(width/2).
        rng = np.random.default_rng(seed)
        xp = model.backend.xp    # CuPy takes no NumPy array in a[...] =
        for layer in model.layers:
            w = rng.normal(0.0, row.naive_std, layer.W.shape)
            if layer.weight_norm:
                layer.v[...] = xp.asarray(w, dtype=layer.v.dtype)
                layer.g[...] = xp.asarray(np.sqrt((w ** 2).sum(axis=0)), dtype=layer.g.dtype)
                layer._weight_norm_forward()
            else:
                layer.W[...] = xp.asarray(w, dtype=layer.W.dtype)
    lr = row.lr
    rate = fg.schedules.exponential_decay(lr, row.decay[0], row.decay[1]) if row.decay else lr
    opt = make_optimizer(row.optimizer, model, rate, row.clip_norm, row.clip_value)
    loss_fn = fg.SoftmaxCrossEntropy()
    step = fg.TrainStep(model, loss_fn, opt)
    monitor = GradientMonitor()
    first_bad = [None]
    losses = []

    def record(k, loss, stats):
        monitor.record(stats)
        losses.append(float(loss))
        # a step whose gradient overflowed is skipped while its loss may
        # stay finite: it counts as the first non-finite step too
        if first_bad[0] is None and not (math.isfinite(loss)
                                         and math.isfinite(stats.grad_norm)):
            first_bad[0] = k

    model.train()
    history = fg.fit(step, Xtr, ytr, epochs=epochs, batch_size=batch_size, seed=seed,
                     progress=False, callbacks=[record])
    model.eval()
    test = fg.evaluate(model, loss_fn, Xte, yte)
    model.train()
    norms = np.asarray(monitor.grad_norms)
    finite = norms[np.isfinite(norms)]
    return {
        "label": row.label, "final_loss": history["loss"][-1], "accuracy": test["accuracy"],
        "first_nonfinite": first_bad[0], "skipped": int(sum(monitor.skipped)),
        "max_grad_norm": float(finite.max()) if finite.size else float("nan"),
        "params_finite": bool(np.isfinite(model.backend.to_host(model.params)).all()),
        "losses": losses,
    }, monitor


def format_explode_table(results):
    lines = ["| configuration | final loss | test acc. | first non-finite step "
             "| skipped steps | max grad norm |", "|---|---|---|---|---|---|"]
    for r in results:
        first = "-" if r["first_nonfinite"] is None else str(r["first_nonfinite"])
        lines.append(f"| {r['label'].strip()} | {r['final_loss']:.4g} | {r['accuracy']:.3f} | "
                     f"{first} | {r['skipped']} | {r['max_grad_norm']:.3g} |")
    return "\n".join(lines)


def plot_explode(monitors, labels, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 7), dpi=110)
    cmap = plt.get_cmap("tab20")
    for i, (mon, label) in enumerate(zip(monitors, labels)):
        norms = np.asarray(mon.grad_norms, np.float64)
        steps = np.arange(norms.size)
        line, = ax.plot(steps, norms, lw=1.0, color=cmap(i % 20), label=label.strip())
        bad = ~np.isfinite(norms) | np.asarray(mon.skipped, bool)
        if bad.any():
            first = int(np.argmax(bad))
            top = np.nanmax(np.where(np.isfinite(norms), norms, np.nan)) if np.isfinite(norms).any() else 1.0
            ax.scatter([first], [top], marker="x", s=60, color=line.get_color(), zorder=4)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global gradient norm (before clipping)")
    ax.set_title(title + "  (x: first non-finite gradient; later steps skipped)")
    ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _full_labels(labels):
    """Spell out an indented "  + remedy" row as its parent row plus the remedy."""
    out, parent = [], ""
    for label in labels:
        if label.startswith(" "):
            out.append(f"{parent} {label.strip()}")
        else:
            parent = label
            out.append(label)
    return out


def cmd_explode(args):
    import fastgrad as fg
    _check_outputs(out=(args.out, True))
    device = fg.set_device(args.device)
    data = load_digits_split(args.seed)
    print(f"explosion lab on {device}: {args.depth} hidden layers of {args.width}, digits, "
          f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}")
    results, monitors = [], []
    rows = EXPLODE_ROWS
    for row in rows:
        res, mon = run_explode_row(row, data, args.depth, args.width, args.epochs,
                                   args.batch_size, args.seed, device)
        results.append(res)
        monitors.append(mon)
    print(format_explode_table(results))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_explode(monitors, _full_labels([r.label for r in rows]), out,
                 f"{args.depth}x{args.width} relu/tanh MLP on digits")
    print(f"gradient-norm plot: {out}")
    return 0


def cmd_lab(args):
    # The lab builds dozens of different models: one kernel package for all of
    # them compiles once (a cold quick run took 58-62 s against 130-132 s with a
    # copy per model; bench/RESULTS.md).  An explicit setting wins.
    os.environ.setdefault("FASTGRAD_KERNEL_COPIES", "shared")
    import fastgrad as fg
    from . import lab
    _check_outputs(json=(args.json, False), markdown=(args.markdown, False),
                   heatmap=(args.heatmap, True), summary=(args.summary, True))
    device = fg.set_device(args.device)
    quick = args.quick
    n_seeds = args.seeds if args.seeds is not None else (3 if quick else 5)
    epochs = args.epochs if args.epochs is not None else (4 if quick else 10)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    rows = lab.STUDIES[args.study]
    print(f"stability lab on {device}: {args.study} study, {len(rows)} configurations x "
          f"{n_seeds} seeds; {args.depth} hidden layers of {args.width}, digits, {epochs} epochs, "
          f"batch {args.batch_size}")
    study = lab.run_study(rows, seeds, depth=args.depth, width=args.width, epochs=epochs,
                          batch_size=args.batch_size, device=device, jobs=args.jobs,
                          progress=not args.no_progress)
    text = lab.format_markdown(study)
    print(text)
    for path, content in ((args.json, lab.to_json(study)), (args.markdown, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content + "\n", encoding="utf-8")
            print(f"wrote {path}")
    for path, plot in ((args.heatmap, lab.plot_heatmaps), (args.summary, lab.plot_summary)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if plot(study, path):
                print(f"wrote {path}")
    return 0


def _bench_env():
    env = dict(os.environ)
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):   # they slow BLAS by a third
        env.pop(var, None)
    return env


def _run_pytest(cmd, root, log):
    """Run pytest, echo its progress lines (not its wide tables), append
    everything to ``log``; returns the exit status."""
    with open(log, "a") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=root, env=_bench_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        echo = True
        for line in proc.stdout:
            fh.write(line)
            if line.startswith("---") and "benchmark" in line:
                echo = False                   # pytest-benchmark's own tables: in the log only
            elif line.startswith("===") and ("passed" in line or "failed" in line or "error" in line):
                echo = True
            if echo:
                print(line, end="", flush=True)
        return proc.wait()


def _load_bench_json(path):
    import json
    with open(path) as fh:
        return json.load(fh)


def _bench_report(bench):
    """bench/report.py of the source checkout, loaded by path (it is not part
    of the installed package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("fastgrad_bench_report", bench / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cmd_bench(args):
    """Run bench/ (pytest-benchmark), re-measure noisy results, print one
    table per workload and write a bar chart."""
    import shutil
    import tempfile

    root = Path(__file__).resolve().parent.parent
    bench = root / "bench"
    if not bench.is_dir():
        print(f"fastgrad bench: no benchmark suite next to this install ({bench}); "
              "run it from a source checkout (pip install -e '.[test,peers,examples]')",
              file=sys.stderr)
        return 2
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-ratio-tables"]
    if args.smoke:
        cmd = base + [str(bench), "--benchmark-disable"] + (["-k", args.filter] if args.filter else [])
        print("running:", " ".join(cmd))
        return subprocess.call(cmd, cwd=root, env=_bench_env())
    report = _bench_report(bench)
    log = Path(args.log)
    log.write_text("")
    tmp = Path(tempfile.mkdtemp(prefix="fastgrad-bench-"))
    try:
        return _bench_and_report(args, base, root, bench, report, log, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench_and_report(args, base, root, bench, report, log, tmp):
    import json
    first = tmp / "run.json"
    cmd = base + [str(bench), f"--benchmark-json={first}"] + ([] if args.full else ["--quick"])
    if args.filter:
        cmd += ["-k", args.filter]
    print(f"fastgrad bench ({'full' if args.full else 'quick'} mode; pytest's full output: {log})")
    print("running:", " ".join(cmd), flush=True)
    status = _run_pytest(cmd, root, log)
    if not first.exists():
        print(f"fastgrad bench: no measurements (pytest exit status {status}); see {log}",
              file=sys.stderr)
        return status or 1
    data = _load_bench_json(first)
    noisy = [b["fullname"] for b in data["benchmarks"]
             if b.get("stats") and report.is_noisy(b["stats"]["median"], b["stats"]["iqr"])]
    if noisy and args.remeasure:
        # A busy host makes a few measurements spread wide: measure those
        # again, longer, and keep the second result (flagged if still noisy).
        print(f"re-measuring {len(noisy)} noisy result(s) (spread > 1/4 of the median)", flush=True)
        second = tmp / "again.json"
        cmd = base + [str(bench / n) for n in noisy] + [
            f"--benchmark-json={second}", "--benchmark-min-rounds=30", "--benchmark-max-time=2.0"]
        _run_pytest(cmd, root, log)
        if second.exists():
            again = {b["fullname"]: b for b in _load_bench_json(second)["benchmarks"]}
            for i, b in enumerate(data["benchmarks"]):
                if b["fullname"] in again:
                    data["benchmarks"][i] = dict(again[b["fullname"]])
                    data["benchmarks"][i]["extra_info"] = dict(
                        again[b["fullname"]].get("extra_info") or {}, remeasured=True)
    rows = report.best_torch(report.records(data["benchmarks"]))
    info = data.get("machine_info", {}).get("fastgrad") or report.machine_header_info()
    print()
    print("\n".join(["where:"] + report.header(info)))
    print("x fastgrad: median time / fastgrad's median on the same device; "
          "spread: interquartile range / median")
    for table in report.tables(rows):
        print()
        print(table)
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(data, indent=1))
    if rows:
        png = Path(args.out)
        png.parent.mkdir(parents=True, exist_ok=True)
        report.plot(rows, png, title=f"fastgrad bench ({'full' if args.full else 'quick'})")
        print(f"\nbar chart: {png}")
    print(f"results: {out_json} (compare later runs: python -m pytest bench --benchmark-compare)")
    return status


def build_parser():
    parser = argparse.ArgumentParser(prog="fastgrad", description="fastgrad: fused compiled "
                                     "kernels for training dense networks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="train an MLP on scikit-learn's handwritten digits",
                          description="Train an MLP on scikit-learn's bundled 8x8 digits, print "
                          "the test accuracy and write a gradient-health plot.")
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--epochs", type=_positive_int, default=30)
    demo.add_argument("--batch-size", type=_positive_int, default=32)
    demo.add_argument("--hidden", type=_hidden, default=[128, 128],
                      help="hidden widths, comma-separated (default 128,128)")
    demo.add_argument("--activation", default="relu",
                      choices=_registry.names())
    demo.add_argument("--init", default="he_normal",
                      choices=["xavier_uniform", "xavier_normal", "he_uniform", "he_normal"])
    demo.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    demo.add_argument("--lr", type=_nonneg_float, default=1e-3)
    demo.add_argument("--clip-norm", type=_nonneg_float, default=1.0,
                      help="clip the global gradient norm to this (0: off)")
    demo.add_argument("--seed", type=_nonneg_int, default=0)
    demo.add_argument("--out", default="fastgrad-demo.png", help="path of the PNG plot")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    explode = sub.add_parser("explode", help="exploding gradients and their remedies, side by side",
                             description="Train one deep MLP on the digits under configurations that "
                             "make gradients explode and under each remedy; print one table and "
                             "write one plot of the gradient norms.")
    explode.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    explode.add_argument("--depth", type=_depth, default=16, help="hidden layers (default 16)")
    explode.add_argument("--width", type=_positive_int, default=64)
    explode.add_argument("--epochs", type=_positive_int, default=10)
    explode.add_argument("--batch-size", type=_positive_int, default=64)
    explode.add_argument("--seed", type=_nonneg_int, default=0)
    explode.add_argument("--out", default="fastgrad-explode.png", help="path of the PNG plot")
    explode.set_defaults(func=cmd_explode)

    lab = sub.add_parser("lab", help="vanishing and exploding gradients over many seeds, "
                         "with a verdict on each claim",
                         description="Train one deep MLP on the digits under every configuration "
                         "of the vanishing and/or explosion study, once per seed; print the "
                         "tables (median and range over the seeds) and the verdict on each "
                         "claim, and write the heatmap and summary plots.")
    lab.add_argument("--study", default="all", choices=["vanishing", "explosion", "all"])
    lab.add_argument("--seeds", type=_positive_int, default=None,
                     help="seeds per configuration (default 5; 3 with --quick)")
    lab.add_argument("--first-seed", type=_nonneg_int, default=0,
                     help="the seeds are first-seed, first-seed + 1, ... (default 0)")
    lab.add_argument("--quick", action="store_true",
                     help="3 seeds and 4 epochs unless --seeds / --epochs say otherwise")
    lab.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    lab.add_argument("--depth", type=_depth, default=16, help="hidden layers (default 16)")
    lab.add_argument("--width", type=_positive_int, default=64)
    lab.add_argument("--epochs", type=_positive_int, default=None, help="default 10 (4 with --quick)")
    lab.add_argument("--batch-size", type=_positive_int, default=64)
    lab.add_argument("--jobs", type=_positive_int, default=None,
                     help="worker processes (default: one per core on the CPU, 1 on a GPU)")
    lab.add_argument("--json", default=None, help="write every row and verdict to this JSON file")
    lab.add_argument("--markdown", default=None, help="write the generated tables to this file")
    lab.add_argument("--heatmap", default="fastgrad-lab-heatmap.png",
                     help="PNG of per-layer gradient norms over steps ('' for none)")
    lab.add_argument("--summary", default="fastgrad-lab-summary.png",
                     help="PNG of the small multiples by family ('' for none)")
    lab.add_argument("--no-progress", action="store_true", help="no progress bar")
    lab.set_defaults(func=cmd_lab)

    bench = sub.add_parser("bench", help="compare fastgrad with PyTorch and JAX on each device",
                           description="Run the pytest-benchmark suite in bench/ (from a source "
                           "checkout) over the available devices, re-measure noisy results, and "
                           "print one table per workload (contender, device, median, spread, "
                           "x fastgrad) and write a bar chart.  Quick mode (whole training steps, "
                           "about 2 minutes on 2 cores) unless --full.")
    bench.add_argument("--full", action="store_true",
                       help="every benchmark (dense layer, optimizers, epilogue pieces too)")
    bench.add_argument("--smoke", action="store_true", help="run each benchmark once, untimed")
    bench.add_argument("-k", dest="filter", default=None, help="only benchmarks matching this")
    bench.add_argument("--out", default="fastgrad-bench.png", help="path of the bar chart (PNG)")
    bench.add_argument("--json", default="fastgrad-bench.json", help="path of the results (JSON)")
    bench.add_argument("--log", default="fastgrad-bench.log", help="pytest's full output")
    bench.add_argument("--no-remeasure", dest="remeasure", action="store_false",
                       help="do not measure noisy results a second time")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as exc:
        parser.exit(2, f"fastgrad {args.command}: error: {exc}\n")
    except Exception as exc:   # a device that cannot run, etc.: say why, no traceback
        from .device import DeviceUnavailableError
        if isinstance(exc, DeviceUnavailableError):
            parser.exit(2, f"fastgrad {args.command}: error: {exc}\n")
        raise
