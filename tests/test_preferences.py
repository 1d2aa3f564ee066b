"""Preference data for control (issue 13, first part): segment pairs as start indices, scripted teachers,
label files checked against their data, and the one Bradley–Terry loss."""
import math

import numpy as np
import pytest
import torch

from orl.data import OfflineDataset
from orl.errors import DataError
from orl.prefs.labels import PreferencePairs, Teacher, scripted_preferences, segment_starts
from orl.provenance import dataset_checksum
from orl.prefs.losses import preference_loss


def hand_made(lengths=(5, 3, 7), rewards=None) -> OfflineDataset:
    """Trajectories of the given lengths (each ends in a timeout), reward = position in the file unless given."""
    n = sum(lengths)
    obs = np.arange(n, dtype=np.float32)[:, None]
    timeouts = np.zeros(n, np.float32)
    timeouts[np.cumsum(lengths) - 1] = 1
    next_obs = obs + 1  # continuous: trajectory boundaries come from the timeouts only
    reward = np.arange(n, dtype=np.float32) if rewards is None else np.asarray(rewards, np.float32)
    return OfflineDataset(obs, np.zeros((n, 1), np.float32), reward, next_obs, np.zeros(n, np.float32), timeouts, source="hand-made")


def test_bt_loss_with_soft_labels_and_ties():
    a, b = torch.tensor([2.0]), torch.tensor([0.0])
    assert preference_loss(a, b, 1.0).item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert preference_loss(a, b, 0.0).item() == pytest.approx(math.log(1 + math.exp(2)))
    tie = 0.5 * (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2)))
    assert preference_loss(a, b, 0.5).item() == pytest.approx(tie)
    # segment scores are sums of per-step rewards: a tie is minimized where the sums are equal
    diff = torch.zeros(1, requires_grad=True)
    preference_loss(diff, torch.zeros(1), 0.5).backward()
    assert diff.grad.item() == pytest.approx(0.0)
    # batched, mixed labels: the mean of the per-query losses
    scores_a, scores_b, labels = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 3.0]), torch.tensor([1.0, 0.0, 0.5])
    assert preference_loss(scores_a, scores_b, labels).item() == pytest.approx((2 * math.log(1 + math.exp(-1)) + math.log(2)) / 3)


def test_segments_never_cross_a_trajectory_boundary():
    data = hand_made((5, 3, 7))
    assert segment_starts(data, 3).tolist() == [0, 1, 2, 5, 8, 9, 10, 11, 12]
    assert segment_starts(data, 6).tolist() == [8, 9]
    assert segment_starts(data, 8).tolist() == []
    pairs = scripted_preferences(hand_made((40, 25, 35)), queries=300, length=10, seed=1)
    episodes = hand_made((40, 25, 35)).episode_ids()
    index = pairs.segment_indices()
    assert (episodes[index] == episodes[index[:, :, :1]]).all()
    assert (pairs.starts[:, 0] != pairs.starts[:, 1]).all()


def test_teachers_on_known_returns():
    rng = np.random.default_rng(0)
    # segment a: returns 10, 3, 5, 5; segment b: 4, 3, 9, 5 (H = 2)
    a = np.array([[5.0, 5.0], [1.0, 2.0], [5.0, 0.0], [2.5, 2.5]])
    b = np.array([[2.0, 2.0], [2.0, 1.0], [0.0, 9.0], [2.0, 3.0]])
    labels, kept = Teacher().label(a, b, rng)
    assert labels.tolist() == [1.0, 0.5, 0.0, 0.5] and kept.all()  # rational: the larger return; equal returns tie
    labels, _ = Teacher(tie_threshold=1.5).label(a, b, rng)
    assert labels.tolist() == [1.0, 0.5, 0.0, 0.5]
    labels, _ = Teacher(tie_threshold=5.0).label(a, b, rng)  # return gaps 6, 0, 4, 0
    assert labels.tolist() == [1.0, 0.5, 0.5, 0.5]
    # myopic gamma = 0: only the last step counts (5 vs 2, 2 vs 1, 0 vs 9, 2.5 vs 3)
    labels, _ = Teacher(gamma=0.0).label(a, b, rng)
    assert labels.tolist() == [1.0, 1.0, 0.0, 0.0]
    labels, _ = Teacher(mistake=1.0).label(a, b, rng)
    assert labels.tolist() == [0.0, 0.5, 1.0, 0.5]  # every preference flipped, ties stay ties
    labels, kept = Teacher(skip_threshold=6.0).label(a, b, rng)
    assert kept.tolist() == [True, False, True, False] and labels.tolist() == [1.0, 0.0]
    # stochastic: beta = 0 is a coin flip, a large beta the rational teacher
    many_a, many_b = np.tile(a[:1], (4000, 1)), np.tile(b[:1], (4000, 1))
    assert abs(Teacher(beta=0.0).label(many_a, many_b, rng)[0].mean() - 0.5) < 0.05
    assert Teacher(beta=50.0).label(many_a, many_b, rng)[0].mean() == 1.0
    p = 1 / (1 + math.exp(-0.2 * 6))  # beta 0.2, R_a - R_b = 6
    assert abs(Teacher(beta=0.2).label(many_a, many_b, rng)[0].mean() - p) < 0.03


