"""Multi-turn text environments: the batched conversation rollout with one KV cache (orl/text/conversation.py)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from orl.text.conversation import (ConversationFormat, conversation_tensors, load_conversations, rollout_conversations,
                                   save_conversations, tokenize_conversation)
from orl.text.runtime import eos_token_ids, load_lm
from tests.lm_archs import build_tiny_causal_lm

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


class CountingGame:
    """A partner in the toy tokenizers' words: the episode lasts 1-3 agent turns (by seed); reward = words written."""

    system_prompt = None

    def __init__(self, end: str = ""):
        self.end, self.max_turns = end, 4

    def reset(self, seed: int):
        self.turn, self.length = 0, 1 + seed % 3
        return f"count: {seed % 50} {self.end}", {}

    def step(self, action: str):
        self.turn += 1
        done = self.turn >= self.length
        return f"{self.turn} {self.turn + 1} {self.end}", float(len(action.split())), done, False, {"success": done} if done else {}


def _model(arch, tmp_path, chat=False):
    path = build_tiny_causal_lm(arch, tmp_path / arch, seed=3)
    model, tokenizer = load_lm(str(path))
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return model, tokenizer


def _roll(model, tokenizer, seeds, chat, **kwargs):
    stop = None if chat else "the"
    return rollout_conversations(model, tokenizer, [CountingGame("" if chat else "") for _ in seeds], seeds, max_turn_tokens=5,
                                 chat=chat, stop=stop or "\n", **kwargs)


@pytest.mark.parametrize("arch,chat", [("gpt2", False), ("llama", False), ("qwen2", True), ("gpt_neox", False)])
def test_batched_equals_one_at_a_time_and_generate_on_the_full_history(tmp_path, arch, chat):
    model, tokenizer = _model(arch, tmp_path, chat)
    seeds = [0, 1, 2, 4, 5]
    batched = _roll(model, tokenizer, seeds, chat, greedy=True)
    for seed, conv in zip(seeds, batched):
        alone = _roll(model, tokenizer, [seed], chat, greedy=True)[0]
        assert (alone.prompt_ids, alone.ids, alone.agent_mask, alone.rewards) == (conv.prompt_ids, conv.ids, conv.agent_mask, conv.rewards)
        assert conv.turns == min(1 + seed % 3, 4) and conv.terminated and conv.success
        # each agent turn equals `generate` re-run greedily on the whole history before it (no cache across turns)
        fmt = ConversationFormat(tokenizer, eos_token_ids(tokenizer, model), chat, "\n" if chat else "the")
        start = 0
        for end in conv.turn_ends:
            history = torch.tensor([conv.prompt_ids + conv.ids[:start]])
            out = model.generate(history, attention_mask=torch.ones_like(history), max_new_tokens=end - start + 1, do_sample=False,
                                 eos_token_id=sorted(fmt.end_ids), pad_token_id=tokenizer.pad_token_id or 0)
            assert out[0, history.shape[1]:].tolist() == conv.ids[start:end + 1]
            assert all(conv.agent_mask[start:end + 1])
            start = end + 1
            while start < len(conv.ids) and not conv.agent_mask[start]:
                start += 1


def test_finished_conversations_leave_the_batch_and_sampling_is_reproducible(tmp_path):
    model, tokenizer = _model("gpt2", tmp_path)
    seeds = list(range(6))
    first = _roll(model, tokenizer, seeds, False, generator=torch.Generator().manual_seed(0))
    second = _roll(model, tokenizer, seeds, False, generator=torch.Generator().manual_seed(0))
    assert [c.ids for c in first] == [c.ids for c in second]
    assert sorted({c.turns for c in first}) == [1, 2, 3]  # different lengths in one batch


def test_context_full_truncates(tmp_path):
    model, tokenizer = _model("gpt2", tmp_path)
    convs = rollout_conversations(model, tokenizer, [CountingGame() for _ in range(2)], [2, 5], max_turn_tokens=5, stop="the",
                                  greedy=True, context=16)
    for conv in convs:
        assert conv.truncated and conv.info.get("context_full")
        assert len(conv.prompt_ids) + len(conv.ids) <= 16


class ScriptedLM(torch.nn.Module):
    """Writes the given agent turns, token by token, whatever it is fed (one conversation)."""

    def __init__(self, turns: list[list[int]], vocab: int):
        super().__init__()
        self.tokens, self.vocab, self.calls = [t for turn in turns for t in turn], vocab, 0
        self.config = type("Config", (), {"max_position_embeddings": 256})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=True, past_key_values=None):
        logits = torch.full((1, input_ids.shape[1], self.vocab), -1e9)
        logits[0, -1, self.tokens[min(self.calls, len(self.tokens) - 1)]] = 0.0
        self.calls += 1
        return {"logits": logits, "past_key_values": None}


