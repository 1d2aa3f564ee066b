"""IQL: Implicit Q-Learning (Kostrikov, Nair & Levine, 2022), following the official JAX update order.

With Qbar = min_i Q_i_targ and L2_tau(u) = |tau - 1[u < 0]| * u^2:
  (1) value:  L_V  = E L2_tau( Qbar(s,a) - V(s) )                                  expectile regression
  (2) actor:  L_pi = -E[ min(exp(beta * (Qbar(s,a) - V(s))), 100) * log pi(a|s) ]  AWR, V after (1)
  (3) Q:      L_Q  = mean_i E ( Q_i(s,a) - (r + gamma * (1-d) * V(s')) )^2         V after (1)
  (4) soft-update Q_targ with tau.
The actor's learning rate follows a cosine decay to 0 over `actor_lr_decay_steps` (official IQL:
optax.cosine_decay_schedule over its 1M-step run) and stays at 0 after it. The horizon is explicit, not
the run's length: a 30k-step run decays the rate by 0.2% (as a 30k prefix of the official run does)
instead of annealing it to zero. Runs with an online phase use no decay (`cosine_actor_lr` is
`${offline_only:...}` in configs/agent/iql.yaml), as the official fine-tuning config
(`opt_decay_schedule = None`) does; the online phase never restarts a schedule.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from orl.agent import Agent, register
from orl.buffer import Batch
from orl.nn import Critic, GaussianActor, ValueNet, cosine_to_floor, make_optimizer, soft_update


@dataclass
class IQLConfig:
    """IQL (Kostrikov et al. 2022), locomotion defaults (ikostrikov/implicit_q_learning configs/mujoco_config.py).
    For D4RL locomotion also set data.reward=iql_locomotion (r * 1000 / return range);
    AntMaze: expectile=0.9 beta=10 data.reward=scale_shift data.reward_shift=-1."""

    hidden: tuple[int, ...] = (256, 256)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    value_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    expectile: float = 0.7
    beta: float = 3.0  # inverse temperature of the advantage weight
    max_weight: float = 100.0
    actor_dropout: float = 0.0
    actor_init_log_std: float = 0.0  # official IQL: log-std parameter starts at 0 (std 1); d3rlpy starts at -1.5 (std 0.22)
    cosine_actor_lr: bool = True  # cosine decay of the actor lr to 0 over actor_lr_decay_steps, then 0
    actor_lr_decay_steps: int = 1_000_000  # horizon of the cosine decay (the official run length), then 0


# The official learner's policy: NormalTanhPolicy(..., log_std_min=-5.0, state_dependent_std=False,
# tanh_squash_distribution=False) (ikostrikov/implicit_q_learning learner.py), not policy.py's default -10.
ACTOR_LOG_STD_BOUNDS = (-5.0, 2.0)


def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """E |tau - 1[u < 0]| * u^2 for u = target - prediction."""
    weight = torch.where(diff < 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


def awr_weights(advantage: torch.Tensor, beta: float | torch.Tensor, max_weight: float) -> torch.Tensor:
    """min(exp(beta * A), max_weight): the exponentiated-advantage weight of AWR/IQL/AWAC."""
    return torch.exp(beta * advantage).clamp(max=max_weight)


@register("iql")
class IQL(Agent):
    Config = IQLConfig

    def __init__(self, obs_space, action_space, cfg: IQLConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        self.nets["actor"] = GaussianActor(self.obs_dim, self.action_dim, cfg.hidden, self.max_action, cfg.actor_dropout,
                                          log_std_bounds=ACTOR_LOG_STD_BOUNDS, init_log_std=cfg.actor_init_log_std).to(self.device)
        self.nets["critic"] = Critic(self.obs_dim, self.action_dim, 2, cfg.hidden).to(self.device)
        self.nets["critic_target"] = copy.deepcopy(self.nets["critic"]).requires_grad_(False)
        self.nets["value"] = ValueNet(self.obs_dim, cfg.hidden).to(self.device)
        self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.actor_lr)
        self.optimizers["critic"] = make_optimizer(self.nets["critic"].parameters(), cfg.critic_lr)
        self.optimizers["value"] = make_optimizer(self.nets["value"].parameters(), cfg.value_lr)
        if cfg.cosine_actor_lr:
            self.schedulers["actor"] = cosine_to_floor(self.optimizers["actor"], cfg.actor_lr_decay_steps)

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.step += 1
        target_q, new_value, next_value, metrics = self.value_step(batch)
        advantage = target_q - new_value
        metrics.update(self.actor_step(batch.obs, batch.actions, advantage, self.cfg.beta))
        metrics.update(self.critic_step(batch, next_value))
        soft_update(self.nets["critic_target"], self.nets["critic"], self.cfg.tau)
        return metrics

    # The steps are separate methods so FamO2O can wrap IQL and insert its balance model.
    def value_step(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(1) Expectile regression of V toward min_i Q_i_targ; returns Qbar(s,a), V_new(s), V_new(s')."""
        with torch.no_grad():
            target_q = self.nets["critic_target"](batch.obs, batch.actions).min(0).values
        value = self.nets["value"](batch.obs)
        value_loss = expectile_loss(target_q - value, self.cfg.expectile)
        self.optimizers["value"].zero_grad(set_to_none=True)
        value_loss.backward()
        self.optimizers["value"].step()
        with torch.no_grad():
            # V(s) after the step and V(s') in one forward pass.
            new_value, next_value = self.nets["value"](torch.cat([batch.obs, batch.next_obs])).chunk(2)
        return target_q, new_value, next_value, {"value_loss": value_loss.detach()}

    def actor_loss(self, actor_obs: torch.Tensor, actions: torch.Tensor, advantage: torch.Tensor, beta: float | torch.Tensor):
        """(2) -E[min(exp(beta * A), 100) * log pi(a|s)]; `beta` may be a per-sample tensor (FamO2O)."""
        weights = awr_weights(advantage, beta, self.cfg.max_weight)
        log_prob = self.nets["actor"].log_prob(actor_obs, actions)
        return -(weights * log_prob).mean(), weights

    def actor_step(self, actor_obs: torch.Tensor, actions: torch.Tensor, advantage: torch.Tensor, beta: float | torch.Tensor) -> dict[str, torch.Tensor]:
        actor_loss, weights = self.actor_loss(actor_obs, actions, advantage.detach(), beta)
        self.optimizers["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        self.optimizers["actor"].step()
        if "actor" in self.schedulers:
            self.schedulers["actor"].step()
        return {
            "actor_loss": actor_loss.detach(),
            "advantage_mean": advantage.detach().mean(),
            "weight_clipped_frac": (weights.detach() >= self.cfg.max_weight).float().mean(),
            # the policy's log-std as used (clamped; the floor binds only when the parameter falls below it)
            "actor_log_std": self.nets["actor"].bounded_log_std().detach().mean(),
        }

    def critic_step(self, batch: Batch, next_value: torch.Tensor) -> dict[str, torch.Tensor]:
        """(3) Q regression onto r + gamma * (1 - d) * V(s')."""
        target = batch.rewards + self.cfg.discount * (1.0 - batch.terminals) * next_value
        q = self.nets["critic"](batch.obs, batch.actions)
        critic_loss = (q - target).pow(2).mean()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optimizers["critic"].step()
        return {"critic_loss": critic_loss.detach(), "q_mean": q.detach().mean()}

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return self.nets["actor"](obs, deterministic)
