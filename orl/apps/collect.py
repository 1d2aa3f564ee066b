"""D4RL-style datasets without the hub: train a SAC behaviour policy online, then write the levels
random / medium / medium-replay / expert / medium-expert as local Minari datasets.

The recipe follows D4RL's:
  * expert        = rollouts of the final SAC policy (stochastic actions);
  * medium        = rollouts of the first saved policy whose evaluation return reaches
                    `medium_fraction` of the way from the random to the expert score;
  * medium-replay = SAC's replay buffer up to the step where that medium policy was saved;
  * medium-expert = medium and expert episodes concatenated;
  * random        = uniform random actions.
Reference scores: ref_min = random policy, ref_max = expert policy, each the mean of
`ref_episodes` episodes. Every stage writes its result to the work directory, so an interrupted
collection resumes where it stopped and produces the same datasets as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from orl.agent import Agent, make_agent
from orl.checkpoint import seed_everything
from orl.data import env_slug
from orl.errors import ConfigError
from orl.io import atomic_path, atomic_write_json
from orl.evaluation import evaluate
from orl.trainer import Trainer, TrainerConfig

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
COMPLETE_MARKER = ".orl_complete"


@dataclass
class CollectConfig:
    env: str = "Pendulum-v1"
    levels: tuple[str, ...] = LEVELS
    size: int = 100_000  # transitions per rollout level (random, medium, expert)
    sac_steps: int = 100_000  # online SAC environment steps
    random_steps: int = 5000  # uniform-random exploration at the start of SAC
    snapshot_every: int = 2000  # evaluate and save the behaviour policy this often
    snapshot_episodes: int = 5
    medium_fraction: float = 1.0 / 3.0
    ref_episodes: int = 100
    seed: int = 0
    namespace: str = "orl"
    work_dir: str = "data/collect"
    overwrite: bool = False
    progress: bool = True
    sac: dict[str, Any] = field(default_factory=dict)  # overrides of agents/sac.py's SACConfig


def dataset_id(namespace: str, env_id: str, level: str) -> str:
    return f"{namespace}/{env_slug(env_id)}/{level}-v0"


def minari_dataset_dir(ds_id: str) -> Path:
    from minari.storage import get_dataset_path

    return Path(get_dataset_path(ds_id))


def dataset_complete(ds_id: str) -> bool:
    try:
        return (minari_dataset_dir(ds_id) / COMPLETE_MARKER).exists()
    except Exception:
        return False


class RandomPolicy:
    """Uniform random actions, with the `act` signature of an Agent."""

    def __init__(self, action_space, seed: int):
        self.action_space = action_space
        self.rng = np.random.default_rng(seed)

    def act(self, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
        batch = obs.shape[:-1]
        low, high = self.action_space.low, self.action_space.high
        return self.rng.uniform(low, high, size=(*batch, *low.shape)).astype(np.float32)


def _write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, indent=2)


def rollout(policy, env_id: str, n_transitions: int, seed: int, progress: bool = True, desc: str = "") -> list[dict[str, np.ndarray]]:
    """Collect exactly `n_transitions` with stochastic actions; the last episode is cut as a truncation."""
    from orl.envs import make_env

    env = make_env(env_id)
    torch.manual_seed(seed)
    episodes, obs_list, actions, rewards, terms, truncs = [], [], [], [], [], []
    obs, _ = env.reset(seed=seed)
    obs_list.append(obs)
    for t in tqdm(range(n_transitions), desc=desc, disable=not progress, leave=False):
        action = np.asarray(policy.act(obs, deterministic=False), dtype=np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        actions.append(action)
        rewards.append(reward)
        last = t == n_transitions - 1
        terms.append(terminated)
        truncs.append((truncated or last) and not terminated)
        obs_list.append(obs)
        if terminated or truncated or last:
            episodes.append(_episode(obs_list, actions, rewards, terms, truncs))
            obs_list, actions, rewards, terms, truncs = [], [], [], [], []
            if not last:
                obs, _ = env.reset()
                obs_list.append(obs)
    env.close()
    return episodes


def _episode(obs, actions, rewards, terms, truncs) -> dict[str, np.ndarray]:
    return {
        "observations": np.asarray(obs, np.float32),
        "actions": np.asarray(actions, np.float32),
        "rewards": np.asarray(rewards, np.float64),
        "terminations": np.asarray(terms, bool),
        "truncations": np.asarray(truncs, bool),
    }


def episodes_from_transitions(arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split flat replay transitions into episodes at terminals/timeouts; a trailing partial episode is truncated."""
    n = len(arrays["rewards"])
    ends = (arrays["terminals"] > 0) | (arrays["timeouts"] > 0)
    ends[-1] = True
    episodes, start = [], 0
    for end in np.flatnonzero(ends):
        sl = slice(start, end + 1)
        terms = arrays["terminals"][sl] > 0
        truncs = ~terms & ((arrays["timeouts"][sl] > 0) | (np.arange(start, end + 1) == n - 1))
        episodes.append({
            "observations": np.concatenate([arrays["obs"][sl], arrays["next_obs"][end : end + 1]]).astype(np.float32),
            "actions": arrays["actions"][sl].astype(np.float32),
            "rewards": arrays["rewards"][sl].astype(np.float64),
            "terminations": terms,
            "truncations": truncs,
        })
        start = end + 1
    return episodes


