"""Where a number came from: the exact data and software a run used.

Datasets that orl collects itself differ from machine to machine (another CPU, another MuJoCo or torch
build gives another SAC and so other trajectories), and a README number is only reproducible on the data
it was measured on. Every run therefore writes `provenance.json` beside its metrics: the sha256 of the
arrays it trained on, and the versions and processor it ran with. `orl-report` reads it and says when the
runs of one table were trained on different data under the same dataset name.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from orl.errors import DataError
from orl.io import atomic_write_json

PROVENANCE_FILE = "provenance.json"
PACKAGES = ("torch", "numpy", "gymnasium", "mujoco", "minari", "transformers")


def dataset_checksum(dataset: Any) -> str:
    """sha256 of the arrays training depends on (observations, actions, rewards, episode ends), as loaded."""
    digest = hashlib.sha256()
    for array in (dataset.observations, dataset.actions, dataset.rewards, dataset.terminals, dataset.timeouts):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_checksum(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (what `sha256sum` prints), or of every file below a directory with its relative path."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _cpu_model() -> str:
    """The processor's name with its family and model numbers (virtual machines often report a bare "AMD EPYC")."""
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return platform.processor() or platform.machine()
    info = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
    if "model name" not in info:
        return platform.processor() or platform.machine()
    return f"{info['model name']} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def _git_commit(root: Path | None = None) -> str | None:
    """The orl checkout's commit (+ '-dirty' with uncommitted changes to tracked files) when orl runs from its own
    git checkout; None otherwise. An installed orl (site-packages) may sit inside the user's own repository, whose
    commit says nothing about orl: only a repository that tracks orl's own files counts."""
    root = (root or Path(__file__).resolve().parent.parent).resolve()
    if not (root / "orl" / "__init__.py").is_file():
        return None
    try:
        # orl's own files tracked by the repository (orl's, or one that vendors it): its commit pins orl's code.
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "orl/__init__.py"], cwd=root, capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0:
            return None
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def software() -> dict[str, Any]:
    """Python, orl and the packages results depend on, the processor and orl's commit (from a git checkout only)."""
    from orl import __version__

    versions = {"orl": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"python": sys.version.split()[0], "packages": versions, "cpu": _cpu_model(), "platform": platform.platform(),
            "orl_commit": _git_commit()}


def write_provenance(run_dir: str | os.PathLike, data: dict[str, Any], device: str, step: int = 0) -> None:
    """run_dir/provenance.json: `data` (id, sha256, size) plus the software and device, written atomically.

    A run resumed at `step` > 0 keeps the record of its start and appends the software and device of the new
    segment under "resumed" (a run continued on another machine says so); resuming on other data than the
    run trained on is refused, since its curve would join two datasets under one name."""
    run_dir = Path(run_dir)
    record = read_provenance(run_dir) if step > 0 else None
    if record is None:
        record = {"data": data, "device": device, **software()}
    else:
        before, now = (record.get("data") or {}).get("sha256"), data.get("sha256")
        if before and now and before != now:
            raise DataError(f"{run_dir} trained on {data.get('id')} with sha256 {before[:12]} up to step {step}, but "
                            f"the data loaded now has sha256 {now[:12]}: resume it on the same data, or start a new "
                            "run (another run_dir)")
        # The rows held out for evaluation (a text run's lm.holdout) are part of what it trains on
        held_before, held_now = (record.get("data") or {}).get("held_out_rows"), data.get("held_out_rows")
        if held_before is not None and held_now is not None and held_before != held_now:
            raise DataError(f"{run_dir} held out {len(held_before)} rows of {data.get('id')} for evaluation up to step {step}, but "
                            f"the settings now hold out {len(held_now)} other ones (lm.holdout or the seed changed): resume it with "
                            "the run's own settings (its config.yaml), or start a new run")
        record.setdefault("resumed", []).append({"step": step, "device": device, **software()})
    atomic_write_json(run_dir / PROVENANCE_FILE, record)


def read_provenance(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's provenance record, or None when it has none (runs from before it existed) or it is unreadable."""
    try:
        record = json.loads((Path(run_dir) / PROVENANCE_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def data_versions(runs: Iterable[tuple[str, str | None, str]]) -> dict[str, dict[str, list[str]]]:
    """(dataset name, data sha256 or None, run name) triples -> {dataset: {sha256 or "unrecorded": run names}}.
    A dataset with more than one key was not the same data for all its runs (or some runs predate provenance)."""
    versions: dict[str, dict[str, list[str]]] = {}
    for dataset, sha256, name in runs:
        versions.setdefault(dataset, {}).setdefault(sha256 or "unrecorded", []).append(name)
    return versions
