"""Generation as an environment (issue 6): the token MDP and its KV-cache policy side."""
import copy

import numpy as np
import pytest
import torch

from orl.text.generation import KLPenalty, KVCachePolicy, ReencodePolicy, VectorTokenEnv, rollout

from orl.envs.lm import SequenceBandit, TokenEnv
from orl.envs.text_rewards import increasing_numbers, length_window
from orl.envs.tiny_lm import make_prompts

PROMPTS = ["count: 3", "count: 12 14", "count: 7 9 11 20", "count: 1"]


def test_greedy_env_generation_equals_model_generate(tiny_lm):
    model, tok = tiny_lm["model"], tiny_lm["tokenizer"]
    env = VectorTokenEnv(tok, PROMPTS, increasing_numbers, max_new_tokens=12)
    out = rollout(KVCachePolicy(model), env, greedy=True)
    for row, prompt in enumerate(PROMPTS):
        ids = torch.tensor([env.prompt_ids[row]])
        reference = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in reference:
            reference = reference[: reference.index(tok.eos_token_id)]
        assert out["responses"][row] == reference, (prompt, out["responses"][row], reference)


def test_kv_cache_path_equals_reencode_path(tiny_lm):
    model, tok = tiny_lm["model"], tiny_lm["tokenizer"]
    env = VectorTokenEnv(tok, PROMPTS, max_new_tokens=8)
    obs, _ = env.reset()
    width = env.prompt_width
    cached, full = KVCachePolicy(model), ReencodePolicy(model)
    a = cached.start(obs["input_ids"][:, :width], obs["attention_mask"][:, :width])
    b = full.start(obs["input_ids"][:, :width], obs["attention_mask"][:, :width])
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        tokens = torch.multinomial(torch.softmax(a, -1), 1, generator=generator).squeeze(-1)
        a, b = cached.step(tokens), full.step(tokens)


def test_terminal_reward_arrives_only_at_the_end(tiny_lm):
    tok = tiny_lm["tokenizer"]
    digits = tok(" 5 9")["input_ids"]
    env = VectorTokenEnv(tok, ["count: 3"], increasing_numbers, max_new_tokens=len(digits) + 1)
    env.reset()
    for token in digits:
        _, reward, terminated, truncated, _ = env.step(np.array([token]))
        assert reward[0] == 0.0 and not terminated[0] and not truncated[0]
    _, reward, terminated, _, _ = env.step(np.array([tok.eos_token_id]))
    assert terminated[0] and reward[0] == 1.0  # 3 < 5 < 9
    assert env.response_text(0) == " 5 9"


def test_truncation_and_per_token_reward(tiny_lm):
    tok = tiny_lm["tokenizer"]
    env = VectorTokenEnv(tok, ["count: 3"], max_new_tokens=3, step_reward_fn=lambda token, generated: 0.5)
    env.reset()
    rewards = []
    for _ in range(3):
        _, r, terminated, truncated, _ = env.step(np.array([tok(" 4")["input_ids"][0]]))
        rewards.append(r[0])
    assert rewards == [0.5, 0.5, 0.5] and truncated[0] and not terminated[0]


def test_prompt_longer_than_context_is_a_clear_error(tiny_lm):
    tok = tiny_lm["tokenizer"]
    with pytest.raises(ValueError, match="context is 48"):
        VectorTokenEnv(tok, ["count: " + " ".join(["7"] * 40)], max_new_tokens=16, context_length=48)


def test_single_gymnasium_env_and_sequence_bandit(tiny_lm):
    tok = tiny_lm["tokenizer"]
    env = TokenEnv(tok, PROMPTS, increasing_numbers, max_new_tokens=4)
    obs, info = env.reset(seed=0, options={"prompt_index": 0})
    assert env.observation_space.contains({k: v for k, v in obs.items()}) and env.action_space.n == len(tok)
    _, reward, terminated, _, _ = env.step(tok.eos_token_id)
    assert terminated and reward == 0.0  # empty response: no number
    bandit = SequenceBandit(tok, PROMPTS, increasing_numbers)
    index, _ = bandit.reset(options={"prompt_index": 0})
    _, reward, done, _, info = bandit.step(tok(" 4 8")["input_ids"])
    assert done and reward == 1.0 and info["response"] == " 4 8"


def test_kl_penalty_is_zero_against_itself(tiny_lm):
    model, tok = tiny_lm["model"], tiny_lm["tokenizer"]
    env = KLPenalty(VectorTokenEnv(tok, PROMPTS, max_new_tokens=5), model, beta=0.1)
    obs, _ = env.reset()
    policy = KVCachePolicy(model)
    logits = policy.start(obs["input_ids"][:, : env.prompt_width], obs["attention_mask"][:, : env.prompt_width])
    while not env.all_done:
        actions = logits.argmax(-1)
        log_probs = torch.log_softmax(logits, -1).gather(-1, actions[:, None]).squeeze(-1)
        _, rewards, _, _, info = env.step(actions, log_probs)
        np.testing.assert_allclose(info["kl"], 0.0, atol=1e-5)
        if not env.all_done:
            logits = policy.step(actions)


def test_text_rewards():
    assert increasing_numbers("count: 3", " 5 9 12") == 1.0
    assert increasing_numbers("count: 3", " 2 9") == 0.5
    assert increasing_numbers("count: 3", " hello") == 0.0
    window = length_window(2, 4)
    assert window("", "a b c") == 1.0 and window("", "a") == 0.5 and window("", "") == 0.0
    assert len(make_prompts(5, 0)) == 5


def test_best_of_n_beats_single_samples(tiny_lm):
    from orl.text.generation import best_of_n, evaluate_lm

    prompts = make_prompts(32, seed=4)
    texts, best = best_of_n(tiny_lm["model"], tiny_lm["tokenizer"], prompts, increasing_numbers, n=4, seed=0)
    single = evaluate_lm(tiny_lm["model"], tiny_lm["tokenizer"], prompts, increasing_numbers, seed=0)["reward"]
    assert len(texts) == 32 and best.mean() > single
    assert all(increasing_numbers(p, t) == pytest.approx(b) for p, t, b in zip(prompts, texts, best))


def test_hf_sequence_classifier_reward_loads_by_path(tiny_lm, tmp_path):
    from transformers import GPT2ForSequenceClassification

    from orl.envs.text_rewards import SequenceClassifierReward

    config = copy.deepcopy(tiny_lm["model"].config)
    config.num_labels = 1
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tiny_lm["tokenizer"].save_pretrained(tmp_path)
    reward = SequenceClassifierReward(str(tmp_path))
    value = reward("count: 3", " 4 5")
    assert 0.0 < value < 1.0


def test_demo_prompt_splits_are_disjoint_strings():
    """make lm-demo's held-out prompts were its training prompts (all drawn from the same 30 strings)."""
    from orl.envs.tiny_lm import prompt_pool

    train, val, test = (set(prompt_pool(s)) for s in ("train", "val", "test"))
    assert not train & val and not train & test and not val & test
    assert len(train) > 600 and len(test) > 60
    assert set(make_prompts(500, seed=1, split="test")) <= test and set(make_prompts(500, seed=1)) <= train