def test_label_file_roundtrip_and_checks(tmp_path):
    data = hand_made((40, 25, 35))
    pairs = scripted_preferences(data, queries=50, length=10, teacher=Teacher(mistake=0.1), seed=3)
    pairs.save(tmp_path / "labels.npz")
    loaded = PreferencePairs.load(tmp_path / "labels.npz", data)
    assert np.array_equal(loaded.starts, pairs.starts) and np.array_equal(loaded.labels, pairs.labels)
    assert loaded.teacher["mistake"] == 0.1 and loaded.checksum == dataset_checksum(data)
    # labels made on other data: refused by checksum
    other = hand_made((40, 25, 35), rewards=np.ones(100))
    with pytest.raises(DataError, match="holds other data"):
        PreferencePairs.load(tmp_path / "labels.npz", other)
    # indices beyond the data, and a segment across a boundary: clear errors
    from orl.prefs.labels import check_segments

    with pytest.raises(DataError, match="reach index 104, but hand-made has 100 transitions"):
        check_segments(np.array([[0, 95]]), 10, data, "labels.npz")
    with pytest.raises(DataError, match="query 1 has a segment that crosses a trajectory boundary"):
        check_segments(np.array([[0, 1], [35, 0]]), 10, data, "labels.npz")


def test_split_keeps_every_query_once():
    pairs = scripted_preferences(hand_made((40, 25, 35)), queries=40, length=5, seed=0)
    train, held_out = pairs.split(0.25, seed=1)
    assert len(train) == 30 and len(held_out) == 10
    seen = {tuple(s) for s in train.starts} | {tuple(s) for s in held_out.starts}
    assert seen == {tuple(s) for s in pairs.starts}


# --- the Bradley–Terry reward model for control -----------------------------------------------------
def pendulum_like(n=3000, seed=0) -> OfflineDataset:
    """Random 3-d states and 1-d actions with a known reward r = -(s_0^2 + 0.1 a^2), trajectories of 50 steps."""
    rng = np.random.default_rng(seed)
    obs = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    actions = rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    rewards = -(obs[:, 0] ** 2 + 0.1 * actions[:, 0] ** 2)
    timeouts = np.zeros(n, np.float32)
    timeouts[49::50] = 1
    next_obs = np.roll(obs, -1, 0)
    return OfflineDataset(obs, actions, rewards.astype(np.float32), next_obs, np.zeros(n, np.float32), timeouts, source="known-reward")


def test_reward_model_ranks_held_out_pairs_and_recovers_the_reward(tmp_path):
    from orl.prefs.reward_model import RewardModelConfig, train_reward_model
    from orl.prefs.store import load_reward_model, relabel, save_reward_model

    data = pendulum_like()
    pairs = scripted_preferences(data, queries=400, length=10, seed=0)
    model, metrics = train_reward_model(data, pairs, RewardModelConfig(ensemble_size=2, hidden=(64, 64), max_epochs=40, held_out=0.2))
    assert metrics["held_out_accuracy"] > 0.85  # chance is 0.5
    assert metrics["reward_correlation"] > 0.8
    save_reward_model(tmp_path / "reward_model.pt", model, pairs, metrics)
    loaded, record = load_reward_model(tmp_path)
    assert record["checksum"] == dataset_checksum(data) and record["metrics"] == metrics
    relabelled = relabel(data, loaded)
    np.testing.assert_allclose(relabelled.rewards, model.predict(data.observations, data.actions), rtol=1e-6)
    assert np.abs(relabelled.rewards).max() < 1  # tanh output
    unit = relabel(data, loaded, "minmax").rewards
    assert unit.min() == pytest.approx(0.0) and unit.max() == pytest.approx(1.0)
    assert np.array_equal(relabelled.observations, data.observations)  # only the rewards change


