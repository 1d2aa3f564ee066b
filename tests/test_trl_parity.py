"""orl's DPO against TRL's DPOTrainer on one batch of a tiny Llama (BOS-adding tokenizer): same token
ids, same loss and implicit rewards to 1e-5 (issue 12, parity with a peer)."""
import math
import tempfile
import warnings

import gymnasium as gym
import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is a test-only dependency (pip install -e .[dev])")
datasets = pytest.importorskip("datasets")

import orl  # noqa: E402
from orl.agents.dpo import DPO  # noqa: E402
from orl.text.encoding import CHAT_ROW, tokenize_rows, pair_buffer  # noqa: E402
from orl.text.data import PairBatch  # noqa: E402
from tests.lm_archs import build_tiny_causal_lm  # noqa: E402

ROWS = [{"prompt": "count: 3 4", "chosen": " 5 6", "rejected": " 2 1"},
        {"prompt": "count: 10", "chosen": " 11 12", "rejected": " 3"},
        {"prompt": "count: 7 8 9", "chosen": " 10 11", "rejected": " 1 0"}]


def trl_dpo_trainer(agent, tokenizer, rows, tmp_path, **config):
    """TRL's DPOTrainer on `rows` around orl's policy and reference, fp32 (TRL defaults to bf16 autocast), one batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.DPOConfig(output_dir=tempfile.mkdtemp(dir=tmp_path), per_device_train_batch_size=len(rows), report_to=[], use_cpu=True,
                             precompute_ref_log_probs=False, bf16=False, **config)
        return trl.DPOTrainer(model=agent.nets["policy"], ref_model=agent.nets["reference"], args=args,
                              train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)


def assert_pair_ids_equal_trl(trainer, tokenizer, rows) -> list[tuple[list[int], list[int], list[int]]]:
    """orl's (prompt, chosen, rejected) ids of `rows` (EOS after plain-text completions only, as the pair buffer
    adds it) equal those of TRL's tokenized dataset, row by row; returns orl's."""
    add_eos = [not row.get(CHAT_ROW, False) for row in rows]
    prompt_ids, chosen_ids = tokenize_rows(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows], add_eos)
    _, rejected_ids = tokenize_rows(tokenizer, [r["prompt"] for r in rows], [r["rejected"] for r in rows], add_eos)
    ours = list(zip(prompt_ids, chosen_ids, rejected_ids))
    theirs = [(row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) for row in trainer.train_dataset]
    assert theirs == ours
    return ours


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dpo_loss_and_rewards_equal_trl(tmp_path, arch):
    path = str(build_tiny_causal_lm(arch, tmp_path / arch))
    beta = 0.1
    agent: DPO = orl.make_agent("dpo", gym.spaces.Discrete(2), gym.spaces.Discrete(2), {"model_path": path, "beta": beta})
    with torch.no_grad():  # a policy that differs from the reference, so the loss is not just log 2
        generator = torch.Generator().manual_seed(0)
        for p in agent.nets["policy"].parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    tokenizer = agent.tokenizer

    trainer = trl_dpo_trainer(agent, tokenizer, ROWS, tmp_path, beta=beta)
    # The same token ids: BOS once on the prompt (Llama), none on the completion, EOS at its end.
    assert_pair_ids_equal_trl(trainer, tokenizer, ROWS)

    batch = next(iter(trainer.get_train_dataloader()))
    agent.nets["policy"].train()
    trl_loss = trainer.compute_loss(agent.nets["policy"], batch).item()
    trl_chosen = trainer._metrics["train"]["rewards/chosen"][-1]
    trl_rejected = trainer._metrics["train"]["rewards/rejected"][-1]

    buffer = pair_buffer(tokenizer, [r["prompt"] for r in ROWS], [r["chosen"] for r in ROWS], [r["rejected"] for r in ROWS], device="cpu")
    agent.prepare(buffer)
    everything = torch.arange(len(ROWS))
    loss, metrics = agent.losses(PairBatch(buffer.chosen.gather(everything), buffer.rejected.gather(everything)))
    assert loss.item() == pytest.approx(trl_loss, abs=1e-5)
    assert metrics["rewards/chosen"].item() == pytest.approx(trl_chosen, abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(trl_rejected, abs=1e-5)
    assert not math.isclose(loss.item(), math.log(2), abs_tol=1e-4)


@pytest.mark.parametrize("margin, center", [(None, None), (0.5, None), (None, 0.01)])
def test_bradley_terry_loss_equals_trl_reward_trainer(margin, center):
    """orl's bt_loss against TRL's RewardTrainer.compute_loss (its own code path) on the same scores."""
    from collections import defaultdict
    from types import SimpleNamespace

    from orl.agents.reward_model import bt_loss

    chosen, rejected = torch.tensor([1.2, -0.3, 0.8, 2.0]), torch.tensor([0.1, 0.4, -1.0, 2.5])
    scores = torch.cat([chosen, rejected])[:, None]
    model = lambda **inputs: SimpleNamespace(logits=scores)  # noqa: E731  (a sequence classifier's (2B, 1) output)
    trainer = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=center),
                              accelerator=SimpleNamespace(gather_for_metrics=lambda x: x, gather=lambda x: x), _metrics={"eval": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = torch.full((4,), margin)
    trl_loss = trl.RewardTrainer.compute_loss(trainer, model, inputs)
    ours = bt_loss(chosen, rejected, margin or 0.0, center or 0.0)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)


def test_chat_rows_tokenize_as_trl_does_no_eos_after_the_end_of_turn(tmp_path):
    """TRL adds EOS to non-conversational rows only: a chat completion ends where the template's rendering ends (its
    end-of-turn), and orl appended the tokenizer's EOS after it (`<|im_end|></s>`-style ids on every chat row)."""
    from orl.text.encoding import render_chat

    path = build_tiny_causal_lm("qwen2", tmp_path / "qwen2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
    tokenizer.save_pretrained(path)
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in ROWS]
    agent = orl.make_agent("dpo", gym.spaces.Discrete(2), gym.spaces.Discrete(2), {"model_path": str(path)})
    trainer = trl_dpo_trainer(agent, tokenizer, rows, tmp_path)
    rendered = render_chat(rows, tokenizer, ["prompt", "chosen", "rejected"])
    assert all(r[CHAT_ROW] for r in rendered)
    for _, chosen_ids, _ in assert_pair_ids_equal_trl(trainer, tokenizer, rendered):  # before: chosen + [EOS]
        assert chosen_ids[-1] != tokenizer.eos_token_id


def test_a_chat_template_that_raises_is_one_data_error(tmp_path):
    from orl.errors import DataError
    from orl.text.encoding import render_chat

    path = build_tiny_causal_lm("llama", tmp_path / "llama")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
                               "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{{ m['content'] }} {% endfor %}")
    rows = [{"prompt": [{"role": "tool", "content": "3"}], "chosen": "4", "rejected": "1"}]
    with pytest.raises(DataError, match="row 1: the tokenizer's chat template failed.*unknown role tool"):
        render_chat(rows, tokenizer, ["prompt", "chosen", "rejected"])
