"""SAC (Haarnoja et al., 2018) with a vectorized critic ensemble, as used for online learning, for the
collection pipeline's behaviour policies, and as WSRL's fine-tuning agent.

Per update on a batch B (online, split into `online_critic_minibatches` equal parts for high-UTD
training: WSRL; offline updates never split):
  for each minibatch b:
    a' ~ pi(.|s'),  Qt = min over J of Q_j_targ(s', a')     J = all members, or `target_subsample`
                                                              random members (with replacement, WSRL)
    y  = r + gamma * (1 - d) * (Qt - alpha * log pi(a'|s') [if backup_entropy])
    L_Q = sum_i E_b (Q_i(s,a) - y)^2;  soft-update Q_targ with tau
  on the full batch:
    L_pi    = E[ alpha * log pi(a~|s) - reduce_i Q_i(s, a~) ],  a~ ~ pi(.|s) reparameterized,
              reduce = min over all members (SAC, WSRL) or mean (REDQ)
    L_alpha = -E[ log_alpha * sg(log pi(a~|s) + target_entropy) ]   (target entropy -|A|)
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from orl.agent import Agent, register
from orl.buffer import Batch
from orl.nn import Critic, TanhGaussianActor, frozen, make_optimizer, orthogonal_init, scale_last_hidden_layer, soft_update


@dataclass
class SACConfig:
    """SAC (Haarnoja et al. 2018) with a vectorized critic ensemble. Online from scratch:
      orl-finetune agent=sac steps=0 online.steps=100000 online.buffer_mode=none online.random_steps=5000 online.learning_starts=5000
    """

    actor_hidden: tuple[int, ...] = (256, 256)
    critic_hidden: tuple[int, ...] = (256, 256)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    discount: float = 0.99
    tau: float = 0.005
    ensemble_size: int = 2
    target_subsample: int | None = None  # WSRL/REDQ: min over this many random members in the target
    actor_q_reduce: str = "min"  # min | mean
    layer_norm: bool = False
    final_layer_scale: float | None = None  # e.g. 1e-2 (WSRL): init scale of the last hidden layer, actor and critic
    orthogonal_init: bool = False  # official JAX nets (JaxCQL, Cal-QL, WSRL): orthogonal(sqrt 2) kernels, zero biases
    head_scale: float | None = None  # with orthogonal_init: the output layers' gain (Cal-QL 1e-2; None: sqrt 2, WSRL)
    actor_log_std_bounds: tuple[float, float] = (-5.0, 2.0)  # Cal-QL (-20, 2); WSRL clips std to [1e-5, 10]
    actor_log_std_offset: float | None = None  # Cal-QL: log-std = m * raw + b, learnt m (init 1) and b (init this: -1)
    critic_shared_head: bool = False  # WSRL: the members share one output layer (official Critic over an ensemblized MLP)
    layer_norm_eps: float = 1e-5  # PyTorch's; flax's LayerNorm (WSRL) uses 1e-6
    init_alpha: float = 1.0
    target_entropy: float | None = None  # default -action_dim
    backup_entropy: bool = True
    online_critic_minibatches: int = 1  # WSRL fine-tuning: 4 critic minibatches from one batch of 1024


def tanh_actor(in_dim: int, action_dim: int, max_action: float, cfg: SACConfig) -> TanhGaussianActor:
    """The policy network `cfg` describes (SAC's, and FamO2O-CQL's universal policy on [s, emb(beta)]), before `initialize`."""
    return TanhGaussianActor(in_dim, action_dim, cfg.actor_hidden, max_action, cfg.layer_norm, tuple(cfg.actor_log_std_bounds),
                             cfg.actor_log_std_offset, cfg.layer_norm_eps)


def initialize(net: nn.Module, cfg: SACConfig) -> None:
    """The configured init on top of PyTorch's default: the official JAX codes' orthogonal one, then the last
    hidden layer's scale (WSRL)."""
    if cfg.orthogonal_init:
        orthogonal_init(net, cfg.head_scale)
    if cfg.final_layer_scale is not None:
        scale_last_hidden_layer(net, cfg.final_layer_scale, orthogonal=cfg.orthogonal_init)


