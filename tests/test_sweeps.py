"""Sweeps on hydra's launchers and orl-report over their runs (issue 14)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_script, random_pendulum_arrays

ROOT = Path(__file__).resolve().parent.parent
TINY = ["env=Pendulum-v1", "ref_min_score=-1500", "ref_max_score=0", "steps=20", "eval.every=10", "eval.episodes=1",
        "log.every=10", "log.progress=false", "log.tensorboard=false"]


def orl(app: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", f"import sys, orl.apps.cli; sys.argv[0] = '{app}'; orl.apps.cli.{app}()", *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_data")
    for name, seed in (("a", 0), ("b", 1)):
        np.savez(root / f"{name}.npz", **random_pendulum_arrays(400, seed))
    return root


def run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("config.yaml"))


def test_joblib_sweep_makes_one_dir_per_run_and_rerun_skips_finished(two_datasets, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "agent=bc,td3bc",
            f"dataset={two_datasets / 'a.npz'},{two_datasets / 'b.npz'}", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"]
    first = orl("train_main", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    dirs = run_dirs(sweep)
    assert len(dirs) == 8
    # laid out by the sweep's parameters
    assert all("agent=" in d.name and "seed=" in d.name and "dataset=" in d.name for d in dirs)
    assert {d.parent for d in dirs} == {sweep}
    mtimes = {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in dirs}

    second = orl("train_main", *args, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stdout.count("already finished") == 8
    assert {d: (d / "metrics.jsonl").stat().st_mtime_ns for d in run_dirs(sweep)} == mtimes  # nothing re-ran

    from orl.report import main

    assert main([str(sweep), "--reps", "100"]) == 0
    report = json.loads((sweep / "report" / "summary.json").read_text())
    assert len(report["runs"]) == 8
    assert {(row["dataset"], row["agent"], row["n"]) for row in report["per_dataset"]} == {
        (str(two_datasets / f"{d}.npz"), agent, 2) for d in "ab" for agent in ("bc", "td3bc")}
    assert set(report["aggregates"]) == {"bc", "td3bc"} and "bc > td3bc" in report["improvements"]
    for name in ("report.md", "runs.csv", "curves.png", "profiles.png"):
        assert (sweep / "report" / name).stat().st_size > 0


def test_an_interrupted_sweep_run_resumes_from_its_checkpoint(two_datasets, tmp_path):
    import signal
    import time

    sweep = tmp_path / "sweep"
    # killed within ~50 ms of its first checkpoint (step 100 of 2000): far from the end on any machine
    args = ["-m", "agent=bc", f"dataset={two_datasets / 'a.npz'}", *TINY, "steps=2000", "eval.every=1000", "checkpoint.every=100",
            f"hydra.sweep.dir={sweep}"]
    code = "import sys, orl.apps.cli; sys.argv[0] = 'train_main'; orl.apps.cli.train_main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list(sweep.rglob("checkpoint.pt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # killed mid-run, after its first checkpoint
    proc.wait()
    (run_dir,) = {p.parent for p in sweep.rglob("checkpoint.pt")}
    resumed = orl("train_main", *args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "already finished" not in resumed.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/return_mean" in r] == [1000, 2000]  # one uninterrupted curve


def test_submitit_local_runs_a_job(two_datasets, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    out = orl("train_main", "-m", "hydra/launcher=submitit_local", "agent=bc", f"dataset={two_datasets / 'a.npz'}", *TINY,
              f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = run_dirs(sweep)
    assert any("eval/normalized_mean" in line for line in (run_dir / "metrics.jsonl").read_text().splitlines())


def test_optuna_sweeper_maximizes_the_final_score(two_datasets, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    sweep = tmp_path / "sweep"
    out = orl("train_main", "-m", "hydra/sweeper=orl_optuna", "hydra.sweeper.n_trials=2", "agent=iql",
              "agent.expectile=interval(0.5,0.95)", f"dataset={two_datasets / 'a.npz'}", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    finals = []
    for run_dir in run_dirs(sweep):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        finals.append([r for r in rows if "eval/normalized_mean" in r][-1]["eval/normalized_mean"])
    assert len(finals) == 2
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert best == pytest.approx(max(finals))


# ---------------------------------------------------------------------------------------------------
# orl-report on hand-made runs
def fake_run(path: Path, agent: str, dataset: str, seed: int, curve, steps: int = 1000, online_steps: int = 0,
             switch: int | None = None, online_episodes=()) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(
        f"agent:\n  name: {agent}\ndataset: {dataset}\nseed: {seed}\nsteps: {steps}\nonline:\n  steps: {online_steps}\ntag: null\n")
    rows = [{"step": step, "eval/return_mean": score, "eval/normalized_mean": score} for step, score in curve]
    if switch is not None:
        rows.append({"step": switch + 1, "train/online_step": 1.0})
    rows += [{"step": step, "online/episode_normalized": score} for step, score in online_episodes]
    rows.sort(key=lambda r: r["step"])
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_report_aggregates_equal_rliable_on_a_fixed_score_matrix(tmp_path):
    from rliable import library as rly
    from rliable import metrics

    from orl.report import aggregate_metrics, build_report, load_runs

    rng = np.random.default_rng(3)
    scores = {"x": rng.uniform(0, 100, (5, 3)), "y": rng.uniform(20, 90, (5, 3))}  # runs x datasets
    for agent, matrix in scores.items():
        for seed in range(5):
            for task in range(3):
                fake_run(tmp_path / f"{agent}-{task}-{seed}", agent, f"d{task}", seed, [(500, 0.0), (1000, float(matrix[seed, task]))])
    runs, skipped = load_runs([tmp_path])
    assert not skipped and len(runs) == 30
    report = build_report(runs, reps=500, seed=7)
    np.random.seed(7)  # rliable draws its bootstrap indices from numpy's global generator
    expected_points, expected_cis = rly.get_interval_estimates({k: v / 100 for k, v in scores.items()}, aggregate_metrics,
                                                               reps=500, random_state=np.random.RandomState(7))
    for agent in scores:
        iqm, low, high = report["aggregates"][agent]["IQM"]
        assert iqm == pytest.approx(metrics.aggregate_iqm(scores[agent] / 100))
        assert (low, high) == pytest.approx(tuple(expected_cis[agent][:, 0]))
        assert report["aggregates"][agent]["optimality gap"][0] == pytest.approx(expected_points[agent][3])
    p_expected = metrics.probability_of_improvement(scores["x"] / 100, scores["y"] / 100)
    assert report["improvements"]["x > y"][0] == pytest.approx(p_expected)


def test_report_says_how_many_runs_each_aggregate_rests_on(tmp_path):
    """Unequal seed counts: the aggregate keeps each agent's lowest seeds, as many per dataset as its sparsest has,
    and the report says so; one run per dataset is flagged (its bootstrap CI has zero width)."""
    from orl.report import build_report, load_runs, to_markdown

    for seed in range(3):
        for task in range(2):
            fake_run(tmp_path / f"x-{task}-{seed}", "x", f"d{task}", seed, [(1000, 50.0 + seed + task)])
    for seed, task in ((0, 0), (0, 1), (1, 0)):  # y has 2 seeds on d0, 1 on d1
        fake_run(tmp_path / f"y-{task}-{seed}", "y", f"d{task}", seed, [(1000, 40.0 + seed * 7)])
    runs, _ = load_runs([tmp_path])
    report = build_report(runs, reps=100)
    assert report["aggregate_runs"] == {"x": {"per_dataset": 3, "left_out": 0}, "y": {"per_dataset": 1, "left_out": 1}}
    low, high = report["aggregates"]["y"]["IQM"][1:]
    assert low == high  # the degenerate interval the note warns about
    text = to_markdown(report)
    assert "Runs per dataset in the aggregate: x 3, y 1." in text
    assert "left out: y 1 run(s)" in text
    assert "**y: one run per dataset" in text


def test_report_skips_missing_and_corrupt_metrics_by_name(tmp_path, capsys):
    from orl.report import main

    fake_run(tmp_path / "good", "bc", "d", 0, [(1000, 50.0)])
    fake_run(tmp_path / "corrupt", "bc", "d", 1, [(1000, 40.0)])
    (tmp_path / "corrupt" / "metrics.jsonl").write_text('{"step": 10, "eval/return_mean": 1.0}\nnot json\n{"step": 20}\n')
    fake_run(tmp_path / "missing", "bc", "d", 2, [(1000, 40.0)])
    (tmp_path / "missing" / "metrics.jsonl").unlink()
    fake_run(tmp_path / "unfinished", "bc", "d", 3, [(500, 40.0)])
    assert main([str(tmp_path), "--reps", "50"]) == 0
    err = capsys.readouterr().err
    for name in ("corrupt", "missing", "unfinished"):
        assert str(tmp_path / name) in err
    report = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [r["run_dir"] for r in report["runs"]] == [str(tmp_path / "good")]
    assert "Traceback" not in err


def test_offline_to_online_columns(tmp_path):
    from orl.report import load_run

    # switch at 1000: the pre-trained agent scores 40; the online phase bottoms out at 0 (a delayed collapse)
    run = load_run(fake_run(tmp_path / "a", "calql", "d", 0, [(500, 30.0), (1000, 40.0), (1500, 10.0), (3500, 0.0), (5000, 80.0)],
                            steps=1000, online_steps=4000, switch=1000, online_episodes=[(1200, 20.0), (2000, 60.0)]))
    assert (run.offline_score, run.worst_drop, run.final, run.regret) == pytest.approx((40.0, 40.0, 80.0, 0.6))
    rising = load_run(fake_run(tmp_path / "b", "calql", "d", 1, [(1000, 40.0), (1500, 45.0), (5000, 80.0)], steps=1000,
                               online_steps=4000, switch=1000))
    assert rising.worst_drop == pytest.approx(-5.0)  # negative: never below the start
    scratch = load_run(fake_run(tmp_path / "c", "sac", "d", 0, [(500, 1.0), (4000, 90.0)], steps=0, online_steps=4000, switch=0))
    assert scratch.offline_score is None and scratch.worst_drop is None and scratch.finished
    waiting = load_run(fake_run(tmp_path / "d", "calql", "d", 0, [(1000, 40.0)], steps=1000, online_steps=4000))
    assert not waiting.finished  # never reached the online phase


def test_q_around_the_switch_columns(tmp_path):
    """Q at the switch is the last offline batch's; the online peak is the highest 1000-step average in the Q_WINDOW steps
    from the first online update, so a warm-up without updates (no Q rows) shifts the window instead of eating it, and
    a densely logged noisy stretch does not beat a steadily higher one."""
    from orl.report import Q_WINDOW, build_report, load_run, to_markdown

    path = fake_run(tmp_path / "w", "wsrl", "d", 0, [(1000, 40.0), (8000, 50.0)], steps=1000, online_steps=7000, switch=1000)
    q_rows = [(900, 10.0), (1000, 12.0), (3100, 30.0), (3200, 36.0), (3300, 0.0),  # warm-up 1001-3099; first bin averages 22
              (5100, 24.0), (5600, 26.0), (3100 + Q_WINDOW, 27.0), (3101 + Q_WINDOW, 99.0)]  # bin 2: 25; bin 5: 27; 99 is outside
    with open(path / "metrics.jsonl", "a") as handle:
        handle.writelines(json.dumps({"step": step, "train/q_mean": q}) + "\n" for step, q in q_rows)
    run = load_run(path)
    assert (run.q_at_switch, run.q_peak_online) == (12.0, 27.0)
    text = to_markdown(build_report([run], reps=10))
    assert "| Q at switch | peak Q online |" in text and "| 12.0 ± 0.0 | 27.0 ± 0.0 |" in text
    scratch = fake_run(tmp_path / "s", "sac", "d", 0, [(1000, 40.0)], steps=0, online_steps=1000, switch=0)
    with open(scratch / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 500, "train/q_mean": 3.0}) + "\n")
    assert (load_run(scratch).q_at_switch, load_run(scratch).q_peak_online) == (None, None)  # no switch: no columns


def test_a_results_only_run_is_skipped_and_an_unfinished_one_is_not(tmp_path):
    from orl.apps.runs import finished_run

    done = fake_run(tmp_path / "done", "bc", "d", 0, [(500, 1.0), (1000, 2.0)])
    assert finished_run(done, 1000, 0).final == 2.0  # committed results: config + metrics, no checkpoint
    assert finished_run(done, 2000, 0) is None  # asked to go on past where it ended
    killed_early = fake_run(tmp_path / "early", "bc", "d", 0, [(500, 1.0)])  # killed before its first checkpoint
    assert finished_run(killed_early, 1000, 0) is None


def test_prefs_table_reads_tagged_sweeps_reward_models_and_bc_at_the_same_step(tmp_path, monkeypatch, capsys):
    """scripts/prefs_table.py (README's preference-learning table): one row per method, one column per label set."""
    import runpy
    import sys

    root, baselines = tmp_path / "prefs", tmp_path / "baselines"
    dataset = "orl/halfcheetah/medium-replay-v0"

    def tagged(path, tag, seed, curve, steps=10000, agent="iql"):
        run = fake_run(path, agent, dataset, seed, curve, steps=steps)
        config = run / "config.yaml"
        config.write_text(config.read_text().replace("tag: null", f"tag: '{tag}'" if tag else "tag: null"))

    for seed, score in enumerate([40.0, 44.0]):
        tagged(root / "halfcheetah-medium-replay-oracle" / f"s{seed}", "oracle_iql", seed, [(5000, 1.0), (10000, score)])
        tagged(root / "halfcheetah-medium-replay-rational-2000" / f"p{seed}", "piql@rational-2000", seed, [(10000, score - 10)])
        tagged(root / "halfcheetah-medium-replay-rational-500" / f"p{seed}", "piql@rational-500", seed, [(10000, score - 20)])
        # BC is read at step 10k of its 20k baseline runs
        tagged(baselines / f"bc{seed}", None, seed, [(10000, 7.0 + seed), (20000, 99.0)], steps=20000, agent="bc")
        rm = root / "rm" / "halfcheetah-medium-replay-rational-2000" / f"seed{seed}"
        rm.mkdir(parents=True)
        (rm / "metrics.json").write_text(json.dumps({"held_out_accuracy": 0.9 + 0.02 * seed, "reward_correlation": 0.7}))
    # a dataset with reward models and no policy runs yet: its accuracy rows, named by its label file
    (root / "rm" / "hopper-medium-replay-rational-2000" / "seed0").mkdir(parents=True)
    (root / "rm" / "hopper-medium-replay-rational-2000" / "seed0" / "metrics.json").write_text(
        json.dumps({"held_out_accuracy": 0.98, "reward_correlation": 0.9}))
    (root / "labels").mkdir()
    np.savez(root / "labels" / "hopper-medium-replay-rational-2000.npz", source="orl/hopper/medium-replay-v0")
    monkeypatch.setattr(sys, "argv", ["prefs_table.py", str(root), "--baselines", str(baselines), "--step", "10000"])
    runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "prefs_table.py"), run_name="__main__")
    table = (root / "table.md").read_text()
    assert "| method | rational, 2000 queries | rational, 500 queries |" in table
    assert "| IQL, true reward (oracle) | 42.0 ± 2.0 (n=2) | 42.0 ± 2.0 (n=2) |" in table
    assert "| BC (no reward) | 7.5 ± 0.5 (n=2) | 7.5 ± 0.5 (n=2) |" in table
    assert "| P-IQL (BT ensemble + IQL) | 32.0 ± 2.0 (n=2) | 22.0 ± 2.0 (n=2) |" in table
    assert "| reward model: held-out accuracy | 0.910 ± 0.010 (n=2) | - |" in table
    assert json.loads((root / "summary.json").read_text())["scores"][f"{dataset}|piql|rational-500"] == [20.0, 24.0]
    hopper = table[table.index("**orl/hopper/medium-replay-v0**"):]
    assert "| reward model: held-out accuracy | 0.980 ± 0.000 (n=1) |" in hopper and "P-IQL" not in hopper