class ScriptedGame:
    system_prompt, max_turns = None, 3

    def reset(self, seed):
        self.turn = 0
        return "count: 1", {}

    def step(self, action):
        self.turn += 1
        return f"{self.turn + 3}", float(self.turn), self.turn == 3, False, {"success": True} if self.turn == 3 else {}


@pytest.mark.parametrize("chat", [False, True])
def test_a_logged_conversation_tokenizes_to_the_tokens_of_its_rollout(tmp_path, tiny_lm, chat):
    """Agent turns that end with the end-of-turn token (plain text: `stop`; chat: the template's), logged to JSONL and
    tokenized turn by turn, give exactly the tokens the rollout built, replies and chat markup included. (A byte-level
    tokenizer, whose text round-trips; the toy word-level ones do not.)"""
    import copy

    tokenizer = copy.deepcopy(tiny_lm["tokenizer"])
    if chat:
        tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                                   "{% if add_generation_prompt %}assistant: {% endif %}")
    fmt = ConversationFormat(tokenizer, [tokenizer.eos_token_id], chat, "\n")
    history = [{"role": "user", "content": "count: 1"}]
    turns = []
    for content, reply in (("2 3", "4"), ("5", "6"), ("7 8 9", "done")):
        turns.append(fmt.turn_ids(history, content))
        history += [{"role": "assistant", "content": content}, {"role": "user", "content": reply}]
    model = ScriptedLM(turns, len(tokenizer))

    class Wrapper(torch.nn.Module):  # the rollout reads `.logits` and the cache from the output
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **kwargs):
            out = model(**kwargs)
            return type("Out", (dict,), {"logits": property(lambda o: o["logits"])})(out)

    wrapped = Wrapper()
    wrapped.config = model.config
    conv = rollout_conversations(wrapped, tokenizer, [ScriptedGame()], [0], max_turn_tokens=8, greedy=True, chat=chat,
                                 eos_ids=[tokenizer.eos_token_id])[0]
    assert [m["content"].strip() for m in conv.messages if m["role"] == "assistant"] == ["2 3", "5", "7 8 9"]
    assert conv.rewards == [1.0, 2.0, 3.0] and conv.terminated
    row = load_conversations(save_conversations(tmp_path / "log.jsonl", [conv]))[0]
    prompt_ids, ids, agent, rewards = tokenize_conversation(fmt, row["messages"])
    assert (prompt_ids, ids, agent, rewards) == (conv.prompt_ids, conv.ids, conv.agent_mask, conv.rewards)
    ids_t, mask, agent_t = conversation_tensors([conv], tokenizer.pad_token_id or 0)
    assert agent_t.sum() == sum(len(t) for t in turns) and ((agent_t == 1) <= (mask == 1)).all()
    # the context rule is exact: a turn starts only if the conversation so far plus max_turn_tokens fits. The room the
    # third turn needs is the conversation before it plus 8; one token less and the conversation is cut before it.
    before_third = len(conv.prompt_ids) + conv.turn_ends[1] + 1 + sum(1 for a in conv.agent_mask[conv.turn_ends[1] + 1:] if not a)
    for context, cut in ((before_third + 8, False), (before_third + 7, True)):
        model.calls = 0
        again = rollout_conversations(wrapped, tokenizer, [ScriptedGame()], [0], max_turn_tokens=8, greedy=True, chat=chat,
                                      eos_ids=[tokenizer.eos_token_id], context=context)[0]
        assert again.truncated == cut and again.turns == (2 if cut else 3) and bool(again.info.get("context_full")) == cut


def test_malformed_conversation_files_are_refused(tmp_path):
    from orl.errors import DataError

    path = tmp_path / "bad.jsonl"
    for messages, what in (([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                            "alternates"),
                           ([{"role": "assistant", "content": "a"}], "alternates"),
                           ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a", "reward": "1"}], "reward"),
                           ([{"role": "user", "content": "hi"}], "no assistant turn")):
        path.write_text(json.dumps({"messages": messages}) + "\n")
        with pytest.raises(DataError, match=what):
            load_conversations(path)


def test_turn_separator_ids_belong_to_their_tokenizer(tiny_lm, tmp_path):
    """The ids that end a plain-text turn are cached per tokenizer object, not per id(): another tokenizer never gets
    the first one's ids, and a tokenizer without the separator is refused."""
    from orl.errors import DataError
    from orl.text.conversation import _ids_containing

    tiny = tiny_lm["tokenizer"]
    newline = _ids_containing(tiny, "\n")
    assert newline and all("\n" in tiny.decode([i]) for i in newline)
    words = _model("gpt2", tmp_path)[1]  # whitespace-split words: no token holds a newline
    with pytest.raises(DataError, match="turn separator"):
        _ids_containing(words, "\n")
    assert _ids_containing(words, "the") == {words.convert_tokens_to_ids("the")}
