"""GRPO and its family: online policy-gradient RL of a language model in the token env, with rewards from programs.

One agent, the estimators and losses of TRL's GRPOTrainer / RLOOTrainer and of verl / OpenRLHF as options:
GRPO (Shao et al., 2024, "DeepSeekMath", arXiv:2402.03300), Dr. GRPO (Liu et al., 2025, arXiv:2503.20783),
DAPO (Yu et al., 2025, arXiv:2503.14476), RLOO (Ahmadian et al., 2024, arXiv:2402.14740), ReMax (Li et al., 2023,
arXiv:2310.10505), REINFORCE++ (Hu, 2025, arXiv:2501.03262). Checked against huggingface/trl 1.16
(trainer/grpo_trainer.py `_generate_and_score_completions` and `_compute_loss`, trainer/rloo_trainer.py); the
option names are TRL's.

For each prompt x of a batch, G = `num_generations` completions y_1..y_G ~ pi_old(.|x) are sampled at temperature
T through the token env (KV cache), and scored by the reward functions: r_i = sum_k w_k R_k(x, y_i), R_k called
as TRL calls reward functions (prompts=, completions=, completion_ids=, and every other dataset column).

Advantage of completion i (shared by its tokens), `advantage`:
  grpo          A_i = (r_i - mean_G r) / (std + 1e-4), std over the group (`scale_rewards=group`), the whole batch
                (`batch`), or no division (`none`, Dr. GRPO); std is Bessel-corrected as TRL's nanstd
  rloo          A_i = r_i - mean_{j != i} r_j                       (leave-one-out, TRL's RLOOTrainer)
  remax         A_i = r_i - R(x, greedy completion)                 (one greedy rollout per prompt)
  reinforce_pp  A_i = (r_i - mean_B r) / (std_B r + 1e-4)           (REINFORCE++'s batch normalization at sequence
                level: OpenRLHF whitens per token, length-weighted, and gives each token its KL-reward-to-go)
With `kl_in_reward` (RLOO's penalty), r_i first loses beta * sum_t (log pi_old - log pi_ref)(y_i,t).

Loss, with the per-token ratio rho_t = pi(y_t | x, y_<t) / pi_old(y_t | x, y_<t) (1 with num_iterations = 1, where
only its gradient acts) and eps_high = `epsilon_high` or `epsilon`:
  l_t = -min(rho_t A_i, clip(rho_t, 1 - epsilon, 1 + eps_high) A_i) + beta * k3_t,  k3_t = e^(ref - logp) - (ref - logp) - 1
  (the k3 term only when beta > 0 and not kl_in_reward; times rho_t with `use_bias_correction_kl`, TRL's default,
  which makes its gradient the unbiased reverse-KL gradient), aggregated by `loss_type`:
  grpo      mean_i (1 / |y_i|) sum_t l_t                           bnpo  sum_{i,t} l_t / sum_i |y_i| (per micro-batch)
  dr_grpo   sum_{i,t} l_t / (B * max_completion_length)            dapo  sum_{i,t} l_t / tokens of the generation batch
  sequence  -mean_i min(rho_i A_i, clip(rho_i) A_i), rho_i = exp(sum_t log pi - log pi_old)  (TRL's RLOOTrainer)
Log-probabilities are taken at the sampling temperature (logits / T), as TRL does. `num_iterations` > 1 takes that
many optimizer steps on one generation batch, against the log-probs stored when it was sampled.

One orl step = one generation batch (batch_size prompts x num_generations completions) and num_iterations optimizer
steps on it. Under `accelerate launch` each process takes whole prompts, so a group is never split across processes.
Multi-turn environments (`env=text:<task>` or `env=textarena:<game>`, orl/text/conversation.py): a "prompt" is a
starting state (an environment seed) and a completion is a whole conversation, the agent's turns and the environment's
replies in one token sequence sampled with one KV cache; r_i is the episode's return, the loss covers the agent's tokens
only (the replies are context), and a group is G conversations from the same seed. `turn_returns=to_go` gives the tokens
of turn k the advantage of the return-to-go from turn k, normalized as above over the group's conversations that
reached turn k (a per-turn variant in the spirit of GiGPO's step-level groups, Feng et al., 2025, arXiv:2505.10978).
`agent=rloo` is this agent with RLOO's settings (advantage rloo, loss sequence, k1 penalty in the reward, beta 0.05).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from orl.agent import register
from orl.errors import ConfigError
from orl.evaluation import EvalResult
from orl.nn import evaluating
from orl.text.agent import LMAgent, LMConfig
from orl.text.data import PromptBatch, build_sequences, distinct_n, position_ids
from orl.text.generation import KVCachePolicy, VectorTokenEnv, rollout
from orl.text.rewards import RewardFunc, RewardState, as_reward_func, call_reward, reward_name
from orl.text.runtime import context_length, eos_token_ids

ADVANTAGES = ("grpo", "rloo", "remax", "reinforce_pp")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "sequence")
SCALE_REWARDS = ("group", "batch", "none")


@dataclass
class GRPOConfig(LMConfig):
    """The GRPO family (agents/grpo.py). orl-train agent=grpo dataset=<prompts>.jsonl lm.reward=<module:function>;
    the algorithm's defaults are TRL 1.16's GRPOConfig (loss_type dapo, num_generations 8, lr 1e-6, beta 0,
    epsilon 0.2, max_completion_length 512); orl's LM defaults differ from TRL's Trainer in two places: dropout
    off (TRL: on) and a constant learning rate (HF Trainer: linear decay), and prompts are drawn with replacement.
    Under data parallel, the batch-level statistics of scale_rewards=batch and reinforce_pp are each process's own,
    and every process's sampler restarts from process 0's state on resume."""

    num_generations: int = 8  # G: completions sampled per prompt (a group)
    advantage: str = "grpo"  # grpo | rloo | remax | reinforce_pp
    scale_rewards: str = "group"  # advantage=grpo: divide by the std of the group | batch | none (Dr. GRPO)
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | sequence (TRL's default: dapo)
    epsilon: float = 0.2  # PPO clip: ratio kept within [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # None: epsilon (DAPO's clip-higher uses 0.28)
    num_iterations: int = 1  # optimizer steps per generation batch (mu in the GRPO paper)
    beta: float = 0.0  # KL to the reference; 0 keeps no reference model (TRL's default)
    kl_in_reward: bool = False  # True: k1 KL subtracted from the reward (RLOO); False: k3 term in the loss (GRPO)
    use_bias_correction_kl: bool = True  # k3 term times the ratio (unbiased reverse-KL gradient; TRL 1.16's default)
    mask_truncated_completions: bool = False  # completions without an end-of-sequence token get no loss (DAPO)
    max_completion_length: int = 512  # tokens generated per completion at most
    temperature: float = 1.0  # sampling temperature; log-probs are scored at it too
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    lr: float = 1e-6  # TRL's GRPOConfig default (AdamW)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    turn_returns: str = "episode"  # multi-turn envs: every agent token gets the episode's advantage | to_go: its turn's return-to-go
    seed: int = 0  # the sampler's seed (orl-train passes the run's seed)

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):  # TRL's older boolean form (GRPOConfig maps it the same way)
            self.scale_rewards = "group" if self.scale_rewards else "none"


def group_advantages(rewards: torch.Tensor, num_generations: int, advantage: str, scale_rewards: str = "group",
                     greedy_rewards: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, std used for scaling) of rewards (B * G,) ordered prompt by prompt (the advantage table above).
    NaN rewards (every reward function returned None) are left out of the baselines and get advantage 0, as TRL."""
    grouped = rewards.view(-1, num_generations)
    if advantage == "grpo":
        mean = torch.nanmean(grouped, 1, keepdim=True).expand_as(grouped).reshape(-1)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards)
        else:  # "none" still reports the group std (frac_reward_zero_std)
            std = nanstd(grouped, 1).repeat_interleave(num_generations) if num_generations > 1 else torch.zeros_like(rewards)
        out = rewards - mean
        if scale_rewards != "none":
            out = out / (std + 1e-4)
    elif advantage == "rloo":
        counts = (~torch.isnan(grouped)).sum(1, keepdim=True)
        # a group with one scorable completion has no baseline: NaN, so its advantage becomes 0 (as TRL's 0/0)
        others = torch.where(counts > 1, counts - 1, torch.full_like(counts, 0)).to(grouped.dtype)
        baseline = (torch.nansum(grouped, 1, keepdim=True) - grouped) / others
        out = (grouped - baseline).reshape(-1)
        std = nanstd(grouped, 1).repeat_interleave(num_generations)
    elif advantage == "remax":
        if greedy_rewards is None:
            raise ValueError("advantage=remax needs the greedy completions' rewards")
        out = (grouped - greedy_rewards.view(-1, 1)).reshape(-1)
        std = nanstd(grouped, 1).repeat_interleave(num_generations)
    elif advantage == "reinforce_pp":
        std = nanstd(rewards).expand_as(rewards)
        out = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    else:
        raise ConfigError(f"agent.advantage must be one of {', '.join(ADVANTAGES)}, got {advantage!r}")
    return torch.nan_to_num(out, nan=0.0), std


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (TRL's nanstd): NaN with fewer than two values."""
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    return variance.sqrt().squeeze() if dim is None else variance.sqrt().squeeze(dim)


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, loss_type: str,
                epsilon: float, epsilon_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None,
                max_completion_length: int | None = None, num_items: float | None = None,
                bias_correction_kl: bool = True) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate aggregated by `loss_type` (module docstring) over per-token log-probs (B, T) with mask
    (B, T); returns (loss, per-token stats for logging). `num_items`: dapo's token count of the generation batch."""
    advantages = advantages.view(-1, 1) if advantages.dim() == 1 else advantages  # (B,) per sequence or (B, T) per token
    mask = mask.to(logps.dtype)
    if loss_type == "sequence":
        ratio = torch.exp(((logps - old_logps) * mask).sum(-1, keepdim=True))
    else:
        ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    kl = None
    if beta != 0.0 and ref_logps is not None:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if loss_type != "sequence":
            per_token = per_token + beta * (kl * ratio if bias_correction_kl else kl)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / max(float(num_items if num_items is not None else mask.sum()), 1.0)
    elif loss_type == "sequence":
        loss = per_token.mean()
    else:
        raise ConfigError(f"agent.loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    region = mask if loss_type != "sequence" else torch.ones_like(ratio)
    low = ((ratio < 1 - epsilon) & (advantages < 0)).to(mask.dtype) * region
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype) * region
    stats = {"low": low, "high": high, "region": torch.clamp(low + high, max=1.0), "region_mask": region, "kl": kl}
    return loss, stats