def test_ties_pull_segment_returns_together():
    from orl.prefs.reward_model import RewardModelConfig, train_reward_model

    data = pendulum_like(1000)
    pairs = scripted_preferences(data, queries=200, length=5, teacher=Teacher(tie_threshold=1e9), seed=0)  # every query a tie
    assert (pairs.labels == 0.5).all()
    index = torch.as_tensor(pairs.segment_indices())

    def gap(epochs):
        model, _ = train_reward_model(data, pairs, RewardModelConfig(ensemble_size=1, hidden=(32,), max_epochs=epochs, held_out=0.0))
        with torch.no_grad():
            returns = model(torch.as_tensor(data.observations)[index], torch.as_tensor(data.actions)[index]).sum(-1)[0]
        return float((returns[:, 0] - returns[:, 1]).abs().mean())

    assert gap(150) < 0.3 * gap(0)  # a tie is fit by equal segment returns


def test_from_a_dataset_to_labels_to_a_reward_model_to_a_relabelled_run_that_resumes_exactly(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from hydra import compose, initialize_config_dir

    from orl.apps.cli import CONFIG_DIR, run_train
    from orl.logger import read_metrics
    from tests.conftest import random_pendulum_arrays

    data = tmp_path / "pendulum.npz"
    np.savez(data, **random_pendulum_arrays(1200, seed=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def prefs(*args):
        out = subprocess.run([sys.executable, "-c", "import orl.apps.prefs as p; p.prefs_main()", *args], capture_output=True, text=True,
                             env=env, timeout=300)
        return out

    assert prefs("label", str(data), "--queries", "150", "--length", "20", "--out", str(tmp_path / "prefs.npz")).returncode == 0
    made = prefs("reward", str(data), str(tmp_path / "prefs.npz"), "--out", str(tmp_path / "rm"), "--ensemble-size", "2", "--max-epochs", "20")
    assert made.returncode == 0, made.stderr[-2000:]
    metrics = json.loads((tmp_path / "rm" / "metrics.json").read_text())
    assert metrics["held_out_accuracy"] > 0.6 and "reward_correlation" in metrics
    # labels applied to other data: one clear message, exit 2
    other = tmp_path / "other.npz"
    np.savez(other, **random_pendulum_arrays(1200, seed=5))
    refused = prefs("reward", str(other), str(tmp_path / "prefs.npz"), "--out", str(tmp_path / "rm2"))
    assert refused.returncode == 2 and "holds other data" in refused.stderr and "Traceback" not in refused.stderr

    def train(run_dir, steps, resume=False):
        overrides = ["agent=td3bc", f"dataset={data}", "env=Pendulum-v1", f"data.reward=learned:{tmp_path / 'rm'}", f"steps={steps}",
                     "eval.every=10", "eval.episodes=1", "log.every=5", "checkpoint.every=10", "batch_size=64", "log.progress=false",
                     "log.tensorboard=false", "device=cpu", f"run_dir={run_dir}", f"resume={str(resume).lower()}"]
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return run_train(compose(config_name="train", overrides=overrides))

    train(tmp_path / "full", 20)
    train(tmp_path / "resumed", 10)
    train(tmp_path / "resumed", 20, resume=True)
    assert read_metrics(tmp_path / "full") == read_metrics(tmp_path / "resumed")
    record = json.loads((tmp_path / "full" / "learned_reward.json").read_text())
    assert record["reward_model"] == str(tmp_path / "rm" / "reward_model.pt") and record["same_data_as_labels"]
    assert record["metrics"] == metrics
    # the run trained on the learned reward, not the environment's
    from orl.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "full" / "checkpoint.pt")["reward_transform"]["kind"] == f"learned:{tmp_path / 'rm'}"


def test_uni_rlhf_label_files_are_read_without_running_code(tmp_path):
    import pickle

    from orl.prefs.importers import load_uni_rlhf_labels

    data = hand_made((40, 25, 35))
    folder = tmp_path / "hopper-medium-replay-v2_human_labels"
    folder.mkdir()
    suffix = "domain_mujoco_env_hopper-medium-replay-v2_num_3_len_10"
    for name, value in ((f"human_labels_{suffix}.pkl", np.array([0, 1, -1])), (f"indices_1_{suffix}.pkl", np.array([0, 40, 70])),
                        (f"indices_2_{suffix}.pkl", np.array([20, 65, 80]))):
        (folder / name).write_bytes(pickle.dumps(value))
    pairs = load_uni_rlhf_labels(folder, data, queries=3, length=10)
    assert pairs.starts.tolist() == [[0, 20], [40, 65], [70, 80]] and pairs.labels.tolist() == [1.0, 0.0, 0.5]
    assert pairs.checksum == dataset_checksum(data)
    # indices for other data: the clear error of every label file
    (folder / f"indices_2_{suffix}.pkl").write_bytes(pickle.dumps(np.array([20, 65, 95])))
    with pytest.raises(DataError, match="reach index 104"):
        load_uni_rlhf_labels(folder, data, queries=3, length=10)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (folder / f"indices_2_{suffix}.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataError, match="builtins.print; a label file may hold only numpy arrays"):
        load_uni_rlhf_labels(folder, data, queries=3, length=10)


def test_preference_transformer_label_files_and_the_last_n_queries(tmp_path, capsys):
    """PT's human_label/<env>/ layout: indices_num<N>, indices_2_num<N>, label_human (a plain list); PT's
    loader keeps the *last* N labels."""
    import pickle

    from orl.data import make_dataset
    from orl.prefs.labels import PreferencePairs
    from orl.prefs.importers import load_preference_transformer_labels
    from orl.apps.prefs import prefs_main

    data = hand_made((40, 25, 35))
    folder = tmp_path / "hopper-medium-replay-v2"
    folder.mkdir()
    for name, value in (("indices_num4", np.array([0, 5, 40, 70])), ("indices_2_num4", np.array([20, 26, 65, 80])),
                        ("label_human", [1, 0, -1, 1])):
        (folder / name).write_bytes(pickle.dumps(value))
    pairs = load_preference_transformer_labels(folder, data, length=10)
    assert pairs.starts.tolist() == [[0, 20], [5, 26], [40, 65], [70, 80]] and pairs.labels.tolist() == [0.0, 1.0, 0.5, 0.0]
    last = load_preference_transformer_labels(folder, data, length=10, queries=2)
    assert last.starts.tolist() == [[40, 65], [70, 80]] and last.labels.tolist() == [0.5, 0.0]
    assert last.teacher["kind"] == "preference-transformer"
    # through the CLI, from a dataset file, to a label file orl-train reads
    path = tmp_path / "hand.npz"
    np.savez(path, observations=data.observations, actions=data.actions, rewards=data.rewards, next_observations=data.next_observations,
             terminals=data.terminals, timeouts=data.timeouts)
    prefs_main(["import-pt", str(path), str(folder), "--length", "10", "--queries", "3", "--out", str(tmp_path / "pt.npz")])
    assert "3 Preference Transformer queries" in capsys.readouterr().out
    loaded = PreferencePairs.load(tmp_path / "pt.npz", make_dataset(path))
    assert loaded.starts.tolist() == [[5, 26], [40, 65], [70, 80]]
    with pytest.raises(DataError, match="holds 4 labels"):
        load_preference_transformer_labels(folder, data, length=10, queries=5)
    # a segment that crosses a trajectory boundary (39 + 10 > 40): refused, as for every label file
    (folder / "indices_num4").write_bytes(pickle.dumps(np.array([0, 5, 35, 70])))
    with pytest.raises(DataError):
        load_preference_transformer_labels(folder, data, length=10)
    (folder / "indices_num4").unlink()
    with pytest.raises(DataError, match="expected one indices_num"):
        load_preference_transformer_labels(folder, data, length=10)


def test_pair_accuracy_scores_soft_labels_by_direction():
    from orl.prefs.losses import pair_accuracy

    a, b = torch.tensor([2.0, 0.0, 1.0, 5.0]), torch.tensor([1.0, 1.0, 3.0, 5.0])
    # 0.7 and 0.2 are decided (a and b preferred), 0.5 is a tie and left out: a>b right, a<b right, a<b wrong
    assert pair_accuracy(a, b, torch.tensor([0.7, 0.2, 0.9, 0.5])) == pytest.approx(2 / 3)
