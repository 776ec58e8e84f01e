"""The stability lab (``fastgrad lab``): verdict rule, determinism over a
seed list, JSON schema, and a tiny run of the command."""
import json
import math
import os

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the lab needs scikit-learn (pip install 'fastgrad[examples]')")
pytest.importorskip("matplotlib", reason="the lab needs matplotlib (pip install 'fastgrad[examples]')")

from fastgrad import lab  # noqa: E402
from fastgrad.cli import ExplodeRow, main  # noqa: E402

TINY = dict(depth=3, width=8, epochs=1, batch_size=128)


# --- the rule, on synthetic studies whose answer is known -----------------------------

@pytest.mark.parametrize("better, worse, metric, outcome", [
    ([0.9, 0.95, 0.92], [0.1, 0.3, 0.2], "accuracy", "holds"),
    ([0.1, 0.3, 0.2], [0.9, 0.95, 0.92], "accuracy", "fails"),
    ([0.5, 0.9], [0.4, 0.6], "accuracy", "tie"),                 # ranges overlap
    ([0.5, 0.55], [0.6, 0.7], "accuracy", "fails"),
    ([0.5, 0.6], [0.6, 0.6], "accuracy", "tie"),                 # touching ranges tie
    ([0.61, 0.62], [0.55, 0.6], "accuracy", "tie"),              # apart, but by < 0.02
    ([0.63, 0.64], [0.55, 0.6], "accuracy", "holds"),
    ([1.0, 2.0], [3.0, 4.0], "final_loss", "holds"),             # lower is better
    ([math.inf, math.inf], [4, 7], "first_nonfinite", "holds"),  # never beats step 7
    ([math.inf, 3], [4, 7], "first_nonfinite", "tie"),
    ([math.inf, math.inf], [math.inf, math.inf], "first_nonfinite", "tie"),
    ([3, 5], [math.inf, math.inf], "steps_to_move", "holds"),    # moving beats never
    ([0.0, 0.1], [2.0, 3.5], "vanishing", "holds"),
    ([0.0, 0.1], [0.5, 0.9], "vanishing", "tie"),                # < 1 decade apart
    ([math.nan, 0.9], [0.1, 0.2], "accuracy", "holds"),          # NaN seeds left out
    ([math.nan], [0.1], "accuracy", "tie"),
])
def test_compare_rule(better, worse, metric, outcome):
    assert lab.compare(better, worse, metric) == outcome


def test_compare_refuses_a_metric_without_direction():
    with pytest.raises(ValueError, match="vanishing"):
        lab.compare([1.0], [2.0], "layer_ratio")


@pytest.mark.parametrize("outcomes, expected", [
    (["holds", "holds"], "supported"),
    (["holds"], "supported"),
    (["fails", "tie"], "refuted"),
    (["tie", "tie"], "refuted"),
    (["holds", "tie"], "depends"),
    (["holds", "fails", "holds"], "depends"),
])
def test_verdict_rule(outcomes, expected):
    assert lab.verdict(outcomes) == expected


def _synthetic(values, metric):
    """A study table: id -> row with one run per seed carrying ``metric``."""
    return {rid: {"runs": [{"metrics": {metric: v}} for v in vals]}
            for rid, vals in values.items()}


def test_judge_on_synthetic_studies_with_known_answers():
    rows = _synthetic({"A": [0.9, 0.92, 0.95, 0.91, 0.93],      # clearly best
                       "B": [0.5, 0.55, 0.52, 0.58, 0.51],
                       "C": [0.50, 0.60, 0.55, 0.52, 0.57],      # like B
                       "D": [0.1, 0.12, 0.11, 0.13, 0.1]}, "accuracy")
    comp = lab.Comparison
    claims = [
        lab.Claim("S", "A beats B and C", (comp("A", "B", "accuracy", "x"),
                                            comp("A", "C", "accuracy", "y"))),
        lab.Claim("R", "D beats B; C beats B", (comp("D", "B", "accuracy", "x"),
                                                 comp("C", "B", "accuracy", "y"))),
        lab.Claim("P", "C beats D and B", (comp("C", "D", "accuracy", "vs D"),
                                            comp("C", "B", "accuracy", "vs B"))),
        lab.Claim("M", "needs a row not run", (comp("A", "Z", "accuracy", "x"),)),
    ]
    judged = {c["id"]: c for c in lab.judge(claims, rows)}
    assert set(judged) == {"S", "R", "P"}              # a claim missing a row is not judged
    assert judged["S"]["verdict"] == "supported"
    assert judged["R"]["verdict"] == "refuted"
    assert [c["outcome"] for c in judged["R"]["comparisons"]] == ["fails", "tie"]
    assert judged["P"]["verdict"] == "depends"
    assert "holds for vs D" in judged["P"]["reason"] and "vs B (tie)" in judged["P"]["reason"]


