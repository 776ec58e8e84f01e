"""The stability lab: vanishing and exploding gradients over many seeds,
with a verdict on each piece of folklore about them.

``fastgrad lab`` trains one deep MLP (16 hidden layers of 64 by default) on
scikit-learn's bundled digits under every configuration of a study, once per
seed, and reports each metric as its median and range over the seeds.  The
claims (``CLAIMS``) name the rows that test them; :func:`verdict` decides
each one by :data:`RULE`, so the verdict table is generated, never written
by hand.

The pieces, from the simplest to the most complex:

* ``VANISHING_ROWS``, ``EXPLOSION_ROWS``, ``CLAIMS``: the study itself;
* :func:`run_config`: one configuration, one seed (the explosion lab's row
  runner, :func:`fastgrad.cli.run_explode_row`, plus the lab's metrics);
* :func:`summarize`, :func:`compare`, :func:`verdict`: statistics and rule;
* :func:`run_study`: every (row, seed) pair, over worker processes;
* :func:`to_json`, :func:`format_markdown`, :func:`plot_heatmaps`,
  :func:`plot_summary`: the outputs.
"""
import json
import math
import os
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from typing import Tuple

import numpy as np

from .cli import (EXPLODE_ROWS, SGD_MOMENTUM, ExplodeRow, _full_labels, load_digits_split,
                  run_explode_row)

__all__ = ["LabRow", "Comparison", "Claim", "VANISHING_ROWS", "EXPLOSION_ROWS", "STUDIES",
           "CLAIMS", "METRICS", "RULE", "steps_to_move", "layer_ratio", "vanishing",
           "run_config", "summarize", "compare", "verdict", "judge", "run_study", "to_json",
           "format_markdown", "plot_heatmaps", "plot_summary"]

SCHEMA = "fastgrad-lab/1"


@dataclass(frozen=True)
class LabRow:
    """One configuration of a study: an id (``V3``, ``E12``), the study it
    belongs to (``"vanishing"`` or ``"explosion"``) and the configuration."""
    id: str
    study: str
    row: ExplodeRow

    @property
    def label(self):
        return self.row.label


# --- the studies ----------------------------------------------------------------
# The vanishing study: deep sigmoid/tanh nets with a small naive init and with
# Xavier's, relu and its variants with He's, then the remedies on the sigmoid
# net.  SGD has momentum throughout (fastgrad.cli.SGD_MOMENTUM).

def _v(label, **kw):
    return ExplodeRow(label, **{"lr": 0.05, "optimizer": "sgd", **kw})


_SMALL = 0.01   # the tutorial init np.random.randn(...) * 0.01

_VANISHING = [
    _v("sigmoid, small N(0,0.01²) init, SGD lr 0.05", activation="sigmoid", naive_std=_SMALL),
    _v("sigmoid, Xavier init, SGD lr 0.05", activation="sigmoid", init="xavier_normal"),
    _v("sigmoid, He init, SGD lr 0.05", activation="sigmoid", init="he_normal"),
    _v("tanh, small N(0,0.01²) init, SGD lr 0.05", activation="tanh", naive_std=_SMALL),
    _v("tanh, Xavier init, SGD lr 0.05", activation="tanh", init="xavier_normal"),
    _v("tanh, He init, SGD lr 0.05", activation="tanh", init="he_normal"),
    _v("relu, Xavier init, SGD lr 0.05", activation="relu", init="xavier_normal"),
    _v("relu, He init, SGD lr 0.05", activation="relu", init="he_normal"),
    _v("leaky_relu, He init, SGD lr 0.05", activation="leaky_relu", init="he_normal"),
    _v("elu, He init, SGD lr 0.05", activation="elu", init="he_normal"),
    # gelu_tanh: measured as "gelu" before the exact GELU existed (its tanh
    # approximation was fastgrad's gelu then); the row keeps what it measured.
    _v("gelu_tanh, He init, SGD lr 0.05", activation="gelu_tanh", init="he_normal"),
    _v("softplus, He init, SGD lr 0.05", activation="softplus", init="he_normal"),
    _v("sigmoid, Xavier init, SGD lr 0.5", activation="sigmoid", init="xavier_normal", lr=0.5),
    _v("tanh, Xavier init, SGD lr 0.5", activation="tanh", init="xavier_normal", lr=0.5),
    _v("sigmoid, Xavier init, Adam lr 1e-3", activation="sigmoid", init="xavier_normal",
       optimizer="adam", lr=1e-3),
    _v("sigmoid, Xavier init, RMSprop lr 1e-3", activation="sigmoid", init="xavier_normal",
       optimizer="rmsprop", lr=1e-3),
    _v("sigmoid, Xavier init, SGD lr 0.05 + batch norm", activation="sigmoid",
       init="xavier_normal", norm="batch"),
    _v("sigmoid, Xavier init, SGD lr 0.05 + layer norm", activation="sigmoid",
       init="xavier_normal", norm="layer"),
    _v("sigmoid, Xavier init, SGD lr 0.05 + weight norm", activation="sigmoid",
       init="xavier_normal", weight_norm=True),
    _v("sigmoid, Xavier init, SGD lr 0.05 + residual", activation="sigmoid",
       init="xavier_normal", residual=True),
    _v("sigmoid, Xavier init, SGD lr 0.05 + dropout 0.1", activation="sigmoid",
       init="xavier_normal", dropout=0.1),
    # Added after the rows above: appended, not inserted next to gelu_tanh, so
    # that V1-V21 keep their ids (the claims, docs/lab.json and readers'
    # notes refer to rows by id).
    _v("silu, He init, SGD lr 0.05", activation="silu", init="he_normal"),
]
VANISHING_ROWS = [LabRow(f"V{i + 1}", "vanishing", r) for i, r in enumerate(_VANISHING)]

