"""Behavior cloning: a deterministic policy regressed onto dataset actions (CORL's `any_percent_bc`).

    L_pi = E_(s,a)~D || pi(s) - a ||^2      (mean over batch and action dimensions)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from orl.agent import Agent, register
from orl.buffer import Batch
from orl.nn import DeterministicActor, make_optimizer


@dataclass
class BCConfig:
    """Behavior cloning (deterministic, MSE)."""

    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    dropout: float = 0.0


@register("bc")
class BC(Agent):
    Config = BCConfig

    def __init__(self, obs_space, action_space, cfg: BCConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        self.nets["actor"] = DeterministicActor(self.obs_dim, self.action_dim, cfg.hidden, self.max_action, cfg.dropout).to(self.device)
        self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.lr)

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        loss = F.mse_loss(self.nets["actor"](batch.obs), batch.actions)
        self.optimizers["actor"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["actor"].step()
        self.step += 1
        return {"actor_loss": loss.detach()}

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return self.nets["actor"](obs)
