"""Issue 11: defects found by comparing the control agents with the official code, one test each.

Each test fails on the behaviour before its fix (see the issue for the list).
"""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import orl
from orl.checkpoint import load_checkpoint
from orl.apps.cli import CONFIG_DIR, run_train
from orl.data import OfflineDataset
from orl.nn import EnsembleLinear
from orl.trainer import Trainer
from tests.conftest import load_script, random_pendulum_arrays
from tests.test_nets_and_losses import ACT, OBS, make_batch


def _compose(overrides, config="train"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


def _agent_options(cfg):
    options = OmegaConf.to_container(cfg.agent, resolve=True)
    return options.pop("name"), options


@pytest.fixture
def pendulum_file(tmp_path):
    arrays = random_pendulum_arrays(1200, seed=3)
    path = tmp_path / "pendulum.npz"
    OfflineDataset(arrays["observations"], arrays["actions"], arrays["rewards"], arrays["next_observations"], arrays["terminals"],
                   arrays["timeouts"], env_id="Pendulum-v1", ref_min_score=-1500.0, ref_max_score=-150.0).save(path)
    return path


def _pendulum_reward(obs: np.ndarray, action: np.ndarray) -> np.ndarray:
    """Pendulum-v1's reward from the pre-step observation (cos, sin, velocity) and the torque."""
    angle = np.arctan2(obs[:, 1], obs[:, 0])
    torque = np.clip(action[:, 0], -2.0, 2.0)
    return -(angle**2 + 0.1 * obs[:, 2] ** 2 + 0.001 * torque**2)


# --- 1. one reward transform for offline data, online transitions and MC returns -----------------
def test_mix_batches_carry_one_reward_transform(tmp_path, pendulum_file, monkeypatch):
    seen = []
    original = Trainer._online_batch

    def record(trainer):
        batch = original(trainer)
        seen.append((batch, trainer))
        return batch

    monkeypatch.setattr(Trainer, "_online_batch", record)
    common = [f"dataset={pendulum_file}", "agent=sac", "device=cpu", "log.progress=false", "log.tensorboard=false", "eval.every=0",
              "data.reward=scale_shift", "data.reward_scale=3.0", "data.reward_shift=-2.0", "online.buffer_mode=mix"]
    run_train(_compose(common + ["steps=5", "online.steps=260", f"run_dir={tmp_path / 'a'}"]))
    batch, trainer = seen[-1]
    n_offline = len(batch) // 2
    assert n_offline > 0 and len(batch) - n_offline > 0
    mean, std = trainer.agent.obs_mean.numpy(), trainer.agent.obs_std.numpy()
    raw = _pendulum_reward(batch.obs.numpy() * std + mean, batch.actions.numpy())
    # Offline rows (first half) and online rows (second half): the same 3 r - 2 of the env's reward.
    np.testing.assert_allclose(batch.rewards[:n_offline].numpy(), 3.0 * raw[:n_offline] - 2.0, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(batch.rewards[n_offline:].numpy(), 3.0 * raw[n_offline:] - 2.0, rtol=1e-4, atol=1e-3)
    # The transform is saved with the run, at the switch and in the latest checkpoint.
    for name in ("offline.pt", "checkpoint.pt"):
        assert load_checkpoint(tmp_path / "a" / name)["reward_transform"] == {"scale": 3.0, "shift": -2.0, "kind": "scale_shift"}
    # A fine-tuning run from it applies the saved transform even if its own data.reward says otherwise.
    seen.clear()
    finetune = [f"dataset={pendulum_file}", "agent=sac", "device=cpu", "log.progress=false", "log.tensorboard=false", "eval.every=0",
                "data.reward=raw", "online.buffer_mode=mix", "online.steps=210", f"init_from={tmp_path / 'a'}", f"run_dir={tmp_path / 'b'}"]
    run_train(_compose(finetune))
    batch, trainer = seen[-1]
    assert trainer.reward_transform.scale == 3.0 and trainer.reward_transform.shift == -2.0
    raw = _pendulum_reward(batch.obs.numpy() * std + mean, batch.actions.numpy())
    np.testing.assert_allclose(batch.rewards.numpy(), 3.0 * raw - 2.0, rtol=1e-4, atol=1e-3)


def test_online_mc_returns_use_transformed_rewards(tmp_path):
    from orl.data import RewardTransform

    env = gym.make("Pendulum-v1")
    agent = orl.make_agent("calql", env.observation_space, env.action_space, {"discount": 0.9, "cql_n_actions": 2})
    cfg = orl.trainer.TrainerConfig(offline_steps=0, online_steps=200, eval_every=0, progress=False, tensorboard=False, online_capacity=1000)
    trainer = Trainer(agent, tmp_path, cfg, env_fn=lambda: gym.make("Pendulum-v1"), reward_transform=RewardTransform(10.0, 5.0, "scale_shift"))
    trainer.train()
    stored = trainer.online.storage["rewards"][:200].double().numpy()
    raw = trainer.episode_returns[0]
    assert stored.sum() == pytest.approx(10.0 * raw + 5.0 * 200, rel=1e-5)  # stored = 10 r + 5, returns logged raw
    expected = np.array([sum(0.9**k * r for k, r in enumerate(stored[t:])) for t in range(200)])
    np.testing.assert_allclose(trainer.online.storage["returns_to_go"][:200].numpy(), expected, rtol=1e-4)


def test_resume_refuses_a_different_reward_transform(tmp_path):
    from orl.data import RewardTransform

    env = gym.make("Pendulum-v1")
    agent = orl.make_agent("sac", env.observation_space, env.action_space)
    cfg = orl.trainer.TrainerConfig(offline_steps=0, online_steps=200, eval_every=0, progress=False, tensorboard=False, learning_starts=150)
    Trainer(agent, tmp_path, cfg, env_fn=lambda: gym.make("Pendulum-v1"), reward_transform=RewardTransform(2.0, 0.0)).train()
    cfg.online_steps = 400
    with pytest.raises(ValueError, match="reward transform"):
        Trainer(agent, tmp_path, cfg, env_fn=lambda: gym.make("Pendulum-v1")).train(resume=True)


# --- 2. WSRL pre-training is one critic step on batch 256 ----------------------------------------
def test_wsrl_pretraining_does_not_split_batches():
    name, options = _agent_options(_compose(["agent=wsrl"], "finetune"))
    torch.manual_seed(0)
    agent = orl.make_agent(name, OBS, ACT, options)
    calls = []
    original = agent.critic_step
    agent.critic_step = lambda batch: calls.append(len(batch)) or original(batch)
    batch = make_batch(n=256)
    agent.update(batch)
    assert calls == [256]  # offline: one update on the whole batch
    calls.clear()
    agent.on_online_start()
    batch = make_batch(n=1024)
    batch.returns_to_go = None
    agent.update(batch)
    assert calls == [256, 256, 256, 256]  # online: the high-UTD split


def test_bench_updates_times_the_wsrl_recipe():
    bench = load_script("bench_updates")
    cfg = _compose(["agent=wsrl"], "finetune")
    name, options = _agent_options(cfg)
    assert bench.RECIPES["wsrl_pretrain"] == (name, options, 256, False)
    assert bench.RECIPES["wsrl_online"] == (name, options, cfg.online.online_batch_size, True)


# --- 3. IQL's schedule ends at its floor and is off for runs with an online phase ----------------
def test_iql_cosine_schedule_ends_at_zero_and_stays():
    agent = orl.make_agent("iql", OBS, ACT, {"actor_lr_decay_steps": 10})
    optimizer, scheduler = agent.optimizers["actor"], agent.schedulers["actor"]
    rates = []
    for _ in range(30):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[4] == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert rates[9] == pytest.approx(0.0, abs=1e-12) and max(rates[9:]) == pytest.approx(0.0, abs=1e-12)  # never climbs back


def test_iql_schedule_defaults():
    offline = _compose(["agent=iql", "steps=30000"])
    assert offline.agent.cosine_actor_lr is True and offline.agent.actor_lr_decay_steps == 1_000_000  # not the run length
    online = _compose(["agent=iql", "online.steps=1000"])
    assert online.agent.cosine_actor_lr is False  # official fine-tuning: opt_decay_schedule = None
    assert _compose(["agent=iql"], "finetune").agent.cosine_actor_lr is False


def test_init_from_a_decayed_optimizer_keeps_the_configured_rate():
    decayed = orl.make_agent("iql", OBS, ACT, {"actor_lr_decay_steps": 5})
    for _ in range(5):
        decayed.update(make_batch())
    assert decayed.optimizers["actor"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    fine_tune = orl.make_agent("iql", OBS, ACT, {"cosine_actor_lr": False})
    fine_tune.load_state_dict(decayed.state_dict())
    assert fine_tune.optimizers["actor"].param_groups[0]["lr"] == pytest.approx(3e-4)
    resumed = orl.make_agent("iql", OBS, ACT, {"actor_lr_decay_steps": 5})
    resumed.load_state_dict(decayed.state_dict())  # exact resume keeps the schedule's position
    assert resumed.optimizers["actor"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


# --- 4. CQL / Cal-QL defaults ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cql", "calql"])
def test_cql_defaults_follow_the_official_configs(name):
    agent_name, options = _agent_options(_compose([f"agent={name}"]))
    for agent in (orl.make_agent(agent_name, OBS, ACT, options), orl.make_agent(agent_name, OBS, ACT)):
        assert agent.cfg.max_target_backup and agent.max_backup
        assert agent.optimizers["alpha"].param_groups[0]["lr"] == pytest.approx(1e-4)


# --- 5. the CQL penalty on a 10-member ensemble touches only the 2 sub-sampled members -------------
def _penalty_grads(agent, batch, cql_alpha):
    agent.cfg.cql_alpha = cql_alpha
    torch.manual_seed(7)
    agent.critic_step(batch)
    return agent.nets["critic"].net.net[0].weight.grad.clone()  # (E, in, hidden)


def test_cql_penalty_only_on_subsampled_members(monkeypatch):
    torch.manual_seed(0)
    options = {"ensemble_size": 10, "target_subsample": 2, "cql_n_actions": 3, "critic_lr": 0.0}
    agent = orl.make_agent("cql", OBS, ACT, options)
    monkeypatch.setattr(agent, "penalized_members", lambda: torch.tensor([3, 7]))
    batch = make_batch(n=16)
    difference = (_penalty_grads(agent, batch, 5.0) - _penalty_grads(agent, batch, 0.0)).abs().flatten(1).sum(1)
    assert difference[3] > 0 and difference[7] > 0
    assert torch.all(difference[[0, 1, 2, 4, 5, 6, 8, 9]] == 0)
    # The named option keeps the penalty on every member.
    every = orl.make_agent("cql", OBS, ACT, {**options, "cql_penalty_members": "all"})
    assert every.penalized_members() is None
    q = every.nets["critic"](batch.obs, batch.actions)
    assert every.conservative_penalty(batch, q)[0].shape == (10,)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_critic_member_subset_equals_indexed_full_pass(precision):
    from orl.nn import Critic, set_precision

    torch.manual_seed(0)
    critic = Critic(4, 2, ensemble_size=10, hidden=(16, 16), layer_norm=True)
    set_precision(critic, precision)
    obs, actions = torch.randn(12, 4), torch.rand(12, 2) * 2 - 1
    members = torch.tensor([3, 3, 8])
    torch.testing.assert_close(critic(obs, actions, members), critic(obs, actions)[members])


def test_cql_penalty_members_drawn_from_the_ensemble():
    agent = orl.make_agent("cql", OBS, ACT, {"ensemble_size": 10, "target_subsample": 2})
    draws = torch.stack([agent.penalized_members() for _ in range(200)])
    assert draws.shape == (200, 2) and draws.min() >= 0 and draws.max() <= 9 and len(draws.unique()) == 10


# --- 6. importance-sampling density of uniform actions: the unit box -------------------------------
def test_uniform_action_density_is_the_unit_box():
    wide = gym.spaces.Box(-2.0, 2.0, (3,), np.float32)
    torch.manual_seed(0)
    agent = orl.make_agent("cql", OBS, wide, {"cql_n_actions": 4})
    batch = make_batch(n=8, action_dim=3)
    q_data = agent.nets["critic"](batch.obs, batch.actions)
    torch.manual_seed(1)
    got = agent.conservative_penalty(batch, q_data)[0]
    torch.manual_seed(1)
    n, size = 4, 8
    obs = batch.obs.repeat(n, 1)
    random_actions = torch.empty(n * size, 3).uniform_(-2.0, 2.0)
    policy_actions, policy_log_prob = agent.nets["actor"].sample(obs)
    next_actions, next_log_prob = agent.nets["actor"].sample(batch.next_obs.repeat(n, 1))
    q = agent.nets["critic"](obs.repeat(3, 1), torch.cat([random_actions, policy_actions, next_actions])).view(-1, 3, n, size)
    terms = torch.cat([q[:, 0] - 3 * math.log(0.5), q[:, 1] - policy_log_prob.view(1, n, size), q[:, 2] - next_log_prob.view(1, n, size)], 1)
    expected = (torch.logsumexp(terms, 1) - q_data).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --- 7. final_layer_scale re-initializes the last hidden layer, not the heads ----------------------
def test_final_layer_scale_is_on_the_last_hidden_layer():
    torch.manual_seed(0)
    agent = orl.make_agent("sac", OBS, ACT, {"final_layer_scale": 0.01, "ensemble_size": 10, "layer_norm": True})
    bound = math.sqrt(3 * 0.01 / 256)
    for net in (agent.nets["actor"], agent.nets["critic"]):
        linears = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, EnsembleLinear))]
        hidden, head = linears[-2], linears[-1]
        assert hidden.weight.abs().max() <= bound and hidden.weight.abs().max() > 0.5 * bound
        assert torch.all(hidden.bias == 0)
        # The head keeps PyTorch's default init: U(-1/sqrt(256), 1/sqrt(256)).
        assert head.weight.abs().max() > 0.5 / math.sqrt(256)


def _assert_orthogonal(weight: torch.Tensor, gain: float) -> None:
    """Semi-orthogonal times gain: the smaller Gram matrix is gain^2 I."""
    gram = weight @ weight.T if weight.shape[0] <= weight.shape[1] else weight.T @ weight
    torch.testing.assert_close(gram / gain**2, torch.eye(gram.shape[0]), rtol=0, atol=1e-4)


def _kernels(net):
    """Every layer's weights, each ensemble member on its own."""
    out = []
    for layer in net.modules():
        if isinstance(layer, torch.nn.Linear):
            out.append([(layer.weight.detach(), layer.bias.detach())])
        elif isinstance(layer, EnsembleLinear):
            assert not torch.equal(layer.weight[0], layer.weight[1])  # every member its own draw
            out.append(list(zip(layer.weight.detach(), layer.bias.detach())))
    return out


# --- 7b. Cal-QL builds JaxCQL's networks; WSRL's recipe builds WSRL's ---------------------------------
def test_calql_networks_are_the_official_jaxcql_ones():
    """nakamotoo/Cal-QL runs JaxCQL with orthogonal_init=True: hidden kernels orthogonal(sqrt 2), heads
    orthogonal(1e-2), zero biases; the policy's log-std is m * raw + b (learnt, init 1 and -1), clipped to [-20, 2]."""
    torch.manual_seed(0)
    agent = orl.make_agent("calql", OBS, ACT)
    for net in (agent.nets["actor"], agent.nets["critic"]):
        *hidden, head = _kernels(net)
        for members, gain in [(m, math.sqrt(2)) for m in hidden] + [(head, 1e-2)]:
            for weight, bias in members:
                _assert_orthogonal(weight, gain)
                assert torch.all(bias == 0)
    actor = agent.nets["actor"]
    assert actor.log_std_bounds == (-20.0, 2.0)
    assert actor.log_std_multiplier.item() == 1.0 and actor.log_std_offset.item() == -1.0
    obs = torch.randn(512, 4)
    _, log_std = actor._mean_log_std(obs)
    assert (log_std + 1.0).abs().max() < 0.2  # std e^-1 at the start: the offset, with a 1e-2 head
    # m and b are the actor's parameters (the actor's optimizer steps them) and take the policy loss's gradient
    assert {id(actor.log_std_multiplier), id(actor.log_std_offset)} <= {id(p) for g in agent.optimizers["actor"].param_groups for p in g["params"]}
    _, log_prob = actor.sample(obs)
    log_prob.mean().backward()
    assert actor.log_std_offset.grad.abs() > 0 and actor.log_std_multiplier.grad.abs() > 0
    with torch.no_grad():
        actor.log_std_offset.fill_(-30.0)
    assert torch.all(actor._mean_log_std(obs)[1] == -20.0)
    with pytest.raises(ValueError, match="orthogonal_init"):
        orl.make_agent("sac", OBS, ACT, {"head_scale": 0.01})


def test_wsrl_recipe_networks_are_the_official_wsrl_ones():
    """zhouzypaul/wsrl leaves kernel_init_type unset (orthogonal): hidden orthogonal(sqrt 2), the last hidden
    layer orthogonal(kernel_scale_final = 1e-2), heads orthogonal(sqrt 2), zero biases; std clipped to [1e-5, 10];
    the critic's members share one Dense(1) head (only the MLP backbone is ensemblized); flax's LayerNorm eps 1e-6."""
    torch.manual_seed(0)
    agent_cfg = OmegaConf.to_container(_compose(["agent=wsrl"]).agent)
    assert agent_cfg.pop("name") == "cql"
    agent = orl.make_agent("cql", OBS, ACT, agent_cfg)
    for net in (agent.nets["actor"], agent.nets["critic"]):
        layers = _kernels(net)
        gains = [math.sqrt(2)] * (len(layers) - 2) + [1e-2, math.sqrt(2)]
        for depth, (members, gain) in enumerate(zip(layers, gains)):
            is_head = depth == len(layers) - 1
            assert len(members) == (10 if net is agent.nets["critic"] and not is_head else 1)
            for weight, bias in members:
                _assert_orthogonal(weight, gain)
                assert torch.all(bias == 0)
    low, high = agent.nets["actor"].log_std_bounds
    assert math.exp(low) == pytest.approx(1e-5, rel=1e-5) and math.exp(high) == pytest.approx(10.0, rel=1e-5)
    assert not hasattr(agent.nets["actor"], "log_std_offset")  # WSRL's "exp" parameterization has no affine
    # the shared head: every member's Q is the same linear function of its own features
    critic = agent.nets["critic"]
    head = critic.net.net[-1]
    assert isinstance(head, torch.nn.Linear) and head.weight.shape == (1, 256)
    obs, act = torch.randn(8, 4), torch.rand(8, 2) * 2 - 1
    features = critic.net.net[:-1](torch.cat([obs, act], -1))  # (10, 8, 256)
    torch.testing.assert_close(critic(obs, act), (features @ head.weight.T + head.bias).squeeze(-1))
    torch.testing.assert_close(critic(obs, act, torch.tensor([3, 7])), critic(obs, act)[[3, 7]])
    torch.testing.assert_close(critic.q_member(obs, act, 5), critic(obs, act)[5])
    norms = [m for m in list(critic.modules()) + list(agent.nets["actor"].modules()) if "LayerNorm" in type(m).__name__]
    assert norms and all(m.eps == 1e-6 for m in norms)


def test_famo2o_cql_policies_have_jaxcqls_log_std_and_the_bases_init():
    """FamO2O jax_cql: the universal policy's log-std is m * raw + b from (1, -1), clipped to [-20, 2]
    (FamilyTanhGaussianPolicy); an orthogonal init asked of the base reaches the universal policy too."""
    actor = orl.make_agent("famo2o_cql", OBS, ACT).nets["actor"].actor
    assert actor.log_std_bounds == (-20.0, 2.0) and actor.log_std_offset.item() == -1.0
    agent = orl.make_agent("famo2o_cql", OBS, ACT, {"base": {"orthogonal_init": True, "head_scale": 0.01}})
    *hidden, head = _kernels(agent.nets["actor"].actor)
    for weight, _ in [m for members in hidden for m in members]:
        _assert_orthogonal(weight, math.sqrt(2))
    _assert_orthogonal(head[0][0], 1e-2)


# --- 8. FamO2O-CQL: actions at s' are conditioned on the balance model's beta ----------------------
def test_famo2o_cql_next_actions_use_the_balance_beta(monkeypatch):
    from orl.agents.famo2o import ConditionedActor

    torch.manual_seed(0)
    agent = orl.make_agent("famo2o_cql", OBS, ACT, {"base": {"cql_n_actions": 2}})
    balance_draws = []
    balance_sample = agent.nets["balance"].sample

    def draw(obs):
        beta, log_prob = balance_sample(obs)
        balance_draws.append(beta.detach().clone())
        return beta, log_prob

    monkeypatch.setattr(agent.nets["balance"], "sample", draw)
    calls = []
    original = ConditionedActor.sample

    def record(actor, obs):
        calls.append((obs.clone(), actor.beta.clone()))
        return original(actor, obs)

    monkeypatch.setattr(ConditionedActor, "sample", record)
    batch = make_batch(n=8)
    agent.update(batch)  # offline: uniform betas for the actor loss and the CQL term's actions at s
    next_calls = [beta for obs, beta in calls if torch.equal(obs[:8], batch.next_obs)]
    obs_calls = [beta for obs, beta in calls if torch.equal(obs[:8], batch.obs)]
    assert len(next_calls) == 2 and len(obs_calls) == 2  # TD target + CQL at s'; CQL at s + actor loss
    balance_beta = balance_draws[0]  # drawn at s before the base update
    assert all(torch.equal(beta.view(-1)[:8], balance_beta) for beta in next_calls)
    assert all(not torch.equal(beta.view(-1)[:8], balance_beta) for beta in obs_calls)


def test_awac_networks_are_corls():
    """CORL's algorithms/offline/awac.py: three hidden layers of 256 (actor and critics); the policy mean is the MLP's
    output, not tanh-bounded; the log-std parameter is clamped to [-20, 2]; sampled actions are clamped to [-1, 1]."""
    agent = orl.make_agent("awac", OBS, ACT)
    actor = agent.nets["actor"]
    linear = [m for m in actor.net.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linear] == [256, 256, 256, ACT.shape[0]]
    assert sum(isinstance(m, EnsembleLinear) for m in agent.nets["critic"].modules()) == 4
    with torch.no_grad():
        linear[-1].bias.fill_(3.0)
        actor.log_std.fill_(-30.0)
    obs = torch.zeros(2, OBS.shape[0])
    assert torch.all(actor.distribution(obs).mean > 2.5)  # unbounded mean
    torch.testing.assert_close(actor.distribution(obs).stddev, torch.full((2, ACT.shape[0]), math.exp(-20.0)))
    assert torch.all(actor(obs, deterministic=False) <= 1.0)
