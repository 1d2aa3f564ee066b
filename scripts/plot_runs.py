"""Plot several runs on one figure, e.g. fine-tuning runs around the offline-to-online switch.

    python scripts/plot_runs.py runs/a runs/b --labels IQL FamO2O --out finetune.png
    python scripts/plot_runs.py runs/a --metrics eval/normalized_mean train/q_mean online/cumulative_regret

Each panel is one metric from the runs' metrics.jsonl against the global step; a dashed line marks
the switch (the first step with an online metric).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from orl.logger import read_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--labels", nargs="+", default=None)
    parser.add_argument("--metrics", nargs="+", default=["eval/normalized_mean", "online/episode_normalized", "train/q_mean"])
    parser.add_argument("--out", default="runs.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    fig, axes = plt.subplots(1, len(args.metrics), figsize=(4.5 * len(args.metrics), 3.4), squeeze=False)
    for run, label in zip(args.runs, labels):
        rows = read_metrics(run)
        switch = next((r["step"] for r in rows if any(k.startswith("online/") or k == "train/online_step" for k in r)), None)
        for ax, metric in zip(axes[0], args.metrics):
            points = [(r["step"], r[metric]) for r in rows if metric in r]
            if points:
                line, = ax.plot(*zip(*points), label=label, alpha=0.9)
                if switch is not None:
                    ax.axvline(switch, color=line.get_color(), linestyle="--", alpha=0.4)
    for ax, metric in zip(axes[0], args.metrics):
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
