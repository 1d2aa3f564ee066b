"""Bradley-Terry reward model on text preference pairs (TRL-style {"prompt","chosen","rejected"}).

  P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l))
  L = -E log sigma(r_w - r_l - margin) + center_coef * E (r_w + r_l)^2
r reads the backbone's last hidden state at the final token (rows are left-padded, so the final
column is always the last real token) through a linear head. The optional margin is per pair or a
constant; reward centering (Eisenstein et al.) keeps scores near zero. A trained model is a reward
function R(prompt, response) for the token env, A-LoL data or best-of-n.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from orl.text.agent import LMAgent, LMConfig

from orl.text.encoding import tokenize_rows
from orl.agent import register
from orl.nn import evaluating
from orl.prefs.losses import preference_loss
from orl.text.data import PairBatch, SequenceBatch, build_sequences, position_ids


@dataclass
class RewardModelConfig(LMConfig):
    """Bradley-Terry reward model on {"prompt","chosen","rejected"} pairs (Bradley & Terry, 1952; as TRL's RewardTrainer)."""

    lr: float = 1e-4  # TRL's RewardConfig default (trl 1.x)
    weight_decay: float = 0.0
    margin: float = 0.0
    center_coef: float = 0.0  # e.g. 0.01
    grad_clip: float = 1.0


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """-log sigma(r_chosen - r_rejected - margin) (+ centering): the one Bradley–Terry loss of orl.prefs.losses, label 1."""
    return preference_loss(chosen, rejected, 1.0, margin, center_coef)


@register("reward_model")
class RewardModel(LMAgent):
    Config = RewardModelConfig
    data_kind = "pairs"
    exports_policy = False  # its output is the scorer in the checkpoint, not a policy

    def __init__(self, obs_space, action_space, cfg: RewardModelConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device, with_reference=False)
        from orl.text.runtime import output_width

        self.nets["head"] = nn.Linear(output_width(self.nets["policy"]), 1).to(self.device)
        self.make_policy_optimizer(list(self.nets["policy"].parameters()) + list(self.nets["head"].parameters()), cfg.lr, cfg.weight_decay)

    def score(self, batch: SequenceBatch) -> torch.Tensor:
        out = self.nets["policy"](input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=position_ids(batch.attention_mask), output_hidden_states=True)
        return self.nets["head"](out.hidden_states[-1][:, -1]).squeeze(-1)

    def losses(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        chosen, rejected = self.score(batch.chosen), self.score(batch.rejected)
        loss = bt_loss(chosen, rejected, self.cfg.margin, self.cfg.center_coef)
        return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean()}

    def update(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        self.step += 1
        return self.optimize(batch, self.losses)

    def evaluate_run(self, run):
        """Pairwise accuracy on (up to 256 of) the held-out pairs (lm.holdout); on training pairs only with lm.holdout=0."""
        from orl.evaluation import EvalResult

        rows = run.eval_rows or run.rows
        scores = np.asarray([self(r["prompt"], r["chosen"]) > self(r["prompt"], r["rejected"]) for r in rows[:256]], float)
        return EvalResult(scores, np.ones(len(scores)), extra={"pair_accuracy": float(scores.mean())})

    @torch.no_grad()
    def __call__(self, prompt: str, response: str) -> float:
        ids, mask, response_mask = build_sequences(*tokenize_rows(self.tokenizer, [prompt], [response]), self.tokenizer.pad_token_id)
        with evaluating(self.nets):
            value = self.score(SequenceBatch(ids.to(self.device), mask.to(self.device), response_mask.to(self.device)))
        return float(value[0])