@register("sac")
class SAC(Agent):
    Config = SACConfig

    def __init__(self, obs_space, action_space, cfg: SACConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        if cfg.actor_q_reduce not in ("min", "mean"):
            raise ValueError(f"actor_q_reduce must be min or mean, got {cfg.actor_q_reduce!r}")
        if cfg.head_scale is not None and not cfg.orthogonal_init:
            raise ValueError("head_scale is the gain of an orthogonal init: set orthogonal_init=true with it, or head_scale=null")
        self.nets["actor"] = tanh_actor(self.obs_dim, self.action_dim, self.max_action, cfg).to(self.device)
        self.nets["critic"] = Critic(self.obs_dim, self.action_dim, cfg.ensemble_size, cfg.critic_hidden, cfg.layer_norm,
                                     shared_head=cfg.critic_shared_head, layer_norm_eps=cfg.layer_norm_eps).to(self.device)
        for net in (self.nets["actor"], self.nets["critic"]):
            initialize(net, cfg)
        self.nets["critic_target"] = copy.deepcopy(self.nets["critic"]).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(cfg.init_alpha), device=self.device))
        self.target_entropy = -float(self.action_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.actor_lr)
        self.optimizers["critic"] = make_optimizer(self.nets["critic"].parameters(), cfg.critic_lr)
        self.optimizers["alpha"] = make_optimizer([self.log_alpha], cfg.alpha_lr)
        # Multiplier of the Q term in the actor loss; FamO2O-CQL sets it to the per-sample beta.
        self.q_weight: float | torch.Tensor = 1.0
        self.online = False  # the minibatch split is an online (high-UTD) thing only

    def on_online_start(self, **context) -> None:
        self.online = True

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    # --- losses (reused by CQL / Cal-QL / WSRL) ---------------------------------------------
    def sample_next_actions(self, next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a' ~ pi(.|s') for TD targets (and CQL's s' samples); FamO2O-CQL conditions it differently."""
        return self.nets["actor"].sample(next_obs)

    def target_members(self) -> torch.Tensor | None:
        """Members whose min forms the TD target: `target_subsample` drawn with replacement (WSRL/REDQ), or all."""
        cfg = self.cfg
        if cfg.target_subsample is None:
            return None
        return torch.randint(0, cfg.ensemble_size, (cfg.target_subsample,), device=self.device)

    def td_target(self, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        with torch.no_grad():
            next_actions, next_log_prob = self.sample_next_actions(batch.next_obs)
            # (E, B), or only the sub-sampled members' rows (computed alone: a fifth of WSRL's 10-member pass)
            target_q = self.nets["critic_target"](batch.next_obs, next_actions, self.target_members()).min(0).values
            if cfg.backup_entropy:
                target_q = target_q - self.alpha * next_log_prob
            return batch.rewards + cfg.discount * (1.0 - batch.terminals) * target_q

    def critic_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        target = self.td_target(batch)
        q = self.nets["critic"](batch.obs, batch.actions)
        critic_loss = (q - target).pow(2).mean(1).sum()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        critic_loss.backward()
        self.optimizers["critic"].step()
        soft_update(self.nets["critic_target"], self.nets["critic"], self.cfg.tau)
        return {"critic_loss": critic_loss.detach(), "q_mean": q.detach().mean()}

    def actor_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        actions, log_prob = self.nets["actor"].sample(batch.obs)
        with frozen(self.nets["critic"]):
            q = self.nets["critic"](batch.obs, actions)
        q = q.min(0).values if self.cfg.actor_q_reduce == "min" else q.mean(0)
        actor_loss = (self.alpha * log_prob - self.q_weight * q).mean()
        self.optimizers["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        self.optimizers["actor"].step()

        alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
        self.optimizers["alpha"].zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.optimizers["alpha"].step()
        return {"actor_loss": actor_loss.detach(), "alpha": self.alpha, "entropy": -log_prob.detach().mean()}

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.step += 1
        metrics: dict[str, torch.Tensor] = {}
        parts = self.cfg.online_critic_minibatches if self.online else 1
        for minibatch in batch.split(parts) if parts > 1 else (batch,):
            metrics = self.critic_step(minibatch)
        metrics.update(self.actor_step(batch))
        return metrics

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        return self.nets["actor"](obs, deterministic)

    def extra_state(self) -> dict:
        return {"log_alpha": self.log_alpha.detach().cpu(), "online": self.online}

    def load_extra_state(self, state: dict) -> None:
        self.online = bool(state.get("online", False))
        if "log_alpha" in state:
            with torch.no_grad():
                self.log_alpha.copy_(state["log_alpha"].to(self.device))
