"""Run directories and the trainer settings of a run config, shared by the control (orl.apps.cli) and text
(orl.apps.lm_run) paths of orl-train."""
from __future__ import annotations

import re
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from orl.errors import RunDirError
from orl.io import atomic_write_text
from orl.trainer import TrainerConfig


def _slug(spec: str) -> str:
    path = Path(spec)
    name = path.stem if path.suffix in (".npz", ".hdf5", ".h5", ".jsonl") else spec
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def resolve_run_dir(cfg: DictConfig, agent_name: str) -> Path:
    """runs/<dataset>/<agent>/seed<k>-<time>; with resume=true, the newest matching run that has a checkpoint.

    Never reuses a directory that holds a run unless resume=true: an explicit `run_dir` with a run in
    it is an error, and two new runs started in the same second get distinct directories.
    """
    if cfg.run_dir:
        run_dir = Path(cfg.run_dir)
        if not cfg.resume and any((run_dir / name).exists() for name in ("checkpoint.pt", "metrics.jsonl")):
            raise RunDirError(f"run_dir={run_dir} already holds a run; pass resume=true to continue it, or choose a new run_dir "
                              "(nothing was changed in it)")
        return run_dir
    parent = Path(cfg.runs_root) / _slug(str(cfg.dataset)) / agent_name
    if cfg.resume:
        candidates = sorted(parent.glob(f"seed{cfg.seed}-*/checkpoint.pt"), key=lambda p: p.stat().st_mtime)
        if candidates:
            return candidates[-1].parent
    base = parent / f"seed{cfg.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir, suffix = base, 1
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=False)  # atomic claim: a concurrent run gets the next name
            return run_dir
        except FileExistsError:
            run_dir = base.with_name(f"{base.name}-{suffix}")
            suffix += 1


def finished_run(run_dir: Path, steps: int, online_steps: int):
    """The run in `run_dir` (an orl.report.Run) if it logged the last step of a run of `steps` + `online_steps`
    (read from its metrics.jsonl, so it also holds for committed results without checkpoints), else None. An
    unfinished run without a checkpoint (killed before its first one) starts again from step 0."""
    from orl.report import load_run

    if not (run_dir / "metrics.jsonl").exists():
        return None
    try:
        run = load_run(run_dir)
    except ValueError:
        return None
    return run if run.reached(steps, online_steps) else None


def write_run_config(run_dir: Path, cfg: DictConfig) -> None:
    """config.yaml of the run, written atomically once training starts (a failed resume keeps the old one)."""
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))


def trainer_config(cfg: DictConfig, offline_steps: int) -> TrainerConfig:
    return TrainerConfig(
        offline_steps=offline_steps,
        online_steps=int(cfg.online.steps),
        batch_size=int(cfg.batch_size),
        seed=int(cfg.seed),
        eval_every=int(cfg.eval.every),
        eval_episodes=int(cfg.eval.episodes),
        eval_seed_offset=int(cfg.eval.seed_offset),
        log_every=int(cfg.log.every),
        checkpoint_every=int(cfg.checkpoint.every),
        progress=bool(cfg.log.progress),
        tensorboard=bool(cfg.log.tensorboard),
        **{k: v for k, v in OmegaConf.to_container(cfg.online).items() if k != "steps"},
    )
