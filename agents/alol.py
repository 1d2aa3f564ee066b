"""A-LoL: Leftover-Lunch Advantage-based Offline Policy Gradients (Baheti et al., ICLR 2024).

Bandit view: an example is (x, y, R) with the whole response y as one action. pi_ref is the SFT model,
pi_theta starts from it. With log-probs *summed* over response tokens (prompt and padding masked):

  V_ref(x): attention-pool head on pi_ref's last hidden states over the prompt, fit by MSE on pi_ref's
            own greedy generations for validation prompts (keep the epoch with the lowest MSE)
  A = R(x,y) - V_ref(x), A+ = max(A, 0); examples are drawn with probability proportional to A+
  (with replacement, as the official sampler behaves), and A+ also weights the loss.
  rho = exp(sg(log pi_theta(y|x)) - log pi_ref(y|x)),  rho_t the per-token version, both clipped to
  [1 - eps, 1 + eps] and always detached: the gradient flows only through log pi_theta.

  | variant        | per-example loss                                          |
  | nll            | NLL                                                       |
  | wbc            | R * NLL                                                   |
  | rlol           | clip(rho) * NLL * R                                       |
  | alol           | clip(rho) * NLL * A+                                      |
  | alol_seq       | A+ * sum_t clip(rho_t) * (-log pi_theta(y_t|.))            |
  | alol_ref_free  | NLL * A+                                                  |
  | alol_kl        | NLL * A+ + beta_kl * (log pi_theta(y|x) - log pi_ref(y|x)) |
"""
from __future__ import annotations

import math
from dataclasses import dataclass
import torch
from torch import nn

from orl.text.agent import LMAgent, LMConfig

from orl.text.encoding import text_buffer
from orl.agent import register
from orl.errors import ConfigError
from orl.text.data import SequenceBatch, SequenceBuffer, position_ids, token_log_probs

VARIANTS = ("nll", "wbc", "rlol", "alol", "alol_seq", "alol_ref_free", "alol_kl")


@dataclass
class ALoLConfig(LMConfig):
    """A-LoL (Baheti et al., ICLR 2024; abaheti95/LoL-RL). dataset=<rows {"prompt","response","reward"}>.jsonl
    variant: nll | wbc | rlol | alol | alol_seq | alol_ref_free | alol_kl (kl_beta; needs clip_eps: 0)
    lr: the official A-LoL rate, 2e-5 (AdamW, full fine-tuning; abaheti95/LoL-RL train_generation_task_with_off_policy_PG.py),
    safe on a real model; its QLoRA scripts (7B models) train LoRA adapters at 2e-4. The yaml's 3e-4 and the API's
    1e-4 were rates for the embedded tiny LM, which now passes its own (scripts/lm_demo.py: 3e-4)."""

    variant: str = "alol"
    clip_eps: float = 0.9
    kl_beta: float = 0.0
    lr: float = 2e-5  # official A-LoL (AdamW, full fine-tuning); LoRA adapters: 2e-4 as its QLoRA scripts
    weight_decay: float = 0.0
    grad_clip: float = 0.3
    value_lr: float = 1e-3
    value_epochs: int = 10
    value_heads: int = 8
    value_dropout: float = 0.1
    max_value: float = 1.0


