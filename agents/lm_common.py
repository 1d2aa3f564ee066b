"""Shared pieces of the language-model agents (A-LoL, DPO, BT reward model): loading the policy and
its frozen reference, and acting in the token-level env. Not an agent itself (registers nothing)."""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch

from orl.agent import Agent
from orl.sequence import PairBuffer, SequenceBuffer, build_sequences, position_ids


class LMAgent(Agent):
    """Base for agents whose policy is a Hugging Face causal LM given by `cfg.model_path`."""

    def __init__(self, obs_space, action_space, cfg, device="cpu", with_reference: bool = True):
        super().__init__(obs_space, action_space, cfg, device)
        from envs.lm import load_lm  # the LM extra (transformers) is only needed by these agents

        policy, self.tokenizer = load_lm(cfg.model_path, self.device, None if cfg.dtype == "auto" else cfg.dtype, cfg.disable_dropout)
        policy.train()
        self.nets["policy"] = policy
        if with_reference:
            self.nets["reference"] = copy.deepcopy(policy).eval().requires_grad_(False)

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


def _tokenize(tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    """Tokenize prompt and response separately (so boundaries line up) and append EOS to the response.

    Prompts go through `envs.lm.encode_prompt` (BOS once, as the env encodes them), responses carry
    no special tokens of their own.
    """
    from envs.lm import encode_prompt, encode_response

    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    response_ids = [encode_response(tokenizer, r) + [tokenizer.eos_token_id] for r in responses]
    return prompt_ids, response_ids


def text_buffer(tokenizer, prompts: Sequence[str], responses: Sequence[str], rewards: Sequence[float] | None, device, width: int | None = None) -> SequenceBuffer:
    """{"prompt","response","reward"} rows as a left-padded device buffer."""
    ids, mask, response_mask = build_sequences(*_tokenize(tokenizer, prompts, responses), tokenizer.pad_token_id, width)
    rewards_t = None if rewards is None else torch.as_tensor(list(rewards), dtype=torch.float32)
    return SequenceBuffer(ids, mask, response_mask, rewards_t, device)


def pair_buffer(tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str], device) -> PairBuffer:
    """{"prompt","chosen","rejected"} rows; chosen and rejected share one width."""
    p_ids, c_ids = _tokenize(tokenizer, prompts, chosen)
    _, r_ids = _tokenize(tokenizer, prompts, rejected)
    width = max(len(p) + len(r) for p, r in zip(p_ids + p_ids, c_ids + r_ids))
    chosen_buf = SequenceBuffer(*build_sequences(p_ids, c_ids, tokenizer.pad_token_id, width), None, device)
    rejected_buf = SequenceBuffer(*build_sequences(p_ids, r_ids, tokenizer.pad_token_id, width), None, device)
    return PairBuffer(chosen_buf, rejected_buf)
