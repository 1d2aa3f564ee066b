"""Batches of labelled segments for agents that learn from preferences directly (CPL): pairs, or scored
segments compared within a batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from orl.data import OfflineDataset
from orl.errors import DataError
from orl.prefs.labels import PreferencePairs, SegmentScores


@dataclass
class SegmentPairBatch:
    """B queries: obs (B, 2, H, obs_dim), actions (B, 2, H, action_dim), labels (B,) = P(segment 0 preferred)."""

    obs: torch.Tensor
    actions: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


class SegmentPairBuffer:
    """Labelled segment pairs over device tensors of the (prepared) dataset: a batch is an index gather."""

    def __init__(self, dataset: OfflineDataset, labels: "PreferencePairs | SegmentScores", device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.obs = torch.as_tensor(dataset.observations, device=self.device)
        self.actions = torch.as_tensor(dataset.actions, device=self.device)
        self.index = torch.as_tensor(labels.segment_indices(), device=self.device)  # (M, 2, H) pairs, (M, H) segments
        self.targets = torch.as_tensor(labels.labels if isinstance(labels, PreferencePairs) else labels.scores, device=self.device)

    def __len__(self) -> int:
        return len(self.targets)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> SegmentPairBatch:
        rows = torch.randint(len(self), (batch_size,), device=self.device, generator=generator)
        index = self.index[rows]
        return SegmentPairBatch(self.obs[index], self.actions[index], self.targets[rows])

    def state_dict(self) -> dict:
        return {}  # the labels are data, re-read from the label file on resume


@dataclass
class SegmentScoreBatch:
    """B distinct segments: obs (B, H, obs_dim), actions (B, H, action_dim), scores (B,)."""

    obs: torch.Tensor
    actions: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)


class SegmentScoreBuffer(SegmentPairBuffer):
    """Scored segments, in one of the official loader's two modes:

    - "rank" (its dense state-based configs): B segments, each compared with one drawn at random, labelled
      P(first preferred) = 1 if its score is higher, 0.5 on equal scores: a SegmentPairBatch;
    - "score": B distinct segments (the official batches of a permutation) with their scores, every pair of
      the batch a comparison: a SegmentScoreBatch.
    """

    MODES = ("rank", "score")

    def __init__(self, dataset: OfflineDataset, scores: SegmentScores, device: torch.device | str = "cpu", mode: str = "rank"):
        if mode not in self.MODES:
            raise DataError(f"score mode must be one of {self.MODES}, got {mode!r}")
        super().__init__(dataset, scores, device)
        self.mode = mode

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> SegmentPairBatch | SegmentScoreBatch:
        if self.mode == "score":
            rows = torch.randperm(len(self), device=self.device, generator=generator)[:batch_size]
            index = self.index[rows]
            return SegmentScoreBatch(self.obs[index], self.actions[index], self.targets[rows])
        rows = torch.randint(len(self), (2, batch_size), device=self.device, generator=generator)
        index = self.index[rows.T]                                                       # (B, 2, H)
        first, second = self.targets[rows[0]], self.targets[rows[1]]
        labels = (first > second).float() + 0.5 * (first == second).float()
        return SegmentPairBatch(self.obs[index], self.actions[index], labels)
