"""Issue 12: LM agents on the models users bring (tiny random Llama, Qwen2, GPT-NeoX, OPT, GPT-2 built here)."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the LM extra is not installed (pip install -e .[lm])")

import orl  # noqa: E402
from orl.text.encoding import tokenize_rows, pair_buffer, text_buffer  # noqa: E402
from orl.text.generation import KLPenalty, KVCachePolicy, VectorTokenEnv, rollout  # noqa: E402
from orl.text.encoding import encode_prompt
from orl.text.runtime import eos_token_ids, load_lm
from tests.lm_archs import ARCHS, build_tiny_causal_lm  # noqa: E402

SPACE = gym.spaces.Discrete(2)
PROMPTS = ["count: 3 4", "count: 10", "count: 7 8 9"]
CHOSEN = ["5 6", "11 12", "10 11"]
REJECTED = ["2 1", "3", "1 0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    paths = {arch: str(build_tiny_causal_lm(arch, root / arch)) for arch in ARCHS}
    paths["llama_bf16"] = str(build_tiny_causal_lm("llama", root / "llama_bf16", dtype=torch.bfloat16))
    paths["gpt2_dropout"] = str(build_tiny_causal_lm("gpt2", root / "gpt2_dropout", dropout=0.1))
    return paths


# --- 1. BOS exactly once, one tokenization path for training and the env --------------------------
def test_bos_once_and_training_matches_env(models):
    _, tokenizer = load_lm(models["llama"])
    bos = tokenizer.bos_token_id
    prompt_ids, response_ids = tokenize_rows(tokenizer, PROMPTS, CHOSEN)
    for ids in prompt_ids:
        assert ids[0] == bos and ids.count(bos) == 1  # not [BOS, BOS, ...]
    for ids in response_ids:
        assert bos not in ids and ids[-1] == tokenizer.eos_token_id  # no BOS trained as a response token
    env = VectorTokenEnv(tokenizer, PROMPTS, max_new_tokens=4)
    assert env.prompt_ids == prompt_ids


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gpt_neox", "opt"])
def test_prompt_encoding_per_tokenizer(models, arch):
    _, tokenizer = load_lm(models[arch])
    ids = encode_prompt(tokenizer, "count: 3")
    plain = tokenizer("count: 3", add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    assert ids == ([bos] if bos is not None else []) + plain
    assert len(encode_prompt(tokenizer, "")) == 1  # an empty prompt still has a token to condition on


# --- 2. checkpoints in bf16 load and train in fp32 --------------------------------------------------
def test_bf16_checkpoint_loads_in_fp32_and_every_head_works(models):
    model, _ = load_lm(models["llama_bf16"])
    assert next(model.parameters()).dtype == torch.float32
    kept, _ = load_lm(models["llama_bf16"], dtype=None)
    assert next(kept.parameters()).dtype == torch.bfloat16  # dtype=None / lm.dtype=auto keeps the saved one
    reward_model = orl.make_agent("reward_model", SPACE, SPACE, {"model_path": models["llama_bf16"]})
    assert math.isfinite(reward_model("count: 3", "4 5"))
    alol = orl.make_agent("alol", SPACE, SPACE, {"model_path": models["llama_bf16"], "value_epochs": 1})
    buffer = text_buffer(alol.tokenizer, PROMPTS, [""] * 3, None, device="cpu")
    alol.fit_value(buffer.input_ids, buffer.attention_mask * (1 - buffer.response_mask), torch.tensor([0.1, 0.5, 0.9]))
    dpo = orl.make_agent("dpo", SPACE, SPACE, {"model_path": models["llama_bf16"], "lr": 1e-6})
    pairs = pair_buffer(dpo.tokenizer, PROMPTS, CHOSEN, REJECTED, device="cpu")
    dpo.prepare(pairs)
    before = [p.detach().clone() for p in dpo.nets["policy"].parameters()]
    dpo.update(pairs.sample(3, torch.Generator().manual_seed(0)))
    changed = sum(int((a != b).sum()) for a, b in zip(before, dpo.nets["policy"].parameters()))
    total = sum(p.numel() for p in before)
    assert changed > 0.5 * total  # a 1e-6 step moves fp32 weights; in pure bf16 almost none would move


# --- 5. dropout off in policy and reference ---------------------------------------------------------
def test_dpo_loss_is_log2_at_init_with_a_dropout_config(models):
    agent = orl.make_agent("dpo", SPACE, SPACE, {"model_path": models["gpt2_dropout"], "beta": 0.5})
    pairs = pair_buffer(agent.tokenizer, PROMPTS, CHOSEN, REJECTED, device="cpu")
    agent.prepare(pairs)
    agent.nets["policy"].train()
    loss, _ = agent.losses(pairs.sample(3, torch.Generator().manual_seed(0)))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    with_dropout = orl.make_agent("dpo", SPACE, SPACE, {"model_path": models["gpt2_dropout"], "beta": 0.5, "disable_dropout": False})
    assert any(m.p > 0 for m in with_dropout.nets["policy"].modules() if isinstance(m, torch.nn.Dropout))  # the option keeps it


# --- 8. a list of EOS ids (chat models' end-of-turn token) ends the episode ------------------------
def test_env_stops_on_any_eos_of_the_generation_config(models):
    model, tokenizer = load_lm(models["qwen2"])
    ids = eos_token_ids(tokenizer, model)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids == [tokenizer.eos_token_id, end_of_turn]
    env = VectorTokenEnv(tokenizer, ["count: 1", "count: 2"], max_new_tokens=5, eos_ids=ids)
    env.reset()
    _, _, terminated, _, _ = env.step(torch.tensor([end_of_turn, tokenizer.eos_token_id]))
    assert terminated.tolist() == [True, True]
    assert env.response_ids(0) == [] and env.all_done


# --- 9. OPT projection widths, KL temperature, RLOO seeds, empty prompts ---------------------------
def test_opt_heads_read_the_projected_width(models):
    reward_model = orl.make_agent("reward_model", SPACE, SPACE, {"model_path": models["opt"]})
    assert math.isfinite(reward_model("count: 3", "4 5"))
    alol = orl.make_agent("alol", SPACE, SPACE, {"model_path": models["opt"], "value_epochs": 1})
    buffer = text_buffer(alol.tokenizer, PROMPTS, [""] * 3, None, device="cpu")
    assert alol.value(buffer.input_ids, buffer.attention_mask * (1 - buffer.response_mask)).shape == (3,)


def test_kl_penalty_uses_the_sampling_temperature_for_the_reference(models):
    model, tokenizer = load_lm(models["llama"])
    env = KLPenalty(VectorTokenEnv(tokenizer, PROMPTS, max_new_tokens=4), model, beta=1.0, temperature=2.0)
    out = rollout(KVCachePolicy(model), env, greedy=False, temperature=2.0, generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(out["rewards"], 0.0, atol=1e-5)  # policy == reference at the same temperature: no KL


def test_rloo_sampler_follows_its_seed(models):
    draws = []
    for seed in (0, 0, 1):
        agent = orl.make_agent("rloo", SPACE, SPACE, {"model_path": models["qwen2"], "seed": seed, "max_completion_length": 4})
        draws.append(agent.generate(PROMPTS * 2)["completion_ids"])
    assert draws[0] == draws[1] and draws[0] != draws[2]


# --- the matrix: the env and every agent through orl-train on every architecture -----------------
MATRIX_AGENTS = ("alol", "dpo", "reward_model", "rloo", "grpo")


def matrix_data(root):
    import json

    files = {"alol": [{"prompt": p, "response": c, "reward": r} for p, c, r in zip(PROMPTS, CHOSEN, [0.9, 0.2, 0.5])],
             "dpo": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)],
             "rloo": [{"prompt": p} for p in PROMPTS]}
    files["reward_model"] = files["dpo"]
    files["grpo"] = files["rloo"]
    paths = {}
    for agent, rows in files.items():
        paths[agent] = root / f"{agent}.jsonl"
        paths[agent].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


@pytest.mark.parametrize("arch", (*ARCHS, "llama_bf16"))
def test_every_lm_agent_through_orl_train_on_every_architecture(models, arch, tmp_path):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.logger import read_metrics

    path = models[arch]
    data = matrix_data(tmp_path)
    # alol, dpo, rloo: the rate their yaml had before the defaults became real-model rates (issue #22)
    agent_options = {"alol": ["agent.value_epochs=1", "agent.lr=3e-4"], "dpo": ["agent.lr=3e-4"],
                     "rloo": ["agent.max_completion_length=3", "agent.num_generations=2", "agent.lr=3e-4"],
                     "grpo": ["agent.max_completion_length=3", "agent.num_generations=2", "agent.lr=3e-4", "agent.beta=0.04"]}
    for agent in MATRIX_AGENTS:
        run_dir = tmp_path / agent
        overrides = [f"agent={agent}", f"dataset={data[agent]}", f"lm.model={path}", "lm.reward=increasing_numbers", "lm.max_new_tokens=3", "lm.num_eval_prompts=2",
                     "lm.num_value_prompts=3", "steps=2", "eval.every=2", "batch_size=2", "log.every=1", "log.progress=false",
                     "log.tensorboard=false", "device=cpu", f"run_dir={run_dir}", *agent_options.get(agent, [])]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            summary = run_train(compose(config_name="train", overrides=overrides))
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows if "train/loss" in r] == [1, 2], agent
        assert all(math.isfinite(r["train/loss"]) for r in rows if "train/loss" in r), agent
        assert math.isfinite(summary["return_mean"]), agent  # evaluated through the token env (pair accuracy for the RM)
        assert (run_dir / "hf" / "config.json").exists() == (agent != "reward_model")
    model, tokenizer = load_lm(path)
    env = VectorTokenEnv(tokenizer, ["", *PROMPTS], max_new_tokens=3, eos_ids=eos_token_ids(tokenizer, model))
    out = rollout(KVCachePolicy(model), env, greedy=True)
    assert len(out["responses"]) == 4


# --- 7. the current KV-cache API: no deprecated argument, same tokens as re-encoding ---------------
@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_path_uses_the_current_api(models, arch):
    import warnings

    from orl.text.generation import ReencodePolicy

    model, tokenizer = load_lm(models[arch])
    env = VectorTokenEnv(tokenizer, PROMPTS, max_new_tokens=5, eos_ids=eos_token_ids(tokenizer, model))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # transformers 5.x warns on past_key_values
        cached = rollout(KVCachePolicy(model), env)["responses"]
    assert cached == rollout(ReencodePolicy(model), env)["responses"]


# --- 6. rows longer than the context are truncated, with a warning that counts them ----------------
def test_long_rows_are_truncated_with_a_warning(models):
    from orl.text.encoding import truncate

    prompts, responses, cut = truncate([[1, 5, 6, 7, 8, 9], [1, 5]], [[10, 11, 2], [10, 11, 12, 13, 2]], max_length=5, max_prompt_length=3, bos_id=1)
    assert prompts == [[1, 8, 9], [1, 5]] and responses == [[10, 11], [10, 11, 12]] and cut == (1, 2)
    _, tokenizer = load_lm(models["llama"])
    long_prompt = " ".join(["7"] * 90)  # 91 tokens with BOS; the context is 64
    with pytest.warns(UserWarning, match=r"truncated 1 of 2 prompts to max_prompt_length=48 .* and 0 responses"):
        pairs = pair_buffer(tokenizer, [long_prompt, "count: 1"], ["2 3", "2"], ["1", "0"], device="cpu", max_length=64, max_prompt_length=48)
    with pytest.warns(UserWarning, match=r"truncated 0 of 2 prompts .* and 2 responses to max_length=64"):
        pair_buffer(tokenizer, [long_prompt[:120], "count: 1"], ["2 " * 20, "2"], ["1 " * 20, "0"], device="cpu", max_length=64)
    assert pairs.chosen.input_ids.shape[1] <= 64


def test_orl_train_dpo_on_a_long_prompt_with_a_rotary_model(models, tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train

    rows = [{"prompt": " ".join(["7"] * 90), "chosen": "8 9", "rejected": "1"}] + [{"prompt": p, "chosen": c, "rejected": r}
                                                                               for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["agent=dpo", "agent.lr=3e-4", f"dataset={path}", f"lm.model={models['llama']}", "lm.num_eval_prompts=4", "lm.max_new_tokens=4", "steps=2",
                 "eval.every=2", "batch_size=2", "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / 'run'}",
                 "lm.holdout=0"]  # every row trained on (and the long prompt among them), none held out for evaluation
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with pytest.warns(UserWarning, match="truncated 1 of 4 prompts to max_prompt_length=60 .* and 0 responses to max_length=64"):
        summary = run_train(cfg)
    assert "return_mean" in summary
    # The trained policy is saved in Hugging Face format and loads with from_pretrained.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orl.checkpoint import load_checkpoint

    loaded = AutoModelForCausalLM.from_pretrained(summary["hf_model"])
    AutoTokenizer.from_pretrained(summary["hf_model"])
    trained = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["agent"]["nets"]
    for name, param in loaded.state_dict().items():
        torch.testing.assert_close(param, trained[f"policy.{name}"])


# --- 3. the reward for A-LoL's value fit and evaluation is the user's choice ----------------------
def test_text_reward_specs(models, tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from orl.envs.text_rewards import SequenceClassifierReward, increasing_numbers, make_text_reward

    assert make_text_reward("increasing_numbers") is increasing_numbers
    assert make_text_reward("keyword:assistant")("p", "the assistant") == 1.0
    assert make_text_reward("length_window:1:2")("p", "3 4") == 1.0
    _, tokenizer = load_lm(models["llama"])
    classifier = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    classifier.save_pretrained(tmp_path / "classifier")
    tokenizer.save_pretrained(tmp_path / "classifier")
    reward = make_text_reward(str(tmp_path / "classifier"))
    assert isinstance(reward, SequenceClassifierReward) and 0.0 < reward("count: 3", "4 5") < 1.0
    with pytest.raises(ValueError, match="without a sequence-classification head"):
        make_text_reward(models["llama"])
    with pytest.raises(ValueError, match="neither a built-in reward"):
        make_text_reward("no_such_reward")


def test_alol_value_fit_on_an_orl_reward_model_run(models, tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from orl.envs.text_rewards import make_text_reward
    from orl.apps.cli import CONFIG_DIR, run_train

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)))
    common = [f"lm.model={models['qwen2']}", "lm.reward=increasing_numbers", "lm.max_new_tokens=4", "log.progress=false", "log.tensorboard=false", "device=cpu",
              "batch_size=2", "steps=2", "eval.every=2"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_train(compose(config_name="train", overrides=common + ["agent=reward_model", f"dataset={pairs}", f"run_dir={tmp_path / 'rm'}"]))
    reward_model = make_text_reward(str(tmp_path / "rm"))
    rewarded = tmp_path / "rows.jsonl"
    # Scored by the reward model, plus a bonus on one row so that some advantage is positive.
    rewarded.write_text("".join(json.dumps({"prompt": p, "response": c, "reward": reward_model(p, c) + 10.0 * (i == 0)}) + "\n"
                                for i, (p, c) in enumerate(zip(PROMPTS, CHOSEN))))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=common + ["agent=alol", f"dataset={rewarded}", f"lm.reward={tmp_path / 'rm'}",
                                                               "agent.value_epochs=1", "agent.lr=3e-4", f"run_dir={tmp_path / 'alol'}"])
    summary = run_train(cfg)
    assert math.isfinite(summary["return_mean"])  # evaluated with the reward model's scores, on the dataset's prompts


# --- 4. RLOO through orl-train: Trainer metrics, task reward and KL apart, exact resume ------------
def test_rloo_through_orl_train_resumes_exactly(models, tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from tests.resume import resumed_equals_uninterrupted

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 3))

    def run(run_dir, steps, resume=False):
        overrides = ["agent=rloo", "agent.lr=3e-4", f"dataset={prompts}", f"lm.model={models['llama']}", "lm.reward=increasing_numbers", "lm.num_eval_prompts=3",
                     "lm.max_new_tokens=4", "agent.max_completion_length=4", "agent.num_generations=2", "batch_size=2", f"steps={steps}",
                     "eval.every=4", "log.every=1", "checkpoint.every=2", "log.progress=false", "log.tensorboard=false", "device=cpu",
                     f"run_dir={run_dir}", f"resume={str(resume).lower()}"]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return run_train(compose(config_name="train", overrides=overrides))

    _, full = resumed_equals_uninterrupted(run, tmp_path)
    assert {"train/reward", "train/kl", "train/completions/mean_length"} <= set(full[0])
    assert (tmp_path / "full" / "hf" / "config.json").exists()


def test_dpo_then_rloo_through_init_from(models, tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from orl.checkpoint import load_checkpoint
    from orl.apps.cli import CONFIG_DIR, run_train

    pairs, prompts = tmp_path / "pairs.jsonl", tmp_path / "prompts.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)))
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    common = ["lm.reward=increasing_numbers", "lm.num_eval_prompts=3", "lm.max_new_tokens=3", "batch_size=2", "log.progress=false", "log.tensorboard=false", "device=cpu"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_train(compose(config_name="train", overrides=common + ["agent=dpo", f"dataset={pairs}", f"lm.model={models['gpt_neox']}",
                                                               "agent.lr=1e-2", "steps=2", "eval.every=2", f"run_dir={tmp_path / 'dpo'}"]))
        cfg = compose(config_name="train", overrides=common + ["agent=rloo", f"dataset={prompts}", f"init_from={tmp_path / 'dpo'}",
                                                             "agent.max_completion_length=3", "agent.num_generations=2", "agent.lr=0.0", "steps=1", "eval.every=0",
                                                             f"run_dir={tmp_path / 'rloo'}"])
        run_train(cfg)
    dpo_policy = load_checkpoint(tmp_path / "dpo" / "checkpoint.pt")["agent"]["nets"]
    rloo_start = load_checkpoint(tmp_path / "rloo" / "checkpoint.pt")["agent"]["nets"]
    base, _ = load_lm(models["gpt_neox"])
    assert any(not torch.equal(value, dpo_policy[f"policy.{name}"]) for name, value in base.state_dict().items())  # DPO moved it
    for name, value in dpo_policy.items():
        torch.testing.assert_close(rloo_start[name], value)  # RLOO starts from the DPO policy (lr 0: one step leaves it)


def test_jsonl_errors_name_the_line(tmp_path):
    from orl.errors import DataError
    from orl.text.data import load_jsonl

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\xff\xfe not utf-8\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: not UTF-8"):
        load_jsonl(path, "prompts")
    path.write_text('{"prompt": "a"}\n42\n')
    with pytest.raises(DataError, match=r"rows.jsonl:2: each line must be a JSON object"):
        load_jsonl(path, "prompts")


# --- LoRA through PEFT: the reference is the base model with the adapter off, not a copy ----------
def test_lora_dpo_reference_is_the_base_model(models, tmp_path):
    pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from orl.text.runtime import save_hf

    agent = orl.make_agent("dpo", SPACE, SPACE, {"model_path": models["llama"], "lora_r": 4, "lr": 1e-2})
    policy, reference = agent.nets["policy"], agent.nets["reference"]
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert sum(p.numel() for p in agent.nets.parameters()) == sum(p.numel() for p in policy.parameters())  # one model in memory
    pairs = pair_buffer(agent.tokenizer, PROMPTS, CHOSEN, REJECTED, device="cpu")
    agent.prepare(pairs)
    batch = pairs.sample(3, torch.Generator().manual_seed(0))
    loss, _ = agent.losses(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA starts as the identity
    base, _ = load_lm(models["llama"])
    ids = pairs.chosen.input_ids
    for _ in range(3):
        agent.update(batch)
    with torch.no_grad():
        torch.testing.assert_close(reference(input_ids=ids).logits, base(input_ids=ids).logits)  # still the base model
        assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits)  # the adapter moved
        save_hf(policy, agent.tokenizer, tmp_path / "hf")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
        torch.testing.assert_close(merged(input_ids=ids).logits, policy(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


# --- TRL's conversational format: message lists through the tokenizer's chat template -------------
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant {% endif %}")


def test_chat_rows_render_with_the_template_and_train(models, tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from orl.text.encoding import render_chat
    from orl.apps.cli import CONFIG_DIR, run_train

    model, tokenizer = load_lm(models["llama"])
    tokenizer.chat_template = CHAT_TEMPLATE
    chat_dir = tmp_path / "chat-llama"
    model.save_pretrained(chat_dir)
    tokenizer.save_pretrained(chat_dir)
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    rendered = render_chat(rows, tokenizer, ["prompt", "chosen", "rejected"])
    assert rendered[0]["prompt"] == "<s>user count: 3 4 assistant " and rendered[0]["chosen"] == "5 6 "
    prompt_ids, _ = tokenize_rows(tokenizer, [r["prompt"] for r in rendered], [r["chosen"] for r in rendered])
    assert all(ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id for ids in prompt_ids)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = ["agent=dpo", "agent.lr=3e-4", f"dataset={path}", f"lm.model={chat_dir}", "lm.num_eval_prompts=3", "lm.max_new_tokens=3", "steps=2",
                 "eval.every=2", "batch_size=2", "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        summary = run_train(compose(config_name="train", overrides=overrides))
    assert math.isfinite(summary["return_mean"])


@pytest.mark.parametrize("agent", ["dpo", "alol"])
def test_chat_rows_reach_a_trl_reward_as_messages_in_evaluation(models, tmp_path, monkeypatch, agent):
    """A TRL reward function written for conversational data reads `completion[0]["content"]`; the evaluation of
    the sequence agents (DPO, A-LoL) handed it the rendered text and it failed there, while GRPO passed messages."""
    import importlib
    import json

    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train

    model, tokenizer = load_lm(models["qwen2"])
    tokenizer.chat_template = CHAT_TEMPLATE
    chat_dir = tmp_path / "chat-qwen2"
    model.save_pretrained(chat_dir)
    tokenizer.save_pretrained(chat_dir)
    (tmp_path / "chat_reward_module.py").write_text(
        "SEEN = []\n"
        "def assistant_chars(prompts, completions, **columns):\n"
        "    SEEN.append((prompts, completions, sorted(columns)))\n"
        "    return [float(len(c[0]['content'])) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    if agent == "dpo":
        rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}], "topic": "counting"} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    else:
        rows = [{"prompt": [{"role": "user", "content": p}], "response": [{"role": "assistant", "content": c}], "reward": 1.0,
                 "topic": "counting"} for p, c in zip(PROMPTS, CHOSEN)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"agent={agent}", "agent.lr=3e-4", f"dataset={path}", f"lm.model={chat_dir}", "lm.reward=chat_reward_module:assistant_chars",
                 "lm.holdout=0.34", "lm.num_eval_prompts=3", "lm.max_new_tokens=3", "steps=2", "eval.every=2", "batch_size=2",
                 "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        summary = run_train(compose(config_name="train", overrides=overrides))
    seen = importlib.import_module("chat_reward_module").SEEN
    assert seen, "the reward function was never called"
    users = [[{"role": "user", "content": p}] for p in PROMPTS]
    held_out = json.loads((tmp_path / "run" / "provenance.json").read_text())["data"]["held_out_rows"]
    assert len(held_out) == 1  # evaluation scores the held-out prompt: its row is found through the held-out rows
    for prompts, completions, columns in seen:
        assert all(prompt in users for prompt in prompts)  # the row's messages, not the rendered text
        assert all(len(c) == 1 and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in completions)
        assert "topic" in columns  # the row's other columns, as TRL passes them
    assert summary["return_mean"] >= 0.0 and math.isfinite(summary["return_mean"])


def test_hugging_face_datasets_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    from orl.errors import DataError
    from orl.text.data import is_text_dataset, load_text_rows

    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "prefs"))
    assert is_text_dataset(str(tmp_path / "prefs")) and load_text_rows(tmp_path / "prefs", "pairs") == rows
    datasets.Dataset.from_list([{"prompt": "a", "chosen": 3, "rejected": "b"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[0\]: chosen must be a string"):
        load_text_rows(tmp_path / "bad", "pairs")


# --- training knobs: gradient accumulation, LR warmup and schedule, top-p / top-k sampling ---------
def test_gradient_accumulation_equals_the_full_batch(models):
    pairs_rows = (PROMPTS * 2, CHOSEN * 2, REJECTED * 2)
    results = []
    for parts in (1, 3):
        torch.manual_seed(0)
        agent = orl.make_agent("dpo", SPACE, SPACE, {"model_path": models["gpt_neox"], "grad_accum_steps": parts, "lr": 1e-3})
        pairs = pair_buffer(agent.tokenizer, *pairs_rows, device="cpu")
        agent.prepare(pairs)
        with torch.no_grad():  # move off log 2 so the gradient is not symmetric
            next(agent.nets["policy"].parameters()).add_(0.1)
        metrics = agent.update(pairs.sample(6, torch.Generator().manual_seed(1)))
        results.append((metrics["loss"], [p.detach().clone() for p in agent.nets["policy"].parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lr_warmup_then_cosine(models):
    agent = orl.make_agent("dpo", SPACE, SPACE, {"model_path": models["gpt2"], "lr": 1e-3, "lr_warmup_steps": 2, "lr_schedule": "cosine",
                                                  "lr_decay_steps": 6})
    optimizer, schedule = agent.optimizers["policy"], agent.schedulers["policy"]
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(8):
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[:3] == pytest.approx([5e-4, 1e-3, 1e-3])  # warmup 1/2, 2/2, then the cosine starts at its peak
    assert rates[4] == pytest.approx(5e-4) and rates[6:] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


def test_top_k_and_top_p_filtering():
    from orl.text.generation import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.7)).tolist() == [[True, True, False, False]]  # 0.5 + 0.3 reaches 0.7
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits)).all()


def test_hub_dataset_ids_go_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from orl.errors import DataError
    from orl.text.data import is_text_dataset, load_text_rows

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if name == "nobody/missing":
            raise ConnectionError("hub unreachable")
        return datasets.Dataset.from_list([{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(PROMPTS, CHOSEN, REJECTED)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert is_text_dataset("hf:trl-lib/some-prefs") and not is_text_dataset("mujoco/hopper/medium-v0")
    rows = load_text_rows("hf:trl-lib/some-prefs:test", "pairs")
    assert calls == [("trl-lib/some-prefs", "test")] and rows[0]["chosen"] == CHOSEN[0]
    with pytest.raises(DataError, match="could not load 'nobody/missing'.*save_to_disk"):
        load_text_rows("hf:nobody/missing", "pairs")


def test_lora_generation_uses_the_current_cache_argument(models):
    """PEFT's forward is (*args, **kwargs): the cache argument is read from the base model, so a LoRA policy uses
    `cache=` where transformers has it (it used the deprecated `past_key_values=`, removed in later releases)."""
    import inspect
    import warnings

    from orl.text.generation import cache_argument
    from orl.text.runtime import AdapterDisabled, add_lora

    model, tokenizer = load_lm(models["llama"])
    expected = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    plain = rollout(KVCachePolicy(model), VectorTokenEnv(tokenizer, PROMPTS, max_new_tokens=5, eos_ids=eos_token_ids(tokenizer, model)))
    lora = add_lora(model, 4, 8.0, None)
    assert cache_argument(lora) == expected == cache_argument(AdapterDisabled(lora))
    policy = KVCachePolicy(lora)
    assert policy._cache_arg == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = rollout(policy, VectorTokenEnv(tokenizer, PROMPTS, max_new_tokens=5, eos_ids=eos_token_ids(tokenizer, model)))
    assert out["responses"] == plain["responses"]  # a fresh adapter (B = 0) changes nothing


def test_sequence_classifier_reward_renders_with_its_own_template_and_one_bos(models, tmp_path):
    """The reward model got the policy's chat rendering and, on text starting with BOS, a second BOS of its own."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from orl.envs.text_rewards import SequenceClassifierReward
    from orl.text.rewards import per_sample_reward

    tokenizer = AutoTokenizer.from_pretrained(models["llama"])
    tokenizer.chat_template = "{% for m in messages %}{{ bos_token }}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    classifier = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, num_labels=1, pad_token_id=0))
    classifier.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    reward = SequenceClassifierReward(str(tmp_path / "rm"))
    seen = []
    original = reward.model.forward
    reward.model.forward = lambda input_ids=None, **kw: seen.append(input_ids[0].tolist()) or original(input_ids=input_ids, **kw)
    policy_rendered = "<s>user count: 3 4 assistant "  # the policy's template, BOS as text
    reward(policy_rendered, "5 6")
    assert seen[-1].count(tokenizer.bos_token_id) == 1  # was two: the text's and the tokenizer's
    messages = [{"role": "user", "content": "count: 3 4"}]
    text, special = reward.text(policy_rendered, "5 6", messages)
    assert text == "<s>user count: 3 4 <s>assistant 5 6 " and not special  # the reward model's own template
    values = reward(prompts=[policy_rendered], completions=["5 6"], prompt_messages=[messages])  # TRL's signature
    assert len(values) == 1 and 0.0 < values[0] < 1.0
    assert per_sample_reward([reward])(policy_rendered, "5 6") == pytest.approx(reward(policy_rendered, "5 6"))
    # evaluation (per_sample_reward with the rows' columns) scores a chat row with the reward model's template too
    in_eval = per_sample_reward([reward], contexts={policy_rendered: {"prompt_messages": messages}})(policy_rendered, "5 6")
    assert in_eval == pytest.approx(values[0]) and in_eval != pytest.approx(reward(policy_rendered, "5 6"))
