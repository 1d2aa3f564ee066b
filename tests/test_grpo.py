"""The GRPO family (agents/grpo.py): advantages and losses against TRL's GRPOTrainer on one fixed batch, RLOO as
a preset that reproduces the old RLOO update, rewards as programs, and learning through orl-train."""
import json
import math
import tempfile
import warnings

import gymnasium as gym
import pytest
import torch

import orl
from orl.agents.grpo import group_advantages, policy_loss
from orl.text.data import PromptBatch
from tests.lm_archs import build_tiny_causal_lm

SPACE = gym.spaces.Discrete(2)


# --- advantages: TRL's formulas (grpo_trainer._generate_and_score_completions, rloo_trainer) with TRL's nanstd --------
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_grpo_advantages_equal_trls(scale_rewards):
    trl_utils = pytest.importorskip("trl.trainer.utils")
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 1.0, 0.0, 3.0, 0.2, 0.2, 0.2, 0.2])  # 3 prompts x 4, the last group constant
    G = 4
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    if scale_rewards == "batch":
        std = trl_utils.nanstd(rewards).expand_as(rewards)
    else:
        std = trl_utils.nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    expected = rewards - mean
    if scale_rewards != "none":
        expected = expected / (std + 1e-4)
    ours, ours_std = group_advantages(rewards, G, "grpo", scale_rewards)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert torch.isclose(ours_std, torch.zeros_like(ours_std)).float().mean() == pytest.approx(1 / 3 if scale_rewards != "batch" else 0.0)


def test_rloo_remax_and_reinforce_pp_advantages_on_a_known_case():
    rewards = torch.tensor([1.0, 0.0, 2.0, 3.0, 4.0, 5.0])  # 2 prompts x 3
    rloo, _ = group_advantages(rewards, 3, "rloo")
    torch.testing.assert_close(rloo, torch.tensor([0.0, -1.5, 1.5, -1.5, 0.0, 1.5]))  # r_i - mean of the other two
    remax, _ = group_advantages(rewards, 3, "remax", greedy_rewards=torch.tensor([1.0, 4.5]))
    torch.testing.assert_close(remax, torch.tensor([0.0, -1.0, 1.0, -1.5, -0.5, 0.5]))
    rpp, _ = group_advantages(rewards, 3, "reinforce_pp")
    torch.testing.assert_close(rpp, (rewards - rewards.mean()) / (rewards.std() + 1e-4))
    nan = torch.tensor([1.0, float("nan"), 3.0, 0.0])  # an unscorable completion: out of the baseline, advantage 0
    out, _ = group_advantages(nan, 2, "grpo", "none")
    assert out.tolist() == [0.0, 0.0, 1.5, -1.5]


# --- the loss: TRL's GRPOTrainer._compute_loss on the same tensors --------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(build_tiny_causal_lm("llama", tmp_path_factory.mktemp("grpo") / "llama"))


def _trl_trainer(model_path, loss_type, beta, epsilon_high, tmp):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(dir=tmp), per_device_train_batch_size=4, num_generations=2, beta=beta,
                              loss_type=loss_type, max_completion_length=6, epsilon=0.2, epsilon_high=epsilon_high, report_to=[],
                              use_cpu=True, bf16=False, temperature=0.7)
        trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                                  train_dataset=datasets.Dataset.from_list([{"prompt": "count: 1"}] * 4), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("loss_type, beta, epsilon_high", [("grpo", 0.0, None), ("bnpo", 0.0, None), ("dr_grpo", 0.0, None),
                                                            ("dapo", 0.0, None), ("dapo", 0.04, 0.28), ("grpo", 0.04, None)])
