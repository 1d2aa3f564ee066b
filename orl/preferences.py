"""Preferences over trajectory segments of an orl dataset, and the Bradley–Terry loss every preference
learner shares (the text reward model in agents/reward_model.py, control reward models, CPL).

A query is a pair of segments of length H, each stored as its **start index into the source dataset**
(never a copy of the arrays), with the source's id and a checksum of its arrays, so labels cannot be
applied to other data. Segments never cross a trajectory boundary (terminal, timeout or a break in
s' -> s). A label is P(segment a is preferred to b): 1, 0, 0.5 for a tie, or anything between.

Scripted teachers follow B-Pref (Lee et al., 2021), on the segments' true rewards:
rational (`beta=inf`), stochastic Bradley–Terry (`beta`), myopic (`gamma`: step t of H weighs
gamma^(H-1-t)), mistakes (`mistake`: flip with that probability), ties (`tie_threshold`: returns closer
than it are equally preferable) and skip (`skip_threshold`: queries where neither segment's return
reaches it are dropped).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from orl.data import OfflineDataset, observation_statistics
from orl.errors import DataError
from orl.provenance import dataset_checksum


def preference_loss(score_a: torch.Tensor, score_b: torch.Tensor, label: torch.Tensor | float = 1.0,
                    margin: torch.Tensor | float = 0.0, center_coef: float = 0.0) -> torch.Tensor:
    """Bradley–Terry negative log-likelihood with soft labels:
    -[y log sigma(s_a - s_b - m) + (1 - y) log sigma(s_b - s_a + m)], y = P(a > b) (0.5: a tie).
    With y = 1 it is the reward-model loss of InstructGPT/TRL (margin m, optional centering of scores)."""
    diff = score_a - score_b - margin
    label = torch.as_tensor(label, dtype=diff.dtype, device=diff.device)
    loss = -(label * F.logsigmoid(diff) + (1 - label) * F.logsigmoid(-diff)).mean()
    if center_coef:
        loss = loss + center_coef * (score_a + score_b).pow(2).mean()
    return loss


def segment_starts(dataset: OfflineDataset, length: int) -> np.ndarray:
    """Every start t such that t, ..., t + length - 1 lie in one trajectory."""
    episodes = dataset.episode_ids()
    n = len(dataset)
    if length < 1 or length > n:
        return np.zeros(0, dtype=np.int64)
    starts = np.arange(n - length + 1)
    return starts[episodes[starts] == episodes[starts + length - 1]]


@dataclass
class Teacher:
    """A scripted labeller (B-Pref). Defaults: the rational teacher (no noise, no ties, no skips)."""

    beta: float = math.inf         # stochastic: P(a > b) = sigmoid(beta (R_a - R_b)); inf = rational (the larger return)
    gamma: float = 1.0             # myopic: weight gamma^(H-1-t) on step t (later steps count more)
    mistake: float = 0.0           # flip the label with this probability
    tie_threshold: float = 0.0     # |R_a - R_b| below this: label 0.5 (equally preferable)
    skip_threshold: float | None = None  # drop queries where max(R_a, R_b) < this

    def label(self, rewards_a: np.ndarray, rewards_b: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(labels, kept): labels of the kept queries from per-step rewards of shape (M, H)."""
        length = rewards_a.shape[1]
        weights = self.gamma ** np.arange(length - 1, -1, -1, dtype=np.float64)
        ret_a, ret_b = (rewards_a * weights).sum(1), (rewards_b * weights).sum(1)
        kept = np.ones(len(ret_a), bool) if self.skip_threshold is None else np.maximum(ret_a, ret_b) >= self.skip_threshold
        ret_a, ret_b = ret_a[kept], ret_b[kept]
        if math.isinf(self.beta):
            labels = (ret_a > ret_b).astype(np.float32)
        else:
            probability = 1.0 / (1.0 + np.exp(-self.beta * (ret_a - ret_b)))
            labels = (rng.random(len(ret_a)) < probability).astype(np.float32)
        flip = rng.random(len(labels)) < self.mistake
        labels[flip] = 1.0 - labels[flip]
        labels[np.abs(ret_a - ret_b) < self.tie_threshold] = 0.5  # a tie is never flipped into a preference
        if math.isinf(self.beta):
            labels[ret_a == ret_b] = 0.5
        return labels, kept


