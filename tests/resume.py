"""The exact-resume check the CLI tests share."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def resumed_equals_uninterrupted(run: Callable[[Path, int, bool], Any], tmp_path: Path) -> tuple[Any, list[dict]]:
    """`run(run_dir, steps, resume)` for 4 steps, and for 2 steps then resumed to 4 in another directory: the training
    metrics of steps 1-4 must be equal. Returns the uninterrupted run's summary and its training metrics."""
    from orl.logger import read_metrics

    summary = run(tmp_path / "full", 4, False)
    run(tmp_path / "resumed", 2, False)
    run(tmp_path / "resumed", 4, True)
    full = [r for r in read_metrics(tmp_path / "full") if "train/loss" in r]
    resumed = [r for r in read_metrics(tmp_path / "resumed") if "train/loss" in r]
    assert [r["step"] for r in full] == [1, 2, 3, 4]
    assert full == resumed  # steps 3-4 after the resume repeat the uninterrupted run exactly
    return summary, full
