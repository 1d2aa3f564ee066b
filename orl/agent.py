"""The one agent interface and the registry that maps names to agent classes.

An agent turns a `Batch` into gradient steps (`update`) and an observation into an action (`act`).
Networks live in `self.nets` (an `nn.ModuleDict`), optimizers in `self.optimizers`; `state_dict`
captures both plus the observation statistics, so a loaded agent acts on raw observations.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any, Callable, Mapping

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from orl.buffer import Batch, TransitionBuffer
from orl.errors import CheckpointError, ConfigError
from orl.nn import set_precision

if TYPE_CHECKING:
    from orl.data import OfflineDataset

AGENTS: dict[str, type["Agent"]] = {}


def register(name: str) -> Callable[[type["Agent"]], type["Agent"]]:
    def decorator(cls: type["Agent"]) -> type["Agent"]:
        if name in AGENTS and AGENTS[name] is not cls:
            raise ValueError(f"agent name {name!r} is already registered by {AGENTS[name].__module__}")
        AGENTS[name] = cls
        cls.name = name
        return cls

    return decorator


class Agent(abc.ABC):
    """Base class. Subclasses define `Config` (a dataclass), build `self.nets` / `self.optimizers`
    in `__init__`, and implement `update` and `_act`."""

    name: str = "agent"
    Config: type = object
    # What the agent trains on: None = control transitions (a Batch from a dataset / replay buffer); text
    # agents name their rows ("rewarded", "pairs", "prompts": see orl/apps/lm_run.py).
    data_kind: str | None = None

    def __init__(self, obs_space: gym.spaces.Box, action_space: gym.spaces.Space, cfg: Any, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.device = torch.device(device)
        # Token-level LM agents observe dicts of ids (no flat shape): obs_dim is 0 for them.
        self.obs_dim = int(np.prod(obs_space.shape)) if getattr(obs_space, "shape", None) else 0
        if isinstance(action_space, gym.spaces.Box):
            self.action_dim = int(np.prod(action_space.shape))
            high = np.asarray(action_space.high, dtype=np.float32)
            if not np.allclose(high, high.flat[0]) or not np.allclose(action_space.low, -high):
                raise ValueError(
                    f"{type(self).__name__} needs a symmetric action box with one bound, got low={action_space.low} high={high}; "
                    "wrap the env with gymnasium.wrappers.RescaleAction(env, -1, 1)"
                )
            self.max_action = float(high.flat[0])
        else:
            self.action_dim = 0
            self.max_action = 1.0
        self.nets = nn.ModuleDict()
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.obs_mean = torch.zeros(self.obs_dim, device=self.device)
        self.obs_std = torch.ones(self.obs_dim, device=self.device)
        self.step = 0

    # --- interface -----------------------------------------------------------------------
    @abc.abstractmethod
    def update(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One gradient step (or one group of steps). Returns detached scalar tensors; the trainer
        converts them to floats only when it logs, so no device sync happens on other steps."""

    @abc.abstractmethod
    def _act(self, obs: torch.Tensor, deterministic: bool) -> torch.Tensor:
        """Action for a batch of *normalized* observations on the agent's device."""

    @torch.no_grad()
    def act(self, obs: np.ndarray | torch.Tensor, deterministic: bool = True) -> np.ndarray:
        """Action(s) for raw (unnormalized) observation(s); accepts (obs_dim,) or (n, obs_dim)."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        single = obs_t.dim() == 1
        if single:
            obs_t = obs_t.unsqueeze(0)
        obs_t = (obs_t - self.obs_mean) / self.obs_std
        was_training = self.nets.training
        self.nets.eval()
        action = self._act(obs_t, deterministic)
        self.nets.train(was_training)
        out = action.cpu().numpy()
        return out[0] if single else out

    def set_obs_normalizer(self, mean: np.ndarray, std: np.ndarray) -> None:
        self.obs_mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device)
        self.obs_std = torch.as_tensor(std, dtype=torch.float32, device=self.device)

    # Data hooks: the trainer and the apps call them without knowing which agent they talk to, so an agent that
    # needs more than transitions (Monte-Carlo returns, labelled segments) builds it here, in its own file.
    # True: the online replay buffer keeps a `returns_to_go` field, which the agent fills in `on_episode_end`,
    # and online batches come from finished episodes only.
    needs_returns_to_go: bool = False

    def make_offline_buffer(self, dataset: "OfflineDataset", *, raw_dataset: "OfflineDataset", batch_size: int,
                            online_steps: int) -> Any:
        """The sampler of the offline phase (anything with `sample(batch_size, generator)`, `__len__`, `state_dict`).

        `dataset` is the prepared data (normalized observations, transformed rewards), `raw_dataset` the data as
        loaded (what label files are checked against). Default: every transition of `dataset`."""
        return TransitionBuffer.from_dataset(dataset, self.device)

    # Online-phase hooks; agents override what they need.
    def on_online_start(self, **context: Any) -> None:
        """Called once when the trainer switches from offline data to environment interaction."""

    def on_episode_end(self, **context: Any) -> None:
        """Called after each finished online episode with `trainer`, `episode_return`, `episode_length`, and
        `buffer`, `start`, `end`: the rows [start, end) of the online buffer that the episode wrote."""

    # --- state ---------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """State outside `nets`/`optimizers` (e.g. SAC's log-alpha); the base agent has none."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned; the base agent has nothing to restore."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "config": dataclasses.asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else dict(self.cfg),
            "nets": self.nets.state_dict(),
            "optimizers": {k: opt.state_dict() for k, opt in self.optimizers.items()},
            "schedulers": {k: sch.state_dict() for k, sch in self.schedulers.items()},
            "obs_mean": self.obs_mean.cpu(),
            "obs_std": self.obs_std.cpu(),
            "step": self.step,
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, load_optimizers: bool = True) -> None:
        if state.get("name", self.name) != self.name:
            raise CheckpointError(f"checkpoint holds a {state['name']!r} agent, not {self.name!r}")
        self.nets.load_state_dict(state["nets"], strict=strict)
        if load_optimizers:
            for key, opt_state in state.get("optimizers", {}).items():
                if key in self.optimizers:
                    optimizer = self.optimizers[key]
                    configured_lrs = [group["lr"] for group in optimizer.param_groups]
                    optimizer.load_state_dict(opt_state)
                    if key not in self.schedulers:
                        # An optimizer state carries the rate it was last stepped with (a decayed one
                        # when pre-training had a schedule); without a schedule now, the configured rate holds.
                        for group, lr in zip(optimizer.param_groups, configured_lrs):
                            group["lr"] = lr
            for key, sch_state in state.get("schedulers", {}).items():
                if key in self.schedulers:
                    self.schedulers[key].load_state_dict(sch_state)
        self.set_obs_normalizer(state["obs_mean"], state["obs_std"])
        self.step = int(state.get("step", 0))
        self.load_extra_state(state.get("extra", {}))


