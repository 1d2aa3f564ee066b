"""ILQL (agents/ilql.py): IQL on tokens. Losses on a hand-made 2-step token MDP, where each term's gradient goes,
decoding, the shared IQL functions, resume, and offline ILQL then online GRPO through the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import orl
from orl.agents.ilql import ILQL
from orl.text.data import SequenceBatch
from tests.resume import resumed_equals_uninterrupted
from tests.test_multiturn import _train, models  # noqa: F401  (the module-scoped tiny models of two architectures)


class FixedHeads(torch.nn.Module):
    """Heads that return a given table (count, B, T, out) whatever the states."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, states):
        return self.table + 0.0 * states.sum()


def _agent(path, **cfg):
    return orl.make_agent("ilql", None, None, {"model_path": path, **cfg})


def _two_step_batch():
    # prompt token 5, then the agent writes tokens 7 and 9; reward 1 after the last one (the episode's end)
    return SequenceBatch(torch.tensor([[5, 7, 9]]), torch.ones(1, 3, dtype=torch.long), torch.tensor([[0, 1, 1]]), torch.tensor([1.0]))


def test_transitions_of_a_two_step_mdp_and_of_a_conversation(models):
    mdp = ILQL.transitions(_two_step_batch())
    assert mdp["mask"].tolist() == [[1.0, 1.0]] and mdp["actions"].tolist() == [[7, 9]]
    assert mdp["rewards"].tolist() == [[0.0, 1.0]]  # the reward on the last action
    assert mdp["has_next"].tolist() == [[1.0, 0.0]] and mdp["next"][0, 0] == 1  # terminal after the last action
    # a conversation: agent tokens 7 8, an environment reply 3 4 (context), agent token 9; rewards per turn
    batch = SequenceBatch(torch.tensor([[5, 7, 8, 3, 4, 9]]), torch.ones(1, 6, dtype=torch.long), torch.tensor([[0, 1, 1, 0, 0, 1]]),
                          torch.tensor([3.0]), token_rewards=torch.tensor([[0.0, 0.0, 2.0, 0.0, 0.0, 1.0]]))
    mdp = ILQL.transitions(batch)
    assert mdp["mask"].tolist() == [[1, 1, 0, 0, 1]]
    assert mdp["rewards"].tolist() == [[0, 2, 0, 0, 1]]
    # the next state of the first turn's last token is the state before the next agent token (column 4): the reply's
    # tokens are skipped, so there is no discount across them
    assert mdp["next"][0, 1] == 4 and mdp["has_next"][0].tolist()[:2] == [1, 1] and mdp["has_next"][0, 4] == 0


def test_losses_on_a_two_step_mdp_with_known_q_and_v(models):
    agent = _agent(models["llama"], expectile=0.7, discount=0.9)
    vocab = agent.nets["policy"].get_output_embeddings().weight.shape[0]
    q = torch.zeros(2, 1, 2, vocab)
    q[0, 0, 0, 7], q[1, 0, 0, 7] = 0.5, 0.8   # Q_i(s0, a=7)
    q[0, 0, 1, 9], q[1, 0, 1, 9] = 1.2, 0.9   # Q_i(s1, a=9)
    q_target = q.clone()
    q_target[1, 0, 0, 7] = 0.4               # Qbar(s0, 7) = min(0.5, 0.4) = 0.4; Qbar(s1, 9) = 0.9
    value = torch.tensor([[[[0.6], [0.3]]]])  # V(s0) = 0.6, V(s1) = 0.3
    agent.nets["q"], agent.nets["q_target"], agent.nets["value"] = FixedHeads(q), FixedHeads(q_target), FixedHeads(value)
    terms = agent.loss_terms(_two_step_batch())
    # (1) expectile: u = Qbar - V = (-0.2, 0.6) -> weights (0.3, 0.7)
    assert terms["value_loss"].item() == pytest.approx((0.3 * 0.04 + 0.7 * 0.36) / 2)
    # (2) TD targets: s0: 0 + 0.9 * V(s1) = 0.27; s1: 1 (terminal, no bootstrap)
    expected_q = sum(((q[i, 0, 0, 7] - 0.27) ** 2 + (q[i, 0, 1, 9] - 1.0) ** 2) / 2 for i in range(2))
    assert terms["q_loss"].item() == pytest.approx(expected_q.item())
    # (3) CQL: cross-entropy of softmax(Q_i(s, .)) at the data token, summed over heads
    ce = lambda row, token: -torch.log_softmax(row, -1)[token]  # noqa: E731
    expected_cql = sum((ce(q[i, 0, 0], 7) + ce(q[i, 0, 1], 9)) / 2 for i in range(2))
    assert terms["cql_loss"].item() == pytest.approx(expected_cql.item(), rel=1e-5)


