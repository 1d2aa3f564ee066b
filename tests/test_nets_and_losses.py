import gymnasium as gym
import numpy as np
import pytest
import torch

import orl
from orl.agents.iql import awr_weights, expectile_loss
from orl.agents.td3bc import td3bc_lambda
from orl.buffer import Batch
from torch.nn import functional as F

from orl.nn import Critic, EnsembleMLP, LayerStack, TanhGaussianActor, frozen, mlp, set_precision, soft_update

OBS = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
ACT = gym.spaces.Box(-1, 1, (2,), np.float32)


def make_batch(n=32, obs_dim=4, action_dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, obs_dim, generator=g), torch.rand(n, action_dim, generator=g) * 2 - 1, torch.randn(n, generator=g),
                 torch.randn(n, obs_dim, generator=g), torch.zeros(n), returns_to_go=torch.randn(n, generator=g))


def test_expectile_loss_known_values():
    diff = torch.tensor([2.0, -2.0, 1.0, -1.0])
    # 0.7 * (4 + 1) + 0.3 * (4 + 1) over 4 entries
    assert expectile_loss(diff, 0.7).item() == pytest.approx((0.7 * 5 + 0.3 * 5) / 4)
    assert expectile_loss(torch.tensor([1.0]), 0.9).item() == pytest.approx(0.9)
    assert expectile_loss(torch.tensor([-1.0]), 0.9).item() == pytest.approx(0.1)


def test_td3bc_lambda_normalizes_by_mean_abs_q():
    q = torch.tensor([2.0, -4.0, 6.0], requires_grad=True)
    lam = td3bc_lambda(q, 2.5)
    assert lam.item() == pytest.approx(2.5 / 4.0)
    assert not lam.requires_grad  # detached: only rescales the Q term


def test_iql_weights_clip_at_100():
    advantage = torch.tensor([-1.0, 0.0, 1.0, 10.0])
    weights = awr_weights(advantage, 3.0, 100.0)
    np.testing.assert_allclose(weights.numpy(), [np.exp(-3.0), 1.0, np.exp(3.0), 100.0], rtol=1e-6)


def test_ensemble_members_are_independent_networks():
    torch.manual_seed(0)
    ens = EnsembleMLP(5, 1, ensemble_size=3, hidden=(8, 8))
    x = torch.randn(10, 5)
    out = ens(x)
    assert out.shape == (3, 10, 1)
    # Member i equals a plain MLP built from slice i of the stacked weights.
    for i in range(3):
        ref = x
        linear_layers = [m for m in ens.net if hasattr(m, "weight")]
        for j, layer in enumerate(linear_layers):
            ref = ref @ layer.weight[i] + layer.bias[i]
            if j < len(linear_layers) - 1:
                ref = torch.relu(ref)
        torch.testing.assert_close(out[i], ref)
        torch.testing.assert_close(ens.forward_member(x, i), ref)
    # A loss on member 0 leaves the gradient of the other members at zero.
    ens(x)[0].sum().backward()
    grad = [m for m in ens.net if hasattr(m, "weight")][0].weight.grad
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_frozen_lets_gradient_reach_inputs_only():
    critic = Critic(4, 2, 2, (16,))
    action = torch.zeros(3, 2, requires_grad=True)
    with frozen(critic):
        critic(torch.randn(3, 4), action).sum().backward()
    assert action.grad is not None and action.grad.abs().sum() > 0
    assert all(p.grad is None for p in critic.parameters())
    assert all(p.requires_grad for p in critic.parameters())  # restored afterwards


def test_soft_update():
    a, b = mlp(3, 1, (4,)), mlp(3, 1, (4,))
    before = [p.clone() for p in a.parameters()]
    soft_update(a, b, 0.25)
    for p_new, p_old, p_src in zip(a.parameters(), before, b.parameters()):
        torch.testing.assert_close(p_new, 0.75 * p_old + 0.25 * p_src)


def test_tanh_gaussian_log_prob_matches_sample():
    torch.manual_seed(0)
    actor = TanhGaussianActor(4, 2, (16,), max_action=2.0)
    obs = torch.randn(64, 4)
    actions, log_prob = actor.sample(obs)
    assert actions.abs().max() <= 2.0
    torch.testing.assert_close(actor.log_prob(obs, actions), log_prob, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["bc", "td3bc", "iql", "sac", "cql", "calql", "awac", "a2pr", "famo2o_iql", "famo2o_awac", "famo2o_cql"])
def test_agents_update_act_and_roundtrip_state(name):
    torch.manual_seed(0)
    agent = orl.make_agent(name, OBS, ACT)
    batch = make_batch()
    for _ in range(4):
        metrics = agent.update(batch)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    action = agent.act(np.zeros(4, np.float32))
    assert action.shape == (2,) and np.all(np.abs(action) <= 1.0)
    clone = orl.make_agent(name, OBS, ACT)
    clone.load_state_dict(agent.state_dict())
    obs = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(clone.act(obs), agent.act(obs))
    assert clone.step == agent.step


