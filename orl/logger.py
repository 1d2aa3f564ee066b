"""Run logging: tensorboard scalars, a `metrics.jsonl` file and a progress bar."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch


def to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().item())
    return float(value)


class Logger:
    """Writes every logged row to `metrics.jsonl` and tensorboard.

    On resume, rows past the checkpoint step are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self.writer = None
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
                raise FloatingPointError(
                    f"{key} became {value} at step {step}; training diverged (try a lower learning rate, "
                    "reward scaling, or check the dataset for extreme values)"
                )
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
        self._file.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]
