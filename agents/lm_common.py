"""Shared pieces of the language-model agents (A-LoL, DPO, BT reward model): loading the policy and
its frozen reference, and acting in the token-level env. Not an agent itself (registers nothing)."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
import math
import os
import warnings
from typing import Any, Sequence

import numpy as np
import torch

from orl.agent import Agent
from orl.text.data import PairBuffer, SequenceBuffer, build_sequences, position_ids


@dataclass
class LMConfig:
    """What every LM agent's config has: the model, its precision, LoRA and the optimization schedule."""

    model_path: str = "data/tiny-lm"
    dtype: str = "float32"  # weights and optimizer state; "auto" keeps the checkpoint's dtype
    disable_dropout: bool = True  # TRL's default: dropout off in policy and reference
    lora_r: int = 0  # > 0: train a PEFT LoRA adapter of this rank; the reference is the base model (adapter off)
    lora_alpha: float = 16.0
    lora_target_modules: tuple[str, ...] | None = None  # default: every linear layer ("all-linear")
    grad_accum_steps: int = 1  # the batch is processed in this many micro-batches (same gradient, less memory)
    lr_warmup_steps: int = 0  # linear warmup of the learning rate
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 over lr_decay_steps)
    lr_decay_steps: int = 0


class LMAgent(Agent):
    """Base for agents whose policy is a Hugging Face causal LM given by `cfg.model_path`.

    What `orl-train` needs to run one (orl/apps/lm_run.py) is declared here: `data_kind` (set by each agent),
    `prepare_run` (work before the first step), `evaluate_run` and `exports_policy`.
    """

    exports_policy = True  # orl-train writes the trained policy to run_dir/hf

    def __init__(self, obs_space, action_space, cfg, device="cpu", with_reference: bool = True):
        super().__init__(obs_space, action_space, cfg, device)
        from orl.envs.lm import load_lm  # the LM extra (transformers) is only needed by these agents

        policy, self.tokenizer = load_lm(cfg.model_path, self.device, None if cfg.dtype == "auto" else cfg.dtype, cfg.disable_dropout)
        lora_r = int(getattr(cfg, "lora_r", 0) or 0)
        if lora_r > 0:
            policy = add_lora(policy, lora_r, cfg.lora_alpha, cfg.lora_target_modules)
        policy.train()
        self.nets["policy"] = policy
        if with_reference:
            # With LoRA the reference is the same model with its adapter disabled: one model in memory.
            self.nets["reference"] = AdapterDisabled(policy) if lora_r > 0 else copy.deepcopy(policy).eval().requires_grad_(False)
        # R(prompt, response) for agents that generate while training (RLOO); set by whoever runs them.
        self.reward_fn = None
        self.data_parallel = DataParallel(self.device)

    def make_policy_optimizer(self, params, lr: float, weight_decay: float = 0.0) -> None:
        """AdamW on `params` plus the LR schedule of the config: linear warmup over `lr_warmup_steps`,
        then constant, linear or cosine decay to 0 over `lr_decay_steps` (TRL's `lr_scheduler_type`)."""
        cfg = self.cfg
        self.optimizers["policy"] = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)
        warmup, decay, kind = int(cfg.lr_warmup_steps), int(cfg.lr_decay_steps), cfg.lr_schedule
        if kind not in ("constant", "linear", "cosine"):
            from orl.errors import ConfigError

            raise ConfigError(f"lr_schedule must be constant, linear or cosine, got {kind!r}")
        if warmup == 0 and kind == "constant":
            return

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if kind == "constant" or decay <= 0:
                return 1.0
            progress = min((step - warmup) / max(decay - warmup, 1), 1.0)
            return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

        self.schedulers["policy"] = torch.optim.lr_scheduler.LambdaLR(self.optimizers["policy"], factor)

    def optimize(self, batch, losses) -> dict[str, torch.Tensor]:
        """One optimizer step on `batch`, processed in `grad_accum_steps` equal micro-batches whose
        gradients add up to the full batch's (memory for one micro-batch at a time), then gradient
        clipping and the LR schedule. `losses(micro_batch)` returns (mean loss, metrics)."""
        parts = max(int(getattr(self.cfg, "grad_accum_steps", 1)), 1)
        optimizer = self.optimizers["policy"]
        optimizer.zero_grad(set_to_none=True)
        total, sums = 0.0, {}
        for micro in split_batch(self.data_parallel.shard(batch), parts):
            loss, metrics = losses(micro)
            (loss / parts).backward()
            total = total + loss.detach() / parts
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value.detach() / parts
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.data_parallel.average_gradients(params)  # the gradient of the whole global batch
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        optimizer.step()
        if "policy" in self.schedulers:
            self.schedulers["policy"].step()
        metrics = self.data_parallel.average({"loss": total, **sums})
        return {**metrics, "grad_norm": grad_norm, "lr": torch.tensor(optimizer.param_groups[0]["lr"])}

    # --- hooks for orl-train (orl/apps/lm_run.py) ----------------------------------------------------
    def prepare_run(self, run) -> dict[str, float] | None:
        """Before the first step: the agent's `prepare(buffer)` if it has one (e.g. DPO's reference log-probs)."""
        prepare = getattr(self, "prepare", None)
        return prepare(run.buffer) if prepare is not None else None

    def evaluate_run(self, run):
        """Sampled responses to the run's held-out prompts, scored by its reward (mean reward, length, distinct-n)."""
        from orl.envs.lm import evaluate_lm
        from orl.evaluation import EvalResult

        out = evaluate_lm(self.nets["policy"], run.tokenizer, run.eval_prompts, run.reward_fn, run.max_new_tokens, seed=run.seed, details=True)
        return EvalResult(np.asarray(out["rewards"]), np.asarray(out["lengths"]), extra={"distinct_1": out["distinct_1"], "distinct_2": out["distinct_2"]})

    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        raise TypeError("LM agents act on token observations; call act(obs_dict)")

    @torch.no_grad()
    def act(self, obs: dict[str, Any], deterministic: bool = True) -> np.ndarray:
        """Next token for token-env observations {"input_ids", "attention_mask"} (1-D or batched)."""
        ids = torch.as_tensor(np.asarray(obs["input_ids"]), device=self.device)
        mask = torch.as_tensor(np.asarray(obs["attention_mask"]), device=self.device)
        single = ids.dim() == 1
        if single:
            ids, mask = ids[None], mask[None]
        model = self.nets["policy"]
        was_training = model.training
        model.eval()
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
        model.train(was_training)
        # The last real token of each row sits at its highest masked position.
        last = (mask * torch.arange(mask.shape[1], device=self.device)).argmax(-1)
        next_logits = logits[torch.arange(len(ids)), last]
        tokens = next_logits.argmax(-1) if deterministic else torch.multinomial(torch.softmax(next_logits.float(), -1), 1).squeeze(-1)
        out = tokens.cpu().numpy()
        return out[0] if single else out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["nets"] = {k: v for k, v in state["nets"].items() if not k.startswith("reference.")}  # the frozen copy is rebuilt
        return state

    def load_state_dict(self, state, strict: bool = True, load_optimizers: bool = True) -> None:
        # The reference is the model at `cfg.model_path`, rebuilt in __init__ and never trained: put its
        # current weights back under their keys so every other key is still loaded strictly.
        nets = dict(state["nets"])
        if "reference" in self.nets:
            nets.update({f"reference.{k}": v for k, v in self.nets["reference"].state_dict().items()})
        super().load_state_dict({**state, "nets": nets}, strict=strict, load_optimizers=load_optimizers)


