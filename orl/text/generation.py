"""Generation as a batched token-level MDP, and the policies that drive it.

* `VectorTokenEnv`: a batch of prompts stepped together. State = prompt + tokens generated so far as
  fixed-width ids and an attention mask; action = the next token id; a row's episode ends at EOS or
  after `max_new_tokens`. Reward: a terminal reward R(prompt, response) and/or a per-token callable.
* `KVCachePolicy`: prefill once, then one incremental forward pass per generated token.
  `ReencodePolicy` re-runs the whole sequence each step (the baseline the benchmark compares with).
* `KLPenalty`: wraps an env and subtracts beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) per token.
* `rollout`, `evaluate_lm`, `best_of_n`: run a policy through the env.
The gymnasium views (one-row `TokenEnv`, the sequence-level `SequenceBandit`) are in `orl.envs.lm`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from orl.text.data import distinct_n, pad_left, position_ids
from orl.text.encoding import encode_prompt
from orl.text.runtime import context_length, eos_token_ids

RewardFn = Callable[[str, str], float]


class VectorTokenEnv:
    """A batch of token-level episodes, one per prompt, stepped in lockstep."""

    def __init__(self, tokenizer, prompts: Sequence[str], reward_fn: RewardFn | None = None, max_new_tokens: int = 32,
                 context_length: int | None = None, step_reward_fn: Callable[[int, list[int]], float] | None = None,
                 eos_ids: Sequence[int] | None = None):
        self.tokenizer = tokenizer
        self.prompts = list(prompts)
        self.reward_fn, self.step_reward_fn = reward_fn, step_reward_fn
        self.max_new_tokens = max_new_tokens
        # Any of these ends an episode (chat models: EOS and the end-of-turn token): see eos_token_ids.
        self.eos_ids = list(eos_ids) if eos_ids else eos_token_ids(tokenizer)
        self.eos_id, self.pad_id = self.eos_ids[0], tokenizer.pad_token_id
        self._eos = torch.tensor(self.eos_ids)
        self.prompt_ids = [encode_prompt(tokenizer, p) for p in self.prompts]
        self.prompt_width = max(len(p) for p in self.prompt_ids)
        self.width = self.prompt_width + max_new_tokens
        if context_length is not None and self.width > context_length:
            longest = max(range(len(self.prompts)), key=lambda i: len(self.prompt_ids[i]))
            raise ValueError(
                f"prompt {longest} has {len(self.prompt_ids[longest])} tokens; with max_new_tokens={max_new_tokens} the episode needs "
                f"{self.width} positions but the model's context is {context_length}. Shorten the prompt or lower max_new_tokens."
            )
        self.num_envs = len(self.prompts)
        vocab = len(tokenizer)
        self.single_action_space = gym.spaces.Discrete(vocab)
        self.single_observation_space = gym.spaces.Dict({
            "input_ids": gym.spaces.Box(0, vocab - 1, (self.width,), np.int64),
            "attention_mask": gym.spaces.Box(0, 1, (self.width,), np.int64),
        })

    def reset(self, seed: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        ids, mask = pad_left(self.prompt_ids, self.pad_id, self.prompt_width)
        self.input_ids = torch.cat([ids, torch.full((self.num_envs, self.max_new_tokens), self.pad_id)], 1)
        self.attention_mask = torch.cat([mask, torch.zeros(self.num_envs, self.max_new_tokens, dtype=torch.long)], 1)
        self.lengths = torch.zeros(self.num_envs, dtype=torch.long)  # tokens generated per row (EOS included)
        self.done = torch.zeros(self.num_envs, dtype=torch.bool)
        self.t = 0
        return self.observation(), {}

    def observation(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids.clone(), "attention_mask": self.attention_mask.clone()}

    def step(self, actions: torch.Tensor | np.ndarray) -> tuple[dict[str, torch.Tensor], np.ndarray, np.ndarray, np.ndarray, dict]:
        """Append one token per active row. Rows already done ignore their action (reward 0)."""
        actions = torch.as_tensor(actions, dtype=torch.long).reshape(self.num_envs)
        active = ~self.done
        column = self.prompt_width + self.t
        self.input_ids[:, column] = torch.where(active, actions, self.pad_id)
        self.attention_mask[:, column] = active.long()
        self.lengths += active.long()
        self.t += 1
        terminated = active & torch.isin(actions, self._eos)
        truncated = active & ~terminated & (self.t >= self.max_new_tokens)
        rewards = np.zeros(self.num_envs)
        if self.step_reward_fn is not None:
            for row in torch.nonzero(active).flatten().tolist():
                generated = self.input_ids[row, self.prompt_width : self.prompt_width + int(self.lengths[row])].tolist()
                rewards[row] += self.step_reward_fn(generated[-1], generated)
        finished = terminated | truncated
        self.done |= finished
        if self.reward_fn is not None:
            # The terminal reward is computed only for rows that end on this step.
            for row in torch.nonzero(finished).flatten().tolist():
                rewards[row] += self.reward_fn(self.prompts[row], self.response_text(row))
        return self.observation(), rewards, terminated.numpy(), truncated.numpy(), {"active": active.numpy()}

    def response_ids(self, row: int) -> list[int]:
        ids = self.input_ids[row, self.prompt_width : self.prompt_width + int(self.lengths[row])].tolist()
        return ids[:-1] if ids and ids[-1] in self.eos_ids else ids

    def response_text(self, row: int) -> str:
        return self.tokenizer.decode(self.response_ids(row), skip_special_tokens=True)

    @property
    def all_done(self) -> bool:
        return bool(self.done.all())


def cache_argument(model) -> str:
    """The name the model's forward takes its KV cache under: `cache` (transformers >= 5) or `past_key_values`.

    A PEFT model's forward is (*args, **kwargs) and passes them to the base model, so the base model's signature
    decides (reading the wrapper's would fall back to the deprecated `past_key_values` under LoRA)."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class KVCachePolicy:
    """Drives a causal LM one token at a time with its key/value cache: one incremental forward per step.

    Uses the model's current cache argument (`cache=`, transformers >= 5.x) and falls back to
    `past_key_values=` on versions that only have that one.
    """

    def __init__(self, model):
        self.model = model
        self._cache_arg = cache_argument(model)

    def _forward(self, **inputs):
        out = self.model(**inputs, use_cache=True)
        self.cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits[:, -1].float()

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prefill the prompt block; returns next-token logits (B, V)."""
        device = next(self.model.parameters()).device
        self.attention_mask = attention_mask.to(device)
        return self._forward(input_ids=input_ids.to(device), attention_mask=self.attention_mask, position_ids=position_ids(self.attention_mask))

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        device = self.attention_mask.device
        tokens = tokens.to(device).view(-1, 1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens)], 1)
        positions = position_ids(self.attention_mask)[:, -1:]
        return self._forward(input_ids=tokens, attention_mask=self.attention_mask, position_ids=positions, **{self._cache_arg: self.cache})


class ReencodePolicy:
    """The naive policy side: re-encodes prompt + generated tokens from scratch at every step."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        self.input_ids, self.attention_mask = input_ids.to(device), attention_mask.to(device)
        return self._logits()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.input_ids.device).view(-1, 1)
        self.input_ids = torch.cat([self.input_ids, tokens], 1)
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(tokens)], 1)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        out = self.model(input_ids=self.input_ids, attention_mask=self.attention_mask, position_ids=position_ids(self.attention_mask), use_cache=False)
        return out.logits[:, -1].float()


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering as in `generate`: excluded tokens get -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def rollout(policy, env: "VectorTokenEnv | KLPenalty", greedy: bool = True, temperature: float = 1.0, generator: torch.Generator | None = None,
            top_k: int = 0, top_p: float = 1.0) -> dict[str, Any]:
    """Run every row of `env` to the end with `policy`; returns responses, rewards and per-step records.

    Sampling divides the logits by `temperature`, then keeps the `top_k` tokens and the nucleus of
    mass `top_p` (0 / 1.0: off); the log-probabilities passed to a KLPenalty are under that
    distribution.

    `env` may be wrapped in KLPenalty: each step then passes the sampled actions' log-probabilities
    (under the distribution they were drawn from) to it, so `rewards` are KL-shaped returns.
    """
    shaped = isinstance(env, KLPenalty)
    obs, _ = env.reset()
    prompt_block = obs["input_ids"][:, : env.prompt_width]
    logits = policy.start(prompt_block, obs["attention_mask"][:, : env.prompt_width])
    total = np.zeros(env.num_envs)
    kl_total = np.zeros(env.num_envs)
    log_probs = []
    while not env.all_done:
        if greedy:
            actions = logits.argmax(-1)
        else:
            logits = filter_logits(logits / temperature, top_k, top_p)
            probs = torch.softmax(logits, -1).cpu()
            actions = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
        step_log_probs = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1).cpu()
        log_probs.append(step_log_probs)
        # Rows that finished keep receiving pad tokens so the batch stays rectangular.
        actions = torch.where(env.done.to(actions.device), torch.full_like(actions, env.pad_id), actions)
        _, rewards, _, _, info = env.step(actions.cpu(), step_log_probs) if shaped else env.step(actions.cpu())
        total += rewards
        if shaped:
            kl_total += info["kl"]
        if not env.all_done:
            logits = policy.step(actions)
    width = env.prompt_width
    return {"responses": [env.response_ids(i) for i in range(env.num_envs)], "texts": [env.response_text(i) for i in range(env.num_envs)],
            # The exact sampled tokens, EOS included when generated (what a policy-gradient loss scores).
            "sampled_ids": [env.input_ids[i, width : width + int(env.lengths[i])].tolist() for i in range(env.num_envs)],
            # rewards are KL-shaped when env is a KLPenalty; kl is the per-row sum it subtracted (beta not applied)
            "rewards": total, "kl": kl_total, "log_probs": torch.stack(log_probs, 1) if log_probs else torch.zeros(env.num_envs, 0)}


