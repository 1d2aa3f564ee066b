"""Gradient updates per second for each orl agent, against d3rlpy in the same run.

Synthetic Hopper-shaped data (100k transitions, obs 11, action 3), batch 256, each agent's default
networks; median over repeats. A training step is "draw a batch from the dataset + one update":
orl's timing is exactly that (batch drawn from its device buffer). d3rlpy is timed twice: the same
full step (its own `dataset.sample_transition_batch` + `algo.update`), and `algo.update` alone on
pre-built batches, which leaves out its sampling cost and so favours d3rlpy.

d3rlpy pins an older gymnasium, so it usually lives in its own virtual environment: pass its python
with --d3rlpy-python and this script runs the d3rlpy half there, in the same invocation.

    python scripts/bench_updates.py --d3rlpy-python /path/to/d3rlpy-venv/bin/python --out results/bench_updates.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OBS_DIM, ACTION_DIM, BATCH, DATASET = 11, 3, 256, 100_000
ORL_AGENTS = ["bc", "td3bc", "iql", "sac", "cql", "calql", "awac", "a2pr", "famo2o_iql"]


def _wsrl_recipes() -> dict[str, tuple[str, dict, int, bool]]:
    """WSRL's two phases exactly as configs/agent/wsrl.yaml sets them: name -> (agent, options, batch, online).

    Pre-training: 10-member LayerNorm CQL, one update per batch of 256. Fine-tuning (after
    on_online_start): SAC on batches of online.online_batch_size, split into the recipe's critic minibatches.
    """
    from omegaconf import OmegaConf

    recipe = OmegaConf.load(Path(__file__).resolve().parent.parent / "configs" / "agent" / "wsrl.yaml")
    options = OmegaConf.to_container(recipe.agent, resolve=True)
    name = options.pop("name")
    return {"wsrl_pretrain": (name, options, BATCH, False), "wsrl_online": (name, options, int(recipe.online.online_batch_size), True)}


# Only the recipes' names at import: the d3rlpy worker runs this file with d3rlpy's own python, which has neither
# orl nor omegaconf, so the recipes themselves are loaded (with omegaconf) where orl is timed.
RECIPE_NAMES = ("wsrl_pretrain", "wsrl_online")


def __getattr__(name: str):  # bench_updates.RECIPES from outside: loaded on first access, not at import
    if name == "RECIPES":
        return _wsrl_recipes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
D3RLPY_AGENTS = {"td3bc": "TD3PlusBCConfig", "iql": "IQLConfig", "bc": "BCConfig", "sac": "SACConfig", "cql": "CQLConfig", "awac": "AWACConfig"}


def time_updates(update, n_updates: int, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        update()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n_updates):
            update()
        rates.append(n_updates / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_orl(names: list[str], device: str, n_updates: int, repeats: int, precision: str = "fp32") -> dict[str, float]:
    import gymnasium as gym
    import torch

    import orl
    from orl.agent import AGENTS, _import_agents
    from orl.buffer import TransitionBuffer

    _import_agents()
    rng = np.random.default_rng(0)
    buffer = TransitionBuffer(DATASET, OBS_DIM, ACTION_DIM, device, with_returns=True)
    buffer.add_batch(
        obs=rng.standard_normal((DATASET, OBS_DIM)),
        actions=rng.uniform(-1, 1, (DATASET, ACTION_DIM)),
        rewards=rng.standard_normal(DATASET),
        next_obs=rng.standard_normal((DATASET, OBS_DIM)),
        terminals=(rng.random(DATASET) < 0.01),
        returns_to_go=rng.standard_normal(DATASET),
    )
    obs_space = gym.spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (ACTION_DIM,), np.float32)
    generator = torch.Generator(device=device).manual_seed(0)
    results = {}
    recipes = _wsrl_recipes()
    for name in names:
        agent_name, options, batch_size, online = recipes.get(name, (name, {}, BATCH, False))
        if agent_name not in AGENTS:
            continue
        torch.manual_seed(0)
        agent = orl.make_agent(agent_name, obs_space, action_space, options, device=device, precision=precision)
        if online:
            agent.on_online_start()
        warmup = 5 if name in recipes else 20  # the recipes are 10-50x slower per update
        results[name] = time_updates(lambda: agent.update(buffer.sample(batch_size, generator)), n_updates, repeats, warmup)
        print(f"orl    {name:12s} {precision} {results[name]:8.1f} updates/s", file=sys.stderr)
    return results


def bench_d3rlpy(names: list[str], n_updates: int, repeats: int) -> dict[str, float]:
    import d3rlpy
    import torch
    from d3rlpy.dataset import TransitionMiniBatch

    torch.set_num_threads(torch.get_num_threads())
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(8):
        batch = TransitionMiniBatch(
            observations=rng.standard_normal((BATCH, OBS_DIM)).astype(np.float32),
            actions=rng.uniform(-1, 1, (BATCH, ACTION_DIM)).astype(np.float32),
            rewards=rng.standard_normal((BATCH, 1)).astype(np.float32),
            next_observations=rng.standard_normal((BATCH, OBS_DIM)).astype(np.float32),
            next_actions=rng.uniform(-1, 1, (BATCH, ACTION_DIM)).astype(np.float32),
            terminals=(rng.random((BATCH, 1)) < 0.01).astype(np.float32),
            intervals=np.ones((BATCH, 1), np.float32),
            transitions=[],
        )
        batches.append(batch)
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    dataset = d3rlpy.dataset.MDPDataset(
        observations=rng.standard_normal((DATASET, OBS_DIM)).astype(np.float32), actions=rng.uniform(-1, 1, (DATASET, ACTION_DIM)).astype(np.float32),
        rewards=rng.standard_normal(DATASET).astype(np.float32), terminals=(rng.random(DATASET) < 0.01).astype(np.float32), timeouts=np.zeros(DATASET),
    )
    results = {}
    for name in names:
        if name not in D3RLPY_AGENTS:
            continue
        algo = getattr(d3rlpy.algos, D3RLPY_AGENTS[name])().create(device="cpu:0")
        algo.create_impl((OBS_DIM,), ACTION_DIM)
        counter = iter(range(10**12))
        update_only = time_updates(lambda: algo.update(batches[next(counter) % len(batches)]), n_updates, repeats, warmup=20)
        full_step = time_updates(lambda: algo.update(dataset.sample_transition_batch(BATCH)), n_updates, repeats, warmup=20)
        results[name] = {"update_only": update_only, "sample_and_update": full_step}
        print(f"d3rlpy {name:12s} {full_step:8.1f} steps/s ({update_only:.1f} update only)", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", nargs="+", default=ORL_AGENTS)
    parser.add_argument("--updates", type=int, default=300, help="updates per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--d3rlpy-python", default=None, help="python of an environment with d3rlpy (default: this one, if it has d3rlpy)")
    parser.add_argument("--only-d3rlpy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write the raw numbers as JSON here")
    parser.add_argument("--bf16", action="store_true", help="also time orl with precision=bf16 and report the bf16 / fp32 ratio "
                        "(agents may include the recipes " + ", ".join(RECIPE_NAMES) + ")")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.only_d3rlpy:
        print(json.dumps(bench_d3rlpy(args.agents, args.updates, args.repeats)))
        return

    orl_rates: dict[str, float] = {}
    bf16_rates: dict[str, float] = {}
    for name in args.agents:  # fp32 and bf16 back to back per agent, so both see the same machine load
        orl_rates.update(bench_orl([name], args.device, args.updates, args.repeats))
        if args.bf16:
            bf16_rates.update(bench_orl([name], args.device, args.updates, args.repeats, "bf16"))
    d3_rates: dict[str, float] = {}
    d3_python = args.d3rlpy_python
    if d3_python is None:
        try:
            import d3rlpy  # noqa: F401

            d3_python = sys.executable
        except ImportError:
            print("d3rlpy not importable here and no --d3rlpy-python given: timing orl only", file=sys.stderr)
    if d3_python is not None:
        cmd = [d3_python, __file__, "--only-d3rlpy", "--agents", *args.agents, "--updates", str(args.updates), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
        else:
            d3_rates = json.loads(out.stdout.strip().splitlines()[-1])

    print(f"\nupdates/s, batch {BATCH}, obs {OBS_DIM}, action {ACTION_DIM}, device {args.device}, {args.threads} thread(s), median of {args.repeats} x {args.updates}\n")
    print("| agent | orl: sample + update | d3rlpy: sample + update | orl / d3rlpy | d3rlpy: update only | orl / d3rlpy update only |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rate in orl_rates.items():
        d3 = d3_rates.get(name)
        if d3:
            full, only = d3["sample_and_update"], d3["update_only"]
            print(f"| {name} | {rate:.0f} | {full:.0f} | {rate / full:.2f}x | {only:.0f} | {rate / only:.2f}x |")
        else:
            print(f"| {name} | {rate:.0f} | - | - | - | - |")
    if bf16_rates:
        print("\n| agent | fp32 updates/s | bf16 updates/s | bf16 / fp32 |\n|---|---:|---:|---:|")
        for name, rate in bf16_rates.items():
            print(f"| {name} | {orl_rates[name]:.1f} | {rate:.1f} | {rate / orl_rates[name]:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "orl": orl_rates, "orl_bf16": bf16_rates, "d3rlpy": d3_rates, "device": args.device, "threads": args.threads,
            "updates": args.updates, "repeats": args.repeats, "machine": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d"),
        }, indent=2))


if __name__ == "__main__":
    main()
