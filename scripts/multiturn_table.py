"""Markdown tables of scripts/bench_multiturn.sh and bench_counting.sh from their raw runs (results/multiturn/<task>/
<method>/seed<k>/metrics.jsonl): final held-out success (or reward) per method, mean ± std over seeds, with the starting
score of the online runs and the environment interaction each method used.

    python scripts/multiturn_table.py results/multiturn
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

METHODS = ["reference", "filtered_bc", "alol", "ilql", "ilql_beta4", "ilql_beta4_2k", "grpo", "filtered_bc+grpo", "alol+grpo", "ilql+grpo", "ilql_beta4+grpo"]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def table(task_dir: Path) -> str:
    log = json.loads((task_dir / "log.json").read_text()) if (task_dir / "log.json").exists() else None
    data = json.loads((task_dir / "data.json").read_text()) if (task_dir / "data.json").exists() else None
    key = "eval/success" if log else "eval/return_mean"
    lines = [f"| method | held-out {'success' if log else 'reward'} (final) | at step 0 | seeds | environment interaction in training |",
             "|---|---:|---:|---:|---|"]
    starts: list[float] = []
    for method in METHODS[1:]:
        finals, first, online = [], [], []
        for run in sorted((task_dir / method).glob("seed*")):
            metrics = rows(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
            evals = [r for r in metrics if key in r]
            if not evals or evals[-1]["step"] < max(r["step"] for r in metrics):
                continue  # unfinished
            finals.append(evals[-1][key])
            if evals[0]["step"] == 0:
                first.append(evals[0][key])
            online.append([r.get("train/episode/turns") for r in metrics if "train/episode/turns" in r])
        if not finals:
            continue
        if method == "grpo":
            starts = first
        offline = method.split("+")[0] if method != "grpo" else None
        used = []
        if offline:
            used.append(f"{log['episodes']} logged conversations ({log['episodes'] * log['turns_mean']:.0f} turns)" if log else
                        f"{data['rows']} logged responses")
        if "grpo" in method:
            turns = [statistics.mean(t) for t in online if t]
            used.append("6400 conversations" + (f" (≈{6400 * statistics.mean(turns):.0f} turns)" if turns and log else "") if log else
                        "6400 sampled responses")
        lines.append(f"| {method} | {mean_std(finals)} | {mean_std(first)} | {len(finals)} | {' + '.join(used)} |")
    reference = mean_std(starts)
    lines.insert(2, f"| reference (the tiny LM) | {reference} | | {len(starts)} evaluations | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "results/multiturn")
    for task in sorted(p for p in root.iterdir() if p.is_dir()):
        print(f"\n**{task.name}**\n")
        print(table(task))
