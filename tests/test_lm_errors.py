"""Bad input on the language-model path is one message naming what, where and how to fix it (an OrlError the CLI
prints as one line with exit 2), never a traceback; a prompt longer than the context is skipped, not a crash."""
import json

import pytest
from omegaconf import OmegaConf

from orl.errors import ConfigError, DataFileNotFound, OrlError
from tests.lm_archs import build_tiny_causal_lm


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_causal_lm("llama", tmp_path_factory.mktemp("errors") / "llama")


def run(tmp_path, *overrides, rows=None):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (rows or [{"prompt": f"count: {i}"} for i in range(8)])))
    base = ["agent=grpo", f"dataset={data}", "agent.num_generations=2", "agent.max_completion_length=3", "lm.max_new_tokens=3",
            "lm.num_eval_prompts=2", "steps=1", "batch_size=2", "eval.every=1", "log.progress=false", "log.tensorboard=false",
            "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return run_train(compose(config_name="train", overrides=base + list(overrides)))


def test_a_directory_with_only_a_tokenizer_is_one_error(tmp_path, llama):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(llama).save_pretrained(tmp_path / "tokenizer_only")
    with pytest.raises(DataFileNotFound, match="no causal language model could be loaded"):
        run(tmp_path, f"lm.model={tmp_path / 'tokenizer_only'}", "lm.reward=increasing_numbers")


def test_a_control_run_as_the_reward_is_one_error(tmp_path, llama):
    control = tmp_path / "iql_run"
    control.mkdir()
    OmegaConf.save(OmegaConf.create({"agent": {"name": "iql"}}), control / "config.yaml")
    (control / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="is a iql run, not an `orl-train agent=reward_model` run"):
        run(tmp_path, f"lm.model={llama}", f"lm.reward={control}")


def test_a_causal_lm_as_the_reward_is_one_error(tmp_path, llama):
    with pytest.raises(ConfigError, match="without a sequence-classification head"):
        run(tmp_path, f"lm.model={llama}", f"lm.reward={llama}")


@pytest.mark.parametrize("spec, message", [("no_such_reward", "neither a built-in reward"),
                                           ("no_such_module:f", "cannot import module"), ("json:no_such_function", "has no function")])
def test_an_unknown_reward_spec_is_one_error(tmp_path, llama, spec, message):
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, f"lm.model={llama}", f"lm.reward={spec}")


def test_the_cli_prints_one_line_and_exits_2(tmp_path, llama, capsys):
    from orl.apps.cli import user_errors

    with pytest.raises(SystemExit) as exit_info, user_errors("orl-train"):
        run(tmp_path, f"lm.model={llama}", "lm.reward=no_such_reward")
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_a_prompt_longer_than_the_context_is_skipped_not_a_crash(tmp_path, llama):
    rows = [{"prompt": " ".join(["7"] * 80)}] + [{"prompt": f"count: {i}"} for i in range(8)]  # the tiny llama's context is 64
    with pytest.warns(UserWarning, match="skipped 1 of .* training prompts longer than"):
        summary = run(tmp_path, f"lm.model={llama}", "lm.reward=increasing_numbers", "lm.holdout=0", "steps=3", rows=rows)
    assert "return_mean" in summary
    assert issubclass(DataFileNotFound, OrlError) and issubclass(ConfigError, OrlError)


def test_a_users_model_gets_no_toy_reward_and_bf16_is_not_silently_ignored(tmp_path, llama):
    with pytest.raises(ConfigError, match="agent grpo trains on a reward: give lm.reward="):
        run(tmp_path, f"lm.model={llama}")  # the counting task was the silent default on any model
    with pytest.raises(ConfigError, match="precision=bf16 applies to control agents"):
        run(tmp_path, f"lm.model={llama}", "lm.reward=increasing_numbers", "precision=bf16")
