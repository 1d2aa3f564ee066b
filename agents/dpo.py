"""DPO: Direct Preference Optimization (Rafailov et al., 2023), token-level LMs (the loss is the paper's eq. 7).

  h = beta * [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ]
  L = -E log sigma(h)
log pi(y|x) sums response-token log-probs (prompt and padding masked). Reference log-probs need no
gradient and are precomputed once by `prepare`. Logged: implicit rewards beta * (log pi - log pi_ref)
for chosen and rejected, preference accuracy and margin. `reference_free` drops the pi_ref terms.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from orl.text.agent import LMAgent, LMConfig
from orl.agent import register
from orl.text.data import PairBatch, PairBuffer, response_log_prob


@dataclass
class DPOConfig(LMConfig):
    """DPO (Rafailov et al. 2023; eric-mitchell/direct-preference-optimization). dataset=<rows {"prompt","chosen","rejected"}>.jsonl
    lr: TRL's DPOConfig default, 1e-6 (AdamW), safe on a real model. The yaml's 3e-4 and the API's 1e-4 were rates
    for the embedded tiny LM, which passes its own (scripts/lm_demo.py --dpo-lr, 3e-5)."""

    beta: float = 0.1
    lr: float = 1e-6  # TRL's DPOConfig default (trl 1.x)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    reference_free: bool = False


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean DPO loss and the implicit rewards of chosen and rejected responses."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen_reward - rejected_reward).mean(), chosen_reward.detach(), rejected_reward.detach()


@register("dpo")
class DPO(LMAgent):
    data_kind = "pairs"
    Config = DPOConfig

    def __init__(self, obs_space, action_space, cfg: DPOConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device, with_reference=not cfg.reference_free)
        self.make_policy_optimizer(self.nets["policy"].parameters(), cfg.lr, cfg.weight_decay)
        self.ref_chosen: torch.Tensor | None = None
        self.ref_rejected: torch.Tensor | None = None

    @torch.no_grad()
    def prepare(self, buffer: PairBuffer, batch_size: int = 64) -> dict[str, float]:
        """Precompute log pi_ref for every chosen and rejected response."""
        if self.cfg.reference_free:
            return {}
        chosen, rejected = [], []
        for index in torch.arange(len(buffer), device=buffer.device).split(batch_size):
            chosen.append(response_log_prob(self.nets["reference"], buffer.chosen.gather(index)))
            rejected.append(response_log_prob(self.nets["reference"], buffer.rejected.gather(index)))
        self.ref_chosen, self.ref_rejected = torch.cat(chosen), torch.cat(rejected)
        return {"ref_margin": float((self.ref_chosen - self.ref_rejected).mean())}

    def losses(self, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy = self.nets["policy"]
        policy_chosen = response_log_prob(policy, batch.chosen)
        policy_rejected = response_log_prob(policy, batch.rejected)
        if self.cfg.reference_free:
            ref_chosen = ref_rejected = torch.zeros_like(policy_chosen)
        else:
            if self.ref_chosen is None:
                raise RuntimeError("call prepare(buffer) first: DPO precomputes the reference log-probs")
            ref_chosen, ref_rejected = self.ref_chosen[batch.chosen.index], self.ref_rejected[batch.chosen.index]
        loss, chosen_reward, rejected_reward = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.cfg.beta)
        return loss, {  # TRL DPOTrainer's metric names
            "rewards/chosen": chosen_reward.mean(), "rewards/rejected": rejected_reward.mean(),
            "rewards/accuracies": (chosen_reward > rejected_reward).float().mean(),
            "rewards/margins": (chosen_reward - rejected_reward).mean(),
            "logps/chosen": policy_chosen.detach().mean(), "logps/rejected": policy_rejected.detach().mean(),
        }

    def update(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        self.step += 1
        return self.optimize(batch, self.losses)

    def extra_state(self) -> dict:
        return {"ref_chosen": self.ref_chosen, "ref_rejected": self.ref_rejected}

    def load_extra_state(self, state: dict) -> None:
        self.ref_chosen, self.ref_rejected = state.get("ref_chosen"), state.get("ref_rejected")
