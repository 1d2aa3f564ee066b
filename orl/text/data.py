"""Sequence data for language-model agents: padded token batches on the device and response log-probs.

Nothing here imports transformers: a model is anything called as `model(input_ids=..., attention_mask=...)`
that returns an object with `.logits` (every Hugging Face causal LM does).

Layout: each row is prompt + response, **left-padded** to a fixed width so that all prompts end at
the same column and generation appends on the right. `response_mask` is 1 on response tokens only,
so prompt and padding never enter a log-probability.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch.nn import functional as F

from orl.errors import DataError, DataFileNotFound


@dataclass
class SequenceBatch:
    input_ids: torch.Tensor  # (B, L) prompt + response, left-padded
    attention_mask: torch.Tensor  # (B, L)
    response_mask: torch.Tensor  # (B, L) 1 on response tokens
    rewards: torch.Tensor | None = None  # (B,) sequence-level reward
    index: torch.Tensor | None = None  # (B,) row ids in the buffer (for cached per-example values)
    token_rewards: torch.Tensor | None = None  # (B, L) per-token rewards (logged conversations: each turn's on its last token)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_left(sequences: Sequence[Sequence[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq) > width:
            raise ValueError(f"sequence of {len(seq)} tokens does not fit width {width}")
        if len(seq):
            ids[row, width - len(seq):] = torch.as_tensor(list(seq))
            mask[row, width - len(seq):] = 1
    return ids, mask


def build_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int, width: int | None = None):
    """Concatenate tokenized prompts and responses (tokenized once each, so boundaries line up) and left-pad."""
    joined = [list(p) + list(r) for p, r in zip(prompts, responses)]
    ids, mask = pad_left(joined, pad_id, width)
    response_mask = torch.zeros_like(mask)
    width = ids.shape[1]
    for row, r in enumerate(responses):
        if len(r):
            response_mask[row, width - len(r):] = 1
    return ids, mask, response_mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_log_probs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t >= 1, (B, L-1); entry t-1 scores token t."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask)).logits
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def response_log_prob(model, batch: SequenceBatch, per_token: bool = False) -> torch.Tensor:
    """Sum over response tokens of log pi(y_t | x, y_<t) (B,), or the masked per-token values (B, L-1)."""
    token_lp = token_log_probs(model, batch.input_ids, batch.attention_mask)
    mask = batch.response_mask[:, 1:].to(token_lp.dtype)
    return token_lp * mask if per_token else (token_lp * mask).sum(-1)


class SequenceBuffer:
    """A text dataset as device tensors; batches by index, optionally with sampling weights."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                 rewards: torch.Tensor | None, device: torch.device | str):
        self.device = torch.device(device)
        self.input_ids = input_ids.to(self.device)
        self.attention_mask = attention_mask.to(self.device)
        self.response_mask = response_mask.to(self.device)
        self.rewards = None if rewards is None else rewards.float().to(self.device)
        self.weights: torch.Tensor | None = None  # set by agents that sample by priority (A-LoL)
        self.token_rewards: torch.Tensor | None = None  # (N, L) where rewards are per turn (logged conversations)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> SequenceBatch:
        if self.weights is not None:
            # With replacement, like the official A-LoL sampler in effect (its duplicate check never fires).
            index = torch.multinomial(self.weights, batch_size, replacement=True, generator=generator)
        else:
            index = torch.randint(0, len(self), (batch_size,), device=self.device, generator=generator)
        return self.gather(index)

    def gather(self, index: torch.Tensor) -> SequenceBatch:
        # Trim columns that are padding in every row of this batch.
        mask = self.attention_mask[index]
        first = int(mask.any(0).float().argmax())
        return SequenceBatch(self.input_ids[index, first:], mask[:, first:], self.response_mask[index, first:],
                             None if self.rewards is None else self.rewards[index], index,
                             None if self.token_rewards is None else self.token_rewards[index, first:])

    def state_dict(self) -> dict:
        return {"weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.weights = state.get("weights")


@dataclass
class PairBatch:
    chosen: SequenceBatch
    rejected: SequenceBatch

    def __len__(self) -> int:
        return len(self.chosen)


class PairBuffer:
    """Preference pairs (prompt, chosen, rejected) as two aligned sequence buffers."""

    def __init__(self, chosen: SequenceBuffer, rejected: SequenceBuffer):
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected sequences")
        self.chosen, self.rejected, self.device = chosen, rejected, chosen.device

    def __len__(self) -> int:
        return len(self.chosen)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> PairBatch:
        index = torch.randint(0, len(self), (batch_size,), device=self.device, generator=generator)
        return PairBatch(self.chosen.gather(index), self.rejected.gather(index))

    def state_dict(self) -> dict:
        return {}


@dataclass
class PromptBatch:
    prompts: list[str]
    index: torch.Tensor
    # Every other column of the rows (e.g. a reference `answer`), passed to reward functions as TRL passes them.
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompts)


class PromptBuffer:
    """Prompts for online generation (GRPO, RLOO through the Trainer): a batch is a random draw of rows."""

    def __init__(self, prompts: Sequence[str], device: torch.device | str = "cpu", columns: dict[str, Sequence] | None = None):
        self.prompts, self.device = list(prompts), torch.device(device)
        self.columns = {key: list(values) for key, values in (columns or {}).items()}

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> PromptBatch:
        index = torch.randint(0, len(self), (batch_size,), device=self.device, generator=generator)
        rows = index.tolist()
        return PromptBatch([self.prompts[i] for i in rows], index, {key: [values[i] for i in rows] for key, values in self.columns.items()})


