"""The collection pipeline (issue 3): SAC behaviour policies -> five D4RL-style Minari levels."""
import json

import minari
import numpy as np
import pytest
import torch

import orl.apps.collect as collect_module
from orl.apps.collect import CollectConfig, collect
from orl.data import make_dataset
from orl.trainer import Trainer


@pytest.fixture
def collected_env(pendulum_collection, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", pendulum_collection["minari_root"])
    return pendulum_collection


def test_sac_learns_pendulum(collected_env):
    returns = {int(k): v for k, v in json.loads((collected_env["work"] / "snapshot_returns.json").read_text()).items()}
    refs = json.loads((collected_env["work"] / "reference_scores.json").read_text())
    assert refs["ref_min_score"] < -900  # uniform random
    assert returns[max(returns)] > -400, returns  # a solved swing-up scores about -150
    assert refs["ref_max_score"] > -400


def test_all_levels_load_with_reference_scores(collected_env):
    ids = collected_env["ids"]
    assert set(ids) == {"random", "medium", "medium-replay", "expert", "medium-expert"}
    sizes = {}
    for level, ds_id in ids.items():
        raw = minari.load_dataset(ds_id)
        assert raw.storage.metadata["ref_min_score"] < raw.storage.metadata["ref_max_score"]
        ds = make_dataset(ds_id, download=False)
        assert ds.env_id == "Pendulum-v1" and ds.ref_min_score is not None
        assert ds.timeouts.sum() > 0 and ds.terminals.sum() == 0  # Pendulum only truncates
        sizes[level] = len(ds)
    size = collected_env["cfg"].size
    assert sizes["random"] == sizes["medium"] == sizes["expert"] == size
    assert sizes["medium-expert"] == 2 * size
    # Behaviour quality is ordered as the level names promise.
    mean_reward = {level: make_dataset(ds_id, download=False).rewards.mean() for level, ds_id in ids.items()}
    assert mean_reward["random"] < mean_reward["medium"] < mean_reward["expert"]


def test_collection_records_each_levels_checksum_and_software(collected_env):
    from orl.provenance import dataset_checksum

    record = json.loads((collected_env["work"] / "datasets.json").read_text())
    assert set(record["levels"]) == set(collected_env["ids"])
    for level, ds_id in collected_env["ids"].items():
        dataset = make_dataset(ds_id, download=False)
        assert record["levels"][level] == {"id": ds_id, "sha256": dataset_checksum(dataset), "transitions": len(dataset)}
    assert record["packages"]["torch"] == torch.__version__ and "mujoco" in record["packages"]


def test_medium_replay_ends_where_medium_policy_was_saved(collected_env):
    levels = json.loads((collected_env["work"] / "levels.json").read_text())
    ds = make_dataset(collected_env["ids"]["medium-replay"], download=False)
    assert len(ds) == levels["medium_step"]
    replay = np.load(collected_env["work"] / "replay.npz")
    np.testing.assert_array_equal(ds.observations, replay["obs"][: levels["medium_step"]])
    saved = torch.load(collected_env["work"] / "behaviour" / "medium.pt", weights_only=False)
    snapshot = torch.load(collected_env["work"] / "policies" / f"step{levels['medium_step']:09d}.pt", weights_only=False)
    for key, value in saved["nets"].items():
        torch.testing.assert_close(value, snapshot["nets"][key])


def test_interrupted_collection_resumes_to_identical_datasets(pendulum_collection, tmp_path, monkeypatch):
    root = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    cfg = CollectConfig(**{**pendulum_collection["cfg"].__dict__, "work_dir": str(tmp_path / "work")})

    # First interruption: during SAC training, after a checkpoint.
    original_eval = Trainer.run_evaluation
    def crash_during_sac(self):
        if self.step == 2500:
            raise KeyboardInterrupt
        return original_eval(self)
    monkeypatch.setattr(Trainer, "run_evaluation", crash_during_sac)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg)
    monkeypatch.setattr(Trainer, "run_evaluation", original_eval)

    # Second interruption: while writing the levels, after the first one.
    original_write = collect_module.write_minari
    calls = []
    def crash_after_first(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(args[0])
        return original_write(*args, **kwargs)
    monkeypatch.setattr(collect_module, "write_minari", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        collect(cfg)
    monkeypatch.setattr(collect_module, "write_minari", original_write)

    ids = collect(cfg)
    for level, ds_id in ids.items():
        resumed = make_dataset(ds_id, download=False)
        monkeypatch.setenv("MINARI_DATASETS_PATH", pendulum_collection["minari_root"])
        reference = make_dataset(ds_id, download=False)
        monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
        for field in ("observations", "actions", "rewards", "terminals", "timeouts"):
            np.testing.assert_array_equal(getattr(resumed, field), getattr(reference, field), err_msg=f"{level}.{field}")
        assert resumed.ref_min_score == reference.ref_min_score


# ---------------------------------------------------------------------------------------------------
# Nothing a user collected is lost (issue 15)
def _tiny(tmp_path, **changes):
    from orl.apps.collect import CollectConfig

    values = dict(env="Pendulum-v1", levels=("random", "medium"), size=200, sac_steps=400, random_steps=200, snapshot_every=200,
                  snapshot_episodes=1, ref_episodes=2, seed=0, work_dir=str(tmp_path / "work"), progress=False)
    return CollectConfig(**{**values, **changes})


def _fingerprint(ds_id):
    from orl.data import make_dataset

    data = make_dataset(ds_id, download=False)
    return float(data.rewards.sum()), len(data)


def test_collect_with_other_settings_stops_and_names_them(tmp_path, monkeypatch):
    from orl.apps.collect import collect
    from orl.errors import ConfigError

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    ids = collect(_tiny(tmp_path))
    before = {level: _fingerprint(ds_id) for level, ds_id in ids.items()}
    with pytest.raises(ConfigError, match=r"sac_steps=400 there, 600 now"):
        collect(_tiny(tmp_path, sac_steps=600))
    assert {level: _fingerprint(ds_id) for level, ds_id in ids.items()} == before


def test_overwrite_swaps_in_new_datasets_only_after_success(tmp_path, monkeypatch):
    import orl.apps.collect
    from orl.apps.collect import collect

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    ids = collect(_tiny(tmp_path))
    before = {level: _fingerprint(ds_id) for level, ds_id in ids.items()}
    (tmp_path / "work" / ".orl-overwrite" / "stale").mkdir(parents=True)  # a crashed earlier overwrite: started clean

    real_write = orl.apps.collect.write_minari
    calls = []

    def write_then_fail(ds_id, *args, **kwargs):
        calls.append(ds_id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user stops it half-way, after one new level was written
        return real_write(ds_id, *args, **kwargs)

    monkeypatch.setattr(orl.apps.collect, "write_minari", write_then_fail)
    with pytest.raises(KeyboardInterrupt):
        collect(_tiny(tmp_path, seed=1, overwrite=True))
    assert {level: _fingerprint(ds_id) for level, ds_id in ids.items()} == before  # untouched
    assert not (tmp_path / "work" / ".orl-overwrite" / "stale").exists()

    monkeypatch.setattr(orl.apps.collect, "write_minari", real_write)
    collect(_tiny(tmp_path, sac_steps=600, overwrite=True))
    after = {level: _fingerprint(ds_id) for level, ds_id in ids.items()}
    assert after != before and after["random"][1] == 200
    saved = json.loads((tmp_path / "work" / "pendulum" / "seed0" / "collect_config.json").read_text())
    assert saved["sac_steps"] == 600  # the work directory moved in with the datasets
    assert not (tmp_path / "work" / ".orl-overwrite").exists()
    assert not any(p.name.endswith(".orl-overwrite") for p in tmp_path.iterdir())
    collect(_tiny(tmp_path, sac_steps=600))  # the new collection is now the one settings are checked against


def test_a_misspelt_or_missing_collected_id_names_the_fix(collected_env, monkeypatch):
    """A hydra sweep's directory spells orl/pendulum/medium-v0 as orl-pendulum-medium-v0; copying it back as
    dataset= used to end in 'run `minari download`', which cannot fetch an orl/ id: they are collected."""
    import socket

    import gymnasium

    from orl.data import DatasetError

    def unreachable(*args, **kwargs):
        raise OSError("no route to host")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DatasetError, match=r"Did you mean dataset=orl/pendulum/medium-v0\?"):
        make_dataset("orl-pendulum-medium-v0")
    # another level is other data, however close its name: no suggestion, the collection's advice instead
    with pytest.raises(DatasetError, match=r"run `orl-collect env=Pendulum-v1`") as other_level:
        make_dataset("orl/pendulum/medium-v1")
    assert "Did you mean" not in str(other_level.value)
    for missing_id in ("orl/halfcheetah/medium-v0", "orl-halfcheetah-medium-v0"):  # the sweep spelling too
        with pytest.raises(DatasetError, match=r"run `orl-collect env=HalfCheetah-v5`") as missing:
            make_dataset(missing_id)
        assert "minari download" not in str(missing.value)
    # an unversioned registration (a plugin's) has no -vN to parse: still one message, naming it
    gymnasium.register(id="OrlProbe", entry_point="gymnasium.envs.classic_control:PendulumEnv")
    try:
        with pytest.raises(DatasetError, match=r"run `orl-collect env=OrlProbe`"):
            make_dataset("orl/orlprobe/medium-v0")
    finally:
        del gymnasium.registry["OrlProbe"]
    # another namespace is other data: no suggestion of the local orl/ id, the hub's advice instead
    with pytest.raises(DatasetError, match=r"minari download mujoco/pendulum/medium-v0") as hub:
        make_dataset("mujoco/pendulum/medium-v0")
    assert "Did you mean" not in str(hub.value)
