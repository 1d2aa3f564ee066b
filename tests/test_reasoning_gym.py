"""reasoning-gym tasks as orl text datasets (envs/reasoning_gym.py): distinct questions, scoring by the task's own
score_answer, held-out evaluation questions, and GRPO through orl-train with the task's reward or a user's program."""
import json

import pytest

reasoning_gym = pytest.importorskip("reasoning_gym", reason="pip install reasoning-gym (the [dev] and [tasks] extras)")

from orl.envs.reasoning_gym import extract, load_rows, score  # noqa: E402
from tests.lm_archs import build_tiny_causal_lm  # noqa: E402

OPTIONS = {"size": 60, "seed": 3, "min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def test_rows_are_distinct_questions_scored_by_the_tasks_own_score_answer():
    rows = load_rows("reasoning_gym:basic_arithmetic", OPTIONS)
    questions = [r["prompt"] for r in rows]
    assert len(questions) == len(set(questions)) and 0 < len(rows) <= 60
    assert all(r["prompt"].endswith(" Answer:") and r["entry"]["metadata"]["source_dataset"] == "basic_arithmetic" for r in rows)
    entries = [r["entry"] for r in rows[:3]]
    right = [f" {r['answer']}\nmore text" for r in rows[:3]]
    tagged = [f"thinking <answer>{r['answer']}</answer>" for r in rows[:3]]
    wrong = [" 12345" for _ in rows[:3]]
    assert score([r["prompt"] for r in rows[:3]], right, entry=entries) == [1.0, 1.0, 1.0]
    assert score([r["prompt"] for r in rows[:3]], tagged, entry=entries) == [1.0, 1.0, 1.0]
    assert max(score([r["prompt"] for r in rows[:3]], wrong, entry=entries)) < 1.0  # the task may give partial credit
    assert extract(" 7 \n8") == "7"


def test_unknown_task_and_options_are_one_error():
    from orl.errors import ConfigError

    with pytest.raises(ConfigError, match="has no task 'no_such_task'"):
        load_rows("reasoning_gym:no_such_task")
    with pytest.raises(ConfigError, match="rejected the options"):
        load_rows("reasoning_gym:basic_arithmetic", {"no_such_option": 1})


@pytest.mark.parametrize("reward", [None, "answers:exact"])
def test_grpo_on_a_reasoning_gym_task_through_orl_train(tmp_path, monkeypatch, reward):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.logger import read_metrics

    model = build_tiny_causal_lm("qwen2", tmp_path / "qwen2")
    (tmp_path / "answers.py").write_text(  # a user's reward in TRL's signature, reading the dataset's `answer` column
        "def exact(prompts, completions, answer, **kwargs):\n"
        "    return [float(c.strip().split(' ')[0] == a) if c.strip() else 0.0 for c, a in zip(completions, answer)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = "{" + ", ".join(f"{k}: {v}" for k, v in OPTIONS.items()) + "}"
    overrides = ["agent=grpo", "dataset=reasoning_gym:basic_arithmetic", f"lm.task={task}", f"lm.model={model}", "agent.num_generations=2",
                 "agent.max_completion_length=3", "lm.max_new_tokens=3", "steps=2", "batch_size=2", "eval.every=2", "log.every=1",
                 "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    if reward:
        overrides.append(f"lm.reward={reward}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        summary = run_train(compose(config_name="train", overrides=overrides))
    rows = read_metrics(tmp_path / "run")
    name = "reasoning_gym" if reward is None else "exact"
    assert f"train/rewards/{name}/mean" in next(r for r in rows if "train/loss" in r)
    assert 0.0 <= summary["return_mean"] <= 1.0
    provenance = json.loads((tmp_path / "run" / "provenance.json").read_text())["data"]
    all_rows = load_rows("reasoning_gym:basic_arithmetic", OPTIONS)
    held_out = {all_rows[i]["prompt"] for i in provenance["held_out_rows"]}
    assert held_out and provenance["sha256"] and provenance["task_options"]["seed"] == 3
    assert held_out.isdisjoint(r["prompt"] for i, r in enumerate(all_rows) if i not in set(provenance["held_out_rows"]))


@pytest.mark.slow
def test_the_embedded_tiny_lm_answers_basic_arithmetic_sometimes_not_always(tmp_path):
    """The embedded model is pre-trained on the task's format with half-right answers: GRPO has room above and below."""
    import numpy as np
    import torch

    from orl.envs.tiny_lm import build_tiny_lm
    from orl.text.generation import KVCachePolicy, VectorTokenEnv, rollout
    from orl.text.runtime import load_lm

    model, tokenizer = load_lm(str(build_tiny_lm(tmp_path / "tiny-lm")))
    rows = load_rows("reasoning_gym:basic_arithmetic", {"size": 200, "seed": 7, "min_terms": 2, "max_terms": 2, "min_digits": 1,
                                                        "max_digits": 1, "operators": ["+", "-"], "allow_parentheses": False,
                                                        "allow_negation": False})
    prompts = [r["prompt"] for r in rows]
    out = rollout(KVCachePolicy(model), VectorTokenEnv(tokenizer, prompts, None, 6), greedy=True, generator=torch.Generator().manual_seed(0))
    exact = np.mean([float(extract(t) == r["answer"]) for t, r in zip(out["texts"], rows)])
    assert 0.05 < exact < 0.8, exact
