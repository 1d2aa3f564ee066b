"""The seed methods' specified behaviours: A2PR (Liu et al., ICML 2024) and FamO2O (Wang et al., NeurIPS 2023)."""
import gymnasium as gym
import numpy as np
import pytest
import torch

import orl
from orl.agents.a2pr import imitation_target
from orl.agents.famo2o import sinusoidal_embedding
from tests.test_nets_and_losses import make_batch

OBS = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
ACT = gym.spaces.Box(-1, 1, (2,), np.float32)


def test_a2pr_target_swaps_to_vae_action_exactly_when_its_advantage_is_not_lower():
    data = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])
    vae = -data
    value = torch.tensor([1.0, 1.0, 1.0, 1.0])
    q_data = torch.tensor([2.0, 2.0, 0.5, 3.0])
    q_vae = torch.tensor([3.0, 2.0, 0.0, 2.5])  # A_vae >  A_data, ==, <, <
    target, weight = imitation_target(data, vae, q_data, q_vae, value, mask=0.5)
    torch.testing.assert_close(target, torch.stack([vae[0], vae[1], data[2], data[3]]))
    # w = mask * (1[Q(s,a~) >= V] + 1[Q(s,a) > V])
    torch.testing.assert_close(weight, torch.tensor([1.0, 1.0, 0.0, 1.0]))


def test_a2pr_gate_is_off_for_negative_advantage():
    data, vae = torch.zeros(3, 2), torch.ones(3, 2)
    value = torch.tensor([5.0, 5.0, 5.0])
    _, weight = imitation_target(data, vae, torch.tensor([1.0, 4.9, 5.0]), torch.tensor([0.0, 4.0, 4.99]), value, mask=2.0)
    assert torch.equal(weight, torch.zeros(3))
    _, weight = imitation_target(data, vae, torch.tensor([6.0]), torch.tensor([5.0]), torch.tensor([5.0]), mask=2.0)
    assert weight.item() == 4.0  # both indicators on: 2 * mask


@pytest.mark.parametrize("detach", [False, True])
def test_a2pr_vae_target_gradient_flag(detach):
    torch.manual_seed(0)
    agent = orl.make_agent("a2pr", OBS, ACT, {"detach_vae_target": detach, "policy_freq": 1, "vae_hidden": [32, 32],
                                              "actor_hidden": [32], "critic_hidden": [32], "value_hidden": [32]})
    decoded = []
    original = agent.nets["vae"].decode
    agent.nets["vae"].decode = lambda obs, z: decoded.append(original(obs, z)) or decoded[-1]
    vae_before = [p.clone() for p in agent.nets["vae"].parameters()]
    batch = make_batch()
    q1 = agent.nets["critic"].q_member(batch.obs, batch.actions, 0).detach()
    agent.actor_step(batch, q1, q1 - 1.0)  # all advantages positive: the BC term is on
    actor_target = decoded[-1]
    # Undetached (official): the VAE's output is part of the actor's graph; detached: it is a constant.
    assert actor_target.requires_grad is (not detach)
    # Either way the actor loss never changes or accumulates into the VAE's parameters.
    assert all(p.grad is None for p in agent.nets["vae"].parameters())
    assert all(torch.equal(a, b) for a, b in zip(vae_before, agent.nets["vae"].parameters()))


def test_a2pr_update_runs_and_targets_move_only_on_actor_steps():
    torch.manual_seed(0)
    agent = orl.make_agent("a2pr", OBS, ACT, {"vae_hidden": [32, 32]})
    target = [p.clone() for p in agent.nets["actor_target"].parameters()]
    metrics = agent.update(make_batch())
    assert "actor_loss" not in metrics
    assert all(torch.equal(a, b) for a, b in zip(target, agent.nets["actor_target"].parameters()))
    metrics = agent.update(make_batch())
    assert "actor_loss" in metrics and all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    assert not all(torch.equal(a, b) for a, b in zip(target, agent.nets["actor_target"].parameters()))