def test_every_claim_names_rows_of_the_studies():
    ids = {r.id for r in lab.STUDIES["all"]}
    assert len(ids) == len(lab.STUDIES["all"])
    for claim in lab.CLAIMS:
        assert claim.comparisons
        for c in claim.comparisons:
            assert {c.better, c.worse} <= ids, (claim.id, c)
            assert lab.METRICS[c.metric][1] is not None


def test_studies_cover_the_issue():
    acts = {r.row.activation for r in lab.VANISHING_ROWS}
    assert acts >= {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu_tanh", "softplus",
                    "silu"}
    for act in ("sigmoid", "tanh"):     # naive and Xavier init
        assert any(r.row.activation == act and r.row.naive_std for r in lab.VANISHING_ROWS)
        assert any(r.row.activation == act and r.row.init.startswith("xavier")
                   for r in lab.VANISHING_ROWS)
    assert any(r.row.norm == "batch" for r in lab.VANISHING_ROWS)
    assert any(r.row.residual for r in lab.VANISHING_ROWS)
    # `fastgrad explode`'s rows open the explosion study, unchanged but for labels.
    from fastgrad.cli import EXPLODE_ROWS
    for lab_row, row in zip(lab.EXPLOSION_ROWS, EXPLODE_ROWS):
        assert lab_row.row == ExplodeRow(lab_row.label, **{
            k: getattr(row, k) for k in row.__dataclass_fields__ if k != "label"})


# --- metrics -------------------------------------------------------------------

def test_steps_to_move():
    flat = [2.3] * 20
    assert lab.steps_to_move(flat) == math.inf
    falling = [2.3] * 5 + [1.0] * 10
    k = lab.steps_to_move(falling)
    # the 5-step mean first drops to 90 % of 2.3 when enough 1.0s are in it
    window = np.array(falling[k - 4:k + 1])
    assert window.mean() <= 0.9 * 2.3 < np.array(falling[k - 5:k]).mean()
    assert lab.steps_to_move([math.nan, 1.0]) == math.inf
    # Falling from a bad start to the chance level ln 10 is not learning.
    assert lab.steps_to_move([50.0] * 3 + [2.3] * 20) == math.inf
    assert lab.steps_to_move([50.0] * 3 + [1.0] * 20) == 7
    assert lab.steps_to_move([2.0, math.nan, 0.1, 0.1, 0.1, 0.1, 0.1]) == 6


def test_layer_ratio_and_vanishing():
    L = np.array([[1e-3, 1.0], [2e-3, 1.0], [np.nan, 1.0], [3e-3, 0.0]])
    assert lab.layer_ratio(L) == pytest.approx(1.5e-3)
    assert lab.vanishing(1e-3) == pytest.approx(3.0)
    assert lab.vanishing(5.0) == 0.0                     # larger at the input: nothing lost
    assert lab.vanishing(0.0) == math.inf
    assert math.isnan(lab.vanishing(math.nan))
    assert math.isnan(lab.layer_ratio(np.full((3, 2), np.nan)))


def test_summarize():
    s = lab.summarize([3.0, 1.0, math.inf, math.nan, 2.0])
    assert s == {"median": 2.5, "min": 1.0, "max": math.inf}
    assert math.isnan(lab.summarize([math.nan])["median"])


# --- runs ----------------------------------------------------------------------

def _tiny_rows():
    by_id = {r.id: r for r in lab.STUDIES["all"]}
    return [by_id[i] for i in ("V2", "V8", "V21", "E1", "E2", "E4", "E5", "E21")]


@pytest.fixture(scope="module")
def tiny_study():
    return lab.run_study(_tiny_rows(), [3, 7], jobs=1, progress=False, **TINY)


def test_a_seed_list_gives_identical_rows(tiny_study):
    again = lab.run_study(_tiny_rows(), [3, 7], jobs=1, progress=False, **TINY)
    assert lab.to_json(again) == lab.to_json(tiny_study)
    for rid, runs in tiny_study["curves"].items():
        for a, b in zip(runs, again["curves"][rid]):
            np.testing.assert_array_equal(a["layer_norms"], b["layer_norms"])
    # Each seed is a different run (initialisation, shuffling, dropout).
    v21 = next(r for r in tiny_study["rows"] if r["id"] == "V21")["runs"]
    assert v21[0]["metrics"]["final_loss"] != v21[1]["metrics"]["final_loss"]


def test_worker_processes_give_the_same_rows(tiny_study):
    rows = _tiny_rows()[:2]
    par = lab.run_study(rows, [3, 7], jobs=2, progress=False, **TINY)
    ser = {r["id"]: r for r in tiny_study["rows"]}
    for r in par["rows"]:
        assert r == ser[r["id"]]


