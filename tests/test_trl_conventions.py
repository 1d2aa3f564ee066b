"""What a TRL user brings works as in TRL: implicit-prompt preference rows, TRL's own reward helpers, reward functions
that use `trainer_state` / `log_metric` or are `async`, completions that already end with EOS, TRL's DPO metric names.
Each test failed before its fix."""
import json
from pathlib import Path

import gymnasium as gym
import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is a test-only dependency (pip install -e .[dev])")
datasets = pytest.importorskip("datasets")

import orl  # noqa: E402
from orl.errors import DataError  # noqa: E402
from orl.text.data import PromptBatch, load_text_rows  # noqa: E402
from orl.text.rewards import as_reward_func, call_reward, per_sample_reward  # noqa: E402
from tests.lm_archs import build_tiny_causal_lm  # noqa: E402
from tests.test_trl_parity import assert_pair_ids_equal_trl, trl_dpo_trainer  # noqa: E402

SPACE = gym.spaces.Discrete(2)
USER = {"role": "user", "content": "What color is the sky?"}
SYSTEM = {"role": "system", "content": "Answer briefly."}
IMPLICIT = [  # TRL's implicit-prompt preference rows: the prompt is the shared start of chosen and rejected
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"},
    {"chosen": "abc", "rejected": "abcd"},
    {"chosen": [USER, {"role": "assistant", "content": "Blue."}], "rejected": [USER, {"role": "assistant", "content": "Green."}]},
    {"chosen": [SYSTEM, USER, {"role": "assistant", "content": "Blue."}],
     "rejected": [SYSTEM, USER, {"role": "assistant", "content": "Green."}]},
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(build_tiny_causal_lm("llama", tmp_path_factory.mktemp("trl_conventions") / "llama"))


def test_implicit_prompt_preference_rows_split_as_trl_extract_prompt(tmp_path):
    """Rows of chosen/rejected only (trl-lib/ultrafeedback_binarized) were refused: 'missing field(s) ['prompt']'."""
    from trl.data_utils import extract_prompt

    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in IMPLICIT))
    rows = load_text_rows(path, "pairs")
    for row, source in zip(rows, IMPLICIT):
        assert {k: row[k] for k in ("prompt", "chosen", "rejected")} == extract_prompt(dict(source))
    assert rows[3]["prompt"] == [USER] and rows[0]["prompt"] == "The sky is" and rows[0]["chosen"] == " blue."

    bad = tmp_path / "no_shared_start.jsonl"
    bad.write_text(json.dumps({"chosen": [USER], "rejected": [SYSTEM]}) + "\n")
    with pytest.raises(DataError, match="share no prompt"):
        load_text_rows(bad, "pairs")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"chosen": "text", "rejected": [USER]}) + "\n")
    with pytest.raises(DataError, match="add a prompt field"):
        load_text_rows(mixed, "pairs")


def test_trl_reward_helpers_that_take_only_completion_ids():
    """TRL's get_soft_overlong_punishment is `__call__(self, completion_ids, **kwargs)`; orl took it for R(prompt,
    response), called it positionally and failed with a TypeError."""
    from trl.rewards import get_soft_overlong_punishment

    punish = get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)
    ids = [[1] * 3, [1] * 6, [1] * 9]
    expected = punish(completion_ids=ids)
    assert call_reward(as_reward_func(punish), ["p"] * 3, ["c"] * 3, ids, {}) == expected
    assert expected[0] == 0.0 and -1.0 <= expected[1] < 0.0 and expected[2] == -1.0  # a case that tells them apart


def test_reward_functions_get_trainer_state_log_metric_and_may_be_async(llama):
    """TRL passes trainer_state, log_metric and log_extra and runs async reward functions; orl passed none of them
    (TypeError: missing 'trainer_state') and returned an un-awaited coroutine."""
    seen = {}

    import asyncio

    seen = {}

    def by_progress(completions, trainer_state, log_metric, log_extra, **kwargs):
        seen["step"], seen["max_steps"] = trainer_state.global_step, trainer_state.max_steps
        log_metric("shaping/weight", seen.get("weight", 0.25))
        log_extra("note", ["x"] * len(completions))
        return [1.0] * len(completions)

    async def judged(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    assert call_reward(judged, ["p", "q"], ["ab", "abc"], [[], []]) == [2.0, 3.0]

    async def inside_a_running_loop():  # a notebook: asyncio.run would refuse to start a second loop here
        return call_reward(judged, ["p"], ["abcd"], [[]])

    assert asyncio.run(inside_a_running_loop()) == [4.0]
    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 2, "max_completion_length": 3, "lr": 0.0})
    agent.set_rewards([by_progress, judged])
    agent.max_steps = 7  # orl-train sets the run's steps
    agent.update(PromptBatch(["count: 1", "count: 2"], torch.arange(2)))
    seen["weight"] = 99.0
    agent.score(["count: 3"], [" 4"], [[9]])  # as evaluation scores: what it logs is not this step's training metric
    seen["weight"] = 0.25
    metrics = agent.update(PromptBatch(["count: 1", "count: 2"], torch.arange(2)))
    assert seen["step"] == 1 and seen["max_steps"] == 7  # the update count before this step's update
    assert float(metrics["shaping/weight"]) == 0.25
    assert float(metrics["rewards/judged/mean"]) >= 0.0 and "rewards/judged/std" in metrics


