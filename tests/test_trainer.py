
import gymnasium as gym
import pytest
import torch

import orl
from orl.buffer import TransitionBuffer
from orl.checkpoint import load_checkpoint, save_checkpoint
from orl.data import DataConfig, OfflineDataset, prepare
from orl.logger import read_metrics
from orl.trainer import Trainer, TrainerConfig
from tests.conftest import random_pendulum_arrays


class Interrupt(Exception):
    pass


def pendulum_buffer():
    a = random_pendulum_arrays(600)
    ds = OfflineDataset(a["observations"], a["actions"], a["rewards"], a["next_observations"], a["terminals"], a["timeouts"], env_id="Pendulum-v1")
    prepared = prepare(ds, DataConfig())
    return TransitionBuffer.from_dataset(prepared.dataset, "cpu"), prepared


def build(name, prepared, **agent_cfg):
    env = gym.make("Pendulum-v1")
    torch.manual_seed(0)
    agent = orl.make_agent(name, env.observation_space, env.action_space, agent_cfg or None)
    if prepared is not None:
        agent.set_obs_normalizer(prepared.obs_mean, prepared.obs_std)
    return agent


def interrupt_at(agent, step):
    original = agent.update

    def update(batch):
        if agent.step + 1 == step:
            raise Interrupt
        return original(batch)

    agent.update = update


@pytest.mark.parametrize("name", ["td3bc", "iql"])
def test_offline_resume_equals_uninterrupted(tmp_path, name):
    buffer, prepared = pendulum_buffer()
    cfg = TrainerConfig(offline_steps=60, batch_size=32, seed=3, eval_every=30, eval_episodes=1, log_every=10,
                        checkpoint_every=20, progress=False, tensorboard=False)
    env_fn = lambda: gym.make("Pendulum-v1")  # noqa: E731
    Trainer(build(name, prepared, actor_lr_decay_steps=60) if name == "iql" else build(name, prepared), tmp_path / "full", cfg, buffer, env_fn).train()

    agent = build(name, prepared, actor_lr_decay_steps=60) if name == "iql" else build(name, prepared)
    interrupt_at(agent, 47)
    with pytest.raises(Interrupt):
        Trainer(agent, tmp_path / "resumed", cfg, buffer, env_fn).train()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 40
    fresh = build(name, prepared, actor_lr_decay_steps=60) if name == "iql" else build(name, prepared)
    Trainer(fresh, tmp_path / "resumed", cfg, buffer, env_fn).train(resume=True)

    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    assert resumed == full  # every logged loss and evaluation, bit for bit


def test_online_resume_equals_uninterrupted(tmp_path):
    cfg = TrainerConfig(offline_steps=0, online_steps=700, batch_size=32, seed=1, eval_every=350, eval_episodes=1, log_every=50,
                        checkpoint_every=200, progress=False, tensorboard=False, random_steps=150, learning_starts=150)
    env_fn = lambda: gym.make("Pendulum-v1")  # noqa: E731
    Trainer(build("sac", None), tmp_path / "full", cfg, env_fn=env_fn).train()
    agent = build("sac", None)
    interrupt_at(agent, 500)  # 500 updates = online step 649; last checkpoint at the episode end at step 600
    with pytest.raises(Interrupt):
        Trainer(agent, tmp_path / "resumed", cfg, env_fn=env_fn).train()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 600
    Trainer(build("sac", None), tmp_path / "resumed", cfg, env_fn=env_fn).train(resume=True)
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "full")


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")
        raise KeyboardInterrupt  # e.g. the job is killed mid-write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_mix_and_none_buffer_modes(tmp_path):
    buffer, prepared = pendulum_buffer()
    cfg = TrainerConfig(offline_steps=0, online_steps=10, batch_size=40, offline_ratio=0.25, buffer_mode="mix", seed=7,
                        eval_every=0, progress=False, tensorboard=False)
    agent = build("sac", prepared)
    trainer = Trainer(agent, tmp_path, cfg, buffer, lambda: gym.make("Pendulum-v1"))
    trainer.train()
    # Tag offline rows: every offline reward is finite real data, online rows are appended by the env.
    batch = trainer._online_batch()
    assert len(batch) == 40
    offline_rows = torch.isin(batch.obs[:, 0], buffer.storage["obs"][:, 0])
    assert offline_rows[:10].all() and not offline_rows[10:].any()
    trainer.cfg.buffer_mode = "none"
    batch = trainer._online_batch()
    assert not torch.isin(batch.obs[:, 0], buffer.storage["obs"][:, 0]).any()


