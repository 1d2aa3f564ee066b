import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py (scripts are not a package) so a test can call its functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

try:
    # rliable (orl-report) imports absl.logging, whose handler keeps the sys.stderr of the moment (here pytest's
    # capture) and closes it when hydra's logging setup replaces the handlers: pytest's capture then fails.
    # Pointing it at the real stderr, which absl never closes, keeps in-process CLI tests independent.
    import absl.logging

    absl.logging.get_absl_handler().python_handler.stream = sys.__stderr__
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _isolated_data_dirs(tmp_path_factory, monkeypatch):
    """Every test writes Minari/D4RL data under a temporary root, never the user's."""
    root = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root / "minari"))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(root / "d4rl"))


def random_pendulum_arrays(n: int = 1000, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform-random Pendulum-v1 transitions in D4RL layout (timeouts every 200 steps)."""
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")}
    for _ in range(n):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(out, (obs, action, reward, next_obs, terminated, truncated)):
            out[key].append(value)
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


@pytest.fixture(scope="session")
def pendulum_collection(tmp_path_factory):
    """One small run of the collection pipeline, shared by the tests that need collected data."""
    from orl.apps.collect import CollectConfig, collect

    root = tmp_path_factory.mktemp("collection")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root / "minari")
    torch.manual_seed(0)
    cfg = CollectConfig(env="Pendulum-v1", size=2000, sac_steps=4500, random_steps=1000, snapshot_every=500,
                        snapshot_episodes=3, ref_episodes=10, seed=0, work_dir=str(root / "work"), progress=False)
    try:
        ids = collect(cfg)
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH")
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    return {"ids": ids, "minari_root": str(root / "minari"), "work": root / "work" / "pendulum" / "seed0", "cfg": cfg}


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """The embedded tiny GPT-2 and tokenizer, trained once per test session (a few seconds)."""
    pytest.importorskip("transformers", reason="the LM extra is not installed (pip install -e .[lm])")
    from orl.text.runtime import load_lm
    from orl.envs.tiny_lm import build_tiny_lm

    path = build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), steps=300, n_lines=5000, arithmetic_lines=0)
    model, tokenizer = load_lm(str(path))
    return {"path": str(path), "model": model, "tokenizer": tokenizer}