def test_loss_equals_trls_grpo_trainer(llama, tmp_path, loss_type, beta, epsilon_high):
    trainer = _trl_trainer(llama, loss_type, beta, epsilon_high, tmp_path)
    model = trainer.model
    model.train()
    tok = trainer.processing_class
    prompt_ids = torch.tensor([tok("count: 3 4")["input_ids"]] * 4)  # one prompt length: no prompt padding
    completions = [[10, 11, 12, tok.eos_token_id], [13, 14], [15, 16, 17, 18, 19, 20], [12, tok.eos_token_id]]
    width = max(map(len, completions))
    completion_ids = torch.tensor([c + [tok.pad_token_id] * (width - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, prompt_ids.shape[1] - 1:-1] / 0.7
        current = torch.log_softmax(logits.float(), -1).gather(-1, completion_ids[..., None]).squeeze(-1)
    # old and reference log-probs that differ from the current ones, so the ratios clip on both sides
    old = current + 0.3 * torch.randn(current.shape, generator=generator)
    ref = current + 0.2 * torch.randn(current.shape, generator=generator)
    advantages = torch.tensor([1.0, -0.5, 0.7, -1.2])
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": completion_mask.sum().float()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    trl_loss = trainer._compute_loss(model, inputs).item()

    # orl: the same log-probs through orl's own path (left-padded layout, positions from the mask, logits / T) ...
    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "temperature": 0.7, "beta": beta})
    agent.nets["policy"].load_state_dict(model.state_dict())
    from orl.text.data import build_sequences

    ids, mask, response_mask = build_sequences(prompt_ids.tolist(), completions, tok.pad_token_id)
    logps, _ = agent.token_logps(agent.nets["policy"], ids, mask)
    token_mask = response_mask[:, 1:].bool()
    ours = torch.zeros_like(current)
    for row, length in enumerate(map(len, completions)):
        ours[row, :length] = logps[row][token_mask[row]]
    torch.testing.assert_close(ours * completion_mask, current * completion_mask, atol=1e-5, rtol=0)
    # ... and the clipped, aggregated loss on them
    loss, _ = policy_loss(ours, old, advantages, completion_mask.float(), loss_type, 0.2, epsilon_high or 0.2, beta,
                          ref if beta else None, max_completion_length=6, num_items=float(completion_mask.sum()))
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)


def test_sequence_loss_equals_trls_rloo_trainer_formula():
    """TRL's RLOOTrainer._compute_loss: the ratio of summed log-probs, clipped, -mean over sequences."""
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    old = torch.tensor([[-1.3, -2.1, 0.0], [-0.2, -0.5, -0.4]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([0.8, -0.6])
    ratio = torch.exp(((logps - old) * mask).sum(1))
    expected = -torch.min(ratio * advantages, ratio.clamp(0.8, 1.2) * advantages).mean()
    loss, _ = policy_loss(logps, old, advantages, mask, "sequence", 0.2, 0.2)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-7)


# --- RLOO as a preset reproduces the old RLOO update ----------------------------------------------------------------
def test_rloo_preset_takes_the_old_rloo_step(llama):
    """The RLOO agent before it became a preset of GRPO: k samples per prompt through the env with a per-token k1
    penalty, leave-one-out baseline, loss -(A * sum_t log pi).mean(). Same seed, same samples: same update."""
    from orl.envs.text_rewards import increasing_numbers
    from orl.text.data import SequenceBatch, build_sequences, response_log_prob
    from orl.text.generation import KLPenalty, KVCachePolicy, VectorTokenEnv, rollout
    from orl.text.runtime import context_length, eos_token_ids

    prompts, k, beta, lr = ["count: 1", "count: 5"], 4, 0.05, 1e-3
    agent = orl.make_agent("rloo", SPACE, SPACE, {"model_path": llama, "num_generations": k, "beta": beta, "lr": lr,
                                                  "max_completion_length": 5, "seed": 3})
    with torch.no_grad():  # a policy away from the reference, so the KL penalty is not 0
        g = torch.Generator().manual_seed(1)
        for p in agent.nets["policy"].parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    legacy = orl.make_agent("rloo", SPACE, SPACE, {"model_path": llama, "lr": lr, "seed": 3})
    legacy.nets["policy"].load_state_dict(agent.nets["policy"].state_dict())

    # the old update, written out
    policy = legacy.nets["policy"]
    policy.eval()
    repeated = [p for p in prompts for _ in range(k)]
    env = VectorTokenEnv(legacy.tokenizer, repeated, increasing_numbers, 5, context_length(policy, legacy.tokenizer),
                         eos_ids=eos_token_ids(legacy.tokenizer, policy))
    out = rollout(KVCachePolicy(policy), KLPenalty(env, legacy.nets["reference"], beta, 1.0), False, 1.0, legacy.generator)
    returns = torch.as_tensor(out["rewards"], dtype=torch.float32).view(len(prompts), k)
    advantages = (returns - (returns.sum(1, keepdim=True) - returns) / (k - 1)).flatten()
    policy.train()
    ids, mask, response_mask = build_sequences(env.prompt_ids, out["sampled_ids"], legacy.tokenizer.pad_token_id)
    loss = -(advantages * response_log_prob(policy, SequenceBatch(ids, mask, response_mask))).mean()
    legacy.optimizers["policy"].zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    legacy.optimizers["policy"].step()

    metrics = agent.train_step(prompts, increasing_numbers)
    assert metrics["reward"] == pytest.approx(float((returns + beta * torch.as_tensor(out["kl"]).view_as(returns)).mean()), abs=1e-5)
    for (name, new), old in zip(agent.nets["policy"].named_parameters(), legacy.nets["policy"].parameters()):
        torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-4, msg=name)


