"""Command-line entry points (hydra). `orl-train --help` lists the config groups and options."""
from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import hydra
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from orl.agent import agent_class, make_agent
from orl.checkpoint import load_checkpoint, seed_everything
from orl.distributed import local_rank
from orl.data import DataConfig, DatasetError, RewardTransform, check_env_compatible, make_dataset, prepare, reward_transform
from orl.errors import CheckpointError, ConfigError, DataError, DataFileNotFound, OrlError
from orl.apps.runs import finished_run, resolve_run_dir, trainer_config, write_run_config
from orl.provenance import dataset_checksum, file_checksum, write_provenance
from orl.trainer import OFFLINE_CHECKPOINT, Trainer


# `${offline_only:${online.steps}}` in agent configs: true for offline-only runs (e.g. IQL's lr decay).
OmegaConf.register_new_resolver("offline_only", lambda online_steps: int(online_steps) == 0, replace=True)
# A sweep run's directory is named by its overrides; dataset ids and paths hold '/', which would nest it.
# Only characters every OS allows in a file name (no ":" for Windows, which data.reward=learned:<dir> holds).


def path_safe(name: str, limit: int = 200, value_limit: int = 48) -> str:
    """A directory name for a run's overrides: portable characters, at most `limit` characters (file systems allow
    255 bytes). When the name is longer, each long value (a data path, lm.task={...}) keeps its start and gets a
    hash of the whole value, so every key stays readable (agent=, seed=) and the same overrides always give the
    same directory (a re-run sweep still finds its runs); a name still too long ends in a hash of itself."""
    import hashlib

    def digest(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    safe = re.sub(r"[^A-Za-z0-9_.,=+-]+", "-", str(name)).strip("-") or "run"
    if len(safe) <= limit:
        return safe
    items = re.split(r",(?=[A-Za-z0-9_.+-]+=)", safe)  # key=value items; commas inside a value are not followed by key=
    for i, item in enumerate(items):
        key, sep, value = item.partition("=")
        if sep and len(value) > value_limit:
            items[i] = f"{key}={value[: value_limit - 10].rstrip('-,')}--{digest(value)}"
    short = ",".join(items)
    return short if len(short) <= limit else f"{short[: limit - 10].rstrip('-,')}--{digest(short)}"


OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)


# Numeric options checked before any data loads: key -> (smallest allowed value, what it means).
NUMERIC_OPTIONS = {
    "steps": (0, "offline gradient steps"), "batch_size": (1, "transitions per batch"), "seed": (0, "random seed"),
    "eval.every": (0, "steps between evaluations (0: none)"), "eval.episodes": (0, "episodes per evaluation"),
    "log.every": (1, "steps between log rows"), "checkpoint.every": (1, "steps between checkpoints"),
    "online.steps": (0, "environment steps online"), "online.utd": (1, "updates per environment step"),
    "online.warmup_steps": (0, "online steps without updates"), "online.online_capacity": (1, "replay capacity"),
}


def validate_config(cfg: DictConfig) -> None:
    """Reject impossible values up front, naming the key and its allowed range (ConfigError)."""
    for key, (low, meaning) in NUMERIC_OPTIONS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{key}={value!r} is not valid: it is the number of {meaning} and must be an integer >= {low}")
    device = str(cfg.get("device", "auto"))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device={device!r} is not valid: use auto, cpu, cuda, cuda:<index> or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but this machine has no CUDA device torch can use; use device=cpu (or auto)")