def write_minari(ds_id: str, episodes: list[dict[str, np.ndarray]], env_id: str, ref_min: float, ref_max: float, description: str) -> None:
    import warnings

    import minari
    from minari.data_collector import EpisodeBuffer

    path = minari_dataset_dir(ds_id)
    if path.exists():
        shutil.rmtree(path)  # an incomplete earlier attempt (no completion marker)
    buffers = [EpisodeBuffer(observations=ep["observations"], actions=ep["actions"], rewards=ep["rewards"],
                             terminations=ep["terminations"], truncations=ep["truncations"], infos={}) for ep in episodes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari nags about author/permalink fields
        minari.create_dataset_from_buffers(
            ds_id, buffer=buffers, env=env_id, algorithm_name="orl-sac", ref_min_score=float(ref_min),
            ref_max_score=float(ref_max), description=description, author="orl collection pipeline",
        )
    (path / COMPLETE_MARKER).write_text("ok\n")


def train_behaviour_policy(cfg: CollectConfig, work: Path, env_id: str) -> tuple[Agent, dict[str, float], dict[str, np.ndarray]]:
    """Online SAC with snapshots; returns the final agent, eval return per snapshot step, and the replay."""
    from orl.envs import make_env

    probe = make_env(env_id)
    agent = make_agent("sac", probe.observation_space, probe.action_space, cfg.sac)
    probe.close()
    snapshots = work / "policies"
    snapshots.mkdir(parents=True, exist_ok=True)
    evals_path = work / "snapshot_returns.json"
    replay_path = work / "replay.npz"
    done_path = work / "sac_done.json"
    if done_path.exists() and replay_path.exists():
        agent.load_state_dict(torch.load(snapshots / f"step{cfg.sac_steps:09d}.pt", weights_only=False), load_optimizers=False)
        with np.load(replay_path) as f:
            replay = {k: f[k] for k in f.files}
        return agent, {int(k): v for k, v in json.loads(evals_path.read_text()).items()}, replay

    evals: dict[int, float] = {int(k): v for k, v in json.loads(evals_path.read_text()).items()} if evals_path.exists() else {}

    def save_snapshot(trainer: Trainer, result) -> None:
        online_step = trainer.step - trainer.cfg.offline_steps
        torch.save(trainer.agent.state_dict(), snapshots / f"step{online_step:09d}.pt")
        evals[online_step] = result.mean_return
        _write_json(evals_path, {str(k): v for k, v in sorted(evals.items())})

    trainer_cfg = TrainerConfig(
        offline_steps=0, online_steps=cfg.sac_steps, batch_size=256, seed=cfg.seed, eval_every=cfg.snapshot_every,
        eval_episodes=cfg.snapshot_episodes, log_every=1000, checkpoint_every=max(cfg.snapshot_every, 5000),
        progress=cfg.progress, random_steps=cfg.random_steps, learning_starts=cfg.random_steps,
        online_capacity=cfg.sac_steps,
    )
    trainer = Trainer(agent, work / "sac", trainer_cfg, env_fn=lambda: make_env(env_id))
    trainer.eval_callbacks.append(save_snapshot)
    trainer.train(resume=True)
    size = len(trainer.online)
    replay = {k: v[:size].cpu().numpy() for k, v in trainer.online.storage.items()}
    with atomic_path(replay_path) as tmp:
        np.savez(tmp, **replay)
    _write_json(done_path, {"steps": cfg.sac_steps})
    return agent, evals, replay


# The settings that decide what is collected: a work directory made with other values is never mixed in.
RESULT_KEYS = ("env", "size", "sac_steps", "random_steps", "snapshot_every", "snapshot_episodes", "medium_fraction", "ref_episodes", "seed", "sac")


def check_same_settings(cfg: CollectConfig, work: Path) -> None:
    """Stop, naming what differs, when `work` holds a collection made with other settings."""
    path = work / "collect_config.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text())
    differ = [f"{key}={saved.get(key)!r} there, {getattr(cfg, key)!r} now" for key in RESULT_KEYS
              if json.loads(json.dumps(getattr(cfg, key))) != saved.get(key)]
    if differ:
        raise ConfigError(f"{work} holds a collection made with other settings ({'; '.join(differ)}). Pass overwrite=true to "
                          "collect anew (the existing datasets are replaced only once the new collection has succeeded), or use "
                          "another work_dir or seed. Nothing was changed.")


def collect(cfg: CollectConfig) -> dict[str, str]:
    """Run the whole pipeline; returns {level: minari dataset id}. Levels already written are skipped."""
    from orl.envs import make_env
    from orl.envs.control import ALIASES

    env_id = ALIASES.get(cfg.env, cfg.env)
    unknown = sorted(set(cfg.levels) - set(LEVELS))
    if unknown:
        raise ConfigError(f"unknown level(s) {unknown}; choose from {list(LEVELS)}")
    if cfg.overwrite:
        return collect_aside_then_swap(cfg, env_id)
    ids = {level: dataset_id(cfg.namespace, env_id, level) for level in cfg.levels}
    work = Path(cfg.work_dir) / env_slug(env_id) / f"seed{cfg.seed}"
    check_same_settings(cfg, work)
    if all(dataset_complete(ds_id) for ds_id in ids.values()):
        return ids
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / "collect_config.json", {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()})
    seed_everything(cfg.seed)

    expert, evals, replay = train_behaviour_policy(cfg, work, env_id)
    env = make_env(env_id)
    refs_path = work / "reference_scores.json"
    if refs_path.exists():
        refs = json.loads(refs_path.read_text())
    else:
        torch.manual_seed(cfg.seed + 1)
        random_result = evaluate(RandomPolicy(env.action_space, cfg.seed + 1), lambda: make_env(env_id), cfg.ref_episodes, seed=cfg.seed + 10_000)
        torch.manual_seed(cfg.seed + 2)
        expert_result = evaluate(expert, lambda: make_env(env_id), cfg.ref_episodes, seed=cfg.seed + 20_000, deterministic=False)
        refs = {"ref_min_score": random_result.mean_return, "ref_max_score": expert_result.mean_return}
        _write_json(refs_path, refs)
    ref_min, ref_max = refs["ref_min_score"], refs["ref_max_score"]

    threshold = ref_min + cfg.medium_fraction * (ref_max - ref_min)
    reached = [step for step, ret in sorted(evals.items()) if ret >= threshold]
    medium_step = reached[0] if reached else max(evals)
    medium = make_agent("sac", env.observation_space, env.action_space, cfg.sac)
    medium.load_state_dict(torch.load(work / "policies" / f"step{medium_step:09d}.pt", weights_only=False), load_optimizers=False)
    behaviour = work / "behaviour"
    behaviour.mkdir(exist_ok=True)
    torch.save(medium.state_dict(), behaviour / "medium.pt")
    torch.save(expert.state_dict(), behaviour / "expert.pt")
    _write_json(work / "levels.json", {"medium_step": medium_step, "medium_threshold": threshold, **refs})

    cache: dict[str, list] = {}

    def episodes_for(level: str) -> list[dict[str, np.ndarray]]:
        if level not in cache:
            if level == "random":
                cache[level] = rollout(RandomPolicy(env.action_space, cfg.seed + 3), env_id, cfg.size, cfg.seed + 30_000, cfg.progress, "random")
            elif level == "medium":
                cache[level] = rollout(medium, env_id, cfg.size, cfg.seed + 40_000, cfg.progress, "medium")
            elif level == "expert":
                cache[level] = rollout(expert, env_id, cfg.size, cfg.seed + 50_000, cfg.progress, "expert")
            elif level == "medium-replay":
                cache[level] = episodes_from_transitions({k: v[:medium_step] for k, v in replay.items()})
            elif level == "medium-expert":
                cache[level] = episodes_for("medium") + episodes_for("expert")
        return cache[level]

    for level, ds_id in ids.items():
        if dataset_complete(ds_id):
            continue
        description = (f"orl collection pipeline, {env_id}, level {level}: SAC behaviour policy ({cfg.sac_steps} steps, seed {cfg.seed}); "
                       f"medium policy saved at step {medium_step}")
        write_minari(ds_id, episodes_for(level), env_id, ref_min, ref_max, description)
        print(f"[orl-collect] wrote {ds_id} ({sum(len(e['rewards']) for e in episodes_for(level))} transitions)")
    env.close()
    record_datasets(work, ids)
    return ids


