"""FamO2O: Train Once, Get a Family (Wang et al., NeurIPS 2023), as a balance layer around IQL.

The base agent's policy becomes a *universal* policy pi_u(a | s, emb(beta)) conditioned on a balance
coefficient beta, and a *balance model* pi_b(beta | s) learns a state-dependent beta. For IQL, beta is
the inverse temperature inside the AWR weight exp(beta * A). Per step (official JAX FamilyLearner,
algorithms.md section 2.4), with Qbar = min_i Q_i_targ:

  (1) value:     L_V = E L2_tau(Qbar(s,a) - V(s))                                   [IQL value step]
  (2) balance:   u ~ pi_b(.|s) (reparameterized), beta = lo + (u+1)/2 (hi-lo),
                 a_b ~ pi_u(.|s, emb(beta)) (reparameterized),
                 L_b = E[ alpha_b log pi_b(u|s) - Qbar(s, a_b) ]      only pi_b is updated
  (3) temperature: L_alpha = alpha_b (H_hat - H_target), H_hat = -E log pi_b(u|s), H_target = -0.5
  (4) universal: beta_i ~ U[lo, hi] offline, beta_i ~ pi_b(.|s) online (drawn *before* (2), stop-grad),
                 L_u = -E[ min(exp(beta_i (Qbar(s,a) - V_new(s))), 100) log pi_u(a | s, emb(beta_i)) ]
  (5) Q:         L_Q = mean_i E (Q_i(s,a) - (r + gamma (1-d) V_new(s')))^2           [IQL critic step]
  (6) soft-update Q_targ.

emb(beta) is the sinusoidal code with d = 6, n = 10000. Acting (collection and evaluation) uses the
deterministic balance beta = map(tanh(mean)); collection samples the action from pi_u, evaluation
takes its mean. The same mapping (u+1)/2 is used for every base; the official CQL version maps
x*(hi-lo)+lo, which leaves the offline range (a known bug), so this deliberately deviates from it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from agents.iql import IQL, IQLConfig
from orl.agent import Agent, build_config, register
from orl.buffer import Batch
from orl.nn import GaussianActor, frozen, make_optimizer, mlp, soft_update


def sinusoidal_embedding(beta: torch.Tensor, dim: int = 6, base: float = 10000.0) -> torch.Tensor:
    """emb[2i] = sin(beta / base^(2i/dim)), emb[2i+1] = cos(beta / base^(2i/dim)); beta (B,) -> (B, dim)."""
    exponents = torch.arange(dim // 2, device=beta.device, dtype=beta.dtype) * 2.0 / dim
    angles = beta.unsqueeze(-1) / base**exponents
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class BalanceModel(nn.Module):
    """pi_b(beta | s): tanh-squashed Gaussian over a scalar u in (-1, 1), mapped to [lo, hi]."""

    def __init__(self, obs_dim: int, hidden: tuple[int, ...], lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.mean = mlp(obs_dim, 1, hidden)
        self.log_std = nn.Parameter(torch.zeros(1))  # state-independent, as in the IQL version

    def to_beta(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (u + 1.0) * 0.5 * (self.hi - self.lo)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized beta (B,) and log pi_b(u|s) (B,)."""
        mean = self.mean(obs).squeeze(-1)
        log_std = self.log_std.clamp(-5.0, 2.0)
        pre_tanh = mean + log_std.exp() * torch.randn_like(mean)
        u = torch.tanh(pre_tanh)
        log_prob = (-0.5 * ((pre_tanh - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
                    - 2.0 * (math.log(2.0) - pre_tanh - nn.functional.softplus(-2.0 * pre_tanh)))
        return self.to_beta(u), log_prob

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.to_beta(torch.tanh(self.mean(obs).squeeze(-1)))


@dataclass
class FamO2OConfig:
    base: dict[str, Any] = field(default_factory=lambda: {"cosine_actor_lr": False})  # IQLConfig overrides
    beta_lo: float = 1.0
    beta_hi: float = 5.0
    embedding_dim: int = 6
    embedding_base: float = 10000.0
    balance_hidden: tuple[int, ...] = (256, 256)
    balance_lr: float = 3e-4
    temperature_lr: float = 3e-4
    init_temperature: float = 1.0
    target_entropy: float = -0.5  # -dim(beta)/2
    balance_every: int = 1  # update pi_b every k steps (IQL locomotion ports: 5)


@register("famo2o_iql")
class FamO2OIQL(Agent):
    Config = FamO2OConfig

    def __init__(self, obs_space, action_space, cfg: FamO2OConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        if not cfg.beta_lo < cfg.beta_hi:
            raise ValueError(f"need beta_lo < beta_hi, got [{cfg.beta_lo}, {cfg.beta_hi}]")
        base_cfg = build_config(IQL, {"cosine_actor_lr": False, **dict(cfg.base)})
        self.base = IQL(obs_space, action_space, base_cfg, device)
        # The base's policy becomes the universal policy: its input is [s, emb(beta)].
        self.base.nets["actor"] = GaussianActor(self.obs_dim + cfg.embedding_dim, self.action_dim, base_cfg.hidden, self.max_action,
                                                base_cfg.actor_dropout).to(self.device)
        self.base.optimizers["actor"] = make_optimizer(self.base.nets["actor"].parameters(), base_cfg.actor_lr)
        if base_cfg.cosine_actor_lr:
            self.base.schedulers["actor"] = torch.optim.lr_scheduler.CosineAnnealingLR(self.base.optimizers["actor"], max(base_cfg.max_steps, 1))
        self.nets = self.base.nets  # one ModuleDict, so state_dict covers base and balance layer
        self.optimizers = self.base.optimizers
        self.schedulers = self.base.schedulers
        self.nets["balance"] = BalanceModel(self.obs_dim, cfg.balance_hidden, cfg.beta_lo, cfg.beta_hi).to(self.device)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.init_temperature), device=self.device))
        self.optimizers["balance"] = make_optimizer(self.nets["balance"].parameters(), cfg.balance_lr)
        self.optimizers["temperature"] = make_optimizer([self.log_temperature], cfg.temperature_lr)
        self.online = False
        self._last_balance_metrics: dict[str, torch.Tensor] = {}

    def embed(self, obs: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return torch.cat([obs, sinusoidal_embedding(beta, self.cfg.embedding_dim, self.cfg.embedding_base)], -1)

    def on_online_start(self, **context: Any) -> None:
        self.online = True

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, base = self.cfg, self.base
        self.step += 1
        base.step += 1
        # Betas for the universal policy: uniform offline; from the pre-update balance model online.
        with torch.no_grad():
            if self.online:
                beta = self.nets["balance"].sample(batch.obs)[0]
            else:
                beta = torch.empty(len(batch), device=self.device).uniform_(cfg.beta_lo, cfg.beta_hi)

        target_q, new_value, next_value, metrics = base.value_step(batch)  # (1)
        if self.step % cfg.balance_every == 0:
            self._last_balance_metrics = self.balance_step(batch)  # (2) + (3)
        metrics.update(self._last_balance_metrics)
        metrics.update(base.actor_step(self.embed(batch.obs, beta), batch.actions, target_q - new_value, beta))  # (4)
        metrics.update(base.critic_step(batch, next_value))  # (5)
        soft_update(self.nets["critic_target"], self.nets["critic"], base.cfg.tau)  # (6)
        metrics["beta_mean"] = beta.mean()
        if self.online:
            metrics["hist/beta"] = beta
        return metrics

    def balance_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """L_b = E[alpha_b log pi_b(u|s) - Qbar(s, a_b)]; differentiates through pi_u and Q_targ without updating them."""
        beta, log_prob = self.nets["balance"].sample(batch.obs)
        with frozen(self.nets["actor"]):
            dist = self.nets["actor"].distribution(self.embed(batch.obs, beta))
            balance_actions = dist.rsample().clamp(-self.max_action, self.max_action)
        q = self.nets["critic_target"](batch.obs, balance_actions).min(0).values  # target critic has no grad params
        temperature = self.log_temperature.exp().detach()
        return (temperature * log_prob - q).mean(), log_prob

    def balance_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        balance_loss, log_prob = self.balance_loss(batch)
        self.optimizers["balance"].zero_grad(set_to_none=True)
        balance_loss.backward()
        self.optimizers["balance"].step()
        entropy = -log_prob.detach().mean()
        temperature_loss = self.log_temperature.exp() * (entropy - self.cfg.target_entropy)
        self.optimizers["temperature"].zero_grad(set_to_none=True)
        temperature_loss.backward()
        self.optimizers["temperature"].step()
        return {"balance_loss": balance_loss.detach(), "balance_entropy": entropy, "balance_temperature": self.log_temperature.exp().detach()}

    @torch.no_grad()
    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        beta = self.nets["balance"].deterministic(obs)  # deterministic beta for collection and evaluation
        return self.nets["actor"](self.embed(obs, beta), deterministic)

    def extra_state(self) -> dict[str, Any]:
        return {"log_temperature": self.log_temperature.detach().cpu(), "online": self.online}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "log_temperature" in state:
            with torch.no_grad():
                self.log_temperature.copy_(state["log_temperature"].to(self.device))
        self.online = bool(state.get("online", False))