# --- rewards as programs, columns, num_iterations, errors -----------------------------------------------------------
def test_reward_functions_get_trls_keyword_arguments_and_columns(llama):
    seen = {}

    def exact(prompts, completions, completion_ids, answer, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer)
        return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answer)]

    def unscored(prompts, completions, **kwargs):
        return [None] * len(completions)

    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 2, "max_completion_length": 3, "lr": 0.0})
    agent.set_rewards([exact, unscored], [2.0, 1.0])
    metrics = agent.update(PromptBatch(["count: 1", "count: 7"], torch.arange(2), {"answer": ["2", "8"]}))
    assert seen["answer"] == ["2", "2", "8", "8"] and seen["prompts"] == ["count: 1", "count: 1", "count: 7", "count: 7"]
    assert all(isinstance(ids, list) for ids in seen["completion_ids"])
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/exact/mean", "completions/mean_length",
                "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "entropy", "grad_norm", "lr", "loss"):
        assert key in metrics, key
    assert "rewards/unscored/mean" not in metrics  # was NaN, which stops a Trainer run as diverged


def test_num_iterations_reuses_one_generation_batch_and_clips(llama):
    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 4, "max_completion_length": 4, "lr": 0.05,
                                                  "num_iterations": 3, "loss_type": "grpo"})
    calls = []
    original = agent.generate
    agent.generate = lambda prompts, greedy=False: calls.append(len(prompts)) or original(prompts, greedy)
    agent.reward_fn = lambda p, r: float(len(r))
    metrics = agent.update(PromptBatch(["count: 1", "count: 2"], torch.arange(2)))
    assert calls == [8]  # one generation batch for three optimizer steps
    assert float(metrics["clip_ratio/region_mean"]) > 0  # by the third step, lr 0.05 moved the ratios out of the clip range


def test_bad_options_are_one_clear_error(llama):
    from orl.errors import ConfigError

    with pytest.raises(ConfigError, match="agent.loss_type must be one of"):
        orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "loss_type": "ppo"})
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 1})


# --- through orl-train: a reward written as a program, learning on held-out prompts --------------------------------
def test_orl_train_grpo_with_a_reward_program_learns(tmp_path, monkeypatch, tiny_lm):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.envs.tiny_lm import make_prompts
    from orl.logger import read_metrics

    (tmp_path / "my_rewards.py").write_text(
        "from orl.envs.text_rewards import increasing_numbers\n"
        "def increasing(prompts, completions, **kwargs):\n"
        "    return [increasing_numbers(p, c) for p, c in zip(prompts, completions)]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in make_prompts(120, seed=0)))
    overrides = ["agent=grpo", f"dataset={data}", f"lm.model={tiny_lm['path']}", "lm.reward=my_rewards:increasing", "agent.lr=3e-4",
                 "agent.num_generations=4", "agent.max_completion_length=12", "lm.max_new_tokens=12", "lm.num_eval_prompts=32",
                 "steps=30", "batch_size=8", "eval.every=30", "log.every=5", "log.progress=false", "log.tensorboard=false", "device=cpu",
                 f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_train(compose(config_name="train", overrides=overrides))
    rows = [r for r in read_metrics(tmp_path / "run") if "train/reward" in r]
    first, last = rows[0]["train/reward"], sum(r["train/reward"] for r in rows[-2:]) / 2
    assert "train/rewards/increasing/mean" in rows[0] and "train/completions/mean_length" in rows[0]
    assert last > first + 0.05, (first, last)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_gradient_accumulation_takes_the_full_batch_step(llama, loss_type):
    """grad_accum_steps splits one generation batch into micro-batches whose gradients add up to the full batch's
    (the old RLOO ignored the option)."""
    params = []
    for parts in (1, 2):
        agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 4, "max_completion_length": 4, "lr": 1e-2,
                                                      "loss_type": loss_type, "grad_accum_steps": parts, "seed": 5})
        agent.reward_fn = lambda p, r: float(len(r.split()))
        agent.update(PromptBatch(["count: 1", "count: 2"], torch.arange(2)))
        params.append([p.detach().clone() for p in agent.nets["policy"].parameters()])
    for full, accumulated in zip(*params):
        torch.testing.assert_close(accumulated, full, atol=1e-5, rtol=1e-4)


