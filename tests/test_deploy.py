"""KubeRay manifests, Dockerfile and README in deploy/ stay consistent with the project."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
RESOURCES = {"rollout_gpu", "learner_gpu"}


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]


def one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in docs(name) if d.get("kind") == kind]
    assert len(found) == 1, f"{name}: expected one {kind}"
    return found[0]


def cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "raycluster.yaml": one("raycluster.yaml", "RayCluster")["spec"],
        "rayjob.yaml": one("rayjob.yaml", "RayJob")["spec"]["rayClusterSpec"],
    }


def custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """``rayStartParams.resources`` is a JSON string literal holding a JSON object (KubeRay's format)."""
    raw = (group.get("rayStartParams") or {}).get("resources")
    if raw is None:
        return {}
    inner = json.loads(raw)
    return json.loads(inner) if isinstance(inner, str) else inner


def head_container(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["headGroupSpec"]["template"]["spec"]["containers"][0]


def test_all_yaml_parses() -> None:
    files = sorted(DEPLOY.glob("*.yaml"))
    assert {f.name for f in files} >= {"raycluster.yaml", "rayjob.yaml", "configmap-example.yaml"}
    for f in files:
        for d in docs(f.name):
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), f.name


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_groups_and_custom_resources(name: str) -> None:
    spec = cluster_specs()[name]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    names = set().union(*(custom_resources(g) for g in groups.values()), custom_resources(spec["headGroupSpec"]))
    assert names == RESOURCES
    by_resource = {r: [g for g in groups.values() if r in custom_resources(g)] for r in RESOURCES}
    for resource, gs in by_resource.items():
        assert len(gs) == 1, f"{name}: {resource} must be advertised by exactly one group"
        limits = gs[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1, f"{name}: {resource} group has no GPU"
        assert custom_resources(gs[0])[resource] == int(limits["nvidia.com/gpu"])  # one unit per GPU
    cpu_groups = [g for g in groups.values() if not custom_resources(g)]
    assert cpu_groups and all(
        "nvidia.com/gpu" not in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})
        for g in cpu_groups
    )


def test_rayjob_entrypoint_config_and_secret() -> None:
    job = one("rayjob.yaml", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["unigrpo", "train"]
    assert "--config" in argv
    config_path = argv[argv.index("--config") + 1]
    assert config_path == "/config/run.yaml"

    spec = job["spec"]["rayClusterSpec"]
    head = head_container(spec)
    mounts = {m["name"]: m["mountPath"] for m in head["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
    (vol_name,) = [n for n, p in mounts.items() if p == str(Path(config_path).parent)]
    cm_ref = volumes[vol_name]["configMap"]
    cm = one("configmap-example.yaml", "ConfigMap")
    assert cm_ref["name"] == cm["metadata"]["name"]
    assert Path(config_path).name in cm["data"]

    env = {e["name"]: e for e in head["env"]}
    assert "secretKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]


def test_example_run_config_matches_manifests() -> None:
    cm = one("configmap-example.yaml", "ConfigMap")
    run = yaml.safe_load(cm["data"]["run.yaml"])
    assert run["cluster"]["use_custom_resources"] is True
    assert {run["cluster"]["rollout_resource"], run["cluster"]["learner_resource"]} == RESOURCES
    from services.config import ClusterConfig, validate_config

    cfg = validate_config(run)
    assert cfg.cluster.rollout_resource == "rollout_gpu" and cfg.cluster.learner_resource == "learner_gpu"
    defaults = ClusterConfig()
    assert {defaults.rollout_resource, defaults.learner_resource} == RESOURCES


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))


def test_dockerfile_extras_exist_and_versions_match() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    extras_defined = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    extras_used = {e.strip() for group in re.findall(r"\.\[([^\]]+)\]", text) for e in group.split(",")}
    assert "vllm" in extras_used
    assert extras_used <= extras_defined, extras_used - extras_defined
    args = dockerfile_args(text)
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    assert args["VARIANT"] == "gpu" and "cpu)" in text
    for name, spec in cluster_specs().items():
        assert spec["rayVersion"] == args["RAY_VERSION"], name


def test_readme_names_the_resources() -> None:
    text = (DEPLOY / "README.md").read_text()
    for r in RESOURCES:
        assert f"`{r}`" in text
    assert "cluster.rollout_resource" in text and "cluster.learner_resource" in text
