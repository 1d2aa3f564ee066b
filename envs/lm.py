"""Language-model generation as an environment (a token-level MDP), and the policy side that drives it.

* `VectorTokenEnv`: a batch of prompts stepped together. State = prompt + tokens generated so far as
  fixed-width ids and an attention mask; action = the next token id; a row's episode ends at EOS or
  after `max_new_tokens`. Reward: a terminal reward R(prompt, response) and/or a per-token callable.
* `TokenEnv`: the same MDP as a single gymnasium env (`Discrete(vocab)` actions).
* `KVCachePolicy`: prefill once, then one incremental forward pass per generated token.
  `ReencodePolicy` re-runs the whole sequence each step (the baseline the benchmark compares with).
* `KLPenalty`: wraps an env and subtracts beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t)) per token.
* `SequenceBandit`: the one-step view (action = a whole response) used by A-LoL and best-of-n.

Models are Hugging Face causal LMs loaded with `load_lm(path)`: the project's embedded tiny GPT-2
(`orl.envs.tiny_lm`) or any hub id / local path a user gives.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import gymnasium as gym
import numpy as np
import torch

from orl.text.data import pad_left, position_ids

RewardFn = Callable[[str, str], float]


def load_lm(path: str, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = torch.float32, disable_dropout: bool = True):
    """(model, tokenizer) from a local directory or hub id through the standard `from_pretrained` path.

    Weights load in fp32 by default, whatever dtype the checkpoint was saved in (a bf16 checkpoint
    trained in pure bf16 loses most small updates; heads added on top would mismatch). `dtype=None`
    keeps the saved dtype. Dropout is switched off (TRL's `disable_dropout`) so pi_theta == pi_ref
    holds exactly at the start; a tokenizer without a pad token pads with EOS (or UNK).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    if isinstance(dtype, str):
        dtype = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}[dtype]
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(path, **({} if dtype is None else {"torch_dtype": dtype}))
    if disable_dropout:
        switch_off_dropout(model)
    return model.to(device), tokenizer


def load_tokenizer(path: str):
    """The tokenizer at `path`; one without a pad token pads with EOS (or UNK)."""
    from transformers import AutoTokenizer

    from orl.errors import DataFileNotFound

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # not a local model directory and not a reachable hub id
        raise DataFileNotFound(f"lm.model={path}: no Hugging Face model/tokenizer could be loaded from it ({str(exc).splitlines()[0][:200]}); "
                               "give a local directory written by save_pretrained, or a hub id on a machine with internet") from exc
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"the tokenizer of {path} has no pad, EOS or UNK token to pad with; add a pad token to it "
                             "(tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings)")
        tokenizer.pad_token = fallback
    return tokenizer


def switch_off_dropout(model: torch.nn.Module) -> None:
    """p = 0 in every dropout module and every float `attention_dropout`/`dropout` attribute (HF attention)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def context_length(model, tokenizer=None) -> int | None:
    """The model's context window from its config (any architecture), else the tokenizer's limit."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**8 else None


def output_width(model) -> int:
    """Width of the last hidden state (what a value or reward head reads): the LM head's input size.

    Not `config.hidden_size`: OPT-style models project their final states to a smaller width first.
    """
    return int(model.get_output_embeddings().weight.shape[1])


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation_config EOS (an int
    or, for chat models, a list such as [eos, end-of-turn])."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token is not None and token not in ids:
            ids.append(int(token))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
    return ids


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with the special tokens the tokenizer adds itself and BOS exactly once.

    Tokenizers that add BOS (Llama, Mistral, Gemma) keep theirs; for those that do not (GPT-2) BOS is
    prepended; with no BOS at all (Qwen2) the ids are the plain text's, and an empty prompt starts
    from EOS, the token such models are trained to continue after. The one path for training data,
    value fitting and the env, so they all see the same prompts.
    """
    # A chat-rendered prompt already carries the template's special tokens (BOS included) as text.
    rendered = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
    ids = list(tokenizer(prompt, add_special_tokens=not rendered)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if not ids:
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id]
    return ids


def encode_response(tokenizer, response: str) -> list[int]:
    """Response ids without special tokens (the caller appends EOS), as TRL tokenizes completions."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


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


