"""Reward models on disk (one file per model, with its kind, the labels' provenance and training metrics),
and relabelling a dataset's rewards with one (P-IQL and friends: data.reward=learned:<dir>)."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from orl.checkpoint import load_checkpoint, save_checkpoint
from orl.data import OfflineDataset
from orl.errors import DataError
from orl.prefs.labels import PreferencePairs
from orl.prefs.reward_model import RewardEnsemble, RewardModelConfig
from orl.prefs.transformer import PreferenceTransformer, PreferenceTransformerConfig


def save_reward_model(path: str | Path, model: torch.nn.Module, pairs: PreferencePairs, metrics: dict[str, float]) -> None:
    """One file with the model's kind, weights and config, the labels' provenance and the training metrics
    (a RewardEnsemble or an orl.prefs.transformer.PreferenceTransformer)."""
    save_checkpoint({"kind": model.kind, "state": model.state_dict(), "config": asdict(model.cfg), "obs_dim": model.obs_dim, "action_dim": model.action_dim,
                     "source": pairs.source, "checksum": pairs.checksum, "labels": {"queries": len(pairs), "length": pairs.length,
                                                                                    "teacher": pairs.teacher},
                     "metrics": metrics}, Path(path))


def load_reward_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model, record) from a file written by save_reward_model, or a directory holding reward_model.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "reward_model.pt"
    if not path.is_file():
        raise DataError(f"no reward model at {path}; train one with `orl-prefs reward` (it writes <out>/reward_model.pt)")
    record = load_checkpoint(path, map_location="cpu")
    config = dict(record["config"])
    kind = record.get("kind", RewardEnsemble.kind)
    if kind == RewardEnsemble.kind:
        config["hidden"] = tuple(config["hidden"])
        model = RewardEnsemble(record["obs_dim"], record["action_dim"], RewardModelConfig(**config))
    elif kind == "preference_transformer":
        model = PreferenceTransformer(record["obs_dim"], record["action_dim"], PreferenceTransformerConfig(**config))
    else:
        raise DataError(f"{path} holds a reward model of kind {kind!r}, which this version of orl does not know")
    model.load_state_dict(record["state"])
    return model.eval(), record


def relabel(dataset: OfflineDataset, model: torch.nn.Module, normalize: str = "none") -> OfflineDataset:
    """A copy of `dataset` whose rewards are the learned ones (the ensemble mean, or the Preference
    Transformer's "last"-mode reward); `normalize`: none (Uni-RLHF's P-IQL uses the tanh output as it is) |
    minmax (to [0, 1]) | standard (zero mean, unit std)."""
    rewards = model.predict_dataset(dataset)
    if normalize == "minmax":
        rewards = (rewards - rewards.min()) / max(float(rewards.max() - rewards.min()), 1e-8)
    elif normalize == "standard":
        rewards = (rewards - rewards.mean()) / max(float(rewards.std()), 1e-8)
    elif normalize != "none":
        raise DataError(f"learned reward normalization must be none, minmax or standard, got {normalize!r}")
    return dataclasses.replace(dataset, rewards=rewards.astype(np.float32), source=dataset.source)
