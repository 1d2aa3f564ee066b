"""Language-model generation as gymnasium environments (a token-level MDP), over the batched token MDP of
`orl.text.generation.VectorTokenEnv`:

* `TokenEnv`: one prompt at a time as a gymnasium env (`Discrete(vocab)` actions).
* `SequenceBandit`: the one-step view (action = a whole response) used by A-LoL and best-of-n.

Models are Hugging Face causal LMs loaded with `orl.text.runtime.load_lm(path)`: the project's embedded tiny
GPT-2 (`orl.envs.tiny_lm`) or any hub id / local path a user gives.
"""
from __future__ import annotations

from typing import Sequence

import gymnasium as gym
import numpy as np

from orl.text.generation import RewardFn, VectorTokenEnv


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