def test_metrics_jsonl_and_tensorboard_written(tmp_path):
    buffer, prepared = pendulum_buffer()
    cfg = TrainerConfig(offline_steps=20, batch_size=16, eval_every=20, eval_episodes=2, log_every=10, progress=False)
    result = Trainer(build("bc", prepared), tmp_path, cfg, buffer, lambda: gym.make("Pendulum-v1"), ref_scores=(-1200.0, -150.0)).train()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [10, 20, 20]
    assert "eval/normalized_mean" in rows[-1] and len(result.returns) == 2
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_episode_update_schedule_updates_after_each_episode_with_a_fixed_policy(tmp_path):
    """online.update_schedule=episode (official Cal-QL's loop): no update inside an episode; after each one,
    len(episode) x utd updates, not counting steps inside the learning_starts window."""
    cfg = TrainerConfig(offline_steps=0, online_steps=500, batch_size=32, seed=0, eval_every=0, progress=False, tensorboard=False,
                        learning_starts=50, utd=2, update_schedule="episode")
    agent = build("sac", None)
    trainer = Trainer(agent, tmp_path, cfg, env_fn=lambda: gym.make("Pendulum-v1"))  # 200-step episodes
    at_step = []
    original = agent.update
    agent.update = lambda batch: at_step.append(trainer.step) or original(batch)
    trainer.train()
    # episode 1 ends at step 200: 150 countable steps x 2; episode 2 at 400: 200 x 2; the unfinished third's 100
    # steps get theirs at the last step, before the final evaluation
    assert {step: at_step.count(step) for step in set(at_step)} == {200: 300, 400: 400, 500: 200}
    bursts = [row for row in read_metrics(tmp_path) if "train/updates" in row]
    assert [(row["step"], row["train/updates"]) for row in bursts] == [(200, 300), (400, 400), (500, 200)]
    assert all("train/q_mean" in row for row in bursts)
    # the agent's metrics are logged once per burst, not repeated in the periodic rows (a resumed run could not repeat them)
    assert not any("train/q_mean" in row for row in read_metrics(tmp_path) if "train/updates" not in row)
    with pytest.raises(orl.errors.ConfigError, match="update_schedule"):
        Trainer(build("sac", None), tmp_path / "bad", TrainerConfig(online_steps=10, update_schedule="epoch"), env_fn=lambda: gym.make("Pendulum-v1"))


def test_online_resume_equals_uninterrupted_with_episode_updates(tmp_path):
    cfg = TrainerConfig(offline_steps=0, online_steps=700, batch_size=32, seed=1, eval_every=350, eval_episodes=1, log_every=50,
                        checkpoint_every=200, progress=False, tensorboard=False, random_steps=150, learning_starts=150,
                        update_schedule="episode")
    env_fn = lambda: gym.make("Pendulum-v1")  # noqa: E731
    Trainer(build("sac", None), tmp_path / "full", cfg, env_fn=env_fn).train()
    agent = build("sac", None)
    interrupt_at(agent, 300)  # bursts of 50 (step 200) and 200 (step 400); the third, at step 600, is interrupted
    with pytest.raises(Interrupt):
        Trainer(agent, tmp_path / "resumed", cfg, env_fn=env_fn).train()
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 400
    Trainer(build("sac", None), tmp_path / "resumed", cfg, env_fn=env_fn).train(resume=True)
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "full")
