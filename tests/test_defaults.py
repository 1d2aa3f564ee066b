"""One source of defaults (issue #22): the agent dataclasses are the truth and configs/agent/<name>.yaml is
generated from them (scripts/gen_agent_configs.py), so `orl.make_agent(name)` and `orl-train agent=<name>`
train the same agent. The only keys that may differ are the generator's wired ones (run-level options)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from orl.agent import AGENTS, _import_agents, agent_class, build_config
from orl.apps.cli import CONFIG_DIR  # also registers the ${offline_only:...} resolver
from tests.conftest import load_script

ROOT = Path(__file__).resolve().parent.parent
AGENT_DIR = ROOT / "configs" / "agent"


GEN = load_script("gen_agent_configs")
_import_agents()
REPO_AGENTS = sorted(name for name, cls in AGENTS.items() if cls.__module__.startswith("orl.agents."))
WITH_YAML = sorted(name for name in AGENTS if (AGENT_DIR / f"{name}.yaml").exists())


def _plain(value: Any) -> Any:
    """Dataclasses as dicts, tuples as lists: how a default looks once it went through yaml."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (no True == 1); ints and floats compare as numbers."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _compare(config: Any, node: dict, wired: dict[str, str], where: str) -> list[str]:
    """Every field of the default `config` in `node` with its value (nested dataclasses recursively), no other
    keys; a wired key holds exactly the generator's interpolation."""
    problems = []
    fields = [f.name for f in dataclasses.fields(config)]
    for key in node:
        if key not in fields and not (where == "" and key == "name"):
            problems.append(f"{where}{key}: not a field of {type(config).__qualname__}")
    for name in fields:
        default = getattr(config, name)
        if name not in node:
            problems.append(f"{where}{name}: missing (default {_plain(default)!r})")
            continue
        value = node[name]
        if name in wired:
            if value != wired[name]:
                problems.append(f"{where}{name}: {value!r}, the generator wires it to {wired[name]!r}")
        elif isinstance(value, str) and "${" in value:
            problems.append(f"{where}{name}: interpolation {value!r} that the generator does not allow (not in WIRED)")
        elif dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                problems.append(f"{where}{name}: {value!r}, expected a mapping of {type(default).__qualname__}")
            else:
                problems.extend(_compare(default, value, {}, f"{where}{name}."))
        elif not _same(value, _plain(default)):
            problems.append(f"{where}{name}: yaml {value!r}, dataclass {_plain(default)!r}")
    return problems


def _compose(overrides: list[str], config: str = "train"):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config, overrides=overrides)


def test_every_agent_of_the_repository_has_a_generated_yaml():
    assert REPO_AGENTS and set(REPO_AGENTS) <= set(WITH_YAML), sorted(set(REPO_AGENTS) - set(WITH_YAML))
    assert set(GEN.WIRED) <= set(REPO_AGENTS)  # no wiring for an agent that does not exist


@pytest.mark.parametrize("name", WITH_YAML)
def test_yaml_holds_every_dataclass_default(name):
    node = OmegaConf.to_container(OmegaConf.load(AGENT_DIR / f"{name}.yaml"), resolve=False)
    assert node.get("name") == name
    problems = _compare(agent_class(name).Config(), node, GEN.wired(name), "")
    assert not problems, f"configs/agent/{name}.yaml differs from its dataclass:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("name", WITH_YAML)
def test_cli_config_builds_the_api_default(name):
    """What `orl-train agent=<name>` builds equals `Config()` except for the wired (run-level) keys."""
    cls = agent_class(name)
    options = OmegaConf.to_container(_compose([f"agent={name}"]).agent, resolve=True)
    assert options.pop("name") == name
    built, default = _plain(build_config(cls, options)), _plain(cls.Config())
    wired = GEN.wired(name)
    problems = [f"{key}: CLI {built[key]!r}, API {default[key]!r}" for key in default
                if key not in wired and not _same(built[key], default[key])]
    assert not problems, f"agent={name} through hydra differs from {cls.Config.__qualname__}():\n  " + "\n  ".join(problems)


def test_wsrl_recipe_sets_only_cql_options():
    text = (AGENT_DIR / "wsrl.yaml").read_text()
    assert text.startswith(GEN.RECIPE_MARK)
    recipe = OmegaConf.to_container(OmegaConf.create(text), resolve=False)["agent"]
    assert recipe["name"] == "cql"
    fields = {f.name for f in dataclasses.fields(agent_class("cql").Config)}
    assert not set(recipe) - {"name"} - fields, sorted(set(recipe) - {"name"} - fields)
    options = OmegaConf.to_container(_compose(["agent=wsrl"], "finetune").agent, resolve=True)
    name = options.pop("name")
    config = build_config(agent_class(name), options)
    assert all(_same(_plain(getattr(config, key)), value) for key, value in options.items())


EXPERIMENTS = sorted(str(p.relative_to(ROOT / "configs" / "experiment").with_suffix("")) for p in (ROOT / "configs" / "experiment").rglob("*.yaml"))
PRESETS = sorted(p.stem for p in (ROOT / "configs" / "preset").glob("*.yaml"))


@pytest.mark.parametrize("overrides", [[f"+experiment={e}"] for e in EXPERIMENTS]
                         + [[f"agent={p.split('-')[0]}", f"+preset={p}"] for p in PRESETS], ids=lambda o: o[-1])
def test_experiments_and_presets_set_only_agent_options(overrides):
    options = OmegaConf.to_container(_compose(overrides, "finetune").agent, resolve=True)
    build_config(agent_class(options.pop("name")), options)  # ConfigError on an unknown key


def test_generated_files_are_up_to_date(capsys):
    assert GEN.main(["--check"]) == 0, capsys.readouterr().err


def test_check_names_the_file_and_the_key(tmp_path, capsys):
    for path in AGENT_DIR.glob("*.yaml"):
        (tmp_path / path.name).write_text(path.read_text())
    dpo = tmp_path / "dpo.yaml"
    dpo.write_text(dpo.read_text().replace("\nbeta: ", "\nbeta: 0.5  # edited by hand\nunused: ").replace("\nlr: ", "\nlr: 0.125  # "))
    assert GEN.main(["--check", "--config-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{dpo}: key beta is 0.5" in err and f"{dpo}: key lr is 0.125" in err
    assert f"{dpo}: key unused is not a field" in err
    assert "bc.yaml" not in err  # only the edited file is named
