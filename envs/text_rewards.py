"""Reward functions for text tasks: model-free tasks that need no download, and learned reward models.

Each is a callable R(prompt, response) -> float.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import torch

from orl.errors import ConfigError

_INT = re.compile(r"-?\d+")


def increasing_numbers(prompt: str, response: str) -> float:
    """Fraction of strictly increasing adjacent pairs in the number sequence the response continues.

    The prompt's last number starts the sequence ("count: 7" + " 9 12 15" -> pairs 7<9, 9<12, 12<15).
    A response with no number scores 0.
    """
    continuation = [int(x) for x in _INT.findall(response)]
    if not continuation:
        return 0.0
    start = [int(x) for x in _INT.findall(prompt)][-1:]
    numbers = start + continuation
    if len(numbers) < 2:
        return 0.0
    pairs = list(zip(numbers, numbers[1:]))
    return sum(b > a for a, b in pairs) / len(pairs)


def keyword(word: str) -> Callable[[str, str], float]:
    """1 if the response contains `word` (case-insensitive), else 0."""
    return lambda prompt, response: float(word.lower() in response.lower())


def length_window(low: int, high: int, unit: str = "words") -> Callable[[str, str], float]:
    """1 inside [low, high] words (or characters), decaying linearly to 0 at twice the distance."""
    def reward(prompt: str, response: str) -> float:
        n = len(response.split()) if unit == "words" else len(response)
        if low <= n <= high:
            return 1.0
        gap = low - n if n < low else n - high
        return max(0.0, 1.0 - gap / max(low if n < low else high, 1))
    return reward


TEXT_REWARDS = {"increasing_numbers": increasing_numbers}


class SequenceClassifierReward:
    """Any Hugging Face sequence-classification model given by path: R = sigmoid(logit) of the last label.

    A conversation is rendered with the reward model's own chat template (the messages of the row's prompt plus
    the completion as the assistant's turn), as TRL renders the reward model's inputs, not with the policy's; plain
    text is `template` and gets the reward model's special tokens once (no second BOS when the text starts with it).
    Called per sample (prompt, response) or in TRL's signature with `prompt_messages` (chat datasets)."""

    def __init__(self, path: str, device: str = "cpu", template: str = "{prompt}{response}"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        self.template, self.device = template, device
        self.__name__ = Path(path).name
        self.orl_text_only = True  # renders chat rows itself from the prompt_messages column

    def text(self, prompt: str, response: str, messages: list[dict] | None = None) -> tuple[str, bool]:
        """(the reward model's input text, whether the tokenizer should add its special tokens)."""
        if messages is not None and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(list(messages) + [{"role": "assistant", "content": response}], tokenize=False), False
        text = self.template.format(prompt=prompt, response=response)
        bos = self.tokenizer.bos_token
        return text, not (bos and text.startswith(bos))

    @torch.no_grad()
    def score(self, prompt: str, response: str, messages: list[dict] | None = None) -> float:
        text, special = self.text(prompt, response, messages)
        inputs = self.tokenizer(text, return_tensors="pt", truncation=True, add_special_tokens=special).to(self.device)
        return float(torch.sigmoid(self.model(**inputs).logits[0, -1]))

    def __call__(self, prompts, completions=None, prompt_messages=None, **_: Any):
        if isinstance(prompts, str):  # R(prompt, response)
            return self.score(prompts, completions)
        messages = prompt_messages or [None] * len(prompts)
        return [self.score(p, c, m) for p, c, m in zip(prompts, completions, messages)]


def make_text_reward(spec: str, device: str | torch.device = "cpu") -> Callable[[str, str], float]:
    """A reward R(prompt, response) from a spec string (`lm.reward`):

    * a built-in: `increasing_numbers`, `keyword:<word>`, `length_window:<low>:<high>`;
    * a directory holding a Hugging Face sequence-classification model (`config.json` whose
      architecture ends in ForSequenceClassification): sigmoid of its last logit;
    * an orl `reward_model` run directory (its `checkpoint.pt` and `config.yaml`): the trained
      Bradley-Terry model's score;
    * `package.module:function`: a Python function, in TRL's signature (prompts=, completions=, completion_ids=,
      every other dataset column; returns a list of float or None) or R(prompt, response). The module is imported
      from the installed packages or the current directory.
    """
    from pathlib import Path

    name, _, arguments = spec.partition(":")
    if spec in TEXT_REWARDS:
        return TEXT_REWARDS[spec]
    if spec == "reasoning_gym":  # dataset=reasoning_gym:<task>: each task's own score_answer
        from orl.envs.reasoning_gym import score

        return score
    if name == "keyword" and arguments:
        return keyword(arguments)
    if name == "length_window" and arguments.count(":") == 1:
        low, high = arguments.split(":")
        return length_window(int(low), int(high))
    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
        return reward_function(spec)
    path = Path(spec).expanduser()
    if (path / "checkpoint.pt").exists() and (path / "config.yaml").exists():
        return load_reward_model_run(path, device)
    if (path / "config.json").exists():
        import json

        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in architectures):
            return SequenceClassifierReward(str(path), str(device))
        raise ConfigError(f"lm.reward={spec}: {path} holds a {architectures or 'model'} without a sequence-classification head; "
                         "give a ...ForSequenceClassification model, an orl reward_model run directory, or a built-in reward")
    raise ConfigError(f"lm.reward={spec!r} is neither a built-in reward ({', '.join(TEXT_REWARDS)}, keyword:<word>, "
                     "length_window:<low>:<high>), nor a directory with a sequence-classification model or an orl reward_model run")


def reward_function(spec: str) -> Callable:
    """The function `package.module:function` names (lm.reward=my_rewards:exact_match)."""
    import importlib
    import sys

    module_name, function_name = spec.split(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # a module in the directory orl-train runs from, as `python -m` finds it
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"lm.reward={spec}: cannot import module {module_name!r} ({exc}); give package.module:function of an "
                          "installed package or of a .py file in the current directory") from exc
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ConfigError(f"lm.reward={spec}: module {module_name} has no function {function_name!r}")
    return fn


def load_reward_model_run(run_dir, device: str | torch.device = "cpu"):
    """The Bradley-Terry reward model an `orl-train agent=reward_model` run trained, ready to score."""
    import gymnasium as gym
    from omegaconf import OmegaConf

    import orl
    from orl.checkpoint import load_checkpoint

    run_cfg = OmegaConf.load(f"{run_dir}/config.yaml")
    options = OmegaConf.to_container(run_cfg.agent, resolve=True)
    if options.pop("name") != "reward_model":
        raise ConfigError(f"lm.reward={run_dir} is a {run_cfg.agent.name} run, not an `orl-train agent=reward_model` run; give a "
                          "reward_model run directory, a sequence-classification model, a built-in or package.module:function")
    space = gym.spaces.Discrete(2)
    model = orl.make_agent("reward_model", space, space, options, device)
    model.load_state_dict(load_checkpoint(f"{run_dir}/checkpoint.pt", map_location=device)["agent"], load_optimizers=False)
    return model