@register("grpo")
class GRPO(LMAgent):
    data_kind = "prompts"  # it generates its own completions online, scored by its reward functions
    needs_reward = True
    Config = GRPOConfig

    def __init__(self, obs_space, action_space, cfg: GRPOConfig, device="cpu"):
        for name, value, allowed in (("advantage", cfg.advantage, ADVANTAGES), ("loss_type", cfg.loss_type, LOSS_TYPES),
                                     ("scale_rewards", cfg.scale_rewards, SCALE_REWARDS)):
            if value not in allowed:
                raise ConfigError(f"agent.{name} must be one of {', '.join(allowed)}, got {value!r}")
        if cfg.advantage in ("grpo", "rloo") and cfg.num_generations < 2:
            raise ConfigError(f"agent.advantage={cfg.advantage} compares completions of one prompt: agent.num_generations must be >= 2, "
                              f"got {cfg.num_generations}")
        if cfg.loss_type == "sequence" and cfg.beta != 0.0 and not cfg.kl_in_reward:
            raise ConfigError("agent.loss_type=sequence (TRL's RLOO) takes its KL in the reward: set agent.kl_in_reward=true, "
                              "or use a token-level loss_type for the k3 term")
        if cfg.turn_returns not in ("episode", "to_go"):
            raise ConfigError(f"agent.turn_returns must be episode or to_go, got {cfg.turn_returns!r}")
        if cfg.turn_returns == "to_go" and (cfg.advantage == "remax" or cfg.kl_in_reward):
            raise ConfigError("agent.turn_returns=to_go takes each turn's return-to-go from the environment's rewards: it has no "
                              "per-turn greedy baseline (advantage=remax) and no per-turn KL in the reward (kl_in_reward); use "
                              "turn_returns=episode, or the k3 term in the loss")
        if cfg.turn_returns == "to_go" and cfg.loss_type == "sequence":
            raise ConfigError("agent.turn_returns=to_go gives each turn its own advantage; loss_type=sequence has one ratio per "
                              "conversation: use a token-level loss_type")
        if cfg.num_iterations < 1 or cfg.max_completion_length < 1 or cfg.temperature <= 0:
            raise ConfigError("agent.num_iterations and agent.max_completion_length must be >= 1 and agent.temperature > 0")
        super().__init__(obs_space, action_space, cfg, device, with_reference=cfg.beta != 0.0)
        self.make_policy_optimizer(self.nets["policy"].parameters(), cfg.lr, cfg.weight_decay)
        self.generator = torch.Generator().manual_seed(cfg.seed + self.data_parallel.rank)
        self.reward_funcs: list[RewardFunc] = []
        self.reward_weights: list[float] = []
        self.reward_logs: dict[str, list[float]] = {}  # what reward functions report through TRL's log_metric this step
        self.max_steps = 0  # the run's length, for reward functions' trainer_state (orl-train sets it)

    # --- rewards --------------------------------------------------------------------------
    @property
    def reward_fn(self):
        return self.reward_funcs[0] if len(self.reward_funcs) == 1 else self.reward_funcs or None

    @reward_fn.setter
    def reward_fn(self, fn) -> None:
        """orl-train sets `agent.reward_fn` from lm.reward: one callable or a list; weights via set_rewards."""
        if fn is None:
            self.reward_funcs, self.reward_weights = [], []
        else:
            self.set_rewards(fn if isinstance(fn, (list, tuple)) else [fn])

    def set_rewards(self, funcs: Sequence[Callable], weights: Sequence[float] | None = None) -> None:
        if weights is not None and len(weights) != len(funcs):
            raise ConfigError(f"{len(funcs)} reward functions but {len(weights)} weights (lm.reward_weights)")
        self.reward_funcs = [as_reward_func(f) for f in funcs]
        self.reward_weights = [float(w) for w in weights] if weights is not None else [1.0] * len(funcs)

    def score(self, prompts: list[str], completions: list[str], completion_ids: list[list[int]],
              columns: dict[str, list] | None = None, log_metrics: bool = False) -> torch.Tensor:
        """(N, K) rewards of N completions under the K reward functions; None -> NaN (TRL). `log_metrics`: what the
        functions report through log_metric is logged with this step (training samples only, not evaluation)."""
        if not self.reward_funcs:
            raise RuntimeError("set the reward functions (agent.reward_fn or set_rewards) before training GRPO; orl-train does it "
                               "from lm.reward")
        out = torch.full((len(prompts), len(self.reward_funcs)), float("nan"))
        state = RewardState(self.step, self.max_steps)
        log_metric = (lambda name, value: self.reward_logs.setdefault(name, []).append(float(value))) if log_metrics else None
        for k, fn in enumerate(self.reward_funcs):  # chat rows reach each function as messages, as in TRL (call_reward)
            values = call_reward(fn, prompts, completions, completion_ids, columns, state, log_metric)
            out[:, k] = torch.tensor([float("nan") if v is None else float(v) for v in values])
        return out

    def combine(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        """r = sum_k w_k R_k over the functions that scored each completion; NaN where none did (TRL)."""
        rewards = (rewards_per_func * torch.tensor(self.reward_weights)).nansum(1)
        rewards[torch.isnan(rewards_per_func).all(1)] = float("nan")
        return rewards

    # --- generation ---------------------------------------------------------------------------
    def generate(self, prompts: list[str], greedy: bool = False) -> dict[str, Any]:
        policy = self.nets["policy"]
        env = VectorTokenEnv(self.tokenizer, prompts, None, self.cfg.max_completion_length, context_length(policy, self.tokenizer),
                             eos_ids=eos_token_ids(self.tokenizer, policy))
        with evaluating(policy):
            out = rollout(KVCachePolicy(policy), env, greedy, self.cfg.temperature, self.generator, self.cfg.top_k, self.cfg.top_p)
        eos = set(eos_token_ids(self.tokenizer, policy))
        sampled = out["sampled_ids"]
        return {"prompt_ids": env.prompt_ids, "completion_ids": sampled, "texts": out["texts"],
                "truncated": torch.tensor([not ids or ids[-1] not in eos for ids in sampled])}

    def token_logps(self, model, ids: torch.Tensor, mask: torch.Tensor,
                    entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """log pi(y_t | .) at the sampling temperature for every position (B, L-1) (entry t-1 scores token t), and
        the per-token entropy of the tempered distribution where asked."""
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, :-1].float()
        log_probs = F.log_softmax(logits / self.cfg.temperature, dim=-1)
        logps = log_probs.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        ent = None
        if entropy:  # a logged metric: no graph kept for it
            with torch.no_grad():
                detached = log_probs.detach()
                ent = -(detached.exp() * detached).sum(-1)
        return logps, ent

    # --- multi-turn environments (the conversation env and `play` are LMAgent's) ----------------
    def _sample_conversations(self, local: PromptBatch, G: int) -> dict[str, Any]:
        from orl.text.conversation import conversation_tensors

        seeds = [int(seed) for seed in local.columns["seed"] for _ in range(G)]
        convs = self.play(seeds, temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p)
        ids, mask, agent = conversation_tensors(convs, self.tokenizer.pad_token_id)
        returns = torch.tensor([c.episode_return for c in convs], dtype=torch.float32)
        out = {"ids": ids, "mask": mask, "token_mask": agent[:, 1:].float(), "rewards": returns, "rewards_per_func": returns[:, None],
               "truncated": torch.tensor([not c.terminated for c in convs]), "lengths": agent.sum(1).float(), "conversations": convs}
        if self.cfg.turn_returns == "to_go":
            out["token_advantages"] = self._to_go_advantages(convs, ids.shape[1], G)
        return out

    def _to_go_advantages(self, convs: list, width: int, G: int) -> torch.Tensor:
        """(N, width - 1) per-token advantages: the tokens of turn k carry the return-to-go from turn k, normalized over the
        group's conversations that reached turn k (as `advantage`/`scale_rewards` say), 0 elsewhere."""
        turns = max((c.turns for c in convs), default=0)
        if turns == 0:  # no conversation got a turn (its opening filled the context): nothing to credit
            return torch.zeros(len(convs), width - 1)
        to_go = torch.full((len(convs), turns), float("nan"))
        for row, conv in enumerate(convs):
            rewards = torch.tensor(conv.rewards, dtype=torch.float32)
            to_go[row, : conv.turns] = rewards.flip(0).cumsum(0).flip(0)
        per_turn = torch.stack([group_advantages(to_go[:, k], G, self.cfg.advantage, self.cfg.scale_rewards)[0] for k in range(turns)], 1)
        out = torch.zeros(len(convs), width - 1)
        for row, conv in enumerate(convs):
            offset = width - len(conv.ids) - 1  # column of ids[0] in the shifted (width - 1) layout
            start = 0
            for k, end in enumerate(conv.turn_ends):
                out[row, offset + start : offset + end + 1] = per_turn[row, k]
                start = end + 1
            if conv.ids:  # the replies between turns are context: no advantage
                out[row, offset : offset + len(conv.ids)] *= torch.tensor(conv.agent_mask, dtype=out.dtype)
        return out

    # --- the step -----------------------------------------------------------------------------
    def _sample_completions(self, local: PromptBatch, G: int) -> dict[str, Any]:
        prompts = [p for p in local.prompts for _ in range(G)]
        columns = {key: [v for v in values for _ in range(G)] for key, values in local.columns.items()}
        gen = self.generate(prompts)
        rewards_per_func = self.score(prompts, gen["texts"], gen["completion_ids"], columns, log_metrics=True)
        ids, mask, completion_mask = build_sequences(gen["prompt_ids"], gen["completion_ids"], self.tokenizer.pad_token_id)
        return {"ids": ids, "mask": mask, "token_mask": completion_mask[:, 1:].float(), "rewards_per_func": rewards_per_func,
                "rewards": self.combine(rewards_per_func), "truncated": gen["truncated"],
                "lengths": torch.tensor([len(c) for c in gen["completion_ids"]], dtype=torch.float32)}

    @property
    def sampling_temperature(self) -> float:
        return self.cfg.temperature

    def update(self, batch: PromptBatch) -> dict[str, torch.Tensor]:
        """One generation batch (this process's prompts x num_generations), then num_iterations optimizer steps."""
        cfg = self.cfg
        local = self.data_parallel.shard(batch)  # whole prompts per process: groups are never split
        G = cfg.num_generations
        multi_turn = self.conversation_env is not None
        sample = self._sample_conversations(local, G) if multi_turn else self._sample_completions(local, G)
        rewards_per_func, rewards = sample["rewards_per_func"], sample["rewards"]
        task_rewards = rewards  # what TRL logs as `reward`: before any KL penalty

        ids, mask = sample["ids"].to(self.device), sample["mask"].to(self.device)
        token_mask = sample["token_mask"].to(self.device)
        if cfg.mask_truncated_completions:
            token_mask = token_mask * (~sample["truncated"]).to(self.device).float().unsqueeze(1)
        policy = self.nets["policy"]
        with torch.no_grad():
            old_logps = self.token_logps(policy, ids, mask)[0] if cfg.num_iterations > 1 or cfg.kl_in_reward else None
            ref_logps = self.token_logps(self.nets["reference"], ids, mask)[0] if cfg.beta != 0.0 else None
        kl_sequence = None
        if cfg.kl_in_reward and ref_logps is not None:
            kl_sequence = ((old_logps - ref_logps) * token_mask).sum(-1).cpu()
            rewards = rewards - cfg.beta * kl_sequence
        greedy_rewards = None
        if cfg.advantage == "remax":
            if multi_turn:
                greedy_rewards = torch.tensor([c.episode_return for c in self.play([int(s) for s in local.columns["seed"]], greedy=True)])
            else:
                greedy = self.generate(list(local.prompts), greedy=True)
                # an unscorable greedy completion (NaN) gives no baseline: its group's completions get advantage 0
                greedy_rewards = self.combine(self.score(list(local.prompts), greedy["texts"], greedy["completion_ids"], local.columns))
        advantages, std = group_advantages(rewards, G, cfg.advantage, cfg.scale_rewards, greedy_rewards)
        if "token_advantages" in sample:
            advantages = sample["token_advantages"]
        advantages = advantages.to(self.device)
        # dapo's normalizer: the generation batch's tokens over all processes, per process (TRL: num_items_in_batch /
        # num_processes), so the averaged gradient is the global token mean
        num_items = self.data_parallel.total(float(token_mask.sum())) / self.data_parallel.world

        metrics: dict[str, torch.Tensor] = {}
        for _ in range(cfg.num_iterations):
            def losses(micro):
                rows = micro
                logps, entropy = self.token_logps(policy, ids[rows], mask[rows], entropy=True)
                old = old_logps[rows] if old_logps is not None else logps.detach()
                loss, stats = policy_loss(logps, old, advantages[rows], token_mask[rows], cfg.loss_type, cfg.epsilon,
                                          cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon, cfg.beta,
                                          None if ref_logps is None or cfg.kl_in_reward else ref_logps[rows],
                                          cfg.max_completion_length, num_items, cfg.use_bias_correction_kl)
                m = token_mask[rows]
                tokens = m.sum().clamp(min=1.0)
                region_tokens = stats["region_mask"].sum().clamp(min=1.0)
                out = {"entropy": (entropy * m).sum() / tokens,
                       "clip_ratio/low_mean": stats["low"].sum() / region_tokens,
                       "clip_ratio/high_mean": stats["high"].sum() / region_tokens,
                       "clip_ratio/region_mean": stats["region"].sum() / region_tokens}
                if stats["kl"] is not None:
                    out["kl"] = (stats["kl"] * m).sum() / tokens
                if cfg.loss_type == "dapo":  # the micro-batch sums over the whole batch's tokens: undo optimize's 1/parts
                    loss = loss * max(int(cfg.grad_accum_steps), 1)
                return loss, out

            metrics = self.optimize(torch.arange(len(ids), device=self.device), losses, shard=False)
        self.step += 1
        lengths = sample["lengths"]
        finite = task_rewards[~torch.isnan(task_rewards)]
        if len(finite):  # a batch no function scored logs no mean (a NaN metric would stop the run as diverged)
            metrics["reward"] = finite.mean()
        metrics.update({"reward_std": nanstd(task_rewards) if len(finite) > 1 else torch.tensor(0.0),
                        "frac_reward_zero_std": torch.isclose(std, torch.zeros_like(std)).float().mean(),
                        "completions/mean_length": lengths.mean(), "completions/clipped_ratio": sample["truncated"].float().mean()})
        if multi_turn:
            convs = sample["conversations"]
            metrics.update({"episode/success": torch.tensor([bool(c.success) for c in convs], dtype=torch.float32).mean(),
                            "episode/turns": torch.tensor([float(c.turns) for c in convs]).mean()})
        if kl_sequence is not None:
            metrics["kl"] = (kl_sequence.sum() / max(num_items, 1.0)).to(torch.float32)
        for k, fn in enumerate([] if multi_turn else self.reward_funcs):
            scored = int((~torch.isnan(rewards_per_func[:, k])).sum())
            if scored:  # TRL logs NaN for a function that scored nothing (a task's rows absent from the batch); orl omits it
                metrics[f"rewards/{reward_name(fn)}/mean"] = torch.nanmean(rewards_per_func[:, k])
                metrics[f"rewards/{reward_name(fn)}/std"] = nanstd(rewards_per_func[:, k]) if scored > 1 else torch.tensor(0.0)
        averaged = self.data_parallel.average({k: torch.as_tensor(v, dtype=torch.float32).detach().cpu() for k, v in metrics.items()})
        # log_metric values are each process's own (processes may log different names: no collective over them)
        logged = {name: [v for v in values if math.isfinite(v)] for name, values in self.reward_logs.items()}
        self.reward_logs = {}
        return {**averaged, **{name: torch.tensor(sum(values) / len(values)) for name, values in logged.items() if values}}

    def train_step(self, prompts: Sequence[str], reward_fn: Callable | None = None) -> dict[str, float]:
        """One step on these prompts outside the Trainer (scripts, notebooks): `reward_fn` replaces the rewards if given."""
        if reward_fn is not None:
            self.reward_fn = reward_fn
        batch = PromptBatch(list(prompts), torch.arange(len(prompts)))
        return {k: float(v) for k, v in self.update(batch).items()}

    # --- evaluation -------------------------------------------------------------------------
    def evaluate_run(self, run):
        """Sampled completions of the held-out rows (their columns go to the reward functions), mean reward; in a
        multi-turn environment, conversations from the run's held-out seeds."""
        if self.conversation_env is not None:
            return super().evaluate_run(run)
        # The evaluation prompts the run chose (held-out rows, or lm.eval_prompts, already fitted to the context), each
        # with its row's columns where the data has it (a reference answer for the reward functions)
        chosen = set(run.eval_prompts)
        if run.eval_rows and any(row["prompt"] in chosen for row in run.eval_rows):
            rows = [row for row in run.eval_rows if row["prompt"] in chosen][:256]  # the held-out rows, in their order
        else:  # lm.eval_prompts, or nothing held out: the prompts, with a training row's columns where one matches
            known = {row["prompt"]: row for row in run.rows}
            rows = [known.get(p, {"prompt": p}) for p in run.eval_prompts][:256]
        prompts = [r["prompt"] for r in rows]
        keys = sorted({key for r in rows for key in r if key not in ("prompt", "_chat")})
        columns = {key: [r.get(key) for r in rows] for key in keys}
        saved = self.generator.get_state()
        self.generator.manual_seed(run.seed + 12345)
        rewards, lengths, ids = [], [], []
        for start in range(0, len(prompts), 64):
            part = slice(start, start + 64)
            gen = self.generate(prompts[part])
            scores = self.score(prompts[part], gen["texts"], gen["completion_ids"], {k: v[part] for k, v in columns.items()})
            rewards.extend(torch.nan_to_num(self.combine(scores), nan=0.0).tolist())
            lengths.extend(len(c) for c in gen["completion_ids"])
            ids.extend(gen["completion_ids"])
        self.generator.set_state(saved)  # evaluation never moves the training sampler
        return EvalResult(np.asarray(rewards), np.asarray(lengths, dtype=float),
                          extra={"distinct_1": distinct_n(ids, 1), "distinct_2": distinct_n(ids, 2)})

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}  # exact resume: the sampler continues where it was

    def load_extra_state(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])


@dataclass
class RLOOConfig(GRPOConfig):
    """RLOO as TRL's RLOOTrainer runs it (trainer/rloo_config.py, rloo_trainer.py): leave-one-out advantages, the
    sequence-level clipped ratio, and beta * sum_t (log pi_old - log pi_ref) subtracted from the reward; TRL's
    RLOOConfig defaults (beta 0.05, num_generations 2, lr 1e-6). `advantage=remax` gives ReMax's greedy baseline."""

    num_generations: int = 2
    advantage: str = "rloo"
    loss_type: str = "sequence"
    beta: float = 0.05
    kl_in_reward: bool = True


@register("rloo")
class RLOO(GRPO):
    Config = RLOOConfig
