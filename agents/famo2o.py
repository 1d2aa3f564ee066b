"""FamO2O: Train Once, Get a Family (Wang et al., NeurIPS 2023), as a balance layer around a base agent.

The base agent's policy becomes a *universal* policy pi_u(a | s, emb(beta)) conditioned on a balance
coefficient beta, and a *balance model* pi_b(beta | s) learns a state-dependent beta. beta enters the
base's own weighting (Wang et al., 2023; LeapLabTHU/FamO2O):
  * IQL, AWAC: the inverse temperature of the advantage weight, min(exp(beta * A), 100);
  * CQL:       the multiplier of the Q term in the actor loss, alpha log pi_u - beta * min_i Q_i.
Betas: uniform on [lo, hi] per sample offline; online, sampled from the pre-update pi_b (stop-grad).
emb(beta) is the sinusoidal code with d = 6, n = 10000.

FamO2O + IQL, per step (official JAX FamilyLearner, LeapLabTHU/FamO2O jax_iql/family_learner.py), Qbar = min_i Q_i_targ:
  (1) value:       L_V = E L2_tau(Qbar(s,a) - V(s))                                   [IQL]
  (2) balance:     u ~ pi_b(.|s), beta = lo + (u+1)/2 (hi-lo), a_b ~ pi_u(.|s, emb(beta)), both
                   reparameterized; L_b = E[alpha_b log pi_b(u|s) - Qbar(s, a_b)]  (only pi_b updated)
  (3) temperature: L_alpha = alpha_b (H_hat - H_target), H_hat = -E log pi_b(u|s), H_target = -0.5
  (4) universal:   L_u = -E[min(exp(beta_i (Qbar(s,a) - V_new(s))), 100) log pi_u(a | s, emb(beta_i))]
  (5) Q and (6) target update as in IQL.
FamO2O + AWAC (paper only, no released code: experimental) and FamO2O + CQL run the base's update with
the conditioned policy and per-sample beta, then the balance step; the balance loss uses the online
critic, and (CQL, as officially) has no entropy term. In CQL, as in the official
family_conservative_sac.py, the actions sampled at s' (TD target and the CQL term's s' samples) are
conditioned on a beta drawn from the balance model at s, offline too; the actor loss and the CQL
term's actions at s use the per-sample beta (uniform offline).

FamO2O-IQL's per-sample beta: the official JAX learner multiplies a (B,) beta by a (B, 1) advantage,
which broadcasts to a (B, B) weight matrix (every action weighted by every sample's beta) - an
accident of shapes. orl keeps the paper's per-sample form exp(beta_i A_i), so each beta_i weights
its own sample.

Where orl's FamO2O-IQL follows family_learner.py / family_actor.py: pi_b is updated every step (balance_every=1;
orl's earlier default 5 came from third-party locomotion ports and has no official source; the committed
results/famo2o runs used it); the action a_b ~ pi_u in the balance loss is the unclamped Gaussian sample (the
official `dist.sample`; clamping it to [-1, 1] would zero dQ/dbeta in every clipped dimension); the universal
policy's log-std lies in [-5, 2] (family_learner.py's log_std_min=-5), pi_b's in [-10, 2] (policy.py's default).

Acting (collection and evaluation) uses the deterministic balance beta = map(tanh(mean)); collection
samples the action from pi_u, evaluation takes its mode. The mapping (u+1)/2 is used for every base;
the official CQL version maps x*(hi-lo)+lo, which leaves the offline range (a known bug), so this
deliberately deviates from it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orl.agents.awac import AWAC, AWACConfig
from orl.agents.cql import CQL, CQLConfig
from orl.agents.iql import IQL, IQLConfig
from orl.agents.sac import initialize, tanh_actor
from orl.errors import ConfigError
from orl.agent import Agent, build_config, register
from orl.buffer import Batch
from orl.nn import GaussianActor, cosine_to_floor, evaluating, frozen, make_optimizer, mlp, soft_update


def sinusoidal_embedding(beta: torch.Tensor, dim: int = 6, base: float = 10000.0) -> torch.Tensor:
    """emb[2i] = sin(beta / base^(2i/dim)), emb[2i+1] = cos(beta / base^(2i/dim)); beta (B,) -> (B, dim)."""
    exponents = torch.arange(dim // 2, device=beta.device, dtype=beta.dtype) * 2.0 / dim
    angles = beta.unsqueeze(-1) / base**exponents
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


# balance_diagnostics' extra forward passes cost ~10% of an update: run them at most every 100 updates and report the
# latest in between (at most 100 updates old; the trainer logs every 1000 steps, every 100 around the switch).
DIAGNOSTICS_EVERY = 100


class BalanceModel(nn.Module):
    """pi_b(beta | s): tanh-squashed Gaussian over a scalar u in (-1, 1), mapped to [lo, hi]."""

    LOG_STD_BOUNDS = (-10.0, 2.0)  # official NormalTanhPolicy's defaults (no log_std_min given for pi_b)

    def __init__(self, obs_dim: int, hidden: tuple[int, ...], lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = lo, hi
        self.mean = mlp(obs_dim, 1, hidden)
        self.log_std = nn.Parameter(torch.zeros(1))  # state-independent, as in the IQL version

    def bounded_log_std(self) -> torch.Tensor:
        return self.log_std.clamp(*self.LOG_STD_BOUNDS)

    def to_beta(self, u: torch.Tensor) -> torch.Tensor:
        return self.lo + (u + 1.0) * 0.5 * (self.hi - self.lo)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reparameterized beta (B,) and log pi_b(u|s) (B,)."""
        mean = self.mean(obs).squeeze(-1)
        log_std = self.bounded_log_std()
        pre_tanh = mean + log_std.exp() * torch.randn_like(mean)
        u = torch.tanh(pre_tanh)
        log_prob = (-0.5 * ((pre_tanh - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
                    - 2.0 * (math.log(2.0) - pre_tanh - nn.functional.softplus(-2.0 * pre_tanh)))
        return self.to_beta(u), log_prob

    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        return self.to_beta(torch.tanh(self.mean(obs).squeeze(-1)))


class ConditionedActor(nn.Module):
    """The universal policy: the base's actor class on [s, emb(beta)], with beta set per batch.

    The base agent keeps calling actor(obs), actor.sample(obs), actor.log_prob(obs, a) unchanged. When
    the base tiles observations (CQL's obs.repeat(n, 1)), beta is tiled the same way.
    """

    def __init__(self, actor: nn.Module, embedding_dim: int, embedding_base: float):
        super().__init__()
        self.actor, self.embedding_dim, self.embedding_base = actor, embedding_dim, embedding_base
        self.beta: torch.Tensor | None = None

    def bounded_log_std(self) -> torch.Tensor:  # the wrapped Gaussian's, for the base's metrics
        return self.actor.bounded_log_std()

    def condition(self, obs: torch.Tensor) -> torch.Tensor:
        beta = self.beta
        if beta is None:
            raise RuntimeError("set ConditionedActor.beta before calling the universal policy")
        if beta.shape[0] != obs.shape[0]:
            beta = beta.repeat(obs.shape[0] // beta.shape[0])
        return torch.cat([obs, sinusoidal_embedding(beta, self.embedding_dim, self.embedding_base)], -1)

    def forward(self, obs: torch.Tensor, deterministic: bool = True) -> torch.Tensor:
        return self.actor(self.condition(obs), deterministic)

    def sample(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor.sample(self.condition(obs))

    def log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.actor.log_prob(self.condition(obs), action)

    def reparameterized_action(self, obs: torch.Tensor, clamp: bool = False) -> torch.Tensor:
        if isinstance(self.actor, GaussianActor):
            action = self.actor.distribution(self.condition(obs)).rsample()  # unclamped, as the official balance loss
            return action.clamp(-self.actor.max_action, self.actor.max_action) if clamp else action
        return self.actor.sample(self.condition(obs))[0]


@dataclass
class FamO2OConfig:
    """The balance layer's options; each registered FamO2O agent has its own defaults (FamO2O*Config below)."""

    base: Any = field(default_factory=dict)  # the base agent's config (its dataclass), or a mapping that overrides the family's
    beta_lo: float = 1.0
    beta_hi: float = 5.0
    embedding_dim: int = 6
    embedding_base: float = 10000.0
    balance_hidden: tuple[int, ...] = (256, 256)
    balance_lr: float = 3e-4
    temperature_lr: float = 3e-4
    init_temperature: float = 1.0
    target_entropy: float = -0.5  # -dim(beta)/2
    balance_entropy: bool = True  # alpha_b log pi_b in the balance loss, alpha_b tuned to target_entropy (official IQL; CQL: none)
    balance_every: int = 1  # update pi_b every k steps (official: every step; results/famo2o's FamO2O-IQL runs used 5)


@dataclass
class FamO2OIQLConfig(FamO2OConfig):
    """FamO2O on IQL (Wang et al., NeurIPS 2023; LeapLabTHU/FamO2O jax_iql).
    The official code has one config (AntMaze: beta_lo=8 beta_hi=14 agent.base.expectile=0.9); for locomotion
    orl takes the FamilyLearner defaults (beta in [1, 5]) and IQL's locomotion expectile 0.7.
    base.beta is not used: the family's per-sample beta is the advantage weight's inverse temperature."""

    base: IQLConfig = field(default_factory=lambda: IQLConfig(cosine_actor_lr=False))  # the family config keeps the actor lr constant
    beta_lo: float = 1.0  # [1, 5]: the official FamilyLearner's default range (its one config, AntMaze, sets [8, 14])
    beta_hi: float = 5.0


@dataclass
class FamO2OAWACConfig(FamO2OConfig):
    """FamO2O on AWAC: paper only, no released code -> experimental (Wang et al., NeurIPS 2023). beta = 1/lambda.
    base.awac_lambda is not used: the family's per-sample beta replaces 1/lambda."""

    base: AWACConfig = field(default_factory=AWACConfig)  # CORL's AWAC
    beta_lo: float = 0.5  # no official value; [0.5, 3] brackets AWAC's own beta = 1/lambda = 1 (IQL's [1, 5] starts at it)
    beta_hi: float = 3.0


@dataclass
class FamO2OCQLConfig(FamO2OConfig):
    """FamO2O on CQL, official locomotion settings (LeapLabTHU/FamO2O jax_cql): beta in [0.5, 1.5] multiplies the
    actor's Q term; CQL alpha 1.0 without Lagrange; lr 3e-4 everywhere; no entropy term in the balance loss.
    (LeapLabTHU/FamO2O jax_cql: finetune_configs/family.py over JaxCQL's ConservativeSAC defaults; the temperature's
    optimizer uses the policy lr, 3e-4, and there is no max-target-backup.) The policies' log-std is JaxCQL's
    m * raw + b (learnt, from 1 and -1) clipped to [-20, 2] (hierarchical_policy.py FamilyTanhGaussianPolicy).
    Known difference: with its orthogonal_init=False, JaxCQL draws hidden kernels lecun-normal and the heads
    variance_scaling(1e-2, fan_in, uniform); orl keeps PyTorch's default init here."""

    base: CQLConfig = field(default_factory=lambda: CQLConfig(  # official: lr 3e-4 (policy, Q, temperature), alpha 1, no max-backup
        actor_lr=3e-4, alpha_lr=3e-4, cql_alpha=1.0, max_target_backup=False, actor_log_std_bounds=(-20.0, 2.0), actor_log_std_offset=-1.0))
    beta_lo: float = 0.5  # official coefficient_range (0.5, 1.5)
    beta_hi: float = 1.5
    balance_entropy: bool = False  # official: the balance loss is -min Q, no entropy term


class FamO2O(Agent):
    """Balance layer; subclasses name the base agent class."""

    Config = FamO2OConfig
    base_class: type[Agent] = IQL
    clamp_balance_actions = False  # score Q at a_b as sampled (official IQL version) or clamped to the action box

    def __init__(self, obs_space, action_space, cfg: FamO2OConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        if not cfg.beta_lo < cfg.beta_hi:
            raise ValueError(f"need beta_lo < beta_hi, got [{cfg.beta_lo}, {cfg.beta_hi}]")
        # The family's base defaults (its Config's `base`), overridden by what cfg.base gives (a dataclass or a mapping).
        family, given = self.Config().base, cfg.base
        base_cfg = build_config(self.base_class, {**(dataclasses.asdict(family) if dataclasses.is_dataclass(family) else dict(family)),
                                                  **(dataclasses.asdict(given) if dataclasses.is_dataclass(given) else dict(given))})
        self.base = self.base_class(obs_space, action_space, base_cfg, device)
        if self.base.needs_returns_to_go:  # the official FamO2O has no calibrated base; its buffers carry no MC returns
            raise ConfigError(f"agent {self.name} does not support a calibrated (Cal-QL) base: set agent.base.calibrated=false")
        self.base.nets["actor"] = ConditionedActor(self._universal_policy(base_cfg), cfg.embedding_dim, cfg.embedding_base).to(self.device)
        actor_lr = base_cfg.actor_lr
        self.base.optimizers["actor"] = make_optimizer(self.base.nets["actor"].parameters(), actor_lr)
        self.base.schedulers.pop("actor", None)
        if getattr(base_cfg, "cosine_actor_lr", False):
            self.base.schedulers["actor"] = cosine_to_floor(self.base.optimizers["actor"], base_cfg.actor_lr_decay_steps)
        # One ModuleDict / optimizer dict, so state_dict covers base and balance layer together.
        self.nets, self.optimizers, self.schedulers = self.base.nets, self.base.optimizers, self.base.schedulers
        self.nets["balance"] = BalanceModel(self.obs_dim, cfg.balance_hidden, cfg.beta_lo, cfg.beta_hi).to(self.device)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(cfg.init_temperature), device=self.device))
        self.optimizers["balance"] = make_optimizer(self.nets["balance"].parameters(), cfg.balance_lr)
        self.optimizers["temperature"] = make_optimizer([self.log_temperature], cfg.temperature_lr)
        self.online = False
        self._last_balance_metrics: dict[str, torch.Tensor] = {}
        self._diagnostics: dict[str, torch.Tensor] = {}
        self._diagnostics_step = 0

    def _universal_policy(self, base_cfg) -> nn.Module:
        in_dim = self.obs_dim + self.cfg.embedding_dim
        base_actor = self.base.nets["actor"]
        if isinstance(self.base, CQL):
            actor = tanh_actor(in_dim, self.action_dim, self.max_action, base_cfg)
            initialize(actor, base_cfg)
            return actor
        return GaussianActor(in_dim, self.action_dim, base_cfg.hidden, self.max_action, getattr(base_cfg, "actor_dropout", 0.0),
                             log_std_bounds=base_actor.log_std_bounds,  # the base's (IQL: -5, as family_learner.py)
                             init_log_std=getattr(base_cfg, "actor_init_log_std", 0.0), tanh_mean=base_actor.tanh_mean)

    @property
    def balance_critic(self) -> nn.Module:
        return self.nets["critic"]

    def on_online_start(self, **context: Any) -> None:
        self.online = True
        self.base.on_online_start(**context)

    def draw_betas(self, obs: torch.Tensor) -> torch.Tensor:
        """Uniform offline; from the (pre-update) balance model online. No gradient."""
        with torch.no_grad():
            if self.online:
                return self.nets["balance"].sample(obs)[0]
            return torch.empty(obs.shape[0], device=self.device).uniform_(self.cfg.beta_lo, self.cfg.beta_hi)

    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        self.step += 1
        beta = self.draw_betas(batch.obs)
        metrics = self.base_update(batch, beta)
        # The betas the universal policy was trained on this step (uniform offline, pi_b's samples online).
        quantiles = torch.quantile(beta, beta.new_tensor([0.1, 0.5, 0.9]))
        metrics.update(beta_mean=beta.mean(), beta_q10=quantiles[0], beta_q50=quantiles[1], beta_q90=quantiles[2])
        if self.online:
            metrics["hist/beta"] = beta
        return metrics

    def base_update(self, batch: Batch, beta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Base step with per-sample betas, then the balance step (AWAC, CQL)."""
        self.nets["actor"].beta = beta
        metrics = self.base.update(batch)
        if self.step % self.cfg.balance_every == 0:
            self._last_balance_metrics = self.balance_step(batch)
        return {**metrics, **self._last_balance_metrics}

    def balance_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """E[alpha_b log pi_b(u|s) - min_i Q_i(s, a_b)]: reaches pi_b through beta -> pi_u -> Q, updating neither.

        Also returns the sampled beta (a non-leaf that keeps its gradient: after backward, -B * beta.grad
        is dQ(s, a_b)/dbeta per sample, the signal that moves pi_b)."""
        beta, log_prob = self.nets["balance"].sample(batch.obs)
        beta.retain_grad()
        actor = self.nets["actor"]
        actor.beta = beta
        with frozen(actor, self.balance_critic), evaluating(actor):  # official: pi_u applied with training=False
            balance_actions = actor.reparameterized_action(batch.obs, self.clamp_balance_actions)
            q = self.balance_critic(batch.obs, balance_actions).min(0).values
        if not self.cfg.balance_entropy:
            return -q.mean(), log_prob, beta
        temperature = self.log_temperature.exp().detach()
        return (temperature * log_prob - q).mean(), log_prob, beta

    def balance_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        balance_loss, log_prob, beta = self.balance_loss(batch)
        self.optimizers["balance"].zero_grad(set_to_none=True)
        balance_loss.backward()
        self.optimizers["balance"].step()
        entropy = -log_prob.detach().mean()
        if not self._diagnostics or self.step - self._diagnostics_step >= DIAGNOSTICS_EVERY:
            self._diagnostics, self._diagnostics_step = self.balance_diagnostics(batch.obs), self.step
        metrics = {"balance_loss": balance_loss.detach(), "balance_entropy": entropy,
                   "balance_dq_dbeta": -len(beta) * beta.grad.mean(), **self._diagnostics}
        if self.cfg.balance_entropy:
            temperature_loss = self.log_temperature.exp() * (entropy - self.cfg.target_entropy)
            self.optimizers["temperature"].zero_grad(set_to_none=True)
            temperature_loss.backward()
            self.optimizers["temperature"].step()
            metrics["balance_temperature"] = self.log_temperature.exp().detach()
        return metrics

    @torch.no_grad()
    def balance_diagnostics(self, obs: torch.Tensor) -> dict[str, torch.Tensor]:
        """What pi_b chooses and what it could gain: the acting beta over the batch's states (mean, and spread
        across states), pi_b's log-std, and min_i Q(s, mode of pi_u(s, beta_hi)) - min_i Q(s, mode of
        pi_u(s, beta_lo)): how much the family's two ends differ in value at these states."""
        balance, actor = self.nets["balance"], self.nets["actor"]
        acting_beta = balance.deterministic(obs)
        q_at = {}
        with evaluating(actor):  # no dropout: the diagnostics draw no random numbers, so training is the same without them
            for end, value in (("hi", self.cfg.beta_hi), ("lo", self.cfg.beta_lo)):
                actor.beta = torch.full_like(acting_beta, value)
                q_at[end] = self.balance_critic(obs, actor(obs, True)).min(0).values
        return {"balance_beta_mean": acting_beta.mean(), "balance_beta_std": acting_beta.std(),
                "balance_log_std": balance.bounded_log_std().squeeze(),
                "balance_q_gap": (q_at["hi"] - q_at["lo"]).mean()}

    @torch.no_grad()
    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        self.nets["actor"].beta = self.nets["balance"].deterministic(obs)  # deterministic beta, collection and evaluation
        return self.nets["actor"](obs, deterministic)

    def extra_state(self) -> dict[str, Any]:
        return {"log_temperature": self.log_temperature.detach().cpu(), "online": self.online, "base": self.base.extra_state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "log_temperature" in state:
            with torch.no_grad():
                self.log_temperature.copy_(state["log_temperature"].to(self.device))
        self.online = bool(state.get("online", False))
        self.base.load_extra_state(state.get("base", {}))


@register("famo2o_iql")
class FamO2OIQL(FamO2O):
    Config = FamO2OIQLConfig
    base_class = IQL

    @property
    def balance_critic(self) -> nn.Module:
        return self.nets["critic_target"]  # the IQL version's balance loss uses the target critic

    def base_update(self, batch: Batch, beta: torch.Tensor) -> dict[str, torch.Tensor]:
        base = self.base
        base.step += 1
        target_q, new_value, next_value, metrics = base.value_step(batch)  # (1)
        if self.step % self.cfg.balance_every == 0:
            self._last_balance_metrics = self.balance_step(batch)  # (2) + (3)
        metrics.update(self._last_balance_metrics)
        self.nets["actor"].beta = beta
        metrics.update(base.actor_step(batch.obs, batch.actions, target_q - new_value, beta))  # (4): beta inside exp(beta * A)
        metrics.update(base.critic_step(batch, next_value))  # (5)
        soft_update(self.nets["critic_target"], self.nets["critic"], base.cfg.tau)  # (6)
        return metrics


@register("famo2o_awac")
class FamO2OAWAC(FamO2O):
    """Experimental: the paper's AWAC variant has no released code."""

    Config = FamO2OAWACConfig
    base_class = AWAC
    clamp_balance_actions = True  # no official code; AWAC itself scores Q only at clamped samples

    def base_update(self, batch: Batch, beta: torch.Tensor) -> dict[str, torch.Tensor]:
        self.base.beta = beta  # AWAC's weight becomes exp(beta_i * A)
        return super().base_update(batch, beta)


class BalancedNextCQL(CQL):
    """CQL whose actions at s' are conditioned on `next_beta` (the balance model's beta at s)."""

    next_beta: torch.Tensor | None = None

    def sample_next_actions(self, next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actor = self.nets["actor"]
        beta, actor.beta = actor.beta, self.next_beta if self.next_beta is not None else actor.beta
        try:
            return actor.sample(next_obs)
        finally:
            actor.beta = beta


@register("famo2o_cql")
class FamO2OCQL(FamO2O):
    Config = FamO2OCQLConfig
    base_class = BalancedNextCQL

    def base_update(self, batch: Batch, beta: torch.Tensor) -> dict[str, torch.Tensor]:
        self.base.q_weight = beta  # actor loss alpha log pi_u - beta * min_i Q_i
        with torch.no_grad():
            # Online, `beta` already is the balance model's sample at s; offline it is uniform.
            self.base.next_beta = beta if self.online else self.nets["balance"].sample(batch.obs)[0]
        return super().base_update(batch, beta)
