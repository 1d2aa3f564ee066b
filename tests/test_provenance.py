"""Provenance: every run records the data it trained on, and orl-report says when one dataset name hides two datasets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from orl.apps.cli import CONFIG_DIR, run_train
from orl.data import OfflineDataset, make_dataset
from orl.provenance import dataset_checksum, file_checksum, read_provenance
from tests.conftest import random_pendulum_arrays
from tests.test_sweeps import fake_run


def _pendulum_file(path: Path, seed: int) -> Path:
    a = random_pendulum_arrays(400, seed=seed)
    OfflineDataset(a["observations"], a["actions"], a["rewards"], a["next_observations"], a["terminals"], a["timeouts"],
                   env_id="Pendulum-v1", ref_min_score=-1500.0, ref_max_score=-150.0).save(path)
    return path


def test_a_run_records_the_checksum_of_the_data_it_trained_on(tmp_path):
    data = _pendulum_file(tmp_path / "data.npz", seed=0)
    overrides = ["agent=bc", f"dataset={data}", "device=cpu", "steps=3", "eval.every=0", "log.progress=false",
                 "log.tensorboard=false", f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_train(compose(config_name="train", overrides=overrides))
    record = read_provenance(tmp_path / "run")
    assert record["data"]["sha256"] == dataset_checksum(make_dataset(str(data))) and record["data"]["transitions"] == 400
    assert record["packages"]["torch"] == torch.__version__ and record["packages"]["numpy"] == np.__version__
    assert record["device"] == "cpu" and record["cpu"]
    # another dataset under the same file name gets another checksum
    _pendulum_file(data, seed=1)
    assert dataset_checksum(make_dataset(str(data))) != record["data"]["sha256"]


def test_file_checksum_of_a_file_is_sha256sum(tmp_path):
    import hashlib

    (tmp_path / "a.jsonl").write_bytes(b'{"prompt": "x"}\n')
    assert file_checksum(tmp_path / "a.jsonl") == hashlib.sha256(b'{"prompt": "x"}\n').hexdigest()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one").write_bytes(b"1")
    before = file_checksum(tmp_path / "d")
    (tmp_path / "d" / "one").rename(tmp_path / "d" / "two")  # same bytes, another layout
    assert file_checksum(tmp_path / "d") != before


def _with_data(run_dir: Path, sha: str) -> None:
    (run_dir / "provenance.json").write_text(json.dumps({"data": {"id": "d", "sha256": sha}}))


def test_report_warns_when_runs_of_one_dataset_trained_on_different_data(tmp_path, capsys):
    from orl.report import main

    for seed in range(2):
        _with_data(fake_run(tmp_path / "same" / f"bc{seed}", "bc", "d", seed, [(1000, 50.0 + seed)]), "a" * 64)
    assert main([str(tmp_path / "same"), "--reps", "20"]) == 0
    assert "Warning" not in (tmp_path / "same" / "report" / "report.md").read_text()
    assert "warning" not in capsys.readouterr().err

    mixed = tmp_path / "mixed"
    _with_data(fake_run(mixed / "bc0", "bc", "d", 0, [(1000, 50.0)]), "a" * 64)
    _with_data(fake_run(mixed / "bc1", "bc", "d", 1, [(1000, 20.0)]), "b" * 64)
    fake_run(mixed / "bc2", "bc", "d", 2, [(1000, 30.0)])  # from before provenance existed: unknown data
    assert main([str(mixed), "--reps", "20"]) == 0
    markdown = (mixed / "report" / "report.md").read_text()
    assert "did not all train on the same data" in markdown and "aaaaaaaaaaaa: 1 run(s)" in markdown and "unrecorded: 1 run(s)" in markdown
    assert "runs on d trained on 3 different datasets" in capsys.readouterr().err
    summary = json.loads((mixed / "report" / "summary.json").read_text())
    assert sorted(r["data_sha256"] or "-" for r in summary["runs"]) == ["-", "a" * 64, "b" * 64]

    assert main([str(mixed), "--reps", "20", "--group-by", "provenance.data.sha256", "--out", str(tmp_path / "split")]) == 0
    labels = json.loads((tmp_path / "split" / "summary.json").read_text())["labels"]
    assert sorted(labels) == sorted([f"bc[provenance.data.sha256={'a' * 64}]", f"bc[provenance.data.sha256={'b' * 64}]",
                                     "bc[provenance.data.sha256=None]"])


def test_check_datasets_script_says_match_or_different(tmp_path):
    data = _pendulum_file(tmp_path / "data.npz", seed=0)
    script = [sys.executable, "scripts/check_datasets.py", "--file", str(tmp_path / "datasets.json"), "--datasets", str(data)]
    root = Path(__file__).resolve().parent.parent
    assert subprocess.run(script + ["--record"], cwd=root, capture_output=True, text=True).returncode == 0
    same = subprocess.run(script, cwd=root, capture_output=True, text=True)
    assert same.returncode == 0 and f"{data}: MATCH" in same.stdout
    _pendulum_file(data, seed=1)  # collected again elsewhere: other arrays under the same name
    other = subprocess.run(script, cwd=root, capture_output=True, text=True)
    assert other.returncode == 1 and f"{data}: DIFFERENT" in other.stdout
    assert "is the collection recorded in" not in other.stdout
    # the other machine's collection, recorded beside the README's: the script names it
    recorded_elsewhere = tmp_path / "datasets_other.json"
    assert subprocess.run(script[:3] + [str(recorded_elsewhere)] + script[4:] + ["--record"], cwd=root).returncode == 0
    named = subprocess.run(script, cwd=root, capture_output=True, text=True)
    assert named.returncode == 1 and f"{data} is the collection recorded in {recorded_elsewhere} (MATCH there)" in named.stdout
    data.unlink()
    assert "MISSING" in subprocess.run(script, cwd=root, capture_output=True, text=True).stdout


def test_a_resumed_run_keeps_its_start_and_refuses_other_data(tmp_path):
    import pytest

    from orl.errors import DataError

    data = _pendulum_file(tmp_path / "data.npz", seed=0)
    common = ["agent=bc", f"dataset={data}", "device=cpu", "eval.every=0", "log.progress=false", "log.tensorboard=false",
              f"run_dir={tmp_path / 'run'}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        run_train(compose(config_name="train", overrides=common + ["steps=3"]))
        first = read_provenance(tmp_path / "run")
        run_train(compose(config_name="train", overrides=common + ["steps=6", "resume=true"]))
        resumed = read_provenance(tmp_path / "run")
        assert {k: v for k, v in resumed.items() if k != "resumed"} == first  # the start's record is kept
        assert [segment["step"] for segment in resumed["resumed"]] == [3]
        assert resumed["resumed"][0]["device"] == "cpu" and resumed["resumed"][0]["packages"]["torch"] == torch.__version__

        config_before = (tmp_path / "run" / "config.yaml").read_text()
        _pendulum_file(data, seed=1)  # other arrays under the same file name
        with pytest.raises(DataError, match="resume it on the same data"):
            run_train(compose(config_name="train", overrides=common + ["steps=9", "resume=true"]))
    assert read_provenance(tmp_path / "run") == resumed and (tmp_path / "run" / "config.yaml").read_text() == config_before


def test_provenance_records_orls_version_and_never_the_users_commit(tmp_path):
    """An installed orl inside the user's own git repository must not record that repository's commit as orl's."""
    import subprocess

    import orl
    from orl.provenance import _git_commit, software

    assert software()["packages"]["orl"] == orl.__version__
    user_repo = tmp_path / "user_project"
    site = user_repo / ".venv" / "lib" / "site-packages"
    (site / "orl").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(user_repo)], check=True)
    subprocess.run(["git", "-C", str(user_repo), "-c", "user.email=u@x", "-c", "user.name=u", "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    (site / "orl" / "__init__.py").write_text("")
    (site / "pyproject.toml").write_text("")  # even a stray pyproject beside it does not make it orl's checkout
    assert _git_commit(site) is None
    root = Path(orl.__file__).resolve().parent.parent
    if (root / ".git").exists():  # running from orl's own checkout: its commit is recorded
        assert _git_commit(root).split("-")[0] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()


def test_a_text_run_resumed_with_other_held_out_rows_is_refused(tmp_path):
    """lm.holdout decides which rows a text run trains on; a resume with another split would silently join two."""
    import pytest

    from orl.errors import DataError
    from orl.provenance import write_provenance

    data = {"id": "rows.jsonl", "sha256": "a" * 64, "held_out_rows": [1, 5]}
    write_provenance(tmp_path, data, "cpu", 0)
    write_provenance(tmp_path, data, "cpu", 10)  # same split: fine
    with pytest.raises(DataError, match="held out 2 rows .* other ones"):
        write_provenance(tmp_path, {**data, "held_out_rows": [2, 7, 9]}, "cpu", 20)


def _bench_o2o_tree(tmp_path: Path, recorded: dict) -> tuple[Path, Path]:
    """A copy of the repository's o2o bench (script, checker, the committed tarball, `recorded` as
    results/datasets_xeon.json) whose orl-finetune only writes down how it was called."""
    import shutil

    repo = Path(__file__).resolve().parent.parent
    (tmp_path / "scripts").mkdir()
    for name in ("bench_o2o_mujoco.sh", "bench_o2o_ablation.sh", "use_xeon_collection.sh", "check_datasets.py"):
        shutil.copy(repo / "scripts" / name, tmp_path / "scripts" / name)
    (tmp_path / "results" / "o2o_mujoco_xeon").mkdir(parents=True)
    (tmp_path / "results" / "o2o_mujoco_xeon" / "datasets.tgz").symlink_to(repo / "results" / "o2o_mujoco_xeon" / "datasets.tgz")
    (tmp_path / "results" / "datasets.json").write_text((repo / "results" / "datasets.json").read_text())
    (tmp_path / "results" / "datasets_xeon.json").write_text(json.dumps(recorded))
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake_finetune"
    fake.write_text(f'#!/usr/bin/env bash\necho "$MINARI_DATASETS_PATH $*" >> {calls}\n')
    fake.chmod(0o755)
    return fake, calls


def test_the_committed_intel_collection_unpacks_to_its_recorded_checksums_and_feeds_the_o2o_grid(tmp_path):
    """COLLECTION=xeon bash scripts/bench_o2o_mujoco.sh runs the o2o grid on the datasets committed in
    results/o2o_mujoco_xeon/datasets.tgz: unpacked beside the script (never ~/.minari), checked against
    results/datasets_xeon.json, and every run reads them and writes to results/o2o_mujoco_xeon."""
    recorded = json.loads((Path(__file__).resolve().parent.parent / "results" / "datasets_xeon.json").read_text())
    fake, calls = _bench_o2o_tree(tmp_path, recorded)
    env = {**os.environ, "COLLECTION": "xeon", "ORL_FINETUNE": str(fake), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "bench_o2o_mujoco.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count(": MATCH") == 2, out.stdout
    lines = calls.read_text().splitlines()
    assert len(lines) == 3  # one sweep per seed
    for seed, line in enumerate(lines):
        assert line.startswith(f"{tmp_path / 'data' / 'minari-xeon'} ")
        assert f"seed={seed}" in line and "hydra.sweep.dir=results/o2o_mujoco_xeon" in line

    # data that is not the recorded collection stops the grid before any run
    recorded["datasets"]["orl/hopper/medium-v0"]["sha256"] = "0" * 64
    other = tmp_path / "other"
    other.mkdir()
    fake, calls = _bench_o2o_tree(other, recorded)
    out = subprocess.run(["bash", str(other / "scripts" / "bench_o2o_mujoco.sh")], env={**env, "ORL_FINETUNE": str(fake)},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "orl/hopper/medium-v0: DIFFERENT" in out.stdout
    assert not calls.exists()


def test_the_o2o_ablations_start_from_the_matching_pretrained_run_and_skip_the_others(tmp_path):
    """scripts/bench_o2o_ablation.sh fine-tunes iql_no_retention / calql_no_retention / wsrl_no_warmup from the
    offline.pt of the IQL / Cal-QL / WSRL run with the same dataset and seed, writes to results/o2o_mujoco_xeon_ablation, and skips
    (saying so) every pair whose pre-trained run is missing. Its quoted init_from and run_dir (the paths hold
    '=', '+' and ',') parse as whole paths in Hydra's override grammar."""
    recorded = json.loads((Path(__file__).resolve().parent.parent / "results" / "datasets_xeon.json").read_text())
    fake, calls = _bench_o2o_tree(tmp_path, recorded)
    fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" "--" >> {calls}\n')  # one argument per line, as received
    pretrained = tmp_path / "results" / "o2o_mujoco_xeon" / "+experiment=o2o_mujoco-calql,dataset=orl-hopper-medium-v0,seed=1"
    pretrained.mkdir(parents=True)
    (pretrained / "offline.pt").write_bytes(b"")
    env = {**os.environ, "ORL_FINETUNE": str(fake), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "bench_o2o_ablation.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count(": MATCH") == 2
    assert out.stdout.count("skip ") == 17  # 3 seeds x 2 datasets x 3 ablations, one of them has its pre-trained run
    runs = calls.read_text().split("--\n")[:-1]
    assert len(runs) == 1
    args = runs[0].splitlines()
    assert "+experiment=o2o_mujoco/calql_no_retention" in args and "seed=1" in args and "dataset=orl/hopper/medium-v0" in args
    overrides = [a for a in args if a.startswith(("init_from=", "run_dir="))]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=["+experiment=o2o_mujoco/calql_no_retention", *overrides])
    assert cfg.init_from == "results/o2o_mujoco_xeon/+experiment=o2o_mujoco-calql,dataset=orl-hopper-medium-v0,seed=1"
    assert cfg.run_dir == "results/o2o_mujoco_xeon_ablation/calql_no_retention,dataset=orl-hopper-medium-v0,seed=1"
    assert cfg.online.buffer_mode == "none" and cfg.tag == "calql_no_retention" and cfg.online.update_schedule == "episode"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=["+experiment=o2o_mujoco/wsrl_no_warmup"])
    assert cfg.online.warmup_steps == 0 and cfg.online.buffer_mode == "none" and cfg.agent.name == "cql"

    # the shared helper (scripts/use_xeon_collection.sh) stops the ablations too when the data is not the recorded collection
    recorded["datasets"]["orl/halfcheetah/medium-replay-v0"]["sha256"] = "0" * 64
    other = tmp_path / "other"
    other.mkdir()
    fake, calls = _bench_o2o_tree(other, recorded)
    (other / pretrained.relative_to(tmp_path)).mkdir(parents=True)
    (other / pretrained.relative_to(tmp_path) / "offline.pt").write_bytes(b"")
    out = subprocess.run(["bash", str(other / "scripts" / "bench_o2o_ablation.sh")], env={**env, "ORL_FINETUNE": str(fake)},
                         capture_output=True, text=True)
    assert out.returncode != 0 and "orl/halfcheetah/medium-replay-v0: DIFFERENT" in out.stdout
    assert not calls.exists()