def test_sinusoidal_embedding_values():
    emb = sinusoidal_embedding(torch.tensor([2.0]), dim=6, base=10000.0)
    expected = [np.sin(2.0), np.cos(2.0), np.sin(2.0 / 10000 ** (2 / 6)), np.cos(2.0 / 10000 ** (2 / 6)),
                np.sin(2.0 / 10000 ** (4 / 6)), np.cos(2.0 / 10000 ** (4 / 6))]
    np.testing.assert_allclose(emb[0].numpy(), expected, rtol=1e-6)


def famo2o(name="famo2o_iql", **overrides):
    torch.manual_seed(0)
    return orl.make_agent(name, OBS, ACT, {"beta_lo": 1.0, "beta_hi": 5.0, **overrides})


def test_famo2o_awr_loss_depends_on_beta():
    agent = famo2o()
    batch = make_batch()
    beta = torch.full((len(batch),), 3.0, requires_grad=True)
    advantage = torch.linspace(-1, 1, len(batch))
    agent.nets["actor"].beta = beta.detach()  # the policy input; the weight gets the differentiable beta
    loss, _ = agent.base.actor_loss(batch.obs, batch.actions, advantage, beta)
    (grad,) = torch.autograd.grad(loss, beta)
    assert grad.abs().sum() > 0  # beta enters the weight exp(beta * A), not only the input features


@pytest.mark.parametrize("name", ["famo2o_iql", "famo2o_awac", "famo2o_cql"])
def test_famo2o_balance_step_updates_only_the_balance_model(name):
    agent = famo2o(name)
    frozen_nets = {k: [p.clone() for p in agent.nets[k].parameters()] for k in ("actor", "critic", "critic_target", "value") if k in agent.nets}
    balance_before = [p.clone() for p in agent.nets["balance"].parameters()]
    agent.balance_step(make_batch())
    for key, before in frozen_nets.items():
        assert all(torch.equal(a, b) for a, b in zip(before, agent.nets[key].parameters())), key
        assert all(p.grad is None for p in agent.nets[key].parameters()), key
    assert not all(torch.equal(a, b) for a, b in zip(balance_before, agent.nets["balance"].parameters()))


def test_famo2o_balance_gradient_reaches_balance_model_through_pi_u_and_q():
    agent = famo2o(init_temperature=1e-8)  # isolate the Q term
    loss, _, _ = agent.balance_loss(make_batch())
    grads = torch.autograd.grad(loss, list(agent.nets["balance"].mean.parameters()))
    assert sum(g.abs().sum() for g in grads) > 0


def test_famo2o_beta_range_and_uniform_offline_sampling(monkeypatch):
    agent = famo2o(beta_lo=8.0, beta_hi=14.0)
    obs = torch.randn(5000, 4) * 10
    beta, _ = agent.nets["balance"].sample(obs)
    assert beta.min() >= 8.0 and beta.max() <= 14.0
    det = agent.nets["balance"].deterministic(obs)
    assert det.min() >= 8.0 and det.max() <= 14.0
    seen = []
    original = agent.base.actor_step
    monkeypatch.setattr(agent.base, "actor_step", lambda o, a, adv, b: seen.append(b.clone()) or original(o, a, adv, b))
    assert agent.nets["actor"].actor.net[0].in_features == 4 + 6  # [s, emb(beta)]
    for seed in range(10):
        agent.update(make_batch(n=256, seed=seed))
    offline = torch.cat(seen)
    assert offline.min() >= 8.0 and offline.max() <= 14.0
    counts = torch.histc(offline, bins=6, min=8.0, max=14.0)
    expected = len(offline) / 6
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # chi-square, 5 dof, p = 0.001


def test_famo2o_online_uses_balance_model_betas():
    agent = famo2o()
    agent.on_online_start()
    metrics = agent.update(make_batch())
    assert "hist/beta" in metrics
    restored = famo2o()
    restored.load_state_dict(agent.state_dict())
    assert restored.online and torch.equal(restored.log_temperature, agent.log_temperature)