def distinct_n(texts: Sequence[Sequence[int]], n: int) -> float:
    """Distinct-n: unique n-grams / total n-grams over all responses (token level)."""
    grams = [tuple(t[i : i + n]) for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


JSONL_FIELDS = {"rewarded": ("prompt", "response", "reward"), "pairs": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                                           for m in value)


HUB_PREFIX = "hf:"  # dataset=hf:<hub id>[:<split>], e.g. hf:trl-lib/ultrafeedback_binarized:train


def is_text_dataset(spec: str) -> bool:
    """A `.jsonl` file, a directory written by Hugging Face `datasets` (`save_to_disk`), or `hf:<hub id>`."""
    from pathlib import Path

    if str(spec).startswith(HUB_PREFIX):
        return True
    path = Path(str(spec)).expanduser()
    return path.suffix == ".jsonl" or (path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json")))


def load_text_rows(spec, kind: str) -> list[dict]:
    """Validated rows of a text dataset from a `.jsonl` file or a `datasets.save_to_disk` directory
    (its "train" split if it holds several)."""
    from pathlib import Path

    hub = str(spec).startswith(HUB_PREFIX)
    path = Path(str(spec)).expanduser()
    if not hub and (path.suffix == ".jsonl" or not path.is_dir()):
        return load_jsonl(path, kind)
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"{spec} is a Hugging Face dataset; reading it needs `pip install datasets`") from exc
    if hub:
        # hf:<id>[:<split>] through datasets.load_dataset (downloaded once, then read from the local cache)
        name, _, split = str(spec)[len(HUB_PREFIX):].partition(":")
        try:
            loaded = datasets.load_dataset(name, split=split or "train")
        except Exception as exc:  # offline, unknown id, missing split: one message
            raise DataError(f"dataset={spec}: could not load {name!r} (split {split or 'train'!r}) from the Hugging Face hub or its cache "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); on a machine without internet, save it with "
                            "datasets' save_to_disk elsewhere and give that directory") from exc
        rows = [_validated_row(dict(row), kind, f"{spec}[{index}]") for index, row in enumerate(loaded)]
        if not rows:
            raise DataError(f"{spec} holds no rows")
        return rows
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path} holds splits {list(loaded)} but no 'train' split")
        loaded = loaded["train"]
    rows = [_validated_row(dict(row), kind, f"{path}[{index}]") for index, row in enumerate(loaded)]
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _extract_prompt(chosen, rejected, where: str) -> dict:
    """TRL's `extract_prompt` (trl/data_utils.py) for preference rows without a prompt field (e.g.
    trl-lib/ultrafeedback_binarized): the prompt is the longest shared prefix of chosen and rejected, messages or
    characters; on text a space before the first difference starts the completions, and each side keeps at least its
    last element, as in TRL. A conversation whose first messages already differ has no prompt: one error."""
    both_text = isinstance(chosen, str) and isinstance(rejected, str)
    if not both_text and not (_is_messages(chosen) and _is_messages(rejected)):
        raise DataError(f"{where}: no prompt field, and chosen/rejected are not both strings or both chat message lists, so the "
                        "prompt cannot be taken from their shared start; add a prompt field")
    shortest = min(len(chosen), len(rejected))
    shared = next((i for i in range(shortest) if chosen[i] != rejected[i]), max(shortest - 1, 0))
    if both_text and shared > 0 and chosen[shared - 1] == " ":
        shared -= 1
    if not both_text and shared == 0:
        raise DataError(f"{where}: no prompt field, and chosen and rejected differ from their first message, so they share no prompt; "
                        "add a prompt field or start both conversations with the same user message")
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def _validated_row(row, kind: str, where: str) -> dict:
    import math

    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object with fields {list(JSONL_FIELDS[kind])}, got {type(row).__name__}")
    if kind == "rewarded" and "response" not in row and "completion" in row:
        row["response"] = row.pop("completion")  # TRL's prompt/completion naming
    if kind == "pairs" and "prompt" not in row and "chosen" in row and "rejected" in row:
        row.update(_extract_prompt(row["chosen"], row["rejected"], where))  # TRL's implicit-prompt preference rows
    missing = [k for k in JSONL_FIELDS[kind] if k not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; {kind} rows need {list(JSONL_FIELDS[kind])}")
    for key in JSONL_FIELDS[kind]:
        if key == "reward":
            if not isinstance(row[key], (int, float)) or isinstance(row[key], bool) or not math.isfinite(row[key]):
                raise DataError(f"{where}: reward must be a finite number, got {row[key]!r}")
        elif not isinstance(row[key], str) and not _is_messages(row[key]):
            raise DataError(f"{where}: {key} must be a string or a list of chat messages "
                            f"[{{\"role\": ..., \"content\": ...}}], got {type(row[key]).__name__}")
    return row


def read_jsonl(path, what: str):
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a missing file, a line that is not UTF-8
    or not JSON is one DataError naming the file and line."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise DataFileNotFound(f"{what} {path} does not exist")
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{number}: not UTF-8 text (byte {exc.start} of the line); re-encode the file as UTF-8") from exc
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc


def load_jsonl(path, kind: str) -> list[dict]:
    """Read and validate a text dataset: `rewarded` rows {"prompt","response","reward"} (A-LoL),
    `pairs` rows {"prompt","chosen","rejected"} (DPO, reward models) or `prompts` rows {"prompt"}
    (online RL). Every malformed line is reported with its file and line number."""
    from pathlib import Path

    if kind not in JSONL_FIELDS:
        raise ValueError(f"kind must be one of {sorted(JSONL_FIELDS)}, got {kind!r}")
    path = Path(path)
    rows = []
    for number, row in read_jsonl(path, "text dataset"):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object with fields {list(JSONL_FIELDS[kind])}, got {type(row).__name__}")
        rows.append(_validated_row(row, kind, f"{path}:{number}"))
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows
