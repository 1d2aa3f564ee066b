"""orl-report: one report over many runs (single runs and sweeps alike).

    orl-report results/o2o_pendulum                       # every run directory below, grouped by agent x dataset
    orl-report runs/sweeps/20261125-150000 --group-by agent.expectile --compare iql famo2o_iql

A run directory is any folder holding `config.yaml` and `metrics.jsonl` (what `orl-train` writes, and all
that needs to be committed for a report to regenerate). Writes to `--out` (default: `<first path>/report`):

- `report.md`: per-dataset table (final and best evaluation, mean ± std, n); for runs with an online phase
  the offline-to-online table (offline score, worst drop after the switch, final, cumulative regret); the
  aggregate over datasets with rliable (IQM, median, mean, optimality gap, stratified-bootstrap 95% CIs)
  and probabilities of improvement;
- `runs.csv` (one row per run) and `summary.json` (every table and aggregate, to load elsewhere);
- `curves.png` (mean and 95% bootstrap band per agent and dataset; Q around the switch for online runs)
  and `profiles.png` (rliable performance profiles).

A run's `provenance.json` (written by every run) gives the sha256 of the data it trained on: when the runs
under one dataset name trained on different arrays (a dataset collected again on another machine), the
report says so at the top and `--group-by provenance.data.sha256` splits them.

Runs are scored by `eval/normalized_mean` (D4RL-normalized, 0-100) where the run has reference scores,
else by `eval/return_mean`. A run with a missing or unreadable `metrics.jsonl`, or without any evaluation,
is listed by name and skipped; unfinished runs are listed and left out of the tables.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from orl.logger import read_metrics
from orl.provenance import data_versions, read_provenance

AGGREGATES = ("IQM", "median", "mean", "optimality gap")
Q_WINDOW = 5000  # online steps after the first online update in which the peak mean Q is read
Q_BIN = 1000  # ... as the highest of its 1000-step averages, so runs that log Q at different rates compare


@dataclass
class Run:
    path: Path
    label: str                      # the group it belongs to: config `tag`, else the agent's name (+ --group-by keys)
    dataset: str
    seed: int
    curve: list[tuple[int, float]]  # evaluation score by global step
    online_episodes: list[tuple[int, float]] = field(default_factory=list)  # normalized return of online episodes
    q_mean: list[tuple[int, float]] = field(default_factory=list)
    switch_step: int | None = None  # global step where the online phase began (None: offline only)
    last_step: int = 0              # the last step metrics.jsonl has a row for
    finished: bool = True
    normalized: bool = True         # scored by the D4RL-normalized score (else the mean return)
    online_only: bool = False       # trained on nothing but its own samples in an environment (no dataset)
    data_sha256: str | None = None  # provenance.json: the sha256 of the data it trained on (None: not recorded)

    def reached(self, steps: int, online_steps: int) -> bool:
        """Whether the run logged the last step of a run of `steps` offline and `online_steps` online steps (the
        offline part of an init_from run is the step its online phase started at)."""
        if online_steps > 0 and self.switch_step is None:
            return False
        return self.last_step >= (self.switch_step if self.switch_step is not None else steps) + online_steps

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    @property
    def best(self) -> float:
        return max(score for _, score in self.curve)

    @property
    def offline_score(self) -> float | None:
        """The last evaluation at or before the switch (None: offline only, or trained from scratch online)."""
        if not self.switch_step:
            return None
        before = [score for step, score in self.curve if step <= self.switch_step]
        return before[-1] if before else None

    @property
    def worst_drop(self) -> float | None:
        """Offline score minus the lowest evaluation after the switch: a collapse anywhere online counts,
        also one delayed by a warmup. Negative: never fell below the pre-trained agent."""
        start = self.offline_score
        online = [score for step, score in self.curve if self.switch_step is not None and step > self.switch_step]
        return None if start is None or not online else start - min(online)

    @property
    def q_at_switch(self) -> float | None:
        """Mean Q on the last logged training batch before the switch (None: no offline phase in this run's log,
        e.g. an init_from run)."""
        before = [q for step, q in self.q_mean if self.switch_step and step <= self.switch_step]
        return before[-1] if before else None

    @property
    def q_peak_online(self) -> float | None:
        """Highest 1000-step average of the mean Q on online training batches in the Q_WINDOW steps from the first
        online update (a warm-up without updates logs none): overestimation right after the switch shows here.
        Averaging per bin keeps a run that logs Q densely from reading a higher maximum of noisier values."""
        after = [(step, q) for step, q in self.q_mean if self.switch_step and step > self.switch_step]
        if not after:
            return None
        bins: dict[int, list[float]] = {}
        for step, q in after:
            if step <= after[0][0] + Q_WINDOW:
                bins.setdefault((step - after[0][0]) // Q_BIN, []).append(q)
        return max(float(np.mean(values)) for values in bins.values())

    @property
    def regret(self) -> float | None:
        """Mean over online episodes of 1 - normalized score / 100."""
        return float(np.mean([1 - score / 100 for _, score in self.online_episodes])) if self.online_episodes else None


def _select(config: dict, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def load_run(path: Path, group_by: Sequence[str] = ()) -> Run:
    """One run directory -> Run. Raises ValueError with the reason when it cannot be read."""
    import yaml

    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"config.yaml unreadable ({exc.__class__.__name__})") from exc
    if not isinstance(config, dict) or not isinstance(config.get("agent"), dict):
        raise ValueError("config.yaml is not an orl run config")
    if not (path / "metrics.jsonl").exists():
        raise ValueError("no metrics.jsonl")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn last line is dropped (as on resume)
            rows = read_metrics(path)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ValueError(f"metrics.jsonl is corrupt ({exc})") from exc
    if not all(isinstance(row, dict) and isinstance(row.get("step"), (int, float)) for row in rows):
        raise ValueError("metrics.jsonl holds rows without a step")
    evals = [r for r in rows if "eval/return_mean" in r]
    if not evals:
        raise ValueError("no evaluation in metrics.jsonl")
    key = "eval/normalized_mean" if all("eval/normalized_mean" in r for r in evals) else "eval/return_mean"
    online_rows = [r for r in rows if "train/online_step" in r]
    switch = int(online_rows[0]["step"] - online_rows[0]["train/online_step"]) if online_rows else None
    provenance = read_provenance(path)
    data = (provenance or {}).get("data") or {}
    config["provenance"] = provenance  # --group-by provenance.data.sha256 splits runs by the data they saw
    label = str(config.get("tag") or config["agent"].get("name", "?"))
    extra = [f"{k}={_select(config, k)}" for k in group_by]
    run = Run(
        # the task a run is scored on: its dataset, or the text environment it plays (online in it, or offline on
        # conversations logged in it), so offline and online language agents of one environment share a table
        path=path, label=label + (f"[{','.join(extra)}]" if extra else ""),
        dataset=str(data.get("env") or data.get("id") or config.get("dataset")),
        seed=int(config.get("seed") or 0), curve=[(int(r["step"]), float(r[key])) for r in evals],
        online_episodes=[(int(r["step"]), float(r["online/episode_normalized"])) for r in rows if "online/episode_normalized" in r],
        q_mean=[(int(r["step"]), float(r["train/q_mean"])) for r in rows if "train/q_mean" in r],
        switch_step=switch, last_step=int(max(r["step"] for r in rows)), normalized=key == "eval/normalized_mean",
        # (runs written before the "source" field record their training seeds and no data checksum)
        online_only=data.get("source") == "environment" or ("train_seeds" in data and data.get("sha256") is None),
        data_sha256=_select(config, "provenance.data.sha256"),
    )
    run.finished = run.reached(int(config.get("steps") or 0), int(_select(config, "online.steps") or 0))
    return run


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    found: set[Path] = set()
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        candidates = [root] if (root / "config.yaml").exists() else []
        found.update(candidates + [p.parent for p in root.rglob("config.yaml")])
    return sorted(found)


def load_runs(paths: Iterable[str | Path], group_by: Sequence[str] = (), at_step: int | None = None) -> tuple[list[Run], list[str]]:
    """Every readable run below `paths`, and one line per directory that was skipped (name: reason)."""
    runs, skipped = [], []
    for path in find_run_dirs(paths):
        try:
            run = load_run(path, group_by)
        except ValueError as exc:
            skipped.append(f"{path}: {exc}")
            continue
        if at_step is not None:  # score every run at the same step (longer runs are cut there)
            if at_step not in dict(run.curve):
                skipped.append(f"{path}: no evaluation at step {at_step}")
                continue
            run.curve = [p for p in run.curve if p[0] <= at_step]
            run.finished = True
        if not run.finished:
            skipped.append(f"{path}: unfinished (last evaluation at step {run.curve[-1][0]})")
            continue
        runs.append(run)
    return runs, skipped


# ---------------------------------------------------------------------------------------------------
# Aggregates over datasets (rliable)
def score_matrices(runs: Sequence[Run], labels: Sequence[str], datasets: Sequence[str], scale: float = 100.0) -> dict[str, np.ndarray]:
    """label -> (runs x datasets) final scores / scale (100 for normalized scores, 1 for raw returns). Stratified
    bootstrap needs as many runs per dataset: each label keeps its first n seeds per dataset, n the fewest it has on
    any of them."""
    out = {}
    for label in labels:
        columns = [[r.final / scale for r in sorted(runs, key=lambda r: r.seed) if r.label == label and r.dataset == d] for d in datasets]
        n = min(len(c) for c in columns)
        if n > 0:
            out[label] = np.array([c[:n] for c in columns]).T
    return out


def aggregate_metrics(scores: np.ndarray) -> np.ndarray:
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_median(scores), metrics.aggregate_mean(scores),
                     metrics.aggregate_optimality_gap(scores)])


@contextlib.contextmanager
def seeded_bootstrap(seed: int) -> Iterator[np.random.RandomState]:
    """rliable's stratified bootstraps draw indices from numpy's global generator, whatever random_state is
    passed: seed it for the call (and put the caller's state back) so a report is reproducible."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield np.random.RandomState(seed)
    finally:
        np.random.set_state(saved)


def interval_estimates(matrices: dict[str, np.ndarray], reps: int, seed: int) -> dict[str, dict[str, tuple[float, float, float]]]:
    """label -> metric -> (point, CI low, CI high) with rliable's stratified bootstrap (percentile, 95%)."""
    from rliable import library as rly

    with seeded_bootstrap(seed) as state:
        points, intervals = rly.get_interval_estimates(matrices, aggregate_metrics, reps=reps, random_state=state)
    return {label: {name: (float(points[label][i]), float(intervals[label][0, i]), float(intervals[label][1, i]))
                    for i, name in enumerate(AGGREGATES)} for label in matrices}


def improvement_probabilities(matrices: dict[str, np.ndarray], pairs: Sequence[tuple[str, str]], reps: int, seed: int) -> dict[str, tuple[float, float, float]]:
    """'X > Y' -> P(X > Y) with its stratified-bootstrap CI (rliable)."""
    from rliable import library as rly
    from rliable import metrics

    pairs = [(x, y) for x, y in pairs if x in matrices and y in matrices]
    if not pairs:
        return {}
    data = {f"{x} > {y}": (matrices[x], matrices[y]) for x, y in pairs}
    with seeded_bootstrap(seed) as state:
        points, intervals = rly.get_interval_estimates(data, metrics.probability_of_improvement, reps=reps, random_state=state)
    return {key: (float(np.ravel(points[key])[0]), *map(float, np.ravel(intervals[key]))) for key in data}


# ---------------------------------------------------------------------------------------------------
def _mean_std(values: Sequence[float | None], digits: int = 1) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}" if values else "-"