def test_famo2o_beta_enters_awac_weight_and_cql_q_term():
    batch = make_batch()
    awac = famo2o("famo2o_awac")
    beta = torch.full((len(batch),), 2.0, requires_grad=True)
    awac.nets["actor"].beta = beta.detach()
    loss, _ = awac.base.actor_loss(batch.obs, batch.actions, torch.linspace(-1, 1, len(batch)), beta)
    assert torch.autograd.grad(loss, beta)[0].abs().sum() > 0
    cql = famo2o("famo2o_cql", beta_lo=0.5, beta_hi=1.5)
    cql.nets["actor"].beta = torch.full((len(batch),), 1.0)
    cql.base.q_weight = beta
    torch.manual_seed(0)
    actions, log_prob = cql.nets["actor"].sample(batch.obs)
    q = cql.nets["critic"](batch.obs, actions).min(0).values
    loss = (cql.base.alpha * log_prob - cql.base.q_weight * q).mean()
    assert torch.autograd.grad(loss, beta)[0].abs().sum() > 0
    metrics = cql.update(batch)  # the whole step runs with per-sample betas tiled through CQL's samples
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())


def test_famo2o_cql_refuses_a_calibrated_base():
    """A calibrated base needs Monte-Carlo returns that FamO2O's buffers do not carry: one clear error, not a crash
    at the first update."""
    from orl.errors import ConfigError

    space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    with pytest.raises(ConfigError, match="calibrated"):
        orl.make_agent("famo2o_cql", space, space, {"base": {"calibrated": True}})


@pytest.mark.parametrize("name", ["iql", "famo2o_iql"])
def test_iql_policy_log_std_floor_is_the_official_learners(name):
    """The official learners (IQL's learner.py, FamO2O's family_learner.py) build the policy with log_std_min=-5,
    not policy.py's default -10: a log-std parameter below -5 acts as -5."""
    agent = orl.make_agent(name, OBS, ACT)
    actor = agent.nets["actor"]
    obs = torch.zeros(3, 4)
    if name == "famo2o_iql":  # the universal policy: the base's actor class on [s, emb(beta)]
        actor.beta = torch.full((3,), 2.0)
        obs, actor = actor.condition(obs), actor.actor
    with torch.no_grad():
        actor.log_std.fill_(-8.0)
    torch.testing.assert_close(actor.distribution(obs).stddev, torch.full((3, 2), float(np.exp(-5.0))))
    assert agent.update(make_batch())["actor_log_std"] == pytest.approx(-5.0)  # logged as used


def test_famo2o_iql_updates_the_balance_model_every_step_by_default():
    """Official FamilyLearner: pi_b and its temperature step with every update (orl's earlier default was 5)."""
    agent = famo2o()
    assert agent.cfg.balance_every == 1
    for seed in range(3):
        before = [p.clone() for p in agent.nets["balance"].parameters()]
        agent.update(make_batch(seed=seed))
        assert not all(torch.equal(a, b) for a, b in zip(before, agent.nets["balance"].parameters()))


def test_famo2o_balance_action_is_the_unclamped_sample():
    """The balance loss's a_b ~ pi_u is the Gaussian sample as drawn (official `dist.sample`): clamping it would
    stop dQ/dbeta in every dimension outside [-1, 1]."""
    agent = famo2o()
    actor = agent.nets["actor"]
    with torch.no_grad():
        actor.actor.log_std.fill_(1.0)
    actor.beta = torch.full((2000,), 3.0)
    actions = actor.reparameterized_action(torch.zeros(2000, 4))
    assert actions.abs().max() > 1.5