def _import_agents() -> None:
    """Discover agents: every module of the `orl.agents` package registers itself on import, and installed
    packages can add their own through the `orl.agents` entry-point group (`name = "package.module"`)."""
    from importlib.metadata import entry_points

    package = importlib.import_module("orl.agents")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"orl.agents.{module.name}")
    for entry in entry_points(group="orl.agents"):
        importlib.import_module(entry.value.split(":", 1)[0])


def build_config(cls: type[Agent], cfg: Mapping[str, Any] | Any | None) -> Any:
    """Turn a mapping (e.g. a hydra node) into the agent's Config dataclass, rejecting unknown keys."""
    if cfg is None:
        return cls.Config()
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return cfg
    values = {k: v for k, v in dict(cfg).items() if k != "name"}
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for agent {cls.name!r} (agent.<option>=...); valid options: {sorted(known)}")
    for f in dataclasses.fields(cls.Config):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls.Config(**values)


def agent_class(name: str) -> type[Agent]:
    """The registered class of agent `name` (ConfigError naming the available ones)."""
    _import_agents()
    if name not in AGENTS:
        raise ConfigError(f"unknown agent {name!r}; available: {sorted(AGENTS)}")
    return AGENTS[name]


def make_agent(
    name: str,
    obs_space: gym.spaces.Space,
    action_space: gym.spaces.Space,
    cfg: Mapping[str, Any] | Any | None = None,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> Agent:
    """Build a registered agent by name, e.g. ``make_agent("iql", env.observation_space, env.action_space)``.

    precision="bf16" runs the hidden layers of the agent's MLPs in bfloat16 (fp32 weights and heads;
    see orl.nn.LayerStack): several times faster on AMX CPUs and tensor-core GPUs.
    """
    cls = agent_class(name)
    agent = cls(obs_space, action_space, build_config(cls, cfg), device)
    set_precision(agent.nets, precision)
    return agent