def test_make_agent_rejects_unknown_options_and_names():
    with pytest.raises(ValueError, match="unknown option"):
        orl.make_agent("iql", OBS, ACT, {"expectilee": 0.7})
    with pytest.raises(ValueError, match="unknown agent"):
        orl.make_agent("nope", OBS, ACT)


def test_iql_update_order_uses_updated_value_for_q_target():
    torch.manual_seed(0)
    agent = orl.make_agent("iql", OBS, ACT, {"discount": 0.5})
    batch = make_batch()
    value_before = agent.nets["value"](batch.next_obs).detach()
    agent.update(batch)
    # The critic regressed toward r + gamma * V_new(s'); V changed during the same update.
    assert not torch.allclose(agent.nets["value"](batch.next_obs), value_before)


def test_td3bc_targets_move_only_on_actor_steps():
    torch.manual_seed(0)
    agent = orl.make_agent("td3bc", OBS, ACT)
    target = [p.clone() for p in agent.nets["critic_target"].parameters()]
    agent.update(make_batch())  # step 1: critic only
    assert all(torch.equal(a, b) for a, b in zip(target, agent.nets["critic_target"].parameters()))
    agent.update(make_batch())  # step 2: actor + targets
    assert not all(torch.equal(a, b) for a, b in zip(target, agent.nets["critic_target"].parameters()))


def test_bf16_hidden_layers_keep_fp32_heads_weights_and_values():
    """precision=bf16: hidden matmuls in bfloat16, but Q-values, weights and gradients stay fp32 and close to fp32's."""
    torch.manual_seed(0)
    critic = Critic(4, 2, ensemble_size=3, layer_norm=True)
    reference = Critic(4, 2, ensemble_size=3, layer_norm=True)
    reference.load_state_dict(critic.state_dict())
    keys = set(critic.state_dict())
    set_precision(critic, "bf16")
    assert set(critic.state_dict()) == keys  # checkpoints load across precisions
    obs, action = torch.randn(64, 4), torch.rand(64, 2) * 2 - 1
    q, q_ref = critic(obs, action), reference(obs, action)
    assert q.dtype == torch.float32 and q.shape == (3, 64)
    assert not torch.equal(q, q_ref)  # the bf16 path really ran
    assert torch.allclose(q, q_ref, atol=2e-2 * q_ref.abs().max().item() + 1e-3)
    q.sum().backward()
    reference(obs, action).sum().backward()
    for (name, p), p_ref in zip(critic.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32 and p.dtype == torch.float32, name
        cosine = F.cosine_similarity(p.grad.flatten(), p_ref.grad.flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)
    set_precision(critic, "fp32")
    assert torch.equal(critic(obs, action), reference(obs, action))
    with pytest.raises(ValueError, match="precision"):
        set_precision(critic, "fp16")


def test_make_agent_precision_applies_to_every_mlp():
    agent = orl.make_agent("cql", OBS, ACT, precision="bf16")
    stacks = [m for m in agent.nets.modules() if isinstance(m, LayerStack)]
    assert stacks and all(m.bf16_hidden for m in stacks)
    batch = make_batch()
    metrics = agent.update(batch)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_gaussian_actor_log_std_is_clipped_as_the_official_iql_policy():
    """LOG_STD_MIN = -10, LOG_STD_MAX = 2 in ikostrikov/implicit_q_learning policy.py (orl clipped at -20)."""
    import math

    from orl.nn import GaussianActor

    actor = GaussianActor(3, 2, (8,))
    obs, action = torch.zeros(1, 3), torch.full((1, 2), 0.01)
    with torch.no_grad():
        actor.log_std.copy_(torch.tensor([-15.0, 5.0]))
    std = actor.distribution(obs).stddev[0]
    assert std.tolist() == pytest.approx([math.exp(-10.0), math.exp(2.0)], rel=1e-5)
    mean = actor.distribution(obs).mean
    expected = torch.distributions.Normal(mean, torch.tensor([math.exp(-10.0), math.exp(2.0)])).log_prob(action).sum(-1)
    torch.testing.assert_close(actor.log_prob(obs, action), expected)


def test_iql_actor_starts_at_std_one_unless_told():
    """Official IQL initializes the log-std parameter to 0; agent.actor_init_log_std sets another start (d3rlpy: -1.5)."""
    import math

    from orl import make_agent

    obs_space = gym.spaces.Box(-1.0, 1.0, (3,))
    action_space = gym.spaces.Box(-1.0, 1.0, (2,))
    official = make_agent("iql", obs_space, action_space)
    assert official.nets["actor"].distribution(torch.zeros(1, 3)).stddev.tolist() == [[1.0, 1.0]]
    narrow = make_agent("iql", obs_space, action_space, {"actor_init_log_std": -1.5})
    assert narrow.nets["actor"].distribution(torch.zeros(1, 3)).stddev[0].tolist() == pytest.approx([math.exp(-1.5)] * 2)
    family = make_agent("famo2o_iql", obs_space, action_space, {"base": {"actor_init_log_std": -1.5}})
    family.nets["actor"].beta = torch.ones(1)
    assert family.nets["actor"].actor.distribution(torch.zeros(1, 3 + 6)).stddev[0].tolist() == pytest.approx([math.exp(-1.5)] * 2)
