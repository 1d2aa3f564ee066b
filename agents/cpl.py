"""Contrastive Preference Learning (Hejna et al., ICLR 2024): a policy learned from segment preferences
directly, with no reward model and no RL. Checked against the official code (jhejna/cpl,
research/algs/cpl.py, cpl_kl.py, utils/schedules.py, configs/mw_state_dense/); where the spec and it
differ, the official code is followed.

With the policy's log-likelihood l_t = log pi(a_t | s_t) (CPL-KL: l_t = log pi - log pi_ref, pi_ref the
frozen BC policy), a segment's score is S(sigma) = alpha * sum_t gamma^t l_t (gamma = 1 in the official
code, the default here). With y = P(segment 1 preferred) and lambda in (0, 1] (the "contrastive bias",
which scales only the dispreferred segment's score):

    L_CPL = y * softplus(-(S_1 - lambda S_2)) + (1 - y) * softplus(-(S_2 - lambda S_1))     (two-term form)
    L     = L_CPL + bc_coef * E[-l_t]   over all segments, or only the preferred ones     (BC regularizer)

Scored segments (`orl-prefs label --scores`: each segment with a score, its return), in the official
loader's two modes (`agent.score_mode`). "rank", the official dense state-based configs: each segment of the
batch is compared with one drawn at random, labelled by the higher score (0.5 on equal scores), and the
pairwise loss above applies. "score" (official biased_bce_with_scores): B distinct segments sorted by
score, every pair i < j a comparison with j preferred, the loss the mean over the B (B - 1) / 2 pairs of
softplus(-(S_j - lambda S_i)). The official code divides that sum by the number of pairs whose loss is not
exactly 0 (its upper-triangle mask), which also drops pairs whose float32 loss underflows to 0 (logit above
~17) and so rescales the loss as the policy gets them right; orl divides by the number of pairs. Equal
scores are ordered by the (stable) sort, as the official argsort does; the BC term uses all segments.
Batches are drawn with replacement (orl's sampler) where the official loader walks a permutation.

Schedule (official): BC alone for the first `bc_steps` steps at the constant rate `lr`; at the switch the
optimizer is rebuilt (no moments carried over), CPL-KL freezes the current policy as its reference, and
the rate warms up linearly, lr * lr_multiplier * min(1, (t - bc_steps + 1) / lr_warmup_steps), the
official `linear_warmup` LambdaLR started at the switch and stepped once before the first CPL update.
The one difference: with bc_steps = 0 the official code never starts its schedule (constant lr), orl
starts it at step 0, so the two phases always behave the same way.

The official configs use a deterministic tanh MLP, 512-512, dropout 0.25 (off at evaluation), with the
unit-variance shortcut log pi = -||pi(s) - a||^2 (`deterministic=true`, the default here), batches of
96 segments of length 64, and BC for 200k of 500k steps. Orthogonal initialization is not used (orl's
MLP initialization is PyTorch's default). `deterministic=false` uses IQL's Gaussian instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from orl.agent import Agent, register
from orl.errors import ConfigError
from orl.nn import DeterministicActor, GaussianActor, make_optimizer
from orl.prefs.buffers import SegmentPairBatch, SegmentPairBuffer, SegmentScoreBatch, SegmentScoreBuffer
from orl.prefs.labels import SegmentScores, load_segment_labels


def cpl_loss(score_1: torch.Tensor, score_2: torch.Tensor, label: torch.Tensor, contrastive_bias: float = 1.0) -> torch.Tensor:
    """The CPL(lambda) loss above; label = P(segment 1 preferred)."""
    prefer_1 = F.softplus(-(score_1 - contrastive_bias * score_2))
    prefer_2 = F.softplus(-(score_2 - contrastive_bias * score_1))
    return (label * prefer_1 + (1 - label) * prefer_2).mean()


def cpl_rank_loss(score: torch.Tensor, target: torch.Tensor, contrastive_bias: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The score-mode loss above for B segments: (loss, accuracy), accuracy = share of pairs ordered as the targets."""
    ranked = score[torch.argsort(target, stable=True)]                          # ascending target: j > i is preferred
    logits = ranked.unsqueeze(0) - contrastive_bias * ranked.unsqueeze(1)       # [i, j] = S_j - lambda S_i
    pairs = torch.ones_like(logits, dtype=torch.bool).triu(diagonal=1)
    loss = F.softplus(-logits)[pairs].mean()
    with torch.no_grad():
        accuracy = (ranked.unsqueeze(0) > ranked.unsqueeze(1))[pairs].float().mean()
    return loss, accuracy


