"""Offline-to-online machinery (issue 4): Cal-QL bound, warmup, MC returns online, handoff via the CLI."""
import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import orl
from orl.checkpoint import load_checkpoint
from orl.apps.cli import CONFIG_DIR, run_train
from orl.logger import read_metrics
from orl.trainer import Trainer, TrainerConfig
from tests.test_nets_and_losses import ACT, OBS, make_batch


def _penalty(agent, batch, seed=0):
    torch.manual_seed(seed)
    q = agent.nets["critic"](batch.obs, batch.actions)
    return agent.conservative_penalty(batch, q)[0]


def test_calql_bound_touches_only_policy_actions():
    torch.manual_seed(0)
    # CQL with Cal-QL's networks (JaxCQL's), so the only difference left is the calibration
    networks = {"orthogonal_init": True, "head_scale": 0.01, "actor_log_std_bounds": (-20.0, 2.0), "actor_log_std_offset": -1.0}
    cql = orl.make_agent("cql", OBS, ACT, {"cql_n_actions": 4, **networks})
    calql = orl.make_agent("calql", OBS, ACT, {"cql_n_actions": 4})
    calql.nets.load_state_dict(cql.nets.state_dict())
    batch = make_batch(n=8)
    # A bound below every Q changes nothing.
    batch.returns_to_go = torch.full((8,), -1e6)
    torch.testing.assert_close(_penalty(calql, batch), _penalty(cql, batch))
    # A high bound replaces policy-action Qs only; recompute the expected LSE from the same samples.
    bound = 50.0
    batch.returns_to_go = torch.full((8,), bound)
    got = _penalty(calql, batch)
    torch.manual_seed(0)
    n, size = 4, 8
    obs = batch.obs.repeat(n, 1)
    random_actions = torch.empty(n * size, 2).uniform_(-1, 1)
    _, policy_log_prob = calql.nets["actor"].sample(obs)
    _, next_log_prob = calql.nets["actor"].sample(batch.next_obs.repeat(n, 1))
    q_random = calql.nets["critic"](obs, random_actions).view(-1, n, size)
    q_data = calql.nets["critic"](batch.obs, batch.actions)
    terms = torch.cat([q_random - 2 * math.log(0.5), bound - policy_log_prob.view(1, n, size).expand(2, n, size),
                       bound - next_log_prob.view(1, n, size).expand(2, n, size)], 1)
    expected = (torch.logsumexp(terms, 1) - q_data).mean(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (q_random < bound).all()  # the uniform-action Qs were below the bound and stayed unbounded


def test_warmup_uses_pretrained_policy_and_makes_no_update(tmp_path, monkeypatch):
    env = gym.make("Pendulum-v1")
    agent = orl.make_agent("sac", env.observation_space, env.action_space)
    calls = {"update": 0, "stochastic_act": 0, "random": 0}
    monkeypatch.setattr(agent, "update", lambda batch: calls.__setitem__("update", calls["update"] + 1) or {})
    original_act = agent.act
    def act(obs, deterministic=True):
        calls["stochastic_act"] += not deterministic
        return original_act(obs, deterministic)
    monkeypatch.setattr(agent, "act", act)
    monkeypatch.setattr(gym.spaces.Box, "sample", lambda self, *a, **k: calls.__setitem__("random", calls["random"] + 1))
    cfg = TrainerConfig(offline_steps=0, online_steps=300, warmup_steps=300, eval_every=0, progress=False, tensorboard=False)
    Trainer(agent, tmp_path, cfg, env_fn=lambda: gym.make("Pendulum-v1")).train()
    assert calls == {"update": 0, "stochastic_act": 300, "random": 0}
    cfg = TrainerConfig(offline_steps=0, online_steps=310, warmup_steps=300, eval_every=0, progress=False, tensorboard=False)
    Trainer(agent, tmp_path / "b", cfg, env_fn=lambda: gym.make("Pendulum-v1")).train()
    assert calls["update"] == 10  # updates start after the warmup transitions are in


def test_online_mc_returns_written_when_episode_ends(tmp_path):
    env = gym.make("Pendulum-v1")
    agent = orl.make_agent("calql", env.observation_space, env.action_space, {"discount": 0.9, "cql_n_actions": 2})
    cfg = TrainerConfig(offline_steps=0, online_steps=250, eval_every=0, progress=False, tensorboard=False, online_capacity=1000)
    trainer = Trainer(agent, tmp_path, cfg, env_fn=lambda: gym.make("Pendulum-v1"))
    trainer.train()
    rewards = trainer.online.storage["rewards"][:200].double().numpy()
    expected = np.array([sum(0.9 ** k * r for k, r in enumerate(rewards[t:])) for t in range(200)])
    np.testing.assert_allclose(trainer.online.storage["returns_to_go"][:200].numpy(), expected, rtol=1e-4)
    assert trainer._completed == 200  # the unfinished second episode is never sampled
    assert trainer.online.storage["returns_to_go"][200:250].abs().sum() == 0


def test_online_mc_returns_of_failed_sparse_episodes(tmp_path):
    class AlwaysFail(gym.Wrapper):
        def step(self, action):
            obs, _, terminated, truncated, info = self.env.step(action)
            return obs, -5.0, terminated, truncated, info

    make = lambda: AlwaysFail(gym.make("Pendulum-v1"))  # noqa: E731
    env = make()
    agent = orl.make_agent("calql", env.observation_space, env.action_space, {"discount": 0.9, "cql_n_actions": 2, "failure_reward": -5.0})
    cfg = TrainerConfig(offline_steps=0, online_steps=201, eval_every=0, progress=False, tensorboard=False, online_capacity=1000)
    trainer = Trainer(agent, tmp_path, cfg, env_fn=make)
    trainer.train()
    torch.testing.assert_close(trainer.online.storage["returns_to_go"][:200], torch.full((200,), -50.0))


def _compose(overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="finetune", overrides=overrides)


def test_finetune_handoff_restores_whole_agent_state(tmp_path, pendulum_collection, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", pendulum_collection["minari_root"])
    dataset = pendulum_collection["ids"]["medium"]
    common = [f"dataset={dataset}", "agent=iql", "device=cpu", "log.progress=false", "eval.episodes=1", "log.every=10"]
    run_train(_compose(common + ["steps=50", "online.steps=0", "eval.every=50", f"run_dir={tmp_path / 'offline'}"]))
    offline = load_checkpoint(tmp_path / "offline" / "checkpoint.pt")
    run_train(_compose(common + ["online.steps=30", "eval.every=30", f"init_from={tmp_path / 'offline'}", f"run_dir={tmp_path / 'online'}"]))
    online = load_checkpoint(tmp_path / "online" / "checkpoint.pt")
    assert online["step"] == 80  # the online phase continues the offline step count
    for name in ("critic", "value", "actor"):
        adam_steps = [float(s["step"]) for s in online["agent"]["optimizers"][name]["state"].values()]
        assert set(adam_steps) == {80.0}, name  # Adam moments continued from the offline checkpoint's 50 steps
    assert offline["agent"]["optimizers"]["critic"]["state"][0]["step"] == 50
    steps = [r["step"] for r in read_metrics(tmp_path / "online") if "online/episode_return" in r]
    assert steps == []  # Pendulum episodes are 200 steps: none finished within 30 online steps
    rows = read_metrics(tmp_path / "online")
    assert rows[0]["step"] == 50 and "eval/return_mean" in rows[0]  # the pre-trained agent's score at the switch
    assert all(r["step"] > 50 for r in rows[1:]) and any("train/online_step" in r for r in rows)


def test_finetune_rejects_mismatched_checkpoint(tmp_path, pendulum_collection, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", pendulum_collection["minari_root"])
    dataset = pendulum_collection["ids"]["medium"]
    common = [f"dataset={dataset}", "agent=sac", "device=cpu", "log.progress=false", "eval.episodes=1"]
    run_train(_compose(common + ["steps=10", "online.steps=0", "eval.every=10", f"run_dir={tmp_path / 'a'}"]))
    with pytest.raises(ValueError, match="ensemble size, LayerNorm"):
        run_train(_compose(common + ["agent.ensemble_size=10", "online.steps=5", f"init_from={tmp_path / 'a'}", f"run_dir={tmp_path / 'b'}"]))


def test_wsrl_recipe_switches_to_high_utd_sac():
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=["agent=wsrl"])
    assert cfg.online.buffer_mode == "none" and cfg.online.warmup_steps == 5000 and cfg.online.online_batch_size == 1024
    agent_cfg = OmegaConf.to_container(cfg.agent)
    agent_cfg.pop("name")
    torch.manual_seed(0)
    agent = orl.make_agent("cql", OBS, ACT, agent_cfg)
    assert agent.nets["critic"].ensemble_size == 10 and agent.regularize and agent.max_backup  # CQL settings offline
    calls = []
    original = agent.critic_step
    agent.critic_step = lambda batch: calls.append(len(batch)) or original(batch)
    agent.on_online_start()
    batch = make_batch(n=1024)
    batch.returns_to_go = None
    metrics = agent.update(batch)
    assert calls == [256, 256, 256, 256]  # four critic minibatches, each with its own target update
    assert "cql_gap" not in metrics and not agent.regularize  # SAC after the switch
    assert not agent.max_backup  # locomotion fine-tuning backs up one sampled next action


def test_cql_lagrange_multiplier_tracks_the_gap():
    torch.manual_seed(0)
    agent = orl.make_agent("cql", OBS, ACT, {"cql_lagrange": True, "cql_alpha": 1.0, "target_action_gap": 1e6, "cql_n_actions": 2})
    before = agent.log_cql_alpha.item()
    agent.update(make_batch())
    assert agent.log_cql_alpha.item() < before  # gap far below the target: alpha shrinks


def test_max_target_backup_takes_max_over_sampled_actions():
    torch.manual_seed(0)
    agent = orl.make_agent("cql", OBS, ACT, {"max_target_backup": True, "cql_n_actions": 6, "discount": 1.0})
    batch = make_batch(n=5)
    batch.rewards.zero_()
    target = agent.td_target(batch)
    torch.manual_seed(1)
    single = orl.agent.AGENTS["sac"].td_target(agent, batch)  # one sampled next action, same critic
    assert target.shape == (5,)
    # The max over 6 sampled actions is at least as large as a typical single sample on average.
    assert target.mean() >= single.mean() - 1e-6


def test_offline_checkpoint_kept_for_init_from(tmp_path, pendulum_collection, monkeypatch):
    """A run with an online phase keeps its switch-time agent in offline.pt; init_from=<run dir> loads that, not the later checkpoint.pt."""
    monkeypatch.setenv("MINARI_DATASETS_PATH", pendulum_collection["minari_root"])
    dataset = pendulum_collection["ids"]["medium"]
    common = [f"dataset={dataset}", "agent=iql", "device=cpu", "log.progress=false", "eval.episodes=1", "eval.every=10"]
    run_train(_compose(common + ["steps=20", "online.steps=10", f"run_dir={tmp_path / 'a'}"]))
    switch = load_checkpoint(tmp_path / "a" / "offline.pt")
    assert switch["step"] == 20 and load_checkpoint(tmp_path / "a" / "checkpoint.pt")["step"] == 30
    run_train(_compose(common + ["online.steps=10", f"init_from={tmp_path / 'a'}", f"run_dir={tmp_path / 'b'}"]))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["step"] == 30  # continued from step 20, not 30
    evals = {run: {r["step"]: r["eval/return_mean"] for r in read_metrics(tmp_path / run) if "eval/return_mean" in r} for run in "ab"}
    assert sorted(evals["b"]) == [20, 30] and evals["b"][20] == evals["a"][20]  # the fine-tuning curve starts at the switch
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_train(_compose(common + ["online.steps=10", f"init_from={tmp_path / 'missing'}", f"run_dir={tmp_path / 'c'}"]))
