"""The demo's gradient-health plot (fastgrad.cli.plot_health): loss beside the
norms, layers named as the terminal names them, per-layer lines visible."""
import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install 'fastgrad[examples]')")

from fastgrad.cli import _running_mean, plot_health  # noqa: E402
from fastgrad.health import GradientMonitor  # noqa: E402
from fastgrad.optim import Adam  # noqa: E402


class FlatModel:
    def __init__(self, sizes):
        self.layer_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.params = np.zeros(self.layer_offsets[-1])
        self.grads = np.zeros_like(self.params)


def _monitor(steps=200, names=("dense0", "dense1", "dense2")):
    rng = np.random.default_rng(0)
    model = FlatModel((5, 4, 3))
    opt = Adam(model, clip_norm=1.0)
    mon = GradientMonitor(layer_names=list(names) if names else None)
    for k in range(steps):
        model.grads[:] = rng.uniform(0.1, 1.0, 12) * (3.0 if k < 20 else 0.3)
        if k == 50:
            model.grads[0] = np.inf
        mon.record(opt.step())
    return mon


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_health closes, kept for inspection."""
    import matplotlib.pyplot as plt
    kept, real = [], plt.close

    def close(fig=None):
        kept.append(fig)
        real(fig)
    monkeypatch.setattr(plt, "close", close)
    return kept


def test_loss_beside_named_per_layer_norms(tmp_path, figures):
    mon = _monitor()
    losses = list(np.linspace(2.3, 0.1, len(mon)))
    path = tmp_path / "h.png"
    plot_health(mon, path, "demo", clip_norm=1.0, losses=losses)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    loss_ax, global_ax, layer_ax = fig.axes[:3]
    assert loss_ax.get_ylabel() == "training loss"
    assert "global" in global_ax.get_title() and "per-layer" in layer_ax.get_title()
    assert [t.get_text() for t in layer_ax.get_legend().get_texts()] == ["dense0", "dense1", "dense2"]
    # the per-layer lines are not under the global norm: that one has its own panel
    assert all("global" not in t.get_text() for t in layer_ax.get_legend().get_texts())
    bold = [ln for ln in layer_ax.get_lines() if ln.get_linewidth() >= 1.0]
    assert len(bold) == 3 and all((ln.get_alpha() or 1.0) == 1.0 for ln in bold)
    legend = [t.get_text() for t in global_ax.get_legend().get_texts()]
    assert any(t.startswith("skipped, non-finite (1)") for t in legend)
    assert any(t.startswith("clipped") for t in legend)


def test_without_losses_or_names(tmp_path, figures):
    plot_health(_monitor(steps=30, names=None), tmp_path / "h.png", "t")
    (fig,) = figures
    assert len(fig.axes) == 2
    texts = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert texts == ["layer 0", "layer 1", "layer 2"]


def test_running_mean_is_geometric_on_log_axes_and_skips_nonfinite():
    x = np.array([1.0, 100.0] * 10)
    steps, m = _running_mean(x, 2, log=True)
    np.testing.assert_allclose(m, 10.0)
    assert steps[0] == 1 and steps.size == x.size - 1
    x[5] = np.inf
    _, m = _running_mean(x, 2, log=True)
    assert np.isnan(m[4]) and np.isnan(m[5]) and np.isfinite(m[6])
    steps, m = _running_mean(x[:3], 2)            # too short to smooth: unchanged
    assert m.size == 3
