"""Where an agent's update time goes: updates/s side by side on one fixed batch, floating-point work per update
(torch.utils.flop_counter, forward + backward), and the achieved GFLOP/s, so a slow agent can be told apart from a
wasteful one; `--profile <agent>` adds cProfile's top entries.

    python scripts/profile_updates.py --agents td3bc iql a2pr --out results/profile_updates.json

An agent whose GFLOP/s matches the fast ones does the work its networks need and nothing more; a lower GFLOP/s is
overhead worth removing (Python, small kernels, host syncs).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import orl
from orl.buffer import Batch
from orl.provenance import software


def fixed_batch(obs_dim: int, action_dim: int, size: int = 256) -> Batch:
    g = torch.Generator().manual_seed(0)
    # returns_to_go: Cal-QL's bound reads it; the other agents ignore it
    return Batch(obs=torch.randn(size, obs_dim, generator=g), actions=torch.rand(size, action_dim, generator=g) * 2 - 1,
                 rewards=torch.randn(size, generator=g), next_obs=torch.randn(size, obs_dim, generator=g), terminals=torch.zeros(size),
                 returns_to_go=torch.randn(size, generator=g) * 10)


def measure(name: str, batch: Batch, updates: int, obs_space, action_space, warmup: int = 20) -> dict:
    agent = orl.make_agent(name, obs_space, action_space)
    for _ in range(warmup):
        agent.update(batch)
    flops = 0
    for _ in range(2):  # agents with a delayed actor step alternate between two kinds of update
        with FlopCounterMode(display=False) as counter:
            agent.update(batch)
        flops += counter.get_total_flops() / 2
    start = time.perf_counter()
    for _ in range(updates):
        agent.update(batch)
    rate = updates / (time.perf_counter() - start)
    return {"updates_per_s": round(rate, 2), "gflop_per_update": round(flops / 1e9, 3), "gflop_per_s": round(rate * flops / 1e9, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", nargs="+", default=["td3bc", "iql", "a2pr"])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--obs-dim", type=int, default=11)  # Hopper
    parser.add_argument("--action-dim", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (orl's runs default to 1)")
    parser.add_argument("--profile", default=None, help="an agent to run under cProfile (100 updates)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    obs_space = gym.spaces.Box(-np.inf, np.inf, (args.obs_dim,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (args.action_dim,), np.float32)
    batch = fixed_batch(args.obs_dim, args.action_dim)
    results = {name: measure(name, batch, args.updates, obs_space, action_space) for name in args.agents}
    for name, row in results.items():
        print(f"{name:8s} {row['updates_per_s']:8.1f} updates/s  {row['gflop_per_update']:6.3f} GFLOP/update  {row['gflop_per_s']:6.2f} GFLOP/s")
    report = {"command": "python scripts/profile_updates.py " + " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                                                                           for k, v in vars(args).items() if v is not None),
              "batch_size": 256, "results": results, **software()}
    if args.profile:
        agent = orl.make_agent(args.profile, obs_space, action_space)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(100):
            agent.update(batch)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
        report["profile_top_tottime"] = text.getvalue().splitlines()[-20:]
        print("\n".join(report["profile_top_tottime"]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