@dataclass
class CPLConfig:
    """Contrastive Preference Learning (agents/cpl.py): trains on labelled segment pairs, agent.preferences=<orl-prefs label file>.
      orl-train agent=cpl dataset=orl/hopper/medium-replay-v0 agent.preferences=prefs.npz batch_size=96
    Defaults: the official MetaWorld state-dense config (jhejna/cpl configs/mw_state_dense/cpl.yaml), with BC
    pre-training for 40% of the run as there (200k of 500k steps; 12k of orl-train's default 30k).
    CPL+BC (official cpl_bc.yaml): agent.contrastive_bias=1.0 agent.bc_coef=1.0"""

    hidden: tuple[int, ...] = (512, 512)
    lr: float = 1e-4
    alpha: float = 0.1             # temperature: S = alpha * sum log pi
    contrastive_bias: float = 0.5  # lambda in (0, 1]; 1 = the plain Bradley-Terry form
    discount: float = 1.0          # gamma in the segment score (the official code sums undiscounted)
    bc_coef: float = 0.0           # weight of -log pi on the segments' own actions
    bc_data: str = "all"           # "all" segments or only the "preferred" one of each pair, in the BC term
    bc_steps: int = 12_000         # BC only before this step, then CPL (official: 40% of the run; 40% of orl-train's 30k)
    lr_warmup_steps: int = 10_000  # linear LR warmup from the switch (official linear_warmup); 0 = none
    lr_multiplier: float = 1.0     # the warmup's end point as a fraction of lr (CPL-KL: 0.1)
    reference: bool = False        # CPL-KL: scores are log pi - log pi_ref, pi_ref frozen at the switch
    deterministic: bool = True     # log pi = -||pi(s) - a||^2 (the official unit-variance shortcut)
    dropout: float = 0.25          # off at evaluation (the actor is in eval mode when acting)
    preferences: str | None = None  # the label file (orl-prefs label) of segment pairs, or of scored segments (--scores)
    score_mode: str = "rank"       # scored segments: rank (each vs a random one, the official dense setting) | score (every pair of a batch)


