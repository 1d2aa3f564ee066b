"""Issue 15 (part): divergence never becomes the latest checkpoint, run directories are never
overwritten or shared, online checkpoints stay small, stale temporary files are cleaned up."""
import gymnasium as gym
import pytest
import torch
from omegaconf import OmegaConf

import orl
from orl.checkpoint import load_checkpoint, save_checkpoint
from orl.apps.runs import resolve_run_dir
from orl.errors import DivergenceError, RunDirError
from orl.trainer import Trainer, TrainerConfig
from tests.test_trainer import build, pendulum_buffer


def _offline_cfg(**overrides):
    values = dict(offline_steps=60, batch_size=32, eval_every=0, log_every=1000, checkpoint_every=10, progress=False, tensorboard=False)
    return TrainerConfig(**{**values, **overrides})


def test_divergence_without_evaluation_keeps_the_last_good_checkpoint(tmp_path):
    buffer, prepared = pendulum_buffer()
    agent = build("td3bc", prepared)
    original = agent.update

    def update(batch):
        metrics = original(batch)
        if agent.step >= 25:  # from step 25 on the weights and the loss are NaN
            with torch.no_grad():
                next(agent.nets["critic"].parameters()).fill_(float("nan"))
            metrics["critic_loss"] = torch.tensor(float("nan"))
        return metrics

    agent.update = update
    with pytest.raises(DivergenceError, match="non-finite at step 25") as error:
        Trainer(agent, tmp_path, _offline_cfg(), buffer, lambda: gym.make("Pendulum-v1")).train()
    assert "last good checkpoint (step 20)" in str(error.value)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 20
    assert all(torch.isfinite(v).all() for v in state["agent"]["nets"].values() if v.is_floating_point())


def test_resume_refuses_a_non_finite_checkpoint(tmp_path):
    buffer, prepared = pendulum_buffer()
    agent = build("td3bc", prepared)
    Trainer(agent, tmp_path, _offline_cfg(offline_steps=10), buffer).train()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    key = next(iter(state["agent"]["nets"]))
    state["agent"]["nets"][key].fill_(float("inf"))
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    with pytest.raises(DivergenceError, match="cannot be resumed"):
        Trainer(build("td3bc", prepared), tmp_path, _offline_cfg(offline_steps=20), buffer).train(resume=True)


def test_resuming_a_finished_run_does_nothing(tmp_path, capsys):
    buffer, prepared = pendulum_buffer()
    Trainer(build("td3bc", prepared), tmp_path, _offline_cfg(offline_steps=10), buffer).train()
    before = (tmp_path / "checkpoint.pt").stat().st_mtime_ns
    assert Trainer(build("td3bc", prepared), tmp_path, _offline_cfg(offline_steps=10), buffer).train(resume=True) is None
    assert "already finished at step 10" in capsys.readouterr().out
    assert (tmp_path / "checkpoint.pt").stat().st_mtime_ns == before


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    buffer, prepared = pendulum_buffer()
    stale = tmp_path / ".checkpoint.pt.tmp-99999"
    stale.write_bytes(b"torn")
    Trainer(build("td3bc", prepared), tmp_path, _offline_cfg(offline_steps=10), buffer).train()
    assert not stale.exists()


def test_online_checkpoint_holds_only_the_filled_buffer(tmp_path):
    env = gym.make("Pendulum-v1")
    agent = orl.make_agent("sac", env.observation_space, env.action_space)
    cfg = TrainerConfig(offline_steps=0, online_steps=200, eval_every=0, progress=False, tensorboard=False, learning_starts=1000,
                        online_capacity=1_000_000)
    Trainer(agent, tmp_path, cfg, env_fn=lambda: gym.make("Pendulum-v1")).train()
    size_mb = (tmp_path / "checkpoint.pt").stat().st_size / 2**20
    assert size_mb < 2.0, f"{size_mb:.1f} MB for 200 transitions: the 1M-capacity storage was saved"
    assert load_checkpoint(tmp_path / "checkpoint.pt")["online_buffer"]["storage"]["obs"].shape == (200, 3)


