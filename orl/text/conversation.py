"""Conversations as environments: a multi-turn text MDP and the batched rollout that drives a language model through it.

An episode is a conversation. The environment opens it with a message; the agent's turn is the tokens the model
generates until an end-of-turn token (the model's EOS list, which holds a chat model's end-of-turn) or, for plain-text
models, a token containing the environment's `stop` string (a newline by default), or `max_turn_tokens`; the
environment answers with text, appended to the conversation (chat models: rendered by the chat template as a user
message; plain-text models: the text and `stop`), and a reward after every agent turn; `terminated` / `truncated` end
the episode (an environment truncates at its own `max_turns`).

`TextEnv` is the protocol an environment implements (orl.envs.text_games's built-in tasks, orl.envs.textarena's
adapter); it is gymnasium's reset/step with strings:

    reset(seed) -> (opening message, info)
    step(agent text) -> (reply text, reward, terminated, truncated, info)      # info["success"] at the end

`rollout_conversations` steps many conversations at once with one KV cache: every turn (the model's and the
environment's) is appended to the cache, never recomputed from the start; rows whose conversation has ended leave the
batch (their cache rows are dropped), so the others do not wait on them. It returns one `Conversation` per episode:
the token ids of the whole conversation with a mask that is 1 on the agent's own tokens only (the token-level view:
reward at each turn's last agent token, environment tokens are context), and the messages with roles and per-turn
rewards (the turn-level view, and the logged-conversation format of `save_conversations`).
"""
from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

from orl.errors import DataError
from orl.text.encoding import encode_prompt, encode_response


class TextEnv(Protocol):
    """A text environment with a programmatic partner (a game, a rule-based user, a tool)."""

    max_turns: int  # agent turns at most; the environment reports truncated=True at the last one
    system_prompt: str | None  # chat models: a system message before the opening (None: none)

    def reset(self, seed: int) -> tuple[str, dict]:
        """Start the episode given by `seed` (deterministic): the opening message and an info dict."""
        ...

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """The agent's turn as text -> (the environment's reply, reward, terminated, truncated, info).

        info["success"] (bool) at the end of an episode when the environment knows it; info["invalid"] for a move the
        environment rejected."""
        ...


@dataclass
class Conversation:
    """One episode: the messages with roles and per-turn rewards, and the token ids the model saw and wrote."""

    seed: int
    messages: list[dict]          # {"role", "content"}; assistant messages also carry "reward" (received after that turn)
    prompt_ids: list[int]         # the opening as the model saw it (system message and first user message, rendered)
    ids: list[int]                # every token after the prompt: the agent's turns and the environment's replies
    agent_mask: list[int]         # 1 on the agent's own tokens in `ids`, 0 on the environment's
    turn_ends: list[int]          # index in `ids` of each agent turn's last token (where its reward lands)
    rewards: list[float]          # one per agent turn
    terminated: bool = False
    truncated: bool = False
    success: bool | None = None
    env_id: str | None = None
    info: dict = field(default_factory=dict)

    @property
    def episode_return(self) -> float:
        return float(sum(self.rewards))

    @property
    def turns(self) -> int:
        return len(self.rewards)

    def to_row(self) -> dict:
        """The logged-conversation format (one JSON line; see save_conversations)."""
        return {"env": self.env_id, "seed": self.seed, "messages": self.messages, "return": self.episode_return,
                "success": self.success, "turns": self.turns, "terminated": self.terminated, "truncated": self.truncated}


