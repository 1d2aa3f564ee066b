"""Atomic checkpoints and the random-number state needed for exact resume."""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orl.errors import CheckpointError, DataFileNotFound
from orl.io import WriteError, atomic_path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` so that `path` always holds either the old or the new checkpoint, never a torn one.

    The data goes to a temporary file in the same directory, is fsync'ed, then renamed over `path`
    (`orl.io.atomic_path`).
    """
    try:
        with atomic_path(path, "checkpoint") as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except WriteError as exc:  # a full disk, a quota, a vanished mount: the previous checkpoint is untouched
        raise CheckpointError(f"{exc} (a training run continues with resume=true)") from exc


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise DataFileNotFound(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
