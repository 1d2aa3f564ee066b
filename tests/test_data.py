import h5py
import gymnasium as gym
import numpy as np
import pytest

from orl import make_agent
from orl.data import DataConfig, DatasetError, OfflineDataset, check_env_compatible, make_dataset, prepare
from tests.conftest import random_pendulum_arrays


def _write_hdf5(path, arrays, attrs=None):
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def test_npz_with_metadata_roundtrip(tmp_path):
    arrays = random_pendulum_arrays(450)
    np.savez(tmp_path / "d.npz", **arrays, env_id="Pendulum-v1", ref_min_score=-1200.0, ref_max_score=-150.0)
    ds = make_dataset(tmp_path / "d.npz")
    assert len(ds) == 450 and ds.env_id == "Pendulum-v1"
    assert ds.ref_min_score == -1200.0 and ds.ref_max_score == -150.0
    np.testing.assert_allclose(ds.normalized_score(-150.0), 100.0)
    np.testing.assert_allclose(ds.normalized_score(-675.0), 50.0)
    # CLI-style overrides win over the file.
    ds = make_dataset(tmp_path / "d.npz", env_id="Pendulum-v1", ref_min_score=0.0, ref_max_score=10.0)
    assert ds.normalized_score(5.0) == pytest.approx(50.0)


def test_hdf5_without_next_observations_follows_qlearning_dataset(tmp_path):
    arrays = random_pendulum_arrays(450)
    del arrays["next_observations"]
    _write_hdf5(tmp_path / "d.hdf5", arrays, {"env_id": "Pendulum-v1"})
    ds = make_dataset(tmp_path / "d.hdf5")
    # Steps 199 and 399 are timeouts and the last step has no successor: 3 dropped.
    assert len(ds) == 450 - 3
    np.testing.assert_array_equal(ds.next_observations[0], arrays["observations"][1])
    np.testing.assert_array_equal(ds.observations[199], arrays["observations"][200])
    assert ds.terminals.sum() == 0


def test_d4rl_name_resolves_to_file_with_reference_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    rng = np.random.default_rng(0)
    n = 300
    arrays = {
        "observations": rng.standard_normal((n, 11)), "actions": rng.uniform(-1, 1, (n, 3)), "rewards": rng.standard_normal(n),
        "terminals": np.zeros(n), "timeouts": (np.arange(n) % 100 == 99).astype(float),
    }
    _write_hdf5(tmp_path / "hopper_medium_replay-v2.hdf5", arrays)
    with pytest.warns(UserWarning, match="dynamics differ"):
        ds = make_dataset("hopper-medium-replay-v2")
    assert ds.env_id == "Hopper-v5"
    assert ds.ref_min_score == pytest.approx(-20.272305) and ds.ref_max_score == pytest.approx(3234.3)
    with pytest.raises(FileNotFoundError, match="walker2d_medium-v2.hdf5"):
        make_dataset("walker2d-medium-v2")


def test_local_minari_dataset_loads_with_terminals_and_truncations_apart(tmp_path):
    import minari
    from minari.data_collector import EpisodeBuffer

    rng = np.random.default_rng(0)
    episodes = []
    for length, terminated in ((5, True), (7, False)):
        episodes.append(EpisodeBuffer(
            observations=rng.standard_normal((length + 1, 3)).astype(np.float32), actions=rng.uniform(-2, 2, (length, 1)).astype(np.float32),
            rewards=rng.standard_normal(length), terminations=np.r_[np.zeros(length - 1, bool), [terminated]],
            truncations=np.r_[np.zeros(length - 1, bool), [not terminated]], infos={}))
    minari.create_dataset_from_buffers("test/pendulum/tiny-v0", buffer=episodes, env="Pendulum-v1", ref_min_score=-5.0, ref_max_score=5.0)
    ds = make_dataset("test/pendulum/tiny-v0", download=False)
    assert len(ds) == 12 and ds.env_id == "Pendulum-v1" and ds.ref_max_score == 5.0
    assert ds.terminals.tolist() == [0, 0, 0, 0, 1] + [0] * 7
    assert ds.timeouts.tolist() == [0] * 11 + [1]
    np.testing.assert_array_equal(ds.next_observations[:4], ds.observations[1:5])
    assert ds.episode_ends().sum() == 2


