"""Readable views of a pytest-benchmark run: one table per workload and a
bar chart.

Every benchmark in ``bench/`` carries three parameters, ``workload``,
``device`` and ``contender``; this module reads them back from
pytest-benchmark's records (its ``--benchmark-json`` file, or the live
session in ``bench/conftest.py``) and prints, per workload, each contender
on each device with its median, its spread (interquartile range) and its
time relative to fastgrad on the same device, fastest first.

PyTorch on the CPU is measured at several thread counts (contenders
``torch-1t``, ``torch-2t``, ...); :func:`best_torch` keeps the fastest per
workload and says which thread count that was, so a table never puts
fastgrad against a badly configured peer.

    python bench/report.py fastgrad-bench.json --png bench.png
    python bench/report.py fastgrad-bench.json --write --note "..."   # into RESULTS.md
"""
import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

NOISY = 0.25            # spread (IQR) above this fraction of the median: noisy
FASTGRAD = "fastgrad"   # the contender the "x fastgrad" column divides by
_TORCH_THREADS = re.compile(r"^torch-(\d+)t$")


def records(benchmarks):
    """Flatten pytest-benchmark entries (dicts as in its JSON) into rows.

    Entries without the three parameters (e.g. an older suite's) or
    without statistics (a ``--benchmark-disable`` run) are left out."""
    rows = []
    for b in benchmarks:
        params = b.get("params") or {}
        stats = b.get("stats")
        if not stats or not all(k in params for k in ("workload", "device", "contender")):
            continue
        median, iqr = float(stats["median"]), float(stats["iqr"])
        # A call that runs several steps (fastgrad-epoch) is reported per step.
        steps = int((b.get("extra_info") or {}).get("steps", 1) or 1)
        median, iqr = median / steps, iqr / steps
        rows.append({
            "workload": str(params["workload"]), "device": str(params["device"]),
            "contender": str(params["contender"]), "median": median, "iqr": iqr,
            "rounds": int(stats["rounds"]), "fullname": b.get("fullname", b.get("name", "")),
            "extra": dict(b.get("extra_info") or {}), "noisy": is_noisy(median, iqr),
        })
        if rows[-1]["extra"].get("remeasured"):
            rows[-1]["note"] = "re-measured"
        if steps > 1:
            rows[-1]["note"] = "; ".join(filter(None, [rows[-1].get("note"),
                                                       f"per step ({steps} per call)"]))
    return rows


def is_noisy(median, iqr):
    """A measurement whose spread exceeds a quarter of its median."""
    return iqr > NOISY * median


def best_torch(rows):
    """Replace the ``torch-<n>t`` rows of each (workload, device) by the
    fastest of them, named ``torch`` with ``extra["threads"]`` and a note
    listing the thread counts tried."""
    out, best = [], {}
    for r in rows:
        m = _TORCH_THREADS.match(r["contender"])
        if not m:
            out.append(r)
            continue
        key = (r["workload"], r["device"])
        r = dict(r, extra=dict(r["extra"], threads=int(m.group(1))))
        tried = best.get(key, (None, []))[1] + [int(m.group(1))]
        if key not in best or r["median"] < best[key][0]["median"]:
            best[key] = (r, tried)
        else:
            best[key] = (best[key][0], tried)
    for (r, tried) in best.values():
        n = r["extra"]["threads"]
        note = f"best of {', '.join(map(str, sorted(tried)))} threads: {n}"
        note = "; ".join(filter(None, [note, r.get("note", "")]))
        out.append(dict(r, contender="torch", note=note))
    return out


def _fmt_time(seconds):
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def by_workload(rows):
    """{workload: [rows sorted fastest first]} in first-seen workload order."""
    groups = {}
    for r in rows:
        groups.setdefault(r["workload"], []).append(r)
    return {w: sorted(rs, key=lambda r: r["median"]) for w, rs in groups.items()}


