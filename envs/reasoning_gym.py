"""Verifiable tasks from reasoning-gym (`pip install reasoning-gym`: 100+ procedural generators that run offline) as
orl text datasets, scored by each task's own `score_answer`.

    orl-train agent=grpo dataset=reasoning_gym:basic_arithmetic 'lm.task={size: 2000, seed: 0, min_terms: 2, max_terms: 2, max_digits: 1}'

`dataset=reasoning_gym:<task>` generates `size` items with the task's generator (its options, e.g. `min_terms`, go
in `lm.task`), drops repeated questions, and gives rows {"prompt", "answer", "entry"}: the prompt is the question
followed by `prompt_suffix`, `entry` the generator's item (what `score_answer` reads). orl-train's `lm.holdout`
then holds out a fraction of the distinct questions (drawn with the run's seed) as the evaluation prompts, never
trained on; `lm.task.seed` separates the task's generation from the run's seed.

The reward is `lm.reward=reasoning_gym` (set by default for these datasets): the task's `score_answer` on the
completion's answer, the text inside <answer>...</answer> when the completion has those tags, else the completion up
to its first line break, stripped. Called in TRL's signature, so it composes with other reward functions.
"""
from __future__ import annotations

from typing import Any, Sequence

from orl.errors import ConfigError

PREFIX = "reasoning_gym:"
DEFAULTS = {"size": 1000, "seed": 0, "prompt_suffix": " Answer:"}


def is_task(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def _module():
    try:
        import reasoning_gym
    except ImportError as exc:
        raise ConfigError("dataset=reasoning_gym:<task> needs reasoning-gym: pip install reasoning-gym") from exc
    return reasoning_gym


def load_rows(spec: str, options: dict[str, Any] | None = None) -> list[dict]:
    """Rows of `reasoning_gym:<task>` with generator options (plus size, seed, prompt_suffix)."""
    reasoning_gym = _module()
    task = str(spec)[len(PREFIX):]
    settings = {**DEFAULTS, **(options or {})}
    size, seed, suffix = int(settings.pop("size")), int(settings.pop("seed")), str(settings.pop("prompt_suffix"))
    if task not in reasoning_gym.factory.DATASETS:
        known = ", ".join(sorted(reasoning_gym.factory.DATASETS)[:12])
        raise ConfigError(f"dataset={spec}: reasoning-gym has no task {task!r} (e.g. {known}, ...; reasoning_gym.factory.DATASETS lists all)")
    try:
        generated = reasoning_gym.create_dataset(task, size=size, seed=seed, **settings)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(f"dataset={spec}: reasoning-gym rejected the options {settings} ({type(exc).__name__}: {exc}); "
                          "lm.task takes size, seed, prompt_suffix and the task's own generator options") from exc
    rows, seen = [], set()
    for entry in generated:
        if entry["question"] in seen:  # procedural generators repeat small problems: one row per question
            continue
        seen.add(entry["question"])
        rows.append({"prompt": entry["question"] + suffix, "answer": str(entry["answer"]), "entry": entry})
    return rows


def extract(completion: str) -> str:
    """The answer in a completion: inside <answer></answer> if tagged, else up to the first line break."""
    from reasoning_gym.utils import extract_answer

    tagged = extract_answer(completion) if "<answer>" in completion else None
    return (tagged if tagged is not None else completion.split("\n", 1)[0]).strip()


def score(prompts: Sequence[str], completions: Sequence[str], entry: Sequence[dict] | None = None, **_: Any) -> list[float | None]:
    """Each completion scored by its task's own score_answer (None for rows that are not reasoning-gym items)."""
    reasoning_gym = _module()
    if entry is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for completion, item in zip(completions, entry):
        if not isinstance(item, dict) or "metadata" not in item:
            out.append(None)
            continue
        scorer = reasoning_gym.get_score_answer_fn(item["metadata"]["source_dataset"])
        out.append(float(scorer(extract(completion), item)))
    return out


score.__name__ = "reasoning_gym"
score.orl_text_only = True
