"""dvc.yaml lists, for every stage, each `pipeline/` module the stage's command imports
(directly or through other modules), so a change to any of them re-runs the stage."""

import ast
import re

import pytest
import yaml

from tests.conftest import REPO_ROOT

STAGES = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def _imports(module: str) -> set[str]:
    """`pipeline.x` modules imported anywhere in pipeline/<module>.py (lazy imports too), or
    run by name from it (a string that is exactly `pipeline.x`)."""
    tree = ast.parse((REPO_ROOT / "pipeline" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            if node.module == "pipeline":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # a module the stage runs by name (`distributed.launch(n, "pipeline.train_job")`)
            found |= set(re.findall(r"^pipeline\.(\w+)$", node.value))
    return {m for m in found if (REPO_ROOT / "pipeline" / f"{m}.py").exists()}


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(name)
    return seen


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_every_module_its_command_imports(stage):
    spec = STAGES[stage]
    entry = re.fullmatch(r"python -m pipeline\.(\w+)", spec["cmd"]).group(1)
    needed = {f"pipeline/{m}.py" for m in _closure(entry)}
    listed = {d for d in spec["deps"] if d.startswith("pipeline/")}
    missing = sorted(needed - listed)
    assert missing == [], f"{stage}: add {missing} to its deps in dvc.yaml"