def setup_torch(device: str, threads: int | None) -> torch.device:
    """Resolve `auto` to CUDA when present; on CPU default to one thread.

    Two torch threads on a small shared machine can run ~40x slower than one when the other core is
    busy, and these networks are too small to gain from intra-op parallelism anyway.
    """
    resolved = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if resolved.type == "cuda" and resolved.index is None and local_rank() is not None:  # accelerate launch / torchrun
        resolved = torch.device("cuda", local_rank())
    if threads is not None:
        torch.set_num_threads(int(threads))
    elif resolved.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    return resolved


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Train one agent on one dataset as `cfg` describes; returns the final evaluation summary."""
    from orl.envs import make_env

    validate_config(cfg)
    done = finished_run(Path(cfg.run_dir), int(cfg.steps), int(cfg.online.steps)) if cfg.resume and cfg.run_dir else None
    if done is not None:  # re-running a sweep skips it before loading any data
        print(f"[orl] {cfg.run_dir} already finished; nothing to do")
        return {"run_dir": str(cfg.run_dir), ("normalized_mean" if done.normalized else "return_mean"): done.final}
    device = setup_torch(cfg.device, cfg.threads)
    seed_everything(int(cfg.seed))
    from orl.text.data import is_text_dataset

    from orl.envs.reasoning_gym import is_task

    from orl.envs.text_games import is_text_env

    from orl.text.conversation import is_conversation_file

    # a multi-turn text environment without logged conversations to learn from: online RL of a language model in it
    if cfg.env and is_text_env(str(cfg.env)) and not is_conversation_file(str(cfg.dataset)):
        from orl.apps.lm_run import run_conversations

        return run_conversations(cfg, device)
    # .jsonl, a Hugging Face datasets directory or a procedural task: the LM side's own wiring
    if is_text_dataset(str(cfg.dataset)) or is_task(str(cfg.dataset)):
        from orl.apps.lm_run import run_text

        return run_text(cfg, device)
    if agent_class(str(cfg.agent.name)).data_kind not in (None, "segments"):
        raise ConfigError(f"agent {cfg.agent.name} trains language models on text data; give a .jsonl file or a Hugging Face "
                          f"datasets directory as dataset= (got {cfg.dataset}), or a control agent for this dataset")
    dataset = load_or_collect(cfg)
    # what the run trained on, before any relabelling: the data a README number can be reproduced from
    data_record = {"id": str(cfg.dataset), "sha256": dataset_checksum(dataset), "transitions": len(dataset), "source": dataset.source}
    learned = None
    if str(cfg.data.reward).startswith("learned:"):
        dataset, learned = relabel_with_reward_model(dataset, cfg, data_record["sha256"])
    if len(dataset) < int(cfg.batch_size):
        raise DatasetError(f"{cfg.dataset}: {len(dataset)} transitions, fewer than one batch (batch_size={cfg.batch_size}); "
                           "lower batch_size or give more data")
    seed_everything(int(cfg.seed))  # collecting the embedded dataset on first use consumed RNG: later runs must match
    if dataset.env_id is None:
        raise DatasetError(f"dataset {cfg.dataset} does not say which environment it comes from; pass env=<gymnasium id>")
    env_id = dataset.env_id
    try:
        probe_env = make_env(env_id)
    except ValueError as exc:  # gymnasium does not know the id: one message naming the data and the fix, no traceback
        where = f"env={cfg.env}" if cfg.env else f"the env_id of dataset {cfg.dataset}"
        raise DatasetError(f"{where} is {env_id!r}, an environment gymnasium cannot create ({str(exc).split(': ', 1)[-1]}); "
                           "pass env=<gymnasium id> (e.g. env=Hopper-v5), with the package that registers it installed") from exc
    check_env_compatible(dataset, probe_env)
    agent_cfg = OmegaConf.to_container(cfg.agent, resolve=True)
    agent_name = agent_cfg.pop("name")
    run_dir = resolve_run_dir(cfg, agent_name)
    offline_steps = int(cfg.steps)
    initial_state = None
    if cfg.get("init_from"):
        path = Path(cfg.init_from)
        if path.is_dir():  # a run directory: its offline-phase checkpoint, else its latest one
            path = path / OFFLINE_CHECKPOINT if (path / OFFLINE_CHECKPOINT).exists() else path / "checkpoint.pt"
        if not path.exists():
            raise DataFileNotFound(f"init_from={cfg.init_from}: no checkpoint at {path}; pass a run directory or a .pt file")
        initial_state = load_checkpoint(path)
        offline_steps = int(initial_state["step"])  # the online phase continues the step count (WSRL bookkeeping)
    resuming = bool(cfg.resume) and (run_dir / "checkpoint.pt").exists()
    # One reward transform per run: a resumed run keeps its own, an init_from run the one it was
    # pre-trained with, so offline rows, online rows and MC returns stay on one scale.
    data_cfg = DataConfig(**OmegaConf.to_container(cfg.data))
    transform_source = run_dir / "checkpoint.pt" if resuming else (cfg.init_from if initial_state is not None else None)
    saved_state = load_checkpoint(run_dir / "checkpoint.pt", map_location="cpu") if resuming else initial_state
    transform = None
    if saved_state is not None and "reward_transform" in saved_state:
        transform = RewardTransform.from_state(saved_state["reward_transform"])
        configured = reward_transform(dataset, data_cfg)
        if not transform.same_as(configured):
            print(f"[orl] note: using the reward transform of {transform_source} ({transform.state_dict()}), "
                  f"not the one data.reward* gives here ({configured.state_dict()})")
    del saved_state
    prepared = prepare(dataset, data_cfg, transform)
    agent = make_agent(agent_name, probe_env.observation_space, probe_env.action_space, agent_cfg, device, cfg.precision)
    probe_env.close()
    agent.set_obs_normalizer(prepared.obs_mean, prepared.obs_std)
    buffer = agent.make_offline_buffer(prepared.dataset, raw_dataset=dataset, batch_size=int(cfg.batch_size),
                                       online_steps=int(cfg.online.steps))
    run_dir.mkdir(parents=True, exist_ok=True)
    ref = (dataset.ref_min_score, dataset.ref_max_score) if dataset.ref_min_score is not None and dataset.ref_max_score is not None else None
    print(f"[orl] {agent_name} on {cfg.dataset} ({len(dataset)} transitions, env {env_id}, device {device}, {cfg.precision}) -> {run_dir}")
    trainer = Trainer(agent, run_dir, trainer_config(cfg, offline_steps), buffer, lambda: make_env(env_id), ref,
                      reward_transform=prepared.reward_transform)
    # provenance first: it refuses a resume on other data before config.yaml is rewritten
    trainer.start_callbacks.append(lambda trainer_: write_provenance(run_dir, data_record, str(device), trainer_.step))
    trainer.start_callbacks.append(lambda _: write_run_config(run_dir, cfg))
    if learned is not None:  # the run records which reward model labelled its data
        trainer.start_callbacks.append(lambda _: (run_dir / "learned_reward.json").write_text(json.dumps(learned, indent=1)))
    if initial_state is not None and not resuming:
        try:
            agent.load_state_dict(initial_state["agent"])  # networks, targets, temperature, optimizer moments, step
        except (RuntimeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {cfg.init_from} does not fit agent {agent_name} as configured "
                             f"(ensemble size, LayerNorm and hidden sizes must match pre-training): {exc}") from exc
        trainer.step = offline_steps
        print(f"[orl] starting from {cfg.init_from} at step {offline_steps}")
    result = trainer.train(resume=bool(cfg.resume))
    summary: dict[str, Any] = {"run_dir": str(run_dir)}
    if result is not None:
        summary.update(result.metrics(prefix=""))
        score = f"normalized score {result.mean_normalized:.1f} ± {result.normalized.std():.1f}" if result.normalized is not None else "(no reference scores)"
        print(f"[orl] final evaluation over {len(result.returns)} episodes: return {result.mean_return:.1f}, {score}")
    print(f"[orl] metrics: {run_dir / 'metrics.jsonl'}   tensorboard: tensorboard --logdir {run_dir / 'tb'}")
    return summary


def relabel_with_reward_model(dataset, cfg: DictConfig, data_sha256: str):
    """data.reward=learned:<reward model>: every reward replaced by the ensemble-mean learned reward (P-IQL and
    friends); returns the relabelled dataset and a record of the model (path, sha256, labels, metrics)."""
    from orl.prefs.store import load_reward_model, relabel

    if int(cfg.online.steps) > 0:
        raise ConfigError("data.reward=learned:... relabels offline data only; an online phase would mix learned and environment "
                          "rewards. Run it offline (online.steps=0)")
    path = Path(str(cfg.data.reward).split(":", 1)[1])
    model, record = load_reward_model(path)
    if (model.obs_dim, model.action_dim) != (dataset.obs_dim, dataset.action_dim):
        raise DataError(f"reward model {path} takes observations of size {model.obs_dim} and actions of size {model.action_dim}, "
                        f"but {cfg.dataset} has {dataset.obs_dim} and {dataset.action_dim}")
    file = path / "reward_model.pt" if path.is_dir() else path
    learned = {"reward_model": str(file), "sha256": file_checksum(file), "normalize": str(cfg.data.learned_reward_norm),
               "labels_source": record["source"], "labels": record["labels"], "metrics": record["metrics"],
               "same_data_as_labels": record["checksum"] == data_sha256}
    print(f"[orl] rewards relabelled by {file} (held-out accuracy {record['metrics'].get('held_out_accuracy', float('nan')):.3f})")
    return relabel(dataset, model, str(cfg.data.learned_reward_norm)), learned


def load_or_collect(cfg: DictConfig):
    """Load `cfg.dataset`; the embedded default is collected locally on first use."""
    collect_cfg = cfg.get("embedded")
    if collect_cfg is not None and str(cfg.dataset) == str(collect_cfg.dataset_id):
        from orl.apps.collect import ensure_embedded_dataset

        ensure_embedded_dataset(collect_cfg)
    return make_dataset(str(cfg.dataset), cfg.env, cfg.ref_min_score, cfg.ref_max_score)


def _config_dir() -> str:
    """The hydra configs: package data (orl/configs) in a wheel, the repository's configs/ in a checkout."""
    import orl.configs

    return str(Path(orl.configs.__file__).resolve().parent)


