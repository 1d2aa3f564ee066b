"""Atomic checkpoints and the random-number state needed for exact resume."""
from __future__ import annotations

import errno
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orl.errors import CheckpointError, DataFileNotFound


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write `state` so that `path` always holds either the old or the new checkpoint, never a torn one.

    The data goes to a temporary file in the same directory, is fsync'ed, then renamed over `path`
    (an atomic operation on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a quota, a vanished mount: the previous checkpoint is untouched
        kept = f"the previous checkpoint {path} is kept" if path.exists() else "no earlier checkpoint exists"
        reason = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; {kept}. Free space (or fix the path) and "
                              "continue with resume=true") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


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
