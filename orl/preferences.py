"""Preferences over trajectory segments of an orl dataset, and the Bradley–Terry loss every preference
learner shares (the text reward model in agents/reward_model.py, control reward models, CPL).

A query is a pair of segments of length H, each stored as its **start index into the source dataset**
(never a copy of the arrays), with the source's id and a checksum of its arrays, so labels cannot be
applied to other data. Segments never cross a trajectory boundary (terminal, timeout or a break in
s' -> s). A label is P(segment a is preferred to b): 1, 0, 0.5 for a tie, or anything between.

Scripted teachers follow B-Pref (Lee et al., 2021), on the segments' true rewards:
rational (`beta=inf`), stochastic Bradley–Terry (`beta`), myopic (`gamma`: step t of H weighs
gamma^(H-1-t)), mistakes (`mistake`: flip with that probability), ties (`tie_threshold`: returns closer
than it are equally preferable) and skip (`skip_threshold`: queries where neither segment's return
reaches it are dropped).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from orl.data import OfflineDataset
from orl.errors import DataError


def preference_loss(score_a: torch.Tensor, score_b: torch.Tensor, label: torch.Tensor | float = 1.0,
                    margin: torch.Tensor | float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood with soft labels:
    -[y log sigma(s_a - s_b - m) + (1 - y) log sigma(s_b - s_a + m)], y = P(a > b) (0.5: a tie).
    With y = 1 it is the reward-model loss of InstructGPT/TRL (margin m, optional centering of scores)."""
    diff = score_a - score_b - margin
    label = torch.as_tensor(label, dtype=diff.dtype, device=diff.device)
    loss = -(label * F.logsigmoid(diff) + (1 - label) * F.logsigmoid(-diff)).mean()
    if center_coef:
        loss = loss + center_coef * (score_a + score_b).pow(2).mean()
    return loss


def dataset_checksum(dataset: OfflineDataset) -> str:
    """sha256 of the arrays a preference label depends on (observations, actions, rewards, episode ends)."""
    digest = hashlib.sha256()
    for array in (dataset.observations, dataset.actions, dataset.rewards, dataset.terminals, dataset.timeouts):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def segment_starts(dataset: OfflineDataset, length: int) -> np.ndarray:
    """Every start t such that t, ..., t + length - 1 lie in one trajectory."""
    episodes = dataset.episode_ids()
    n = len(dataset)
    if length < 1 or length > n:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(n - length + 1)
    return starts[episodes[starts] == episodes[starts + length - 1]]