class ConversationFormat:
    """How the turns of a conversation become tokens for one tokenizer.

    Chat models (a tokenizer with a chat template, unless `chat=False`): the opening is a user message (after the
    environment's system prompt), each reply a user message, rendered by the template; a reply's tokens are the
    template's rendering of the conversation with the reply minus its rendering without it, so the cache extends
    exactly what the model has seen. Plain-text models: the opening and each reply are followed by `stop`, and the
    agent's turn ends at a token containing `stop`.
    """

    def __init__(self, tokenizer, eos_ids: Sequence[int], chat: bool | None = None, stop: str = "\n",
                 template_kwargs: Mapping[str, Any] | None = None):
        self.tokenizer, self.stop = tokenizer, stop
        self.template_kwargs = dict(template_kwargs or {})  # the template's own variables (lm.chat_template_kwargs)
        self.chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise DataError("chat=True but the tokenizer has no chat_template")
        self.end_ids = set(int(i) for i in eos_ids)
        if not self.chat:
            self.end_ids |= _ids_containing(tokenizer, stop)

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                      **self.template_kwargs)
        except Exception as exc:  # a template that rejects a role or a field: one message
            raise DataError(f"the chat template failed on a conversation ({type(exc).__name__}: {str(exc)[:200]})") from exc

    def opening(self, system_prompt: str | None, opening: str) -> tuple[list[dict], list[int]]:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": opening}]
        if self.chat:
            return messages, encode_prompt(self.tokenizer, self._render(messages, True))
        text = (system_prompt + self.stop if system_prompt else "") + opening + self.stop
        return messages, encode_prompt(self.tokenizer, text)

    def reply(self, messages: list[dict], reply: str, turn_ids: Sequence[int]) -> list[int]:
        """Tokens of the environment's `reply` after `messages`, which end with the agent's turn, written as `turn_ids`.

        Chat: the template's rendering of the conversation with the reply (and the next generation prompt), from where
        the agent's tokens stop: after its end-of-turn token if it wrote one (the template's text that follows it, e.g. a
        newline, comes with the reply), else the template closes the turn. Plain text: `stop` closes a turn the agent
        left open (it ran out of tokens), then the reply and `stop`."""
        ended = bool(turn_ids) and int(turn_ids[-1]) in self.end_ids
        if not self.chat:
            return encode_response(self.tokenizer, ("" if ended else self.stop) + reply + self.stop)
        prefix = self._render(messages[:-1], True)
        after = self._render(messages + [{"role": "user", "content": reply}], True)
        if not after.startswith(prefix):
            raise DataError("the chat template renders the earlier turns differently once a reply follows them; orl cannot extend the "
                            "conversation's cache for this template (give chat=False to use plain text)")
        tail = after[len(prefix):]  # the agent's turn as rendered, its end, the reply, the next generation prompt
        written = self.tokenizer.decode(list(turn_ids), skip_special_tokens=False)
        if tail.startswith(written):
            return encode_response(self.tokenizer, tail[len(written):])
        # the template renders the turn otherwise (whitespace stripped, reasoning dropped): skip its rendering of the turn
        content = messages[-1]["content"]
        start = tail.find(content) + len(content) if content and content in tail else 0
        if ended:
            end_text = self.tokenizer.decode([int(turn_ids[-1])], skip_special_tokens=False)
            at = tail.find(end_text, start)
            if at >= 0:
                start = at + len(end_text)
        return encode_response(self.tokenizer, tail[start:])

    def turn_ids(self, history: list[dict], content: str) -> list[int]:
        """Tokens of an assistant turn `content` after `history` as the model writes it: the text and its end-of-turn
        (the template's end-of-turn token for chat models, `stop` for plain text)."""
        if not self.chat:
            return encode_response(self.tokenizer, content + self.stop)
        before = self._render(history, True)
        after = self._render(history + [{"role": "assistant", "content": content}], False)
        if not after.startswith(before):
            raise DataError("the chat template renders a conversation's prompt differently once an assistant turn follows")
        ids = encode_response(self.tokenizer, after[len(before):])
        ends = [i for i, token in enumerate(ids) if token in self.end_ids]
        return ids[: ends[0] + 1] if ends else ids

    def agent_text(self, ids: Sequence[int]) -> str:
        """The agent's turn as logged: decoded without special tokens, up to `stop` (plain text), its whitespace kept so
        the logged text re-encodes to the tokens written; the environment reads it stripped."""
        text = self.tokenizer.decode(list(ids), skip_special_tokens=True)
        if not self.chat and self.stop in text:
            text = text[: text.index(self.stop)]
        return text


# tokenizer -> {stop: ids}; weak keys, so a tokenizer that is gone (and its id reused) leaves no stale entry behind
_STOP_IDS: "weakref.WeakKeyDictionary[Any, dict[str, set[int]]]" = weakref.WeakKeyDictionary()


def _ids_containing(tokenizer, stop: str) -> set[int]:
    """Every token id whose text contains `stop` (computed once per tokenizer and stop string)."""
    known = _STOP_IDS.setdefault(tokenizer, {})
    if stop not in known:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = {i for i, text in enumerate(texts) if stop in text}
        if not ids:
            raise DataError(f"no token of the tokenizer contains the turn separator {stop!r}; give the environment another `stop`")
        known[stop] = ids
    return known[stop]