def _ci(point: float, low: float, high: float, scale: float = 100.0) -> str:
    digits = 1 if scale == 100.0 else 3
    return f"{point * scale:.{digits}f} [{low * scale:.{digits}f}, {high * scale:.{digits}f}]"


def build_report(runs: Sequence[Run], order: Sequence[str] = (), compare: Sequence[tuple[str, str]] = (),
                 reps: int = 2000, seed: int = 0) -> dict[str, Any]:
    datasets = sorted({r.dataset for r in runs})
    present = {r.label for r in runs}
    labels = [l for l in order if l in present] + sorted(present - set(order))
    groups = {(d, l): [r for r in runs if r.dataset == d and r.label == l] for d in datasets for l in labels}
    groups = {k: v for k, v in groups.items() if v}
    per_dataset = [{"dataset": d, "agent": l, "final": [r.final for r in g], "best": [r.best for r in g], "n": len(g)} for (d, l), g in groups.items()]
    online = [{"dataset": d, "agent": l, "offline": [r.offline_score for r in g], "worst_drop": [r.worst_drop for r in g],
               "final": [r.final for r in g], "regret": [r.regret for r in g], "q_at_switch": [r.q_at_switch for r in g],
               "q_peak_online": [r.q_peak_online for r in g], "n": len(g)}
              for (d, l), g in groups.items() if any(r.switch_step is not None for r in g)]
    # Aggregates over the datasets every label has (rliable needs the same tasks for a comparison).
    common = [d for d in datasets if all((d, l) in groups for l in labels)]
    normalized = all(r.normalized for r in runs)
    aggregates, improvements, aggregate_runs = {}, {}, {}
    # Raw returns (no reference scores, e.g. an LM's mean reward) aggregate over one dataset only: their scales differ
    if common and (normalized or len(common) == 1):
        matrices = score_matrices(runs, labels, common, 100.0 if normalized else 1.0)
        # how many runs per dataset each label's aggregate uses, and how many of its runs were left out to get there
        aggregate_runs = {label: {"per_dataset": int(matrix.shape[0]),
                                  "left_out": sum(len(groups[(d, label)]) for d in common) - matrix.size} for label, matrix in matrices.items()}
        aggregates = interval_estimates(matrices, reps, seed)
        pairs = list(compare) or [(x, y) for i, x in enumerate(labels) for y in labels[i + 1:]]
        improvements = improvement_probabilities(matrices, pairs, reps, seed)
    return {"datasets": datasets, "labels": labels, "aggregate_datasets": common, "normalized": normalized,
            "data_versions": mixed_data(runs),
            "per_dataset": per_dataset, "online": online, "aggregates": aggregates, "aggregate_runs": aggregate_runs,
            "improvements": improvements,
            "runs": [{"run_dir": str(r.path), "agent": r.label, "dataset": r.dataset, "seed": r.seed, "final": r.final, "best": r.best,
                      "offline": r.offline_score, "worst_drop": r.worst_drop, "regret": r.regret, "switch_step": r.switch_step,
                      "q_at_switch": r.q_at_switch, "q_peak_online": r.q_peak_online,
                      "data_sha256": r.data_sha256} for r in runs]}