def record_datasets(work: Path, ids: dict[str, str]) -> None:
    """work/datasets.json: each level's id, size and sha256 as orl loads it, with the software that collected it.
    Two machines do not collect identical data; this file is how a later run tells whether it has the same."""
    from orl.data import make_dataset
    from orl.provenance import dataset_checksum, software

    levels = {}
    for level, ds_id in ids.items():
        dataset = make_dataset(ds_id)
        levels[level] = {"id": ds_id, "sha256": dataset_checksum(dataset), "transitions": len(dataset)}
    _write_json(work / "datasets.json", {"levels": levels, **software()})


def collect_aside_then_swap(cfg: CollectConfig, env_id: str) -> dict[str, str]:
    """overwrite=true: collect from a clean work directory into a Minari root beside the real one, and move the new
    datasets (and work directory) into place only once every level has been written. A failure or an interrupt
    leaves the existing datasets as they were; the next overwrite starts clean again."""
    import dataclasses

    real_root = minari_dataset_dir("")
    aside_root = real_root.parent / f".{real_root.name}.orl-overwrite"  # a sibling: moving from it is a rename
    aside_work_dir = Path(cfg.work_dir) / ".orl-overwrite"
    for stale in (aside_root, aside_work_dir):
        shutil.rmtree(stale, ignore_errors=True)
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(aside_root)
    try:
        ids = collect(dataclasses.replace(cfg, overwrite=False, work_dir=str(aside_work_dir)))
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    moves = [(aside_root / ds_id, real_root / ds_id) for ds_id in ids.values()]
    work = Path(cfg.work_dir) / env_slug(env_id) / f"seed{cfg.seed}"
    moves.append((aside_work_dir / env_slug(env_id) / f"seed{cfg.seed}", work))
    for new, old in moves:
        old.parent.mkdir(parents=True, exist_ok=True)
        backup = old.with_name(old.name + ".orl-old")
        shutil.rmtree(backup, ignore_errors=True)
        if old.exists():
            os.replace(old, backup)
        os.replace(new, old)
        shutil.rmtree(backup, ignore_errors=True)
    for path in aside_root.rglob("*"):  # Minari's namespace metadata, where the real root has none yet
        target = real_root / path.relative_to(aside_root)
        if path.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    shutil.rmtree(aside_root, ignore_errors=True)
    shutil.rmtree(aside_work_dir, ignore_errors=True)
    return ids