def test_famo2o_dq_dbeta_metric_is_the_derivative_of_q_along_beta(monkeypatch):
    """The logged balance_dq_dbeta (read from beta's retained gradient, entropy term on) equals the batch mean of
    dQ(s, a(s, beta))/dbeta by central differences (with pi_u's mode as a_b, so the action is a function of beta
    alone); the betas are pi_b's samples of the same step (same seed)."""
    agent = famo2o()
    actor, critic = agent.nets["actor"], agent.balance_critic
    monkeypatch.setattr(type(actor), "reparameterized_action", lambda self, obs, clamp=False: self(obs, True))
    batch = make_batch(n=16)
    torch.manual_seed(3)
    beta = agent.nets["balance"].sample(batch.obs)[0].detach()
    torch.manual_seed(3)
    logged = agent.balance_step(batch)["balance_dq_dbeta"]

    def q_at(b):
        with torch.no_grad():
            actor.beta = b
            return critic(batch.obs, actor(batch.obs, True)).min(0).values.double()

    step = 1e-2
    finite = ((q_at(beta + step) - q_at(beta - step)) / (2 * step)).mean()
    assert logged.abs() > 1e-4
    torch.testing.assert_close(logged.double(), finite, rtol=0.05, atol=1e-4)


@pytest.mark.parametrize("name", ["famo2o_iql", "famo2o_awac", "famo2o_cql"])
def test_famo2o_diagnostics_leave_training_unchanged(name, monkeypatch):
    """The diagnostics' extra forward passes (with dropout in the policy) draw no random numbers and touch no
    weight: a run that computes them every update equals one that computes them once."""
    import orl.agents.famo2o as famo2o_module

    def run(every):
        monkeypatch.setattr(famo2o_module, "DIAGNOSTICS_EVERY", every)
        agent = famo2o(name, **({"base": {"actor_dropout": 0.1}} if name == "famo2o_iql" else {}))
        for seed in range(4):
            agent.update(make_batch(seed=seed))
        agent.on_online_start()
        for seed in range(4, 8):
            agent.update(make_batch(seed=seed))
        return [p.detach().clone() for p in agent.nets.parameters()], torch.rand(3)

    (weights_every, rand_every), (weights_once, rand_once) = run(1), run(10**9)
    assert all(torch.equal(a, b) for a, b in zip(weights_every, weights_once))
    assert torch.equal(rand_every, rand_once)


def test_famo2o_awac_universal_policy_is_awacs():
    """The universal policy takes its base's actor form: for AWAC, CORL's unbounded mean and [-20, 2] log-std, and
    its balance loss scores Q at clamped samples as AWAC does."""
    agent = famo2o("famo2o_awac")
    universal = agent.nets["actor"].actor
    assert not universal.tanh_mean and universal.log_std_bounds == (-20.0, 2.0)
    with torch.no_grad():
        universal.log_std.fill_(1.0)
    agent.nets["actor"].beta = torch.full((500,), 1.0)
    assert agent.nets["actor"].reparameterized_action(torch.zeros(500, 4), agent.clamp_balance_actions).abs().max() <= 1.0


def test_famo2o_logs_the_beta_distribution_and_balance_diagnostics():
    agent = famo2o()
    offline = agent.update(make_batch(n=256))
    assert 1.0 <= offline["beta_q10"] < offline["beta_q50"] < offline["beta_q90"] <= 5.0
    assert abs(offline["beta_q50"] - 3.0) < 0.6  # uniform on [1, 5] offline
    for key in ("balance_beta_mean", "balance_beta_std", "balance_log_std", "balance_q_gap", "balance_dq_dbeta"):
        assert torch.isfinite(offline[key]), key
    obs = make_batch(n=256).obs
    with torch.no_grad():
        agent.nets["balance"].mean[-1].bias.fill_(10.0)  # pi_b's mode at beta_hi everywhere
    assert torch.allclose(agent.balance_diagnostics(obs)["balance_beta_mean"], torch.tensor(5.0))


def test_famo2o_balance_loss_applies_the_universal_policy_without_dropout(monkeypatch):
    """Official family_actor.py applies pi_u with training=False in the balance loss; the AWR step keeps dropout."""
    agent = famo2o(base={"actor_dropout": 0.1})
    modes = []
    original = type(agent.nets["actor"]).reparameterized_action
    monkeypatch.setattr(type(agent.nets["actor"]), "reparameterized_action",
                        lambda self, obs, clamp=False: modes.append(self.actor.training) or original(self, obs, clamp))
    agent.update(make_batch())
    assert modes == [False] and agent.nets["actor"].training
