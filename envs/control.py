"""Control tasks: gymnasium MuJoCo (the v5 counterparts of D4RL's tasks) and any other gymnasium id."""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

# D4RL-era names map to the maintained gymnasium MuJoCo versions.
ALIASES = {
    "hopper": "Hopper-v5",
    "halfcheetah": "HalfCheetah-v5",
    "walker2d": "Walker2d-v5",
    "ant": "Ant-v5",
}


def make_env(env_id: str, seed: int | None = None, **kwargs: Any) -> gym.Env:
    """Create an environment by gymnasium id (or a short alias such as ``hopper``).

    Continuous action spaces that are not symmetric around zero are rescaled to [-1, 1], the range
    every agent in orl acts in.
    """
    env_id = ALIASES.get(env_id, env_id)
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.Error as exc:
        raise ValueError(f"cannot create environment {env_id!r}: {exc}") from exc
    space = env.action_space
    if isinstance(space, gym.spaces.Box) and not (np.allclose(space.low, -space.high) and np.allclose(space.high, space.high.flat[0])):
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env
