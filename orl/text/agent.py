"""The base of orl's language-model agents (A-LoL, DPO, RLOO, the Bradley–Terry reward model): the policy as
a Hugging Face causal LM with its frozen reference, the optimizer schedule, gradient accumulation and data
parallel, and what `orl-train` needs to run one. Not an agent itself (registers nothing)."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

from orl.agent import Agent
from orl.errors import ConfigError
from orl.text.data import position_ids
from orl.text.generation import evaluate_lm
from orl.text.runtime import AdapterDisabled, DataParallel, add_lora, load_lm, split_batch

if TYPE_CHECKING:
    from orl.evaluation import EvalResult


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
    needs_reward = False  # True: it trains on lm.reward (GRPO, RLOO, A-LoL's value targets), so a run must name one

    def __init__(self, obs_space, action_space, cfg, device="cpu", with_reference: bool = True):
        super().__init__(obs_space, action_space, cfg, device)
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

    def optimize(self, batch, losses, shard: bool = True) -> dict[str, torch.Tensor]:
        """One optimizer step on `batch`, processed in `grad_accum_steps` equal micro-batches whose
        gradients add up to the full batch's (memory for one micro-batch at a time), then gradient
        clipping and the LR schedule. `losses(micro_batch)` returns (mean loss, metrics). `shard=False`: the batch is
        already this process's share (agents that generate shard their prompts before generating)."""
        parts = max(int(self.cfg.grad_accum_steps), 1)
        optimizer = self.optimizers["policy"]
        optimizer.zero_grad(set_to_none=True)
        total, sums = 0.0, {}
        for micro in split_batch(self.data_parallel.shard(batch) if shard else batch, parts):
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

    # --- multi-turn text environments (orl/text/conversation.py) -------------------------------------
    conversation_env: Callable[[], Any] | None = None  # builds one TextEnv; set by orl-train from env= or the data's env
    conversation_options: dict = {}

    def set_conversation_env(self, make_env: Callable[[], Any] | None, env_id: str | None = None, chat: bool | None = None,
                             stop: str = "\n", max_turn_tokens: int = 16, chat_template_kwargs: dict | None = None) -> None:
        """Play (GRPO: train) and evaluate in a multi-turn text environment: `make_env()` builds one TextEnv."""
        self.conversation_env = make_env
        self.conversation_options = {"env_id": env_id, "chat": chat, "stop": stop, "max_turn_tokens": max_turn_tokens,
                                     "chat_template_kwargs": chat_template_kwargs}

    def play(self, seeds: Sequence[int], greedy: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             model=None, generator: torch.Generator | None = None) -> list:
        """One conversation per seed with the acting model (or `model`), sampled with `generator` (default: the agent's)."""
        from orl.text.conversation import rollout_conversations

        generator = generator if generator is not None else getattr(self, "generator", None)
        return rollout_conversations(model if model is not None else self.acting_model(), self.tokenizer,
                                     [self.conversation_env() for _ in seeds], list(seeds), greedy=greedy, temperature=temperature,
                                     top_k=top_k, top_p=top_p, generator=generator, **self.conversation_options)

    sampling_temperature = 1.0  # what evaluation samples at (agents with a temperature option report theirs)

    def export_policy(self):
        """The LM orl-train writes to run_dir/hf (what `init_from` starts from): the policy."""
        return self.nets["policy"]

    def acting_model(self):
        """The model that generates when the agent acts: the policy (ILQL: the policy perturbed by its Q and V heads)."""
        return self.nets["policy"]

    def evaluate_conversations(self, seeds: Sequence[int], seed: int = 0) -> "EvalResult":
        """Conversations sampled from held-out seeds: returns, turns, success rate."""
        from orl.evaluation import EvalResult

        # its own generator: evaluation moves neither the training sampler nor torch's global RNG (CPU or CUDA)
        generator = torch.Generator().manual_seed(seed + 12345)
        convs = []
        for start in range(0, len(seeds), 64):
            convs.extend(self.play(list(seeds[start : start + 64]), temperature=self.sampling_temperature, generator=generator))
        return EvalResult(np.array([c.episode_return for c in convs]), np.array([float(c.turns) for c in convs]),
                          extra={"success": float(np.mean([bool(c.success) for c in convs])),
                                 "turns": float(np.mean([c.turns for c in convs]))})

    # --- hooks for orl-train (orl/apps/lm_run.py) ----------------------------------------------------
    def prepare_run(self, run) -> dict[str, float] | None:
        """Before the first step: the agent's `prepare(buffer)` if it has one (e.g. DPO's reference log-probs)."""
        prepare = getattr(self, "prepare", None)
        return prepare(run.buffer) if prepare is not None else None

    def evaluate_run(self, run):
        """Sampled responses to the run's held-out prompts, scored by its reward (mean reward, length, distinct-n); in a
        multi-turn environment, conversations from the run's held-out seeds."""
        from orl.evaluation import EvalResult

        if self.conversation_env is not None:
            return self.evaluate_conversations(run.eval_seeds, run.seed)

        out = evaluate_lm(self.acting_model(), run.tokenizer, run.eval_prompts, run.reward_fn, run.max_new_tokens, seed=run.seed, details=True)
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