@dataclass
class PreferencePairs:
    """Labelled segment pairs over one source dataset."""

    starts: np.ndarray   # (M, 2) int64: start of segment a and of segment b
    labels: np.ndarray   # (M,) float32: P(a preferred to b)
    length: int          # H
    source: str          # the dataset's id or path
    checksum: str        # dataset_checksum of the source
    teacher: dict        # how the labels were made ({"kind": "scripted", ...} or {"kind": "file", ...})

    def __len__(self) -> int:
        return len(self.labels)

    def segment_indices(self) -> np.ndarray:
        """(M, 2, H) transition indices of every segment."""
        return self.starts[:, :, None] + np.arange(self.length)

    def split(self, held_out: float, seed: int = 0) -> tuple["PreferencePairs", "PreferencePairs"]:
        order = np.random.default_rng(seed).permutation(len(self))
        cut = len(self) - int(round(held_out * len(self)))
        part = lambda index: PreferencePairs(self.starts[index], self.labels[index], self.length, self.source, self.checksum, self.teacher)  # noqa: E731
        return part(order[:cut]), part(order[cut:])

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, starts=self.starts, labels=self.labels, length=self.length, source=self.source, checksum=self.checksum,
                 teacher=json.dumps(self.teacher))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, dataset: OfflineDataset) -> "PreferencePairs":
        """Labels from `path`, checked against `dataset`: the same data (checksum), indices inside it, and
        segments inside one trajectory each."""
        return cls.from_fields(_read_label_file(path, dataset, "pairs"), dataset, path)

    @classmethod
    def from_fields(cls, fields: dict[str, np.ndarray], dataset: OfflineDataset, path: str | Path) -> "PreferencePairs":
        pairs = cls(fields["starts"].astype(np.int64), fields["labels"].astype(np.float32), int(fields["length"]), str(fields["source"]),
                    str(fields["checksum"]), json.loads(str(fields["teacher"])))
        check_segments(pairs.starts, pairs.length, dataset, str(path))
        return pairs


@dataclass
class SegmentScores:
    """Segments with one score each (CPL's dense "score" mode): any two segments of a batch are a comparison,
    the higher score preferred, so a batch of B segments gives B (B - 1) / 2 of them."""

    starts: np.ndarray   # (M,) int64
    scores: np.ndarray   # (M,) float32, e.g. the segment's return
    length: int
    source: str
    checksum: str
    teacher: dict

    def __len__(self) -> int:
        return len(self.scores)

    def segment_indices(self) -> np.ndarray:
        """(M, H) transition indices of every segment."""
        return self.starts[:, None] + np.arange(self.length)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, kind="scores", starts=self.starts, scores=self.scores, length=self.length, source=self.source,
                 checksum=self.checksum, teacher=json.dumps(self.teacher))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, dataset: OfflineDataset) -> "SegmentScores":
        return cls.from_fields(_read_label_file(path, dataset, "scores"), dataset, path)

    @classmethod
    def from_fields(cls, fields: dict[str, np.ndarray], dataset: OfflineDataset, path: str | Path) -> "SegmentScores":
        scores = cls(fields["starts"].astype(np.int64), fields["scores"].astype(np.float32), int(fields["length"]), str(fields["source"]),
                     str(fields["checksum"]), json.loads(str(fields["teacher"])))
        check_segments(scores.starts, scores.length, dataset, str(path))
        return scores


