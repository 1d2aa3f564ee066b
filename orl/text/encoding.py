"""Text rows to token ids as TRL encodes them: prompts with BOS once, completions without special tokens and
one EOS, chat messages rendered with the tokenizer's template, TRL's truncation, and the device buffers the
sequence agents train on."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from orl.errors import DataError
from orl.text.data import PairBuffer, SequenceBuffer, build_sequences


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids with the special tokens the tokenizer adds itself and BOS exactly once.

    Tokenizers that add BOS (Llama, Mistral, Gemma) keep theirs; for those that do not (GPT-2) BOS is
    prepended; with no BOS at all (Qwen2) the ids are the plain text's, and an empty prompt starts
    from EOS, the token such models are trained to continue after. The one path for training data,
    value fitting and the env, so they all see the same prompts.
    """
    # A chat-rendered prompt already carries the template's special tokens (BOS included) as text.
    rendered = bool(tokenizer.bos_token) and prompt.startswith(tokenizer.bos_token)
    ids = list(tokenizer(prompt, add_special_tokens=not rendered)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if not ids:
        ids = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id]
    return ids


def encode_response(tokenizer, response: str) -> list[int]:
    """Response ids without special tokens (the caller appends EOS), as TRL tokenizes completions."""
    return list(tokenizer(response, add_special_tokens=False)["input_ids"])


CHAT_ROW = "_chat"  # set on rows rendered from chat messages: their completions end with the template's end-of-turn


def _apply_template(tokenizer, messages: list[dict], number: int, **kwargs) -> str:  # kwargs: the template's variables too
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as exc:  # a user's Jinja template raising (unknown role, missing field): one message, not a traceback
        raise DataError(f"row {number}: the tokenizer's chat template failed on this row's messages ({type(exc).__name__}: "
                        f"{str(exc)[:200]}); check the roles and fields the template expects") from exc


def render_chat(rows: list[dict], tokenizer, fields: Sequence[str], template_kwargs: dict | None = None) -> list[dict]:
    """TRL's conversational format: message lists rendered to text with the tokenizer's chat template.

    The prompt gets the generation prompt; each completion field is the rendering of prompt +
    completion messages minus the rendered prompt (so prompt and completion meet exactly where the
    model starts answering). Rendered rows carry `CHAT_ROW`, so no EOS is appended after their end-of-turn.
    `template_kwargs` go to the template as its variables (TRL's chat_template_kwargs, e.g. enable_thinking=False).
    """
    template_kwargs = dict(template_kwargs or {})
    if not any(isinstance(row[f], list) for row in rows for f in fields):
        return rows
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the data holds chat messages but the tokenizer has no chat_template; give plain-text rows or a chat model")
    out, dropped = [], None
    for number, row in enumerate(rows, 1):
        row = dict(row)
        row[CHAT_ROW] = True
        prompt_messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        row["prompt_messages"] = prompt_messages  # for rewards that render the conversation themselves (a reward model's template)
        prompt = _apply_template(tokenizer, prompt_messages, number, add_generation_prompt=True, **template_kwargs)
        completed = {}
        for field in fields:
            if field == "prompt":
                continue
            messages = row[field] if isinstance(row[field], list) else [{"role": "assistant", "content": row[field]}]
            completed[field] = _apply_template(tokenizer, prompt_messages + messages, number, **template_kwargs)
        # Templates whose generation prompt the rendered answer does not repeat (DeepSeek-R1's "<think>\n", Qwen3's empty
        # think block): as TRL, the completion starts where prompt and prompt + completion diverge, and the rest of the
        # prompt is left out of the training rows
        shared = min([_common_prefix(prompt, full) for full in completed.values()] or [len(prompt)])
        if shared < len(prompt):
            shared = _token_split(tokenizer, prompt, list(completed.values()), shared)
        if shared < len(prompt) and dropped is None:
            dropped = (number, prompt[shared:])
        row["prompt"] = prompt[:shared]
        for field, full in completed.items():
            row[field] = full[shared:]
        out.append(row)
    if dropped is not None:
        warnings.warn(f"the chat template renders the prompt alone differently from the prompt with its answer (first in row "
                      f"{dropped[0]}: {dropped[1]!r} is not in the rendered answer); as in TRL, the completion starts where they "
                      "diverge and that end of the prompt is left out of training rows, so the model is trained on a context "
                      "that differs from the one it sees at inference", stacklevel=2)
    return out


def _common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading items (characters, token ids) a and b share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _token_split(tokenizer, prompt: str, renderings: list[str], position: int) -> int:
    """Where TRL splits: after the longest run of tokens the prompt shares with every prompt + answer rendering, as a
    character offset of the prompt (an answer that begins like the dropped generation prompt, "<answer>" after
    "<think>", must not cut a token). `position`, the shared characters, where the tokenizer gives no offsets."""
    if not getattr(tokenizer, "is_fast", False):
        return position
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    shared = min(_common_prefix(ids, tokenizer(text, add_special_tokens=False)["input_ids"]) for text in renderings)
    # never past the first prompt token that holds a differing character (ids can agree on different text: <unk>)
    within = next((i for i, (start, end) in enumerate(offsets) if end > position), len(ids))
    shared = min(shared, within)
    return offsets[shared][0] if shared < len(ids) else len(prompt)


