"""Fuzz suite (issue 15): malformed files, degenerate data, bad flags and text data, through the real CLI.

For every input: exit code 2 (or the project's error type), one message that names the file / key /
line, no traceback, and no file of the user's changed. Property-based cases (hypothesis) cover array
shapes, dtypes, NaN/inf positions and flag values, and numeric config values.
"""
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_pendulum_arrays

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from orl.errors import ConfigError, DataError, OrlError  # noqa: E402


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(monkeypatch, capsys, app: str, *args: str) -> tuple[int, str]:
    """The console entry point in-process (as `orl-train ARGS`), returning (exit code, stderr + stdout)."""
    import orl.apps.cli

    import logging

    monkeypatch.setattr(sys, "argv", [app.replace("_main", ""), *args])
    monkeypatch.delenv("ORL_DEBUG", raising=False)
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        getattr(orl.apps.cli, app)()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:  # hydra configures the root logger with this test's (soon closed) captured stdout: put it back
        logging.root.handlers[:], logging.root.level = handlers, level
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def expect_one_message(code: int, output: str, *names: str) -> None:
    assert code == 2, output[-2000:]
    assert "Traceback" not in output and "Error executing job" not in output, output[-2000:]
    message = [line for line in output.splitlines() if "error:" in line]
    assert len(message) == 1, output[-2000:]
    for name in names:
        assert name in message[0], (name, message[0])


# ---------------------------------------------------------------------------------------------------
# Malformed and degenerate control datasets, through orl-train
def _valid(n: int = 400) -> dict[str, np.ndarray]:
    return random_pendulum_arrays(n, seed=3)