def test_a_function_that_scores_no_completion_of_a_batch_logs_no_nan(llama):
    """TRL's multi-task pattern: a function returns None for rows it does not score. A batch where it scores none
    logged rewards/<f>/mean = NaN, which orl's Trainer takes for divergence and stops the run."""
    def math_only(completions, task, **kwargs):
        return [float(len(c)) if t == "math" else None for c, t in zip(completions, task)]

    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 2, "max_completion_length": 3, "lr": 0.0})
    agent.set_rewards([math_only])
    metrics = agent.update(PromptBatch(["count: 1", "count: 2"], torch.arange(2), {"task": ["text", "text"]}))
    assert all(bool(torch.isfinite(v)) for v in metrics.values()), metrics
    assert "rewards/math_only/mean" not in metrics and "reward" not in metrics
    metrics = agent.update(PromptBatch(["count: 1", "count: 2"], torch.arange(2), {"task": ["math", "text"]}))
    assert float(metrics["rewards/math_only/mean"]) >= 0.0 and "rewards/math_only/std" in metrics and "reward" in metrics


def test_evaluation_rewards_get_the_completion_ids(llama):
    """Evaluation and A-LoL score through R(prompt, response); a TRL reward reading completion_ids got [] there."""
    from orl.text.runtime import load_tokenizer

    tokenizer = load_tokenizer(llama)

    def token_count(completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    response = " 5 6 7"
    assert per_sample_reward([token_count], tokenizer=tokenizer)("count: 4", response) == len(
        tokenizer(response, add_special_tokens=False)["input_ids"]) > 0


def test_completions_that_end_with_eos_get_no_second_eos_as_in_trl(llama, tmp_path):
    """TRL appends EOS only to a completion that does not end with it; orl appended it always (two EOS, both trained)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama)
    eos = tokenizer.eos_token
    rows = [{"prompt": "count: 3 4", "chosen": " 5 6" + eos, "rejected": " 2 1"},
            {"prompt": "count: 10", "chosen": " 11 12", "rejected": " 3" + eos}]
    agent = orl.make_agent("dpo", SPACE, SPACE, {"model_path": llama})
    trainer = trl_dpo_trainer(agent, tokenizer, rows, tmp_path)
    for _, chosen_ids, rejected_ids in assert_pair_ids_equal_trl(trainer, tokenizer, rows):
        assert chosen_ids.count(tokenizer.eos_token_id) == 1 and rejected_ids.count(tokenizer.eos_token_id) == 1


def test_dpo_logs_under_trl_metric_names(llama):
    """Dashboards keyed on TRL's names (rewards/chosen, rewards/margins, ...) found reward_chosen, margin, ..."""
    from orl.text.encoding import pair_buffer

    agent = orl.make_agent("dpo", SPACE, SPACE, {"model_path": llama, "lr": 1e-4})
    buffer = pair_buffer(agent.tokenizer, ["count: 3 4", "count: 10"], [" 5 6", " 11 12"], [" 2 1", " 3"], device="cpu")
    agent.prepare(buffer)
    metrics = agent.update(buffer.sample(2, torch.Generator().manual_seed(0)))
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(metrics)
    assert float(metrics["rewards/margins"]) == pytest.approx(float(metrics["rewards/chosen"]) - float(metrics["rewards/rejected"]), abs=1e-6)


def test_a_template_whose_generation_prompt_the_answer_does_not_repeat_splits_as_trl(llama, tmp_path):
    """DeepSeek-R1-style templates open the answer with a think tag that the rendered conversation drops; orl refused
    every such row ('cannot split prompt from completion'), TRL splits where the two renderings diverge and warns."""
    from transformers import AutoTokenizer

    from orl.text.encoding import render_chat

    tokenizer = AutoTokenizer.from_pretrained(llama)
    # the generation prompt ends with a token the rendered answer lacks ("1", a think tag's stand-in in this word-level
    # vocabulary); the third answer begins with the same character, where a split by characters would cut a token
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant: 1\n{% endif %}")
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]}
            for p, c, r in (("count: 3 4", "5 6", "2 1"), ("count: 10", "11 12", "3"), ("count: 7", "12 13", "14 1"))]
    with pytest.warns(UserWarning, match="'1\\\\n' is not in the rendered answer"):
        rendered = render_chat(rows, tokenizer, ["prompt", "chosen", "rejected"])
    assert rendered[0]["prompt"] == "<s>user: count: 3 4\nassistant: " and rendered[0]["chosen"] == "5 6\n"
    assert rendered[2]["prompt"] == "<s>user: count: 7\nassistant: " and rendered[2]["chosen"] == "12 13\n"  # not "2 13"
    agent = orl.make_agent("dpo", SPACE, SPACE, {"model_path": llama})
    trainer = trl_dpo_trainer(agent, tokenizer, rows, tmp_path)
    assert_pair_ids_equal_trl(trainer, tokenizer, rendered)


