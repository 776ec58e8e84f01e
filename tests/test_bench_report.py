"""bench/report.py (the per-workload tables and chart) and `fastgrad bench`'s
re-measuring of noisy results, on synthetic pytest-benchmark records."""
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402


def _entry(workload, device, contender, median, iqr=None, rounds=10):
    iqr = median * 0.05 if iqr is None else iqr
    return {"name": f"bench_step[{workload}-{device}-{contender}]",
            "fullname": f"bench_step.py::bench_step[{workload}-{device}-{contender}]",
            "params": {"workload": workload, "device": device, "contender": contender},
            "stats": {"median": median, "iqr": iqr, "rounds": rounds}, "extra_info": {}}


def _suite():
    return [
        _entry("tiny", "cpu", "torch-2t", 8e-4),
        _entry("tiny", "cpu", "fastgrad", 4e-5),
        _entry("tiny", "cpu", "torch-1t", 5e-4),
        _entry("tiny", "cpu", "jax", 1.6e-4, iqr=0.6e-4),     # noisy: 37 % of the median
        _entry("tiny", "cuda", "fastgrad", 2e-5),
        _entry("tiny", "cuda", "torch", 6e-5),
        _entry("mnist", "cpu", "fastgrad", 1.2e-3),
        _entry("mnist", "cpu", "gemm-floor", 1.0e-3),
        {"name": "old", "params": {"n": 1}, "stats": {"median": 1, "iqr": 0, "rounds": 1}},
        {"name": "smoke", "params": {"workload": "x", "device": "cpu", "contender": "y"},
         "stats": None},
    ]


def test_records_keep_only_complete_measurements():
    rows = report.records(_suite())
    assert len(rows) == 8
    assert {r["workload"] for r in rows} == {"tiny", "mnist"}


def test_noisy_is_a_spread_above_a_quarter_of_the_median():
    assert report.is_noisy(1.0, 0.26) and not report.is_noisy(1.0, 0.25)
    rows = {(r["workload"], r["device"], r["contender"]): r for r in report.records(_suite())}
    assert rows["tiny", "cpu", "jax"]["noisy"]
    assert not rows["tiny", "cpu", "fastgrad"]["noisy"]


def test_best_torch_keeps_the_fastest_thread_count_and_names_it():
    rows = report.best_torch(report.records(_suite()))
    torch_cpu = [r for r in rows if r["contender"].startswith("torch") and r["device"] == "cpu"]
    assert len(torch_cpu) == 1
    (t,) = torch_cpu
    assert t["contender"] == "torch" and t["median"] == 5e-4 and t["extra"]["threads"] == 1
    assert t["note"] == "best of 1, 2 threads: 1"
    cuda = [r for r in rows if r["device"] == "cuda" and r["contender"] == "torch"]
    assert len(cuda) == 1 and "note" not in cuda[0]      # no thread counts on the GPU


def test_tables_fastest_first_with_ratio_to_fastgrad_on_the_same_device():
    rows = report.best_torch(report.records(_suite()))
    tiny, mnist = report.tables(rows)
    assert tiny.splitlines()[0] == "workload tiny" and mnist.startswith("workload mnist")
    body = [line.split() for line in tiny.splitlines()[2:]]
    assert [(b[0], b[1]) for b in body] == [("fastgrad", "cuda"), ("fastgrad", "cpu"),
                                            ("torch", "cuda"), ("jax", "cpu"), ("torch", "cpu")]
    ratio = {(b[0], b[1]): float(b[5]) for b in body}
    assert ratio["torch", "cuda"] == pytest.approx(3.0)
    assert ratio["torch", "cpu"] == pytest.approx(12.5)
    assert ratio["jax", "cpu"] == pytest.approx(4.0)
    assert "NOISY" in next(line for line in tiny.splitlines() if line.split()[0] == "jax")
    floor = next(line for line in mnist.splitlines() if "gemm-floor" in line)
    assert floor.split()[5] == "0.83"
    md = report.markdown_tables(rows)[0]
    assert "| torch | cpu | 500 us | 5% | 12.50 | best of 1, 2 threads: 1 |" in md


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (extra 'examples')")
    path = report.plot(report.best_torch(report.records(_suite())), tmp_path / "b.png")
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_fastgrad_bench_remeasures_noisy_results(tmp_path, monkeypatch, capsys):
    """The first run's noisy result is measured again, by node id, and the
    second measurement replaces it in the tables and the saved JSON."""
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (extra 'examples')")
    from fastgrad import cli
    calls = []

    def fake_run(cmd, root, log):
        calls.append(cmd)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        if len(calls) == 1:
            benches = _suite()[:4]
        else:
            benches = [_entry("tiny", "cpu", "jax", 1.5e-4, iqr=1e-5)]
        Path(out).write_text(json.dumps({"benchmarks": benches, "machine_info": {}}))
        return 0

    monkeypatch.setattr(cli, "_run_pytest", fake_run)
    out_json = tmp_path / "r.json"
    status = cli.main(["bench", "--out", str(tmp_path / "b.png"), "--json", str(out_json),
                       "--log", str(tmp_path / "log.txt")])
    assert status == 0 and len(calls) == 2
    assert "--quick" in calls[0]
    again = [a for a in calls[1] if "::" in a]
    assert again == [str(BENCH / "bench_step.py::bench_step[tiny-cpu-jax]")]
    text = capsys.readouterr().out
    jax_line = next(line for line in text.splitlines() if line.split()[:2] == ["jax", "cpu"])
    assert "re-measured" in jax_line and "NOISY" not in jax_line and "150 us" in jax_line
    saved = json.loads(out_json.read_text())
    assert [b["stats"]["median"] for b in saved["benchmarks"]
            if b["params"]["contender"] == "jax"] == [1.5e-4]
    assert (tmp_path / "b.png").stat().st_size > 10_000


def test_write_block_replaces_only_the_generated_part(tmp_path):
    md = tmp_path / "R.md"
    md.write_text("# R\nkeep\n<!-- t:begin -->\nold\n<!-- t:end -->\ntail\n")
    report.write_block(md, "t", "new 1\nnew 2")
    assert md.read_text() == "# R\nkeep\n<!-- t:begin -->\nnew 1\nnew 2\n<!-- t:end -->\ntail\n"
    with pytest.raises(SystemExit, match="markers"):
        report.write_block(md, "absent", "x")


def test_headers_name_the_cpu_model(monkeypatch):
    """Timings belong to a host: the headers carry /proc/cpuinfo's model
    name where there is one, else what ``platform`` says."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        line = next(row for row in cpuinfo.read_text().splitlines()
                    if row.startswith("model name"))
        assert report.cpu_model() == line.split(":", 1)[1].strip()
        assert report.machine_header_info()["machine"].startswith(report.cpu_model())
    real_open = open

    def no_cpuinfo(path, *args, **kw):
        if str(path) == "/proc/cpuinfo":
            raise OSError("no such file")
        return real_open(path, *args, **kw)
    monkeypatch.setattr("builtins.open", no_cpuinfo)
    assert report.cpu_model()          # platform's answer, never empty