def _npz(path: Path, **changes) -> None:
    arrays = {**_valid(), **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def _hdf5(path: Path) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for key, value in _valid().items():
            f.create_dataset(key, data=value)


def make_zero_byte(path): path.write_bytes(b"")
def make_garbage(path): path.write_bytes(bytes(range(256)) * 7)
def make_directory(path): path.mkdir()


def make_truncated(path):
    (_npz if path.suffix == ".npz" else _hdf5)(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_object_array(path):
    arrays = _valid()
    arrays["rewards"] = np.array([{"r": 1.0}] * len(arrays["rewards"]), dtype=object)
    np.savez(path, **arrays)


CONTROL_CASES = {
    # name: (suffix, maker, extra overrides, words the message must hold besides the file name)
    "zero-byte npz": (".npz", make_zero_byte, [], ["not a readable .npz"]),
    "zero-byte hdf5": (".hdf5", make_zero_byte, [], ["not a readable HDF5"]),
    "truncated npz": (".npz", make_truncated, [], ["not a readable .npz"]),
    "truncated hdf5": (".hdf5", make_truncated, [], ["not a readable HDF5"]),
    "garbage npz": (".npz", make_garbage, [], ["not a readable .npz"]),
    "garbage hdf5": (".h5", make_garbage, [], ["not a readable HDF5"]),
    "a directory": (".npz", make_directory, [], ["directory"]),
    "object array": (".npz", make_object_array, [], ["Python objects"]),
    "string rewards": (".npz", lambda p: _npz(p, rewards=np.array(["1.0"] * 400)), [], ["rewards", "strings"]),
    "complex rewards": (".npz", lambda p: _npz(p, rewards=np.ones(400, np.complex64)), [], ["rewards", "complex"]),
    "rewards (N, 2)": (".npz", lambda p: _npz(p, rewards=np.ones((400, 2), np.float32)), [], ["rewards", "(400, 2)"]),
    "3-d observations": (".npz", lambda p: _npz(p, observations=np.ones((400, 3, 1)), next_observations=None), [], ["observations"]),
    "reference not a number": (".npz", lambda p: _npz(p, ref_min_score=np.array("abc"), ref_max_score=np.array(0.0)), [], ["ref_min_score"]),
    "ref_min == ref_max": (".npz", lambda p: _npz(p, ref_min_score=np.array(5.0), ref_max_score=np.array(5.0)), [], ["ref_min_score", "ref_max_score"]),
    "overflowing rewards": (".npz", lambda p: _npz(p, rewards=np.full(400, 1e35, np.float32)), [], ["rewards", "overflow"]),
    "NaN observation": (".npz", lambda p: _npz(p, observations=np.where(np.arange(400)[:, None] == 7, np.nan, _valid()["observations"])), [], ["NaN"]),
    "flags not 0/1": (".npz", lambda p: _npz(p, terminals=np.full(400, 2.0, np.float32)), [], ["terminals"]),
    "mismatched lengths": (".npz", lambda p: _npz(p, actions=np.zeros((399, 1), np.float32)), [], ["mismatched"]),
    "missing key": (".npz", lambda p: _npz(p, terminals=None), [], ["terminals"]),
    "empty": (".npz", lambda p: np.savez(p, **{k: v[:0] for k, v in _valid().items()}), [], ["empty"]),
    "fewer transitions than a batch": (".npz", lambda p: np.savez(p, **random_pendulum_arrays(50, 1)), [], ["batch_size"]),
    "wrong env for the data": (".npz", lambda p: _npz(p), ["env=MountainCarContinuous-v0"], ["observation"]),
    "control data for a text agent": (".npz", lambda p: _npz(p), ["agent=dpo"], ["dpo", "text"]),
}


@pytest.mark.parametrize("case", sorted(CONTROL_CASES))
def test_malformed_control_data_is_one_clear_message(case, tmp_path, monkeypatch, capsys):
    suffix, make, overrides, words = CONTROL_CASES[case]
    user = tmp_path / "user"
    user.mkdir()
    data = user / f"data{suffix}"
    make(data)
    before = snapshot(user)
    code, output = run_cli(monkeypatch, capsys, "train_main", f"dataset={data}", "env=Pendulum-v1", "steps=5", "eval.every=0",
                           "log.progress=false", "log.tensorboard=false", f"run_dir={tmp_path / 'run'}", *overrides)
    expect_one_message(code, output, *([str(data)] if case not in ("control data for a text agent",) else []), *words)
    assert snapshot(user) == before


# ---------------------------------------------------------------------------------------------------
# Text data
TEXT_CASES = {
    "non-UTF-8 bytes": (b'{"prompt": "a", "response": "b", "reward": 1.0}\n{"prompt": "\xff\xfe", "response": "b", "reward": 1.0}\n', [":2", "UTF-8"]),
    "a line that is not an object": (b'{"prompt": "a", "response": "b", "reward": 1.0}\n[1, 2]\n', [":2", "object"]),
    "invalid JSON": (b'{"prompt": "a", "response": "b", "reward": 1.0}\n{"prompt": \n', [":2", "JSON"]),
    # (empty prompts and responses are valid data: a response that is only EOS, a prompt that is only BOS)
    "a prompt that is a number": (b'{"prompt": 3, "response": "b", "reward": 1.0}\n', [":1", "prompt"]),
    "a chat message without content": (b'{"prompt": [{"role": "user"}], "response": "b", "reward": 1.0}\n', [":1", "prompt"]),
    "reward not a number": (b'{"prompt": "a", "response": "b", "reward": "high"}\n', [":1", "reward"]),
    "no rows": (b"\n\n", ["no rows"]),
}


@pytest.mark.parametrize("case", sorted(TEXT_CASES))
def test_malformed_text_data_is_one_clear_message(case, tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    content, words = TEXT_CASES[case]
    user = tmp_path / "user"
    user.mkdir()
    data = user / "rows.jsonl"
    data.write_bytes(content)
    before = snapshot(user)
    code, output = run_cli(monkeypatch, capsys, "train_main", "agent=alol", f"dataset={data}", f"lm.model={tmp_path / 'no-model'}", "lm.reward=increasing_numbers",
                           "steps=1", "log.progress=false", f"run_dir={tmp_path / 'run'}")
    expect_one_message(code, output, str(data), *words)
    assert snapshot(user) == before


def test_text_data_for_a_control_agent_is_one_clear_message(tmp_path, monkeypatch, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b", "reward": 1.0}) + "\n")
    code, output = run_cli(monkeypatch, capsys, "train_main", "agent=iql", f"dataset={data}", "steps=1", f"run_dir={tmp_path / 'run'}")
    expect_one_message(code, output, "iql", "text")


def test_mistyped_top_level_key_gets_a_did_you_mean(monkeypatch, capsys):
    code, output = run_cli(monkeypatch, capsys, "train_main", "agnet=iql")
    expect_one_message(code, output, "agnet", "'agent'")


# ---------------------------------------------------------------------------------------------------
# Property-based: arrays of any shape, dtype, non-finite positions and flag values
FLOAT_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int32, np.int8, np.uint8, np.bool_, np.complex64])


@st.composite
def dataset_arrays(draw):
    n = draw(st.integers(0, 12))
    out = {}
    for key, width in (("observations", draw(st.integers(1, 3))), ("actions", 1), ("rewards", None), ("terminals", None), ("timeouts", None)):
        rows = n if draw(st.integers(0, 9)) else draw(st.integers(0, 12))  # mostly consistent lengths
        shape = (rows,) if width is None else draw(st.sampled_from([(rows, width), (rows,), (rows, width, 2)]))
        dtype = np.float32 if draw(st.integers(0, 3)) else draw(FLOAT_DTYPES)
        if key in ("terminals", "timeouts") and draw(st.booleans()):
            array = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, 1.0, 2.0, -1.0, 0.5])))
        else:
            array = draw(hnp.arrays(dtype, shape))  # hypothesis puts NaN, inf, extremes and zeros anywhere
        out[key] = array
    if draw(st.booleans()):
        out.pop(draw(st.sampled_from(sorted(out))))
    if draw(st.booleans()):
        out["ref_min_score"] = np.array(draw(st.one_of(st.floats(allow_nan=True), st.just("x"))))
        out["ref_max_score"] = np.array(draw(st.floats(allow_nan=True)))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(arrays=dataset_arrays())