def test_chat_rows_reach_reward_functions_as_messages_like_trl(llama):
    """TRL hands a conversational row's prompt and completions to reward functions as message lists; orl's text
    rewards (marked orl_text_only) keep getting the rendered text."""
    from orl.text.rewards import as_reward_func

    seen = {}

    def trl_style(prompts, completions, **kwargs):
        seen["prompt"], seen["completion"] = prompts[0], completions[0]
        return [float(len(c[0]["content"])) for c in completions]

    text_reward = as_reward_func(lambda prompt, response: float(isinstance(prompt, str) and isinstance(response, str)))
    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 2, "max_completion_length": 3, "lr": 0.0})
    agent.set_rewards([trl_style, text_reward])
    messages = [[{"role": "user", "content": "count: 1"}], [{"role": "user", "content": "count: 7"}]]
    metrics = agent.update(PromptBatch(["<s>user count: 1 assistant ", "<s>user count: 7 assistant "], torch.arange(2),
                                       {"prompt_messages": messages}))
    assert seen["prompt"] == messages[0] and seen["completion"][0]["role"] == "assistant"
    assert float(metrics["rewards/<lambda>/mean"]) == 1.0  # the text reward saw strings


def test_a_group_is_never_split_across_data_parallel_processes(llama):
    """Each process takes whole prompts of the batch and generates all num_generations completions of each."""
    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 3, "max_completion_length": 2, "lr": 0.0})
    agent.reward_fn = lambda p, r: 0.0
    agent.data_parallel.rank, agent.data_parallel.world = 1, 2  # process 1 of 2 (averaging is skipped: no process group)
    agent.data_parallel.average = lambda metrics: metrics
    agent.data_parallel.average_gradients = lambda params: None
    seen = []
    original = agent.generate
    agent.generate = lambda prompts, greedy=False: seen.append(list(prompts)) or original(prompts, greedy)
    agent.update(PromptBatch(["count: 1", "count: 2", "count: 3", "count: 4"], torch.arange(4)))
    assert seen == [["count: 3"] * 3 + ["count: 4"] * 3]  # its half of the prompts, each with its whole group


def test_grpo_with_lora_through_orl_train(llama, tmp_path):
    from hydra import compose, initialize_config_dir
    from transformers import AutoModelForCausalLM

    from orl.apps.cli import CONFIG_DIR, run_train

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"count: {i}"}) + "\n" for i in range(8)))
    overrides = ["agent=grpo", f"dataset={data}", f"lm.model={llama}", "lm.reward=increasing_numbers", "lm.lora.r=4", "agent.lr=1e-2",
                 "agent.num_generations=2", "agent.max_completion_length=3", "lm.max_new_tokens=3", "steps=2", "batch_size=2",
                 "eval.every=2", "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        summary = run_train(compose(config_name="train", overrides=overrides))
    assert math.isfinite(summary["return_mean"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")  # the adapter merged into a plain model
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_review_mends_single_scorable_rloo_group_sequence_beta_and_kwargs_rewards(llama):
    from orl.errors import ConfigError
    from orl.text.rewards import as_reward_func

    rloo, _ = group_advantages(torch.tensor([1.0, float("nan"), 2.0, 4.0]), 2, "rloo")
    assert rloo.tolist() == [0.0, 0.0, -2.0, 2.0]  # a group with one scorable completion has no baseline (TRL: 0/0 -> 0)
    with pytest.raises(ConfigError, match="kl_in_reward"):  # the sequence loss had silently dropped the k3 term
        orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "loss_type": "sequence", "beta": 0.1})

    def kwargs_only(**kwargs):
        return [1.0] * len(kwargs["completions"])

    assert as_reward_func(kwargs_only) is kwargs_only


def test_evaluation_uses_the_runs_prompts_with_their_columns(llama):
    """Held-out rows beyond 256, an lm.eval_prompts file, and lm.holdout=0 all evaluate the run's chosen prompts with
    the columns their rows carry."""
    from types import SimpleNamespace

    agent = orl.make_agent("grpo", SPACE, SPACE, {"model_path": llama, "num_generations": 2, "max_completion_length": 2})
    seen = []
    agent.set_rewards([lambda prompts, completions, answer=None, **kw: seen.extend(zip(prompts, answer or [None] * len(prompts)))
                       or [0.0] * len(prompts)])
    rows = [{"prompt": f"count: {i}", "answer": str(i)} for i in range(3)]
    run = SimpleNamespace(eval_rows=[], rows=rows, eval_prompts=["count: 2", "count: 9"], seed=0)  # holdout 0 / a file
    agent.evaluate_run(run)
    assert seen == [("count: 2", "2"), ("count: 9", None)]
    seen.clear()
    held = [{"prompt": f"count: {i % 40}", "answer": str(i)} for i in range(300)]
    agent.evaluate_run(SimpleNamespace(eval_rows=held, rows=rows, eval_prompts=["count: 39", "count: 38"], seed=0))
    assert {p for p, _ in seen} == {"count: 39", "count: 38"} and len(seen) == 14  # every held-out row of those prompts