def test_each_term_trains_only_what_it_should(models):
    agent = _agent(models["llama"])
    terms = agent.loss_terms(_two_step_batch())

    def grads(term):
        for net in agent.nets.values():
            net.zero_grad(set_to_none=True)
        terms[term].backward(retain_graph=True)
        return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.nets[name].parameters())
                for name in ("policy", "q", "q_target", "value")}

    assert grads("cql_loss") == {"policy": True, "q": True, "q_target": False, "value": False}  # through the Q head (and the LM's states)
    assert grads("q_loss") == {"policy": True, "q": True, "q_target": False, "value": False}    # V(s') is a detached target
    assert grads("value_loss") == {"policy": True, "q": False, "q_target": False, "value": True}  # Qbar is a detached target
    bc = grads("bc_loss")
    assert bc["policy"] and not bc["q"] and not bc["value"] and not bc["q_target"]  # the AWAC weight is detached


def test_decoding_with_beta_zero_is_the_policy_and_beta_moves_it(models):
    from orl.text.generation import KVCachePolicy, VectorTokenEnv, rollout
    from orl.text.runtime import eos_token_ids

    agent = _agent(models["llama"])
    policy, tokenizer = agent.nets["policy"], agent.tokenizer
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        plain = torch.log_softmax(policy(input_ids=ids).logits.float(), -1)
        assert torch.allclose(agent.acting_model(beta=0.0)(input_ids=ids).logits, plain, atol=1e-6)
        moved = agent.acting_model(beta=5.0)(input_ids=ids).logits
    assert not torch.allclose(moved, plain, atol=1e-3)
    prompts = ["count: 1", "count: 2 3"]

    def greedy(model):
        env = VectorTokenEnv(tokenizer, prompts, None, 5, eos_ids=eos_token_ids(tokenizer, policy))
        return rollout(KVCachePolicy(model), env, greedy=True)["responses"]

    assert greedy(agent.acting_model(beta=0.0)) == greedy(policy)


def test_ilql_uses_the_control_iql_functions():
    import orl.agents.iql as iql
    import orl.agents.ilql as ilql

    assert ilql.expectile_loss is iql.expectile_loss and ilql.awr_weights is iql.awr_weights
    source = open(ilql.__file__).read()
    assert "def expectile_loss" not in source and "def awr_weights" not in source


def _log(models, arch, tmp_path, episodes=24):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR
    from orl.apps.lm_run import log_conversations
    from orl.text.conversation import load_conversations

    log = tmp_path / f"log-{arch}.jsonl"
    stop = [] if arch == "qwen2" else ['conversations.stop="the"']
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        log_conversations(compose(config_name="collect", overrides=["env=text:guess_number", f"conversations.model={models[arch]}",
                                                                    f"conversations.episodes={episodes}", f"conversations.out={log}",
                                                                    "conversations.max_turn_tokens=3", "progress=false"] + stop))
    rows = load_conversations(log)
    rows[0]["messages"][2]["reward"] = 1.0  # one rewarded turn, so the values have something to fit
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return log


def test_ilql_resumes_exactly(models, tmp_path):
    log = _log(models, "llama", tmp_path)

    def run(run_dir, steps, resume=False):
        return _train([f"dataset={log}", f"lm.model={models['llama']}", "agent=ilql", "agent.lr=1e-3", "batch_size=4", f"steps={steps}",
                       "eval.every=4", "lm.num_eval_episodes=4", "lm.max_new_tokens=3", "lm.stop=the", "log.every=1", "checkpoint.every=2",
                       "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={run_dir}", f"resume={str(resume).lower()}"])

    _, full = resumed_equals_uninterrupted(run, tmp_path)
    assert {"train/q_loss", "train/cql_loss", "train/v_mean"} <= set(full[0])
    assert (tmp_path / "full" / "hf" / "orl_extra.pt").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_offline_ilql_then_online_grpo_through_init_from(models, tmp_path, arch):
    from orl.logger import read_metrics

    log = _log(models, arch, tmp_path)
    stop = ["lm.stop=the"] if arch == "llama" else []
    common = ["lm.max_new_tokens=3", "lm.num_eval_episodes=4", "log.progress=false", "log.tensorboard=false", "device=cpu"] + stop
    _train(common + [f"dataset={log}", f"lm.model={models[arch]}", "agent=ilql", "agent.lr=1e-3", "agent.distill_steps=3", "batch_size=4",
                     "steps=2", "eval.every=2", f"run_dir={tmp_path / 'ilql'}"])
    online = _train(common + ["env=text:guess_number", f"init_from={tmp_path / 'ilql'}", "agent=grpo", "agent.beta=0.1", "agent.lr=1e-3",
                              "agent.num_generations=2", "agent.max_completion_length=3", "batch_size=2", "steps=2", "eval.every=2",
                              f"run_dir={tmp_path / 'grpo'}"])
    assert math.isfinite(online["return_mean"])
    evals = [r for r in read_metrics(tmp_path / "grpo") if "eval/return_mean" in r]
    assert [r["step"] for r in evals] == [0, 2]  # the starting (offline) policy's score, then the online curve
    # the online phase starts from, and keeps as its KL reference, the offline policy's exported LM
    provenance = json.loads((tmp_path / "grpo" / "provenance.json").read_text())
    assert provenance["data"]["model"] == str(tmp_path / "ilql" / "hf")
