"""Rewards of text completions in TRL's convention: f(prompts, completions, completion_ids, **columns) ->
list[float | None] (None: this function does not score that completion), so a TRL user's reward function works
unchanged. orl's per-sample rewards R(prompt, response) (built-ins, reward models) are adapted to it, and back."""
from __future__ import annotations

import asyncio
import inspect
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

RewardFunc = Callable[..., Sequence[float | None]]


TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")  # what TRL names every reward function's inputs


def as_reward_func(fn: Callable) -> RewardFunc:
    """`fn` in TRL's signature: a function that takes any of `prompts`, `completions`, `completion_ids` (TRL's own
    `get_soft_overlong_punishment` takes only `completion_ids`) is used as it is; a per-sample R(prompt, response) is
    called once per completion."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        parameters = {}
    if any(name in parameters for name in TRL_ARGUMENTS) or (any(p.kind is p.VAR_KEYWORD for p in parameters.values())
                                         and not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
                                                     for p in parameters.values())):
        return fn  # TRL's signature (or f(**kwargs), which TRL also calls with keywords)

    def per_sample(prompts, completions, **_: Any) -> list[float]:
        return [float(fn(p, c)) for p, c in zip(prompts, completions)]

    per_sample.__name__ = reward_name(fn)
    per_sample.orl_text_only = True  # R(prompt, response) reads the rendered text, also on chat rows
    return per_sample


def reward_name(fn: Callable) -> str:
    """The name TRL logs a reward function under (rewards/<name>/mean)."""
    return getattr(fn, "__name__", type(fn).__name__)


@dataclass
class RewardState:
    """What a reward function gets as `trainer_state` (TRL passes transformers' TrainerState, for reward shaping by
    training progress): the number of updates so far and the run's total (0 where unknown: outside orl-train)."""

    global_step: int = 0
    max_steps: int = 0


TRL_KEYWORDS = ("trainer_state", "log_metric", "log_extra")
NOT_COLUMNS = ("prompt", "completion", "completion_ids", *TRL_KEYWORDS)  # TRL passes every other column of the rows


def _discard(*_: Any, **__: Any) -> None:
    """`log_extra` (TRL: a column of its completions table, which orl does not keep) and `log_metric` where nothing logs."""


def call_reward(fn: RewardFunc, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[Sequence[int]],
                columns: Mapping[str, Sequence[Any]] | None = None, state: RewardState | None = None,
                log_metric: Callable[[str, float], None] | None = None) -> list[float | None]:
    """One reward function on a batch, as TRL's GRPOTrainer calls it (`_calculate_rewards`): the rows' other columns as
    keywords and, on chat rows (a `prompt_messages` column), each prompt as its message list and each completion as one
    assistant message. Functions that read the rendered text (orl's built-ins, R(prompt, response), reward models
    that apply their own template: marked `orl_text_only`) get the text. TRL's `trainer_state`, `log_metric` and
    `log_extra` keywords go to a function that accepts them; an `async def` function runs on one background event
    loop (TRL's way: it also works where a loop is already running, as in a notebook)."""
    columns = {key: values for key, values in (columns or {}).items() if key not in NOT_COLUMNS}
    messages = columns.get("prompt_messages")
    if messages is not None and all(m is not None for m in messages) and not getattr(fn, "orl_text_only", False):
        prompts, completions = list(messages), [[{"role": "assistant", "content": c}] for c in completions]
    trl_keywords = {"trainer_state": state or RewardState(), "log_metric": log_metric or _discard, "log_extra": _discard}
    extra = {name: value for name, value in trl_keywords.items() if _accepts(fn, name)}
    values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extra)
    if inspect.isawaitable(values):
        values = asyncio.run_coroutine_threadsafe(_awaited(values), _event_loop()).result()
    values = list(values)
    if len(values) != len(prompts):
        raise ValueError(f"reward function {reward_name(fn)} returned {len(values)} values for {len(prompts)} completions")
    return values


def _accepts(fn: Callable, name: str) -> bool:
    """Whether fn takes the keyword `name` (by name or through **kwargs)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


async def _awaited(awaitable):
    return await awaitable


_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> asyncio.AbstractEventLoop:
    """One event loop in a daemon thread for every async reward call (TRL: start_event_loop_in_daemon), so clients a
    reward function keeps between calls stay on the loop they were made on."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, daemon=True, name="orl-async-rewards").start()
    return _LOOP


def per_sample_reward(funcs: Sequence[Callable], weights: Sequence[float] | None = None,
                      contexts: Mapping[str, Mapping[str, Any]] | None = None, tokenizer=None) -> Callable[[str, str], float]:
    """R(prompt, response) = sum_k w_k f_k(...) for one completion (None counts as 0): what evaluation and the
    sequence-level agents (A-LoL's value targets) call. `contexts` maps a (rendered) prompt to its row's other
    columns, so a function there gets the row's columns and, on chat rows, messages, as in GRPO; with `tokenizer`,
    `completion_ids` are the response text re-tokenized (GRPO passes the sampled ids), else empty."""
    batched = [as_reward_func(f) for f in funcs]
    weights = list(weights) if weights is not None else [1.0] * len(batched)
    if len(batched) == 1 and weights == [1.0] and batched[0] is not funcs[0]:
        return funcs[0]  # already per-sample (and reads the rendered text)
    contexts = contexts or {}
    read_ids = tokenizer is not None and any(_accepts(fn, "completion_ids") and not getattr(fn, "orl_text_only", False) for fn in batched)

    def reward(prompt: str, response: str) -> float:
        columns = {key: [value] for key, value in contexts.get(prompt, {}).items()}
        ids = list(tokenizer(response, add_special_tokens=False)["input_ids"]) if read_ids else []
        total = 0.0
        for weight, fn in zip(weights, batched):
            value = call_reward(fn, [prompt], [response], [ids], columns)[0]
            total += 0.0 if value is None or (isinstance(value, float) and math.isnan(value)) else weight * float(value)
        return total

    reward.__name__ = "+".join(reward_name(f) for f in batched)
    return reward
