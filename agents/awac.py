"""AWAC: Advantage-Weighted Actor-Critic (Nair et al., 2020), CORL's variant.

  Q:  y = r + gamma (1-d) min_i Q_i_targ(s', a'),  a' ~ pi(.|s');   L_Q = sum_i E (Q_i(s,a) - y)^2
  pi: A(s,a) = min_i Q_i(s,a) - min_i Q_i(s, a_pi),  a_pi ~ pi(.|s)  (one-sample value estimate)
      L_pi = -E[ min(exp(A / lambda), 100) * log pi(a|s) ]
  soft-update Q_targ every step. Works offline and online (buffer mode `seed`, as in the paper).
Networks as CORL's algorithms/offline/awac.py: three hidden layers of 256 for actor and critics; the policy is
N(mu(s), exp(log_std)) with an unbounded mean and a state-independent log-std clamped to [-20, 2]; its samples
(TD target, value estimate) are clamped to [-1, 1], while log pi scores the dataset's actions as they are.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from orl.agents.iql import awr_weights
from orl.agent import Agent, register
from orl.buffer import Batch
from orl.nn import Critic, GaussianActor, make_optimizer, soft_update


@dataclass
class AWACConfig:
    """AWAC (Nair et al. 2020), CORL defaults."""

    hidden: tuple[int, ...] = (256, 256, 256)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    awac_lambda: float = 1.0  # temperature; the weight is exp(A / lambda)
    max_weight: float = 100.0


@register("awac")
class AWAC(Agent):
    Config = AWACConfig

    def __init__(self, obs_space, action_space, cfg: AWACConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        self.nets["actor"] = GaussianActor(self.obs_dim, self.action_dim, cfg.hidden, self.max_action, log_std_bounds=(-20.0, 2.0),
                                           tanh_mean=False).to(self.device)
        self.nets["critic"] = Critic(self.obs_dim, self.action_dim, 2, cfg.hidden).to(self.device)
        self.nets["critic_target"] = copy.deepcopy(self.nets["critic"]).requires_grad_(False)
        self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.actor_lr)
        self.optimizers["critic"] = make_optimizer(self.nets["critic"].parameters(), cfg.critic_lr)
        # Inverse temperature of the advantage weight; FamO2O-AWAC sets a per-sample tensor.
        self.beta: float | torch.Tensor = 1.0 / cfg.awac_lambda

    def advantage(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            policy_actions = self.nets["actor"](obs, deterministic=False)
            q_both = self.nets["critic"](torch.cat([obs, obs]), torch.cat([actions, policy_actions])).min(0).values
            q_data, value = q_both.chunk(2)
            return q_data - value

    def actor_loss(self, actor_obs: torch.Tensor, actions: torch.Tensor, advantage: torch.Tensor, beta: float | torch.Tensor):
        weights = awr_weights(advantage, beta, self.cfg.max_weight)
        return -(weights * self.nets["actor"].log_prob(actor_obs, actions)).mean(), weights

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, nets = self.cfg, self.nets
        self.step += 1
        with torch.no_grad():
            next_actions = nets["actor"](batch.next_obs, deterministic=False)
            target = batch.rewards + cfg.discount * (1.0 - batch.terminals) * nets["critic_target"](batch.next_obs, next_actions).min(0).values
        q = nets["critic"](batch.obs, batch.actions)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optimizers["critic"].step()

        advantage = self.advantage(batch.obs, batch.actions)
        actor_loss, weights = self.actor_loss(batch.obs, batch.actions, advantage, self.beta)
        self.optimizers["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        self.optimizers["actor"].step()
        soft_update(nets["critic_target"], nets["critic"], cfg.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "q_mean": q.detach().mean(),
                "weight_clipped_frac": (weights >= cfg.max_weight).float().mean()}

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return self.nets["actor"](obs, deterministic)
