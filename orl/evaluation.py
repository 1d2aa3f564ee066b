"""Score any agent on any gymnasium environment with vectorized episodes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import gymnasium as gym
import numpy as np


@dataclass
class EvalResult:
    returns: np.ndarray
    lengths: np.ndarray
    normalized: np.ndarray | None = None
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def mean_return(self) -> float:
        return float(self.returns.mean())

    @property
    def mean_normalized(self) -> float | None:
        return None if self.normalized is None else float(self.normalized.mean())

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        out = {
            f"{prefix}return_mean": self.mean_return,
            f"{prefix}return_std": float(self.returns.std()),
            f"{prefix}length_mean": float(self.lengths.mean()),
        }
        if self.normalized is not None:
            out[f"{prefix}normalized_mean"] = float(self.normalized.mean())
            out[f"{prefix}normalized_std"] = float(self.normalized.std())
        out.update({prefix + k: v for k, v in self.extra.items()})
        return out


def evaluate(
    agent,
    env: str | Callable[[], gym.Env],
    episodes: int = 10,
    seed: int = 0,
    deterministic: bool = True,
    ref_scores: tuple[float, float] | None = None,
    max_parallel: int = 50,
) -> EvalResult:
    """Run `episodes` full episodes, `max_parallel` environments stepped together in one vector env.

    Episode i is seeded with `seed + i`, so two evaluations with the same seed see the same starts.
    `ref_scores=(min, max)` adds D4RL normalized scores.
    """
    env_fn = (lambda: gym.make(env)) if isinstance(env, str) else env
    returns, lengths = [], []
    for start in range(0, episodes, max_parallel):
        n = min(max_parallel, episodes - start)
        vec = gym.vector.SyncVectorEnv([env_fn for _ in range(n)])
        try:
            obs, _ = vec.reset(seed=[seed + start + i for i in range(n)])
            done = np.zeros(n, dtype=bool)
            ep_return = np.zeros(n)
            ep_length = np.zeros(n, dtype=np.int64)
            while not done.all():
                action = agent.act(obs, deterministic=deterministic)
                obs, reward, terminated, truncated, _ = vec.step(action)
                active = ~done
                ep_return[active] += reward[active]
                ep_length[active] += 1
                done |= terminated | truncated
        finally:
            vec.close()
        returns.append(ep_return)
        lengths.append(ep_length)
    result = EvalResult(np.concatenate(returns), np.concatenate(lengths))
    if ref_scores is not None:
        low, high = ref_scores
        result.normalized = 100.0 * (result.returns - low) / (high - low)
    return result