@pytest.mark.parametrize("value, expected", [(True, "group"), (False, "none")])
def test_scale_rewards_takes_trl_booleans(llama, value, expected):
    """TRL's GRPOConfig maps scale_rewards=True/False to group/none; orl refused the booleans."""
    assert trl.GRPOConfig(output_dir="unused", scale_rewards=value, report_to=[], use_cpu=True, bf16=False).scale_rewards == expected
    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "scale_rewards": value, "num_generations": 2})
    assert agent.cfg.scale_rewards == expected


def test_columns_named_like_trl_keywords_and_partly_chat_batches():
    """A dataset column called completion_ids or trainer_state reached the function twice (TypeError: multiple values);
    a batch where only some prompts have messages handed a chat function None as a prompt."""
    def both(prompts, completions, completion_ids, trainer_state, **columns):
        return [float(len(ids)) + (0.5 if isinstance(p, str) else 0.0) for p, ids in zip(prompts, completion_ids)]

    columns = {"completion_ids": [["stale"], ["stale"]], "trainer_state": ["x", "y"], "completion": ["c", "d"],
               "prompt_messages": [[{"role": "user", "content": "hi"}], None]}
    assert call_reward(both, ["p", "q"], ["a", "b"], [[1, 2], [3]], columns) == [2.5, 1.5]  # real ids, text prompts


def test_chat_template_kwargs_reach_every_rendering(llama, tmp_path):
    """Qwen3-style templates take variables (enable_thinking); orl had no way to pass them (TRL: chat_template_kwargs)."""
    from hydra import compose, initialize_config_dir
    from transformers import AutoTokenizer

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.text.conversation import ConversationFormat

    tokenizer = AutoTokenizer.from_pretrained(llama)
    tokenizer.chat_template = ("{% if enable_thinking is not defined or enable_thinking %}{{ raise_exception('thinking is on') }}"
                               "{% endif %}{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                               "{% if add_generation_prompt %}assistant {% endif %}")
    chat_dir = tmp_path / "chat-llama"
    chat_dir.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (Path(llama) / name).exists():
            (chat_dir / name).write_bytes((Path(llama) / name).read_bytes())
    tokenizer.save_pretrained(chat_dir)
    _, ids = ConversationFormat(tokenizer, [tokenizer.eos_token_id], template_kwargs={"enable_thinking": False}).opening(None, "count: 3")
    assert ids[0] == tokenizer.bos_token_id
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in (("count: 3 4", "5 6", "2 1"), ("count: 10", "11 12", "3"))]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["agent=dpo", "agent.lr=3e-4", f"dataset={path}", f"lm.model={chat_dir}", "lm.holdout=0", "lm.num_eval_prompts=2",
                 "lm.max_new_tokens=2", "steps=1", "eval.every=1", "batch_size=2", "log.progress=false", "log.tensorboard=false",
                 "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        with pytest.raises(DataError, match="thinking is on"):
            run_train(compose(config_name="train", overrides=overrides))
        summary = run_train(compose(config_name="train", overrides=overrides + ["lm.chat_template_kwargs={enable_thinking: false}"]))
    assert summary["return_mean"] == summary["return_mean"]  # ran to its evaluation
