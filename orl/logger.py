"""Run logging: tensorboard scalars, a `metrics.jsonl` file and a progress bar."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from orl.errors import DivergenceError
from orl.io import atomic_write_text


def to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item())
    return float(value)


class Logger:
    """Writes every logged row to `metrics.jsonl` and tensorboard.

    On resume, rows past the checkpoint step are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        # Disabled (the other processes of a data-parallel run): rows are checked and returned, nothing is written.
        self.enabled = enabled
        self._file = None
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [json.dumps(row) for row in _parse_rows(self.path) if row["step"] <= resume_step]
            # Rewritten atomically: a crash here leaves the old file, never half of it.
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
        # Keys under "hist/" hold tensors of values (e.g. FamO2O's betas): tensorboard histograms only.
        for key, value in metrics.items():
            if key.startswith("hist/"):
                self.histogram(step, f"{prefix}{key[5:]}", torch.as_tensor(value))
        row = {f"{prefix}{k}": to_float(v) for k, v in metrics.items() if not k.startswith("hist/")}
        for key, value in row.items():
            if not math.isfinite(value):
                raise DivergenceError(
                    f"{key} became {value} at step {step}; training diverged (try a lower learning rate, "
                    "reward scaling, or check the dataset for extreme values)"
                )
        if self._file is None:
            return row
        self._file.write(json.dumps({"step": step, **row}) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in row.items():
                self.writer.add_scalar(key, value, step)
        return row

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if self.writer is not None:
            self.writer.add_histogram(name, values.detach().cpu(), step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.writer is not None:
            self.writer.close()


def _parse_rows(path: Path) -> list[dict[str, float]]:
    """Rows of a metrics.jsonl; a torn last line (power loss, full disk) is dropped with a warning."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise
            warnings.warn(f"{path}: dropped a torn last line ({line[:60]!r}...)", stacklevel=3)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    return _parse_rows(Path(run_dir) / "metrics.jsonl")
