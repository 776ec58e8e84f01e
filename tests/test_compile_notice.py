"""The "compiling kernels" notice and the progress bar's rate after a slow
first step, with a fake slow compile: a kernel wrapper that raises Numba's
own ``numba:compile`` event around a sleep (a real cold compile takes
seconds and depends on the disk cache)."""
import io
import time

import numpy as np
import pytest
from numba.core import event

import fastgrad as fg
from fastgrad import step as fstep
from fastgrad.cli import main

MESSAGE = "compiling kernels for this model (first run only)"


class SlowFirstCompile:
    """Stands in for a TrainStep's kernel module: the first call of
    ``name`` "compiles" for ``seconds`` (a numba:compile event around a
    sleep), then every call runs the real kernel."""

    def __init__(self, kernels, name, seconds):
        self._kernels, self._name, self._seconds = kernels, name, seconds
        self.compiled = False

    def __getattr__(self, attr):
        real = getattr(self._kernels, attr)
        if attr != self._name:
            return real

        def call(*args, **kw):
            if not self.compiled:
                self.compiled = True
                with event.trigger_event("numba:compile", data={"fake": True}):
                    time.sleep(self._seconds)
            return real(*args, **kw)
        return call


def _step(fused=True):
    m = fg.MLP([5, 8, 3], seed=0)
    step = fg.TrainStep(m, fg.SoftmaxCrossEntropy(), fg.Adam(m))
    step.fused_epochs = fused
    return step


def _data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((64, 5)).astype(np.float32), rng.integers(0, 3, 64)


def test_notice_after_one_second_of_compiling():
    seen = []
    with fstep.CompileNotice(seen.append, lambda: seen.append("done"), after=0.3) as notice:
        with event.trigger_event("numba:compile", data=None):
            time.sleep(0.6)
        time.sleep(0.2)
    assert seen == [MESSAGE, "done"] and notice.shown
    quick = []
    with fstep.CompileNotice(quick.append, after=0.3):
        with event.trigger_event("numba:compile", data=None):
            time.sleep(0.05)            # a short compile: no message
        time.sleep(0.4)
    assert quick == []
    printed = []
    with fstep.CompileNotice(printed.append, after=0.2, once=True):
        for _ in range(2):              # two long compiles: one line
            with event.trigger_event("numba:compile", data=None):
                time.sleep(0.4)
            time.sleep(0.15)
    assert printed == [MESSAGE]
    assert all(not isinstance(lis, fstep.CompileNotice)
               for lis in event._registered["numba:compile"]), "listener left registered"


@pytest.mark.parametrize("fused", [True, False], ids=["run_epoch", "per-step"])
def test_fit_bar_shows_the_notice_and_keeps_its_rate(fused, monkeypatch):
    """A 1.5 s first "compile": the bar's description says so while it
    lasts, then reads "fit" again; the bar's clock starts after the first
    step, so its rate and ETA are those of the warm steps."""
    pytest.importorskip("tqdm")
    from tqdm import tqdm
    step = _step(fused)
    fake = SlowFirstCompile(step._kernels, "train_steps" if fused else "train_step", 1.5)
    step._kernels = fake
    out = io.StringIO()
    bars = []

    def bar(total, enabled, desc):
        bars.append(tqdm(total=total, desc=desc, file=out, mininterval=0))
        return bars[-1]
    monkeypatch.setattr(fstep, "_progress_bar", bar)
    fg.fit(step, *_data(), epochs=2, batch_size=8)
    assert fake.compiled
    text = out.getvalue()
    assert MESSAGE in text
    assert bars[0].desc == "fit"
    assert bars[0].format_dict["elapsed"] < 1.0, "the bar's clock counted the compile"
    assert bars[0].n == 16


def test_fit_without_tqdm_prints_the_line(monkeypatch, capsys):
    step = _step()
    step._kernels = SlowFirstCompile(step._kernels, "train_steps", 1.3)
    monkeypatch.setattr(fstep, "_progress_bar", lambda total, enabled, desc: None)
    fg.fit(step, *_data(), epochs=1, batch_size=8)
    assert f"fastgrad: {MESSAGE}" in capsys.readouterr().err


def test_warm_fit_says_nothing(monkeypatch, capsys):
    step = _step()
    step.run_epoch(*_data(), 8)                     # compiled (or loaded) now
    monkeypatch.setattr(fstep, "_progress_bar", lambda total, enabled, desc: None)
    fg.fit(step, *_data(), epochs=1, batch_size=8)
    fg.fit(step, *_data(), epochs=1, batch_size=8, progress=False)
    captured = capsys.readouterr()
    assert MESSAGE not in captured.err + captured.out


def test_demo_without_bar_prints_the_line(monkeypatch, tmp_path, capsys):
    """``fastgrad demo --no-progress`` prints the line on stderr when the
    first step compiles for more than a second."""
    real = fg.TrainStep.__init__

    def init(self, *args, **kw):
        real(self, *args, **kw)
        self._kernels = SlowFirstCompile(self._kernels, "train_steps", 1.3)
    monkeypatch.setattr(fg.TrainStep, "__init__", init)
    monkeypatch.setattr("fastgrad.cli.plot_health", lambda *a, **k: None)
    assert main(["demo", "--epochs", "1", "--no-progress", "--out",
                 str(tmp_path / "x.png")]) == 0
    assert f"fastgrad: {MESSAGE}" in capsys.readouterr().err