def ratio_to_fastgrad(row, group):
    """``row``'s median over fastgrad's on the same device (None if absent)."""
    ref = [r for r in group if r["contender"] == FASTGRAD and r["device"] == row["device"]]
    return row["median"] / ref[0]["median"] if ref else None


def tables(rows):
    """One compact plain-text table per workload (list of strings)."""
    out = []
    for workload, group in by_workload(rows).items():
        cells = [("contender", "device", "median", "spread (IQR)", "x fastgrad", "")]
        for r in group:
            ratio = ratio_to_fastgrad(r, group)
            notes = [r.get("note", "")] if r.get("note") else []
            if r["noisy"]:
                notes.append("NOISY: spread > 1/4 median")
            cells.append((r["contender"], r["device"], _fmt_time(r["median"]),
                          f"{100 * r['iqr'] / r['median']:.0f}%" if r["median"] else "-",
                          "-" if ratio is None else f"{ratio:.2f}", "; ".join(notes)))
        widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
        lines = [f"workload {workload}"]
        for c in cells:
            lines.append("  " + "  ".join(v.ljust(w) if i in (0, 1, 5) else v.rjust(w)
                                          for i, (v, w) in enumerate(zip(c, widths))).rstrip())
        out.append("\n".join(lines))
    return out


def markdown_tables(rows):
    """The same tables in Markdown (for bench/RESULTS.md)."""
    out = []
    for workload, group in by_workload(rows).items():
        lines = [f"**{workload}**", "", "| contender | device | median | spread (IQR) | x fastgrad | note |",
                 "|---|---|---|---|---|---|"]
        for r in group:
            ratio = ratio_to_fastgrad(r, group)
            note = "; ".join(filter(None, [r.get("note", ""), "noisy" if r["noisy"] else ""]))
            lines.append(f"| {r['contender']} | {r['device']} | {_fmt_time(r['median'])} | "
                         f"{100 * r['iqr'] / r['median']:.0f}% | "
                         f"{'-' if ratio is None else f'{ratio:.2f}'} | {note} |")
        out.append("\n".join(lines))
    return out


def cpu_model():
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform``
    knows: timings on one host say little about another, and an Intel and
    an AMD core of the same ISA can differ by several times on the same
    step (RESULTS.md "Denormals")."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_header_info():
    """Machine, BLAS and thread settings of this process, as a dict."""
    info = {"machine": f"{cpu_model()}, {os.cpu_count()} cores, "
                       f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
            "load": f"load average {os.getloadavg()[0]:.1f} (1 min) on {os.cpu_count()} cores"}
    try:
        from threadpoolctl import threadpool_info
        blas = sorted({f"{i['internal_api']} {i.get('version') or ''} "
                       f"({i.get('architecture') or '?'} kernel, {i['num_threads']} threads)".replace("  ", " ")
                       for i in threadpool_info() if i["user_api"] == "blas"})
        info["blas"] = "; ".join(blas) or "none loaded yet"
    except ImportError:
        info["blas"] = "threadpoolctl missing"
    try:
        import numba
        try:
            layer = numba.threading_layer()      # known once a parallel kernel ran
        except ValueError:
            layer = f"{numba.config.THREADING_LAYER} (not started)"
        info["numba"] = f"numba {numba.__version__}, {numba.get_num_threads()} threads, layer {layer}"
    except ImportError:
        pass
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS",
                                      "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_CORETYPE",
                                      "OPENBLAS_L2_SIZE", "XLA_FLAGS") if k in os.environ}
    info["env"] = ", ".join(f"{k}={v}" for k, v in env.items()) or "no thread variables set"
    try:
        import torch
        info["torch"] = (f"torch {torch.__version__}, default {torch.get_num_threads()} threads "
                         "(measured at each count in the torch-<n>t rows)")
    except ImportError:
        info["torch"] = "torch not installed"
    try:
        import jax
        info["jax"] = f"jax {jax.__version__} (its own thread pool; backend {jax.default_backend()})"
    except ImportError:
        info["jax"] = "jax not installed"
    return info