def test_compare_d3rlpy_report_pairs_seeds_gives_a_verdict_and_flags_mixed_data(tmp_path, capsys):
    compare = load_script("compare_d3rlpy")
    scores = {("orl", "bc"): [50.0, 52.0], ("d3rlpy", "bc"): [49.0, 51.0], ("orl", "iql"): [40.0, 42.0], ("d3rlpy", "iql"): [60.0, 61.0]}
    for (library, agent), values in scores.items():
        for seed, value in enumerate(values):
            record = {"library": library, "agent": agent, "dataset": "d", "seed": seed, "steps": 100, "curve": {"100": value},
                      "data_sha256": "a" * 64}
            (tmp_path / f"{library}-{agent}-{seed}.json").write_text(json.dumps(record))
    table = compare.report(tmp_path)
    assert "| d | bc | 51.0 ± 1.0 (n=2) | 50.0 ± 1.0 (n=2) | +1.0 ± 0.0 | level |" in table
    assert "| d | iql | 41.0 ± 1.0 (n=2) | 60.5 ± 0.5 (n=2) | -19.5 ± 0.5 | d3rlpy ahead |" in table
    assert "different datasets" not in capsys.readouterr().err
    record = json.loads((tmp_path / "orl-bc-0.json").read_text())
    (tmp_path / "orl-bc-0.json").write_text(json.dumps({**record, "data_sha256": "b" * 64}))
    compare.report(tmp_path)
    assert "the runs on d trained on 2 different datasets" in capsys.readouterr().err


def test_profile_updates_measures_calql_and_counts_the_cql_work():
    """scripts/profile_updates.py (docs/speed.md) runs Cal-QL, whose bound needs returns-to-go in the batch, and its
    flop count is CQL's: 3 x 10 sampled actions per state through the 2 critics make CQL ~20x TD3+BC's work."""
    import gymnasium as gym

    script = load_script("profile_updates")
    obs_space = gym.spaces.Box(-np.inf, np.inf, (11,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    batch = script.fixed_batch(11, 3)
    rows = {name: script.measure(name, batch, 1, obs_space, action_space, warmup=1) for name in ("td3bc", "cql", "calql")}
    assert rows["calql"]["gflop_per_update"] == rows["cql"]["gflop_per_update"] == pytest.approx(8.525, abs=1e-3)
    assert rows["td3bc"]["gflop_per_update"] == pytest.approx(0.404, abs=1e-3)
    assert all(row["updates_per_s"] > 0 for row in rows.values())
