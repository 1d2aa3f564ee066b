"""Bradley–Terry reward models over (s, a): an ensemble of MLPs trained on labelled segment pairs, and the
helpers every reward model shares (input standardization, correlation with the true reward)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from orl.data import OfflineDataset, observation_statistics
from orl.prefs.labels import PreferencePairs
from orl.prefs.losses import pair_accuracy, preference_loss


@dataclass
class RewardModelConfig:
    """Defaults follow Uni-RLHF's MLP reward model (Clean-Offline-RLHF rlhf/train_reward_model.py): an
    ensemble of 3 MLPs with a tanh output, Adam 3e-4; training stops early once the ensemble's accuracy on
    the training queries reaches `stop_accuracy`."""

    ensemble_size: int = 3
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    batch_size: int = 64           # queries per step
    max_epochs: int = 300
    stop_accuracy: float = 0.97    # ensemble-mean accuracy on the non-tie training queries
    held_out: float = 0.1          # share of the queries kept out of training, for the held-out accuracy
    tanh_output: bool = True       # r in (-1, 1)
    seed: int = 0


class RewardEnsemble(torch.nn.Module):
    """r_k(s, a) for k members, one batched network (orl.nn.Critic); observations are standardized with the
    statistics of the data it was trained on (kept in the module, so it relabels raw data)."""

    kind = "mlp_ensemble"

    def __init__(self, obs_dim: int, action_dim: int, cfg: RewardModelConfig):
        super().__init__()
        from orl.nn import Critic

        self.cfg, self.obs_dim, self.action_dim = cfg, obs_dim, action_dim
        self.net = Critic(obs_dim, action_dim, cfg.ensemble_size, cfg.hidden)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """(E, *batch) per-step rewards of every member."""
        shape = obs.shape[:-1]
        rewards = self.net((obs.reshape(-1, obs.shape[-1]) - self.obs_mean) / self.obs_std, action.reshape(-1, action.shape[-1]))
        rewards = torch.tanh(rewards) if self.cfg.tanh_output else rewards
        return rewards.reshape(len(rewards), *shape)

    @torch.no_grad()
    def predict(self, obs: np.ndarray, action: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Ensemble-mean reward of every (s, a), as float32 numpy."""
        device = self.obs_mean.device
        out = [self(torch.as_tensor(obs[i:i + chunk], device=device), torch.as_tensor(action[i:i + chunk], device=device)).mean(0)
               for i in range(0, len(obs), chunk)]
        return torch.cat(out).cpu().numpy().astype(np.float32)

    def predict_dataset(self, dataset: OfflineDataset) -> np.ndarray:
        """Per-transition rewards of a dataset (Markovian: each (s, a) on its own)."""
        return self.predict(dataset.observations, dataset.actions)


def train_reward_model(dataset: OfflineDataset, pairs: PreferencePairs, cfg: RewardModelConfig | None = None,
                       device: torch.device | str = "cpu") -> tuple[RewardEnsemble, dict[str, float]]:
    """Fit a RewardEnsemble on `pairs` (each member on every minibatch, its own initialization) and report
    training and held-out accuracy on non-tie queries and, as the data has true rewards, the correlation of
    the learned with the true per-step reward."""
    cfg = cfg or RewardModelConfig()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    train, held_out = pairs.split(cfg.held_out, cfg.seed)
    model = standardize_inputs(RewardEnsemble(dataset.obs_dim, dataset.action_dim, cfg).to(device), dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    obs, actions = torch.as_tensor(dataset.observations, device=device), torch.as_tensor(dataset.actions, device=device)

    def returns(part: PreferencePairs, rows: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(part.segment_indices(), device=device)[rows]          # (M, 2, H)
        rewards = model(obs[index], actions[index])                                     # (E, M, 2, H)
        segment = rewards.sum(-1)
        return segment[..., 0], segment[..., 1]                                         # (E, M) each

    labels = torch.as_tensor(train.labels, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    epochs, train_accuracy = 0, float("nan")
    for epochs in range(1, cfg.max_epochs + 1):
        for rows in torch.randperm(len(train), generator=generator, device=device).split(cfg.batch_size):
            ret_a, ret_b = returns(train, rows)
            # one BT loss per member, summed: the members train independently on the same queries
            loss = sum(preference_loss(ret_a[k], ret_b[k], labels[rows]) for k in range(cfg.ensemble_size))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            ret_a, ret_b = returns(train)
            train_accuracy = pair_accuracy(ret_a.mean(0), ret_b.mean(0), labels)
        if train_accuracy >= cfg.stop_accuracy:
            break
    metrics = {"epochs": float(epochs), "train_accuracy": train_accuracy, "train_queries": float(len(train)),
               "held_out_queries": float(len(held_out))}
    with torch.no_grad():
        if len(held_out):
            ret_a, ret_b = returns(held_out)
            metrics["held_out_accuracy"] = pair_accuracy(ret_a.mean(0), ret_b.mean(0), torch.as_tensor(held_out.labels, device=device))
    metrics.update(reward_correlation(model, dataset))
    return model, metrics


def standardize_inputs(model: torch.nn.Module, dataset: OfflineDataset) -> torch.nn.Module:
    """Set a reward model's obs_mean / obs_std buffers to the statistics of the data it trains on."""
    obs_mean, obs_std = observation_statistics(dataset)
    model.obs_mean.copy_(torch.as_tensor(obs_mean))
    model.obs_std.copy_(torch.as_tensor(obs_std))
    return model


def reward_correlation(model: torch.nn.Module, dataset: OfflineDataset) -> dict[str, float]:
    """{"reward_correlation": corr(learned, true per-step reward)} where both vary, else {}."""
    learned = model.predict_dataset(dataset)
    if learned.std() > 0 and dataset.rewards.std() > 0:
        return {"reward_correlation": float(np.corrcoef(learned, dataset.rewards)[0, 1])}
    return {}