@register("cpl")
class CPL(Agent):
    Config = CPLConfig
    data_kind = "segments"  # labelled segment pairs (agent.preferences=<orl-prefs label file>), not transitions

    def __init__(self, obs_space, action_space, cfg: CPLConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device)
        if not 0.0 < cfg.contrastive_bias <= 1.0:
            raise ConfigError(f"agent.contrastive_bias must be in (0, 1], got {cfg.contrastive_bias}")
        if cfg.bc_data not in ("all", "preferred"):
            raise ConfigError(f"agent.bc_data must be 'all' or 'preferred', got {cfg.bc_data!r}")
        if cfg.reference and cfg.bc_steps <= 0:
            raise ConfigError("agent.reference=true (CPL-KL) takes its reference from BC pre-training: set agent.bc_steps > 0")
        actor = DeterministicActor if cfg.deterministic else GaussianActor
        self.nets["actor"] = actor(self.obs_dim, self.action_dim, cfg.hidden, self.max_action, cfg.dropout).to(self.device)
        if cfg.reference:  # a net (not an attribute) so checkpoints carry it; overwritten with the BC policy at the switch
            self.nets["reference"] = actor(self.obs_dim, self.action_dim, cfg.hidden, self.max_action, cfg.dropout).to(self.device)
            self.nets["reference"].requires_grad_(False)
        self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.lr)

    def make_offline_buffer(self, dataset, *, raw_dataset, batch_size: int, online_steps: int):
        """The label file of `preferences` (pairs or scored segments), checked against the raw dataset, over the
        prepared (normalized) arrays: CPL trains on labelled segments, not transitions."""
        cfg = self.cfg
        if not cfg.preferences:
            raise ConfigError(f"agent {self.name} learns from preferences: give agent.preferences=<label file from `orl-prefs label`>")
        if online_steps > 0:
            raise ConfigError(f"agent {self.name} learns from labelled segments offline; it has no online phase (online.steps=0)")
        labels = load_segment_labels(cfg.preferences, raw_dataset)
        if not isinstance(labels, SegmentScores):
            print(f"[orl] {len(labels)} preference queries of {labels.length} steps from {cfg.preferences}")
            return SegmentPairBuffer(dataset, labels, self.device)
        if cfg.score_mode not in SegmentScoreBuffer.MODES:
            raise ConfigError(f"agent.score_mode must be one of {', '.join(SegmentScoreBuffer.MODES)}, got {cfg.score_mode!r}")
        if cfg.score_mode == "score" and batch_size > len(labels):
            raise ConfigError(f"batch_size={batch_size} distinct segments, but {cfg.preferences} scores {len(labels)}; lower batch_size")
        if cfg.score_mode == "score" and cfg.bc_data == "preferred":
            raise ConfigError("agent.bc_data=preferred needs pairs; with agent.score_mode=score no segment is the preferred one "
                              "(use agent.bc_data=all)")
        how = "each compared with a random one" if cfg.score_mode == "rank" else "every pair in a batch compared"
        print(f"[orl] {len(labels)} scored segments of {labels.length} steps from {cfg.preferences} ({how})")
        return SegmentScoreBuffer(dataset, labels, self.device, cfg.score_mode)

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor, actor: torch.nn.Module | None = None) -> torch.Tensor:
        actor = self.nets["actor"] if actor is None else actor
        if self.cfg.deterministic:
            return -(actor(obs) - actions).pow(2).sum(-1)
        return actor.log_prob(obs, actions)

    def learning_rate(self, step: int) -> float:
        """The rate of the update at `step`: lr through BC, then the warmup from the switch."""
        cfg = self.cfg
        if step < cfg.bc_steps:
            return cfg.lr
        warmup = min(1.0, (step - cfg.bc_steps + 1) / cfg.lr_warmup_steps) if cfg.lr_warmup_steps > 0 else 1.0
        return cfg.lr * cfg.lr_multiplier * warmup

    def update(self, batch: SegmentPairBatch | SegmentScoreBatch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        scored = isinstance(batch, SegmentScoreBatch)
        log_prob = self.log_prob(batch.obs, batch.actions)               # (B, 2, H) pairs, (B, H) scored segments
        if cfg.bc_data == "preferred" and not scored:  # the BC term on the preferred segment of each pair (both on a tie)
            weight = torch.stack([batch.labels >= 0.5, batch.labels <= 0.5], dim=1).float()  # (B, 2)
            bc_loss = -(log_prob.mean(-1) * weight).sum() / weight.sum()
        else:
            bc_loss = -log_prob.mean()
        advantage = log_prob
        if cfg.reference:                                                 # CPL-KL: A = alpha (log pi - log pi_ref)
            with torch.no_grad():
                self.nets["reference"].eval()
                advantage = log_prob - self.log_prob(batch.obs, batch.actions, self.nets["reference"])
        discounts = cfg.discount ** torch.arange(log_prob.shape[-1], device=log_prob.device, dtype=log_prob.dtype)
        score = cfg.alpha * (advantage * discounts).sum(-1)              # S = alpha * sum_t gamma^t A_t: (B, 2) or (B,)
        if scored:
            preference, accuracy = cpl_rank_loss(score, batch.scores, cfg.contrastive_bias)
        else:
            preference = cpl_loss(score[:, 0], score[:, 1], batch.labels, cfg.contrastive_bias)
            with torch.no_grad():
                # Over the decided pairs only (a tie, label 0.5, has no right order). A batch of ties alone has
                # no accuracy: the metric is left out of that step (a NaN would read as divergence to the Trainer).
                decided = batch.labels != 0.5
                accuracy = ((score[:, 0] > score[:, 1]) == (batch.labels > 0.5))[decided].float().mean() if bool(decided.any()) else None
        bc_phase = self.step < cfg.bc_steps
        loss = bc_loss if bc_phase else preference + cfg.bc_coef * bc_loss
        optimizer = self.optimizers["actor"]
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.step += 1
        if self.step == cfg.bc_steps:  # the switch to CPL: a fresh optimizer, the BC policy frozen as reference
            self.optimizers["actor"] = make_optimizer(self.nets["actor"].parameters(), cfg.lr)
            if cfg.reference:
                self.nets["reference"].load_state_dict(self.nets["actor"].state_dict())
        metrics = {"cpl_loss": preference.detach(), "bc_loss": bc_loss.detach(), "accuracy": accuracy,
                   "bc_phase": torch.tensor(float(bc_phase)), "lr": torch.tensor(optimizer.param_groups[0]["lr"])}
        return {k: v for k, v in metrics.items() if v is not None}

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        actor = self.nets["actor"]
        if self.cfg.deterministic:
            return actor(obs)
        return actor(obs, deterministic)


@dataclass
class CPLKLConfig(CPLConfig):
    """CPL-KL (agents/cpl.py): CPL with log pi - log pi_ref in the score, pi_ref the policy at the end of BC.
      orl-train agent=cpl_kl dataset=orl/hopper/medium-replay-v0 agent.preferences=prefs.npz batch_size=96
    Defaults: the official state-dense config (jhejna/cpl configs/mw_state_dense/cpl_kl.yaml)."""

    alpha: float = 0.2
    contrastive_bias: float = 0.75
    lr_multiplier: float = 0.1
    reference: bool = True


@register("cpl_kl")
class CPLKL(CPL):
    """CPL with log pi - log pi_ref in the score (the KL-to-reference variant), pi_ref the BC policy."""
    Config = CPLKLConfig