def mixed_data(runs: Sequence[Run]) -> dict[str, dict[str, list[str]]]:
    """dataset name -> {sha256 (or "unrecorded"): run directories}, for every dataset whose runs did not all train on
    the same recorded arrays. Locally collected datasets differ between machines, so one name can hide two datasets."""
    # runs that learnt only from their own samples in an environment (online LM runs) have no data to compare
    versions = data_versions((run.dataset, run.data_sha256, str(run.path)) for run in runs if not run.online_only)
    return {name: found for name, found in versions.items() if len(found) > 1}


def to_markdown(report: dict[str, Any], skipped: Sequence[str] = ()) -> str:
    score = "D4RL-normalized score" if report["normalized"] else "mean return"
    digits, scale = (1, 100.0) if report["normalized"] else (3, 1.0)
    lines = []
    for name, found in report.get("data_versions", {}).items():
        counts = ", ".join(f"{sha[:12]}: {len(dirs)} run(s)" for sha, dirs in found.items())
        lines += [f"**Warning: the runs on {name} did not all train on the same data** ({counts}); scores across them are not "
                  "comparable. Split them with `--group-by provenance.data.sha256`.", ""]
    lines += [f"Final and best evaluation during training ({score}, mean ± std over runs).", "",
             "| dataset | agent | final | best during training | n |", "|---|---|---:|---:|---:|"]
    lines += [f"| {row['dataset']} | {row['agent']} | {_mean_std(row['final'], digits)} | {_mean_std(row['best'], digits)} | {row['n']} |"
              for row in report["per_dataset"]]
    if report["online"]:
        lines += ["", "Offline-to-online: worst drop = offline score minus the lowest evaluation after the switch (positive: fell "
                  "below the pre-trained agent); regret = mean over online episodes of 1 - score/100; mean Q on training batches "
                  f"at the switch, and the highest of its {Q_BIN}-step averages in the {Q_WINDOW} steps from the first online update.", "",
                  "| dataset | agent | offline score | worst drop online | after online | cumulative regret | Q at switch | peak Q online | n |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['dataset']} | {row['agent']} | {_mean_std(row['offline'])} | {_mean_std(row['worst_drop'])} | {_mean_std(row['final'])} "
                  f"| {_mean_std(row['regret'], 3)} | {_mean_std(row['q_at_switch'])} | {_mean_std(row['q_peak_online'])} | {row['n']} |"
                  for row in report["online"]]
    if report["aggregates"]:
        lines += ["", f"Aggregate over {len(report['aggregate_datasets'])} dataset(s) ({', '.join(report['aggregate_datasets'])}) with rliable: "
                  "point estimate [95% stratified-bootstrap CI]; optimality gap = mean shortfall below "
                  f"{'100' if report['normalized'] else '1'} (lower is better).", "",
                  "| agent | IQM | median | mean | optimality gap |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {label} | " + " | ".join(_ci(*values[name], scale=scale) for name in AGGREGATES) + " |"
                  for label, values in report["aggregates"].items()]
        lines += ["", _aggregate_runs_note(report["aggregate_runs"])]
    if report["improvements"]:
        lines += ["", "| comparison | probability of improvement [95% CI] |", "|---|---:|"]
        lines += [f"| P({key}) | {p:.2f} [{low:.2f}, {high:.2f}] |" for key, (p, low, high) in report["improvements"].items()]
    elif report["labels"] and not report["aggregates"]:
        lines += ["", "(no aggregate: " + ("no dataset is shared by every agent" if report["normalized"] else "runs without reference scores") + ")"]
    if skipped:
        lines += ["", "Skipped:"] + [f"- {line}" for line in skipped]
    return "\n".join(lines) + "\n"


