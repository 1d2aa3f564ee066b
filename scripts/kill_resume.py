"""kill -9 at random moments, resume, and compare with an uninterrupted run (README "Reliability").

    python scripts/kill_resume.py --kills 6 --out results/kill_resume.json

Three jobs, each first run once uninterrupted as the reference: `orl-train` offline (TD3+BC), `orl-train`
online (SAC from scratch) and `orl-collect` (a tiny two-level collection). Then, per trial, the same command
is started in a fresh directory, killed with SIGKILL at a uniformly random moment of its reference
duration (checkpoints every 50 steps, so many kills land in or near a checkpoint write), restarted with
`resume=true` (killed again at random while `--kills-per-trial` allows) and run to the end. A trial
passes when its `metrics.jsonl` (training) or its datasets (collection) are bit-identical to the
reference's and every checkpoint loads.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["env=Pendulum-v1", "ref_min_score=-1500", "ref_max_score=0", "eval.every=100", "eval.episodes=1", "log.every=25",
         "checkpoint.every=50", "log.progress=false", "log.tensorboard=false"]
JOBS = {
    "offline": ["train", "agent=td3bc", "steps=400", *TRAIN],
    "online": ["train", "agent=sac", "steps=0", "online.steps=400", "online.random_steps=100", "online.learning_starts=100",
               "online.buffer_mode=none", *TRAIN],
    "collect": ["collect", "env=Pendulum-v1", "levels=[random,medium]", "size=200", "sac_steps=600", "random_steps=200",
                "snapshot_every=200", "snapshot_episodes=1", "ref_episodes=2", "progress=false"],
}


def command(job: str, where: Path, data: Path, resume: bool) -> tuple[list[str], dict[str, str]]:
    app, *args = JOBS[job]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if app == "train":
        args += [f"dataset={data}", f"run_dir={where}"] + (["resume=true"] if resume else [])
    else:
        args += [f"work_dir={where / 'work'}"]
        env["MINARI_DATASETS_PATH"] = str(where / "minari")
    return [sys.executable, "-c", f"import orl.apps.cli; orl.apps.cli.{app}_main()", *args], env


def run(cmd: list[str], env: dict[str, str], kill_after: float | None) -> bool:
    """Run to the end (True) or SIGKILL it after `kill_after` seconds (False if it was killed)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return False
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed:\n{err.decode()[-2000:]}")
    return True


def outcome(job: str, where: Path) -> object:
    if job != "collect":
        return (where / "metrics.jsonl").read_text()
    import minari

    os.environ["MINARI_DATASETS_PATH"] = str(where / "minari")
    out = {}
    for ds_id in sorted(minari.list_local_datasets()):
        ds = minari.load_dataset(ds_id)
        out[ds_id] = [np.concatenate([np.asarray(getattr(e, k)).ravel() for e in ds.iterate_episodes()]).tobytes()
                      for k in ("observations", "actions", "rewards")]
    return out


def checkpoints_load(where: Path) -> bool:
    import torch

    for path in where.rglob("*.pt"):
        torch.load(path, map_location="cpu", weights_only=False)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=6, help="trials per job")
    parser.add_argument("--kills-per-trial", type=int, default=2, help="at most this many kills before a trial runs to the end")
    parser.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/kill_resume.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from orl.apps.collect import RandomPolicy, rollout
        from orl.data import OfflineDataset

        import gymnasium as gym

        episodes = rollout(RandomPolicy(gym.make("Pendulum-v1").action_space, 0), "Pendulum-v1", 1000, seed=0, progress=False)
        cat = lambda key, sl=slice(None): np.concatenate([e[key][sl] for e in episodes])  # noqa: E731
        data = tmp / "data.npz"
        OfflineDataset(cat("observations", slice(None, -1)), cat("actions"), cat("rewards"), cat("observations", slice(1, None)),
                       cat("terminations").astype(np.float32), cat("truncations").astype(np.float32)).save(data)
        for job in args.jobs:
            reference_dir = tmp / f"{job}-reference"
            start = time.time()
            run(*command(job, reference_dir, data, resume=False), kill_after=None)
            duration = time.time() - start
            reference = outcome(job, reference_dir)
            trials = []
            for trial in range(args.kills):
                where = tmp / f"{job}-{trial}"
                kills, done, resume = [], False, False
                while not done:
                    kill_after = rng.uniform(0.3, duration) if len(kills) < args.kills_per_trial else None
                    done = run(*command(job, where, data, resume), kill_after=kill_after)
                    if not done:
                        kills.append(round(kill_after, 2))
                    resume = job != "collect"  # orl-collect resumes from its work directory by itself
                identical = outcome(job, where) == reference and checkpoints_load(where)
                trials.append({"kills_at_s": kills, "identical": identical})
                print(f"{job} trial {trial}: killed at {kills} s -> {'identical' if identical else 'DIFFERENT'}", flush=True)
            results[job] = {"reference_seconds": round(duration, 1), "trials": trials,
                            "kills": sum(len(t["kills_at_s"]) for t in trials), "identical": sum(t["identical"] for t in trials)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    for job, r in results.items():
        print(f"{job}: {r['kills']} kills in {len(r['trials'])} trials, {r['identical']}/{len(r['trials'])} bit-identical to the uninterrupted run")


if __name__ == "__main__":
    main()