def test_missing_minari_dataset_names_the_download_command():
    with pytest.raises(DatasetError, match="minari download mujoco/nothing/here-v0"):
        make_dataset("mujoco/nothing/here-v0", download=False)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_dataset(tmp_path / "nope.npz")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda a: a.pop("rewards"), "missing key"),
        (lambda a: a.__setitem__("actions", a["actions"][:-3]), "mismatched lengths"),
        (lambda a: a["observations"].__setitem__((7, 1), np.nan), "NaN/inf"),
        (lambda a: a["rewards"].__setitem__(3, np.inf), "NaN/inf"),
        (lambda a: a["terminals"].__setitem__(0, 0.5), "0/1 flags"),
    ],
)
def test_validation_errors(tmp_path, corrupt, message):
    arrays = random_pendulum_arrays(50)
    corrupt(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        make_dataset(tmp_path / "bad.npz")


def test_env_compatibility_checks():
    arrays = random_pendulum_arrays(50)
    ds = OfflineDataset(arrays["observations"], arrays["actions"], arrays["rewards"], arrays["next_observations"],
                        arrays["terminals"], arrays["timeouts"], source="t")
    env = gym.make("Pendulum-v1")
    check_env_compatible(ds, env)
    with pytest.raises(DatasetError, match="observes"):
        check_env_compatible(ds, gym.make("MountainCarContinuous-v0"))
    ds.actions = ds.actions * 3.0  # Pendulum's bound is 2
    with pytest.raises(DatasetError, match="outside env"):
        check_env_compatible(ds, env)


def test_returns_to_go_stop_at_terminals_and_timeouts():
    obs = np.arange(6, dtype=np.float32)[:, None]
    next_obs = obs + 1
    ds = OfflineDataset(obs, np.zeros((6, 1), np.float32), np.ones(6, np.float32), next_obs,
                        np.array([0, 1, 0, 0, 0, 0], np.float32), np.array([0, 0, 0, 1, 0, 0], np.float32))
    np.testing.assert_allclose(ds.returns_to_go(0.5), [1.5, 1.0, 1.5, 1.0, 1.5, 1.0])
    np.testing.assert_allclose(ds.episode_returns(), [2.0, 2.0, 2.0])


def test_returns_to_go_of_failed_sparse_trajectories():
    """Cal-QL on sparse tasks: a trajectory of only failure rewards is worth r_fail / (1 - gamma), not its truncated sum."""
    obs = np.arange(5, dtype=np.float32)[:, None]
    rewards = np.array([-5, -5, -5, 5, -5], np.float32)  # a failed trajectory, then one that reaches the goal
    ds = OfflineDataset(obs, np.zeros((5, 1), np.float32), rewards, obs + 1,
                        np.array([0, 0, 0, 0, 1], np.float32), np.array([0, 0, 1, 0, 0], np.float32))
    np.testing.assert_allclose(ds.returns_to_go(0.5), [-8.75, -7.5, -5.0, 2.5, -5.0])
    space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    agent = make_agent("calql", space, space, {"discount": 0.5, "failure_reward": -5.0})
    buffer = agent.make_offline_buffer(ds, raw_dataset=ds, batch_size=2, online_steps=0)  # Cal-QL's own hook
    np.testing.assert_allclose(buffer.storage["returns_to_go"][:5].numpy(), [-10.0, -10.0, -10.0, 2.5, -5.0])


def test_transforms():
    arrays = random_pendulum_arrays(400)
    ds = OfflineDataset(arrays["observations"], arrays["actions"], arrays["rewards"], arrays["next_observations"],
                        arrays["terminals"], arrays["timeouts"], source="t")
    spread = ds.episode_returns().max() - ds.episode_returns().min()
    prepared = prepare(ds, DataConfig(reward="iql_locomotion", clip_actions=1.5))
    np.testing.assert_allclose(prepared.dataset.rewards, ds.rewards * 1000.0 / spread, rtol=1e-5)
    assert np.abs(prepared.dataset.actions).max() <= 1.5
    np.testing.assert_allclose(prepared.dataset.observations.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(prepared.obs_std, ds.observations.std(0) + 1e-3, rtol=1e-5)
    shifted = prepare(ds, DataConfig(reward="scale_shift", reward_scale=10.0, reward_shift=-5.0, normalize_obs=False))
    np.testing.assert_allclose(shifted.dataset.rewards, ds.rewards * 10.0 - 5.0, rtol=1e-5)
    with pytest.raises(DatasetError, match="data.reward"):
        prepare(ds, DataConfig(reward="bogus"))
