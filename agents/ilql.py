"""ILQL: Implicit Language Q-Learning (Snell, Kostrikov, Su, Yang & Levine, ICLR 2023, arXiv:2206.11871): IQL on tokens.

The token MDP of a text row or a logged conversation: the state s_t is the text up to position t, the action a_t the
next token the agent wrote; environment tokens (a conversation's replies, the prompt) are context, never actions. The
reward of an agent turn sits on its last token; the discount is per action token (none across the environment's
tokens); the episode ends after the last action. Q, its Polyak target and V are heads on the language model's last
hidden state h_t (2-layer MLPs h -> 2h -> out, ReLU; Q outputs one value per vocabulary token, twin Qs as one module).
With Qbar = min_i Qtarg_i and the control IQL's functions (`orl.agents.iql.expectile_loss`, `awr_weights`):

  (1) V:    L_V   = E_t L2_tau( Qbar(s_t, a_t) - V(s_t) )                          IQL (1), expectile tau
  (2) Q:    L_Q   = sum_i E_t ( Q_i(s_t, a_t) - (r_t + gamma * (1 - d_t) * V(s_t+1)) )^2   IQL (3); V(s_t+1) detached,
                                                           s_t+1 the state before the next action token, 0 at the end
  (3) CQL:  L_CQL = sum_i E_t CE( softmax(Q_i(s_t, .)), a_t )                        pushes down Q of unseen tokens
  (4) BC:   L_pi  = -E_t min(exp(awac_beta * (Qbar - V)), max_weight) * log pi(a_t | s_t)   IQL (2) (AWR); awac_beta 0
                                                           (both official configs and trlx): plain behaviour cloning
  L = L_Q + L_V + cql_weight * L_CQL + bc_weight * L_pi, one optimizer over the LM and the heads (the transformer
  learns from every term, as in trlx), then Qtarg <- (1 - polyak) Qtarg + polyak Q after every step (official).
  Means are over action tokens.

Decoding perturbs the policy: log pi(a|s) + beta * (Qbar(s, a) - V(s)) (official `IQL_Policy` with exp_adv, trlx
`generate`), then sampling at a temperature or the argmax; beta = 0 is the policy itself.

Checked against the official code (Sea-Snell/Implicit-Language-Q-Learning, src/models/iql_model.py, commit 0dc55615:
get_v_loss, get_q_loss, get_cql_loss, awac_loss, soft_update) and trlx (CarperAI/trlx, trlx/models/modeling_ilql.py
ILQLConfig.loss, ILQLHeads, generate). Where they differ, orl takes:
  * one transformer with heads on it and a target copy of the Q heads only (trlx); the official experiments keep a
    separate policy LM and a Polyak copy of the whole transformer (three LMs in memory);
  * Polyak 0.005 after every optimizer step (official; trlx: 0.001 every 5 steps, in effect once per data pass);
  * expectile 0.7 (trlx's default and the official Wordle config; official VisDial 0.8, toxicity 0.6); gamma 0.99 (both);
  * cql_weight 0.1 (trlx's default; the official configs use 1 (VisDial), 0.25 (toxicity), 1e-4 (Wordle));
  * decoding beta 1.0 (trlx's default; the official evaluations use 8-16, tuned per task: sweep it);
  * lr 1e-5 (official; trlx 5e-5), AdamW without weight decay, as orl's other LM agents: a safe rate on a real model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orl.agent import register
from orl.agents.iql import awr_weights, expectile_loss
from orl.text.agent import LMAgent, LMConfig
from orl.text.data import SequenceBatch, position_ids


@dataclass
class ILQLConfig(LMConfig):
    """ILQL (agents/ilql.py). orl-train agent=ilql dataset=<rows {"prompt","response","reward"} | logged conversations>.jsonl"""

    expectile: float = 0.7  # tau of the V head's expectile regression (trlx; official Wordle)
    discount: float = 0.99  # gamma, per action token
    polyak: float = 0.005  # target Q heads <- (1 - polyak) target + polyak Q, every step (official)
    cql_weight: float = 0.1  # trlx's default (official configs: 1e-4 .. 1)
    bc_weight: float = 1.0  # the policy's (AWAC-weighted) NLL term
    awac_beta: float = 0.0  # 0: plain behaviour cloning (official configs and trlx)
    max_weight: float = 100.0  # clip of the AWAC weight (as control IQL)
    beta: float = 1.0  # decoding: log pi + beta * (Qbar - V) (trlx's default; official evaluations 8-16)
    temperature: float = 1.0  # decoding temperature (evaluation samples; greedy when orl asks for it)
    lr: float = 1e-5  # official ILQL (AdamW); trlx 5e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # > 0: the exported LM (run_dir/hf, what init_from starts an online phase from) is the policy distilled toward the
    # perturbed decoding: this many AdamW steps (lr) of KL(perturbed || LM) on the data's states; 0: the LM head as trained
    distill_steps: int = 0
    distill_batch_size: int = 32


class TokenHeads(nn.Module):
    """`count` MLP heads h -> 2h -> out on the last hidden state, as one module (one batched matmul per layer)."""

    def __init__(self, hidden: int, out: int, count: int):
        super().__init__()
        self.first = nn.Parameter(torch.empty(count, hidden, 2 * hidden))
        self.first_bias = nn.Parameter(torch.zeros(count, 1, 2 * hidden))
        self.second = nn.Parameter(torch.empty(count, 2 * hidden, out))
        self.second_bias = nn.Parameter(torch.zeros(count, 1, out))
        # nn.Linear's default initialization: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
        for parameter, fan_in in ((self.first, hidden), (self.first_bias, hidden), (self.second, 2 * hidden), (self.second_bias, 2 * hidden)):
            nn.init.uniform_(parameter, -fan_in**-0.5, fan_in**-0.5)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """(..., hidden) -> (count, ..., out)."""
        flat = states.reshape(1, -1, states.shape[-1]).float()
        hidden = torch.relu(torch.baddbmm(self.first_bias, flat.expand(self.first.shape[0], -1, -1), self.first))
        out = torch.baddbmm(self.second_bias, hidden, self.second)
        return out.reshape(self.first.shape[0], *states.shape[:-1], -1)


class PerturbedPolicy(nn.Module):
    """The LM with ILQL's decoding: its logits become log pi(.|s) + beta * (Qbar(s, .) - V(s)).

    Called like the LM it wraps (same inputs, same cache), so the token env's KV-cache policy, `evaluate_lm` and the
    multi-turn rollout drive it unchanged; beta = 0 returns the LM's log-probabilities."""

    def __init__(self, model, q_target: TokenHeads, value: TokenHeads, beta: float):
        super().__init__()
        self.model, self.q_target, self.value, self.beta = model, q_target, value, float(beta)
        self.config, self.generation_config = model.config, getattr(model, "generation_config", None)
        self.train(model.training)

    def get_base_model(self):  # the cache argument and signature are the LM's (orl.text.generation.cache_argument)
        return self.model

    def forward(self, **inputs):
        out = self.model(**inputs, output_hidden_states=True)
        log_probs = torch.log_softmax(out.logits.float(), -1)
        if self.beta:
            states = out.hidden_states[-1]
            log_probs = log_probs + self.beta * (self.q_target(states).min(0).values - self.value(states)[0])
        out.logits = log_probs
        return out