def _aggregate_runs_note(aggregate_runs: dict[str, dict[str, int]]) -> str:
    """One line saying how many runs per dataset each aggregate rests on, and warning where that makes its CI
    meaningless (one run: a stratified bootstrap has nothing to resample) or where runs were left out."""
    counts = ", ".join(f"{label} {value['per_dataset']}" for label, value in aggregate_runs.items())
    note = f"Runs per dataset in the aggregate: {counts}."
    left_out = {label: value["left_out"] for label, value in aggregate_runs.items() if value["left_out"]}
    if left_out:
        note += (" Each agent keeps its lowest seeds, as many on every dataset as on its sparsest one; left out: "
                 + ", ".join(f"{label} {count} run(s)" for label, count in left_out.items()) + ".")
    single = [label for label, value in aggregate_runs.items() if value["per_dataset"] < 2]
    if single:
        note += (f" **{', '.join(single)}: one run per dataset, so the CI has nothing to resample and says nothing about "
                 "seed spread.**")
    return note


def write_csv(report: dict[str, Any], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(report["runs"][0]) if report["runs"] else ["run_dir"])
        writer.writeheader()
        writer.writerows(report["runs"])


def _band(values: np.ndarray, rng: np.random.Generator, reps: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap band of the mean over runs (rows), per column."""
    if len(values) < 2:
        return values[0], values[0]
    means = values[rng.integers(0, len(values), (reps, len(values)))].mean(1)
    return np.percentile(means, 2.5, axis=0), np.percentile(means, 97.5, axis=0)


def plot_curves(runs: Sequence[Run], report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    datasets, labels = report["datasets"], report["labels"]
    online = any(r.switch_step is not None for r in runs)
    rows = 2 if online and any(r.q_mean and r.switch_step for r in runs) else 1
    fig, axes = plt.subplots(rows, len(datasets), figsize=(max(4.2 * len(datasets), 7.0), 3.4 * rows), squeeze=False)
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    rng = np.random.default_rng(0)
    thousands = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1000:g}k")
    for ax, dataset in zip(axes[0], datasets):
        for label in labels:
            group = [r for r in runs if r.dataset == dataset and r.label == label]
            if not group:
                continue
            steps = sorted(set.intersection(*(set(dict(r.curve)) for r in group)))
            values = np.array([[dict(r.curve)[s] for s in steps] for r in group])
            x = np.array(steps, dtype=float) - (min(r.switch_step or 0 for r in group) if online else 0)  # 0 = the switch
            low, high = _band(values, rng)
            ax.plot(x, values.mean(0), label=f"{label} (n={len(group)})", color=colors[label])
            ax.fill_between(x, low, high, alpha=0.2, color=colors[label])
        ax.xaxis.set_major_formatter(thousands)
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("steps after the switch (< 0: offline)" if online else "gradient step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalized score" if report["normalized"] else "return")
    axes[0][-1].legend(fontsize=7, loc="best")
    if rows == 2:  # mean Q on training batches around the switch: overestimation after it shows here
        for ax, dataset in zip(axes[1], datasets):
            for label in labels:
                group = [r for r in runs if r.dataset == dataset and r.label == label and r.q_mean and r.switch_step]
                if not group:
                    continue
                window = 0.5 * max(step - r.switch_step for r in group for step, _ in r.curve)
                series = [{step - r.switch_step: q for step, q in r.q_mean if -window <= step - r.switch_step <= window} for r in group]
                x = np.array(sorted(set.intersection(*(set(s) for s in series))), dtype=float)
                if not len(x):
                    continue
                y = np.mean([[s[step] for step in x] for s in series], 0)
                gaps = np.flatnonzero(np.diff(x) > 2 * np.median(np.diff(x))) + 1 if len(x) > 2 else []  # no line across a warmup
                ax.plot(np.insert(x, gaps, np.nan), np.insert(y, gaps, np.nan), ".-", markersize=3, label=label, color=colors[label])
            ax.axvline(0, color="grey", lw=0.8)
            ax.xaxis.set_major_formatter(thousands)
            ax.set_xlabel("environment steps after the switch")
            ax.set_title("mean Q on training batches", fontsize=9)
            ax.grid(alpha=0.3)
        axes[1][0].set_ylabel("Q")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_profiles(runs: Sequence[Run], report: dict[str, Any], path: Path, reps: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from rliable import library as rly
    from rliable import plot_utils

    scale = 100.0 if report["normalized"] else 1.0
    matrices = score_matrices(runs, report["labels"], report["aggregate_datasets"], scale)
    top = max(1.0, max(float(m.max()) for m in matrices.values()))
    taus = np.linspace(min(0.0, min(float(m.min()) for m in matrices.values())), top, 101)
    with seeded_bootstrap(seed):
        profiles, cis = rly.create_performance_profile(matrices, taus, reps=reps)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    colors = {label: f"C{report['labels'].index(label) % 10}" for label in matrices}
    plot_utils.plot_performance_profiles(profiles, taus * scale, performance_profile_cis=cis, ax=ax, colors=colors,
                                         xlabel=(r"normalized score $\tau$" if report["normalized"] else r"return $\tau$"),
                                         ylabel=r"fraction of runs with score $> \tau$")
    ax.legend(handles=[Line2D([0], [0], color=colors[label]) for label in matrices], labels=list(matrices), fontsize=8, loc="upper right")
    ax.set_title(f"performance profiles over {len(report['aggregate_datasets'])} dataset(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orl-report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories, sweep directories or any folder above them")
    parser.add_argument("--out", help="output directory (default: <first path>/report)")
    parser.add_argument("--group-by", nargs="+", default=[], metavar="KEY", help="config keys that split an agent's runs into groups, e.g. agent.expectile")
    parser.add_argument("--order", nargs="+", default=[], metavar="AGENT", help="agent order in tables and plots")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("X", "Y"), help="probability that X improves on Y (default: every pair)")
    parser.add_argument("--agents", nargs="+", metavar="AGENT", help="only these agents (labels)")
    parser.add_argument("--at-step", type=int, help="score every run at this step instead of its last evaluation")
    parser.add_argument("--reps", type=int, default=2000, help="bootstrap replications (rliable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    args = parser.parse_args(argv)
    # rliable seeds arch's bootstrap with a RandomState, which arch deprecates (results are unchanged).
    warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
    try:
        runs, skipped = load_runs(args.paths, args.group_by, args.at_step)
    except FileNotFoundError as exc:
        print(f"orl-report: error: {exc}", file=sys.stderr)
        return 2
    if args.agents:
        runs = [r for r in runs if r.label in args.agents]
    for line in skipped:
        print(f"[orl-report] skipped {line}", file=sys.stderr)
    if not runs:
        print(f"orl-report: error: no finished run with an evaluation under {' '.join(args.paths)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.paths[0]) / "report"
    out.mkdir(parents=True, exist_ok=True)
    report = build_report(runs, args.order, [tuple(pair) for pair in args.compare or []], args.reps, args.seed)
    markdown = to_markdown(report, skipped)
    for name, found in report["data_versions"].items():
        print(f"[orl-report] warning: runs on {name} trained on {len(found)} different datasets ({', '.join(sha[:12] for sha in found)})", file=sys.stderr)
    (out / "report.md").write_text(markdown)
    (out / "summary.json").write_text(json.dumps({**report, "skipped": list(skipped)}, indent=1))
    write_csv(report, out / "runs.csv")
    plot_curves(runs, report, out / "curves.png")
    if report["aggregates"]:
        plot_profiles(runs, report, out / "profiles.png", args.reps, args.seed)
    print(markdown)
    print(f"[orl-report] {len(runs)} runs -> {out}/report.md, summary.json, runs.csv, curves.png" + (", profiles.png" if report["aggregates"] else ""))
    return 0


def report_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    report_main()