class DataParallel:
    """This process's share of `accelerate launch` data parallelism (one process, a no-op, outside it).

    Every process samples the same global batch (same seed), takes its equal slice, and the gradients and
    logged metrics are averaged over the processes (accelerate's `reduce`) before the optimizer step. N
    processes with batch_size=B therefore take the steps one process takes with B: the same loss curve.
    """

    def __init__(self, device: torch.device):
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState  # sets up the process group the launcher describes (gloo on CPU)

            state = PartialState(cpu=device.type == "cpu")
            self.rank, self.world = state.process_index, state.num_processes

    def shard(self, batch):
        if self.world == 1:
            return batch
        if len(batch) % self.world:
            from orl.errors import ConfigError

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
        from orl.errors import ConfigError

        raise ConfigError(f"batch_size={size} is not divisible by grad_accum_steps={parts}")
    step = size // parts

    def cut(value, start):
        if isinstance(value, torch.Tensor) or isinstance(value, list):
            return value[start : start + step]
        if dataclasses.is_dataclass(value):
            return type(value)(**{f.name: cut(getattr(value, f.name), start) for f in dataclasses.fields(value)})
        return value

    return [cut(batch, start) for start in range(0, size, step)]


def add_lora(model, r: int, alpha: float, target_modules: Sequence[str] | str | None):
    """Wrap `model` with a PEFT LoRA adapter (only the adapter's weights train)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        from orl.errors import ConfigError

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


def render_chat(rows: list[dict], tokenizer, fields: Sequence[str]) -> list[dict]:
    """TRL's conversational format: message lists rendered to text with the tokenizer's chat template.

    The prompt gets the generation prompt; each completion field is the rendering of prompt +
    completion messages minus the rendered prompt (so prompt and completion meet exactly where the
    model starts answering).
    """
    from orl.errors import DataError

    if not any(isinstance(row[f], list) for row in rows for f in fields):
        return rows
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("the data holds chat messages but the tokenizer has no chat_template; give plain-text rows or a chat model")
    out = []
    for number, row in enumerate(rows, 1):
        row = dict(row)
        prompt_messages = row["prompt"] if isinstance(row["prompt"], list) else [{"role": "user", "content": row["prompt"]}]
        row["prompt"] = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        for field in fields:
            if field == "prompt":
                continue
            messages = row[field] if isinstance(row[field], list) else [{"role": "assistant", "content": row[field]}]
            full = tokenizer.apply_chat_template(prompt_messages + messages, tokenize=False)
            if not full.startswith(row["prompt"]):
                raise DataError(f"row {number}: the chat template renders the prompt differently alone and with its {field}; "
                                "orl cannot split prompt from completion for this template")
            row[field] = full[len(row["prompt"]):]
        out.append(row)
    return out


def _tokenize(tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    """Tokenize prompt and response separately (so boundaries line up) and append EOS to the response.

    Prompts go through `orl.envs.lm.encode_prompt` (BOS once, as the env encodes them), responses carry
    no special tokens of their own.
    """
    from orl.envs.lm import encode_prompt, encode_response

    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    response_ids = [encode_response(tokenizer, r) + [tokenizer.eos_token_id] for r in responses]
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
                max_length: int | None = None, max_prompt_length: int | None = None) -> SequenceBuffer:
    """{"prompt","response","reward"} rows as a left-padded device buffer (truncated as `truncate` says)."""
    prompt_ids, response_ids, cut = truncate(*_tokenize(tokenizer, prompts, responses), max_length, max_prompt_length, tokenizer.bos_token_id)
    _warn_truncated(len(prompt_ids), *cut, max_length, max_prompt_length)
    ids, mask, response_mask = build_sequences(prompt_ids, response_ids, tokenizer.pad_token_id, width)
    rewards_t = None if rewards is None else torch.as_tensor(list(rewards), dtype=torch.float32)
    return SequenceBuffer(ids, mask, response_mask, rewards_t, device)


def pair_buffer(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], device,
                max_length: int | None = None, max_prompt_length: int | None = None) -> PairBuffer:
    """{"prompt","chosen","rejected"} rows; chosen and rejected share one width (truncated as `truncate` says)."""
    p_ids, c_ids, (cut_prompts, cut_chosen) = truncate(*_tokenize(tokenizer, prompts, chosen), max_length, max_prompt_length, tokenizer.bos_token_id)
    _, r_ids, (_, cut_rejected) = truncate(*_tokenize(tokenizer, prompts, rejected), max_length, max_prompt_length, tokenizer.bos_token_id)
    _warn_truncated(len(p_ids), cut_prompts, cut_chosen + cut_rejected, max_length, max_prompt_length)
    width = max(len(p) + len(r) for p, r in zip(p_ids + p_ids, c_ids + r_ids))
    chosen_buf = SequenceBuffer(*build_sequences(p_ids, c_ids, tokenizer.pad_token_id, width), None, device)
    rejected_buf = SequenceBuffer(*build_sequences(p_ids, r_ids, tokenizer.pad_token_id, width), None, device)
    return PairBuffer(chosen_buf, rejected_buf)
