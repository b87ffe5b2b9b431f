"""Typed configs across every actor boundary: an actor module reads its config sections by attribute (a
frozen pydantic section or a frozen dataclass), never by a string key with a default written a second time."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACTOR_MODULES = ["learner/actor.py", "learner/group.py", "rollout/worker.py", "rollout/pool.py",
                 "reward/actor.py", "services/reward_backend.py", "services/cluster.py", "services/driver.py"]


def _config_like(node: ast.AST) -> bool:
    if not isinstance(node, (ast.Name, ast.Attribute)):
        return False
    name = ast.unparse(node)
    return any(w in name.lower() for w in ("cfg", "config", "settings", "spec"))


@pytest.mark.parametrize("module", ACTOR_MODULES)
def test_actor_modules_read_config_by_attribute(module):
    tree = ast.parse((ROOT / module).read_text(encoding="utf-8"))
    bad = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and _config_like(node.func.value) and node.args and isinstance(node.args[0], ast.Constant)):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
        if (isinstance(node, ast.Subscript) and _config_like(node.value)
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not bad, f"{module} reads config sections by key: {bad}"


def test_sections_are_frozen():
    from pydantic import ValidationError

    from services.config import RunConfig

    cfg = RunConfig()
    with pytest.raises(ValidationError):
        cfg.learner.lr = 1.0
    with pytest.raises(ValidationError):
        cfg.model.image_size = 64
