"""The package's shape: one import package, layers that import downwards only, no import circles, a wheel that
works outside the repository, file names every OS can check out."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Repository folder -> the import package it is installed as (pyproject.toml's package-dir).
PACKAGES = {"orl": "orl", "agents": "orl.agents", "envs": "orl.envs"}


def module_files() -> dict[str, Path]:
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Module -> the orl modules it imports, at module level or inside functions (both count: a function-level
    import that closes a circle is still a circle, only deferred)."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:  # `from orl.text import runtime` names a module; `import orl.x.y` too
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def layer(module: str) -> str:
    for prefix in ("orl.apps", "orl.agents", "orl.envs"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return "core"


def test_modules_import_no_top_level_agents_or_envs_package():
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            roots = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            for root in roots:
                assert root.split(".")[0] not in ("agents", "envs", "configs"), f"{name} imports {root}: write orl.{root}"


def test_layers_import_downwards_only():
    """The apps import agents and envs; agents and envs import the core; the core imports neither (nor the apps),
    and agents never import envs (the LM runtime both use is orl.text)."""
    allowed = {"core": {"core"}, "orl.agents": {"core", "orl.agents"}, "orl.envs": {"core", "orl.envs"},
               "orl.apps": {"core", "orl.agents", "orl.envs", "orl.apps"}}
    wrong = [f"{module} ({layer(module)}) imports {target} ({layer(target)})"
             for module, targets in import_graph().items() for target in sorted(targets) if layer(target) not in allowed[layer(module)]]
    assert not wrong, "\n".join(wrong)


def test_agent_files_import_only_the_bases_they_subclass():
    bases = {"orl.agents.sac", "orl.agents.iql", "orl.agents.awac", "orl.agents.cql", "orl.agents.td3bc"}
    wrong = [f"{module} imports {target}" for module, targets in import_graph().items() if layer(module) == "orl.agents"
             for target in targets if layer(target) == "orl.agents" and target not in bases | {"orl.agents"}]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_in_a_circle():
    graph = import_graph()
    # A package's __init__ importing its own modules is how packages work; everything else must be acyclic.
    edges = {m: {t for t in ts if not (t.startswith(m + ".") and module_files()[m].name == "__init__.py")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_core_names_no_agent():
    """No string in the core equals a registered agent's name, and the core reads no agent option by attribute
    name (`agent.cfg.<option>`): an agent's special needs reach the core through hooks on Agent."""
    from orl.agent import AGENTS, agent_class

    agent_class("iql")  # imports every agent module, filling the registry
    names = set(AGENTS)
    wrong = []
    for module, path in module_files().items():
        if layer(module) != "core":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                wrong.append(f"{module}:{node.lineno} names agent {node.value!r}")
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "cfg" \
                    and isinstance(node.value.value, ast.Attribute) and node.value.value.attr == "agent":
                wrong.append(f"{module}:{node.lineno} reads agent.cfg.{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "getattr" and len(node.args) >= 2 \
                    and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == "cfg":
                wrong.append(f"{module}:{node.lineno} reads an agent option with getattr")
    assert not wrong, "\n".join(wrong)


def test_repository_file_names_check_out_on_every_os():
    names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.splitlines()
    bad = [n for n in names if any(c in n for c in ':*?"<>|\\') or any(part.endswith((" ", ".")) for part in n.split("/"))]
    assert not bad, f"{len(bad)} paths Windows cannot check out, e.g. {bad[:3]}"


def test_sweep_directory_names_are_portable():
    from omegaconf import OmegaConf

    import orl.apps.cli  # noqa: F401  (registers the resolver)

    name = OmegaConf.create({"d": "${path_safe:'data.reward=learned\\:results/prefs/rm/seed0,dataset=orl/hopper/medium-v0'}"}).d
    assert name == "data.reward=learned-results-prefs-rm-seed0,dataset=orl-hopper-medium-v0"


@pytest.mark.slow
def test_wheel_installs_one_package_with_its_configs_and_runs_outside_the_repository(tmp_path):
    """`pip wheel .` -> everything under orl/ (orl.agents, orl.envs, orl.configs as package data), nothing else in
    site-packages; installed (non-editable) and run from another directory: `orl-train --help` and a 200-step run."""
    import shutil

    # A copy of the working tree: setuptools writes build/ into the source folder it builds.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv*", "results", "data", "runs", "build", "*.egg-info",
                                                                  "__pycache__", ".ci-minari", "logs"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("orl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"orl", next(t for t in top if t.endswith(".dist-info"))}, f"the wheel installs {sorted(top)}"
    for expected in ("orl/agents/iql.py", "orl/envs/control.py", "orl/configs/train.yaml", "orl/configs/agent/iql.yaml",
                     "orl/configs/hydra/launcher/orl_slurm.yaml", "orl/text/runtime.py", "orl/prefs/losses.py", "orl/apps/cli.py"):
        assert expected in names, f"{expected} missing from the wheel"
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1"}
    where = subprocess.run([sys.executable, "-c", "import orl, orl.agents, orl.configs; print(orl.__file__); print(orl.agents.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(str(site) in p for p in where), f"imported from {where}, not the installed wheel"
    helped = subprocess.run([str(site / "bin" / "orl-train"), "--help"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "agent: a2pr" in helped.stdout, helped.stderr[-2000:]
    sys.path.insert(0, str(ROOT))
    try:
        from tests.conftest import random_pendulum_arrays
    finally:
        sys.path.remove(str(ROOT))
    import numpy as np

    np.savez(elsewhere / "data.npz", **random_pendulum_arrays(2000), env_id="Pendulum-v1", ref_min_score=-1500.0, ref_max_score=0.0)
    run = subprocess.run([str(site / "bin" / "orl-train"), "agent=td3bc", "dataset=data.npz", "steps=200", "eval.every=200",
                          "eval.episodes=1", "log.progress=false", "device=cpu", "run_dir=run"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "final evaluation" in run.stdout and (elsewhere / "run" / "checkpoint.pt").exists()


def test_long_sweep_directory_names_are_shortened_the_same_way_every_time():
    """Overrides of a long option (lm.task={...}) gave a name over the file system's 255 bytes: OSError at mkdir."""
    from orl.apps.cli import path_safe

    task = "{size:2000,seed:0,min_terms:2,max_terms:2,min_digits:1,max_digits:1,operators:[+,-],allow_parentheses:False}"
    long = f"agent=grpo,dataset=/tmp/{'x' * 120}/data.npz,lm.task={task},seed=2"
    name = path_safe(long)
    assert len(name) <= 200 and name == path_safe(long) and name != path_safe(long.replace("seed=2", "seed=3"))
    assert name.startswith("agent=grpo,dataset=") and ",lm.task=" in name and name.endswith(",seed=2")  # every key kept
    many = ",".join(f"agent.option_{i}={i}" for i in range(60))
    assert len(path_safe(many)) <= 200 and path_safe(many) == path_safe(many)
    assert path_safe("agent=iql,seed=1") == "agent=iql,seed=1"  # short names are unchanged, so finished sweeps are found