class TokenEnv(gym.Env):
    """One prompt at a time as a standard gymnasium env (state: fixed-width ids + mask; action: token id)."""

    def __init__(self, tokenizer, prompts: Sequence[str], reward_fn: RewardFn | None = None, max_new_tokens: int = 32,
                 context_length: int | None = None, step_reward_fn=None, eos_ids: Sequence[int] | None = None):
        self.prompts = list(prompts)
        self._kwargs = dict(reward_fn=reward_fn, max_new_tokens=max_new_tokens, context_length=context_length, step_reward_fn=step_reward_fn,
                            eos_ids=eos_ids)
        self.tokenizer = tokenizer
        probe = VectorTokenEnv(tokenizer, self.prompts, **self._kwargs)  # validates every prompt's length
        self.observation_space = gym.spaces.Dict({k: gym.spaces.Box(0, v.high.max(), (probe.width,), np.int64)
                                                  for k, v in probe.single_observation_space.spaces.items()})
        self.action_space = probe.single_action_space
        self._width = probe.width
        self._index = 0

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        index = int(self.np_random.integers(len(self.prompts))) if options is None or "prompt_index" not in options else options["prompt_index"]
        self._env = VectorTokenEnv(self.tokenizer, [self.prompts[index]], **self._kwargs)
        obs, info = self._env.reset()
        return self._pad(obs), {"prompt_index": index}

    def _pad(self, obs):
        # Every prompt is left-padded to the width of the longest, so observations share one shape.
        out = {}
        for key, value in obs.items():
            row = value[0].numpy()
            fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
            out[key] = np.concatenate([np.full(self._width - len(row), fill), row]).astype(np.int64)
        return out

    def step(self, action):
        obs, rewards, terminated, truncated, info = self._env.step(np.asarray([action]))
        return self._pad(obs), float(rewards[0]), bool(terminated[0]), bool(truncated[0]), {"response": self._env.response_text(0)}


class KVCachePolicy:
    """Drives a causal LM one token at a time with its key/value cache: one incremental forward per step.

    Uses the model's current cache argument (`cache=`, transformers >= 5.x) and falls back to
    `past_key_values=` on versions that only have that one.
    """

    def __init__(self, model):
        self.model = model
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

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


class SequenceBandit(gym.Env):
    """One-step episodes: observe a prompt, act with a whole response (token ids), receive R(prompt, response)."""

    def __init__(self, tokenizer, prompts: Sequence[str], reward_fn: RewardFn):
        self.tokenizer, self.prompts, self.reward_fn = tokenizer, list(prompts), reward_fn
        self.observation_space = gym.spaces.Discrete(len(self.prompts))  # the prompt index
        self.action_space = gym.spaces.Sequence(gym.spaces.Discrete(len(tokenizer)))

    def reset(self, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._index = int(self.np_random.integers(len(self.prompts))) if not options else int(options["prompt_index"])
        return self._index, {"prompt": self.prompts[self._index]}

    def step(self, action: Sequence[int]):
        text = self.tokenizer.decode(list(action), skip_special_tokens=True)
        return self._index, float(self.reward_fn(self.prompts[self._index], text)), True, False, {"response": text}


def evaluate_lm(model, tokenizer, prompts: Sequence[str], reward_fn: RewardFn, max_new_tokens: int = 24, samples: int = 1,
                greedy: bool = False, seed: int = 0, batch_size: int = 64, details: bool = False) -> dict[str, Any]:
    """Mean reward, response length (tokens) and distinct-1/2 over held-out prompts, generated through the env."""
    from orl.text.data import distinct_n

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