class KLPenalty:
    """Per-token KL-to-reference shaping: r_t -= beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)).

    The reference model runs with its own KV cache; the policy's log-prob of each action is passed to
    `step` by whoever sampled it (it already has the logits).
    """

    def __init__(self, env: VectorTokenEnv, ref_model, beta: float, temperature: float = 1.0):
        # The policy samples from softmax(logits / T); the reference is scored at the same T, so the
        # penalty is a KL between the two distributions actually compared.
        self.env, self.beta, self.temperature = env, beta, temperature
        self.ref = KVCachePolicy(ref_model)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def reset(self, seed: int | None = None):
        obs, info = self.env.reset(seed)
        width = self.env.prompt_width
        self._ref_logits = self.ref.start(obs["input_ids"][:, :width], obs["attention_mask"][:, :width])
        return obs, info

    def step(self, actions: torch.Tensor, policy_log_probs: torch.Tensor):
        actions = torch.as_tensor(actions, dtype=torch.long)
        active = ~self.env.done
        ref_lp = torch.log_softmax(self._ref_logits / self.temperature, -1).gather(-1, actions.to(self._ref_logits.device)[:, None]).squeeze(-1).cpu()
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        kl = (policy_log_probs.cpu() - ref_lp) * active
        rewards = rewards - self.beta * kl.numpy()
        info["kl"] = kl.numpy()
        if not self.env.all_done:
            self._ref_logits = self.ref.step(actions)
        return obs, rewards, terminated, truncated, info