def test_json_schema(tiny_study):
    doc = json.loads(lab.to_json(tiny_study))
    assert doc["schema"] == "fastgrad-lab/1" and doc["rule"] == lab.RULE
    assert set(doc) == {"schema", "settings", "rule", "rows", "claims"}
    assert doc["settings"] == dict(TINY, device="cpu", seeds=[3, 7], split_seed=0)
    assert [r["id"] for r in doc["rows"]] == [r.id for r in _tiny_rows()]
    for r in doc["rows"]:
        assert set(r) == {"id", "study", "label", "config", "runs", "stats"}
        assert r["study"] in ("vanishing", "explosion")
        assert set(r["config"]) == set(ExplodeRow.__dataclass_fields__)
        assert [run["seed"] for run in r["runs"]] == [3, 7]
        for run in r["runs"]:
            assert set(run["metrics"]) == set(lab.METRICS)
            for v in run["metrics"].values():
                assert v is None or v == "inf" or isinstance(v, (int, float))
        for m in lab.METRICS:
            assert set(r["stats"][m]) == {"median", "min", "max"}
    # Only the claims whose rows all ran are judged: C6 (V21/V2, E21/E4).
    assert [c["id"] for c in doc["claims"]] == ["C6"]
    for c in doc["claims"]:
        assert set(c) == {"id", "claim", "comparisons", "verdict", "reason"}
        assert c["verdict"] in ("supported", "refuted", "depends")
        for x in c["comparisons"]:
            assert set(x) == {"better", "worse", "metric", "context", "outcome"}
            assert x["outcome"] in ("holds", "fails", "tie")
    # The tables regenerate from the JSON alone.
    assert lab.format_markdown(doc) == lab.format_markdown(tiny_study)


