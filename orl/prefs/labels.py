"""Preference labels over trajectory segments of an orl dataset: label files, checks and scripted teachers.

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

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from orl.data import OfflineDataset
from orl.errors import DataError
from orl.io import atomic_path
from orl.provenance import dataset_checksum


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
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix to the user's name
            np.savez(f, starts=self.starts, labels=self.labels, length=self.length, source=self.source, checksum=self.checksum,
                     teacher=json.dumps(self.teacher))

    @classmethod
    def load(cls, path: str | Path, dataset: OfflineDataset) -> "PreferencePairs":
        """Labels from `path`, checked against `dataset`: the same data (checksum), indices inside it, and
        segments inside one trajectory each."""
        return cls.from_fields(read_label_file(path, dataset, "pairs"), dataset, path)

    @classmethod
    def from_fields(cls, fields: dict[str, np.ndarray], dataset: OfflineDataset, path: str | Path) -> "PreferencePairs":
        pairs = cls(fields["starts"].astype(np.int64), fields["labels"].astype(np.float32), int(fields["length"]), str(fields["source"]),
                    str(fields["checksum"]), json.loads(str(fields["teacher"])))
        check_segments(pairs.starts, pairs.length, dataset, str(path))
        return pairs


@dataclass
class SegmentScores:
    """Segments with one score each (CPL's dense "score" mode): any two segments of a batch are a comparison,
    the higher score preferred, so a batch of B segments gives B (B - 1) / 2 of them."""

    starts: np.ndarray   # (M,) int64
    scores: np.ndarray   # (M,) float32, e.g. the segment's return
    length: int
    source: str
    checksum: str
    teacher: dict

    def __len__(self) -> int:
        return len(self.scores)

    def segment_indices(self) -> np.ndarray:
        """(M, H) transition indices of every segment."""
        return self.starts[:, None] + np.arange(self.length)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, kind="scores", starts=self.starts, scores=self.scores, length=self.length, source=self.source,
                     checksum=self.checksum, teacher=json.dumps(self.teacher))

    @classmethod
    def load(cls, path: str | Path, dataset: OfflineDataset) -> "SegmentScores":
        return cls.from_fields(read_label_file(path, dataset, "scores"), dataset, path)

    @classmethod
    def from_fields(cls, fields: dict[str, np.ndarray], dataset: OfflineDataset, path: str | Path) -> "SegmentScores":
        scores = cls(fields["starts"].astype(np.int64), fields["scores"].astype(np.float32), int(fields["length"]), str(fields["source"]),
                     str(fields["checksum"]), json.loads(str(fields["teacher"])))
        check_segments(scores.starts, scores.length, dataset, str(path))
        return scores


def read_label_file(path: str | Path, dataset: OfflineDataset, kind: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an orl label file of `kind` ("pairs", "scores" or None: either), made on `dataset` (same
    checksum); fields["kind"] says which it is."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            fields = {key: f[key] for key in f.files}
        found = str(fields.get("kind", "pairs"))
        if found not in ("pairs", "scores"):
            raise ValueError(f"label kind {found!r} is neither pairs nor scores")
        for key in ("starts", "labels" if found == "pairs" else "scores", "length", "source", "checksum", "teacher"):
            if key not in fields:
                raise KeyError(key)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path} is not an orl preference file ({type(exc).__name__}: {exc})") from exc
    fields["kind"] = np.asarray(found)
    if kind is not None and found != kind:
        made_by = {"pairs": "`orl-prefs label`", "scores": "`orl-prefs label --scores`"}
        raise DataError(f"{path} holds segment {found} ({made_by[found]}), but segment {kind} are needed here "
                        f"({made_by[kind]}); " + ("only agent=cpl/cpl_kl trains on scored segments" if found == "scores" else
                                                    "give a file made with --scores"))
    checksum = dataset_checksum(dataset)
    if str(fields["checksum"]) != checksum:
        raise DataError(f"{path} labels segments of {fields['source']} (checksum {str(fields['checksum'])[:12]}), but the dataset given "
                        f"({dataset.source}) holds other data (checksum {checksum[:12]}); give the dataset the labels were made on")
    return fields


def load_segment_labels(path: str | Path, dataset: OfflineDataset) -> "PreferencePairs | SegmentScores":
    """Whichever kind of label file `path` is: labelled pairs or scored segments."""
    fields = read_label_file(path, dataset)
    return (SegmentScores if str(fields["kind"]) == "scores" else PreferencePairs).from_fields(fields, dataset, path)


def check_segments(starts: np.ndarray, length: int, dataset: OfflineDataset, where: str) -> None:
    """Raise DataError if a segment leaves the dataset or crosses a trajectory boundary (starts: (M, 2) pairs or (M,))."""
    starts = np.asarray(starts)
    if not (starts.ndim == 2 and starts.shape[1] == 2 or starts.ndim == 1):
        raise DataError(f"{where}: segment starts must have shape (queries, 2) or (segments,), got {starts.shape}")
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


def scripted_scores(dataset: OfflineDataset, segments: int, length: int, gamma: float = 1.0, seed: int = 0) -> SegmentScores:
    """`segments` distinct segments drawn uniformly among all valid starts, each scored by its return (step t of H
    weighted gamma^(H-1-t), the myopic teacher's weighting): the dense labels of CPL's score mode."""
    starts = segment_starts(dataset, length)
    if len(starts) < 2:
        raise DataError(f"{dataset.source}: fewer than two segments of length {length} fit inside its trajectories; use a shorter length")
    if segments > len(starts):
        raise DataError(f"{dataset.source}: {segments} segments asked for, but only {len(starts)} distinct ones of length {length} fit")
    chosen = np.sort(np.random.default_rng(seed).choice(starts, segments, replace=False)).astype(np.int64)
    weights = gamma ** np.arange(length - 1, -1, -1, dtype=np.float64)
    scores = (dataset.rewards[chosen[:, None] + np.arange(length)].astype(np.float64) * weights).sum(1)
    return SegmentScores(chosen, scores.astype(np.float32), length, dataset.source, dataset_checksum(dataset),
                         {"kind": "scripted-scores", "seed": seed, "gamma": gamma})
