"""What FamO2O's balance model does over a run: the beta it acts with and trains on, and why, from the runs' metrics.

For every FamO2O run below the given folders (a run directory: config.yaml + metrics.jsonl with `train/beta_q50`),
one markdown row per dataset and checkpoint step (mean over seeds): the acting beta (pi_b's mode; mean over a batch's
states, and its spread across states), the betas the universal policy was trained on (10th / 50th / 90th percentile;
uniform on [beta_lo, beta_hi] offline), pi_b's log-std and temperature, dQ/dbeta at pi_b's samples, and the Q gap
between the family's ends, min Q(s, pi_u(s, beta_hi)) - min Q(s, pi_u(s, beta_lo)). Also a figure, beta.png, of the
acting beta and the trained-on percentiles against the step, one panel per dataset.

    python scripts/famo2o_beta.py results/famo2o_long [--steps 10000 12000 20000 35000 60000] [--out results/famo2o_long/report]
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

from orl.logger import read_metrics
from orl.report import find_run_dirs

COLUMNS = [("balance_beta_mean", "acting β"), ("balance_beta_std", "acting β spread over states"),
           ("beta_q10", "trained-on β q10"), ("beta_q50", "q50"), ("beta_q90", "q90"),
           ("balance_log_std", "π_b log-std"), ("balance_temperature", "π_b temperature"),
           ("balance_dq_dbeta", "dQ/dβ"), ("balance_q_gap", "Q(β_hi) − Q(β_lo)")]


def famo2o_runs(paths: list[Path]) -> tuple[dict[str, list[dict[int, dict]]], dict[str, int]]:
    """dataset -> one {step: train metrics} per run, and dataset -> the step of the switch to online."""
    runs: dict[str, list[dict[int, dict]]] = defaultdict(list)
    switch: dict[str, int] = {}
    for run_dir in find_run_dirs(paths):
        if not (run_dir / "metrics.jsonl").exists():
            continue
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        by_step = {int(row["step"]): {k.removeprefix("train/"): v for k, v in row.items()}
                   for row in read_metrics(run_dir) if "train/beta_q50" in row}
        if by_step:
            runs[config["dataset"]].append(by_step)
            switch[config["dataset"]] = config["steps"]
    return runs, switch


def table(runs: dict[str, list[dict[int, dict]]], steps: list[int]) -> str:
    lines = ["| dataset | step | n | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---:|---:|" + "---:|" * len(COLUMNS)]
    for dataset, dataset_runs in sorted(runs.items()):
        for step in steps:
            present = [run[step] for run in dataset_runs if step in run]
            if not present:
                continue
            cells = []
            for key, _ in COLUMNS:
                values = [row[key] for row in present if key in row]
                cells.append(f"{statistics.mean(values):.3g}" if values else "-")
            lines.append(f"| {dataset} | {step} | {len(present)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(runs: dict[str, list[dict[int, dict]]], switch: dict[str, int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.5), squeeze=False)
    for axis, (dataset, dataset_runs) in zip(axes[0], sorted(runs.items())):
        for index, run in enumerate(dataset_runs):
            steps = sorted(run)
            label = index == 0
            axis.plot(steps, [run[s].get("balance_beta_mean") for s in steps], color="C0", label="acting β" if label else None)
            axis.fill_between(steps, [run[s]["beta_q10"] for s in steps], [run[s]["beta_q90"] for s in steps], color="C1",
                              alpha=0.15, label="trained-on β, q10-q90" if label else None)
        axis.axvline(switch[dataset], color="grey", linestyle=":", label="online from here")
        axis.set_title(dataset)
        axis.set_xlabel("step")
        axis.set_ylabel("β")
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "beta.png", dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--steps", nargs="+", type=int, default=[10000, 11000, 15000, 20000, 30000, 40000, 50000, 60000])
    parser.add_argument("--out", type=Path, help="folder for beta.md and beta.png (default: <first path>/report)")
    args = parser.parse_args()
    runs, switch = famo2o_runs(args.paths)
    if not runs:
        raise SystemExit(f"no FamO2O run with beta metrics (train/beta_q50) under {', '.join(map(str, args.paths))}")
    out = args.out or args.paths[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs, args.steps)
    (out / "beta.md").write_text(text + "\n")
    figure(runs, switch, out)
    print(text)
    print(f"\nwrote {out / 'beta.md'} and {out / 'beta.png'}")


if __name__ == "__main__":
    main()