@dataclass
class Teacher:
    """A scripted labeller (B-Pref). Defaults: the rational teacher (no noise, no ties, no skips)."""

    beta: float = math.inf         # stochastic: P(a > b) = sigmoid(beta (R_a - R_b)); inf = rational (the larger return)
    gamma: float = 1.0             # myopic: weight gamma^(H-1-t) on step t (later steps count more)
    mistake: float = 0.0           # flip the label with this probability
    tie_threshold: float = 0.0     # |R_a - R_b| below this: label 0.5 (equally preferable)
    skip_threshold: float | None = None  # drop queries where max(R_a, R_b) < this

    def label(self, rewards_a: np.ndarray, rewards_b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(labels, kept): labels of the kept queries from per-step rewards of shape (M, H)."""
        length = rewards_a.shape[1]
        weights = self.gamma ** np.arange(length - 1, -1, -1, dtype=np.float64)
        ret_a, ret_b = (rewards_a * weights).sum(1), (rewards_b * weights).sum(1)
        kept = np.ones(len(ret_a), bool) if self.skip_threshold is None else np.maximum(ret_a, ret_b) >= self.skip_threshold
        ret_a, ret_b = ret_a[kept], ret_b[kept]
        if math.isinf(self.beta):
            labels = (ret_a > ret_b).astype(np.float32)
        else:
            probability = 1.0 / (1.0 + np.exp(-self.beta * (ret_a - ret_b)))
            labels = (rng.random(len(ret_a)) < probability).astype(np.float32)
        flip = rng.random(len(labels)) < self.mistake
        labels[flip] = 1.0 - labels[flip]
        labels[np.abs(ret_a - ret_b) < self.tie_threshold] = 0.5  # a tie is never flipped into a preference
        if math.isinf(self.beta):
            labels[ret_a == ret_b] = 0.5
        return labels, kept


@dataclass
class PreferencePairs:
    """Labelled segment pairs over one source dataset."""

    starts: np.ndarray   # (M, 2) int64: start of segment a and of segment b
    labels: np.ndarray   # (M,) float32: P(a preferred to b)
    length: int          # H
    source: str          # the dataset's id or path
    checksum: str        # dataset_checksum of the source
    teacher: dict        # how the labels were made ({"kind": "scripted", ...} or {"kind": "file", ...})

    def __len__(self) -> int:
        return len(self.labels)

    def segment_indices(self) -> np.ndarray:
        """(M, 2, H) transition indices of every segment."""
        return self.starts[:, :, None] + np.arange(self.length)

    def split(self, held_out: float, seed: int = 0) -> tuple["PreferencePairs", "PreferencePairs"]:
        order = np.random.default_rng(seed).permutation(len(self))
        cut = len(self) - int(round(held_out * len(self)))
        part = lambda index: PreferencePairs(self.starts[index], self.labels[index], self.length, self.source, self.checksum, self.teacher)  # noqa: E731
        return part(order[:cut]), part(order[cut:])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, starts=self.starts, labels=self.labels, length=self.length, source=self.source, checksum=self.checksum,
                 teacher=json.dumps(self.teacher))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, dataset: OfflineDataset) -> "PreferencePairs":
        """Labels from `path`, checked against `dataset`: the same data (checksum), indices inside it, and
        segments inside one trajectory each."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"preference file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as f:
                pairs = cls(f["starts"].astype(np.int64), f["labels"].astype(np.float32), int(f["length"]), str(f["source"]),
                            str(f["checksum"]), json.loads(str(f["teacher"])))
        except (OSError, ValueError, KeyError) as exc:
            raise DataError(f"{path} is not an orl preference file ({type(exc).__name__}: {exc})") from exc
        if pairs.checksum != dataset_checksum(dataset):
            raise DataError(f"{path} labels segments of {pairs.source} (checksum {pairs.checksum[:12]}), but the dataset given "
                            f"({dataset.source}) holds other data (checksum {dataset_checksum(dataset)[:12]}); give the dataset the labels were made on")
        check_segments(pairs.starts, pairs.length, dataset, str(path))
        return pairs


def check_segments(starts: np.ndarray, length: int, dataset: OfflineDataset, where: str) -> None:
    """Raise DataError if a segment leaves the dataset or crosses a trajectory boundary."""
    starts = np.asarray(starts)
    if starts.ndim != 2 or starts.shape[1] != 2:
        raise DataError(f"{where}: segment starts must have shape (queries, 2), got {starts.shape}")
    last = int(starts.max()) + length if starts.size else 0
    if starts.size and (starts.min() < 0 or last > len(dataset)):
        raise DataError(f"{where}: segments reach index {last - 1}, but {dataset.source} has {len(dataset)} transitions "
                        f"(segment length {length}); the labels were made for other data")
    episodes = dataset.episode_ids()
    crossing = episodes[starts] != episodes[starts + length - 1]
    if crossing.any():
        query = int(np.argwhere(crossing)[0][0])
        raise DataError(f"{where}: query {query} has a segment that crosses a trajectory boundary in {dataset.source}")


def scripted_preferences(dataset: OfflineDataset, queries: int, length: int, teacher: Teacher | None = None,
                         seed: int = 0) -> PreferencePairs:
    """`queries` pairs of segments drawn uniformly among all valid starts, labelled by `teacher` on the true reward."""
    teacher = teacher or Teacher()
    starts = segment_starts(dataset, length)
    if len(starts) < 2:
        raise DataError(f"{dataset.source}: fewer than two segments of length {length} fit inside its trajectories; use a shorter length")
    rng = np.random.default_rng(seed)
    first = rng.choice(starts, queries)
    second = rng.choice(starts, queries)
    same = first == second
    while same.any():  # a segment is never compared with itself
        second[same] = rng.choice(starts, int(same.sum()))
        same = first == second
    pairs = np.stack([first, second], 1).astype(np.int64)
    steps = pairs[:, :, None] + np.arange(length)
    labels, kept = teacher.label(dataset.rewards[steps[:, 0]].astype(np.float64), dataset.rewards[steps[:, 1]].astype(np.float64), rng)
    return PreferencePairs(pairs[kept], labels, length, dataset.source, dataset_checksum(dataset),
                           {"kind": "scripted", "seed": seed, **asdict(teacher)})