# The explosion study: the rows of `fastgrad explode` (E1-E16, labels spelt
# out), then the ones the claims need besides.
_EXPLOSION = [replace(r, label=label)
              for r, label in zip(EXPLODE_ROWS, _full_labels([r.label for r in EXPLODE_ROWS]))] + [
    ExplodeRow("He init, SGD lr 0.1", lr=0.1),
    ExplodeRow("naive N(0,1) init, SGD lr 0.005", lr=0.005, naive_std=1.0),
    ExplodeRow("naive N(0,1) init, Adam lr 1e-3", optimizer="adam", lr=1e-3, naive_std=1.0),
    ExplodeRow("naive N(0,1) init, RMSprop lr 1e-3", optimizer="rmsprop", lr=1e-3, naive_std=1.0),
    ExplodeRow("He init, SGD lr 0.5 + dropout 0.1", dropout=0.1),
    ExplodeRow("He init, SGD lr 0.5 + clip by value 0.01", clip_value=0.01),
]
EXPLOSION_ROWS = [LabRow(f"E{i + 1}", "explosion", r) for i, r in enumerate(_EXPLOSION)]

STUDIES = {"vanishing": VANISHING_ROWS, "explosion": EXPLOSION_ROWS,
           "all": VANISHING_ROWS + EXPLOSION_ROWS}


# --- metrics -------------------------------------------------------------------
# name -> (column title, True when higher is better, margin).  A comparison
# holds only when the seed ranges are apart by more than the margin: an
# effect too small to matter (0.1 decade of gradient, one point of accuracy)
# is not evidence for a claim however consistent it is.  Missing values
# have a meaning: a first non-finite step or a steps-until-the-loss-moves
# that never came is +inf (the best and the worst case respectively); a
# non-finite final loss is +inf.
METRICS = {
    "final_loss": ("final loss", False, 0.0),
    "accuracy": ("test acc.", True, 0.02),
    "first_nonfinite": ("first non-finite step", True, 0.0),
    "skipped": ("skipped steps", False, 0.0),
    "max_grad_norm": ("max grad norm", False, 0.0),
    "layer_ratio": ("first/last layer norm", None, None),   # compared through vanishing
    "vanishing": ("decades lost over depth", False, 1.0),
    "steps_to_move": ("steps until loss moves", False, 0.0),
}

MOVE_FRACTION = 0.9     # the loss "moves" once its 5-step mean is <= 90 % of its reference
MOVE_WINDOW = 5
CHANCE_LOSS = math.log(10)      # cross-entropy of a uniform guess over the 10 digits


def steps_to_move(losses, chance=CHANCE_LOSS, fraction=MOVE_FRACTION, window=MOVE_WINDOW):
    """First step whose mean loss over the last ``window`` steps is at most
    ``fraction`` times the smaller of the first step's loss and the chance
    level ``chance`` (a loss that only falls from a bad start to chance has
    not learnt anything); ``inf`` if that never happens or the first loss is
    not finite."""
    losses = np.asarray(losses, np.float64)
    if losses.size == 0 or not np.isfinite(losses[0]):
        return math.inf
    target = fraction * min(losses[0], chance)
    for k in range(1, losses.size):
        recent = losses[max(0, k - window + 1):k + 1]
        if np.isfinite(recent).all() and recent.mean() <= target:
            return k
    return math.inf


