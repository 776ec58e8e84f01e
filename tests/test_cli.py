"""The ``fastgrad`` command line: demo, explode, bench, and bad options."""
import subprocess
import sys
from pathlib import Path

import pytest

from fastgrad.cli import main

pytest.importorskip("sklearn", reason="the demo needs scikit-learn (pip install 'fastgrad[examples]')")
pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib (pip install 'fastgrad[examples]')")


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastgrad", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("cmd", [[], ["demo"], ["explode"], ["bench"]])
def test_help_everywhere(cmd):
    out = _run(*cmd, "--help")
    assert out.returncode == 0 and "usage: fastgrad" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["demo", "--epochs", "0"], "positive integer"),
    (["demo", "--lr", "-1"], ">= 0"),
    (["demo", "--activation", "swish"], "invalid choice"),
    (["demo", "--hidden", "12,x"], "comma-separated"),
    (["demo", "--device", "tpu"], "invalid choice"),
    (["explode", "--depth", "-3"], "positive integer"),
    # refused before any training (they aborted after it, or after minutes)
    (["explode", "--depth", "1"], "at least 2 hidden layers"),
    (["lab", "--quick", "--depth", "1"], "at least 2 hidden layers"),
    (["demo", "--seed", "-1"], "--seed: expected an integer >= 0"),
    (["demo", "--out", "/proc/no-such-dir/demo.png"], "cannot make its folder"),
    (["demo", "--out", "demo.bogusext"], "matplotlib cannot write 'bogusext'"),
    (["explode", "--out", "x.bogusext"], "matplotlib cannot write"),
    (["lab", "--quick", "--heatmap", "h.xyz"], "--heatmap 'h.xyz': matplotlib cannot write"),
    (["nonsense"], "invalid choice"),
    ([], "required"),
])
def test_bad_options_exit_2_without_traceback(args, message):
    out = _run(*args)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


def test_outputs_that_cannot_be_written_are_refused_before_training(tmp_path):
    # a folder named like a plot, a read-only file system's path: the demo
    # trained, then died in savefig with a traceback
    (tmp_path / "adir.png").mkdir()
    cases = [(tmp_path / "adir.png", "Is a directory")]
    if Path("/proc/self").exists():
        cases.append((Path("/proc/demo.png"), "cannot be written"))
    for out_path, why in cases:
        out = _run("demo", "--out", str(out_path))
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr
        assert "epoch" not in out.stdout
    fresh = tmp_path / "new.png"
    from fastgrad.cli import _check_outputs
    _check_outputs(out=(fresh, True))
    assert not fresh.exists()                   # the probe leaves no file behind
    link = tmp_path / "link.png"                # to a file not written yet: the
    link.symlink_to(tmp_path / "later.png")     # link stays, no file is left
    _check_outputs(out=(link, True))
    assert link.is_symlink() and not (tmp_path / "later.png").exists()


def test_demo_trains_and_plots(tmp_path, capsys):
    png = tmp_path / "health.png"
    assert main(["demo", "--epochs", "12", "--no-progress", "--out", str(png)]) == 0
    text = capsys.readouterr().out
    acc = float(text.split("test accuracy ")[1].split()[0])
    assert acc >= 0.95, text
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "GradientMonitor" in text


def test_explode_shows_a_real_explosion_reproducibly(tmp_path, capsys):
    args = ["explode", "--depth", "10", "--epochs", "2", "--seed", "3"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    second = capsys.readouterr().out
    table = [line for line in first.splitlines() if line.startswith("|")]
    assert table == [line for line in second.splitlines() if line.startswith("|")]
    naive = next(line for line in table if line.startswith("| naive"))
    cells = [c.strip() for c in naive.strip("|").split("|")]
    assert cells[1] == "nan" and cells[3] != "-" and int(cells[4]) > 0   # exploded, skipped
    clipped = table[3]                                                  # "+ clip by norm"
    assert "nan" not in clipped.split("|")[2]
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_explode_has_the_layer_remedies(tmp_path, capsys):
    """The residual / batch norm / layer norm / weight norm / dropout rows
    run (a reduced depth and one epoch) and appear after the original rows."""
    from fastgrad.cli import EXPLODE_ROWS
    assert main(["explode", "--depth", "4", "--epochs", "1", "--seed", "1",
                 "--out", str(tmp_path / "c.png")]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    rows = table[2:]
    assert len(rows) == len(EXPLODE_ROWS)
    assert rows[0].startswith("| naive N(0,1) init, SGD lr 0.05 |")
    new = rows[9:]
    for word in ("batch norm", "layer norm", "weight norm", "residual", "dropout 0.1"):
        assert any(word in line for line in new), word
    assert any(r.norm == "batch" and r.naive_std for r in EXPLODE_ROWS)
    assert {r.norm for r in EXPLODE_ROWS} >= {"batch", "layer"}
    assert any(r.weight_norm for r in EXPLODE_ROWS) and any(r.residual for r in EXPLODE_ROWS)
    assert any(r.dropout > 0 for r in EXPLODE_ROWS)
    for line in new:                           # every cell filled in
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == 6 and all(cells), line
    bn = next(line for line in new if "naive" in line and "batch norm" in line)
    assert [c.strip() for c in bn.strip("|").split("|")][3] == "-"   # BN keeps it finite


def test_explode_evaluates_in_eval_mode(monkeypatch):
    """Training runs in training mode, evaluation in eval mode."""
    import fastgrad as fg
    from fastgrad import cli
    seen = []
    real = fg.evaluate

    def spy(model, *a, **k):
        seen.append(model.training)
        return real(model, *a, **k)
    monkeypatch.setattr(fg, "evaluate", spy)
    data = cli.load_digits_split(0)
    row = cli.ExplodeRow("dropout", optimizer="adam", lr=1e-3, dropout=0.1, norm="batch")
    res, mon = cli.run_explode_row(row, data, 2, 16, 1, 64, 0, "cpu")
    assert seen == [False] and len(mon) > 0 and res["params_finite"]


@pytest.mark.parametrize("weight_norm", [False, True])
def test_explode_naive_init_rows_run_on_every_device(device, weight_norm):
    """The naive-init rows overwrite the weights from NumPy draws: on CUDA they
    must reach the device through the array module (CuPy refuses a NumPy array
    as the value of ``a[...] =``)."""
    from fastgrad import cli
    data = cli.load_digits_split(0)
    row = cli.ExplodeRow("naive", lr=0.05, naive_std=1.0, weight_norm=weight_norm)
    res, mon = cli.run_explode_row(row, data, 2, 8, 1, 256, 0, device)
    assert len(mon) > 0 and res["label"] == "naive"


@pytest.mark.parametrize("blocked, args, message", [
    ("sklearn", ["demo"], "scikit-learn's digits: pip install 'fastgrad[examples]'"),
    ("sklearn", ["lab", "--quick"], "scikit-learn's digits: pip install 'fastgrad[examples]'"),
    ("matplotlib", ["demo"], "plots need matplotlib: pip install 'fastgrad[examples]'"),
    ("matplotlib", ["explode"], "plots need matplotlib: pip install 'fastgrad[examples]'"),
    ("matplotlib", ["lab", "--quick"], "--heatmap"),
])
def test_a_missing_extra_is_named_before_training(tmp_path, blocked, args, message):
    """Without scikit-learn the lab's workers died in a 40-line traceback;
    without matplotlib demo and explode trained, then crashed at the plot."""
    from conftest import run_without
    out = run_without([blocked], f"from fastgrad.cli import main\nsys.exit(main({args!r}))",
                      cwd=tmp_path)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not out.stdout.strip()      # nothing trained