def test_run_directories_are_never_reused(tmp_path):
    cfg = OmegaConf.create({"run_dir": str(tmp_path / "explicit"), "resume": False, "runs_root": str(tmp_path / "runs"),
                            "dataset": "orl/pendulum/medium-v0", "seed": 0})
    (tmp_path / "explicit").mkdir()
    (tmp_path / "explicit" / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(RunDirError, match="already holds a run; pass resume=true"):
        resolve_run_dir(cfg, "iql")
    assert (tmp_path / "explicit" / "metrics.jsonl").read_text() == '{"step": 1}\n'
    cfg.resume = True
    assert resolve_run_dir(cfg, "iql") == tmp_path / "explicit"
    cfg.run_dir, cfg.resume = None, False
    first, second = resolve_run_dir(cfg, "iql"), resolve_run_dir(cfg, "iql")  # the same second
    assert first != second and first.exists() and second.exists()


def _cli(*args, cwd=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "orl.apps.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_user_errors_are_one_message_and_exit_2(tmp_path):
    typo = _cli("agnet=iql")
    assert typo.returncode == 2 and "did you mean 'agent'" in typo.stderr and "Traceback" not in typo.stderr
    nested = _cli("online.stepz=3")
    assert nested.returncode == 2 and "did you mean 'online.steps'" in nested.stderr
    missing = _cli(f"dataset={tmp_path / 'missing.npz'}", "device=cpu")
    assert missing.returncode == 2 and "missing.npz does not exist" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("kept\n")
    np_file = tmp_path / "data.npz"
    from orl.data import OfflineDataset
    from tests.conftest import random_pendulum_arrays

    a = random_pendulum_arrays(300)
    OfflineDataset(a["observations"], a["actions"], a["rewards"], a["next_observations"], a["terminals"], a["timeouts"],
                   env_id="Pendulum-v1").save(np_file)
    reused = _cli(f"dataset={np_file}", f"run_dir={tmp_path / 'run'}", "device=cpu", "steps=5")
    assert reused.returncode == 2 and "already holds a run" in reused.stderr and "Traceback" not in reused.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == "kept\n"


def test_resume_drops_a_torn_metrics_line(tmp_path):
    buffer, prepared = pendulum_buffer()
    cfg = _offline_cfg(offline_steps=20, log_every=5)
    Trainer(build("td3bc", prepared), tmp_path, cfg, buffer).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 25, "train/critic_lo')  # a write cut off by power loss
    cfg.offline_steps = 30
    with pytest.warns(UserWarning, match="torn last line"):
        Trainer(build("td3bc", prepared), tmp_path, cfg, buffer).train(resume=True)
    from orl.logger import read_metrics

    steps = [r["step"] for r in read_metrics(tmp_path) if "train/critic_loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_failed_resume_keeps_the_old_config(tmp_path):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.data import OfflineDataset
    from tests.conftest import random_pendulum_arrays

    a = random_pendulum_arrays(400)
    data = tmp_path / "data.npz"
    OfflineDataset(a["observations"], a["actions"], a["rewards"], a["next_observations"], a["terminals"], a["timeouts"],
                   env_id="Pendulum-v1").save(data)
    common = ["agent=td3bc", f"dataset={data}", "device=cpu", "eval.every=0", "log.progress=false", "log.tensorboard=false",
              f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_train(compose(config_name="train", overrides=common + ["steps=5"]))
        before = (tmp_path / "run" / "config.yaml").read_text()
        state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
        next(iter(state["agent"]["nets"].values())).fill_(float("nan"))
        save_checkpoint(state, tmp_path / "run" / "checkpoint.pt")
        with pytest.raises(DivergenceError):
            run_train(compose(config_name="train", overrides=common + ["steps=10", "resume=true"]))
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_first_run_that_collects_logs_what_later_runs_log(tmp_path, monkeypatch):
    """Collecting the embedded dataset draws random numbers; the run must re-seed after it."""
    import orl.apps.cli
    from hydra import compose, initialize_config_dir

    from orl.data import OfflineDataset, make_dataset
    from orl.logger import read_metrics
    from tests.conftest import random_pendulum_arrays

    a = random_pendulum_arrays(400)
    data = tmp_path / "data.npz"
    OfflineDataset(a["observations"], a["actions"], a["rewards"], a["next_observations"], a["terminals"], a["timeouts"],
                   env_id="Pendulum-v1").save(data)

    def collecting(cfg):  # what a first run does: collect (random draws), then load
        torch.rand(1000)
        import numpy as np

        np.random.rand(1000)
        return make_dataset(str(data))

    rows = {}
    for name, loader in (("first", collecting), ("later", lambda cfg: make_dataset(str(data)))):
        monkeypatch.setattr(orl.apps.cli, "load_or_collect", loader)
        with initialize_config_dir(config_dir=orl.apps.cli.CONFIG_DIR, version_base="1.3"):
            orl.apps.cli.run_train(compose(config_name="train", overrides=["agent=td3bc", f"dataset={data}", "device=cpu", "steps=20", "log.every=10",
                                                                      "eval.every=0", "log.progress=false", "log.tensorboard=false",
                                                                      f"run_dir={tmp_path / name}"]))
        rows[name] = read_metrics(tmp_path / name)
    assert rows["first"] == rows["later"]


@pytest.mark.parametrize("override, message", [("steps=-1", "steps=-1 is not valid"), ("batch_size=0", "batch_size=0 is not valid"),
                                               ("eval.every=2.5", "eval.every=2.5 is not valid"), ("log.every=0", "log.every=0"),
                                               ("checkpoint.every=abc", "checkpoint.every='abc'"), ("device=gpu", "device='gpu' is not valid")])
def test_config_values_are_validated_before_any_data_loads(override, message):
    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.errors import ConfigError

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=["dataset=/does/not/exist.npz", override])
    with pytest.raises(ConfigError, match=message):  # not the missing dataset: validation comes first
        run_train(cfg)


def test_unknown_minari_id_fails_fast_when_the_hub_is_unreachable(monkeypatch):
    import socket
    import time

    from orl.data import DatasetError, make_dataset

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.time()
    with pytest.raises(DatasetError, match=r"not on this machine and the Minari hub cannot be reached.*minari download mujoco/hopper/medium-v0"):
        make_dataset("mujoco/hopper/medium-v0")
    assert time.time() - start < 5  # minari alone retries for ~25 s


def test_a_full_disk_during_a_checkpoint_write_is_one_message_and_keeps_the_previous_one(tmp_path, monkeypatch):
    import errno

    from orl.errors import CheckpointError

    save_checkpoint({"step": 1}, tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def half_then_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")  # some bytes land, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(CheckpointError, match=r"no space left on the device; the previous checkpoint .* is kept.*resume=true"):
        save_checkpoint({"step": 2}, tmp_path / "checkpoint.pt")
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary file left behind