def layer_ratio(layer_norms):
    """Median over the steps of (first layer's gradient norm / last layer's),
    over the steps where both are finite and the last is non-zero; NaN when
    there is none.  Far below 1: the gradient vanishes on its way down."""
    if len(layer_norms) == 0:
        return math.nan
    L = np.asarray(layer_norms, np.float64)
    first, last = L[:, 0], L[:, -1]
    ok = np.isfinite(first) & np.isfinite(last) & (last > 0)
    return float(np.median(first[ok] / last[ok])) if ok.any() else math.nan


def vanishing(ratio):
    """Decades the gradient norm loses from the last layer down to the
    first, ``max(0, -log10(ratio))``: 0 when the first layer's gradient is
    at least as large as the last's (nothing vanishes), 3 when it is a
    thousandth of it; ``inf`` for a first layer without gradient."""
    if math.isnan(ratio):
        return math.nan
    if ratio <= 0:
        return math.inf
    return max(0.0, -math.log10(ratio))


def run_config(lab_row, data, seed, depth=16, width=64, epochs=10, batch_size=64,
               device="cpu"):
    """Train one configuration with one seed.

    Parameters
    ----------
    lab_row : LabRow
    data : tuple
        ``(X_train, X_test, y_train, y_test)`` as from
        :func:`fastgrad.cli.load_digits_split`.
    seed : int
        Seeds the initialisation, the dropout masks and the shuffling.
    depth, width, epochs, batch_size : int
    device : str

    Returns
    -------
    dict
        ``metrics`` (one value per :data:`METRICS` name, ``inf``/``nan`` as
        described there) and ``curves``: per-step ``loss``, ``grad_norm``,
        ``layer_ratio`` and the ``layer_norms`` matrix (steps x layers).
    """
    res, mon = run_explode_row(lab_row.row, data, depth, width, epochs, batch_size, seed, device)
    L = np.asarray(mon.layer_norms, np.float64)
    ratio = layer_ratio(L)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_step = L[:, 0] / L[:, -1] if L.size else np.zeros(0)
    metrics = {
        "final_loss": res["final_loss"] if math.isfinite(res["final_loss"]) else math.inf,
        "accuracy": float(res["accuracy"]),
        "first_nonfinite": math.inf if res["first_nonfinite"] is None else res["first_nonfinite"],
        "skipped": res["skipped"],
        "max_grad_norm": res["max_grad_norm"],
        "layer_ratio": ratio,
        "vanishing": vanishing(ratio),
        "steps_to_move": steps_to_move(res["losses"]),
    }
    curves = {"loss": np.asarray(res["losses"], np.float64),
              "grad_norm": np.asarray(mon.grad_norms, np.float64),
              "layer_ratio": per_step, "layer_norms": L}
    return {"id": lab_row.id, "seed": seed, "metrics": metrics, "curves": curves}


# --- statistics and the verdict rule -------------------------------------------------

def summarize(values):
    """Median, min and max of one metric over the seeds (inf counts as the
    largest value; NaN values are left out)."""
    v = np.asarray([x for x in values if not (isinstance(x, float) and math.isnan(x))],
                   np.float64)
    if v.size == 0:
        return {"median": math.nan, "min": math.nan, "max": math.nan}
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}


@dataclass(frozen=True)
class Comparison:
    """``better`` should beat ``worse`` on ``metric`` for the claim to hold;
    ``context`` says in which setting (e.g. "sigmoid net")."""
    better: str
    worse: str
    metric: str
    context: str


@dataclass(frozen=True)
class Claim:
    """A piece of folklore (``text``) and the comparisons that test it."""
    id: str
    text: str
    comparisons: Tuple[Comparison, ...]


RULE = ("Each comparison pits the row the claim favours against the row it says is worse, "
        "on one metric, over the same seeds. It HOLDS when the favoured row's worst seed beats "
        "the other row's best seed by more than the metric's margin (the seed ranges are apart, "
        "in the claimed direction; margins: 0.02 test accuracy, 1 decade of first/last layer "
        "gradient norm, 0 steps), FAILS when the other row's worst seed beats the favoured "
        "row's best by more than the margin, and is a TIE otherwise. A claim is SUPPORTED "
        "when every comparison holds, REFUTED when none holds, and DEPENDS otherwise (on the "
        "contexts listed: where it holds and where it does not).")


def chance_of_separation(n_seeds):
    """Probability that two rows of ``n_seeds`` runs each, drawn from the
    same distribution, have apart seed ranges in a given direction by
    chance: 1 / C(2n, n) (1/252 for 5 seeds, 1/2 for one)."""
    return 1.0 / math.comb(2 * n_seeds, n_seeds)