def _read_label_file(path: str | Path, dataset: OfflineDataset, kind: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of an orl label file of `kind` ("pairs", "scores" or None: either), made on `dataset` (same
    checksum); fields["kind"] says which it is."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            fields = {key: f[key] for key in f.files}
        found = str(fields.get("kind", "pairs"))
        if found not in ("pairs", "scores"):
            raise ValueError(f"label kind {found!r} is neither pairs nor scores")
        for key in ("starts", "labels" if found == "pairs" else "scores", "length", "source", "checksum", "teacher"):
            if key not in fields:
                raise KeyError(key)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path} is not an orl preference file ({type(exc).__name__}: {exc})") from exc
    fields["kind"] = np.asarray(found)
    if kind is not None and found != kind:
        made_by = {"pairs": "`orl-prefs label`", "scores": "`orl-prefs label --scores`"}
        raise DataError(f"{path} holds segment {found} ({made_by[found]}), but segment {kind} are needed here "
                        f"({made_by[kind]}); " + ("only agent=cpl/cpl_kl trains on scored segments" if found == "scores" else
                                                    "give a file made with --scores"))
    checksum = dataset_checksum(dataset)
    if str(fields["checksum"]) != checksum:
        raise DataError(f"{path} labels segments of {fields['source']} (checksum {str(fields['checksum'])[:12]}), but the dataset given "
                        f"({dataset.source}) holds other data (checksum {checksum[:12]}); give the dataset the labels were made on")
    return fields


def load_segment_labels(path: str | Path, dataset: OfflineDataset) -> "PreferencePairs | SegmentScores":
    """Whichever kind of label file `path` is: labelled pairs or scored segments."""
    fields = _read_label_file(path, dataset)
    return (SegmentScores if str(fields["kind"]) == "scores" else PreferencePairs).from_fields(fields, dataset, path)


def check_segments(starts: np.ndarray, length: int, dataset: OfflineDataset, where: str) -> None:
    """Raise DataError if a segment leaves the dataset or crosses a trajectory boundary (starts: (M, 2) pairs or (M,))."""
    starts = np.asarray(starts)
    if not (starts.ndim == 2 and starts.shape[1] == 2 or starts.ndim == 1):
        raise DataError(f"{where}: segment starts must have shape (queries, 2) or (segments,), got {starts.shape}")
    last = int(starts.max()) + length if starts.size else 0
    if starts.size and (starts.min() < 0 or last > len(dataset)):
        raise DataError(f"{where}: segments reach index {last - 1}, but {dataset.source} has {len(dataset)} transitions "
                        f"(segment length {length}); the labels were made for other data")
    episodes = dataset.episode_ids()
    crossing = episodes[starts] != episodes[starts + length - 1]
    if crossing.any():
        query = int(np.argwhere(crossing)[0][0])
        raise DataError(f"{where}: query {query} has a segment that crosses a trajectory boundary in {dataset.source}")


def scripted_preferences(dataset: OfflineDataset, queries: int, length: int, teacher: Teacher | None = None,
                         seed: int = 0) -> PreferencePairs:
    """`queries` pairs of segments drawn uniformly among all valid starts, labelled by `teacher` on the true reward."""
    teacher = teacher or Teacher()
    starts = segment_starts(dataset, length)
    if len(starts) < 2:
        raise DataError(f"{dataset.source}: fewer than two segments of length {length} fit inside its trajectories; use a shorter length")
    rng = np.random.default_rng(seed)
    first = rng.choice(starts, queries)
    second = rng.choice(starts, queries)
    same = first == second
    while same.any():  # a segment is never compared with itself
        second[same] = rng.choice(starts, int(same.sum()))
        same = first == second
    pairs = np.stack([first, second], 1).astype(np.int64)
    steps = pairs[:, :, None] + np.arange(length)
    labels, kept = teacher.label(dataset.rewards[steps[:, 0]].astype(np.float64), dataset.rewards[steps[:, 1]].astype(np.float64), rng)
    return PreferencePairs(pairs[kept], labels, length, dataset.source, dataset_checksum(dataset),
                           {"kind": "scripted", "seed": seed, **asdict(teacher)})


