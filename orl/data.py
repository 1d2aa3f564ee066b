"""The dataset layer: load, validate and transform offline data, whatever its source.

`make_dataset(spec)` accepts
  * a path to a D4RL-keyed ``.hdf5``/``.h5`` or ``.npz`` file,
  * a D4RL name (``hopper-medium-v2``), resolved to its HDF5 file under ``$D4RL_DATASET_DIR`` or
    ``~/.d4rl/datasets/``,
  * a Minari dataset id (``mujoco/hopper/medium-v0`` or a locally collected ``orl/...`` id).

Every source ends up as one `OfflineDataset` of flat transition arrays plus metadata (env id,
reference scores). Timeouts are kept apart from terminals: a timeout ends a trajectory but does not
zero the bootstrap.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orl.errors import DataError, DataFileNotFound
from orl.io import atomic_path

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
# |r| beyond this overflows float32 (max 3.4e38) in a return of horizon 1 / (1 - gamma) ~ 1e3-1e4, with margin.
REWARD_LIMIT = 1e30

# D4RL gym-mujoco v2 reference scores (d4rl/infos.py), used for the normalized score.
D4RL_REF_SCORES = {
    "halfcheetah": (-280.178953, 12135.0),
    "hopper": (-20.272305, 3234.3),
    "walker2d": (1.629008, 4592.3),
    "ant": (-325.6, 3879.7),
}
D4RL_ENVS = {"halfcheetah": "HalfCheetah-v5", "hopper": "Hopper-v5", "walker2d": "Walker2d-v5", "ant": "Ant-v5"}
_D4RL_NAME = re.compile(
    r"^(?P<env>halfcheetah|hopper|walker2d|ant)-(?P<level>random|medium|medium-replay|medium-expert|expert|full-replay)-v(?P<version>[0-2])$"
)


class DatasetError(DataError):
    """A dataset that cannot be used as given; the message says what is wrong and how to fix it."""


@dataclass
class OfflineDataset:
    """Flat (s, a, r, s', terminal, timeout) arrays plus what is known about their origin."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    env_id: str | None = None
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    source: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def normalized_score(self, returns: np.ndarray | float) -> np.ndarray | float:
        """D4RL normalized score: 100 * (R - ref_min) / (ref_max - ref_min)."""
        if self.ref_min_score is None or self.ref_max_score is None:
            raise DatasetError(
                f"dataset {self.source!r} has no reference scores; pass ref_min_score and ref_max_score "
                "(CLI: dataset.ref_min_score=... dataset.ref_max_score=...)"
            )
        return 100.0 * (np.asarray(returns) - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)

    # --- trajectory structure -------------------------------------------------------------
    def episode_ends(self) -> np.ndarray:
        """Boolean mask: True where a trajectory ends (terminal, timeout, or a break in s' -> s)."""
        ends = (self.terminals > 0) | (self.timeouts > 0)
        if len(self) > 1:
            discontinuity = np.any(self.next_observations[:-1] != self.observations[1:], axis=1)
            ends[:-1] |= discontinuity
        ends[-1] = True
        return ends

    def episode_ids(self) -> np.ndarray:
        """Index of each transition's trajectory (0, 0, ..., 1, 1, ...)."""
        return np.concatenate([[0], np.cumsum(self.episode_ends()[:-1])])

    def episode_returns(self) -> np.ndarray:
        return np.bincount(self.episode_ids(), weights=self.rewards.astype(np.float64))

    def returns_to_go(self, discount: float) -> np.ndarray:
        """Discounted Monte-Carlo return-to-go of each transition within its trajectory.

        A terminal or timeout ends the sum (no bootstrap beyond the data), as Cal-QL's official code does.
        """
        ends = self.episode_ends()
        out = np.empty(len(self), dtype=np.float64)
        running = 0.0
        rewards = self.rewards.astype(np.float64)
        for t in range(len(self) - 1, -1, -1):
            if ends[t]:
                running = 0.0
            running = rewards[t] + discount * running
            out[t] = running
        return out.astype(np.float32)

    # --- I/O ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write a D4RL-keyed `.npz` or `.hdf5` file (with env id and reference scores when known)."""
        arrays = {
            "observations": self.observations,
            "actions": self.actions,
            "rewards": self.rewards,
            "next_observations": self.next_observations,
            "terminals": self.terminals,
            "timeouts": self.timeouts,
        }
        meta = {k: v for k, v in [("env_id", self.env_id), ("ref_min_score", self.ref_min_score), ("ref_max_score", self.ref_max_score)] if v is not None}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix not in (".npz", ".hdf5", ".h5"):
            raise DatasetError(f"cannot save to {path}: use a .npz, .hdf5 or .h5 suffix")
        with atomic_path(path) as tmp:
            if path.suffix == ".npz":
                np.savez(tmp, **arrays, **{k: np.asarray(v) for k, v in meta.items()})
            else:
                import h5py

                with h5py.File(tmp, "w") as f:
                    for k, v in arrays.items():
                        f.create_dataset(k, data=v)
                    for k, v in meta.items():
                        f.attrs[k] = v


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def make_dataset(
    spec: str | os.PathLike,
    env_id: str | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    download: bool = True,
) -> OfflineDataset:
    """Load a dataset from a file path, a D4RL name or a Minari id, and validate it.

    `env_id`, `ref_min_score` and `ref_max_score` override what the source says about itself.
    """
    spec_str = str(spec)
    path = Path(os.path.expanduser(spec_str))
    if path.suffix in (".npz", ".hdf5", ".h5"):
        if not path.exists():
            raise DataFileNotFound(f"dataset file {path} does not exist; check the path given as dataset=")
        if path.is_dir():
            raise DatasetError(f"dataset={path} is a directory; give the .npz/.hdf5 file inside it")
        dataset = _load_npz(path) if path.suffix == ".npz" else _load_hdf5(path)
    elif (match := _D4RL_NAME.match(spec_str)) is not None:
        dataset = _load_d4rl(match)
    else:
        dataset = _load_minari(spec_str, download)
    if env_id is not None:
        dataset.env_id = env_id
    if ref_min_score is not None:
        dataset.ref_min_score = _reference(ref_min_score, "ref_min_score", "the ref_min_score option")
    if ref_max_score is not None:
        dataset.ref_max_score = _reference(ref_max_score, "ref_max_score", "the ref_max_score option")
    if dataset.ref_min_score is not None and dataset.ref_min_score == dataset.ref_max_score:
        raise DatasetError(f"{dataset.source}: ref_min_score and ref_max_score are both {dataset.ref_min_score}, so the normalized "
                           "score is undefined; give the random and the expert policy's returns (ref_min_score=... ref_max_score=...)")
    return dataset


def _reference(value: Any, key: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        raise DatasetError(f"{where}: {key} must be a finite number, got {value!r}")
    return number


def _numeric(arrays: dict[str, np.ndarray], key: str, source: str, rows: int | None = None) -> np.ndarray:
    """arrays[key] as float32; only real numbers (bool, int, float) are data, whatever else is one clear error."""
    array = np.asarray(arrays[key])
    if array.dtype.kind not in "biuf":
        kind = {"c": "complex numbers", "U": "strings", "S": "bytes", "O": "Python objects", "V": "records", "M": "dates", "m": "time deltas"}
        raise DatasetError(f"{source}: {key} holds {kind.get(array.dtype.kind, array.dtype)} (dtype {array.dtype}); "
                           f"every array must hold real numbers: convert {key} to float32 before saving")
    if key in ("rewards", "terminals", "timeouts") and not (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
        raise DatasetError(f"{source}: {key} has shape {array.shape}; it needs one value per transition, shape (N,) or (N, 1)")
    if key in ("observations", "actions", "next_observations") and array.ndim > 2:
        raise DatasetError(f"{source}: {key} has shape {array.shape}; only flat vectors per transition are supported, shape (N, dim)")
    with np.errstate(over="ignore"):
        return array.astype(np.float32)


def _from_arrays(arrays: dict[str, np.ndarray], source: str, meta: dict[str, Any]) -> OfflineDataset:
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise DatasetError(
            f"{source}: missing key(s) {missing}; a D4RL-style file needs {list(REQUIRED_KEYS)} "
            "and optionally 'timeouts' and 'next_observations'"
        )
    obs = _numeric(arrays, "observations", source)
    actions = _numeric(arrays, "actions", source)
    rewards = _numeric(arrays, "rewards", source).reshape(-1)
    terminals = _numeric(arrays, "terminals", source).reshape(-1)
    n = len(obs)
    timeouts = _numeric(arrays, "timeouts", source).reshape(-1) if "timeouts" in arrays else np.zeros(n, np.float32)
    if obs.ndim == 1:
        obs = obs[:, None]
    if actions.ndim == 1:
        actions = actions[:, None]
    lengths = {"observations": n, "actions": len(actions), "rewards": len(rewards), "terminals": len(terminals), "timeouts": len(timeouts)}
    if "next_observations" in arrays:
        lengths["next_observations"] = len(arrays["next_observations"])
    if len(set(lengths.values())) != 1:
        raise DatasetError(f"{source}: arrays have mismatched lengths {lengths}; every key needs one entry per transition")
    if n == 0:
        raise DatasetError(f"{source}: the dataset is empty")
    # Flags are checked on every row of the file, before the qlearning_dataset step below drops rows: a 2 on a
    # dropped row (the file's last, a timeout's last) would pass validate() unseen, and a timeout of 2 decides a drop.
    for name, flags in (("terminals", terminals), ("timeouts", timeouts)):
        _check_flags(name, flags, source)

    if "next_observations" in arrays:
        next_obs = _numeric(arrays, "next_observations", source)
        if next_obs.size != obs.size:
            raise DatasetError(f"{source}: next_observations has shape {next_obs.shape} but observations {obs.shape}")
        next_obs = next_obs.reshape(obs.shape)
    else:
        # d4rl.qlearning_dataset: s' = s[t+1]; the last step of each timeout (and of the file) has no
        # valid successor and is dropped.
        keep = np.flatnonzero(timeouts[:-1] == 0)
        next_obs = obs[keep + 1]
        obs, actions, rewards, terminals, timeouts = obs[keep], actions[keep], rewards[keep], terminals[keep], timeouts[keep]
    dataset = OfflineDataset(obs, actions, rewards, next_obs, terminals, timeouts, source=source)
    if "env_id" in meta:
        dataset.env_id = str(meta["env_id"])
    for key in ("ref_min_score", "ref_max_score"):
        if key in meta:
            setattr(dataset, key, _reference(meta[key], key, source))
    validate(dataset)
    return dataset


def _scalar(value: Any) -> Any:
    value = np.asarray(value)
    item = value.item() if value.size == 1 else value
    return item.decode() if isinstance(item, bytes) else item


def _load_npz(path: Path) -> OfflineDataset:
    import zipfile

    if not zipfile.is_zipfile(path):  # np.savez writes a zip; anything else would reach numpy's pickle fallback
        size = path.stat().st_size
        raise DatasetError(f"{path} is not a readable .npz file ({'empty' if size == 0 else f'{size} bytes, not a zip archive'}); "
                           "re-save it with np.savez")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:
        if "allow_pickle" in str(exc):  # object arrays: never unpickle a data file
            raise DatasetError(f"{path} holds arrays of Python objects, which orl does not load (unpickling runs code); "
                               "save plain numeric arrays (np.savez with float/int/bool arrays)") from exc
        raise DatasetError(f"{path} is not a readable .npz file ({exc}); re-save it with np.savez") from exc
    except Exception as exc:  # zero-byte, truncated, garbage: zipfile, OSError, EOFError, ...
        raise DatasetError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc}); re-save it with np.savez") from exc
    meta = {k: _scalar(arrays.pop(k)) for k in ("env_id", "ref_min_score", "ref_max_score") if k in arrays}
    return _from_arrays(arrays, str(path), meta)


def _load_hdf5(path: Path) -> OfflineDataset:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            arrays = {k: f[k][()] for k in f.keys() if isinstance(f[k], h5py.Dataset)}
            meta = {k: _scalar(v) for k, v in f.attrs.items()}
    except Exception as exc:  # zero-byte, truncated, not HDF5: OSError and friends from h5py
        raise DatasetError(f"{path} is not a readable HDF5 file ({type(exc).__name__}: {exc}); check the download or re-save it") from exc
    meta.update({k: _scalar(arrays.pop(k)) for k in ("env_id", "ref_min_score", "ref_max_score") if k in arrays})
    return _from_arrays(arrays, str(path), meta)


def _d4rl_dir() -> Path:
    return Path(os.environ.get("D4RL_DATASET_DIR", Path.home() / ".d4rl" / "datasets")).expanduser()


def _load_d4rl(match: re.Match) -> OfflineDataset:
    env, level, version = match["env"], match["level"], match["version"]
    filename = f"{env}_{level.replace('-', '_')}-v{version}.hdf5"
    path = _d4rl_dir() / filename
    if not path.exists():
        raise DataFileNotFound(
            f"D4RL dataset {match.string!r} expected at {path}. Download it from the D4RL dataset host "
            f"(gym_mujoco_v{version}/{filename}) into that folder, or set D4RL_DATASET_DIR."
        )
    dataset = _load_hdf5(path)
    dataset.env_id = dataset.env_id or D4RL_ENVS[env]
    dataset.ref_min_score, dataset.ref_max_score = D4RL_REF_SCORES[env]
    dataset.source = match.string
    warnings.warn(
        f"{match.string} was recorded on the D4RL (mujoco-py, v{version}) dynamics; it is evaluated on "
        f"{dataset.env_id}, whose dynamics differ slightly, so scores are close to but not equal to D4RL's.",
        stacklevel=3,
    )
    return dataset


def minari_hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Minari remote (MINARI_REMOTE, default the Hugging Face hub) answers a TCP connect: minari
    itself retries an unreachable hub for ~25 s before it gives up."""
    import socket
    from urllib.parse import urlparse

    remote = os.environ.get("MINARI_REMOTE", "hf://farama-minari")
    if remote.startswith("hf://"):
        host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    elif remote.startswith("gcp://"):
        host = "storage.googleapis.com"
    else:
        return True  # an unknown remote kind: let minari try
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _how_to_get(dataset_id: str, local: list[str]) -> str:
    """The fix for a missing Minari id: the local id it respells (a hydra sweep's directory writes
    `orl/hopper/medium-v0` as `orl-hopper-medium-v0`), orl-collect for the `orl` ids it makes, else the hub.
    Only an exact respelling is suggested: a near-miss is usually another level of the same env, i.e. other data."""
    respelt = [id_ for id_ in local if id_.replace("/", "-") == dataset_id.replace("/", "-")]
    if respelt:
        return f"Did you mean dataset={respelt[0]}?"
    if dataset_id.startswith(("orl/", "orl-")):
        return (f"orl datasets (spelled orl/<env>/<level>-v0) are collected on this machine, not downloaded: run "
                f"`orl-collect env={_env_of(dataset_id)}` (docs/results.md, \"Datasets and checksums\"), or give a path "
                "ending in .npz/.hdf5.")
    return (f"Run `minari download {dataset_id}` on a machine with internet (and copy ~/.minari/datasets), or give a path "
            "ending in .npz/.hdf5.")


def env_slug(env_id: str) -> str:
    """`HalfCheetah-v5` -> `halfcheetah`: the env part of the Minari-style ids orl-collect writes."""
    return re.sub(r"-v\d+$", "", env_id).lower().replace("/", "-")


def _env_of(dataset_id: str) -> str:
    """The newest registered gymnasium env whose lower-cased name is the id's env part
    (`orl/halfcheetah/medium-v0` -> HalfCheetah-v5), as orl-collect names its datasets."""
    import gymnasium

    parts = dataset_id.split("/") if "/" in dataset_id else dataset_id.split("-")
    slug = parts[1] if len(parts) >= 3 else ""
    matches = [spec for spec in gymnasium.registry.values() if env_slug(spec.id) == slug]
    if not matches:
        return "<gymnasium env id>"
    return max(matches, key=lambda spec: -1 if spec.version is None else spec.version).id


def _load_minari(dataset_id: str, download: bool) -> OfflineDataset:
    import minari

    local = sorted(minari.list_local_datasets().keys())
    if dataset_id not in local and (not download or not minari_hub_reachable()):
        raise DatasetError(
            f"Minari dataset {dataset_id!r} is not on this machine" + (" and the Minari hub cannot be reached" if download else "")
            + f". {_how_to_get(dataset_id, local)} Local datasets: {local or 'none'}."
        )
    try:
        ds = minari.load_dataset(dataset_id, download=download)
    except Exception as exc:  # minari raises several types for "not local and not reachable"
        local = sorted(minari.list_local_datasets().keys())
        raise DatasetError(
            f"could not load Minari dataset {dataset_id!r} ({type(exc).__name__}: {exc}). "
            f"If it is on the Minari hub, run `minari download {dataset_id}` on a machine with internet. "
            f"Local datasets: {local or 'none'}. For a file, give a path ending in .npz/.hdf5."
        ) from exc
    obs, next_obs, actions, rewards, terminals, timeouts = [], [], [], [], [], []
    for episode in ds.iterate_episodes():
        episode_obs = np.asarray(episode.observations, dtype=np.float32)
        if episode_obs.ndim != 2:
            raise DatasetError(f"{dataset_id}: only flat Box observations are supported, got shape {episode_obs.shape[1:]}")
        obs.append(episode_obs[:-1])
        next_obs.append(episode_obs[1:])
        actions.append(np.asarray(episode.actions, dtype=np.float32).reshape(len(episode_obs) - 1, -1))
        rewards.append(np.asarray(episode.rewards, dtype=np.float32))
        terminals.append(np.asarray(episode.terminations, dtype=np.float32))
        timeouts.append(np.asarray(episode.truncations, dtype=np.float32))
    arrays = {
        "observations": np.concatenate(obs),
        "next_observations": np.concatenate(next_obs),
        "actions": np.concatenate(actions),
        "rewards": np.concatenate(rewards),
        "terminals": np.concatenate(terminals),
        "timeouts": np.concatenate(timeouts),
    }
    meta = {k: v for k, v in ds.storage.metadata.items() if k in ("ref_min_score", "ref_max_score") and v is not None}
    env_spec = ds.spec.env_spec if ds.spec is not None else None
    if env_spec is not None:
        meta["env_id"] = env_spec.id
    return _from_arrays(arrays, dataset_id, meta)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def validate(dataset: OfflineDataset) -> None:
    """Reject data that would silently poison training."""
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.source}: no usable transition (without next_observations, the last step of every "
                           "trajectory is dropped, as in D4RL's qlearning_dataset); give more data or next_observations")
    for name in ("observations", "actions", "rewards", "next_observations"):
        array = getattr(dataset, name)
        bad = ~np.isfinite(array)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise DatasetError(
                f"{dataset.source}: {name} has {bad.sum()} NaN/inf value(s), first at transition(s) {rows[:5].tolist()}; "
                "clean or drop those transitions before training"
            )
    largest = float(np.abs(dataset.rewards).max()) if len(dataset) else 0.0
    if largest > REWARD_LIMIT:
        raise DatasetError(f"{dataset.source}: rewards reach {largest:.3g}; a discounted return of that (r / (1 - gamma)) overflows "
                           "float32 in the TD targets. Rescale them (data.reward=scale_shift data.reward_scale=...)")
    for name in ("terminals", "timeouts"):
        _check_flags(name, getattr(dataset, name), dataset.source)


def _check_flags(name: str, values: np.ndarray, source: str) -> None:
    """terminals and timeouts are 0/1 flags: any other value (2, 0.5, -1) is refused, never read as a flag."""
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        raise DatasetError(f"{source}: {name} must be 0/1 flags, found values {np.unique(values)[:5].tolist()} (first other than 0/1 "
                           f"at transition(s) {np.flatnonzero(bad)[:5].tolist()}); save {name} as 0/1, 1 where a trajectory ends")


def check_env_compatible(dataset: OfflineDataset, env: Any, action_tolerance: float = 1e-3) -> None:
    """Raise if the dataset's observation/action shapes or action range do not fit the env."""
    obs_space, action_space = env.observation_space, env.action_space
    name = getattr(getattr(env, "spec", None), "id", None) or dataset.env_id
    if obs_space.shape != (dataset.obs_dim,):
        raise DatasetError(
            f"{dataset.source}: observations have shape ({dataset.obs_dim},) but env {name} observes {obs_space.shape}; "
            "the dataset was recorded on another environment (check dataset.env_id / env=...)"
        )
    if action_space.shape != (dataset.action_dim,):
        raise DatasetError(
            f"{dataset.source}: actions have shape ({dataset.action_dim},) but env {name} takes {action_space.shape}; "
            "the dataset was recorded on another environment (check dataset.env_id / env=...)"
        )
    low, high = action_space.low, action_space.high
    over = (dataset.actions < low - action_tolerance) | (dataset.actions > high + action_tolerance)
    if over.any():
        raise DatasetError(
            f"{dataset.source}: {int(over.any(axis=1).sum())} action(s) lie outside env {name}'s bounds "
            f"[{low.min():g}, {high.max():g}] (extreme values {dataset.actions.min():g}, {dataset.actions.max():g}); "
            "set data.clip_actions=<bound> to clip them, or check that the dataset matches the env"
        )


# --------------------------------------------------------------------------------------------
# Transforms (per-algorithm conventions are config, not code)
# --------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    normalize_obs: bool = True
    obs_std_eps: float = 1e-3
    reward: str = "raw"  # raw | scale_shift | iql_locomotion | learned:<orl-prefs reward model dir or file>
    learned_reward_norm: str = "none"  # learned rewards: none | minmax | standard
    reward_scale: float = 1.0
    reward_shift: float = 0.0
    clip_actions: float | None = None  # e.g. 0.99999 for tanh log-probs of dataset actions


@dataclass(frozen=True)
class RewardTransform:
    """r -> scale * r + shift: the one reward transform of a run.

    The dataset, the online replay buffer and the Monte-Carlo returns computed from either all apply
    this same object (the official IQL/FamO2O code scales every sampled batch, WSRL and Cal-QL wrap
    the env with reward_scale/reward_bias), and it is saved with the run's checkpoints so that a
    resumed or `init_from` run applies exactly the one it was trained with.
    """

    scale: float = 1.0
    shift: float = 0.0
    kind: str = "raw"  # the data.reward setting it came from, for the record

    def __call__(self, rewards):
        return rewards * self.scale + self.shift

    def state_dict(self) -> dict[str, Any]:
        return {"scale": float(self.scale), "shift": float(self.shift), "kind": self.kind}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "RewardTransform":
        return cls(float(state["scale"]), float(state["shift"]), str(state.get("kind", "raw")))

    def same_as(self, other: "RewardTransform") -> bool:
        return bool(np.isclose(self.scale, other.scale, rtol=1e-6, atol=0.0) and np.isclose(self.shift, other.shift, rtol=1e-6, atol=1e-9))


@dataclass
class PreparedData:
    dataset: OfflineDataset
    obs_mean: np.ndarray
    obs_std: np.ndarray
    reward_transform: RewardTransform = field(default_factory=RewardTransform)


def reward_transform(dataset: OfflineDataset, cfg: DataConfig) -> RewardTransform:
    """The run's reward transform from `data.reward*` (iql_locomotion reads the dataset's return range)."""
    if cfg.reward.startswith("learned:"):  # rewards already relabelled by a preference reward model (orl-train does it)
        return RewardTransform(1.0, 0.0, cfg.reward)
    if cfg.reward not in ("raw", "scale_shift", "iql_locomotion"):
        raise DatasetError(f"data.reward must be raw, scale_shift, iql_locomotion or learned:<reward model>, got {cfg.reward!r}")
    scale = 1.0
    if cfg.reward == "iql_locomotion":
        # IQL (locomotion): r * 1000 / (max trajectory return - min trajectory return).
        returns = dataset.episode_returns()
        spread = float(returns.max() - returns.min())
        if spread <= 0:
            raise DatasetError(f"{dataset.source}: all trajectories have the same return; iql_locomotion reward scaling is undefined")
        scale = 1000.0 / spread
    return RewardTransform(scale * cfg.reward_scale, cfg.reward_shift, cfg.reward)


def observation_statistics(dataset: OfflineDataset, std_eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std + std_eps) of the observations, float32: what every network standardizes its inputs with."""
    return dataset.observations.mean(0).astype(np.float32), (dataset.observations.std(0) + std_eps).astype(np.float32)


def prepare(dataset: OfflineDataset, cfg: DataConfig, transform: RewardTransform | None = None) -> PreparedData:
    """Apply reward/action/observation transforms; returns a new dataset, the obs statistics and the
    reward transform (which the online phase applies to every new transition).

    `transform` (a resumed or init_from run's saved one) replaces the one `cfg` would compute.
    """
    transform = transform or reward_transform(dataset, cfg)
    rewards = transform(dataset.rewards.astype(np.float64))
    actions = dataset.actions
    if cfg.clip_actions is not None:
        actions = np.clip(actions, -cfg.clip_actions, cfg.clip_actions)
    obs_mean = np.zeros(dataset.obs_dim, np.float32)
    obs_std = np.ones(dataset.obs_dim, np.float32)
    observations, next_observations = dataset.observations, dataset.next_observations
    if cfg.normalize_obs:
        obs_mean, obs_std = observation_statistics(dataset, cfg.obs_std_eps)
        observations = (observations - obs_mean) / obs_std
        next_observations = (next_observations - obs_mean) / obs_std
    out = dataclasses.replace(
        dataset,
        observations=observations.astype(np.float32),
        next_observations=next_observations.astype(np.float32),
        actions=actions.astype(np.float32),
        rewards=rewards.astype(np.float32),
    )
    return PreparedData(out, obs_mean, obs_std, transform)
