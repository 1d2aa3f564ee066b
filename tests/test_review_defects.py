"""Issue 22, item 4: defects found in review, each with the test that failed before its fix.

1 RLOO greedy baseline clobbered the sampled rollout's KL     6 LM evaluation on training rows by default
2 CPL accuracy NaN on an all-tie batch (read as divergence)   7 an unknown env_id ended in a traceback
3 TD3+BC explored online without noise                        8 a flag of 2 on a dropped row passed unchecked
4 CalQL mutated the caller's config                           9 bench_updates.py needed omegaconf at import
5 A-LoL rewrote clip_eps silently
"""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import orl
from orl.errors import ConfigError, DataError, OrlError
from tests.conftest import random_pendulum_arrays

ROOT = Path(__file__).resolve().parent.parent
TEXT_SPACE = gym.spaces.Discrete(2)  # LM agents take their spaces from the token env; unused here
OBS = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
ACT = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A tiny random GPT-2 (2 layers, width 32) and its word-level tokenizer: built in a second."""
    pytest.importorskip("transformers", reason="the LM extra is not installed (pip install -e .[lm])")
    from tests.lm_archs import build_tiny_causal_lm

    return str(build_tiny_causal_lm("gpt2", tmp_path_factory.mktemp("gpt2")))


# --- 1. RLOO with the greedy (ReMax) baseline --------------------------------------------------------
def test_rloo_greedy_baseline_with_batches_and_samples(gpt2, monkeypatch):
    """ReMax's greedy baseline with batch 4 x 4 samples (the old RLOO raised "size of tensor a (16) must match ... (4)"
    when the greedy rollout overwrote the sampled one's KL): advantages are R_i - R(x, greedy) per prompt."""
    from orl.envs.text_rewards import increasing_numbers

    # lr 0 keeps policy == reference, so the k1 penalty is exactly 0 and the advantage is the reward difference
    agent = orl.make_agent("rloo", TEXT_SPACE, TEXT_SPACE, {"model_path": gpt2, "advantage": "remax", "num_generations": 4,
                                                            "beta": 0.05, "lr": 0.0, "max_completion_length": 4})
    generations = []
    original_generate = agent.generate

    def generate(prompts, greedy=False):
        out = original_generate(prompts, greedy)
        generations.append((list(prompts), out))
        return out

    monkeypatch.setattr(agent, "generate", generate)
    prompts = ["count: 1", "count: 5", "count: 9", "count: 20"]
    metrics = agent.train_step(prompts, increasing_numbers)
    (sampled_prompts, sampled), (greedy_prompts, greedy) = generations
    assert len(sampled["texts"]) == 16 and len(greedy["texts"]) == 4
    rewards = torch.tensor([increasing_numbers(p, t) for p, t in zip(sampled_prompts, sampled["texts"])]).view(4, 4)
    greedy_rewards = torch.tensor([increasing_numbers(p, t) for p, t in zip(greedy_prompts, greedy["texts"])])
    advantages = rewards - greedy_rewards[:, None]
    # the sequence loss at ratio 1 is -mean(A); its gradient is -mean(A grad log pi(y|x)), RLOO's
    assert metrics["loss"] == pytest.approx(float(-advantages.mean()), abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["reward"] == pytest.approx(float(rewards.mean()), abs=1e-6)

# --- 2. CPL on a batch of ties ---------------------------------------------------------------------
def _segments(labels, seed=0):
    from orl.agents.cpl import SegmentPairBatch

    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    return SegmentPairBatch(torch.randn(n, 2, 3, 3, generator=g), torch.rand(n, 2, 3, 1, generator=g) * 2 - 1, torch.tensor(labels))


def test_cpl_accuracy_skips_ties_and_an_all_tie_batch_does_not_diverge(tmp_path):
    from orl.trainer import Trainer, TrainerConfig

    options = {"bc_steps": 0, "lr_warmup_steps": 0, "dropout": 0.0, "hidden": [16], "alpha": 1.0}
    torch.manual_seed(0)
    agent = orl.make_agent("cpl", OBS, ACT, options)
    ties = _segments([0.5] * 4)
    metrics = agent.update(ties)
    assert all(bool(torch.isfinite(v)) for v in metrics.values()), metrics  # accuracy was NaN (0 / 0 decided pairs)
    assert "accuracy" not in metrics  # no decided pair: no accuracy to report this step

    mixed = _segments([1.0, 0.5, 0.0, 0.5], seed=1)
    with torch.no_grad():
        score = agent.log_prob(mixed.obs, mixed.actions).sum(-1)  # alpha 1, gamma 1: the scores before the step
    expected = float(((score[[0, 2], 0] > score[[0, 2], 1]) == torch.tensor([True, False])).float().mean())
    assert agent.update(mixed)["accuracy"].item() == pytest.approx(expected)  # over the two decided pairs only

    class Ties:  # a buffer whose every batch is all ties
        def sample(self, batch_size, generator=None):
            return ties

    agent = orl.make_agent("cpl", OBS, ACT, options)
    cfg = TrainerConfig(offline_steps=4, batch_size=4, eval_every=0, log_every=1, checkpoint_every=2, progress=False, tensorboard=False)
    Trainer(agent, tmp_path, cfg, Ties()).train()  # raised DivergenceError: "accuracy" non-finite
    assert (tmp_path / "checkpoint.pt").exists()


# --- 3. TD3+BC explores online -----------------------------------------------------------------------
def test_td3bc_explores_with_gaussian_noise_within_bounds():
    from omegaconf import OmegaConf

    from orl.agents.td3bc import TD3BCConfig

    assert TD3BCConfig().expl_noise == 0.1  # TD3's default (sfujim/TD3 main.py, also declared in sfujim/TD3_BC)
    assert OmegaConf.load(ROOT / "configs" / "agent" / "td3bc.yaml").expl_noise == TD3BCConfig().expl_noise
    torch.manual_seed(0)
    agent = orl.make_agent("td3bc", OBS, gym.spaces.Box(-2.0, 2.0, (2,), np.float32), {})
    obs = np.random.default_rng(0).standard_normal((2000, 3)).astype(np.float32)
    greedy = agent.act(obs, deterministic=True)
    np.testing.assert_array_equal(greedy, agent.act(obs, deterministic=True))  # repeatable
    noisy = agent.act(obs, deterministic=False)
    assert not np.allclose(noisy, greedy)
    assert noisy.min() >= -2.0 and noisy.max() <= 2.0  # clipped to the action bounds
    inside = np.abs(greedy) < 1.0  # away from the bounds, where clipping cannot shrink the noise
    assert np.std((noisy - greedy)[inside]) == pytest.approx(0.1 * 2.0, rel=0.1)  # expl_noise * max_action


# --- 4. CalQL leaves the caller's config alone -------------------------------------------------------
def test_calql_does_not_mutate_the_callers_config():
    from orl.agents.cql import CalQL, CQLConfig

    cfg = CQLConfig(actor_hidden=(16,), critic_hidden=(16,))
    before = dataclasses.asdict(cfg)
    agent = CalQL(OBS, ACT, cfg)
    assert dataclasses.asdict(cfg) == before and cfg.calibrated is False  # was set to True in place
    assert agent.cfg.calibrated is True and agent.calibrate


# --- 5. A-LoL KL and clip_eps ------------------------------------------------------------------------
def test_alol_kl_refuses_a_clip_instead_of_rewriting_it(gpt2):
    # The official script asserts ppo_clip == 0 whenever the KL term is on (abaheti95/LoL-RL,
    # lolrl_qlora_llama_hh.py; README: "When KL is used make sure to set ppo_clip to 0.0").
    with pytest.raises(ConfigError, match=r"agent\.clip_eps=0"):
        orl.make_agent("alol", TEXT_SPACE, TEXT_SPACE, {"model_path": gpt2, "variant": "alol_kl", "kl_beta": 0.1, "clip_eps": 0.9})
    from orl.agent import agent_class
    from orl.agents.alol import ALoLConfig

    cfg = ALoLConfig(model_path=gpt2, variant="alol_kl", kl_beta=0.1, clip_eps=0.0)
    agent = agent_class("alol")(TEXT_SPACE, TEXT_SPACE, cfg)
    assert agent.cfg.clip_eps == 0.0 and cfg.clip_eps == 0.0
    plain = orl.make_agent("alol", TEXT_SPACE, TEXT_SPACE, {"model_path": gpt2, "variant": "alol", "clip_eps": 0.9})
    assert plain.cfg.clip_eps == 0.9  # other variants keep their clip


# --- 6. LM evaluation on held-out rows ---------------------------------------------------------------
def _lm_run(tmp_path, agent_name, rows, model, *extra):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{agent_name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"agent={agent_name}", f"dataset={path}", f"lm.model={model}", "lm.reward=increasing_numbers", "lm.max_new_tokens=3", "steps=2", "eval.every=2",
                 "batch_size=2", "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / agent_name}", *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return run_train(cfg)


def test_lm_evaluation_uses_held_out_rows_by_default(gpt2, tmp_path, monkeypatch, capsys):
    from orl.agent import agent_class

    seen = {}

    def spy(name):  # records the TextRun an agent evaluates on
        cls = next(c for c in agent_class(name).__mro__ if "evaluate_run" in vars(c))
        original = cls.evaluate_run

        def evaluate_run(self, run):
            seen[name] = run
            return original(self, run)

        monkeypatch.setattr(cls, "evaluate_run", evaluate_run)

    spy("dpo")
    spy("reward_model")
    prompts = [f"count: {i}" for i in range(20)]
    pairs = [{"prompt": p, "chosen": f"{i + 1} {i + 2}", "rejected": f"{i} {i}"} for i, p in enumerate(prompts * 2)]

    _lm_run(tmp_path, "reward_model", pairs, gpt2)
    run = seen["reward_model"]
    trained = {r["prompt"] for r in run.rows}
    assert len(run.buffer) == len(run.rows) == 36  # 2 of the 20 prompts (10%) and their 4 pairs held out
    assert len(run.eval_rows) == 4 and not trained & {r["prompt"] for r in run.eval_rows}
    out = capsys.readouterr().out
    assert "held out 2 of 20 distinct prompts (4 rows" in out

    _lm_run(tmp_path, "dpo", pairs, gpt2)
    run = seen["dpo"]
    assert run.eval_prompts and not {r["prompt"] for r in run.rows} & set(run.eval_prompts)
    assert {r["prompt"] for r in run.eval_rows} == set(run.eval_prompts)
    again = seen["reward_model"].eval_rows
    assert [r["prompt"] for r in run.eval_rows] == [r["prompt"] for r in again]  # the same rows for the same seed

    _lm_run(tmp_path / "all", "reward_model", pairs, gpt2, "lm.holdout=0")
    assert len(seen["reward_model"].rows) == 40 and seen["reward_model"].eval_rows == []  # lm.holdout=0: train on every row


# --- 7. an unknown env_id in a dataset file ----------------------------------------------------------
def test_unknown_env_id_is_one_message_through_the_cli(tmp_path, monkeypatch, capsys):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from tests.test_fuzz import expect_one_message, run_cli

    data = tmp_path / "data.npz"
    np.savez(data, **random_pendulum_arrays(300, seed=1), env_id=np.array("NoSuchEnv-v9"))
    overrides = [f"dataset={data}", "agent=bc", "steps=2", "batch_size=32", "eval.every=0", "log.progress=false", "log.tensorboard=false",
                 f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.raises(OrlError) as error:  # was ValueError: cannot create environment 'NoSuchEnv-v9'
        run_train(cfg)
    assert isinstance(error.value, DataError)
    for part in (str(data), "NoSuchEnv-v9", "env=<gymnasium id>"):
        assert part in str(error.value)
    code, output = run_cli(monkeypatch, capsys, "train_main", *overrides)
    expect_one_message(code, output, str(data), "NoSuchEnv-v9", "env=")


# --- 8. flags other than 0/1 on rows the loader drops ------------------------------------------------
@pytest.mark.parametrize("key,row", [("terminals", -1), ("timeouts", 150)])
def test_a_flag_of_two_is_refused_even_on_a_dropped_row(tmp_path, key, row):
    from orl.data import DatasetError, make_dataset

    arrays = random_pendulum_arrays(300, seed=2)
    arrays.pop("next_observations")  # s' from s[t+1]: the last row and each timeout's last row are dropped
    arrays[key][row] = 2.0  # a terminal of 2 on the file's last row; a timeout of 2 (which decided a drop)
    path = tmp_path / "flags.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=rf"{key} must be 0/1 flags.*2\.0"):
        make_dataset(path)


# --- 9. bench_updates.py imports without omegaconf (the d3rlpy worker's venv) -------------------------
def test_bench_updates_imports_without_omegaconf():
    code = ("import sys; sys.modules['omegaconf'] = None; sys.path.insert(0, 'scripts'); import bench_updates; "
            "assert 'omegaconf' not in [m for m in sys.modules if sys.modules[m] is not None]; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
