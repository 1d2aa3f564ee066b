"""TD3+BC (Fujimoto & Gu, 2021): TD3 with a behavior-cloning term and Q normalization.

Per step (batch of 256):
  a'   = clip(pi_targ(s') + clip(eps, -c, c), -max_a, max_a),  eps ~ N(0, sigma^2)   (target smoothing)
  y    = r + gamma * (1 - d) * min_i Q_i_targ(s', a')                                  (clipped double Q)
  L_Q  = sum_i E (Q_i(s, a) - y)^2
every `policy_freq` steps:
  lambda = alpha / sg(E |Q_1(s, pi(s))|)                                               (Q normalization)
  L_pi = -lambda * E Q_1(s, pi(s)) + E ||pi(s) - a||^2
  soft-update actor and critic targets with tau.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from orl.agent import Agent, register
from orl.buffer import Batch
from orl.nn import Critic, DeterministicActor, frozen, make_optimizer, soft_update


@dataclass
class TD3BCConfig:
    """TD3+BC (Fujimoto & Gu 2021); CORL defaults. Use alpha: 2.5 (all D4RL locomotion)."""

    actor_hidden: tuple[int, ...] = (256, 256)
    critic_hidden: tuple[int, ...] = (256, 256)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    policy_noise: float = 0.2  # times max_action
    noise_clip: float = 0.5  # times max_action
    policy_freq: int = 2
    alpha: float = 2.5
    expl_noise: float = 0.1  # online exploration: N(0, (expl_noise * max_action)^2) on the action (sfujim/TD3 main.py; TD3_BC's --expl_noise)


def td3bc_lambda(q_pi: torch.Tensor, alpha: float) -> torch.Tensor:
    """lambda = alpha / mean |Q(s, pi(s))|, detached so it only rescales the Q term."""
    return alpha / q_pi.abs().mean().detach()


@register("td3bc")
class TD3BC(Agent):
    Config = TD3BCConfig

    def __init__(self, obs_space, action_space, cfg: TD3BCConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        self.nets["actor"] = DeterministicActor(self.obs_dim, self.action_dim, cfg.actor_hidden, self.max_action).to(self.device)
        self.nets["critic"] = Critic(self.obs_dim, self.action_dim, 2, cfg.critic_hidden).to(self.device)
        self.nets["actor_target"] = copy.deepcopy(self.nets["actor"]).requires_grad_(False)
        self.nets["critic_target"] = copy.deepcopy(self.nets["critic"]).requires_grad_(False)
        self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.actor_lr)
        self.optimizers["critic"] = make_optimizer(self.nets["critic"].parameters(), cfg.critic_lr)
        self._last_actor_metrics: dict[str, torch.Tensor] = {}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, nets = self.cfg, self.nets
        self.step += 1
        # Critic: clipped double-Q target with target policy smoothing.
        with torch.no_grad():
            noise = (torch.randn_like(batch.actions) * cfg.policy_noise * self.max_action).clamp(
                -cfg.noise_clip * self.max_action, cfg.noise_clip * self.max_action
            )
            next_actions = (nets["actor_target"](batch.next_obs) + noise).clamp(-self.max_action, self.max_action)
            target_q = nets["critic_target"](batch.next_obs, next_actions).min(0).values
            target = batch.rewards + cfg.discount * (1.0 - batch.terminals) * target_q
        q = nets["critic"](batch.obs, batch.actions)  # (2, B)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optimizers["critic"].step()
        metrics = {"critic_loss": critic_loss.detach(), "q_mean": q.detach().mean()}

        # Delayed actor: -lambda * Q_1(s, pi(s)) + BC.
        if self.step % cfg.policy_freq == 0:
            pi = nets["actor"](batch.obs)
            with frozen(nets["critic"]):
                q_pi = nets["critic"].q_member(batch.obs, pi, 0)
            lam = td3bc_lambda(q_pi, cfg.alpha)
            bc_loss = F.mse_loss(pi, batch.actions)
            actor_loss = -lam * q_pi.mean() + bc_loss
            self.optimizers["actor"].zero_grad(set_to_none=True)
            actor_loss.backward()
            self.optimizers["actor"].step()
            soft_update(nets["critic_target"], nets["critic"], cfg.tau)
            soft_update(nets["actor_target"], nets["actor"], cfg.tau)
            self._last_actor_metrics = {"actor_loss": actor_loss.detach(), "bc_loss": bc_loss.detach(), "lambda": lam}
        metrics.update(self._last_actor_metrics)
        return metrics

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        action = self.nets["actor"](obs)
        if deterministic:
            return action
        # The deterministic actor explores online with Gaussian noise, clipped to the bounds, as TD3's official
        # training loop does (sfujim/TD3 main.py: (pi(s) + N(0, max_action * expl_noise)).clip(-max_action, max_action)).
        noise = torch.randn_like(action) * self.cfg.expl_noise * self.max_action
        return (action + noise).clamp(-self.max_action, self.max_action)
