"""Preference Transformer (Kim et al., ICLR 2023): a non-Markovian reward model for control preferences.

Checked against the official code (csmile-1006/PreferenceTransformer: flaxmodels/gpt2/trajectory_gpt2.py
TransRewardModel, JaxPref/PrefTransformer.py, JaxPref/new_preference_reward_main.py and
dataset_utils.reward_from_preference_transformer):

- tokens: a_1, s_1, a_2, s_2, ... (action before state), each a linear embedding plus an embedding of the
  step's position in the segment (1..H), a LayerNorm, then a causal GPT-2 stack (3 layers, 1 head, 256
  wide, dropout 0.1). The output at the state token s_t has seen (s_<=t, a_<=t).
- preference attention: one linear layer maps it to a query, a key (256 each) and a scalar value
  r_t; the segment's weighted rewards are z_t = sum_j softmax_j(q_t . k_j / sqrt(256)) r_j (not causal),
  and the segment's score is their mean over t ("use_weighted_sum", train_type "mean").
- loss: the soft-label Bradley-Terry cross entropy on the two scores, `orl.prefs.losses.preference_loss`,
  the function the MLP ensemble and the text reward model use.
- optimizer: AdamW (optax's default weight decay 1e-4), lr warming up from `lr` to 10 `lr` over the
  first 10% of steps, then a cosine back to `lr` (optax.warmup_cosine_decay_schedule as configured there);
  batches of 64 queries; the model kept is the one with the lowest held-out loss (checked every
  `eval_every` epochs), as the official script keeps best_model.pkl.
- relabelling ("last" mode, the official default): the reward of transition t is r at the last position
  of the window of `window` steps that ends at t in its trajectory (shorter at a trajectory's start).
  Because r_t comes from a causal stack, that is the value at position k of the window that starts at
  the trajectory's start, which is what is computed here; no padding is needed.

Differences, on purpose: observations are standardized with the dataset's statistics (kept in the
module), as orl's MLP reward model does; PyTorch's exact GELU instead of GPT-2's tanh approximation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orl.data import OfflineDataset
from orl.errors import ConfigError
from orl.prefs.losses import pair_accuracy, preference_loss
from orl.prefs.reward_model import reward_correlation, standardize_inputs


@dataclass
class PreferenceTransformerConfig:
    embed_dim: int = 256
    layers: int = 3
    heads: int = 1
    dropout: float = 0.1
    preference_attention_dim: int = 256
    max_timestep: int = 1000       # positions 1..max_timestep inside a segment or relabelling window
    lr: float = 1e-4
    peak_lr_factor: float = 10.0   # warmup to peak_lr_factor * lr over the first 10% of steps, cosine back to lr
    weight_decay: float = 1e-4
    batch_size: int = 64
    epochs: int = 100
    eval_every: int = 5
    held_out: float = 0.1
    window: int = 25               # relabelling window (the official seq_len flag)
    seed: int = 0


class PreferenceTransformer(nn.Module):
    kind = "preference_transformer"

    def __init__(self, obs_dim: int, action_dim: int, cfg: PreferenceTransformerConfig):
        super().__init__()
        self.cfg, self.obs_dim, self.action_dim = cfg, obs_dim, action_dim
        width = cfg.embed_dim
        self.embed_obs = nn.Linear(obs_dim, width)
        self.embed_action = nn.Linear(action_dim, width)
        self.embed_timestep = nn.Embedding(cfg.max_timestep + 1, width)
        self.embed_norm = nn.LayerNorm(width)
        block = nn.TransformerEncoderLayer(width, cfg.heads, 4 * width, cfg.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(block, cfg.layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.preference_attention = nn.Linear(width, 2 * cfg.preference_attention_dim + 1)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted rewards z, rewards r), each (B, T), for segments (B, T, obs_dim) and (B, T, action_dim)."""
        batch, length = obs.shape[:2]
        timestep = self.embed_timestep(torch.arange(1, length + 1, device=obs.device))           # (T, D)
        states = self.embed_obs((obs - self.obs_mean) / self.obs_std) + timestep
        acts = self.embed_action(actions) + timestep
        tokens = self.embed_norm(torch.stack([acts, states], dim=2).reshape(batch, 2 * length, -1))  # a_1, s_1, a_2, s_2, ...
        causal = nn.Transformer.generate_square_subsequent_mask(2 * length, device=obs.device, dtype=tokens.dtype)
        hidden = self.transformer(tokens, mask=causal, is_causal=True).reshape(batch, length, 2, -1)[:, :, 1]  # at s_t
        dim = self.cfg.preference_attention_dim
        query, key, reward = self.preference_attention(hidden).split([dim, dim, 1], dim=-1)
        weights = torch.softmax(query @ key.transpose(1, 2) / math.sqrt(dim), dim=-1)            # (B, T, T), not causal
        return (weights @ reward).squeeze(-1), reward.squeeze(-1)

    def score(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """A segment's preference score: the mean of its weighted rewards."""
        return self(obs, actions)[0].mean(-1)

    @torch.no_grad()
    def predict_dataset(self, dataset: OfflineDataset, batch_size: int = 256) -> np.ndarray:
        """Per-transition rewards ("last" mode): r at transition t's position in the window of `window` steps
        ending at t, computed from the window that starts at max(trajectory start, t - window + 1)."""
        was_training = self.training
        self.eval()
        device = self.obs_mean.device
        window = self.cfg.window
        episodes = dataset.episode_ids()
        n = len(dataset)
        starts = np.maximum(np.searchsorted(episodes, episodes), np.arange(n) - window + 1)  # episode ids are sorted
        positions = np.arange(n) - starts                                                   # < window
        index = np.minimum(starts[:, None] + np.arange(window)[None], n - 1)               # past an episode's end: causally unseen
        obs, actions = torch.as_tensor(dataset.observations, device=device), torch.as_tensor(dataset.actions, device=device)
        out = np.empty(n, np.float32)
        for lo in range(0, n, batch_size):
            rows = torch.as_tensor(index[lo:lo + batch_size], device=device)
            _, reward = self(obs[rows], actions[rows])
            out[lo:lo + batch_size] = reward.gather(1, torch.as_tensor(positions[lo:lo + batch_size, None], device=device)).squeeze(1).cpu().numpy()
        self.train(was_training)
        return out


def train_preference_transformer(dataset: OfflineDataset, pairs, cfg: PreferenceTransformerConfig | None = None,
                                 device: torch.device | str = "cpu") -> tuple[PreferenceTransformer, dict[str, float]]:
    """Fit a Preference Transformer on `pairs`; metrics as `orl.prefs.reward_model.train_reward_model` reports them."""
    import copy

    cfg = cfg or PreferenceTransformerConfig()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    if pairs.length > cfg.max_timestep:
        raise ConfigError(f"segments of {pairs.length} steps exceed the model's max_timestep {cfg.max_timestep}")
    train, held_out = pairs.split(cfg.held_out, cfg.seed)
    model = standardize_inputs(PreferenceTransformer(dataset.obs_dim, dataset.action_dim, cfg).to(device), dataset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total, warmup = cfg.epochs * steps_per_epoch, int(0.1 * cfg.epochs * steps_per_epoch)

    def lr_factor(step: int) -> float:  # optax.warmup_cosine_decay_schedule(lr, peak * lr, warmup, total, end=lr) / lr
        if step < warmup:
            return 1.0 + (cfg.peak_lr_factor - 1.0) * step / warmup
        progress = min(step - warmup, total - warmup) / max(total - warmup, 1)
        return 1.0 + (cfg.peak_lr_factor - 1.0) * 0.5 * (1.0 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    obs, actions = torch.as_tensor(dataset.observations, device=device), torch.as_tensor(dataset.actions, device=device)

    def scores(part, rows=slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(part.segment_indices(), device=device)[rows]                 # (M, 2, H)
        flat = index.reshape(-1, index.shape[-1])
        score = model.score(obs[flat], actions[flat]).reshape(-1, 2)
        return score[:, 0], score[:, 1]

    @torch.no_grad()
    def evaluate(part) -> tuple[float, float]:  # in eval mode (no dropout), then back to the mode it was in
        was_training = model.training
        model.eval()
        labels = torch.as_tensor(part.labels, device=device)
        score_a, score_b = zip(*(scores(part, rows) for rows in torch.arange(len(part), device=device).split(256)))
        score_a, score_b = torch.cat(score_a), torch.cat(score_b)
        model.train(was_training)
        return float(preference_loss(score_a, score_b, labels)), pair_accuracy(score_a, score_b, labels)

    labels = torch.as_tensor(train.labels, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    best_loss, best_state, best_epoch = math.inf, None, 0
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        for rows in torch.randperm(len(train), generator=generator, device=device).split(cfg.batch_size):
            score_a, score_b = scores(train, rows)
            loss = preference_loss(score_a, score_b, labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if len(held_out) and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
            held_out_loss, _ = evaluate(held_out)
            if held_out_loss < best_loss:  # keep the best held-out model, as the official best_model.pkl
                best_loss, best_state, best_epoch = held_out_loss, copy.deepcopy(model.state_dict()), epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    metrics = {"epochs": float(cfg.epochs), "best_epoch": float(best_epoch or cfg.epochs), "train_accuracy": evaluate(train)[1],
               "train_queries": float(len(train)), "held_out_queries": float(len(held_out))}
    if len(held_out):
        metrics["held_out_loss"], metrics["held_out_accuracy"] = evaluate(held_out)
    metrics.update(reward_correlation(model, dataset))
    return model, metrics
