"""The one notion of process rank. Distributed launchers (`accelerate launch`, `torchrun`) describe each process
in environment variables; process 0 is the one that evaluates and writes a run's files."""
from __future__ import annotations

import os


def process_rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int | None:
    """This process's rank on its machine (which GPU it uses), or None outside a distributed launch."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value is not None else None


def world_size() -> int:
    """How many processes train together (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return process_rank() == 0
