"""Learning tests: offline agents must clearly beat the random policy on collected data."""
import gymnasium as gym
import pytest
import torch

import orl
from orl.buffer import TransitionBuffer
from orl.data import DataConfig, make_dataset, prepare
from orl.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["td3bc", "iql"])
def test_offline_agent_beats_random_on_collected_medium_expert(name, pendulum_collection, monkeypatch, tmp_path):
    monkeypatch.setenv("MINARI_DATASETS_PATH", pendulum_collection["minari_root"])
    dataset = make_dataset(pendulum_collection["ids"]["medium-expert"], download=False)
    prepared = prepare(dataset, DataConfig())
    env = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    agent = orl.make_agent(name, env.observation_space, env.action_space, {"actor_lr_decay_steps": 3000} if name == "iql" else None)
    agent.set_obs_normalizer(prepared.obs_mean, prepared.obs_std)
    cfg = TrainerConfig(offline_steps=3000, eval_every=3000, eval_episodes=10, log_every=500, checkpoint_every=3000, progress=False, tensorboard=False)
    result = Trainer(agent, tmp_path, cfg, TransitionBuffer.from_dataset(prepared.dataset, "cpu"), lambda: gym.make("Pendulum-v1"),
                     (dataset.ref_min_score, dataset.ref_max_score)).train()
    # 0 = random policy, 100 = the expert behaviour policy.
    assert result.mean_normalized > 40.0, result.mean_normalized