def compare(better_values, worse_values, metric):
    """Decide one comparison by :data:`RULE`.

    Parameters
    ----------
    better_values, worse_values : sequence of float
        Per-seed values of the row the claim favours and of the other row;
        NaN values are left out, and a side with none left makes a tie.
    metric : str
        A name of :data:`METRICS` that has a direction (not ``layer_ratio``).

    Returns
    -------
    str
        ``"holds"``, ``"fails"`` or ``"tie"``.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRICS)}")
    _, higher, margin = METRICS[metric]
    if higher is None:
        raise ValueError(f"metric {metric!r} has no direction; compare vanishing instead")
    a = [x for x in better_values if not math.isnan(x)]
    b = [x for x in worse_values if not math.isnan(x)]
    if not a or not b:
        return "tie"
    if not higher:
        a, b = [-x for x in a], [-x for x in b]
    # inf - inf is NaN and NaN > margin is False: "never" against "never" ties.
    if min(a) - max(b) > margin:
        return "holds"
    if min(b) - max(a) > margin:
        return "fails"
    return "tie"


def verdict(outcomes):
    """The verdict of a claim by :data:`RULE`.

    Parameters
    ----------
    outcomes : sequence of str
        The outcomes of its comparisons, as :func:`compare` returns them.

    Returns
    -------
    str
        ``"supported"`` (every comparison holds), ``"refuted"`` (none holds)
        or ``"depends"``.
    """
    if not outcomes:
        raise ValueError("a claim needs at least one comparison")
    held = sum(o == "holds" for o in outcomes)
    if held == len(outcomes):
        return "supported"
    if held == 0:
        return "refuted"
    return "depends"


def _c(better, worse, metric, context):
    return Comparison(better, worse, metric, context)


CLAIMS = [
    Claim("C1", "ReLU and its variants cure vanishing gradients where sigmoid and tanh cause them",
          tuple(_c(r, s, "vanishing", f"{a} vs {b}")
                for r, a in (("V8", "relu"), ("V9", "leaky_relu"), ("V10", "elu"),
                             ("V11", "gelu_tanh"), ("V12", "softplus"), ("V22", "silu"))
                for s, b in (("V2", "sigmoid"), ("V5", "tanh")))),
    Claim("C2", "Xavier init suits tanh and sigmoid, He init suits ReLU",
          (_c("V2", "V3", "accuracy", "sigmoid"), _c("V5", "V6", "accuracy", "tanh"),
           _c("V8", "V7", "accuracy", "relu"))),
    Claim("C3", "A smaller learning rate avoids explosion",
          (_c("E17", "E4", "first_nonfinite", "He init, SGD lr 0.1 vs 0.5"),
           _c("E18", "E1", "first_nonfinite", "naive N(0,1) init, SGD lr 0.005 vs 0.05"))),
    Claim("C4", "A larger learning rate avoids vanishing",
          (_c("V13", "V2", "steps_to_move", "sigmoid, SGD lr 0.5 vs 0.05"),
           _c("V14", "V5", "steps_to_move", "tanh, SGD lr 0.5 vs 0.05"))),
    Claim("C5", "Adam and RMSprop are more robust than SGD",
          (_c("V15", "V2", "accuracy", "Adam, deep sigmoid net"),
           _c("V16", "V2", "accuracy", "RMSprop, deep sigmoid net"),
           _c("E19", "E1", "accuracy", "Adam, naive N(0,1) relu net"),
           _c("E20", "E1", "accuracy", "RMSprop, naive N(0,1) relu net"))),
    # A feature against both failures: its row against the deep sigmoid net
    # (vanishing) and against He init with SGD lr 0.5 (explosion), with any
    # other comparison between the two.
    *(Claim(cid, claim,
            (_c(vanishing, "V2", "vanishing", "deep sigmoid net (vanishing)"), *others,
             _c(explosion, "E4", "first_nonfinite", "He init, SGD lr 0.5 (explosion)")))
      for cid, claim, vanishing, others, explosion in (
          ("C6", "Dropout helps against vanishing and exploding gradients", "V21", (), "E21"),
          ("C7", "Batch norm stabilises deep nets", "V17",
           (_c("E10", "E1", "first_nonfinite", "naive N(0,1) init (explosion)"),), "E11"),
          ("C8", "Residual connections stabilise deep nets", "V20", (), "E14"),
          ("C9", "Weight normalisation stabilises deep nets", "V19", (), "E13"),
          ("C10", "Layer norm stabilises deep nets", "V18", (), "E12"))),
    Claim("C11", "Clipping by norm is better than clipping by value",
          (_c("E2", "E3", "accuracy", "naive N(0,1) init, SGD lr 0.05"),
           _c("E5", "E22", "accuracy", "He init, SGD lr 0.5"))),
    Claim("C12", "Clipping by norm prevents explosion",
          (_c("E2", "E1", "first_nonfinite", "naive N(0,1) init"),
           _c("E5", "E4", "first_nonfinite", "He init, SGD lr 0.5"),
           _c("E15", "E14", "first_nonfinite", "residual, SGD lr 0.5"))),
    Claim("C13", "Learning-rate decay prevents explosion",
          (_c("E6", "E4", "first_nonfinite", "He init, SGD lr 0.5, x0.5 every 2 steps"),)),
]


def judge(claims, rows):
    """Decide every claim whose rows were all run.

    Parameters
    ----------
    claims : list of Claim
    rows : dict
        Row id -> row dict whose ``runs`` hold each seed's ``metrics``.

    Returns
    -------
    list of dict
        Per judged claim: ``id``, ``claim``, ``comparisons`` (each with its
        ``outcome``), ``verdict`` and ``reason`` (for "depends": the
        contexts where it holds and where it does not).  A claim with a row
        that did not run (a one-study run) is left out.
    """
    out = []
    for claim in claims:
        if not all(c.better in rows and c.worse in rows for c in claim.comparisons):
            continue        # a study that did not run both rows cannot judge it
        comps = []
        for c in claim.comparisons:
            a = [run["metrics"][c.metric] for run in rows[c.better]["runs"]]
            b = [run["metrics"][c.metric] for run in rows[c.worse]["runs"]]
            comps.append({"better": c.better, "worse": c.worse, "metric": c.metric,
                          "context": c.context, "outcome": compare(a, b, c.metric)})
        v = verdict([c["outcome"] for c in comps])
        held = [c["context"] for c in comps if c["outcome"] == "holds"]
        other = [f"{c['context']} ({c['outcome']})" for c in comps if c["outcome"] != "holds"]
        why = {"supported": "holds in every context tested",
               "refuted": "holds in no context tested",
               "depends": f"holds for {'; '.join(held)}; not for {'; '.join(other)}"}[v]
        out.append({"id": claim.id, "claim": claim.text, "comparisons": comps,
                    "verdict": v, "reason": why})
    return out


# --- the runner ---------------------------------------------------------------------

_WORKER = {}


def _worker_init(device, split_seed):
    """Once per worker process: one thread (the processes share the cores,
    and one-thread BLAS sums in a fixed order: the same seed gives the same
    numbers whichever worker runs it) and the data."""
    import fastgrad as fg
    fg.set_num_threads(1)
    _WORKER["device"] = device
    _WORKER["data"] = load_digits_split(split_seed)


def _worker_run(task):
    lab_row, seed, settings = task
    return run_config(lab_row, _WORKER["data"], seed, device=_WORKER["device"], **settings)


def default_jobs(device):
    """Worker processes: one per core on the CPU, one for a GPU."""
    if device == "cuda":
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:          # not on Linux
        return max(1, os.cpu_count() or 1)


def run_study(rows, seeds, depth=16, width=64, epochs=10, batch_size=64, device="cpu",
              jobs=None, progress=True, split_seed=0):
    """Run every row of ``rows`` once per seed of ``seeds``.

    Parameters
    ----------
    rows : list of LabRow
    seeds : list of int
        Each seed seeds the initialisation, dropout and shuffling of a run;
        the train/test split is the same for every run (``split_seed``).
    depth, width, epochs, batch_size : int
        The network (``depth`` hidden layers of ``width``) and its training.
    device : str
        "cpu" or "cuda".
    jobs : int, optional
        Worker processes (default: one per core on the CPU, 1 on a GPU).
        ``jobs=1`` runs in this process.  Each run is single-threaded, so
        the results do not depend on ``jobs``.
    progress : bool
        One tqdm bar over all runs of the study (when tqdm is installed).

    Returns
    -------
    dict
        ``settings``, ``rows`` (one dict per row: id, study, label, config,
        ``runs`` in seed order, ``stats`` per metric), ``claims`` (judged,
        see :func:`judge`) and ``curves`` (id -> list of per-seed curves;
        not part of the JSON).
    """
    rows = list(rows)
    seeds = [int(s) for s in seeds]
    if not rows:
        raise ValueError("run_study needs at least one row")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    if len({r.id for r in rows}) != len(rows):
        raise ValueError("row ids must be distinct")
    jobs = default_jobs(device) if jobs is None else int(jobs)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    settings = {"depth": depth, "width": width, "epochs": epochs, "batch_size": batch_size}
    tasks = [(r, s, settings) for r in rows for s in seeds]
    bar = _bar(len(tasks), progress)
    results = {}
    try:
        if jobs == 1:
            results = _run_here(tasks, device, split_seed, bar)
        else:
            import multiprocessing
            # spawn, not fork: a forked child inherits the parent's OpenMP and
            # BLAS thread pools in an undefined state.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(jobs, len(tasks)), mp_context=ctx,
                                     initializer=_worker_init,
                                     initargs=(device, split_seed)) as pool:
                futures = {pool.submit(_worker_run, t): (t[0].id, t[1]) for t in tasks}
                try:
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        if bar is not None:
                            bar.update(1)
                except BaseException:
                    # A failed run or Ctrl-C: do not wait for the queued runs.
                    for fut in futures:
                        fut.cancel()
                    raise
    finally:
        if bar is not None:
            bar.close()
    return _assemble(rows, seeds, results, dict(settings, device=device, seeds=seeds,
                                                split_seed=split_seed))


def _run_here(tasks, device, split_seed, bar):
    """The serial path: single-threaded like a worker, then the caller's
    thread counts are put back."""
    import numba
    from threadpoolctl import threadpool_limits
    data = load_digits_split(split_seed)
    results = {}
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            for lab_row, seed, settings in tasks:
                results[lab_row.id, seed] = run_config(lab_row, data, seed, device=device,
                                                       **settings)
                if bar is not None:
                    bar.update(1)
    finally:
        numba.set_num_threads(before)
    return results


def _bar(total, progress):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="lab", unit="run", dynamic_ncols=True)


def _assemble(rows, seeds, results, settings):
    table, curves = {}, {}
    for r in rows:
        runs = [results[r.id, s] for s in seeds]
        table[r.id] = {
            "id": r.id, "study": r.study, "label": r.label, "config": asdict(r.row),
            "runs": [{"seed": run["seed"], "metrics": run["metrics"]} for run in runs],
            "stats": {m: summarize([run["metrics"][m] for run in runs]) for m in METRICS},
        }
        curves[r.id] = [run["curves"] for run in runs]
    return {"schema": SCHEMA, "settings": settings, "rule": RULE,
            "rows": list(table.values()), "claims": judge(CLAIMS, table), "curves": curves}


# --- outputs ------------------------------------------------------------------------

def _jsonable(x):
    """inf and NaN are not JSON: +inf becomes "inf" (e.g. never non-finite),
    NaN becomes null."""
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def to_json(study):
    """The study as a JSON string (the per-step curves are left out).

    Schema ``fastgrad-lab/1``::

        {"schema": "fastgrad-lab/1",
         "settings": {"depth", "width", "epochs", "batch_size", "device",
                      "seeds": [int], "split_seed"},
         "rule": str,
         "rows": [{"id", "study", "label", "config": {ExplodeRow fields},
                   "runs": [{"seed", "metrics": {name: value}}],
                   "stats": {name: {"median", "min", "max"}}}],
         "claims": [{"id", "claim", "verdict", "reason",
                     "comparisons": [{"better", "worse", "metric",
                                      "context", "outcome"}]}]}

    Metric names are those of :data:`METRICS`.  JSON has no inf or NaN: a
    value that is +inf (never non-finite, a loss that never moved, a
    non-finite final loss) is the string ``"inf"``, NaN is ``null``.
    :func:`format_markdown` reads the parsed document back.
    """
    doc = {k: v for k, v in study.items() if k != "curves"}
    return json.dumps(_jsonable(doc), indent=1, allow_nan=False)


_FMT = {"final_loss": (".3g", "nan"), "accuracy": (".3f", None),
        "first_nonfinite": ("g", "never"), "skipped": ("g", None),
        "max_grad_norm": (".3g", None), "layer_ratio": (".2g", None),
        "steps_to_move": ("g", "never")}
_TABLE = ["final_loss", "accuracy", "first_nonfinite", "skipped", "max_grad_norm",
          "layer_ratio", "steps_to_move"]


def _cell(stats, metric):
    fmt, inf_word = _FMT[metric]

    def one(x):
        if x is None:
            return "nan"
        if isinstance(x, str):
            x = float(x)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return inf_word or "inf"
        return format(x, fmt)
    med, lo, hi = (one(stats[k]) for k in ("median", "min", "max"))
    return med if lo == hi else f"{med} ({lo}–{hi})"


def format_markdown(study):
    """The study's row tables, claims table and rule as markdown.

    Works on the dict :func:`run_study` returns and on the same dict read
    back from :func:`to_json`'s output, so the tables regenerate from JSON.
    """
    s = study["settings"]
    seeds = s["seeds"]
    out = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); {s['depth']} hidden layers of "
           f"{s['width']}, digits, {s['epochs']} epochs, batch {s['batch_size']}, "
           f"on {s['device']}. Each cell: median (min–max over the seeds). SGD has "
           f"momentum {SGD_MOMENTUM:g} in every row; the first non-finite step is the first "
           "whose loss or gradient norm is not finite.", ""]
    for kind in ("vanishing", "explosion"):
        rows = [r for r in study["rows"] if r["study"] == kind]
        if not rows:
            continue
        out += [f"**{kind} study**", "",
                "| id | configuration | " + " | ".join(METRICS[m][0] for m in _TABLE) + " |",
                "|---|---|" + "---|" * len(_TABLE)]
        for r in rows:
            out.append(f"| {r['id']} | {r['label']} | "
                       + " | ".join(_cell(r["stats"][m], m) for m in _TABLE) + " |")
        out.append("")
    if study["claims"]:
        out += ["| claim | metric | comparisons (favoured vs other: outcome) | verdict |",
                "|---|---|---|---|"]
        for c in study["claims"]:
            metrics = {x["metric"] for x in c["comparisons"]}
            shared = len(metrics) == 1
            comps = "; ".join(f"{x['better']} vs {x['worse']}"
                              + ("" if shared else f" ({METRICS[x['metric']][0]})")
                              + f": {x['outcome']}" for x in c["comparisons"])
            metric = METRICS[metrics.pop()][0] if shared else "per comparison"
            out.append(f"| {c['id']}. {c['claim']} | {metric} | {comps} | **{c['verdict']}**"
                       + (f": {c['reason']}" if c["verdict"] == "depends" else "") + " |")
        n = len(seeds)
        out += ["", f"Rule: {study['rule']} With {n} seed{'s' * (n > 1)} per row, two rows "
                f"drawn from the same distribution are apart in a given direction by chance "
                f"with probability 1/{round(1 / chance_of_separation(n))} (before the margin).",
                ""]
    return "\n".join(out)


# --- pictures ---------------------------------------------------------------------

HEATMAP_IDS = ["V1", "V2", "V5", "V8", "V17", "V20", "E2", "E15"]

# Small multiples by family: (title, study, ids).  The vanishing panels show
# the first/last layer gradient-norm ratio, the explosion panels the global
# gradient norm; each line is the median over the seeds, its band the range.
PANELS = [
    ("init", "vanishing", ["V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8"]),
    ("activation", "vanishing", ["V2", "V5", "V8", "V9", "V10", "V11", "V12", "V22"]),
    ("optimizer and lr", "vanishing", ["V2", "V13", "V15", "V16", "V5", "V14"]),
    ("normalisation", "vanishing", ["V2", "V17", "V18", "V19", "V20", "V21"]),
    ("init and lr", "explosion", ["E1", "E18", "E4", "E17", "E8"]),
    ("clipping", "explosion", ["E1", "E2", "E3", "E4", "E5", "E22", "E6"]),
    ("optimizer", "explosion", ["E1", "E19", "E20", "E4", "E9", "E16"]),
    ("normalisation", "explosion", ["E4", "E11", "E12", "E13", "E14", "E15", "E21"]),
]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_heatmaps(study, path, ids=None):
    """Per-layer gradient norm over the training steps (layers x steps, log
    colour scale) of the first seed of each chosen row; non-finite norms
    (skipped steps) in grey.  Writes a PNG; returns the ids drawn."""
    from matplotlib.colors import LogNorm
    plt = _pyplot()
    curves = study["curves"]
    labels = {r["id"]: r["label"] for r in study["rows"]}
    ids = [i for i in (HEATMAP_IDS if ids is None else ids) if i in curves]
    if not ids:
        return []
    mats = [curves[i][0]["layer_norms"] for i in ids]
    pos = np.concatenate([m[np.isfinite(m) & (m > 0)] for m in mats] + [np.ones(1)])
    # One colour scale for every panel, so panels compare; past 1e-12 or
    # 1e12 the colour saturates.
    vmin = max(float(pos.min()), 1e-12)
    vmax = min(float(pos.max()), 1e12)
    cmap = plt.get_cmap("magma").with_extremes(bad="0.75")
    cols = min(4, len(ids))
    nrows = -(-len(ids) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols + 1.0, 2.8 * nrows), dpi=90,
                             squeeze=False, sharey=True, layout="constrained")
    for ax, i, m in zip(axes.flat, ids, mats):
        shown = np.where(np.isfinite(m), np.clip(m, vmin, vmax), np.nan).T
        im = ax.imshow(shown, aspect="auto", origin="lower", interpolation="nearest",
                       cmap=cmap, norm=LogNorm(vmin=vmin, vmax=vmax))
        ax.set_title(_wrap(f"{i}: {labels[i]}", 44), fontsize=7)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("layer (0 = input)", fontsize=7)
    for ax in list(axes.flat)[len(ids):]:
        ax.axis("off")
    cb = fig.colorbar(im, ax=axes, shrink=0.9)
    cb.set_label("layer gradient L2 norm (black: zero or below the scale; grey: non-finite)",
                 fontsize=7)
    cb.ax.tick_params(labelsize=6)
    fig.suptitle("per-layer gradient norms, first seed", fontsize=9)
    _save_plot(fig, path)
    return ids


def _save_plot(fig, path):
    """Save in the format of ``path``'s extension (as ``savefig``); a
    ``.png`` as a 256-colour PNG: a third of the bytes of matplotlib's RGBA
    file for these plots (lines and flat colours), so they stay small
    enough to ship in the repository."""
    import io
    import os

    if os.path.splitext(str(path))[1].lower() != ".png":
        fig.savefig(path)
        _pyplot().close(fig)
        return
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256).save(path, format="PNG", optimize=True)
    _pyplot().close(fig)


def _wrap(text, width):
    import textwrap
    return "\n".join(textwrap.wrap(text, width))


def _band(runs, key):
    """Median and range over the seeds of a per-step curve (NaN where a seed
    has no finite value)."""
    n = min(len(r[key]) for r in runs)
    m = np.vstack([np.asarray(r[key][:n], np.float64) for r in runs])
    m = np.where(np.isfinite(m) & (m > 0), m, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)     # steps where every seed is NaN
        return np.nanmedian(m, 0), np.nanmin(m, 0), np.nanmax(m, 0)


def plot_summary(study, path, panels=None):
    """Small multiples by family: per row the median over the seeds of the
    first/last layer norm ratio (vanishing) or the global gradient norm
    (explosion) over the steps, the seeds' range as a band.  Writes a PNG;
    returns the panel titles drawn."""
    plt = _pyplot()
    curves = study["curves"]
    labels = {r["id"]: r["label"] for r in study["rows"]}
    chosen = [(t, k, [i for i in ids if i in curves])
              for t, k, ids in (PANELS if panels is None else panels)]
    chosen = [p for p in chosen if p[2]]
    if not chosen:
        return []
    cols = min(4, len(chosen))
    nrows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 4.6 * nrows), dpi=90,
                             squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (title, kind, ids) in zip(axes.flat, chosen):
        key = "layer_ratio" if kind == "vanishing" else "grad_norm"
        for j, i in enumerate(ids):
            med, lo, hi = _band(curves[i], key)
            steps = np.arange(med.size)
            ax.plot(steps, med, lw=1.1, color=colours(j % 10), label=f"{i}: {labels[i]}")
            ax.fill_between(steps, lo, hi, color=colours(j % 10), alpha=0.18, lw=0)
        ax.set_yscale("log")
        if kind == "explosion":
            # Past 1e14 a norm is an explosion whatever its value; an
            # unbounded axis would flatten every finite curve.
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, 1e-3), min(hi, 1e14))
        top = ax.get_ylim()[1]
        for j, i in enumerate(ids):
            # x at the top: a seed's first non-finite gradient (its later
            # steps are skipped, so its curve stops there).
            firsts = [int(np.argmax(~np.isfinite(c["grad_norm"]))) for c in curves[i]
                      if not np.isfinite(c["grad_norm"]).all()]
            if firsts:
                ax.scatter(firsts, [top] * len(firsts), marker="x", s=18, clip_on=False,
                           color=colours(j % 10), zorder=4)
        ax.set_title(f"{kind}: {title}", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("first / last layer grad norm" if kind == "vanishing"
                      else "global grad norm", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.14),
                  frameon=False, ncol=1)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    fig.suptitle("median over the seeds, band: min-max; x: a seed's first non-finite gradient "
                 "(its curve stops there)", fontsize=9)
    fig.tight_layout()
    _save_plot(fig, path)
    return [t for t, _, _ in chosen]
