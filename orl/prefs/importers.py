"""Human preference labels from other projects' files (Uni-RLHF, Preference Transformer) as orl PreferencePairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from orl.data import OfflineDataset
from orl.errors import DataError
from orl.provenance import dataset_checksum
from orl.prefs.labels import PreferencePairs, check_segments


# Public crowd-sourced label releases
_NUMPY_GLOBALS = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray") for name in ("_reconstruct", "scalar")} | {
    ("numpy", "ndarray"), ("numpy", "dtype")}


def _load_numpy_pickle(path: Path):
    """A pickle that may hold only numpy arrays, numpy scalars and plain Python containers: any other global
    (a function, a class with side effects) is refused, so a label file cannot run code."""
    import pickle

    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _NUMPY_GLOBALS:
                return super().find_class(module, name)
            raise DataError(f"{path} refers to {module}.{name}; a label file may hold only numpy arrays and lists (not loaded)")

    try:
        with open(path, "rb") as f:
            return NumpyOnly(f).load()
    except DataError:
        raise
    except Exception as exc:  # truncated, not a pickle
        raise DataError(f"{path} is not a readable label pickle ({type(exc).__name__}: {exc})") from exc


def load_uni_rlhf_labels(directory: str | Path, dataset: OfflineDataset, queries: int, length: int) -> PreferencePairs:
    """Uni-RLHF crowd-sourced labels (Clean-Offline-RLHF's `<env>_human_labels/` folders): three pickles whose
    names contain `num_<queries>_len_<length>`, which sorted are (labels, indices_1, indices_2). Indices point
    into D4RL's qlearning_dataset arrays (timeout steps dropped, as orl reads a file without next_observations);
    label 0 prefers the first segment, 1 the second, -1 is a tie."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory of Uni-RLHF label files")
    matched = sorted(p for p in directory.iterdir() if f"num_{queries}_len_{length}" in p.name)
    if len(matched) != 3:
        raise DataError(f"{directory}: expected 3 files with 'num_{queries}_len_{length}' in their names (labels, indices_1, "
                        f"indices_2), found {[p.name for p in matched]}")
    raw_labels, first, second = (np.asarray(_load_numpy_pickle(p)).reshape(-1) for p in matched)
    return _human_label_pairs(raw_labels, first, second, length, dataset, directory, {"kind": "uni-rlhf", "files": [str(p) for p in matched]})


def load_preference_transformer_labels(directory: str | Path, dataset: OfflineDataset, length: int, queries: int | None = None) -> PreferencePairs:
    """Preference Transformer's human labels (csmile-1006/PreferenceTransformer `human_label/<env>/`): pickles
    `indices_num<N>` (first segments), `indices_2_num<N>` (second segments) and `label_human`, with the label
    convention of Uni-RLHF. As PT's loader does, `queries` takes the *last* N labels (all when None).
    Indices point into D4RL's qlearning_dataset arrays, as for Uni-RLHF."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory of Preference Transformer label files")
    names = sorted(p.name for p in directory.iterdir())
    found = {role: [n for n in names if match(n)] for role, match in (
        ("indices_num*", lambda n: n.startswith("indices_num")), ("indices_2_num*", lambda n: n.startswith("indices_2_num")),
        ("label_human", lambda n: n == "label_human"))}
    for role, matched in found.items():
        if len(matched) != 1:
            raise DataError(f"{directory}: expected one {role} file (Preference Transformer's human_label/<env>/ layout), found {matched}")
    first, second, raw_labels = (np.asarray(_load_numpy_pickle(directory / found[role][0])).reshape(-1) for role in found)
    if not (len(raw_labels) == len(first) == len(second)):
        raise DataError(f"{directory}: {len(raw_labels)} labels but {len(first)} and {len(second)} indices")
    if queries is not None:
        if not 0 < queries <= len(raw_labels):
            raise DataError(f"{directory}: --queries {queries} but the folder holds {len(raw_labels)} labels")
        raw_labels, first, second = raw_labels[-queries:], first[-queries:], second[-queries:]
    return _human_label_pairs(raw_labels, first, second, length, dataset, directory,
                              {"kind": "preference-transformer", "files": [str(directory / f[0]) for f in found.values()]})


def _human_label_pairs(raw_labels: np.ndarray, first: np.ndarray, second: np.ndarray, length: int, dataset: OfflineDataset,
                       where: Path, teacher: dict) -> PreferencePairs:
    """Released human labels -> PreferencePairs: 0 prefers the first segment, 1 the second, -1 is a tie."""
    if not (len(raw_labels) == len(first) == len(second)):
        raise DataError(f"{where}: {len(raw_labels)} labels but {len(first)} and {len(second)} indices")
    unknown = sorted(set(np.unique(raw_labels).tolist()) - {0, 1, -1})
    if unknown:
        raise DataError(f"{where}: labels must be 0 (first preferred), 1 (second) or -1 (tie), found {unknown[:5]}")
    starts = np.stack([first, second], 1).astype(np.int64)
    check_segments(starts, length, dataset, str(where))
    labels = np.select([raw_labels == 0, raw_labels == 1], [1.0, 0.0], 0.5).astype(np.float32)
    return PreferencePairs(starts, labels, length, dataset.source, dataset_checksum(dataset), teacher)