def evaluate_lm(model, tokenizer, prompts: Sequence[str], reward_fn: RewardFn, max_new_tokens: int = 24, samples: int = 1,
                greedy: bool = False, seed: int = 0, batch_size: int = 64, details: bool = False) -> dict[str, Any]:
    """Mean reward, response length (tokens) and distinct-1/2 over held-out prompts, generated through the env."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    rewards, responses = [], []
    repeated = [p for p in prompts for _ in range(samples)]
    for start in range(0, len(repeated), batch_size):
        env = VectorTokenEnv(tokenizer, repeated[start : start + batch_size], reward_fn, max_new_tokens, context_length(model, tokenizer),
                             eos_ids=eos_token_ids(tokenizer, model))
        out = rollout(KVCachePolicy(model), env, greedy=greedy, generator=generator)
        rewards.extend(out["rewards"].tolist())
        responses.extend(out["responses"])
    model.train(was_training)
    out = {"reward": float(np.mean(rewards)), "length": float(np.mean([len(r) for r in responses])),
           "distinct_1": distinct_n(responses, 1), "distinct_2": distinct_n(responses, 2)}
    if details:
        out.update(rewards=rewards, lengths=[len(r) for r in responses])
    return out


def best_of_n(model, tokenizer, prompts: Sequence[str], reward_fn: RewardFn, n: int = 4, max_new_tokens: int = 24,
              seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Sample n responses per prompt through the env (the sequence-level bandit view) and keep the best."""
    env = VectorTokenEnv(tokenizer, [p for p in prompts for _ in range(n)], reward_fn, max_new_tokens, context_length(model, tokenizer),
                         eos_ids=eos_token_ids(tokenizer, model))
    out = rollout(KVCachePolicy(model), env, greedy=False, generator=torch.Generator().manual_seed(seed))
    rewards = out["rewards"].reshape(len(prompts), n)
    best = rewards.argmax(1)
    return [out["texts"][i * n + int(j)] for i, j in enumerate(best)], rewards.max(1)
