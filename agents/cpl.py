"""Contrastive Preference Learning (Hejna et al., ICLR 2024): a policy learned from segment preferences
directly, with no reward model and no RL. Checked against the official code (jhejna/cpl,
research/algs/cpl.py); where the spec and it differ, the official code is followed.

The score of a segment is its summed scaled log-likelihood, S(sigma) = alpha * sum_t log pi(a_t | s_t)
(no discount, as the official code). With y = P(segment 1 preferred) and lambda in (0, 1] (the
"contrastive bias", which scales only the dispreferred segment's score):

    L_CPL = y * softplus(-(S_1 - lambda S_2)) + (1 - y) * softplus(-(S_2 - lambda S_1))     (two-term form)
    L     = L_CPL + bc_coef * E[-log pi(a|s)]                                             (BC regularizer)

For the first `bc_steps` steps only the BC term trains; at the switch the optimizer (and its moments) is
rebuilt, as the official code does. The policy is IQL's Gaussian (tanh-bounded mean, state-independent
log-std), or with `deterministic=true` the official unit-variance shortcut log pi = -||pi(s) - a||^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from orl.agent import Agent, register
from orl.nn import DeterministicActor, GaussianActor, make_optimizer
from orl.preferences import SegmentPairBatch


def cpl_loss(score_1: torch.Tensor, score_2: torch.Tensor, label: torch.Tensor, contrastive_bias: float = 1.0) -> torch.Tensor:
    """The CPL(lambda) loss above; label = P(segment 1 preferred)."""
    prefer_1 = F.softplus(-(score_1 - contrastive_bias * score_2))
    prefer_2 = F.softplus(-(score_2 - contrastive_bias * score_1))
    return (label * prefer_1 + (1 - label) * prefer_2).mean()


@dataclass
class CPLConfig:
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 1e-4
    alpha: float = 0.1             # temperature: S = alpha * sum log pi
    contrastive_bias: float = 0.5  # lambda in (0, 1]; 1 = the plain Bradley-Terry form
    bc_coef: float = 0.0           # weight of -log pi on the segments' own actions
    bc_steps: int = 0              # BC only before this step, then CPL with a fresh optimizer
    deterministic: bool = False    # log pi = -||pi(s) - a||^2 (the official shortcut for unit variance)
    dropout: float = 0.0           # off at evaluation (the actor is in eval mode when acting)


@register("cpl")
class CPL(Agent):
    Config = CPLConfig
    data_kind = "segments"  # labelled segment pairs (data.preferences=<orl-prefs label file>), not transitions

    def __init__(self, obs_space, action_space, cfg: CPLConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        if not 0.0 < cfg.contrastive_bias <= 1.0:
            from orl.errors import ConfigError

            raise ConfigError(f"agent.contrastive_bias must be in (0, 1], got {cfg.contrastive_bias}")
        actor = DeterministicActor if cfg.deterministic else GaussianActor
        self.nets["actor"] = actor(self.obs_dim, self.action_dim, cfg.hidden, self.max_action, cfg.dropout).to(self.device)
        self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.lr)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        if self.cfg.deterministic:
            return -(self.nets["actor"](obs) - actions).pow(2).sum(-1)
        return self.nets["actor"].log_prob(obs, actions)

    def update(self, batch: SegmentPairBatch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        log_prob = self.log_prob(batch.obs, batch.actions)               # (B, 2, H)
        bc_loss = -log_prob.mean()
        score = cfg.alpha * log_prob.sum(-1)                             # S = alpha * sum_t log pi(a_t|s_t), (B, 2)
        preference = cpl_loss(score[:, 0], score[:, 1], batch.labels, cfg.contrastive_bias)
        bc_phase = self.step < cfg.bc_steps
        loss = bc_loss if bc_phase else preference + cfg.bc_coef * bc_loss
        self.optimizers["actor"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["actor"].step()
        self.step += 1
        if self.step == cfg.bc_steps:  # the switch to CPL: a fresh optimizer, no moments carried over from BC
            self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.lr)
        with torch.no_grad():
            accuracy = ((score[:, 0] > score[:, 1]).float() == batch.labels)[batch.labels != 0.5].float().mean()
        return {"cpl_loss": preference.detach(), "bc_loss": bc_loss.detach(), "accuracy": accuracy, "bc_phase": torch.tensor(float(bc_phase))}

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        actor = self.nets["actor"]
        if self.cfg.deterministic:
            return actor(obs)
        return actor(obs, deterministic)