CONFIG_DIR = _config_dir()
CONFIG_GROUPS = ("agent", "preset", "experiment", "hydra")


@contextlib.contextmanager
def user_errors(app: str) -> Iterator[None]:
    """Print the project's own errors as one message and exit 2; ORL_DEBUG=1 keeps the traceback."""
    try:
        yield
    except OrlError as exc:
        if os.environ.get("ORL_DEBUG"):
            raise
        print(f"{app}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def check_top_level_keys(app: str, config_names: Sequence[str], argv: Sequence[str]) -> None:
    """Reject a mistyped top-level key (agnet=iql) with a did-you-mean before hydra turns it into '+agnet'."""
    # Deep merge, as hydra composes them: finetune.yaml's `online: {steps}` must not hide train.yaml's other online.* keys.
    tree: dict[str, Any] = OmegaConf.to_container(
        OmegaConf.merge(*(OmegaConf.load(Path(CONFIG_DIR) / f"{name}.yaml") for name in config_names)))
    tree.pop("defaults", None)
    known = set(CONFIG_GROUPS) | set(tree)
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        parts = arg.split("=", 1)[0].split("@", 1)[0].split("/", 1)[0].split(".")  # hydra/launcher=joblib: group 'hydra'
        node, options, bad = tree, known, None
        for depth, part in enumerate(parts):
            if part not in options:
                bad = ".".join(parts[: depth + 1])
                break
            node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or parts[0] in CONFIG_GROUPS:
                break  # a leaf, or a config group (agent.*) whose keys the agent's own config checks
            options = set(node)
        if bad is not None:
            close = difflib.get_close_matches(parts[len(bad.split(".")) - 1], sorted(options), n=1)
            hint = f"; did you mean '{'.'.join(bad.split('.')[:-1] + [close[0]])}'?" if close else ""
            print(f"{app}: error: unknown option '{bad}' (in {arg!r}){hint} `{app} --help` lists every option; "
                  f"a new key needs a leading '+'", file=sys.stderr)
            sys.exit(2)


def in_sweep(cfg: DictConfig) -> DictConfig:
    """In a hydra multirun, each run lives in the directory hydra made for its overrides and resumes there:
    re-running a sweep skips finished runs and continues interrupted ones."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN or cfg.run_dir:
        return cfg
    with open_dict(cfg):
        cfg.run_dir = HydraConfig.get().runtime.output_dir
        cfg.resume = True
    return cfg


def sweep_objective(summary: dict[str, Any]) -> float | None:
    """What a run returns to hydra (an Optuna sweeper maximizes it): the final normalized score, else the mean
    return (None for a run without evaluation)."""
    for key in ("normalized_mean", "return_mean"):
        if key in summary:
            return float(summary[key])
    return None


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> float | None:
    with user_errors("orl-train"):
        return sweep_objective(run_train(in_sweep(cfg)))


def train_main() -> None:
    check_top_level_keys("orl-train", ["train"], sys.argv[1:])
    _train()


@hydra.main(config_path=CONFIG_DIR, config_name="collect", version_base="1.3")
def _collect(cfg: DictConfig) -> None:
    from orl.apps.collect import CollectConfig, collect

    with user_errors("orl-collect"):
        setup_torch("cpu", cfg.threads)
        from orl.envs.text_games import is_text_env

        if is_text_env(str(cfg.env)):  # a language model's conversations in a multi-turn text environment
            from orl.apps.lm_run import log_conversations

            log_conversations(cfg)
            return
        values = OmegaConf.to_container(cfg, resolve=True)
        values.pop("conversations", None)
        values.pop("threads")
        values["levels"] = tuple(values["levels"])
        ids = collect(CollectConfig(**values))
        print("[orl-collect] datasets:", ", ".join(ids.values()))


def collect_main() -> None:
    check_top_level_keys("orl-collect", ["collect"], sys.argv[1:])
    _collect()


@hydra.main(config_path=CONFIG_DIR, config_name="finetune", version_base="1.3")
def _finetune(cfg: DictConfig) -> float | None:
    with user_errors("orl-finetune"):
        return sweep_objective(run_train(in_sweep(cfg)))


def finetune_main() -> None:
    check_top_level_keys("orl-finetune", ["train", "finetune"], sys.argv[1:])
    _finetune()


if __name__ == "__main__":
    train_main()
