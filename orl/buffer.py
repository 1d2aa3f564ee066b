"""Device-resident transition storage and batch sampling.

A batch is one `torch.randint` on the device plus one gather per field: no per-sample Python, no
DataLoader worker round trip, no host-to-device copy per step.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from orl.data import OfflineDataset


@dataclass
class Batch:
    """Tensors of one mini-batch. Optional fields are None when a source does not provide them."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_obs: torch.Tensor
    terminals: torch.Tensor
    returns_to_go: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.obs.shape[0]

    def split(self, parts: int) -> Iterator["Batch"]:
        """Yield `parts` equal consecutive minibatches (WSRL's high-UTD critic split)."""
        size = len(self) // parts
        for i in range(parts):
            yield Batch(**{f.name: _slice(getattr(self, f.name), i * size, (i + 1) * size) for f in fields(self)})

    @staticmethod
    def cat(batches: list["Batch"]) -> "Batch":
        out = {}
        for f in fields(Batch):
            values = [getattr(b, f.name) for b in batches]
            out[f.name] = None if any(v is None for v in values) else torch.cat(values)
        return Batch(**out)


_BATCH_FIELDS = {f.name for f in fields(Batch)}


def _slice(tensor: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[start:stop]


class TransitionBuffer:
    """A fixed-capacity ring buffer of transitions living on one device.

    Used both for a whole offline dataset (filled once) and for online replay (appended per step).
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int, device: torch.device | str, with_returns: bool = False):
        self.capacity = int(capacity)
        self.device = torch.device(device)
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=self.device)  # noqa: E731
        self.storage = {
            "obs": zeros(self.capacity, obs_dim),
            "actions": zeros(self.capacity, action_dim),
            "rewards": zeros(self.capacity),
            "next_obs": zeros(self.capacity, obs_dim),
            "terminals": zeros(self.capacity),
            "timeouts": zeros(self.capacity),  # kept for trajectory structure (MC returns, exports), not batched
        }
        if with_returns:
            self.storage["returns_to_go"] = zeros(self.capacity)
        self.size = 0
        self.pointer = 0

    def __len__(self) -> int:
        return self.size

    @classmethod
    def from_dataset(
        cls, dataset: OfflineDataset, device: torch.device | str, returns_to_go: np.ndarray | None = None, capacity: int | None = None
    ) -> "TransitionBuffer":
        buffer = cls(capacity or len(dataset), dataset.obs_dim, dataset.action_dim, device, with_returns=returns_to_go is not None)
        arrays = {
            "obs": dataset.observations,
            "actions": dataset.actions,
            "rewards": dataset.rewards,
            "next_obs": dataset.next_observations,
            "terminals": dataset.terminals,
            "timeouts": dataset.timeouts,
        }
        if returns_to_go is not None:
            arrays["returns_to_go"] = returns_to_go
        buffer.add_batch(**arrays)
        return buffer

    def add_batch(self, **arrays: np.ndarray | torch.Tensor) -> None:
        """Append n transitions at once (wrapping around when full)."""
        n = len(arrays["rewards"])
        if n > self.capacity:
            raise ValueError(f"cannot add {n} transitions to a buffer of capacity {self.capacity}")
        index = (torch.arange(n, device=self.device) + self.pointer) % self.capacity
        for key, tensor in self.storage.items():
            if key in ("timeouts", "returns_to_go") and key not in arrays:
                tensor[index] = 0.0  # online returns-to-go are written when the episode ends
                continue
            value = torch.as_tensor(arrays[key], dtype=torch.float32).to(self.device)
            tensor[index] = value.reshape(n, *tensor.shape[1:])
        self.pointer = (self.pointer + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator | None = None, limit: int | None = None) -> Batch:
        """Uniform batch over the first `limit` (default: all) stored transitions."""
        high = self.size if limit is None else min(limit, self.size)
        if high == 0:
            raise RuntimeError("cannot sample from an empty buffer")
        index = torch.randint(0, high, (batch_size,), device=self.device, generator=generator)
        return self.gather(index)

    def gather(self, index: torch.Tensor) -> Batch:
        return Batch(**{key: tensor[index] for key, tensor in self.storage.items() if key in _BATCH_FIELDS})

    def state_dict(self) -> dict:
        # clone: a slice is a view, and torch.save writes a view's whole storage (the full capacity).
        return {"storage": {k: v[: self.size].clone().cpu() for k, v in self.storage.items()}, "size": self.size, "pointer": self.pointer}

    def load_state_dict(self, state: dict) -> None:
        self.size, self.pointer = int(state["size"]), int(state["pointer"])
        for key, value in state["storage"].items():
            self.storage[key][: self.size] = value.to(self.device)
