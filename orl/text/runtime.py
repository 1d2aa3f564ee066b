"""Loading and running Hugging Face causal LMs for orl's LM agents and token environments: models and
tokenizers (dtype, dropout, LoRA), their limits (context, EOS ids, output width), data parallel under
`accelerate launch`, and saving a trained policy. The LM extra (`pip install orl[lm]`) provides transformers,
PEFT and accelerate; they are imported where they are used, so `orl` itself imports without them.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Sequence

import torch

from orl.distributed import process_rank, world_size
from orl.errors import ConfigError, DataFileNotFound


def load_lm(path: str, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = torch.float32, disable_dropout: bool = True):
    """(model, tokenizer) from a local directory or hub id through the standard `from_pretrained` path.

    Weights load in fp32 by default, whatever dtype the checkpoint was saved in (a bf16 checkpoint
    trained in pure bf16 loses most small updates; heads added on top would mismatch). `dtype=None`
    keeps the saved dtype. Dropout is switched off (TRL's `disable_dropout`) so pi_theta == pi_ref
    holds exactly at the start; a tokenizer without a pad token pads with EOS (or UNK).
    """
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path)
    if isinstance(dtype, str):
        dtype = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}[dtype]
    kwargs = {} if dtype is None else {"dtype": dtype}
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(path, **({} if dtype is None else {"torch_dtype": dtype}))
    except (OSError, ValueError) as exc:  # a tokenizer-only directory, a config of no causal LM, missing weights
        raise DataFileNotFound(f"lm.model={path}: no causal language model could be loaded from it ({str(exc).splitlines()[0][:200]}); "
                               "give a directory written by save_pretrained (config.json and weights) or a hub id") from exc
    if disable_dropout:
        switch_off_dropout(model)
    return model.to(device), tokenizer


def load_tokenizer(path: str):
    """The tokenizer at `path`; one without a pad token pads with EOS (or UNK)."""
    from transformers import AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:  # not a local model directory and not a reachable hub id
        raise DataFileNotFound(f"lm.model={path}: no Hugging Face model/tokenizer could be loaded from it ({str(exc).splitlines()[0][:200]}); "
                               "give a local directory written by save_pretrained, or a hub id on a machine with internet") from exc
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"the tokenizer of {path} has no pad, EOS or UNK token to pad with; add a pad token to it "
                             "(tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings)")
        tokenizer.pad_token = fallback
    return tokenizer


def switch_off_dropout(model: torch.nn.Module) -> None:
    """p = 0 in every dropout module and every float `attention_dropout`/`dropout` attribute (HF attention)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def context_length(model, tokenizer=None) -> int | None:
    """The model's context window from its config (any architecture), else the tokenizer's limit."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 10**8 else None


def output_width(model) -> int:
    """Width of the last hidden state (what a value or reward head reads): the LM head's input size.

    Not `config.hidden_size`: OPT-style models project their final states to a smaller width first.
    """
    return int(model.get_output_embeddings().weight.shape[1])


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation_config EOS (an int
    or, for chat models, a list such as [eos, end-of-turn])."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token in configured if isinstance(configured, (list, tuple)) else [configured]:
        if token is not None and token not in ids:
            ids.append(int(token))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config names an EOS token")
    return ids


def add_lora(model, r: int, alpha: float, target_modules: Sequence[str] | str | None):
    """Wrap `model` with a PEFT LoRA adapter (only the adapter's weights train)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ConfigError("LoRA (agent.lora_r > 0) needs PEFT: pip install peft") from exc
    targets = "all-linear" if not target_modules else (list(target_modules) if not isinstance(target_modules, str) else target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class AdapterDisabled(torch.nn.Module):
    """The base model under a PEFT policy: calls it with the adapter disabled.

    Holds no parameters of its own (the policy's are not registered here, so state dicts and
    optimizers see them once) and ignores train/eval switches, which would reach the shared policy.
    """

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)

    def forward(self, *args, **kwargs):
        with torch.no_grad(), self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.peft_model.parameters(recurse)

    def train(self, mode: bool = True):
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.peft_model, name)  # config, generation_config, get_output_embeddings, ...


def save_hf(policy, tokenizer, directory) -> None:
    """The policy in Hugging Face format (a LoRA policy merged into its base first)."""
    model = policy
    if hasattr(policy, "merge_and_unload"):
        model = copy.deepcopy(policy).merge_and_unload()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


class DataParallel:
    """This process's share of `accelerate launch` data parallelism (one process, a no-op, outside it).

    Every process samples the same global batch (same seed), takes its equal slice, and the gradients and
    logged metrics are averaged over the processes (accelerate's `reduce`) before the optimizer step. N
    processes with batch_size=B therefore take the steps one process takes with B: the same loss curve.
    """

    def __init__(self, device: torch.device):
        self.rank, self.world = process_rank(), world_size()
        if self.world > 1:
            from accelerate import PartialState  # sets up the process group the launcher describes (gloo on CPU)

            PartialState(cpu=device.type == "cpu")

    def shard(self, batch):
        if self.world == 1:
            return batch
        if len(batch) % self.world:
            raise ConfigError(f"batch_size={len(batch)} is not divisible by the {self.world} data-parallel processes")
        return split_batch(batch, self.world)[self.rank]

    def average_gradients(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        from accelerate.utils import reduce

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")  # one collective, not one per tensor
        for param, chunk in zip(params, flat.split([g.numel() for g in grads])):
            param.grad = chunk.view_as(param).clone()

    def total(self, value: float) -> float:
        """The sum of `value` over the processes (itself outside data parallel)."""
        if self.world == 1:
            return value
        from accelerate.utils import reduce

        return float(reduce(torch.tensor([float(value)]), reduction="sum")[0])

    def average(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world == 1 or not metrics:
            return metrics
        from accelerate.utils import reduce

        values = reduce(torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in metrics.values()]), reduction="mean")
        return dict(zip(metrics, values))


def split_batch(batch, parts: int) -> list:
    """`parts` consecutive equal micro-batches of a SequenceBatch, PairBatch or PromptBatch."""
    if parts <= 1:
        return [batch]
    size = len(batch)
    if size % parts:
        raise ConfigError(f"batch_size={size} is not divisible by grad_accum_steps={parts}")
    step = size // parts

    def cut(value, start):
        if isinstance(value, torch.Tensor) or isinstance(value, list):
            return value[start : start + step]
        if isinstance(value, dict):  # a PromptBatch's columns
            return {key: cut(v, start) for key, v in value.items()}
        if dataclasses.is_dataclass(value):
            return type(value)(**{f.name: cut(getattr(value, f.name), start) for f in dataclasses.fields(value)})
        return value

    return [cut(batch, start) for start in range(0, size, step)]