def ensure_embedded_dataset(embedded: Any) -> None:
    """Collect the README's default dataset the first time it is needed."""
    if dataset_complete(str(embedded.dataset_id)):
        return
    print(f"[orl] embedded dataset {embedded.dataset_id} not found locally: collecting it with orl's SAC (first run only)")
    env_id = str(embedded.env)
    level = str(embedded.dataset_id).rsplit("/", 1)[-1].rsplit("-v", 1)[0]
    namespace = str(embedded.dataset_id).split("/")[0]
    # Only the level asked for: the behaviour policy and reference scores are the same, the other levels' rollouts
    # (most of the collection time) are skipped; `orl-collect` writes them when wanted.
    cfg = CollectConfig(env=env_id, levels=(level,), size=int(embedded.level_size), sac_steps=int(embedded.sac_steps),
                        random_steps=int(embedded.get("random_steps", 1000)), snapshot_every=int(embedded.get("snapshot_every", 500)),
                        seed=int(embedded.seed), namespace=namespace, work_dir=str(embedded.get("work_dir", "data/collect")))
    ids = collect(cfg)
    if str(embedded.dataset_id) not in ids.values():
        raise ValueError(f"embedded.dataset_id {embedded.dataset_id} is not one of the collected ids {sorted(ids.values())} (level {level!r})")
