"""The Bradley–Terry loss every preference learner shares (the text reward model in agents/reward_model.py,
control reward models, CPL), and the accuracy of a model's preferences on labelled pairs."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def preference_loss(score_a: torch.Tensor, score_b: torch.Tensor, label: torch.Tensor | float = 1.0,
                    margin: torch.Tensor | float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood with soft labels:
    -[y log sigma(s_a - s_b - m) + (1 - y) log sigma(s_b - s_a + m)], y = P(a > b) (0.5: a tie).
    With y = 1 it is the reward-model loss of InstructGPT/TRL (margin m, optional centering of scores)."""
    diff = score_a - score_b - margin
    label = torch.as_tensor(label, dtype=diff.dtype, device=diff.device)
    loss = -(label * F.logsigmoid(diff) + (1 - label) * F.logsigmoid(-diff)).mean()
    if center_coef:
        loss = loss + center_coef * (score_a + score_b).pow(2).mean()
    return loss


def pair_accuracy(returns_a: torch.Tensor, returns_b: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of non-tie queries where the larger predicted return is the preferred segment's."""
    decided = labels != 0.5
    if not bool(decided.any()):
        return float("nan")
    # by direction: a soft label (0.7) counts segment a as preferred, as a hard 1 does
    return float(((returns_a > returns_b) == (labels > 0.5))[decided].float().mean())