def test_any_array_file_loads_clean_or_raises_the_data_error(arrays, tmp_path_factory):
    from orl.data import make_dataset

    path = tmp_path_factory.mktemp("fuzz") / "data.npz"
    np.savez(path, **arrays)
    try:
        dataset = make_dataset(path)
    except DataError as exc:
        assert str(path) in str(exc) or "ref_" in str(exc)
        return
    # what loads is clean: finite float32 arrays of one length, 0/1 flags, usable reference scores
    n = len(dataset)
    assert n > 0
    for name in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts"):
        array = getattr(dataset, name)
        assert array.dtype == np.float32 and len(array) == n and np.isfinite(array).all()
    assert set(np.unique(dataset.terminals)) <= {0.0, 1.0} and set(np.unique(dataset.timeouts)) <= {0.0, 1.0}
    if dataset.ref_min_score is not None and dataset.ref_max_score is not None:
        assert np.isfinite(dataset.normalized_score(0.0))


NUMERIC_KEYS = ["steps", "batch_size", "seed", "eval.every", "eval.episodes", "log.every", "checkpoint.every", "online.steps", "online.utd"]


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(NUMERIC_KEYS),
       value=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.booleans(), st.none()))
def test_any_numeric_flag_is_accepted_only_in_range(key, value):
    from omegaconf import OmegaConf

    from orl.apps.cli import NUMERIC_OPTIONS, validate_config

    cfg = OmegaConf.create({"device": "cpu"})
    OmegaConf.update(cfg, key, value, force_add=True)
    low = NUMERIC_OPTIONS[key][0]
    valid = value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= low)
    try:
        validate_config(cfg)
        assert valid, (key, value)
    except ConfigError as exc:
        assert not valid and key in str(exc) and f">= {low}" in str(exc)


@settings(max_examples=60, deadline=None)
@given(device=st.one_of(st.sampled_from(["gpu", "cuda:x", "CPU", "tpu", "", "cuda:0 "]), st.text(max_size=6)))
def test_any_device_string_is_valid_or_a_config_error(device):
    from omegaconf import OmegaConf

    from orl.apps.cli import validate_config

    try:
        validate_config(OmegaConf.create({"device": device}))
    except OrlError as exc:
        assert "device" in str(exc)


def test_a_model_path_that_holds_no_model_is_one_clear_message(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"prompt": "a", "response": "b", "reward": 1.0}) + "\n")
    (tmp_path / "empty-model").mkdir()
    code, output = run_cli(monkeypatch, capsys, "train_main", "agent=alol", f"dataset={data}", f"lm.model={tmp_path / 'empty-model'}", "lm.reward=increasing_numbers",
                           "steps=1", f"run_dir={tmp_path / 'run'}")
    expect_one_message(code, output, "lm.model", str(tmp_path / "empty-model"))


def test_finetune_accepts_every_online_option_of_train_yaml():
    """orl-finetune composes train.yaml then finetune.yaml; its key check once let finetune.yaml's `online:` block
    hide train.yaml's, so `orl-finetune online.buffer_mode=seed` (the README's commands) was refused."""
    from omegaconf import OmegaConf

    import orl.apps.cli

    online = OmegaConf.load(Path(orl.apps.cli.CONFIG_DIR) / "train.yaml").online
    assert "buffer_mode" in online
    for key in online:
        orl.apps.cli.check_top_level_keys("orl-finetune", ["train", "finetune"], [f"online.{key}=1"])  # must not exit
    with pytest.raises(SystemExit):
        orl.apps.cli.check_top_level_keys("orl-finetune", ["train", "finetune"], ["online.bufer_mode=seed"])


def test_readme_commands_pass_the_key_check():
    """Every orl-train / orl-finetune command in the README names options that exist."""
    import shlex

    import orl.apps.cli

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text().replace("\\\n", " ")
    commands = [line.strip() for line in readme.splitlines() if line.strip().startswith(("orl-train ", "orl-finetune "))]
    assert len(commands) >= 5
    for command in commands:
        app, *args = shlex.split(command.split("#")[0])
        config_names = ["train", "finetune"] if app == "orl-finetune" else ["train"]
        try:
            orl.apps.cli.check_top_level_keys(app, config_names, args)
        except SystemExit:
            pytest.fail(f"README command refused: {command}")