def scripted_scores(dataset: OfflineDataset, segments: int, length: int, gamma: float = 1.0, seed: int = 0) -> SegmentScores:
    """`segments` distinct segments drawn uniformly among all valid starts, each scored by its return (step t of H
    weighted gamma^(H-1-t), the myopic teacher's weighting): the dense labels of CPL's score mode."""
    starts = segment_starts(dataset, length)
    if len(starts) < 2:
        raise DataError(f"{dataset.source}: fewer than two segments of length {length} fit inside its trajectories; use a shorter length")
    if segments > len(starts):
        raise DataError(f"{dataset.source}: {segments} segments asked for, but only {len(starts)} distinct ones of length {length} fit")
    chosen = np.sort(np.random.default_rng(seed).choice(starts, segments, replace=False)).astype(np.int64)
    weights = gamma ** np.arange(length - 1, -1, -1, dtype=np.float64)
    scores = (dataset.rewards[chosen[:, None] + np.arange(length)].astype(np.float64) * weights).sum(1)
    return SegmentScores(chosen, scores.astype(np.float32), length, dataset.source, dataset_checksum(dataset),
                         {"kind": "scripted-scores", "seed": seed, "gamma": gamma})


# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# A Bradley–Terry reward model for control: an ensemble of MLPs r(s, a), trained on segment pairs
@dataclass
class RewardModelConfig:
    """Defaults follow Uni-RLHF's MLP reward model (Clean-Offline-RLHF rlhf/train_reward_model.py): an
    ensemble of 3 MLPs with a tanh output, Adam 3e-4; training stops early once the ensemble's accuracy on
    the training queries reaches `stop_accuracy`."""

    ensemble_size: int = 3
    hidden: tuple[int, ...] = (256, 256)
    lr: float = 3e-4
    batch_size: int = 64           # queries per step
    max_epochs: int = 300
    stop_accuracy: float = 0.97    # ensemble-mean accuracy on the non-tie training queries
    held_out: float = 0.1          # share of the queries kept out of training, for the held-out accuracy
    tanh_output: bool = True       # r in (-1, 1)
    seed: int = 0


