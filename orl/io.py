"""The one atomic write: a file is replaced in one rename, so a reader (or a resumed run after a kill -9) sees
the old file or the new one, never half of either."""
from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any, Iterator

from orl.errors import OrlError


class WriteError(OrlError):
    """A file could not be written (full disk, quota, vanished mount); the previous file is untouched."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
    """A temporary path beside `path` (same directory, same suffix, so `np.savez` and h5py keep it) to write to.

    When the block ends without an error the data is fsync'ed and renamed over `path` (atomic on POSIX and
    Windows); otherwise the temporary file is removed and `path` is left as it was. An OSError becomes one
    WriteError that says what was kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        kept = f"the previous {what} {path} is kept" if path.exists() else f"no earlier {what} exists"
        reason = "no space left on the device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise WriteError(f"could not write {what} {path}: {reason}; {kept}. Free space (or fix the path) and run again") from exc
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".npz")):  # np.savez adds .npz to a name without it
            if leftover.exists():
                leftover.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))
