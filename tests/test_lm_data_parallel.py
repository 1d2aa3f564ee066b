"""Data parallelism for the LM agents on accelerate (issue 12): two processes take the steps one process
takes with the same global batch.

On a CPU machine the two processes come from `accelerate launch --multi_gpu --num_processes 2` (torchrun
underneath; orl's processes then join a gloo group): accelerate 1.15's `--cpu --num_processes 2` starts a
single process (its multi-CPU mode needs MPI), which would make this test pass vacuously.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from orl.logger import read_metrics  # noqa: E402
from tests.lm_archs import build_tiny_causal_lm  # noqa: E402

PROMPTS = ["count: 3 4", "count: 10", "count: 7 8 9", "count: 1", "count: 20 21", "count: 5", "count: 30", "count: 2 3"]
GOOD = ["5 6", "11 12", "10 11", "2 3", "22 23", "6 7", "31", "4 5"]
BAD = ["2 1", "3", "1 0", "0", "4", "1 1", "2", "1"]


def orl_train(tmp_path, processes: int, agent: str, data, run_dir, model, *extra):
    args = [f"agent={agent}", f"dataset={data}", f"lm.model={model}", "lm.reward=increasing_numbers", "batch_size=4", "steps=3", "eval.every=0", "log.every=1",
            "checkpoint.every=3", "log.progress=false", "log.tensorboard=false", "device=cpu", f"run_dir={run_dir}", *extra]
    launcher = [sys.executable, "-m", "orl.apps.cli"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "orl.apps.cli"]
    out = subprocess.run([*launcher, *args], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    if processes > 1:
        assert f"process 1 of {processes}" in out.stdout  # really data-parallel
    return [r for r in read_metrics(run_dir) if "train/loss" in r]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    model = build_tiny_causal_lm("llama", root / "llama")
    pairs, rewarded = root / "pairs.jsonl", root / "rewarded.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": g, "rejected": b}) + "\n" for p, g, b in zip(PROMPTS, GOOD, BAD)))
    rewarded.write_text("".join(json.dumps({"prompt": p, "response": r, "reward": float(i % 3) / 2})
                                + "\n" for i, (p, r) in enumerate(zip(PROMPTS * 2, GOOD + BAD))))
    return {"model": model, "dpo": pairs, "alol": rewarded}


@pytest.mark.parametrize("agent", ["dpo", "alol"])
def test_two_processes_follow_one_process_with_the_same_global_batch(setting, agent, tmp_path):
    # a large learning rate, so that a step on half the batch (no gradient averaging) shows in the next loss
    extra = ["agent.lr=0.05"] + (["lm.max_new_tokens=3", "lm.num_eval_prompts=4", "agent.value_epochs=1"] if agent == "alol" else [])
    one = orl_train(tmp_path, 1, agent, setting[agent], tmp_path / "one", setting["model"], *extra)
    two = orl_train(tmp_path, 2, agent, setting[agent], tmp_path / "two", setting["model"], *extra)
    assert [r["step"] for r in two] == [1, 2, 3]  # written once, by process 0
    for single, parallel in zip(one, two):
        assert parallel["train/loss"] == pytest.approx(single["train/loss"], rel=1e-4, abs=1e-6)
        assert parallel["train/grad_norm"] == pytest.approx(single["train/grad_norm"], rel=1e-4, abs=1e-6)
    assert len({round(r["train/loss"], 6) for r in one}) > 1  # the loss moves: the steps are real updates


def test_rloo_trains_data_parallel(setting, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    rows = orl_train(tmp_path, 2, "rloo", prompts, tmp_path / "rloo", setting["model"], "agent.max_completion_length=3",
                     "agent.num_generations=2", "lm.max_new_tokens=3", "lm.num_eval_prompts=2")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) and "train/kl" in r for r in rows)
    assert (tmp_path / "rloo" / "hf" / "config.json").exists()