def test_markdown_and_plots(tiny_study, tmp_path):
    text = lab.format_markdown(tiny_study)
    assert "| V2 | sigmoid, Xavier init, SGD lr 0.05 |" in text
    assert "**vanishing study**" in text and "**explosion study**" in text
    assert "Rule: " in text
    drawn = lab.plot_heatmaps(tiny_study, tmp_path / "h.png")
    assert drawn == [i for i in lab.HEATMAP_IDS if i in tiny_study["curves"]]
    assert lab.plot_summary(tiny_study, tmp_path / "s.png")
    for name in ("h.png", "s.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < len(data) < 300_000
    # another extension gets its own format (it got PNG bytes whatever the name)
    lab.plot_heatmaps(tiny_study, tmp_path / "h.pdf")
    lab.plot_summary(tiny_study, tmp_path / "s.svg")
    assert (tmp_path / "h.pdf").read_bytes()[:5] == b"%PDF-"
    assert b"<svg" in (tmp_path / "s.svg").read_bytes()[:2000]


def test_first_nonfinite_step_counts_an_overflowed_gradient():
    """A run whose gradient overflows while its loss stays finite (weight
    norm at SGD lr 0.5: skipped updates from that step on, losses up to
    1e38) has its first non-finite step there; it read "never", the best
    value, and the explosion claims compared it so.  Which seeds do that
    depends on the CPU's last bits (seed 10 on one Intel host, 37 on an
    AMD Zen 5), so the seeds are searched; every run on the way must count
    its first non-finite loss or gradient norm."""
    from fastgrad.cli import load_digits_split
    row = {r.id: r for r in lab.STUDIES["all"]}["E13"]
    data = load_digits_split(0)
    for seed in range(200):                   # ~0.1 s a run; ~5 % of seeds qualify
        out = lab.run_config(row, data, seed=seed)
        grad_norm, loss = out["curves"]["grad_norm"], out["curves"]["loss"]
        bad = ~(np.isfinite(grad_norm) & np.isfinite(loss))
        first_bad = int(np.argmax(bad)) if bad.any() else math.inf
        assert out["metrics"]["first_nonfinite"] == first_bad, seed
        if bad.any() and np.isfinite(loss[:first_bad + 1]).all():
            assert out["metrics"]["skipped"] > 0
            break
    else:
        pytest.fail("no seed in 0..199 overflows the gradient before the loss")


def test_run_study_checks_its_input():
    rows = _tiny_rows()[:1]
    with pytest.raises(ValueError, match="seeds"):
        lab.run_study(rows, [], progress=False)
    with pytest.raises(ValueError, match="seeds"):
        lab.run_study(rows, [1, 1], progress=False)
    with pytest.raises(ValueError, match="row"):
        lab.run_study([], [1], progress=False)
    with pytest.raises(ValueError, match="jobs"):
        lab.run_study(rows, [1], jobs=0, progress=False)


# --- the command ---------------------------------------------------------------

def test_cli_lab_tiny_run(tmp_path, capsys, monkeypatch):
    # The tiny run checks the wiring, not the numbers: two rows of each study.
    # Unset, the command picks the shared kernel package (its workers inherit it).
    monkeypatch.delenv("FASTGRAD_KERNEL_COPIES")
    keep = {"V2", "V8", "E4", "E5"}
    for name in ("vanishing", "explosion", "all"):
        monkeypatch.setitem(lab.STUDIES, name,
                            [r for r in lab.STUDIES[name] if r.id in keep])
    out = tmp_path / "out"
    assert main(["lab", "--quick", "--seeds", "2", "--depth", "2", "--width", "8",
                 "--epochs", "1", "--jobs", "1", "--no-progress",
                 "--json", str(out / "lab.json"), "--markdown", str(out / "lab.md"),
                 "--heatmap", str(out / "h.png"), "--summary", str(out / "s.png")]) == 0
    text = capsys.readouterr().out
    assert "all study, 4 configurations x 2 seeds" in text
    doc = json.loads((out / "lab.json").read_text())
    assert [r["id"] for r in doc["rows"]] == ["V2", "V8", "E4", "E5"]
    assert doc["settings"]["seeds"] == [0, 1] and doc["settings"]["epochs"] == 1
    md = (out / "lab.md").read_text()
    assert md.strip() == lab.format_markdown(doc).strip() and md.strip() in text
    assert (out / "h.png").exists() and (out / "s.png").exists()
    assert os.environ["FASTGRAD_KERNEL_COPIES"] == "shared"


def test_cli_lab_study_choice_and_bad_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lab", "--study", "implosion"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["lab", "--seeds", "0"])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err


def test_readme_tables_are_the_generated_ones():
    """The README's lab tables are what ``format_markdown`` makes of
    docs/lab.json, the JSON the documented command wrote."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split("<!-- lab:begin")[1].split("-->", 1)[1].split("<!-- lab:end -->")[0]
    doc = json.loads((root / "docs" / "lab.json").read_text(encoding="utf-8"))
    assert block.strip() == lab.format_markdown(doc).strip()
    assert doc["rule"] == lab.RULE                  # docs/ regenerated after a rule change
    assert doc["settings"]["seeds"] == [0, 1, 2, 3, 4]
    assert {r["id"] for r in doc["rows"]} == {r.id for r in lab.STUDIES["all"]}
    for name in ("lab-heatmap.png", "lab-summary.png"):
        assert (root / "docs" / name).stat().st_size < 300_000


def test_cli_lab_help():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "fastgrad", "lab", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "usage: fastgrad lab" in out.stdout
    for option in ("--study", "--seeds", "--quick", "--json", "--device", "--jobs"):
        assert option in out.stdout


@pytest.mark.cuda
def test_lab_runs_on_cuda_as_on_the_cpu(cp):
    """``--device cuda`` routes every run to the GPU: the same tiny study
    gives the CPU's numbers to float32 rounding."""
    by_id = {r.id: r for r in lab.STUDIES["all"]}
    rows = [by_id["V2"], by_id["E5"]]
    tiny = dict(depth=2, width=8, epochs=1, batch_size=256)
    on = {d: lab.run_study(rows, [0], device=d, jobs=1, progress=False, **tiny)
          for d in ("cpu", "cuda")}
    assert on["cuda"]["settings"]["device"] == "cuda"
    for rc, rg in zip(on["cpu"]["rows"], on["cuda"]["rows"]):
        mc, mg = rc["runs"][0]["metrics"], rg["runs"][0]["metrics"]
        assert mg["skipped"] == mc["skipped"] and mg["first_nonfinite"] == mc["first_nonfinite"]
        for m in ("final_loss", "max_grad_norm", "layer_ratio"):
            assert mg[m] == pytest.approx(mc[m], rel=1e-3), m


def test_chance_of_separation_matches_a_simulation():
    assert lab.chance_of_separation(5) == pytest.approx(1 / 252)
    assert lab.chance_of_separation(1) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 200_000, 3))
    apart = (a.min(axis=1) > b.max(axis=1)).mean()
    assert apart == pytest.approx(lab.chance_of_separation(3), abs=0.004)   # 1/20


def test_a_failing_run_raises_its_error():
    bad = lab.LabRow("X1", "vanishing", ExplodeRow("no such activation", activation="swish"))
    with pytest.raises(ValueError, match="swish"):
        lab.run_study([bad], [0], jobs=1, progress=False, **TINY)


def test_cli_lab_cuda_without_a_gpu_says_why(capsys):
    import fastgrad as fg
    if "cuda" in fg.available_devices():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as e:
        main(["lab", "--device", "cuda", "--quick"])
    assert e.value.code == 2
    assert "fastgrad lab: error: device 'cuda' is unavailable" in capsys.readouterr().err