class RewardEnsemble(torch.nn.Module):
    """r_k(s, a) for k members, one batched network (orl.nn.Critic); observations are standardized with the
    statistics of the data it was trained on (kept in the module, so it relabels raw data)."""

    kind = "mlp_ensemble"

    def __init__(self, obs_dim: int, action_dim: int, cfg: RewardModelConfig):
        super().__init__()
        from orl.nn import Critic

        self.cfg, self.obs_dim, self.action_dim = cfg, obs_dim, action_dim
        self.net = Critic(obs_dim, action_dim, cfg.ensemble_size, cfg.hidden)
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """(E, *batch) per-step rewards of every member."""
        shape = obs.shape[:-1]
        rewards = self.net((obs.reshape(-1, obs.shape[-1]) - self.obs_mean) / self.obs_std, action.reshape(-1, action.shape[-1]))
        rewards = torch.tanh(rewards) if self.cfg.tanh_output else rewards
        return rewards.reshape(len(rewards), *shape)

    @torch.no_grad()
    def predict(self, obs: np.ndarray, action: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Ensemble-mean reward of every (s, a), as float32 numpy."""
        device = self.obs_mean.device
        out = [self(torch.as_tensor(obs[i:i + chunk], device=device), torch.as_tensor(action[i:i + chunk], device=device)).mean(0)
               for i in range(0, len(obs), chunk)]
        return torch.cat(out).cpu().numpy().astype(np.float32)

    def predict_dataset(self, dataset: OfflineDataset) -> np.ndarray:
        """Per-transition rewards of a dataset (Markovian: each (s, a) on its own)."""
        return self.predict(dataset.observations, dataset.actions)


def _accuracy(returns_a: torch.Tensor, returns_b: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of non-tie queries where the larger predicted return is the preferred segment's."""
    decided = labels != 0.5
    if not bool(decided.any()):
        return float("nan")
    return float(((returns_a > returns_b).float() == labels)[decided].float().mean())


def train_reward_model(dataset: OfflineDataset, pairs: PreferencePairs, cfg: RewardModelConfig | None = None,
                       device: torch.device | str = "cpu") -> tuple[RewardEnsemble, dict[str, float]]:
    """Fit a RewardEnsemble on `pairs` (each member on every minibatch, its own initialization) and report
    training and held-out accuracy on non-tie queries and, as the data has true rewards, the correlation of
    the learned with the true per-step reward."""
    cfg = cfg or RewardModelConfig()
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    train, held_out = pairs.split(cfg.held_out, cfg.seed)
    model = standardize_inputs(RewardEnsemble(dataset.obs_dim, dataset.action_dim, cfg).to(device), dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    obs, actions = torch.as_tensor(dataset.observations, device=device), torch.as_tensor(dataset.actions, device=device)

    def returns(part: PreferencePairs, rows: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(part.segment_indices(), device=device)[rows]          # (M, 2, H)
        rewards = model(obs[index], actions[index])                                     # (E, M, 2, H)
        segment = rewards.sum(-1)
        return segment[..., 0], segment[..., 1]                                         # (E, M) each

    labels = torch.as_tensor(train.labels, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    epochs, train_accuracy = 0, float("nan")
    for epochs in range(1, cfg.max_epochs + 1):
        for rows in torch.randperm(len(train), generator=generator, device=device).split(cfg.batch_size):
            ret_a, ret_b = returns(train, rows)
            # one BT loss per member, summed: the members train independently on the same queries
            loss = sum(preference_loss(ret_a[k], ret_b[k], labels[rows]) for k in range(cfg.ensemble_size))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            ret_a, ret_b = returns(train)
            train_accuracy = _accuracy(ret_a.mean(0), ret_b.mean(0), labels)
        if train_accuracy >= cfg.stop_accuracy:
            break
    metrics = {"epochs": float(epochs), "train_accuracy": train_accuracy, "train_queries": float(len(train)),
               "held_out_queries": float(len(held_out))}
    with torch.no_grad():
        if len(held_out):
            ret_a, ret_b = returns(held_out)
            metrics["held_out_accuracy"] = _accuracy(ret_a.mean(0), ret_b.mean(0), torch.as_tensor(held_out.labels, device=device))
    metrics.update(reward_correlation(model, dataset))
    return model, metrics


def standardize_inputs(model: torch.nn.Module, dataset: OfflineDataset) -> torch.nn.Module:
    """Set a reward model's obs_mean / obs_std buffers to the statistics of the data it trains on."""
    obs_mean, obs_std = observation_statistics(dataset)
    model.obs_mean.copy_(torch.as_tensor(obs_mean))
    model.obs_std.copy_(torch.as_tensor(obs_std))
    return model


def reward_correlation(model: torch.nn.Module, dataset: OfflineDataset) -> dict[str, float]:
    """{"reward_correlation": corr(learned, true per-step reward)} where both vary, else {}."""
    learned = model.predict_dataset(dataset)
    if learned.std() > 0 and dataset.rewards.std() > 0:
        return {"reward_correlation": float(np.corrcoef(learned, dataset.rewards)[0, 1])}
    return {}


def save_reward_model(path: str | Path, model: torch.nn.Module, pairs: PreferencePairs, metrics: dict[str, float]) -> None:
    """One file with the model's kind, weights and config, the labels' provenance and the training metrics
    (a RewardEnsemble or an orl.preference_transformer.PreferenceTransformer)."""
    from orl.checkpoint import save_checkpoint

    save_checkpoint({"kind": model.kind, "state": model.state_dict(), "config": asdict(model.cfg), "obs_dim": model.obs_dim, "action_dim": model.action_dim,
                     "source": pairs.source, "checksum": pairs.checksum, "labels": {"queries": len(pairs), "length": pairs.length,
                                                                                    "teacher": pairs.teacher},
                     "metrics": metrics}, Path(path))


def load_reward_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """(model, record) from a file written by save_reward_model, or a directory holding reward_model.pt."""
    from orl.checkpoint import load_checkpoint

    path = Path(path)
    if path.is_dir():
        path = path / "reward_model.pt"
    if not path.is_file():
        raise DataError(f"no reward model at {path}; train one with `orl-prefs reward` (it writes <out>/reward_model.pt)")
    record = load_checkpoint(path, map_location="cpu")
    config = dict(record["config"])
    kind = record.get("kind", RewardEnsemble.kind)
    if kind == RewardEnsemble.kind:
        config["hidden"] = tuple(config["hidden"])
        model = RewardEnsemble(record["obs_dim"], record["action_dim"], RewardModelConfig(**config))
    elif kind == "preference_transformer":
        from orl.preference_transformer import PreferenceTransformer, PreferenceTransformerConfig

        model = PreferenceTransformer(record["obs_dim"], record["action_dim"], PreferenceTransformerConfig(**config))
    else:
        raise DataError(f"{path} holds a reward model of kind {kind!r}, which this version of orl does not know")
    model.load_state_dict(record["state"])
    return model.eval(), record


def relabel(dataset: OfflineDataset, model: torch.nn.Module, normalize: str = "none") -> OfflineDataset:
    """A copy of `dataset` whose rewards are the learned ones (the ensemble mean, or the Preference
    Transformer's "last"-mode reward); `normalize`: none (Uni-RLHF's P-IQL uses the tanh output as it is) |
    minmax (to [0, 1]) | standard (zero mean, unit std)."""
    import dataclasses

    rewards = model.predict_dataset(dataset)
    if normalize == "minmax":
        rewards = (rewards - rewards.min()) / max(float(rewards.max() - rewards.min()), 1e-8)
    elif normalize == "standard":
        rewards = (rewards - rewards.mean()) / max(float(rewards.std()), 1e-8)
    elif normalize != "none":
        raise DataError(f"learned reward normalization must be none, minmax or standard, got {normalize!r}")
    return dataclasses.replace(dataset, rewards=rewards.astype(np.float32), source=dataset.source)


# ---------------------------------------------------------------------------------------------------
def prefs_main(argv: list[str] | None = None) -> None:
    """orl-prefs: from an orl dataset to preference labels, and from labels to a reward model.

        orl-prefs label orl/hopper/medium-replay-v0 --queries 2000 --length 50 --out prefs.npz [--mistake 0.1]
        orl-prefs label orl/hopper/medium-replay-v0 --scores --queries 2000 --length 50 --out scores.npz   # CPL's dense mode
        orl-prefs reward orl/hopper/medium-replay-v0 prefs.npz --out runs/rm/hopper
        orl-train agent=iql dataset=orl/hopper/medium-replay-v0 data.reward=learned:runs/rm/hopper      # P-IQL
    """
    import argparse
    import sys

    from orl.data import make_dataset
    from orl.errors import OrlError

    parser = argparse.ArgumentParser(prog="orl-prefs", description=prefs_main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    label = sub.add_parser("label", help="scripted preference labels over segment pairs of a dataset")
    label.add_argument("dataset", help="a Minari id, D4RL name or .npz/.hdf5 path (as orl-train's dataset=)")
    label.add_argument("--queries", type=int, default=2000)
    label.add_argument("--length", type=int, default=50, help="segment length H")
    label.add_argument("--beta", type=float, default=math.inf, help="stochastic teacher: P(a > b) = sigmoid(beta (R_a - R_b)); inf = rational")
    label.add_argument("--gamma", type=float, default=1.0, help="myopic teacher: step t of H weighs gamma^(H-1-t)")
    label.add_argument("--mistake", type=float, default=0.0, help="flip each label with this probability")
    label.add_argument("--tie-threshold", type=float, default=0.0, help="returns closer than this are a tie (label 0.5)")
    label.add_argument("--skip-threshold", type=float, default=None, help="drop queries where neither return reaches this")
    label.add_argument("--scores", action="store_true",
                       help="score --queries distinct segments by their (--gamma weighted) return instead of labelling pairs: "
                            "CPL's dense score mode, where every two segments of a batch are a comparison")
    label.add_argument("--seed", type=int, default=0)
    label.add_argument("--out", required=True, help="label file (.npz)")
    imported = sub.add_parser("import-uni-rlhf", help="Uni-RLHF crowd-sourced labels (pickled index/label files) -> an orl label file")
    imported.add_argument("dataset", help="the dataset the labels index (D4RL layout, e.g. hopper-medium-replay-v2)")
    imported.add_argument("directory", help="the <env>_human_labels folder")
    imported.add_argument("--queries", type=int, required=True)
    imported.add_argument("--length", type=int, required=True)
    imported.add_argument("--out", required=True)
    imported_pt = sub.add_parser("import-pt", help="Preference Transformer's human labels (human_label/<env>/ pickles) -> an orl label file")
    imported_pt.add_argument("dataset", help="the dataset the labels index (D4RL layout, e.g. hopper-medium-replay-v2)")
    imported_pt.add_argument("directory", help="the human_label/<env> folder (indices_num*, indices_2_num*, label_human)")
    imported_pt.add_argument("--length", type=int, required=True, help="segment length the labels were made with (PT: 100 on MuJoCo)")
    imported_pt.add_argument("--queries", type=int, default=None, help="use the last N labels, as PT's loader (default: all)")
    imported_pt.add_argument("--out", required=True)
    reward = sub.add_parser("reward", help="train a Bradley-Terry reward ensemble on labels")
    reward.add_argument("dataset")
    reward.add_argument("labels", help="a label file from `orl-prefs label` made on this dataset")
    reward.add_argument("--out", required=True, help="directory for reward_model.pt and metrics.json")
    reward.add_argument("--model", choices=("mlp", "transformer"), default="mlp",
                        help="mlp: Uni-RLHF's MLP ensemble (Markovian); transformer: Preference Transformer (non-Markovian)")
    reward.add_argument("--ensemble-size", type=int, default=RewardModelConfig.ensemble_size)
    reward.add_argument("--max-epochs", type=int, default=None,
                        help=f"mlp: at most this many (default {RewardModelConfig.max_epochs}); transformer: exactly (default 100)")
    reward.add_argument("--window", type=int, default=25, help="transformer: relabelling window (the official seq_len)")
    reward.add_argument("--stop-accuracy", type=float, default=RewardModelConfig.stop_accuracy)
    reward.add_argument("--held-out", type=float, default=RewardModelConfig.held_out)
    reward.add_argument("--seed", type=int, default=0)
    reward.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # small networks; a second thread only contends on shared machines
    try:
        dataset = make_dataset(args.dataset)
        if args.command == "import-uni-rlhf":
            pairs = load_uni_rlhf_labels(args.directory, dataset, args.queries, args.length)
            pairs.save(args.out)
            print(f"[orl-prefs] {len(pairs)} Uni-RLHF queries ({float((pairs.labels == 0.5).mean()):.0%} ties) -> {args.out}")
        elif args.command == "import-pt":
            pairs = load_preference_transformer_labels(args.directory, dataset, args.length, args.queries)
            pairs.save(args.out)
            print(f"[orl-prefs] {len(pairs)} Preference Transformer queries ({float((pairs.labels == 0.5).mean()):.0%} ties) -> {args.out}")
        elif args.command == "label" and args.scores:
            noisy = [flag for flag, value, default in (("--beta", args.beta, math.inf), ("--mistake", args.mistake, 0.0),
                     ("--tie-threshold", args.tie_threshold, 0.0), ("--skip-threshold", args.skip_threshold, None)) if value != default]
            if noisy:
                raise DataError(f"{', '.join(noisy)} label pairs; --scores gives each segment its return (only --gamma applies)")
            scored = scripted_scores(dataset, args.queries, args.length, args.gamma, args.seed)
            scored.save(args.out)
            print(f"[orl-prefs] {len(scored)} scored segments of {args.length} steps from {dataset.source} -> {args.out}")
        elif args.command == "label":
            teacher = Teacher(args.beta, args.gamma, args.mistake, args.tie_threshold, args.skip_threshold)
            pairs = scripted_preferences(dataset, args.queries, args.length, teacher, args.seed)
            pairs.save(args.out)
            ties = float((pairs.labels == 0.5).mean())
            print(f"[orl-prefs] {len(pairs)} queries of {args.length} steps from {dataset.source} ({ties:.0%} ties) -> {args.out}")
        else:
            pairs = PreferencePairs.load(args.labels, dataset)
            if args.model == "transformer":
                from orl.preference_transformer import PreferenceTransformerConfig, train_preference_transformer

                transformer_cfg = PreferenceTransformerConfig(epochs=args.max_epochs or PreferenceTransformerConfig.epochs, held_out=args.held_out, window=args.window, seed=args.seed)
                model, metrics = train_preference_transformer(dataset, pairs, transformer_cfg, args.device)
            else:
                cfg = RewardModelConfig(ensemble_size=args.ensemble_size, max_epochs=args.max_epochs or RewardModelConfig.max_epochs, stop_accuracy=args.stop_accuracy,
                                        held_out=args.held_out, seed=args.seed)
                model, metrics = train_reward_model(dataset, pairs, cfg, args.device)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            save_reward_model(out / "reward_model.pt", model.cpu(), pairs, metrics)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
            print(f"[orl-prefs] reward model -> {out / 'reward_model.pt'}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    except OrlError as exc:
        print(f"orl-prefs: error: {exc}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------------
# Segment batches for agents that learn from preferences directly (CPL)
@dataclass
class SegmentPairBatch:
    """B queries: obs (B, 2, H, obs_dim), actions (B, 2, H, action_dim), labels (B,) = P(segment 0 preferred)."""

    obs: torch.Tensor
    actions: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


class SegmentPairBuffer:
    """Labelled segment pairs over device tensors of the (prepared) dataset: a batch is an index gather."""

    def __init__(self, dataset: OfflineDataset, labels: "PreferencePairs | SegmentScores", device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.obs = torch.as_tensor(dataset.observations, device=self.device)
        self.actions = torch.as_tensor(dataset.actions, device=self.device)
        self.index = torch.as_tensor(labels.segment_indices(), device=self.device)  # (M, 2, H) pairs, (M, H) segments
        self.targets = torch.as_tensor(labels.labels if isinstance(labels, PreferencePairs) else labels.scores, device=self.device)

    def __len__(self) -> int:
        return len(self.targets)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> SegmentPairBatch:
        rows = torch.randint(len(self), (batch_size,), device=self.device, generator=generator)
        index = self.index[rows]
        return SegmentPairBatch(self.obs[index], self.actions[index], self.targets[rows])

    def state_dict(self) -> dict:
        return {}  # the labels are data, re-read from the label file on resume


@dataclass
class SegmentScoreBatch:
    """B distinct segments: obs (B, H, obs_dim), actions (B, H, action_dim), scores (B,)."""

    obs: torch.Tensor
    actions: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)


class SegmentScoreBuffer(SegmentPairBuffer):
    """Scored segments, in one of the official loader's two modes:

    - "rank" (its dense state-based configs): B segments, each compared with one drawn at random, labelled
      P(first preferred) = 1 if its score is higher, 0.5 on equal scores: a SegmentPairBatch;
    - "score": B distinct segments (the official batches of a permutation) with their scores, every pair of
      the batch a comparison: a SegmentScoreBatch.
    """

    MODES = ("rank", "score")

    def __init__(self, dataset: OfflineDataset, scores: SegmentScores, device: torch.device | str = "cpu", mode: str = "rank"):
        if mode not in self.MODES:
            raise DataError(f"score mode must be one of {self.MODES}, got {mode!r}")
        super().__init__(dataset, scores, device)
        self.mode = mode

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> SegmentPairBatch | SegmentScoreBatch:
        if self.mode == "score":
            rows = torch.randperm(len(self), device=self.device, generator=generator)[:batch_size]
            index = self.index[rows]
            return SegmentScoreBatch(self.obs[index], self.actions[index], self.targets[rows])
        rows = torch.randint(len(self), (2, batch_size), device=self.device, generator=generator)
        index = self.index[rows.T]                                                       # (B, 2, H)
        first, second = self.targets[rows[0]], self.targets[rows[1]]
        labels = (first > second).float() + 0.5 * (first == second).float()
        return SegmentPairBatch(self.obs[index], self.actions[index], labels)
