"""bench/untuned_compare.py's pure parts: the workload draws, the peers'
loss check and the target counts (its smoke run is bench/bench_untuned.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import untuned_compare as uc  # noqa: E402


def test_draws_cover_every_activation_and_loss_within_bounds():
    acts = uc.builtin_activations()
    assert "identity" in acts and "gelu_tanh" in acts
    work = uc.draw(len(acts), seed=5)
    assert {w[2] for w in work.values()} == set(acts)
    assert {w[3] for w in work.values()} == set(uc.LOSSES)
    for sizes, batch, _, _ in work.values():
        assert 1 <= len(sizes) - 2 <= 8                    # hidden layers
        assert all(32 <= n <= 2048 for n in sizes)
        assert 32 <= batch <= 256
    assert uc.draw(len(acts), seed=5) == work               # fixed by the seed
    assert uc.draw(len(acts), seed=6) != work


def test_small_draws_stay_small_and_continue_the_cycle():
    n = len(uc.builtin_activations())
    work = uc.draw(30, seed=1, **uc.SMALL, start=n, prefix="s")
    assert all(max(w[0]) <= 64 for w in work.values())
    assert list(work)[:2] == ["s0", "s1"]
    assert work["s0"][2] == uc.builtin_activations()[0]     # start=n wraps to the first
    assert work["s1"][3] == uc.LOSSES[(n + 1) % 3]


def test_check_losses_accepts_float32_rounding_and_names_a_disagreement():
    ref = [2.3, 2.1, 1.9, 1.8]
    close = [v * (1 + 3e-6) for v in ref]
    worst, problems = uc.check_losses({"fastgrad": ref, "jax": close, "torch-1t": ref})
    assert problems == [] and worst == pytest.approx(3e-6, rel=1e-3)
    off = list(ref)
    off[2] *= 1 + 5 * uc.CHECK_RTOL
    worst, problems = uc.check_losses({"fastgrad": ref, "jax": close, "torch-2t": off})
    assert len(problems) == 1 and problems[0].startswith("torch-2t: loss at step 3")
    assert worst == pytest.approx(5 * uc.CHECK_RTOL * 1.9 / 2.3, rel=1e-3)


def test_check_losses_measures_against_the_first_loss_as_the_loss_falls():
    """A memorising net's loss falls towards 0: a difference is measured
    against the larger of the first and the current loss."""
    ref = [5.0, 1.0, 0.01]
    near = [5.0, 1.0, 0.01 + 0.5 * uc.CHECK_RTOL * 5.0]       # 5 % of the last loss
    assert uc.check_losses({"fastgrad": ref, "jax": near})[1] == []
    far = [5.0, 1.0, 0.01 + 2 * uc.CHECK_RTOL * 5.0]
    assert len(uc.check_losses({"fastgrad": ref, "jax": far})[1]) == 1
    rising = [1.0, 3.0, 30.0]                                   # and against the current one
    assert uc.check_losses({"fastgrad": rising, "jax": [1.0, 3.0, 30.0 * (1 + uc.CHECK_RTOL / 2)]})[1] == []


@pytest.mark.parametrize("bad", [[2.3, float("nan"), 1.9], [2.3, 2.1]])
def test_check_losses_refuses_non_finite_or_missing_losses(bad):
    _, problems = uc.check_losses({"fastgrad": [2.3, 2.1, 1.9], "jax": bad})
    assert len(problems) == 1 and problems[0].startswith("jax:")


def _per(fastgrad, **peers):
    """Two rounds of constant times (s)."""
    out = {"fastgrad": [fastgrad] * 2}
    out.update({k.replace("_", "-"): [v] * 2 for k, v in peers.items()})
    return out


def test_summary_counts_each_target_against_the_best_torch_thread_count():
    rows = [
        # meets all three (torch's best is 1 thread: 0.3 ms; 0.12 / 0.3 = 0.4)
        ("a", ([8, 8], 4, "relu", "mse"),
         _per(0.12, gemm_2t=0.1, gemm_1t=0.15, jax=0.3, torch_1t=0.3, torch_2t=0.5), 1e-7),
        # misses the GEMM floor (1.3x) and torch (0.6x), meets JAX exactly (0.6x)
        ("b", ([8, 8], 4, "tanh", "mse"),
         _per(0.13, gemm_2t=0.1, gemm_1t=0.15, jax=0.13 / 0.6, torch_2t=0.13 / 0.6), 1e-7),
        # no PyTorch installed: not counted against its target
        ("c", ([8, 8], 4, "elu", "mse"), _per(0.1, gemm_2t=0.1, jax=1.0), 1e-7),
    ]
    summary, met = uc.summarise(rows)
    assert summary[0]["torch"] == "torch-1t"
    assert summary[0]["ratios"]["torch"] == pytest.approx(0.4)
    assert met == {"gemm-2t": [2, 3], "jax": [3, 3], "torch": [1, 2]}
    text = uc.table(summary, met)
    assert "<= 1.25x GEMMs (2t) 2/3, <= 0.6x JAX 3/3, <= 0.5x PyTorch 1/2" in text
    assert "1.30 **no**" in text and text.count("| - |") >= 1


def test_floors_name_the_targets_out_of_reach():
    # the GEMMs then the update, 0.13 s (the update alone 0.02 s: the floor is
    # the contender timed in one call, not the parts' sum): floors 1.3x
    # GEMMs, 0.65x JAX (0.2 s) and 0.26x torch (0.5 s); the step (0.14 s)
    # 1.4x, 0.7x and 0.28x
    per = _per(0.14, gemm_2t=0.1, jax=0.2, torch_2t=0.5, floor=0.13, update=0.02)
    rows = [("u0", ([8, 8], 4, "relu", "mse"), per, 1e-7),
            ("u1", ([8, 8], 4, "relu", "mse"), _per(0.1, gemm_2t=0.1, jax=1.0), 1e-7)]
    summary, met = uc.summarise(rows)
    floors = summary[0]["floors"]
    assert floors["gemm-2t"] == pytest.approx(1.3)
    assert floors["jax"] == pytest.approx(0.65)
    assert floors["torch"] == pytest.approx(0.26)
    assert summary[1]["floors"] == {"gemm-2t": None, "jax": None, "torch": None}
    assert uc.out_of_reach(summary, "gemm-2t") == ["u0"]
    assert uc.out_of_reach(summary, "jax") == ["u0"]
    assert uc.out_of_reach(summary, "torch") == []
    text = uc.table(summary, met)
    assert "1.40 **no** (1.30)" in text and "0.70 **no** (0.65)" in text
    assert "0.28 yes (0.26)" in text
    assert summary[0]["over_parts"] == pytest.approx(0.14 / 0.13) and "| 1.08 |" in text
    assert "| 20 / 130 |" in text       # update alone / floor, ms
    assert summary[1]["over_parts"] is None
    assert ("<= 1.25x GEMMs (2t): u0; <= 0.6x JAX: u0; <= 0.5x PyTorch: none" in text)


def test_small_table_counts_the_run_epoch_target():
    rows = [("s0", ([8, 8], 4, "relu", "mse"), {"run_epoch": [1e-5] * 2, "fastgrad": [2e-5] * 2,
                                                "jax": [9e-5] * 2}, 0.0),
            ("s1", ([8, 8], 4, "relu", "mse"), {"run_epoch": [2e-5] * 2, "jax": [9e-5] * 2}, 0.0)]
    text = uc.small_table(rows)
    assert "9.00 yes (default)" in text and "4.50 **no** (default)" in text
    assert text.endswith("1/2.")


def test_small_table_takes_the_better_run_epoch():
    per = {"run_epoch": [2e-5] * 2, "run_epoch-sharded": [1e-5] * 2, "jax": [9e-5] * 2}
    text = uc.small_table([("s0", ([8, 8], 4, "relu", "mse"), per, 0.0)])
    assert "| 20 / 10 |" in text and "9.00 yes (threads=2)" in text
    assert text.endswith("1/1.")
    per.update({"gemm-1t": [3e-5] * 2, "gemm-shard": [1.5e-5] * 2})
    text = uc.small_table([("s0", ([8, 8], 4, "relu", "mse"), per, 0.0)])
    assert "| 30 / - / 15 |" in text and "| 6.00 |" in text      # the ceiling: JAX / shard's
    del per["run_epoch-sharded"]
    text = uc.small_table([("s0", ([8, 8], 4, "relu", "mse"), per, 0.0)])
    assert "| 20 / - |" in text and "4.50 **no** (default)" in text


def test_ratios_are_medians_of_per_round_ratios():
    per = {"fastgrad": [1.0, 2.0, 3.0], "jax": [2.0, 2.0, 2.0]}
    assert uc.ratio(per, "fastgrad", "jax") == pytest.approx(np.median([0.5, 1.0, 1.5]))
    assert uc.ratio(per, "fastgrad", "torch-1t") is None
