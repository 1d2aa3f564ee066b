"""REINFORCE with a leave-one-out (RLOO) or greedy (ReMax) baseline: online RL in the token env.

For each prompt x, sample k responses y_1..y_k ~ pi(.|x) through the token-level env wrapped in the
per-token KL penalty, so each return is R_i = R(x, y_i) - beta * sum_t (log pi - log pi_ref)(y_i,t).
  baseline  rloo:   b_i = mean_{j != i} R_j           greedy: b = R(x, greedy response)
  L = -E[ (R_i - b_i) * log pi(y_i | x) ]              log pi summed over response tokens
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from orl.text.agent import LMAgent, LMConfig
from orl.agent import register
from orl.text.data import PromptBatch, SequenceBatch, build_sequences, response_log_prob


@dataclass
class RLOOConfig(LMConfig):
    """REINFORCE with a leave-one-out (or greedy) baseline in the token env with a per-token KL penalty.
    orl-train agent=rloo dataset=prompts.jsonl (rows {"prompt"}) lm.reward=<reward>: batch_size prompts per step, samples_per_prompt each.
    lr: TRL's RLOOConfig default, 1e-6 (AdamW), safe on a real model. The yaml's 3e-4 and the API's 1e-4 were rates
    for the embedded tiny LM, which passes its own (scripts/lm_demo.py: 3e-4)."""

    samples_per_prompt: int = 4
    baseline: str = "rloo"  # rloo | greedy
    kl_beta: float = 0.05
    lr: float = 1e-6  # TRL's RLOOConfig default (trl 1.x)
    grad_clip: float = 1.0
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int = 0  # the sampler's seed (orl-train passes the run's seed)


@register("rloo")
class RLOO(LMAgent):
    data_kind = "prompts"  # it generates its own responses online, scored by agent.reward_fn
    Config = RLOOConfig

    def __init__(self, obs_space, action_space, cfg: RLOOConfig, device="cpu"):
        if cfg.baseline not in ("rloo", "greedy"):
            raise ValueError(f"baseline must be rloo or greedy, got {cfg.baseline!r}")
        if cfg.baseline == "rloo" and cfg.samples_per_prompt < 2:
            raise ValueError("the leave-one-out baseline needs samples_per_prompt >= 2")
        super().__init__(obs_space, action_space, cfg, device)
        self.make_policy_optimizer(self.nets["policy"].parameters(), cfg.lr)
        self.generator = torch.Generator().manual_seed(cfg.seed + self.data_parallel.rank)

    def _generate(self, prompts: Sequence[str], reward_fn, greedy: bool, kl: bool):
        from orl.text.generation import KLPenalty, KVCachePolicy, VectorTokenEnv, rollout
        from orl.text.runtime import context_length, eos_token_ids

        policy = self.nets["policy"]
        env = VectorTokenEnv(self.tokenizer, prompts, reward_fn, self.cfg.max_new_tokens, context_length(policy, self.tokenizer),
                             eos_ids=eos_token_ids(self.tokenizer, policy))
        if kl and self.cfg.kl_beta > 0:
            env = KLPenalty(env, self.nets["reference"], self.cfg.kl_beta, self.cfg.temperature)
        out = rollout(KVCachePolicy(self.nets["policy"]), env, greedy, self.cfg.temperature, self.generator, self.cfg.top_k, self.cfg.top_p)
        self._last_kl = torch.as_tensor(out["kl"], dtype=torch.float32)
        return (env.prompt_ids, out["sampled_ids"]), torch.as_tensor(out["rewards"], dtype=torch.float32)

    def train_step(self, prompts: Sequence[str], reward_fn: Callable[[str, str], float]) -> dict[str, float]:
        """Sample k responses per prompt in the env, then one policy-gradient step."""
        self.nets["policy"].eval()
        k = self.cfg.samples_per_prompt
        repeated = [p for p in prompts for _ in range(k)]
        (prompt_ids, generated), returns = self._generate(repeated, reward_fn, greedy=False, kl=True)
        kl = self._last_kl  # the sampled responses' KL (k per prompt), read before the greedy rollout replaces it
        grouped = returns.view(len(prompts), k)
        if self.cfg.baseline == "rloo":
            baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
        else:
            _, greedy_returns = self._generate(list(prompts), reward_fn, greedy=True, kl=False)
            baseline = greedy_returns[:, None].expand_as(grouped)
        advantages = (grouped - baseline).flatten().to(self.device)
        self.nets["policy"].train()
        ids, mask, response_mask = build_sequences(prompt_ids, generated, self.tokenizer.pad_token_id)
        batch = SequenceBatch(ids.to(self.device), mask.to(self.device), response_mask.to(self.device))
        log_prob = response_log_prob(self.nets["policy"], batch)
        loss = -(advantages * log_prob).mean()
        self.optimizers["policy"].zero_grad(set_to_none=True)
        loss.backward()
        self.data_parallel.average_gradients([p for p in self.nets["policy"].parameters() if p.requires_grad])
        torch.nn.utils.clip_grad_norm_(self.nets["policy"].parameters(), self.cfg.grad_clip)
        self.optimizers["policy"].step()
        if "policy" in self.schedulers:
            self.schedulers["policy"].step()
        self.step += 1
        return {"loss": float(loss.detach()), "return_mean": float(returns.mean()), "advantage_std": float(advantages.std()),
                # the task reward and the KL apart: return = task_reward - kl_beta * kl
                "task_reward": float((returns + self.cfg.kl_beta * kl).mean()), "kl": float(kl.mean())}

    def update(self, batch: PromptBatch) -> dict[str, torch.Tensor]:
        """One Trainer step (orl-train agent=rloo): k samples per prompt of the batch, one policy-gradient step."""
        if self.reward_fn is None:
            raise RuntimeError("set agent.reward_fn = R(prompt, response) before training RLOO (orl-train does it from lm.reward)")
        # Data parallel: this process answers its slice of the prompts; its sampler is offset by its rank.
        metrics = self.train_step(self.data_parallel.shard(batch).prompts, self.reward_fn)
        return self.data_parallel.average({k: torch.tensor(v) for k, v in metrics.items()})

    def extra_state(self) -> dict:
        return {"generator": self.generator.get_state()}  # exact resume: the sampler continues where it was

    def load_extra_state(self, state: dict) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