@register("ilql")
class ILQL(LMAgent):
    data_kind = "rewarded"  # rows {prompt, response, reward}, or logged conversations (per-turn rewards)
    Config = ILQLConfig

    def __init__(self, obs_space, action_space, cfg: ILQLConfig, device="cpu"):
        super().__init__(obs_space, action_space, cfg, device, with_reference=False)
        from orl.text.runtime import output_width

        hidden, vocab = output_width(self.nets["policy"]), self.nets["policy"].get_output_embeddings().weight.shape[0]
        self.nets["q"] = TokenHeads(hidden, vocab, 2).to(self.device)
        self.nets["q_target"] = copy.deepcopy(self.nets["q"]).requires_grad_(False)
        self.nets["value"] = TokenHeads(hidden, 1, 1).to(self.device)
        params = [p for name in ("policy", "q", "value") for p in self.nets[name].parameters()]
        self.make_policy_optimizer(params, cfg.lr, cfg.weight_decay)

    # --- the token MDP of a batch ---------------------------------------------------------------------
    @staticmethod
    def transitions(batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """Per column t of the shifted layout (hidden state t acts on token t + 1): action mask, action, reward,
        the column of the next action (the next state) and whether there is one."""
        actions_mask = batch.response_mask[:, 1:].float()
        columns = actions_mask.shape[1]
        index = torch.arange(columns, device=actions_mask.device).expand_as(actions_mask)
        action_columns = torch.where(actions_mask.bool(), index, torch.full_like(index, columns))
        # the smallest action column >= t, then shifted by one: the next action strictly after t
        at_or_after = torch.flip(torch.cummin(torch.flip(action_columns, [1]), 1).values, [1])
        following = torch.cat([at_or_after[:, 1:], torch.full_like(at_or_after[:, :1], columns)], 1)
        token_rewards = batch.token_rewards if batch.token_rewards is not None else _last_token_rewards(batch)
        return {"mask": actions_mask, "actions": batch.input_ids[:, 1:], "rewards": token_rewards[:, 1:].float(),
                "next": following.clamp(max=columns - 1), "has_next": (following < columns).float()}

    def heads(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(LM logits (B, L-1, V), last hidden states (B, L-1, h)) at the columns that act on the next token."""
        out = self.nets["policy"](input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=position_ids(batch.attention_mask), output_hidden_states=True)
        return out.logits[:, :-1].float(), out.hidden_states[-1][:, :-1]

    def loss_terms(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        """The four terms (1)-(4) of the module docstring (each a mean over action tokens) and logged statistics."""
        cfg = self.cfg
        mdp = self.transitions(batch)
        mask, actions = mdp["mask"], mdp["actions"]
        count = mask.sum().clamp(min=1.0)
        masked_mean = lambda values: (values * mask).sum() / count  # noqa: E731  (over action tokens)
        logits, states = self.heads(batch)
        taken = actions.unsqueeze(0).unsqueeze(-1).expand(2, -1, -1, 1)  # the data token, for each of the twin heads
        q_all = self.nets["q"](states)  # (2, B, T, V)
        q = q_all.gather(-1, taken).squeeze(-1)  # (2, B, T)
        value = self.nets["value"](states)[0, ..., 0]  # (B, T)
        with torch.no_grad():
            q_bar = self.nets["q_target"](states).gather(-1, taken).squeeze(-1).min(0).values
        # (1) expectile regression of V toward Qbar over action tokens
        value_loss = expectile_loss((q_bar - value)[mask.bool()], cfg.expectile)
        # (2) TD: r_t + gamma * V(s_t+1) (detached; 0 after the last action), each Q head
        next_value = value.detach().gather(1, mdp["next"]) * mdp["has_next"]
        target = mdp["rewards"] + cfg.discount * next_value
        q_loss = sum(masked_mean((q[i] - target).pow(2)) for i in range(q.shape[0]))
        # (3) CQL: the data token's cross-entropy under softmax(Q_i), each head
        cql_loss = sum(masked_mean(F.cross_entropy(q_all[i].transpose(1, 2), actions, reduction="none")) for i in range(q.shape[0]))
        # (4) (AWAC-weighted) behaviour cloning of the LM head
        log_pi = torch.log_softmax(logits, -1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        weights = awr_weights((q_bar - value).detach(), cfg.awac_beta, cfg.max_weight)
        bc_loss = -masked_mean(weights * log_pi)
        return {"q_loss": q_loss, "value_loss": value_loss, "cql_loss": cql_loss, "bc_loss": bc_loss,
                "q_mean": masked_mean(q.detach().min(0).values), "v_mean": masked_mean(value.detach()),
                "advantage_mean": masked_mean((q_bar - value).detach())}

    def losses(self, batch: SequenceBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        terms = self.loss_terms(batch)
        loss = terms["q_loss"] + terms["value_loss"] + cfg.cql_weight * terms["cql_loss"] + cfg.bc_weight * terms["bc_loss"]
        return loss, {key: value.detach() for key, value in terms.items()}

    @property
    def sampling_temperature(self) -> float:
        return self.cfg.temperature

    def update(self, batch: SequenceBatch) -> dict[str, torch.Tensor]:
        self.step += 1
        metrics = self.optimize(batch, self.losses)
        with torch.no_grad():  # Polyak: every step, as the official soft_update
            for target, online in zip(self.nets["q_target"].parameters(), self.nets["q"].parameters()):
                target.lerp_(online, self.cfg.polyak)
        return metrics

    # --- acting: the perturbed policy --------------------------------------------------------------------
    def acting_model(self, beta: float | None = None) -> PerturbedPolicy:
        """The LM whose logits are log pi + beta * (Qbar - V): what ILQL generates with (beta: the config's)."""
        return PerturbedPolicy(self.nets["policy"], self.nets["q_target"], self.nets["value"], self.cfg.beta if beta is None else beta)

    def prepare_run(self, run) -> None:
        self.data = run.buffer  # the states the exported policy is distilled on (distill_steps)
        return None

    def export_policy(self):
        """The LM written to run_dir/hf: the trained LM head, or with distill_steps a copy of it that has learnt the
        perturbed decoding, so an online phase (init_from) starts from the policy ILQL evaluates, not from its BC head."""
        if self.cfg.distill_steps <= 0:
            return self.nets["policy"]
        teacher = self.acting_model()
        student = copy.deepcopy(self.nets["policy"]).train()
        optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=self.cfg.lr)
        generator = torch.Generator(device=self.device).manual_seed(0)
        for _ in range(self.cfg.distill_steps):
            batch = self.data.sample(self.cfg.distill_batch_size, generator)
            inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids(batch.attention_mask))
            with torch.no_grad():
                target = torch.log_softmax(teacher(**inputs).logits[:, :-1] / self.cfg.temperature, -1)
            log_q = torch.log_softmax(student(**inputs).logits[:, :-1].float() / self.cfg.temperature, -1)
            mask = batch.response_mask[:, 1:].float()  # the states where the agent acts
            kl = (target.exp() * (target - log_q)).sum(-1)
            loss = (kl * mask).sum() / mask.sum().clamp(min=1.0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(f"[orl] ilql: distilled the perturbed decoding (beta {self.cfg.beta}) into the exported LM: KL {loss.item():.4f} "
              f"after {self.cfg.distill_steps} steps")
        return student.eval()

    def export_extra(self) -> dict[str, Any]:
        """What run_dir/hf lacks for ILQL's decoding: the target Q and V heads and beta (orl-train writes run_dir/hf/orl_extra.pt)."""
        return {"q_target": self.nets["q_target"].state_dict(), "value": self.nets["value"].state_dict(), "beta": self.cfg.beta}


def _last_token_rewards(batch: SequenceBatch) -> torch.Tensor:
    """Single-turn rows: the row's reward on its last response token (B, L)."""
    rewards = torch.zeros_like(batch.response_mask, dtype=torch.float32)
    last = (batch.response_mask * torch.arange(batch.response_mask.shape[1], device=rewards.device)).argmax(-1)
    rewards[torch.arange(len(rewards), device=rewards.device), last] = batch.rewards.float()
    return rewards * (batch.response_mask.sum(-1, keepdim=True) > 0)