def rollout_conversations(model, tokenizer, envs: Sequence[TextEnv], seeds: Sequence[int], *, max_turn_tokens: int = 16,
                          greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                          generator: torch.Generator | None = None, eos_ids: Sequence[int] | None = None, chat: bool | None = None,
                          stop: str = "\n", env_id: str | None = None, context: int | None = None,
                          chat_template_kwargs: Mapping[str, Any] | None = None) -> list[Conversation]:
    """Play one conversation per env (env i reset with seeds[i]) with `model`, all in one batch and one KV cache.

    Sampling as `orl.text.generation.rollout` (temperature, then top-k and top-p; `greedy` takes the argmax). A
    conversation ends when its environment says so, at its max_turns, or when its next turn would not fit the model's
    `context` (truncated, info["context_full"]).
    """
    from orl.text.data import pad_left, position_ids
    from orl.text.generation import cache_argument, filter_logits
    from orl.text.runtime import context_length, eos_token_ids

    if len(envs) != len(seeds):
        raise ValueError(f"{len(envs)} environments but {len(seeds)} seeds")
    if max_turn_tokens < 1 or (not greedy and temperature <= 0):
        raise ValueError(f"max_turn_tokens must be >= 1 and temperature > 0, got {max_turn_tokens} and {temperature}")
    device = next(model.parameters()).device
    fmt = ConversationFormat(tokenizer, eos_ids if eos_ids is not None else eos_token_ids(tokenizer, model), chat, stop,
                             chat_template_kwargs)
    context = context if context is not None else context_length(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cache_arg = cache_argument(model)
    end_ids = torch.tensor(sorted(fmt.end_ids))

    convs: list[Conversation] = []
    for env, seed in zip(envs, seeds):
        opening, info = env.reset(int(seed))
        messages, prompt_ids = fmt.opening(getattr(env, "system_prompt", None), opening)
        convs.append(Conversation(int(seed), messages, prompt_ids, [], [], [], [], env_id=env_id, info=dict(info)))
    live = [i for i, c in enumerate(convs) if context is None or len(c.prompt_ids) + max_turn_tokens <= context]
    for i in set(range(len(convs))) - set(live):
        convs[i].truncated, convs[i].info["context_full"] = True, True
    if not live:
        return convs
    was_training = model.training
    model.eval()
    cache = None
    # Feed a (B, W) block of the live rows: extends `mask` and the cache, returns the last column's logits. `mask` holds
    # every token in the cache, so its row sums are the live conversations' lengths so far.
    mask = torch.zeros((len(live), 0), dtype=torch.long, device=device)

    def feed(block_ids: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
        nonlocal cache, mask
        mask = torch.cat([mask, block_mask.to(device)], 1)
        positions = position_ids(mask)[:, -block_ids.shape[1]:]
        kwargs = {} if cache is None else {cache_arg: cache}
        with torch.no_grad():
            out = model(input_ids=block_ids.to(device), attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        return out.logits[:, -1].float()

    logits = feed(*pad_left([convs[i].prompt_ids for i in live], pad_id))
    try:
        while live:
            # --- the agent's turn: every live row generates until an end-of-turn token or max_turn_tokens -------------
            turn = [[] for _ in live]
            writing = torch.ones(len(live), dtype=torch.bool)
            for t in range(max_turn_tokens):
                if greedy:
                    tokens = logits.argmax(-1).cpu()
                else:
                    probs = torch.softmax(filter_logits(logits / temperature, top_k, top_p), -1).cpu()
                    tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                for row in torch.nonzero(writing).flatten().tolist():
                    turn[row].append(int(tokens[row]))
                fed = writing.clone()
                writing &= ~torch.isin(tokens, end_ids)
                if not writing.any() or t == max_turn_tokens - 1:
                    break  # the last tokens are fed with the replies (no forward pass whose logits nobody reads)
                # rows that stopped earlier receive padding, masked out, so the batch stays rectangular
                logits = feed(torch.where(fed, tokens, torch.full_like(tokens, pad_id))[:, None], fed.long()[:, None])
            # the last tokens sampled are not in the cache yet: they go in with the replies
            pending = [[turn[row][-1]] if fed[row] else [] for row in range(len(live))]
            lengths = mask.sum(1).tolist()
            # --- the environment's turn ---------------------------------------------------------------------
            keep, blocks = [], []
            for row, index in enumerate(live):
                conv, env = convs[index], envs[index]
                text = fmt.agent_text(turn[row])
                reply, reward, terminated, truncated, info = env.step(text.strip())
                conv.turn_ends.append(len(conv.ids) + len(turn[row]) - 1)
                conv.ids.extend(turn[row])
                conv.agent_mask.extend([1] * len(turn[row]))
                conv.rewards.append(float(reward))
                conv.messages.append({"role": "assistant", "content": text, "reward": float(reward)})
                conv.info.update(info)
                if "success" in info:
                    conv.success = bool(info["success"])
                if conv.turns >= getattr(env, "max_turns", 1 << 30) and not terminated:
                    truncated = True
                reply_ids = [] if terminated or truncated else fmt.reply(conv.messages, reply, turn[row])
                if not (terminated or truncated) and context is not None and \
                        lengths[row] + len(pending[row]) + len(reply_ids) + max_turn_tokens > context:
                    truncated, conv.info["context_full"] = True, True
                conv.messages.append({"role": "user", "content": reply})
                if terminated or truncated:
                    conv.terminated, conv.truncated = bool(terminated), bool(truncated and not terminated)
                    continue
                conv.ids.extend(reply_ids)
                conv.agent_mask.extend([0] * len(reply_ids))
                keep.append(row)
                blocks.append(pending[row] + reply_ids)
            if not keep:
                break
            if len(keep) < len(live):  # finished conversations leave the batch and the cache
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                mask = mask[index]
                live = [live[row] for row in keep]
            # left-padded: each row's last real token sits in the last column, where the next logits are read
            block_ids, block_mask = pad_left(blocks, pad_id)
            logits = feed(block_ids, block_mask)
    finally:
        model.train(was_training)
    return convs


def conversation_tensors(convs: Sequence[Conversation], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, agent mask) of whole conversations, left-padded to one width: the token-level view (the
    agent mask is 1 on the agent's tokens only, so environment tokens are context and never receive a loss)."""
    from orl.text.data import build_sequences

    ids, mask, _ = build_sequences([c.prompt_ids for c in convs], [c.ids for c in convs], pad_id)
    return ids, mask, _right_aligned([c.agent_mask for c in convs], ids.shape[1], mask.dtype)


def _right_aligned(rows: Sequence[Sequence[float]], width: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, width) zeros with each row's values in its last columns: per-token values of left-padded sequences' ends."""
    out = torch.zeros((len(rows), width), dtype=dtype)
    for row, values in enumerate(rows):
        if len(values):
            out[row, width - len(values):] = torch.tensor(values, dtype=dtype)
    return out


# --- logged conversations ------------------------------------------------------------------------------------------


def save_conversations(path: str | Path, convs: Sequence[Conversation]) -> Path:
    """Write conversations as JSON lines, atomically: {"env", "seed", "messages": [{"role", "content"[, "reward"]}],
    "return", "success", "turns", "terminated", "truncated"}; each assistant message carries the reward it received."""
    from orl.io import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(c.to_row()) + "\n" for c in convs))
    return path


def load_conversations(path: str | Path) -> list[dict]:
    """Validated rows of a logged-conversation file (the format of save_conversations; only `messages` is required, a
    reward on an assistant message defaults to 0), each with `return` recomputed from its messages if absent."""
    from orl.text.data import read_jsonl

    path = Path(path)
    rows = []
    for number, row in read_jsonl(path, "conversation file"):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                for m in messages):
            raise DataError(f"{path}:{number}: `messages` must be a non-empty list of {{\"role\": system|user|assistant, "
                            "\"content\": <text>}} objects")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{path}:{number}: the conversation has no assistant turn to learn from")
        turns = messages[1:] if messages[0]["role"] == "system" else messages
        if any(m["role"] != ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(turns)):
            raise DataError(f"{path}:{number}: after an optional system message, a conversation alternates user and assistant "
                            "messages, starting with the user's (the environment's opening)")
        for m in messages:
            reward = m.get("reward", 0.0)
            if m["role"] == "assistant" and (not isinstance(reward, (int, float)) or isinstance(reward, bool) or reward != reward):
                raise DataError(f"{path}:{number}: an assistant message's reward must be a number, got {reward!r}")
        row.setdefault("return", float(sum(m.get("reward", 0.0) for m in messages if m["role"] == "assistant")))
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no conversation")
    return rows


def tokenize_conversation(fmt: ConversationFormat, messages: list[dict]) -> tuple[list[int], list[int], list[int], list[float]]:
    """(prompt ids, ids after the prompt, agent mask, per-turn rewards) of a logged conversation, built turn by turn as
    the rollout builds them (so a logged conversation trains on the tokens its policy saw): agent turns are the
    assistant text followed by an end-of-turn (the template's for chat models, `stop` for plain text)."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    rest = messages[1:] if system is not None else messages
    history, prompt_ids = fmt.opening(system, rest[0]["content"])
    ids, agent, rewards, last_turn = [], [], [], []
    for number, message in enumerate(rest[1:], 1):
        if message["role"] == "assistant":
            turn = fmt.turn_ids(history, message["content"])
            last_turn = turn
            history = history + [{"role": "assistant", "content": message["content"]}]
            ids.extend(turn)
            agent.extend([1] * len(turn))
            rewards.append(float(message.get("reward", 0.0)))
        else:
            if number == len(rest) - 1:
                break  # the reply after the last agent turn is never seen by the agent
            turn = fmt.reply(history, message["content"], last_turn)
            history = history + [{"role": "user", "content": message["content"]}]
            ids.extend(turn)
            agent.extend([0] * len(turn))
    return prompt_ids, ids, agent, rewards


class SeedBuffer:
    """The starting states of a text environment for online training: a batch is `batch_size` episode seeds drawn from
    [0, HIGH) (evaluation seeds lie above HIGH, so they are held out by construction)."""

    HIGH = 10**9

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    def __len__(self) -> int:
        return self.HIGH

    def sample(self, batch_size: int, generator: torch.Generator | None = None):
        from orl.text.data import PromptBatch

        index = torch.randint(0, self.HIGH, (batch_size,), device=self.device, generator=generator)
        seeds = [int(s) for s in index.tolist()]
        return PromptBatch([f"seed {s}" for s in seeds], index, {"seed": seeds})


def is_conversation_file(spec) -> bool:
    """A `.jsonl` file whose first row has `messages` (the logged-conversation format)."""
    path = Path(str(spec)).expanduser()
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(row, dict) and "messages" in row and "prompt" not in row
    return False


def conversation_buffer(fmt: ConversationFormat, rows: Sequence[dict], device, context: int | None = None):
    """Logged conversations as a SequenceBuffer for sequence agents (A-LoL, filtered BC): the whole conversation is one
    sequence, its `response_mask` is 1 on the agent's tokens only (the environment's replies are context), its reward
    the episode's return. Conversations longer than `context` keep their first tokens (a warning counts them)."""
    import warnings

    from orl.text.data import SequenceBuffer, build_sequences

    prompts, responses, masks, turn_rewards, cut = [], [], [], [], 0
    for row in rows:
        prompt_ids, ids, agent, rewards = tokenize_conversation(fmt, row["messages"])
        # each turn's reward on its last agent token (the token MDP of ILQL)
        ends = [i for i in range(len(ids)) if agent[i] and (i + 1 == len(ids) or not agent[i + 1])]
        per_token = [0.0] * len(ids)
        for end, reward in zip(ends, rewards):
            per_token[end] = reward
        if context is not None and len(prompt_ids) + len(ids) > context:
            if len(prompt_ids) >= context:
                raise DataError(f"a conversation's opening has {len(prompt_ids)} tokens, more than the model's context ({context})")
            keep = context - len(prompt_ids)
            ids, agent, per_token, cut = ids[:keep], agent[:keep], per_token[:keep], cut + 1
        prompts.append(prompt_ids)
        responses.append(ids)
        masks.append(agent)
        turn_rewards.append(per_token)
    if cut:
        warnings.warn(f"{cut} of {len(rows)} conversations are longer than the model's context ({context} tokens): kept their start",
                      stacklevel=2)
    ids, mask, _ = build_sequences(prompts, responses, fmt.tokenizer.pad_token_id)
    returns = torch.tensor([float(row["return"]) for row in rows])
    buffer = SequenceBuffer(ids, mask, _right_aligned(masks, ids.shape[1], mask.dtype), returns, device)
    buffer.token_rewards = _right_aligned(turn_rewards, ids.shape[1], torch.float32).to(buffer.device)
    return buffer
