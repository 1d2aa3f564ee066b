"""orl against d3rlpy on the same dataset file, the same seeds and matched hyperparameters.

For each (dataset, agent, seed), both libraries train on one D4RL-keyed `.npz` exported from the orl
dataset, and **both are scored by the same code in the same environment**: d3rlpy's policy is saved
with `save_policy` (TorchScript, observation scaler included) at every evaluation step and evaluated
here with orl's `evaluate` (deterministic actions, env seeds seed + 100 + i, D4RL-normalized with the
dataset's reference scores). So a difference in the table is a difference in training, not in
evaluation or environment versions.

Matched settings (both libraries' defaults where they agree, orl's where they do not):
  all:    batch 256, 2x256 MLPs, Adam, observation standardization (std + 1e-3), discount 0.99
  bc:     deterministic policy, MSE, lr 3e-4                (d3rlpy's default is lr 1e-3, batch 100)
  td3bc:  alpha 2.5, actor/critic lr 3e-4, policy noise 0.2, clip 0.5, actor every 2 steps, tau 0.005
  iql:    expectile 0.7, beta 3, max weight 100, lr 3e-4, tau 0.005, rewards x 1000 / return range
          (orl: data.reward=iql_locomotion; d3rlpy: ReturnBasedRewardScaler(multiplier=1000)); each
          library's own actor-lr schedule default (orl: cosine over the official 1M steps, d3rlpy: none)

d3rlpy pins an older gymnasium, so it runs in its own venv (`make bench` builds `.venv-d3rlpy`);
this script calls that python for the d3rlpy half. Every finished run is one small JSON under
--out (default results/compare_d3rlpy/steps<steps>: one folder per training budget); runs already there
are skipped, so an interrupted or extended comparison continues where it stopped.

    python scripts/compare_d3rlpy.py run --datasets orl/hopper/medium-v0 --agents bc td3bc iql --seeds 0 1 2 \\
        --d3rlpy-python .venv-d3rlpy/bin/python
    python scripts/compare_d3rlpy.py report --steps 30000     # the per-dataset table (markdown)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ("bc", "td3bc", "iql")


def slug(dataset: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", dataset).strip("-")


def run_path(out: Path, library: str, agent: str, dataset: str, seed: int) -> Path:
    return out / f"{library}__{agent}__{slug(dataset)}__seed{seed}.json"


# --------------------------------------------------------------------------------------------
# orl side
# --------------------------------------------------------------------------------------------
def export_dataset(dataset: str, folder: Path) -> Path:
    """The one file both libraries read: D4RL keys + env id + reference scores."""
    from orl.data import make_dataset

    path = folder / f"{slug(Path(dataset).stem if Path(dataset).suffix else dataset)}.npz"
    if not path.exists():
        make_dataset(dataset).save(path)
    return path


def run_orl(agent: str, data_file: Path, seed: int, steps: int, eval_every: int, episodes: int, work: Path) -> dict:
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.logger import read_metrics

    overrides = [f"agent={agent}", f"dataset={data_file}", f"seed={seed}", f"steps={steps}", f"eval.every={eval_every}",
                 f"eval.episodes={episodes}", "device=cpu", "log.progress=false", "log.tensorboard=false",
                 f"checkpoint.every={steps}", f"run_dir={work}"]
    if agent == "iql":
        overrides.append("data.reward=iql_locomotion")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    start = time.time()
    run_train(cfg)
    curve = {int(r["step"]): r["eval/normalized_mean"] for r in read_metrics(work) if "eval/normalized_mean" in r}
    return {"curve": curve, "train_seconds": time.time() - start}


class ScriptedPolicy:
    """d3rlpy's saved TorchScript policy behind orl's `act` interface (it scales observations itself)."""

    def __init__(self, path: Path):
        import torch

        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.module(torch.as_tensor(obs, dtype=torch.float32)).numpy()


def score_d3rlpy_policies(policies: dict[int, Path], data_file: Path, seed: int, episodes: int) -> dict[int, float]:
    from orl.envs import make_env
    from orl.data import make_dataset
    from orl.evaluation import evaluate

    dataset = make_dataset(data_file)
    ref = (dataset.ref_min_score, dataset.ref_max_score)
    return {step: evaluate(ScriptedPolicy(path), lambda: make_env(dataset.env_id), episodes, seed + 100, ref_scores=ref).mean_normalized
            for step, path in sorted(policies.items())}


# --------------------------------------------------------------------------------------------
# d3rlpy side (runs inside the d3rlpy venv: `--d3rlpy-worker`)
# --------------------------------------------------------------------------------------------
def d3rlpy_worker(agent: str, data_file: Path, seed: int, steps: int, eval_every: int, policy_dir: Path) -> None:
    import logging

    import d3rlpy
    import structlog
    import torch

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    torch.set_num_threads(1)
    d3rlpy.seed(seed)
    with np.load(data_file) as f:
        arrays = {k: f[k] for k in f.files}
    dataset = d3rlpy.dataset.MDPDataset(
        observations=arrays["observations"].astype(np.float32), actions=arrays["actions"].astype(np.float32),
        rewards=arrays["rewards"].astype(np.float32), terminals=arrays["terminals"].astype(np.float32),
        timeouts=arrays["timeouts"].astype(np.float32),
    )
    scaler = d3rlpy.preprocessing.StandardObservationScaler(eps=1e-3)
    if agent == "bc":
        config = d3rlpy.algos.BCConfig(batch_size=256, learning_rate=3e-4, policy_type="deterministic", observation_scaler=scaler)
    elif agent == "td3bc":
        config = d3rlpy.algos.TD3PlusBCConfig(batch_size=256, actor_learning_rate=3e-4, critic_learning_rate=3e-4, alpha=2.5,
                                              target_smoothing_sigma=0.2, target_smoothing_clip=0.5, update_actor_interval=2,
                                              tau=0.005, gamma=0.99, observation_scaler=scaler)
    elif agent == "iql":
        config = d3rlpy.algos.IQLConfig(batch_size=256, actor_learning_rate=3e-4, critic_learning_rate=3e-4, expectile=0.7,
                                        weight_temp=3.0, max_weight=100.0, tau=0.005, gamma=0.99, observation_scaler=scaler,
                                        reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0))
    else:
        raise ValueError(f"no d3rlpy counterpart for {agent}")
    algo = config.create(device="cpu:0")
    policy_dir.mkdir(parents=True, exist_ok=True)

    def save(algo_, epoch: int, total_step: int) -> None:
        if total_step % eval_every == 0 or total_step == steps:
            algo_.save_policy(str(policy_dir / f"step{total_step}.pt"))

    start = time.time()
    algo.fit(dataset, n_steps=steps, n_steps_per_epoch=min(eval_every, steps), show_progress=False, save_interval=10**9,
             logger_adapter=d3rlpy.logging.NoopAdapterFactory(), callback=save)
    print(json.dumps({"train_seconds": time.time() - start}))


def run_d3rlpy(python: str, agent: str, data_file: Path, seed: int, steps: int, eval_every: int, episodes: int, work: Path) -> dict:
    cmd = [python, __file__, "--d3rlpy-worker", agent, str(data_file), str(seed), str(steps), str(eval_every), str(work)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"d3rlpy run failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    info = json.loads(out.stdout.strip().splitlines()[-1])
    policies = {int(p.stem[4:]): p for p in work.glob("step*.pt")}
    return {"curve": score_d3rlpy_policies(policies, data_file, seed, episodes), "train_seconds": info["train_seconds"]}


# --------------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> None:
    import torch

    from orl.data import make_dataset
    from orl.provenance import dataset_checksum

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    libraries = [lib for lib in ("orl", "d3rlpy") if lib in args.libraries]
    if "d3rlpy" in libraries and not args.d3rlpy_python:
        sys.exit("--d3rlpy-python is needed for the d3rlpy half (make bench builds .venv-d3rlpy)")
    with tempfile.TemporaryDirectory(prefix="orl-compare-") as tmp:
        tmp = Path(tmp)
        for dataset in args.datasets:
            data_file = export_dataset(dataset, tmp)
            data_sha256 = dataset_checksum(make_dataset(str(data_file)))  # collected data differ between machines
            for agent in args.agents:
                for seed in args.seeds:
                    for library in libraries:
                        path = run_path(out, library, agent, dataset, seed)
                        if path.exists():
                            done = json.loads(path.read_text())
                            if (done["steps"], done["eval_episodes"]) != (args.steps, args.episodes):
                                sys.exit(f"{path} holds a run of {done['steps']} steps and {done['eval_episodes']} evaluation episodes, "
                                         f"not {args.steps} and {args.episodes}; give each budget its own --out folder")
                            continue
                        work = tmp / f"{library}-{agent}-{slug(dataset)}-{seed}"
                        if library == "orl":
                            result = run_orl(agent, data_file, seed, args.steps, args.eval_every, args.episodes, work)
                        else:
                            result = run_d3rlpy(args.d3rlpy_python, agent, data_file, seed, args.steps, args.eval_every, args.episodes, work)
                        record = {"library": library, "agent": agent, "dataset": dataset, "seed": seed, "steps": args.steps,
                                  "eval_episodes": args.episodes, "data_sha256": data_sha256, **result}
                        path.write_text(json.dumps(record, indent=1))
                        final = record["curve"].get(args.steps, float("nan"))
                        print(f"{library:6s} {agent:5s} {dataset} seed {seed}: {final:.1f} ({result['train_seconds']:.0f} s)", flush=True)


def load_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text())
        record["curve"] = {int(k): v for k, v in record["curve"].items()}
        runs.append(record)
    return runs


def verdict(mean_difference: float, orl_scores: list[float], d3rlpy_scores: list[float]) -> str:
    """"level" when the mean paired difference is within the seed spread (the larger of the two libraries'
    standard deviations over seeds, at least 1 point), else who is ahead."""
    spread = max(float(np.std(orl_scores)), float(np.std(d3rlpy_scores)), 1.0)
    if abs(mean_difference) <= spread:
        return "level"
    return "orl ahead" if mean_difference > 0 else "d3rlpy ahead"


def report(folder: Path, step: int | None = None) -> str:
    """Markdown table: final score per library (mean ± std over seeds, n) and orl - d3rlpy with its spread."""
    runs = load_runs(folder)
    keys = sorted({(r["dataset"], r["agent"]) for r in runs}, key=lambda k: (k[0], AGENTS.index(k[1]) if k[1] in AGENTS else 9))
    lines = ["| dataset | agent | orl | d3rlpy | orl - d3rlpy (paired by seed) | verdict |", "|---|---|---:|---:|---:|---|"]
    from orl.provenance import data_versions

    for dataset, versions in sorted(data_versions((r["dataset"], r.get("data_sha256"), r["library"]) for r in runs).items()):
        if len(versions) > 1:
            print(f"warning: the runs on {dataset} trained on {len(versions)} different datasets ({', '.join(v[:12] for v in sorted(versions))}); "
                  "their scores are not comparable", file=sys.stderr)
    for dataset, agent in keys:
        scores = {}
        for library in ("orl", "d3rlpy"):
            chosen = {r["seed"]: r["curve"][step or r["steps"]] for r in runs
                      if (r["dataset"], r["agent"], r["library"]) == (dataset, agent, library) and (step or r["steps"]) in r["curve"]}
            scores[library] = chosen
        cells = []
        for library in ("orl", "d3rlpy"):
            values = np.array(list(scores[library].values()))
            cells.append(f"{values.mean():.1f} ± {values.std():.1f} (n={len(values)})" if len(values) else "-")
        paired = sorted(set(scores["orl"]) & set(scores["d3rlpy"]))
        if paired:
            diff = np.array([scores["orl"][s] - scores["d3rlpy"][s] for s in paired])
            cells += [f"{diff.mean():+.1f} ± {diff.std():.1f}", verdict(diff.mean(), list(scores["orl"].values()), list(scores["d3rlpy"].values()))]
        else:
            cells += ["-", "-"]
        lines.append(f"| {dataset} | {agent} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--d3rlpy-worker":
        agent, data_file, seed, steps, eval_every, work = sys.argv[2:8]
        d3rlpy_worker(agent, Path(data_file), int(seed), int(steps), int(eval_every), Path(work))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and score both libraries (finished runs are skipped)")
    run.add_argument("--datasets", nargs="+", required=True)
    run.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS)
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--steps", type=int, default=30000)
    run.add_argument("--eval-every", type=int, default=10000)
    run.add_argument("--episodes", type=int, default=10)
    run.add_argument("--libraries", nargs="+", default=["orl", "d3rlpy"])
    run.add_argument("--d3rlpy-python", default=None)
    run.add_argument("--out", default=None, help="folder of the run JSONs (default results/compare_d3rlpy/steps<steps>)")
    rep = sub.add_parser("report", help="print the per-dataset table")
    rep.add_argument("--steps", type=int, default=30000, help="the training budget whose folder to read")
    rep.add_argument("--out", default=None, help="folder of the run JSONs (default results/compare_d3rlpy/steps<steps>)")
    rep.add_argument("--step", type=int, default=None, help="score at this step (default: each run's last)")
    args = parser.parse_args()
    if args.out is None:
        args.out = str(ROOT / "results" / "compare_d3rlpy" / f"steps{args.steps}")
    if args.command == "run":
        cmd_run(args)
    else:
        print(report(Path(args.out), args.step))


if __name__ == "__main__":
    main()
