"""Run a grid of `orl-train` jobs (agents x datasets x seeds) and report it as a table and a plot.

    # run (resumable: finished runs are skipped), 2 jobs at a time
    python scripts/grid.py run --name baselines --agents bc td3bc iql \
        --datasets orl/halfcheetah/medium-v0 orl/hopper/medium-replay-v0 --seeds 0 1 2 --steps 20000 --jobs 2
    # aggregate: results/<name>/table.md (mean ± std of the final normalized score) and curves.png
    python scripts/grid.py report --name baselines

A variant runs an agent under another name with its own overrides (placeholders: {seed}, {dataset},
{dataset_key}, {grid_runs}); here Cal-QL fine-tuned without offline data from each seed's Cal-QL pre-training:
    python scripts/grid.py run --name o2o --agents calql calql_none=calql --datasets orl/pendulum/medium-v0 \
        --agent-override "calql_none:init_from={grid_runs}/{dataset_key}__calql__seed{seed}" \
        --agent-override calql_none:online.buffer_mode=none -- online.steps=5000

Each finished run leaves results/<name>/runs/<dataset>__<agent>__seed<k>.json with its evaluation
curve, so later sessions extend a grid instead of redoing it. Extra hydra overrides go after `--`.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dataset_key(dataset: str) -> str:
    return dataset.replace("/", "-")


def run_key(dataset: str, agent: str, seed: int) -> str:
    return f"{dataset_key(dataset)}__{agent}__seed{seed}"


def run_one(args: argparse.Namespace, dataset: str, label: str, seed: int) -> str:
    # `label=agent` runs `agent` under its own name (a variant with its own --agent-override lines).
    label, _, agent = label.partition("=")
    agent = agent or label
    out_dir = ROOT / "results" / args.name / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / f"{run_key(dataset, label, seed)}.json"
    if result_path.exists():
        return f"skip {result_path.name}"
    run_dir = ROOT / "runs" / "grid" / args.name / run_key(dataset, label, seed)
    # Overrides may use {seed}, {dataset}, {dataset_key} and {grid_runs} (this grid's run dirs), e.g.
    # init_from={grid_runs}/{dataset_key}__calql__seed{seed} to fine-tune another run's offline checkpoint.
    fields = {"seed": seed, "dataset": dataset, "grid_runs": ROOT / "runs" / "grid" / args.name, "dataset_key": dataset_key(dataset)}
    cmd = [
        sys.executable, "-m", "orl.cli", f"agent={agent}", f"dataset={dataset}", f"seed={seed}", f"steps={args.steps}",
        f"eval.every={args.eval_every}", f"eval.episodes={args.eval_episodes}", f"run_dir={run_dir}", "log.progress=false",
        "resume=true", *args.overrides,
    ]
    cmd += [o for o in args.agent_overrides.get(label, [])]
    cmd = [part.format(**fields) for part in cmd]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        return f"FAILED {run_key(dataset, label, seed)}:\n{proc.stderr[-3000:]}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval/normalized_mean"]) for r in rows if "eval/normalized_mean" in r]
    online = [(r["step"], r["online/episode_normalized"]) for r in rows if "online/episode_normalized" in r]
    q_mean = [(r["step"], r["train/q_mean"]) for r in rows if "train/q_mean" in r]  # the divergence around the switch
    online_rows = [r for r in rows if "train/online_step" in r]
    switch = int(online_rows[0]["step"] - online_rows[0]["train/online_step"]) if online_rows else None
    result = {"dataset": dataset, "agent": label, "seed": seed, "steps": args.steps, "switch_step": switch, "curve": curve, "online_episodes": online, "q_mean": q_mean,
              "final": curve[-1][1] if curve else None, "seconds": round(time.time() - start, 1), "command": " ".join(cmd[3:])}
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_path)
    return f"done {result_path.name}: final {result['final']:.1f} ({result['seconds']:.0f}s)"


def cmd_run(args: argparse.Namespace) -> None:
    args.agent_overrides = {}
    for item in args.agent_override or []:
        agent, _, override = item.partition(":")
        args.agent_overrides.setdefault(agent, []).append(override)
    jobs = [(d, a, s) for d in args.datasets for s in args.seeds for a in args.agents]
    with ThreadPoolExecutor(args.jobs) as pool:
        for message in pool.map(lambda job: run_one(args, *job), jobs):
            print(message, flush=True)


def load_results(name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((ROOT / "results" / name / "runs").glob("*.json"))]


def switch_step(result: dict) -> int:
    """Offline steps before the online phase (results from before `switch_step` was recorded: the grid's --steps)."""
    switch = result.get("switch_step")
    return result["steps"] if switch is None else switch


def offline_score(result: dict) -> float | None:
    """The last evaluation at or before the switch (None if there is none)."""
    switch = switch_step(result)
    return max((p for p in result["curve"] if p[0] <= switch), default=(0, None))[1]


def worst_drop(result: dict) -> float:
    """Offline score minus the lowest evaluation of the online phase: a collapse anywhere after the
    switch counts, also one delayed by a warmup."""
    start, switch = offline_score(result), switch_step(result)
    online = [score for step, score in result["curve"] if step > switch]
    if not online or start is None:
        return 0.0
    return start - min(online)


def cmd_report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    results = load_results(args.name)
    for other in args.include or []:  # e.g. the baseline an agent is compared with, from another grid
        datasets_here = {r["dataset"] for r in results}
        results += [r for r in load_results(other) if r["dataset"] in datasets_here and (not args.agents or r["agent"] in args.agents)]
    if args.agents:
        results = [r for r in results if r["agent"] in args.agents]
    if args.at_step is not None:  # score every run at the same gradient step (runs that are longer are cut there)
        results = [{**r, "curve": [p for p in r["curve"] if p[0] <= args.at_step], "final": dict(r["curve"]).get(args.at_step)}
                   for r in results if args.at_step in dict(r["curve"])]
    if not results:
        sys.exit(f"no results under results/{args.name}/runs")
    datasets = sorted({r["dataset"] for r in results})
    agents = [a for a in args.order if any(r["agent"] == a for r in results)] + sorted({r["agent"] for r in results} - set(args.order))
    if args.online:
        lines = ["| dataset | agent | offline score | worst drop online | after online | cumulative regret | seeds |", "|---|---|---:|---:|---:|---:|---:|"]
        for dataset in datasets:
            for agent in agents:
                runs = [r for r in results if r["dataset"] == dataset and r["agent"] == agent]
                if not runs:
                    continue
                offline = [offline_score(r) for r in runs if switch_step(r) > 0]
                final = [r["final"] for r in runs]
                regret = [np.mean([1 - score / 100 for _, score in r["online_episodes"]]) for r in runs if r["online_episodes"]]
                drop = [worst_drop(r) for r in runs if switch_step(r) > 0]
                fmt = lambda xs, digits=1: f"{np.mean(xs):.{digits}f} ± {np.std(xs):.{digits}f}" if xs and None not in xs else "-"  # noqa: E731
                lines.append(f"| {dataset} | {agent} | {fmt(offline)} | {fmt(drop)} | {fmt(final)} | {fmt(regret, 3)} | {len(runs)} |")
        table = "\n".join(lines) + ("\n\nD4RL-normalized scores (mean ± std over seeds); worst drop = offline score minus the lowest "
                                    "evaluation of the online phase (positive: the score fell below the pre-trained agent's); "
                                    "regret = mean over online episodes of 1 - score/100.\n")
    else:
        lines = ["| dataset | " + " | ".join(agents) + " |", "|---|" + "---:|" * len(agents)]
        for dataset in datasets:
            cells = []
            for agent in agents:
                scores = [r["final"] for r in results if r["dataset"] == dataset and r["agent"] == agent and r["final"] is not None]
                cells.append(f"{np.mean(scores):.1f} ± {np.std(scores):.1f} (n={len(scores)})" if scores else "-")
            lines.append(f"| {dataset} | " + " | ".join(cells) + " |")
        steps = sorted({r["steps"] for r in results})
        steps = [args.at_step] if args.at_step is not None else steps
        table = "\n".join(lines) + f"\n\nFinal D4RL-normalized score (mean ± std over seeds), {steps} gradient steps.\n"
    out = ROOT / "results" / args.name
    (out / "table.md").write_text(table)
    print(table)

    # Online: a second row with the mean Q on training batches around the switch (results that recorded it).
    rows = 2 if args.online and any(r.get("q_mean") for r in results) else 1
    fig, axes = plt.subplots(rows, len(datasets), figsize=(max(4.2 * len(datasets), 7.0), 3.4 * rows), squeeze=False)
    colors = {agent: f"C{i}" for i, agent in enumerate(agents)}
    for ax, dataset in zip(axes[0], datasets):
        for agent in agents:
            curves = [r["curve"] for r in results if r["dataset"] == dataset and r["agent"] == agent and r["curve"]]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            x = np.array([p[0] for p in curves[0][:length]])
            y = np.array([[p[1] for p in c[:length]] for c in curves])
            if args.online:
                x = x - min(switch_step(r) for r in results if r["agent"] == agent and r["dataset"] == dataset)  # 0 = the switch
            ax.plot(x, y.mean(0), label=agent, color=colors[agent])
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2, color=colors[agent])
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1000:g}k"))
        ax.set_title(dataset, fontsize=9)
        ax.set_xlabel("gradient step" if not args.online else "steps after the switch (< 0: offline)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("normalized score")
    axes[0][-1].legend(fontsize=7, loc="best")
    if rows == 2:
        for ax, dataset in zip(axes[1], datasets):
            for agent in agents:
                runs = [r for r in results if r["dataset"] == dataset and r["agent"] == agent and r.get("q_mean") and switch_step(r) > 0]
                if not runs:
                    continue
                window = 0.5 * max(p[0] - switch_step(r) for r in runs for p in r["curve"])
                series = [{p[0] - switch_step(r): p[1] for p in r["q_mean"] if -window <= p[0] - switch_step(r) <= window} for r in runs]
                x = np.array(sorted(set.intersection(*(set(d) for d in series))), dtype=float)
                y = np.mean([[d[step] for step in x] for d in series], 0)
                # No line across stretches without updates (a warmup, sparse offline logging).
                gaps = np.flatnonzero(np.diff(x) > 2 * np.median(np.diff(x))) + 1 if len(x) > 2 else []
                x, y = np.insert(x, gaps, np.nan), np.insert(y, gaps, np.nan)
                ax.plot(x, y, ".-", markersize=3, label=agent, color=colors[agent])
            ax.axvline(0, color="grey", lw=0.8)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value / 1000:g}k"))
            ax.set_xlabel("environment steps after the switch")
            ax.set_title("mean Q on training batches", fontsize=9)
            ax.grid(alpha=0.3)
        axes[1][0].set_ylabel("Q")
        axes[1][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"wrote {out / 'table.md'} and {out / 'curves.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the grid (skips finished runs)")
    run.add_argument("--name", required=True)
    run.add_argument("--agents", nargs="+", required=True)
    run.add_argument("--datasets", nargs="+", required=True)
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--steps", type=int, default=20000)
    run.add_argument("--eval-every", type=int, default=2000)
    run.add_argument("--eval-episodes", type=int, default=10)
    run.add_argument("--jobs", type=int, default=1)
    run.add_argument("--agent-override", action="append", help="AGENT:override applied to one agent only, e.g. iql:data.reward=iql_locomotion")
    run.add_argument("overrides", nargs="*", help="hydra overrides for every run (after --)")
    report = sub.add_parser("report", help="write table.md and curves.png")
    report.add_argument("--name", required=True)
    report.add_argument("--order", nargs="+", default=["bc", "td3bc", "iql", "a2pr", "famo2o_iql"])
    report.add_argument("--online", action="store_true")
    report.add_argument("--include", nargs="+", help="also take these grids' runs on the same datasets (e.g. baselines)")
    report.add_argument("--agents", nargs="+", help="only these agents")
    report.add_argument("--at-step", type=int, help="score runs at this gradient step instead of their last evaluation")
    args = parser.parse_args()
    cmd_run(args) if args.command == "run" else cmd_report(args)


if __name__ == "__main__":
    main()
