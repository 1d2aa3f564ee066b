"""The README's preference-learning table from the runs `make prefs-bench` writes under results/prefs/.

    python scripts/prefs_table.py results/prefs [--baselines results/baselines] [--step 10000]

Rows: the oracle (IQL on the true reward), TD3+BC on the true reward and BC (read at the same step of
their `results/baselines` runs: neither has a schedule, so a prefix of a longer run is a shorter run),
and every preference method; columns:
the label sets (`<dataset name>-<teacher>-<queries>` sweep directories, runs tagged `<method>@<set>`).
The reward models' held-out accuracy (non-tie queries, 10% of the labels held out) and the correlation
of the learned with the true reward are read from results/prefs/rm/<set>/seed*/metrics.json. Writes
results/prefs/table.md and results/prefs/summary.json; prints the markdown.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from orl.provenance import data_versions
from orl.report import load_runs

METHODS = {"oracle_iql": "IQL, true reward (oracle)", "td3bc": "TD3+BC, true reward", "bc": "BC (no reward)", "piql": "P-IQL (BT ensemble + IQL)",
           "ptd3bc": "P-TD3+BC (BT ensemble + TD3+BC)", "cpl": "CPL (no reward model)", "cpl_kl": "CPL-KL"}
SET_NAMES = {"rational-2000": "rational, 2000 queries", "mistake0.1-2000": "mistakes eps=0.1, 2000 queries",
             "rational-500": "rational, 500 queries", "scores-2000": "2000 segments scored by return (CPL rank mode)"}


def mean_std(values: list[float], digits: int = 1) -> str:
    return f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f} (n={len(values)})" if values else "-"


def data_notes(runs, recorded_file: Path) -> list[str]:
    """One line per dataset on the data its runs trained on: the sha256 their provenance.json records (runs from
    before provenance existed are counted), checked against results/datasets.json (the README's collection)."""
    recorded = json.loads(recorded_file.read_text())["datasets"] if recorded_file.exists() else {}
    notes = []
    for dataset, found in sorted(data_versions((run.dataset, run.data_sha256, str(run.path)) for run in runs).items()):
        known = set(found) - {"unrecorded"}
        unrecorded = len(found.get("unrecorded", []))
        expected = recorded.get(dataset, {}).get("sha256")
        verdict = ("same data as results/datasets.json" if known == {expected} else
                   f"WARNING: not the data of results/datasets.json ({expected[:12] if expected else 'not listed'})")
        shas = ", ".join(sha[:12] for sha in sorted(known)) or "none recorded"
        notes.append(f"Data of {dataset}: {shas} ({verdict if known else 'unverified'}); {unrecorded} run(s) predate provenance.json.")
    return notes + [""] if notes else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", default="results/prefs")
    parser.add_argument("--baselines", default="results/baselines")
    parser.add_argument("--step", type=int, default=10000, help="score every run at this step")
    parser.add_argument("--datasets", default="results/datasets.json", help="the sha256 of the README's datasets")
    args = parser.parse_args()
    root = Path(args.root)

    runs, skipped = load_runs([p for p in root.iterdir() if p.is_dir() and p.name not in ("rm", "labels")], at_step=args.step)
    scores: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (dataset, method, label set) -> scores
    for run in runs:
        method, _, label_set = run.label.partition("@")
        scores[(run.dataset, method, label_set or "*")].append(run.final)
    datasets = sorted({run.dataset for run in runs})

    reward_models: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted((root / "rm").glob("*/seed*/metrics.json")):
        metrics = json.loads(path.read_text())
        for key in ("held_out_accuracy", "reward_correlation"):
            reward_models[path.parent.parent.name][key].append(float(metrics[key]))

    def short(dataset: str) -> str:  # orl/halfcheetah/medium-replay-v0 -> halfcheetah-medium-replay (the sweep and RM dir prefix)
        parts = dataset.split("/")
        return parts[-2] + "-" + parts[-1].rsplit("-v", 1)[0] if len(parts) >= 2 else dataset

    names = {short(d): d for d in datasets}
    for rm_name in reward_models:  # datasets with reward models but no policy runs yet still get their accuracy rows
        for set_name in SET_NAMES:
            labels = root / "labels" / f"{rm_name}.npz"
            if rm_name.endswith("-" + set_name) and labels.exists():
                with np.load(labels) as file:  # the label file names its dataset
                    names.setdefault(rm_name[: -len(set_name) - 1], str(file["source"]))
    bc_runs = []
    if Path(args.baselines).exists():
        bc_runs, _ = load_runs([args.baselines], at_step=args.step)
        for run in bc_runs:
            if run.label in ("bc", "td3bc") and run.dataset in names.values():
                scores[(run.dataset, run.label, "*")].append(run.final)
    lines, summary = [], {"step": args.step, "scores": {}, "reward_models": {k: dict(v) for k, v in reward_models.items()}, "skipped": skipped}
    for name, dataset in sorted(names.items()):
        sets = [s for s in SET_NAMES if any(k[0] == dataset and k[2] == s for k in scores) or f"{name}-{s}" in reward_models]
        lines += [f"**{dataset}**, D4RL-normalized score at step {args.step} (mean ± std over seeds):", "",
                  "| method | " + " | ".join(SET_NAMES[s] for s in sets) + " |", "|---|" + "---:|" * len(sets)]
        for method, title in METHODS.items():
            row = [scores.get((dataset, method, s)) or scores.get((dataset, method, "*")) or [] for s in sets]
            if any(row):
                lines.append(f"| {title} | " + " | ".join(mean_std(v) for v in row) + " |")
                summary["scores"].update({f"{dataset}|{method}|{s}": v for s, v in zip(sets, row) if v})
        for key, title in (("held_out_accuracy", "reward model: held-out accuracy"), ("reward_correlation", "reward model: corr(learned, true reward)")):
            row = [reward_models.get(f"{name}-{s}", {}).get(key, []) for s in sets]
            if any(row):
                lines.append(f"| {title} | " + " | ".join(mean_std(v, 3) for v in row) + " |")
        lines.append("")
    if skipped:
        lines += ["Skipped: " + "; ".join(skipped), ""]
    lines += data_notes([run for run in runs + bc_runs if run.dataset in names.values()], Path(args.datasets))
    text = "\n".join(lines)
    (root / "table.md").write_text(text)
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)


if __name__ == "__main__":
    main()