class ValueHead(nn.Module):
    """One learned query attends over the prompt's hidden states (8 heads), then dropout, linear, sigmoid * max."""

    def __init__(self, hidden: int, heads: int, dropout: float, max_value: float):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * hidden**-0.5)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden, 1))
        self.max_value = max_value

    def forward(self, hidden_states: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        query = self.query.expand(hidden_states.shape[0], -1, -1)
        pooled, _ = self.attention(query, hidden_states, hidden_states, key_padding_mask=prompt_mask == 0)
        return torch.sigmoid(self.out(pooled[:, 0]).squeeze(-1)) * self.max_value


def clipped_ratio(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, eps: float) -> torch.Tensor:
    """clip(exp(sg(log pi) - log pi_ref), 1 - eps, 1 + eps): a constant weight, never differentiated."""
    return torch.exp(log_prob.detach() - ref_log_prob.detach()).clamp(1.0 - eps, 1.0 + eps)


@register("alol")
class ALoL(LMAgent):
    data_kind = "rewarded"
    needs_reward = True  # V_ref is fit on lm.reward of the reference's generations
    Config = ALoLConfig

    def __init__(self, obs_space, action_space, cfg: ALoLConfig, device="cpu"):
        if cfg.variant not in VARIANTS:
            raise ValueError(f"A-LoL variant must be one of {VARIANTS}, got {cfg.variant!r}")
        if cfg.variant == "alol_kl" and cfg.clip_eps not in (0, 0.0, None):
            # The official script asserts ppo_clip == 0 whenever the KL term is on (abaheti95/LoL-RL,
            # lolrl_qlora_llama_hh.py; its README: "When KL is used make sure to set ppo_clip to 0.0"): refused
            # here too, rather than rewritten in the caller's config behind its back.
            raise ConfigError(f"agent.variant=alol_kl uses no importance ratio, so it takes no clip (the official A-LoL code "
                              f"asserts ppo_clip == 0 with the KL term), got agent.clip_eps={cfg.clip_eps}; set agent.clip_eps=0")
        super().__init__(obs_space, action_space, cfg, device)
        from orl.text.runtime import output_width

        hidden = output_width(self.nets["policy"])
        self.nets["value"] = ValueHead(hidden, cfg.value_heads, cfg.value_dropout, cfg.max_value).to(self.device)
        self.make_policy_optimizer(self.nets["policy"].parameters(), cfg.lr, cfg.weight_decay)
        self.advantages: torch.Tensor | None = None

    # --- value head ------------------------------------------------------------------------------
    def _prompt_states(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.nets["reference"](input_ids=input_ids, attention_mask=prompt_mask, position_ids=position_ids(prompt_mask),
                                         output_hidden_states=True)
        return out.hidden_states[-1]

    def value(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        return self.nets["value"](self._prompt_states(input_ids, prompt_mask), prompt_mask)

    def fit_value(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, targets: torch.Tensor, batch_size: int = 64, seed: int = 0) -> list[float]:
        """Fit V_ref by MSE on (prompt, R of pi_ref's generation); keep the epoch with the lowest MSE."""
        prompt_ids, prompt_mask, targets = prompt_ids.to(self.device), prompt_mask.to(self.device), targets.float().to(self.device)
        head = self.nets["value"]
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.cfg.value_lr)
        states = self._prompt_states(prompt_ids, prompt_mask)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        history, best, best_state = [], math.inf, None
        for _ in range(self.cfg.value_epochs):
            head.train()
            for index in torch.randperm(len(targets), generator=generator, device=self.device).split(batch_size):
                loss = (head(states[index], prompt_mask[index]) - targets[index]).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            head.eval()
            with torch.no_grad():
                mse = float((head(states, prompt_mask) - targets).pow(2).mean())
            history.append(mse)
            if mse < best:
                best, best_state = mse, {k: v.clone() for k, v in head.state_dict().items()}
        head.load_state_dict(best_state)
        return history

    def prepare_run(self, run) -> dict[str, float]:
        """V_ref is fit on the reference policy's greedy generations for held-out (validation) prompts, scored
        by the run's reward (logged conversations: the reference's returns from held-out episode seeds); then the
        advantages of the training rows are cached."""
        from orl.text.data import pad_left
        from orl.text.generation import evaluate_lm

        if self.conversation_env is not None:  # logged conversations: V_ref(opening) = the reference's return from held-out seeds
            returns = run.buffer.rewards
            if float(returns.min()) < 0 or float(returns.max()) > self.cfg.max_value:
                raise ConfigError(f"A-LoL's value head predicts in [0, agent.max_value={self.cfg.max_value}] (a sigmoid, as the official "
                                  f"code), but the conversations' returns span [{float(returns.min()):g}, {float(returns.max()):g}]: "
                                  "set agent.max_value to the largest return, and shift negative rewards (e.g. turn_penalty) to >= 0")
            convs = [c for start in range(0, len(run.value_seeds), 64)
                     for c in self.play(run.value_seeds[start : start + 64], greedy=True, model=self.nets["reference"])]
            ids, mask = pad_left([c.prompt_ids for c in convs], run.tokenizer.pad_token_id)
            self.fit_value(ids, mask, torch.tensor([c.episode_return for c in convs]))
            return self.prepare(run.buffer)
        prompts = (run.value_prompts or run.eval_prompts)[: run.num_value_prompts]
        reference = evaluate_lm(self.nets["reference"], run.tokenizer, prompts, run.reward_fn, run.max_new_tokens, greedy=True, details=True)
        encoded = text_buffer(run.tokenizer, prompts, [""] * len(prompts), None, run.device, **run.limits)
        self.fit_value(encoded.input_ids, encoded.attention_mask * (1 - encoded.response_mask), torch.tensor(reference["rewards"]))
        return self.prepare(run.buffer)

    def prepare(self, buffer: SequenceBuffer, batch_size: int = 64) -> dict[str, float]:
        """Cache A = R - V_ref(x) for every example and turn on priority sampling by A+."""
        advantages = []
        self.nets["value"].eval()
        for index in torch.arange(len(buffer), device=buffer.device).split(batch_size):
            # the prompt: the tokens before the first response token (a logged conversation's later replies are not in it)
            prompt_mask = buffer.attention_mask[index] * (buffer.response_mask[index].cumsum(-1) == 0)
            advantages.append(buffer.rewards[index] - self.value(buffer.input_ids[index], prompt_mask))
        self.advantages = torch.cat(advantages).detach()
        positive = self.advantages.clamp(min=0)
        if self.cfg.variant.startswith("alol"):
            if positive.sum() <= 0:
                raise ValueError("no training example has a positive advantage: A-LoL has nothing to learn from")
            buffer.weights = positive
        return {"positive_fraction": float((self.advantages > 0).float().mean()), "advantage_mean": float(self.advantages.mean())}

    # --- update ----------------------------------------------------------------------------------
    def losses(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        mask = batch.response_mask[:, 1:].float()
        token_lp = token_log_probs(self.nets["policy"], batch.input_ids, batch.attention_mask) * mask
        with torch.no_grad():
            ref_token_lp = token_log_probs(self.nets["reference"], batch.input_ids, batch.attention_mask) * mask
        log_prob, ref_log_prob = token_lp.sum(-1), ref_token_lp.sum(-1)
        nll = -log_prob
        reward = batch.rewards
        advantage = None
        if self.advantages is not None:
            advantage = self.advantages[batch.index].clamp(min=0)
        elif cfg.variant.startswith("alol"):
            raise RuntimeError("call prepare(buffer) before training A-LoL: it needs the cached advantages")
        ratio = clipped_ratio(log_prob, ref_log_prob, cfg.clip_eps)
        variant = cfg.variant
        if variant == "nll":
            per_example = nll
        elif variant == "wbc":
            per_example = reward * nll
        elif variant == "rlol":
            per_example = ratio * nll * reward
        elif variant == "alol":
            per_example = ratio * nll * advantage
        elif variant == "alol_seq":
            token_ratio = clipped_ratio(token_lp, ref_token_lp, cfg.clip_eps)
            per_example = advantage * (token_ratio * -token_lp * mask).sum(-1)
        elif variant == "alol_ref_free":
            per_example = nll * advantage
        else:  # alol_kl
            per_example = nll * advantage + cfg.kl_beta * (log_prob - ref_log_prob)
        metrics = {"nll": nll.detach().mean(), "ratio_mean": ratio.mean(), "log_ratio": (log_prob - ref_log_prob).detach().mean()}
        return per_example.mean(), metrics

    def update(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        self.step += 1
        return self.optimize(batch, self.losses)

    def extra_state(self) -> dict:
        return {"advantages": None if self.advantages is None else self.advantages.cpu()}

    def load_extra_state(self, state: dict) -> None:
        if state.get("advantages") is not None:
            self.advantages = state["advantages"].to(self.device)

