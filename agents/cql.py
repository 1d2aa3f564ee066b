"""CQL(H) with importance sampling (Kumar et al., 2020) and Cal-QL (Nakamoto et al., 2023), on SAC.

Critic, for each ensemble member Q_i (as nakamotoo/Cal-QL JaxCQL/conservative_sac.py), with N samples each of
  a_u ~ U[-1, 1]^|A| (log-density |A| log 0.5, in the unit box: the policy's log-probs are in unit tanh
  space, so both densities are measured there whatever the env's action bound),
  a_s ~ pi(.|s),  a_s' ~ pi(.|s'),  all evaluated at s:
  LSE_i(s) = T * logsumexp_k ( (Q_i(s, a_k) - log density_k) / T )          over the 3N samples
  L_Qi     = E (Q_i(s,a) - y)^2 + alpha_cql * E( LSE_i(s) - Q_i(s,a) )
  y        = r + gamma (1-d) min_j Q_j_targ(s', a'),  a' ~ pi(.|s')  (max over N a' with max-target-backup)
Cal-QL replaces Q_i(s, a_s) and Q_i(s, a_s') by max(Q_i, V_mu(s)) before the logsumexp, where V_mu is
the discounted Monte-Carlo return-to-go of s's trajectory; uniform actions are not bounded.
Lagrange variant: alpha_cql = exp(log_alpha') is tuned so that E(LSE - Q) ~= target_action_gap.
Actor and temperature: SAC's (agents/sac.py).

Ensembles with a target subsample (WSRL's 10 members, 2 in the target): as in the official code
(`_get_cql_q_diff` indexes the sampled-action Qs and the data Q by 2 randomly drawn members), the
penalty applies to those 2 members only, with the official weighting mean_i TD_i + alpha mean_j gap_j
(written here as sum_i TD_i + alpha E mean_j gap_j, identical to the usual sum when no members are
subsampled); `cql_penalty_members=all` penalizes every member instead.
Defaults follow the official Cal-QL (nakamotoo/Cal-QL) and WSRL (zhouzypaul/wsrl) configs:
max-target-backup on, temperature lr 1e-4 (Cal-QL's alpha optimizer uses the policy lr).
Networks: Cal-QL builds JaxCQL's (orthogonal(sqrt 2) hidden kernels, orthogonal(1e-2) heads, zero biases; the
policy's log-std m * raw + b with learnt m, b from 1, -1, clipped to [-20, 2]); the WSRL recipe
(configs/agent/wsrl.yaml) builds WSRL's (orthogonal, its last hidden layer at 1e-2, std clipped to [1e-5, 10]).
Plain `cql` keeps PyTorch's default init; `orthogonal_init=true head_scale=0.01` gives JaxCQL's.

Online, `online_cql=False` turns the regularizer off, leaving SAC: WSRL's fine-tuning agent when the
critic is a 10-member LayerNorm ensemble with a 2-member target subsample.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from orl.agents.sac import SAC, SACConfig
from orl.agent import register
from orl.buffer import Batch, TransitionBuffer
from orl.nn import make_optimizer, soft_update


@dataclass
class CQLConfig(SACConfig):
    """CQL(H) with importance sampling (Kumar et al. 2020); WSRL's locomotion settings (alpha 5, no Lagrange).
    AntMaze: cql_lagrange=true target_action_gap=0.8 max_target_backup=true critic_hidden=[256,256,256,256]."""

    actor_lr: float = 1e-4
    backup_entropy: bool = False
    cql_alpha: float = 5.0
    cql_n_actions: int = 10
    cql_temperature: float = 1.0
    cql_lagrange: bool = False
    target_action_gap: float = 0.8
    cql_alpha_lr: float = 3e-4
    cql_penalty_members: str = "subsample"  # subsample: the target_subsample members (official WSRL) | all
    alpha_lr: float = 1e-4  # entropy temperature (official: the policy lr)
    max_target_backup: bool = True  # official Cal-QL and WSRL configs
    online_max_target_backup: bool | None = None  # None: as offline. WSRL locomotion: on in pre-training, off online
    online_cql: bool = True  # False: plain SAC after the switch (WSRL)
    calibrated: bool = False  # Cal-QL
    calibrate_online: bool = True  # official Cal-QL keeps calibration on; CORL switches it off
    failure_reward: float | None = None  # sparse tasks (AntMaze: -5): all-failure trajectories get V_mu = r / (1 - gamma)


@dataclass
class CalQLConfig(CQLConfig):
    """Cal-QL (Nakamoto et al. 2023): CQL with the MC-return bound on policy-action Q (nakamotoo/Cal-QL).
    Online: orl-finetune agent=calql online.buffer_mode=mix online.offline_ratio=0.5 online.update_schedule=episode
    (the official loop: a trajectory, then len x utd updates; calibration stays on; CORL: calibrate_online=false).
    AntMaze: cql_lagrange=true target_action_gap=0.8 max_target_backup=true critic_hidden=[256,256,256,256]
      data.reward=scale_shift data.reward_scale=10 data.reward_shift=-5 agent.failure_reward=-5."""

    calibrated: bool = True  # Cal-QL always calibrates (the agent sets it whatever is given)
    # JaxCQL's networks, which official Cal-QL runs with (conservative_sac_main.py orthogonal_init=True,
    # policy_log_std_offset=-1; model.py: log-std clipped to [-20, 2])
    orthogonal_init: bool = True
    head_scale: float | None = 1e-2
    actor_log_std_bounds: tuple[float, float] = (-20.0, 2.0)
    actor_log_std_offset: float | None = -1.0


@register("cql")
class CQL(SAC):
    Config = CQLConfig

    def __init__(self, obs_space, action_space, cfg: CQLConfig, device="cpu"):
        if cfg.cql_penalty_members not in ("subsample", "all"):
            raise ValueError(f"cql_penalty_members must be subsample or all, got {cfg.cql_penalty_members!r}")
        super().__init__(obs_space, action_space, cfg, device)
        self.log_cql_alpha = nn.Parameter(torch.tensor(math.log(max(cfg.cql_alpha, 1e-8)), device=self.device))
        if cfg.cql_lagrange:
            self.optimizers["cql_alpha"] = make_optimizer([self.log_cql_alpha], cfg.cql_alpha_lr)
        self.regularize = True
        self.calibrate = cfg.calibrated
        self.max_backup = cfg.max_target_backup

    @property
    def needs_returns_to_go(self) -> bool:  # Cal-QL's V_mu, for the calibrated penalty only
        return bool(self.cfg.calibrated)

    def make_offline_buffer(self, dataset, *, raw_dataset, batch_size: int, online_steps: int) -> TransitionBuffer:
        if not self.needs_returns_to_go:
            return super().make_offline_buffer(dataset, raw_dataset=raw_dataset, batch_size=batch_size, online_steps=online_steps)
        returns = dataset.returns_to_go(self.cfg.discount)
        if self.cfg.failure_reward is not None:
            episode_id = dataset.episode_ids()
            failed = np.bincount(episode_id, weights=(dataset.rewards != self.cfg.failure_reward).astype(np.float64)) == 0
            returns[failed[episode_id]] = self.cfg.failure_reward / (1.0 - self.cfg.discount)
        return TransitionBuffer.from_dataset(dataset, self.device, returns)

    def on_episode_end(self, *, buffer: TransitionBuffer, start: int, end: int, **context: Any) -> None:
        super().on_episode_end(buffer=buffer, start=start, end=end, **context)
        if not self.needs_returns_to_go:
            return
        rewards = buffer.storage["rewards"][start:end]
        discount = float(self.cfg.discount)
        powers = discount ** torch.arange(end - start, device=rewards.device, dtype=torch.float64)
        # G_t = sum_k gamma^k r_{t+k}: a reversed cumulative sum of gamma^t r_t, divided by gamma^t.
        returns = torch.flip(torch.cumsum(torch.flip(powers * rewards.double(), [0]), 0), [0]) / powers
        if self.cfg.failure_reward is not None and bool((rewards == self.cfg.failure_reward).all()):
            returns = torch.full_like(returns, self.cfg.failure_reward / (1.0 - discount))
        buffer.storage["returns_to_go"][start:end] = returns.float()

    def on_online_start(self, **context: Any) -> None:
        super().on_online_start(**context)
        cfg = self.cfg
        self.regularize = cfg.online_cql
        self.calibrate = cfg.calibrated and cfg.calibrate_online
        self.max_backup = cfg.max_target_backup if cfg.online_max_target_backup is None else cfg.online_max_target_backup

    def td_target(self, batch: Batch) -> torch.Tensor:
        cfg = self.cfg
        if not self.max_backup:
            return super().td_target(batch)
        with torch.no_grad():
            n, size = cfg.cql_n_actions, len(batch)
            next_obs = batch.next_obs.repeat(n, 1)
            next_actions, next_log_prob = self.sample_next_actions(next_obs)
            target_q = self.nets["critic_target"](next_obs, next_actions, self.target_members())  # (E or subsample, n*B)
            target_q = target_q.min(0).values.view(n, size)
            best = target_q.argmax(0)
            target_q = target_q.gather(0, best[None]).squeeze(0)
            if cfg.backup_entropy:
                target_q = target_q - self.alpha * next_log_prob.view(n, size).gather(0, best[None]).squeeze(0)
            return batch.rewards + cfg.discount * (1.0 - batch.terminals) * target_q

    def penalized_members(self) -> torch.Tensor | None:
        """Members the penalty applies to: a fresh draw of `target_subsample` (official WSRL), None for all."""
        return None if self.cfg.cql_penalty_members == "all" else self.target_members()

    def conservative_penalty(self, batch: Batch, q_data: torch.Tensor, members: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """E(LSE_i(s) - Q_i(s,a)) per penalized member, with Cal-QL's bound on policy actions when calibrating.

        `q_data` is (E, B); `members` picks the penalized ones (default all): the result is (len(members),).
        """
        cfg, size, n = self.cfg, len(batch), self.cfg.cql_n_actions
        obs = batch.obs.repeat(n, 1)
        with torch.no_grad():
            # Uniform over the env's box; its density is measured in the unit box (see module docstring).
            random_actions = torch.empty(n * size, self.action_dim, device=self.device).uniform_(-self.max_action, self.max_action)
            policy_actions, policy_log_prob = self.nets["actor"].sample(obs)
            next_actions, next_log_prob = self.sample_next_actions(batch.next_obs.repeat(n, 1))
        # One critic pass over all 3N samples (evaluated at s).
        # Only the penalized members are evaluated (the official code evaluates all, then indexes).
        q_samples = self.nets["critic"](obs.repeat(3, 1), torch.cat([random_actions, policy_actions, next_actions]), members)
        if members is not None:
            q_data = q_data[members]
        q_random, q_policy, q_next = q_samples.view(q_samples.shape[0], 3, n, size).unbind(1)  # each (E, n, B)
        metrics: dict[str, torch.Tensor] = {}
        if self.calibrate:
            bound = batch.returns_to_go.view(1, 1, size)
            metrics["calql_bound_frac"] = (q_policy < bound).float().mean().detach()
            q_policy = torch.maximum(q_policy, bound)
            q_next = torch.maximum(q_next, bound)
        random_log_density = self.action_dim * math.log(0.5)
        stacked = torch.cat([
            q_random - random_log_density,
            q_policy - policy_log_prob.view(1, n, size),
            q_next - next_log_prob.view(1, n, size),
        ], dim=1)  # (E, 3n, B)
        lse = cfg.cql_temperature * torch.logsumexp(stacked / cfg.cql_temperature, dim=1)  # (E, B)
        gap = (lse - q_data).mean(1)  # (E,)
        metrics["cql_gap"] = gap.detach().mean()
        return gap, metrics

    def critic_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        target = self.td_target(batch)
        q = self.nets["critic"](batch.obs, batch.actions)  # (E, B)
        td_loss = (q - target).pow(2).mean(1)  # (E,)
        metrics: dict[str, torch.Tensor] = {"q_mean": q.detach().mean(), "td_loss": td_loss.detach().mean()}
        loss = td_loss.sum()
        if self.regularize:
            gap, penalty_metrics = self.conservative_penalty(batch, q, self.penalized_members())
            metrics.update(penalty_metrics)
            # Official weighting: mean over members of TD + alpha * mean over penalized members of the
            # gap; scaled by E to keep the sum-over-members TD form (equal to sum_i when all are penalized).
            members = q.shape[0]
            if cfg.cql_lagrange:
                cql_alpha = self.log_cql_alpha.exp().clamp(0.0, 1e6)
                loss = loss + members * (cql_alpha.detach() * (gap - cfg.target_action_gap)).mean()
                alpha_loss = -(cql_alpha * (gap.detach() - cfg.target_action_gap)).mean()
                self.optimizers["cql_alpha"].zero_grad(set_to_none=True)
                alpha_loss.backward()
                self.optimizers["cql_alpha"].step()
                metrics["cql_alpha"] = cql_alpha.detach()
            else:
                loss = loss + members * cfg.cql_alpha * gap.mean()
        self.optimizers["critic"].zero_grad(set_to_none=True)
        loss.backward()
        self.optimizers["critic"].step()
        soft_update(self.nets["critic_target"], self.nets["critic"], cfg.tau)
        metrics["critic_loss"] = loss.detach()
        return metrics

    def extra_state(self) -> dict:
        return {**super().extra_state(), "log_cql_alpha": self.log_cql_alpha.detach().cpu(), "regularize": self.regularize,
                "calibrate": self.calibrate, "max_backup": self.max_backup}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        if "log_cql_alpha" in state:
            with torch.no_grad():
                self.log_cql_alpha.copy_(state["log_cql_alpha"].to(self.device))
        self.regularize = bool(state.get("regularize", True))
        self.calibrate = bool(state.get("calibrate", self.cfg.calibrated))
        self.max_backup = bool(state.get("max_backup", self.cfg.max_target_backup))


@register("calql")
class CalQL(CQL):
    """Cal-QL: CQL whose penalty cannot push policy-action Q below the behaviour value V_mu(s).

    V_mu(s) is the discounted Monte-Carlo return-to-go of s's trajectory: computed once for the offline data
    (`CQL.make_offline_buffer`) and for each online episode when it ends (`CQL.on_episode_end`), as the
    official code's `calc_return_to_go` does for both. With `failure_reward` set (sparse tasks), a trajectory
    made only of that reward gets failure_reward / (1 - gamma) at every step, the value of failing forever.
    """

    Config = CalQLConfig

    def __init__(self, obs_space, action_space, cfg: CQLConfig, device="cpu"):
        cfg = dataclasses.replace(cfg, calibrated=True)  # a copy: the caller's config stays as it was given
        super().__init__(obs_space, action_space, cfg, device)