def header(info):
    """Lines describing where the measurements ran."""
    keys = ("machine", "load", "python", "blas", "numba", "torch", "jax", "env")
    return [f"  {k:8s} {info[k]}" for k in keys if k in info]


def plot(rows, path, title="time per step"):
    """A bar chart (log scale) of each workload's contenders; writes ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = by_workload(rows)
    n = len(groups)
    if n == 0:
        return None
    cols = min(n, 2)
    nrows = (n + cols - 1) // cols
    height = max(2.2, 0.35 * max(len(g) for g in groups.values()) + 1.0)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, height * nrows), dpi=110,
                             squeeze=False)
    colours = {"fastgrad": "tab:blue", "torch": "tab:orange", "jax": "tab:green",
               "numpy": "tab:gray", "gemm-floor": "tab:purple"}
    for ax, (workload, group) in zip(axes.flat, groups.items()):
        group = group[::-1]                      # fastest on top
        labels = [f"{r['contender']}"
                  + (f" {r['extra']['threads']}t" if "threads" in r["extra"] else "")
                  + f" ({r['device']})" for r in group]
        times = [r["median"] * 1e3 for r in group]
        colors = [colours.get(r["contender"], colours.get(r["contender"].split("-")[0], "tab:brown"))
                  for r in group]
        ax.barh(range(len(group)), times, color=colors, alpha=0.85)
        ax.set_yticks(range(len(group)), labels, fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())   # no crowded labels
        ax.set_xlabel("median time per call (ms, log scale)", fontsize=8)
        ax.set_title(f"workload {workload}", fontsize=10)
        for i, (t, r) in enumerate(zip(times, group)):
            ratio = ratio_to_fastgrad(r, groups[workload])
            tag = (f" {t:.3g} ms" + ("" if ratio is None else f"  x{ratio:.2f}")
                   + ("  (noisy)" if r["noisy"] else ""))
            ax.text(t, i, tag, va="center", fontsize=7)
        ax.margins(x=0.35)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title + "\n(x: time relative to fastgrad on the same device; nt: threads)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tables and a bar chart from a pytest-benchmark JSON file.")
    ap.add_argument("json", help="a file written by --benchmark-json or --benchmark-autosave")
    ap.add_argument("--png", default=None, help="also write the bar chart here")
    ap.add_argument("--markdown", action="store_true", help="Markdown tables (for RESULTS.md)")
    ap.add_argument("--write", action="store_true",
                    help="replace the generated fastgrad-bench block of bench/RESULTS.md")
    ap.add_argument("--note", default="", help="a sentence on the conditions of the run")
    args = ap.parse_args(argv)
    with open(args.json) as fh:
        data = json.load(fh)
    rows = best_torch(records(data["benchmarks"]))
    extra = data.get("machine_info", {}).get("fastgrad")
    if extra:
        print("\n".join(header(extra)))
    print("\n\n".join(markdown_tables(rows) if args.markdown else tables(rows)))
    if args.png:
        plot(rows, args.png)
        print(f"bar chart: {args.png}")
    if args.write:
        when = data.get("datetime", time.strftime("%Y-%m-%d"))[:10]
        lines = [f"Run of {when}" + (f"; {args.note}" if args.note else "") + ".", ""]
        lines += [f"    {line.strip()}" for line in header(extra or {})] + [""]
        lines.append("\n\n".join(markdown_tables(rows)))
        write_block(Path(__file__).resolve().parent / "RESULTS.md", "fastgrad_bench",
                    "\n".join(lines))
    return 0


def write_block(path, tag, text):
    """Replace what lies between ``<!-- tag:begin -->`` and ``<!-- tag:end -->``."""
    src = path.read_text()
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    if begin not in src or end not in src:
        raise SystemExit(f"{path}: markers {begin} ... {end} not found")
    head, rest = src.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    sys.exit(main())