def tokenize_rows(tokenizer, prompts: Sequence[str], responses: Sequence[str], add_eos: Sequence[bool] | bool = True):
    """Tokenize prompt and response separately (so boundaries line up) and append EOS to the response.

    Prompts go through `encode_prompt` (BOS once, as the env encodes them), responses carry
    no special tokens of their own. `add_eos` False for a row rendered from chat messages: its response already
    ends with the template's end-of-turn, and TRL adds EOS to non-conversational rows only, and only to those that do
    not end with the EOS text already.
    """
    flags = [add_eos] * len(responses) if isinstance(add_eos, bool) else list(add_eos)
    eos_text = tokenizer.eos_token
    flags = [flag and not (eos_text and r.endswith(eos_text)) for flag, r in zip(flags, responses)]  # TRL: not twice
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    response_ids = [encode_response(tokenizer, r) + ([tokenizer.eos_token_id] if eos else []) for r, eos in zip(responses, flags)]
    return prompt_ids, response_ids


def truncate(prompt_ids: list[list[int]], response_ids: list[list[int]], max_length: int | None, max_prompt_length: int | None,
             bos_id: int | None = None) -> tuple[list[list[int]], list[list[int]], tuple[int, int]]:
    """TRL's truncation: prompts keep their last `max_prompt_length` tokens (and their BOS), then
    responses keep their first tokens so prompt + response fits `max_length`. Returns the rows and
    (prompts cut, responses cut); the buffers below warn with those counts.

    Without it a row longer than the model's context indexes past its position table (an IndexError
    on CPU, a device-side assert on GPU) or, with rotary embeddings, trains silently on positions
    the model never saw.
    """
    cut_prompts = cut_responses = 0
    out_prompts, out_responses = [], []
    for prompt, response in zip(prompt_ids, response_ids):
        if max_prompt_length is not None and len(prompt) > max_prompt_length:
            keep_bos = bos_id is not None and prompt[0] == bos_id
            prompt = ([bos_id] if keep_bos else []) + prompt[len(prompt) - max_prompt_length + int(keep_bos):]
            cut_prompts += 1
        if max_length is not None and len(prompt) + len(response) > max_length:
            if len(prompt) >= max_length:
                raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for a response within max_length={max_length}; "
                                 f"set lm.max_prompt_length below {max_length}")
            response = response[: max_length - len(prompt)]
            cut_responses += 1
        out_prompts.append(prompt)
        out_responses.append(response)
    return out_prompts, out_responses, (cut_prompts, cut_responses)


def _warn_truncated(rows: int, cut_prompts: int, cut_responses: int, max_length: int | None, max_prompt_length: int | None) -> None:
    if cut_prompts or cut_responses:
        warnings.warn(f"truncated {cut_prompts} of {rows} prompts to max_prompt_length={max_prompt_length} tokens (kept their end) and "
                      f"{cut_responses} responses to max_length={max_length} tokens (kept their start)", stacklevel=3)


def text_buffer(tokenizer, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float] | None, device, width: int | None = None,
                max_length: int | None = None, max_prompt_length: int | None = None, add_eos: Sequence[bool] | bool = True) -> SequenceBuffer:
    """{"prompt","response","reward"} rows as a left-padded device buffer (truncated as `truncate` says)."""
    prompt_ids, response_ids, cut = truncate(*tokenize_rows(tokenizer, prompts, responses, add_eos), max_length, max_prompt_length,
                                             tokenizer.bos_token_id)
    _warn_truncated(len(prompt_ids), *cut, max_length, max_prompt_length)
    ids, mask, response_mask = build_sequences(prompt_ids, response_ids, tokenizer.pad_token_id, width)
    rewards_t = None if rewards is None else torch.as_tensor(list(rewards), dtype=torch.float32)
    return SequenceBuffer(ids, mask, response_mask, rewards_t, device)


def pair_buffer(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], device,
                max_length: int | None = None, max_prompt_length: int | None = None, add_eos: Sequence[bool] | bool = True) -> PairBuffer:
    """{"prompt","chosen","rejected"} rows; chosen and rejected share one width (truncated as `truncate` says)."""
    p_ids, c_ids, (cut_prompts, cut_chosen) = truncate(*tokenize_rows(tokenizer, prompts, chosen, add_eos), max_length, max_prompt_length,
                                                       tokenizer.bos_token_id)
    _, r_ids, (_, cut_rejected) = truncate(*tokenize_rows(tokenizer, prompts, rejected, add_eos), max_length, max_prompt_length,
                                           tokenizer.bos_token_id)
    _warn_truncated(len(p_ids), cut_prompts, cut_chosen + cut_rejected, max_length, max_prompt_length)
    width = max(len(p) + len(r) for p, r in zip(p_ids + p_ids, c_ids + r_ids))
    chosen_buf = SequenceBuffer(*build_sequences(p_ids, c_ids, tokenizer.pad_token_id, width), None, device)
    rejected_buf = SequenceBuffer(*build_sequences(p_ids, r_ids, tokenizer.pad_token_id, width), None, device)
    return PairBuffer(chosen_buf, rejected_buf)
