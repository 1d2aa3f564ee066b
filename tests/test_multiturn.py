"""RL across turns: GRPO in multi-turn text environments, logged conversations as offline data (A-LoL, filtered BC),
through the API and through orl-train / orl-collect on tiny models of two architectures."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import orl
from orl.text.conversation import conversation_tensors
from orl.text.data import PromptBatch
from tests.lm_archs import build_tiny_causal_lm
from tests.test_conversation import CHAT_TEMPLATE

SPACE = None


class SayThree:
    """Two agent turns; reward 1 for each turn whose text contains the word "3" (so GRPO has something to learn)."""

    system_prompt = None
    max_turns = 2

    def reset(self, seed: int):
        self.turn = 0
        return f"count: {seed % 7}", {}

    def step(self, action: str):
        self.turn += 1
        reward = float("3" in action.split())
        done = self.turn >= 2
        return "1 2", reward, done, False, {"success": reward > 0} if done else {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("archs")
    paths = {arch: build_tiny_causal_lm(arch, root / arch) for arch in ("llama", "qwen2")}
    tokenizer = AutoTokenizer.from_pretrained(paths["qwen2"])
    tokenizer.chat_template = CHAT_TEMPLATE  # a chat model: replies rendered by the template, turns end at <|im_end|>
    tokenizer.save_pretrained(paths["qwen2"])
    return {arch: str(path) for arch, path in paths.items()}


def _grpo(path, **cfg):
    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": path, "num_generations": 4, "max_completion_length": 4, "lr": 1e-2,
                                                  "temperature": 1.0, **cfg})
    stop = "\n" if agent.tokenizer.chat_template else "the"
    agent.set_conversation_env(SayThree, env_id="test:say_three", stop=stop, max_turn_tokens=4)
    return agent


def _batch(seeds):
    return PromptBatch([f"seed {s}" for s in seeds], torch.tensor(seeds), {"seed": list(seeds)})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_environment_tokens_receive_no_gradient(models, arch):
    agent = _grpo(models[arch])
    sample = agent._sample_conversations(_batch([0, 1]), 4)
    ids, mask, token_mask = sample["ids"], sample["mask"], sample["token_mask"]
    logps, _ = agent.token_logps(agent.nets["policy"], ids, mask)
    logps.retain_grad()
    advantages = torch.linspace(-1, 1, len(ids))
    from orl.agents.grpo import policy_loss

    loss, _ = policy_loss(logps, logps.detach(), advantages, token_mask, "dapo", 0.2, 0.2)
    loss.backward()
    assert (logps.grad[token_mask == 0] == 0).all()  # prompt, replies and padding: no gradient
    assert (logps.grad[token_mask == 1] != 0).any()
    # the mask is exactly the agent's tokens: every conversation's replies are in ids and masked out
    convs = sample["conversations"]
    assert sum(len(c.ids) - sum(c.agent_mask) for c in convs) > 0
    assert int(token_mask.sum()) == sum(sum(c.agent_mask) for c in convs)


def test_turn_returns_to_go_give_each_turn_its_own_advantage(models):
    from orl.text.conversation import Conversation

    agent = _grpo(models["llama"], turn_returns="to_go", num_generations=2, scale_rewards="none")
    a = Conversation(0, [], [5], [7, 8, 1, 9], [1, 1, 0, 1], [1, 3], [0.0, 1.0])   # returns to go: 1, 1
    b = Conversation(0, [], [5], [7, 1, 9, 9], [1, 0, 1, 1], [0, 3], [1.0, 1.0])   # returns to go: 2, 1
    ids, _, _ = conversation_tensors([a, b], 0)
    advantages = agent._to_go_advantages([a, b], ids.shape[1], 2)
    # group means per turn: turn 0 (1 + 2) / 2 = 1.5, turn 1 (1 + 1) / 2 = 1
    # column t scores token t + 1 (the prompt is one token, so ids[j] is column j); replies get nothing
    assert advantages[0].tolist() == [-0.5, -0.5, 0.0, 0.0]
    assert advantages[1].tolist() == [0.5, 0.0, 0.0, 0.0]


def test_grpo_across_turns_learns_to_say_three(models):
    torch.manual_seed(0)
    agent = _grpo(models["llama"], lr=3e-3)
    evaluate = lambda: agent.evaluate_conversations(list(range(10**9, 10**9 + 32)), seed=0).mean_return  # noqa: E731
    before = evaluate()
    for step in range(25):
        agent.update(_batch([step % 7, (step + 3) % 7]))
    after = evaluate()
    assert after > before + 0.5, (before, after)  # of at most 2


def _train(overrides):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return run_train(compose(config_name="train", overrides=overrides))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grpo_in_a_text_env_through_orl_train_resumes_exactly(models, tmp_path, arch):
    from tests.resume import resumed_equals_uninterrupted

    stop = [] if arch == "qwen2" else ["lm.stop=the"]

    def run(run_dir, steps, resume=False):
        return _train(["agent=grpo", "env=text:guess_number", f"lm.model={models[arch]}", "agent.lr=1e-3", "agent.num_generations=2",
                       "agent.max_completion_length=3", "batch_size=2", f"steps={steps}", "eval.every=4", "lm.num_eval_episodes=4",
                       "log.every=1", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false", "device=cpu",
                       f"run_dir={run_dir}", f"resume={str(resume).lower()}"] + stop)

    summary, full = resumed_equals_uninterrupted(run, tmp_path)
    assert {"train/episode/success", "train/episode/turns", "train/reward"} <= set(full[0])
    assert {"success", "turns", "return_mean"} <= set(summary)
    provenance = json.loads((tmp_path / "full" / "provenance.json").read_text())
    assert provenance["data"]["eval_seeds"].startswith("1000000000")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logged_conversations_train_alol_and_filtered_bc_through_the_cli(models, tmp_path, arch):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, _collect  # noqa: F401  (the hydra app; its body is log_conversations)
    from orl.apps.lm_run import log_conversations
    from orl.text.conversation import load_conversations

    stop = "\n" if arch == "qwen2" else "the"
    log = tmp_path / "log.jsonl"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="collect", overrides=["env=text:guess_number", f"conversations.model={models[arch]}",
                                                        "conversations.episodes=24", f"conversations.out={log}", "conversations.max_turn_tokens=3",
                                                        f"conversations.stop={json.dumps(stop)}" if arch == "llama" else "progress=false"])
    log_conversations(cfg)
    rows = load_conversations(log)
    assert len(rows) == 24 and all(r["env"] == "text:guess_number" and r["seed"] < 10**9 for r in rows)
    summary = json.loads(log.with_suffix(".json").read_text())
    assert summary["episodes"] == 24
    common = [f"dataset={log}", f"lm.model={models[arch]}", "agent=alol", "agent.lr=1e-3", "agent.value_epochs=1", "batch_size=4", "steps=2",
              "eval.every=2", "lm.num_eval_episodes=4", "lm.num_value_prompts=4", "lm.max_new_tokens=3", "log.progress=false",
              "log.tensorboard=false", "device=cpu"] + ([f"lm.stop={stop}"] if arch == "llama" else [])
    # A-LoL needs a positive advantage: one conversation with the top return (the random reference wins none)
    rows[0]["return"] = 1.0
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # env= names the environment the conversations come from (it routes to offline training, not to online RL)
    out = _train(common + ["env=text:guess_number", f"run_dir={tmp_path / 'alol'}"])
    assert {"success", "turns"} <= set(out)
    out = _train(common + ["agent.variant=nll", "lm.min_return=1", f"run_dir={tmp_path / 'fbc'}"])
    provenance = json.loads((tmp_path / "fbc" / "provenance.json").read_text())
    assert provenance["data"]["train_rows"] == sum(r["return"] >= 1 for r in rows) >= 1


def test_option_combinations_that_cannot_work_are_refused(models, tmp_path):
    from orl.errors import ConfigError

    for options in ({"turn_returns": "to_go", "advantage": "remax"}, {"turn_returns": "to_go", "kl_in_reward": True, "beta": 0.1},
                    {"turn_returns": "to_go", "loss_type": "sequence"}, {"turn_returns": "sometimes"}):
        with pytest.raises(ConfigError, match="turn_returns"):
            _grpo(models["llama"], **options)
    rows = [{"env": "text:guess_number", "seed": i, "messages": [{"role": "user", "content": "guess 1-16"},
                                                                  {"role": "assistant", "content": "8", "reward": -0.5}]} for i in range(4)]
    log = tmp_path / "negative.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match="max_value"):
        _train([f"dataset={log}", f"lm.model={models['llama']}", "agent=alol", "lm.stop=the", "lm.num_value_prompts=2", "steps=1",
                "log.progress=false", f"run_dir={tmp_path / 'a'}"])
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "count: 1"}) + "\n")
    with pytest.raises(ConfigError, match="min_return"):  # GRPO's prompt rows have no reward to filter by
        _train([f"dataset={prompts}", f"lm.model={models['llama']}", "agent=grpo", "lm.reward=increasing_numbers", "lm.min_return=1",
                "steps=1", "log.progress=false", f"run_dir={tmp_path / 'b'}"])


def test_an_opening_longer_than_the_context_is_refused_up_front(tmp_path, tiny_lm):
    from orl.errors import ConfigError

    pytest.importorskip("textarena")
    # TextArena's GuessTheNumber opens with ~420 tokens of the tiny LM's 128-token context (built by conftest's tiny_lm)
    with pytest.raises(ConfigError, match="longer context"):
        _train(["agent=grpo", "env=textarena:GuessTheNumber-v0", f"lm.model={tiny_lm['path']}", "agent.max_completion_length=4", "steps=1",
                "log.progress=false",
                f"run_dir={tmp_path / 'r'}"])


def test_orl_report_puts_offline_and_online_runs_of_one_environment_in_one_table(tmp_path):
    """An offline run on conversations logged in text:guess_number and an online run in it are scored on the same task:
    one dataset row, an aggregate, and no warning about different data (the online run has none)."""
    import yaml

    from orl.report import build_report, load_runs, mixed_data

    def run(name, agent, data, seed, scores):
        path = tmp_path / name
        path.mkdir()
        (path / "config.yaml").write_text(yaml.safe_dump({"agent": {"name": agent}, "dataset": "log.jsonl", "seed": seed, "tag": name.split("-")[0]}))
        (path / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "eval/return_mean": score}) + "\n" for step, score in scores))
        (path / "provenance.json").write_text(json.dumps({"data": data}))

    for seed in range(3):
        run(f"alol-{seed}", "alol", {"id": "log.jsonl", "sha256": "ab" * 32, "env": "text:guess_number"}, seed, [(100, 0.4 + 0.01 * seed)])
        run(f"grpo-{seed}", "grpo", {"id": "text:guess_number", "source": "environment", "sha256": None}, seed,
            [(0, 0.3), (100, 0.5 + 0.01 * seed)])
    runs, skipped = load_runs([tmp_path])
    assert not skipped and {r.dataset for r in runs} == {"text:guess_number"}
    assert not mixed_data(runs)
    report = build_report(runs, reps=200, seed=0)
    assert report["aggregate_datasets"] == ["text:guess_number"]


def test_a_users_own_environment_class_through_orl_train(models, tmp_path):
    """env=text:<module>:<Class> plugs in a user's TextEnv (here this test module's SayThree)."""
    out = _train(["agent=grpo", "env=text:tests.test_multiturn:SayThree", f"lm.model={models['llama']}", "lm.stop=the", "agent.lr=1e-3",
                  "agent.num_generations=2", "agent.max_completion_length=3", "batch_size=2", "steps=1", "eval.every=1",
                  "lm.num_eval_episodes=4", "log.progress=false", "log.tensorboard=false", f"run_dir={tmp_path / 'r'}"])
    assert out["turns"] == 2.0  # SayThree always lasts two turns
    from orl.envs.text_games import make_text_env
    from orl.errors import ConfigError

    with pytest.raises(ConfigError, match="no class Nope"):
        make_text_env("text:tests.test_multiturn:Nope")


def test_evaluation_in_an_environment_moves_no_rng(models):
    """Evaluation samples with its own generator: the training sampler and torch's global RNG are where they were, and
    the same seed gives the same evaluation."""
    agent = orl.make_agent("alol", SPACE, SPACE, {"model_path": models["llama"]})  # no sampler of its own: used the global RNG
    agent.set_conversation_env(SayThree, stop="the", max_turn_tokens=3)
    grpo = _grpo(models["llama"])
    before, sampler = torch.random.get_rng_state(), grpo.generator.get_state()
    first = agent.evaluate_conversations(list(range(10**9, 10**9 + 8)), seed=3).returns.tolist()
    grpo.evaluate_conversations(list(range(10**9, 10**9 + 8)), seed=3)
    assert torch.equal(torch.random.get_rng_state(), before) and torch.equal(grpo.generator.get_state(), sampler)
    assert agent.evaluate_conversations(list(range(10**9, 10**9 + 8)), seed=3).returns.tolist() == first
