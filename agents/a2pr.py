"""A2PR: Adaptive Advantage-guided Policy Regularization (Liu et al., ICML 2024).

TD3+BC plus an advantage-gated VAE ("augmented behaviour policy"), following the official code's
update order (ltlhuuu/A2PR A2PR.py). Per iteration, batch (s, a, r, s', d), m = 1 - d:

  (1) a'  = clip(pi_targ(s') + clip(N(0, (0.2 max_a)^2), -0.5 max_a, 0.5 max_a), -max_a, max_a)
  (2) y   = r + gamma m min(Q1_targ(s',a'), Q2_targ(s',a'))
  (3) L_Q = E (Q1(s,a) - y)^2 + E (Q2(s,a) - y)^2                                    critic step
  (4) y_V = min(y, r + gamma m min(Q1(s',a'), Q2(s',a')))   online critic after (3), no grad
      L_V = E (V(s) - y_V)^2                                 plain MSE, not an expectile; value step
  (5) g   = 1[Q1(s,a) > V_old(s)]                             V_old: V(s) predicted before (4)
      L_VAE = w_vae * mean_{batch x act dims}(g (a_hat - a)^2) + 0.5 * KL(N(mu, std) || N(0, I))
  (6) every policy_freq steps:
      lambda = alpha / sg(mean |Q1(s, pi(s))|);  a~ = VAE(s, pi(s))  (not detached: official)
      A_data = Q1(s,a) - V_old(s);  A_vae = Q1(s,a~) - V_old(s)
      a*  = a~ if A_vae >= A_data else a                        (per sample)
      w   = mask * (1[Q1(s,a~) >= V_old] + 1[Q1(s,a) > V_old])  in {0, mask, 2 mask}
      L_pi = -lambda E Q1(s, pi(s)) + mean_{batch x act dims}(w (pi(s) - a*)^2)
      soft-update critic and actor targets (only on actor steps, as in TD3).

Deviation, with identical parameter updates: the official code lets the actor loss accumulate
gradients into the critic and VAE parameters and relies on each module's zero_grad before its own
step. Here those modules are `frozen` during the actor loss, so the gradient still flows *through*
them into pi(s) but never lands on their parameters.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from orl.agent import Agent, register
from orl.buffer import Batch
from orl.nn import Critic, DeterministicActor, ValueNet, frozen, make_optimizer, mlp, soft_update


@dataclass
class A2PRConfig:
    """A2PR (Liu et al., ICML 2024), official defaults (ltlhuuu/A2PR utils/config.py and A2PR.py).
    Per-dataset settings: add +preset=a2pr-<env>-<level>, e.g. +preset=a2pr-hopper-medium."""

    actor_hidden: tuple[int, ...] = (256, 256, 256)
    critic_hidden: tuple[int, ...] = (256, 256, 256, 256)
    value_hidden: tuple[int, ...] = (256, 256, 256, 256)
    vae_hidden: tuple[int, ...] = (750, 750)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    vae_lr: float = 1e-3  # PyTorch's Adam default, as in the official code
    discount: float = 0.99
    tau: float = 0.005
    policy_noise: float = 0.2
    noise_clip: float = 0.5
    policy_freq: int = 2
    alpha: float = 2.5  # halfcheetah: 40
    vae_weight: float = 1.0
    mask: float = 0.5
    kl_weight: float = 0.5
    detach_vae_target: bool = False  # ablation; the official code does not detach a~


class VAE(nn.Module):
    """BCQ-style conditional VAE; A2PR always samples z by reparameterization from the encoder."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], max_action: float):
        super().__init__()
        self.latent_dim = 2 * action_dim
        self.max_action = max_action
        self.encoder = mlp(obs_dim + action_dim, 2 * self.latent_dim, hidden)
        self.decoder = mlp(obs_dim + self.latent_dim, action_dim, hidden)

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, log_std = self.encoder(torch.cat([obs, action], -1)).chunk(2, -1)
        std = log_std.clamp(-4.0, 15.0).exp()
        z = mean + std * torch.randn_like(std)
        return self.decode(obs, z), mean, std

    def decode(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.max_action * torch.tanh(self.decoder(torch.cat([obs, z], -1)))


def imitation_target(
    data_actions: torch.Tensor, vae_actions: torch.Tensor, q_data: torch.Tensor, q_vae: torch.Tensor, value: torch.Tensor, mask: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample target a* (the higher-advantage of a and a~) and weight w = mask (1[A_vae>=0] + 1[A_data>0])."""
    advantage_data, advantage_vae = q_data - value, q_vae - value
    use_vae = (advantage_vae >= advantage_data).unsqueeze(-1)
    target = torch.where(use_vae, vae_actions, data_actions)
    weight = mask * ((q_vae >= value).float() + (q_data > value).float())
    return target, weight


@register("a2pr")
class A2PR(Agent):
    Config = A2PRConfig

    def __init__(self, obs_space, action_space, cfg: A2PRConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        self.nets["actor"] = DeterministicActor(self.obs_dim, self.action_dim, cfg.actor_hidden, self.max_action).to(self.device)
        self.nets["critic"] = Critic(self.obs_dim, self.action_dim, 2, cfg.critic_hidden).to(self.device)
        self.nets["value"] = ValueNet(self.obs_dim, cfg.value_hidden).to(self.device)
        self.nets["vae"] = VAE(self.obs_dim, self.action_dim, cfg.vae_hidden, self.max_action).to(self.device)
        self.nets["actor_target"] = copy.deepcopy(self.nets["actor"]).requires_grad_(False)
        self.nets["critic_target"] = copy.deepcopy(self.nets["critic"]).requires_grad_(False)
        for name, lr in (("actor", cfg.actor_lr), ("critic", cfg.critic_lr), ("value", cfg.value_lr), ("vae", cfg.vae_lr)):
            self.optimizers[name] = make_optimizer(self.nets[name].parameters(), lr)
        self._last_actor_metrics: dict[str, torch.Tensor] = {}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg, nets, max_a = self.cfg, self.nets, self.max_action
        self.step += 1
        not_done = 1.0 - batch.terminals

        # (1)-(3) Critic with TD3 target smoothing.
        with torch.no_grad():
            noise = (torch.randn_like(batch.actions) * cfg.policy_noise * max_a).clamp(-cfg.noise_clip * max_a, cfg.noise_clip * max_a)
            next_actions = (nets["actor_target"](batch.next_obs) + noise).clamp(-max_a, max_a)
            target = batch.rewards + cfg.discount * not_done * nets["critic_target"](batch.next_obs, next_actions).min(0).values
        q = nets["critic"](batch.obs, batch.actions)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optimizers["critic"].step()

        # (4) Value: MSE to the min of the target-critic and online-critic bootstraps.
        with torch.no_grad():
            online_next = nets["critic"](batch.next_obs, next_actions).min(0).values
            value_target = torch.minimum(target, batch.rewards + cfg.discount * not_done * online_next)
            q1_data = nets["critic"].q_member(batch.obs, batch.actions, 0)  # post-update critic
        value = nets["value"](batch.obs)
        value_old = value.detach()  # the gates use V(s) from before this value step
        value_loss = F.mse_loss(value, value_target)
        self.optimizers["value"].zero_grad(set_to_none=True)
        value_loss.backward()
        self.optimizers["value"].step()

        # (5) VAE: reconstruct only actions with positive advantage; the KL term is never gated.
        reconstruction, mean, std = nets["vae"](batch.obs, batch.actions)
        gate = (q1_data > value_old).float().unsqueeze(-1)
        reconstruction_loss = cfg.vae_weight * (gate * (reconstruction - batch.actions).pow(2)).mean()
        kl_loss = -0.5 * (1 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
        vae_loss = reconstruction_loss + cfg.kl_weight * kl_loss
        self.optimizers["vae"].zero_grad(set_to_none=True)
        vae_loss.backward()
        self.optimizers["vae"].step()
        metrics = {
            "critic_loss": critic_loss.detach(), "value_loss": value_loss.detach(), "vae_loss": vae_loss.detach(),
            "q_mean": q.detach().mean(), "vae_gate_frac": gate.mean(),
        }

        # (6) Delayed actor step and target updates.
        if self.step % cfg.policy_freq == 0:
            self._last_actor_metrics = self.actor_step(batch, q1_data, value_old)
            soft_update(nets["critic_target"], nets["critic"], cfg.tau)
            soft_update(nets["actor_target"], nets["actor"], cfg.tau)
        metrics.update(self._last_actor_metrics)
        return metrics

    def actor_step(self, batch: Batch, q1_data: torch.Tensor, value_old: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, nets = self.cfg, self.nets
        policy_actions = nets["actor"](batch.obs)
        with frozen(nets["critic"], nets["vae"]):
            q_pi = nets["critic"].q_member(batch.obs, policy_actions, 0)
            lam = self.cfg.alpha / q_pi.abs().mean().detach()
            if cfg.detach_vae_target:
                with torch.no_grad():
                    vae_actions = nets["vae"](batch.obs, policy_actions)[0]
            else:
                vae_actions = nets["vae"](batch.obs, policy_actions)[0]
        with torch.no_grad():
            q1_vae = nets["critic"].q_member(batch.obs, vae_actions.detach(), 0)
        target, weight = imitation_target(batch.actions, vae_actions, q1_data, q1_vae, value_old, cfg.mask)
        bc_loss = (weight.unsqueeze(-1) * (policy_actions - target).pow(2)).mean()
        actor_loss = -lam * q_pi.mean() + bc_loss
        self.optimizers["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        self.optimizers["actor"].step()
        return {
            "actor_loss": actor_loss.detach(), "bc_loss": bc_loss.detach(), "lambda": lam,
            "bc_weight_mean": weight.mean(), "vae_target_frac": (q1_vae - value_old >= q1_data - value_old).float().mean(),
        }

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return self.nets["actor"](obs)
