"""Run config: schema, YAML files, overrides, and the CLI's one-line config errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from services.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    flatten,
    format_validation_error,
    load_config,
    load_yaml,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=cwd or ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def write_yaml(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ------------------------------------------------------------------------------------- schema + files
def test_embedded_default_loads_and_matches_schema_defaults() -> None:
    cfg = load_config(None, [])
    assert cfg.recipe == "clear" and cfg.run_name == "clear-tiny"
    assert cfg.model.lm_path is None  # tiny: built from config, no download
    assert cfg.rollout.engine == "hf" and cfg.rollout.num_gpus_per_worker == 0
    assert cfg.rollout.group_size == 8 and cfg.rollout.sde.window <= cfg.rollout.sde.steps
    assert [c.name for c in cfg.reward.components] == ["answer", "format"]
    # The embedded YAML spells out the schema's defaults: one source of truth, no drift.
    assert cfg == RunConfig()
    # The tiny default needs no files.
    cfg.check_paths()


def test_embedded_default_yaml_is_runconfig_defaults() -> None:
    """services/default.yaml (the annotated embedded default) holds RunConfig()'s values and only fields the
    schema has: the default exists once, in the schema; the YAML is its annotated copy."""
    import yaml

    from services.config import default_config_text

    raw = yaml.safe_load(default_config_text())
    assert load_config(None, []) == RunConfig()

    def keys(node, prefix=""):
        if isinstance(node, dict) and node:
            return {k for key, v in node.items() for k in keys(v, f"{prefix}{key}.")}
        return {prefix.rstrip(".")}

    assert keys(raw) <= keys(RunConfig().model_dump(mode="json"))


def test_configs_dir_has_every_recipe() -> None:
    names = {p.name for p in CONFIGS}
    for expected in (
        "uae_tiny.yaml",
        "gvu_tiny.yaml",
        "clear_qwen25_sd35.yaml",
        "uae_qwen25vl_sd35.yaml",
        "gvu_janus.yaml",
    ):
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_validates(path: Path) -> None:
    cfg = load_config(path, [])
    assert cfg.recipe in path.name  # recipe field matches the file
    # Round trip: the resolved config is itself a valid config.
    assert RunConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg


def test_real_scale_configs_validate_without_weights_but_fail_path_check() -> None:
    for name in ("clear_qwen25_sd35.yaml", "uae_qwen25vl_sd35.yaml", "gvu_janus.yaml"):
        cfg = load_config(ROOT / "configs" / name, [])
        field = "janus_path" if cfg.model.arch == "janus" else "lm_path"  # gvu_janus: Janus-Pro itself
        path = getattr(cfg.model, field)
        assert path and path.startswith("/models/")
        if cfg.model.arch == "unified":
            assert cfg.rollout.engine == "vllm" and cfg.learner.sync.backend == "object_store"
        if Path(path).exists():
            continue
        with pytest.raises(ConfigError) as info:
            cfg.check_paths()
        assert info.value.field_path == f"model.{field}"


def test_recipe_specific_rewards() -> None:
    uae = load_config(ROOT / "configs" / "uae_tiny.yaml", [])
    gvu = load_config(ROOT / "configs" / "gvu_tiny.yaml", [])
    assert [c.name for c in uae.reward.components] == ["clip_similarity"]
    assert uae.learner.train_generator and uae.algorithm.lambda_img > 0  # tiny default: joint (LM only: --set)
    assert [c.name for c in gvu.reward.components] == ["gvu"]


def test_a_restoration_start_needs_clear_and_the_input_images_latent() -> None:
    assert load_config(None, ["rollout.sde.strength=0.6"]).rollout.sde.strength == 0.6
    for name, sets, why in (("gvu_tiny.yaml", [], "needs clear"), ("uae_tiny.yaml", [], "needs clear"),
                            (None, ["model.input_image=vision", "model.lm_path=/x"], "bridge or both")):
        with pytest.raises(ConfigError, match=why) as info:
            load_config(ROOT / "configs" / name if name else None, ["rollout.sde.strength=0.5", *sets])
        assert info.value.field_path == "rollout.sde.strength"
    for bad in ("0", "1.5", "nan"):
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"rollout.sde.strength={bad}"])
        assert info.value.field_path == "rollout.sde.strength"
    assert load_config(None, ["model.read_generation=pixels"]).model.read_generation == "pixels"
    for name in ("gvu_tiny.yaml", "uae_tiny.yaml", "gvu_janus_tiny.yaml"):
        with pytest.raises(ConfigError) as info:
            load_config(ROOT / "configs" / name, ["model.read_generation=pixels"])
        assert info.value.field_path == "model.read_generation"


# ---------------------------------------------------------------------------------------- overrides
def test_set_overrides_parse_types() -> None:
    cfg = load_config(
        None,
        [
            "rollout.group_size=8",
            "learner.lr=1e-5",
            "algorithm.clip_img=2.0e-2",
            "learner.train_generator=false",
            "task.severities=[1, 3]",
            "learner.betas=[0.8, 0.95]",
            "run_name=exp-1",
            "tracking.uri=null",
            "reward.components.1.weight=0.5",
            "model.lm_tiny.hidden_size=32",
        ],
    )
    assert cfg.rollout.group_size == 8 and isinstance(cfg.rollout.group_size, int)
    assert cfg.learner.lr == pytest.approx(1e-5)
    assert cfg.algorithm.clip_img == pytest.approx(0.02)
    assert cfg.learner.train_generator is False
    assert cfg.task.severities == [1, 3]
    assert cfg.learner.betas == (0.8, 0.95)
    assert cfg.run_name == "exp-1" and cfg.tracking.uri is None
    assert cfg.reward.components[1].weight == 0.5
    assert cfg.model.lm_tiny == {"hidden_size": 32}


def test_apply_overrides_does_not_mutate_input_and_creates_sections() -> None:
    data = {"rollout": {"group_size": 4}}
    out = apply_overrides(data, ["rollout.sde.steps=12", "cluster.num_cpus=4"], RunConfig)
    assert data == {"rollout": {"group_size": 4}}
    assert out["rollout"] == {"group_size": 4, "sde": {"steps": 12}}
    assert RunConfig.model_validate(out).rollout.sde.steps == 12


@pytest.mark.parametrize(
    "override, path",
    [
        ("rollout.grup_size=3", "rollout.grup_size"),
        ("nonsense=1", "nonsense"),
        ("rollout.sde.steps.x=1", "rollout.sde.steps.x"),
        ("reward.components.x.weight=1", "reward.components.x"),
    ],
)
def test_unknown_override_path_names_it(override: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        apply_overrides({}, [override], RunConfig)
    assert info.value.field_path == path


def test_override_without_equals_is_an_error() -> None:
    with pytest.raises(ConfigError):
        load_config(None, ["rollout.group_size"])


# ------------------------------------------------------------------------------------- validators
@pytest.mark.parametrize(
    "override, path",
    [
        ("rollout.group_size=1", "rollout.group_size"),
        ("rollout.sde.window=9", "rollout.sde.window"),
        ("task.degrade_prob=1.5", "task.degrade_prob"),
        ("task.degradations=[fog, smog]", "task.degradations.1"),
        ("algorithm.kl=k4", "algorithm.kl"),
        ("learner.zero_stage=4", "learner.zero_stage"),
        ("rollout.engine=vllm", "rollout.num_gpus_per_worker"),
        ("learner.sync.backend=mpi", "learner.sync.backend"),
        ("rollout.autoscale.min_workers=5", "rollout.autoscale.min_workers"),
        ("reward.components=[]", "reward.components"),
        ("task.name=tsv", "task.path"),
        ("recipe=dpo", "recipe"),
        ("task.severities=[4]", "task.severities.0"),
        ("task.question_types=[color, smell]", "task.question_types"),
        ("model.freeze_generator=true", "learner.train_generator"),
    ],
)
def test_bad_values_name_the_field(override: str, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.field_path == path
    line = format_validation_error(info.value)
    assert line.startswith(f"config error: {path}: ") and "\n" not in line


def test_format_validation_error_is_one_line() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate({"rollout": {"group_size": 1, "num_workers": 0}})
    line = format_validation_error(info.value)
    assert "\n" not in line
    assert line.startswith("config error: rollout.")
    assert "more error" in line


def test_model_path_fails_only_when_checked(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    cfg = load_config(None, [f"model.lm_path={missing}"])  # plain validation: fine
    with pytest.raises(ConfigError) as info:
        cfg.check_paths()
    assert info.value.field_path == "model.lm_path"
    assert missing in str(info.value)
    (tmp_path / "no-such-model").mkdir()
    (tmp_path / "no-such-model" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    cfg.check_paths()


def test_task_path_checked_only_when_checked(tmp_path: Path) -> None:
    cfg = load_config(None, ["task.name=jsonl", f"task.path={tmp_path / 'x.jsonl'}"])
    with pytest.raises(ConfigError) as info:
        cfg.check_paths()
    assert info.value.field_path == "task.path"


def test_nothing_to_train_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["learner.train_lm=false", "learner.train_generator=false"])
    assert info.value.field_path == "learner.train_lm"


def test_question_types_list_or_weights() -> None:
    assert load_config(None, ["task.question_types=[color, count]"]).task.question_types == ["color", "count"]
    cfg = load_config(None, ["task.question_types={color: 1.0, shape: 0.0}"])
    assert cfg.task.question_types == {"color": 1.0, "shape": 0.0}
    # Non-shapes tasks carry their own question types.
    cfg = load_config(None, ["task.name=jsonl", "task.path=x.jsonl", "task.question_types=[ocr]"])
    assert cfg.task.question_types == ["ocr"]


def test_degradation_names_match_the_task_module() -> None:
    degrade = pytest.importorskip("tasks.degrade")
    from typing import get_args

    from services.config import Degradation

    assert set(get_args(Degradation)) == set(degrade.CORRUPTIONS)
    assert load_config(None, ["task.degradations=[fog, motion_blur]"]).task.degradations == [
        "fog",
        "motion_blur",
    ]


# ------------------------------------------------------------------------------------------ helpers
def test_flatten_is_string_params() -> None:
    flat = flatten(load_config(None, []))
    assert flat["rollout.group_size"] == "8"
    assert flat["rollout.sde.window"] == "2"
    assert flat["model.lm_path"] == "None"
    assert flat["learner.betas"] == "[0.9, 0.999]"
    assert all(isinstance(k, str) and isinstance(v, str) and len(v) <= 500 for k, v in flat.items())
    assert "reward.components" in flat  # lists kept as one JSON param


def test_tracking_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(None, [])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.tracking.resolved_uri(tmp_path) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert cfg.tracking.resolved_uri(tmp_path) == "http://mlflow:5000"
    cfg2 = load_config(None, ["tracking.uri=sqlite:////tmp/x.db"])
    assert cfg2.tracking.resolved_uri(tmp_path) == "sqlite:////tmp/x.db"


def test_load_yaml_default_is_a_mapping() -> None:
    data = load_yaml(None)
    assert isinstance(data, dict) and data["recipe"] == "clear"


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_check_config_prints_resolved_yaml() -> None:
    res = run_cli("check-config", "--set", "rollout.group_size=6", "--set", "learner.lr=1e-4")
    assert res.returncode == 0, res.stderr
    data = yaml.safe_load(res.stdout)
    assert data["rollout"]["group_size"] == 6
    assert data["learner"]["lr"] == pytest.approx(1e-4)
    assert RunConfig.model_validate(data).rollout.group_size == 6


def _assert_one_line_config_error(res: subprocess.CompletedProcess[str], path: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("config error: ")
    assert path in lines[0], lines[0]


def _bad(tmp_path: Path, **sections: dict) -> Path:
    data = load_yaml(None)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return write_yaml(tmp_path, data)


@pytest.mark.parametrize(
    "sections, path",
    [
        ({"rollout": {"num_wrokers": 2}}, "rollout.num_wrokers"),  # unknown key
        ({"rolout": {"num_workers": 2}}, "rolout"),  # unknown section
        ({"learner": {"lr": "fast"}}, "learner.lr"),  # wrong type
        ({"rollout": {"sde": {"steps": 8, "window": "two"}}}, "rollout.sde.window"),  # wrong type
        ({"task": {"train_size": -5}}, "task.train_size"),  # negative size
        ({"rollout": {"max_new_tokens": 0}}, "rollout.max_new_tokens"),  # zero size
        ({"task": {"name": "jsonl", "path": None}}, "task.path"),  # missing jsonl path
        ({"rollout": {"sde": {"steps": 4, "window": 6}}}, "rollout.sde.window"),  # window > steps
    ],
)
def test_cli_bad_config_file_exits_2_with_field_path(tmp_path: Path, sections: dict, path: str) -> None:
    res = run_cli("check-config", "--config", str(_bad(tmp_path, **sections)))
    _assert_one_line_config_error(res, path)


@pytest.mark.parametrize(
    "override, path",
    [
        ("rollout.nope=1", "rollout.nope"),
        ("rollout.group_size=two", "rollout.group_size"),
        ("rollout.num_workers=-1", "rollout.num_workers"),
        ("task.name=jsonl", "task.path"),
        ("rollout.sde.window=100", "rollout.sde.window"),
    ],
)
def test_cli_bad_set_exits_2_with_field_path(override: str, path: str) -> None:
    _assert_one_line_config_error(run_cli("check-config", "--set", override), path)


def test_cli_missing_model_path_names_field_when_checked(tmp_path: Path) -> None:
    missing = str(tmp_path / "nowhere" / "lm")
    ok = run_cli("check-config", "--set", f"model.lm_path={missing}")
    assert ok.returncode == 0, ok.stderr  # validation alone does not touch the file system
    res = run_cli("check-config", "--check-paths", "--set", f"model.lm_path={missing}")
    _assert_one_line_config_error(res, "model.lm_path")


def test_cli_real_scale_config_validates_without_weights() -> None:
    res = run_cli("check-config", "--config", str(ROOT / "configs" / "clear_qwen25_sd35.yaml"))
    assert res.returncode == 0, res.stderr
    assert yaml.safe_load(res.stdout)["model"]["lm_path"] == "/models/Qwen2.5-7B-Instruct"


def test_cli_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    res = run_cli("check-config", "--config", str(tmp_path / "missing.yaml"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    bad = tmp_path / "broken.yaml"
    bad.write_text("rollout: {group_size: [1,\n  oops: :\n")
    res = run_cli("check-config", "--config", str(bad))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- just\n- a list\n")
    res = run_cli("check-config", "--config", str(scalar))
    assert res.returncode == 2 and "Traceback" not in res.stderr


def test_cli_config_error_comes_before_dispatch() -> None:
    # A bad config fails with 2 whether or not the module that does the work exists yet.
    res = run_cli("train", "--set", "rollout.group_size=1")
    _assert_one_line_config_error(res, "rollout.group_size")


def test_cli_main_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    assert main(["check-config", "--set", "seed=7"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 7
    with pytest.raises(SystemExit) as info:
        main(["check-config", "--set", "seed=-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: seed: ") and err.count("\n") == 1


# ------------------------------------------------------------------------------ bad input, closed
def test_cli_non_utf8_config_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("run_name: caf\u00e9\nseed: 1\n".encode("latin-1"))
    res = run_cli("check-config", "--config", str(bad))
    _assert_one_line_config_error(res, f"{bad}: not UTF-8")
    assert "0xe9" in res.stderr and "line 1" in res.stderr


def test_deeply_nested_yaml_is_a_config_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(ConfigError):
        load_config(deep, [])


def test_unknown_reward_name_names_the_component() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["reward.components.1.name=fromat"])
    assert info.value.field_path == "reward.components[1].name"
    for known in ("answer", "format", "clip_similarity", "gvu"):
        assert known in info.value.message
    # an import path is a reward outside the package: accepted here, imported by the reward actor
    assert load_config(None, ["reward.components.1.name=my_pkg.rewards:length"]).reward.components[1].name


def test_cli_unknown_reward_name_exits_2() -> None:
    res = run_cli("check-config", "--set", "reward.components.0.name=nonsense")
    _assert_one_line_config_error(res, "reward.components[0].name")
    assert "known: answer, format" in res.stderr


def test_known_reward_names_match_the_registry() -> None:
    import importlib
    import pkgutil

    import reward
    from reward.names import KNOWN_REWARDS
    from reward.registry import REWARDS

    for mod in pkgutil.iter_modules(reward.__path__):
        importlib.import_module(f"reward.{mod.name}")  # every module that registers a built-in
    assert set(REWARDS) == set(KNOWN_REWARDS)


def _model_dir(tmp_path: Path, name: str, config: dict | None) -> Path:
    import json

    d = tmp_path / name
    d.mkdir()
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def test_unsupported_lm_dir_fails_path_check(tmp_path: Path) -> None:
    vl = _model_dir(tmp_path, "qwen25vl", {"model_type": "qwen2_5_vl",
                                           "architectures": ["Qwen2_5_VLForConditionalGeneration"]})
    cfg = load_config(None, [f"model.lm_path={vl}"])
    with pytest.raises(ConfigError) as info:
        cfg.check_paths()
    assert info.value.field_path == "model.lm_path"
    assert "qwen2_5_vl" in info.value.message and "ForCausalLM" in info.value.message
    empty = _model_dir(tmp_path, "empty", None)
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(None, [f"model.lm_path={empty}"]).check_paths()
    lm = _model_dir(tmp_path, "qwen2", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    load_config(None, [f"model.lm_path={lm}"]).check_paths()


def test_submit_path_check_covers_uploaded_relative_paths_only(tmp_path: Path) -> None:
    cfg = load_config(None, ["task.name=jsonl", "task.path=data/missing.jsonl"])
    with pytest.raises(ConfigError) as info:
        cfg.check_paths(uploaded_root=tmp_path)
    assert info.value.field_path == "task.path"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "missing.jsonl").write_text("{}\n")
    cfg.check_paths(uploaded_root=tmp_path)
    load_config(None, ["model.lm_path=/models/on/the/cluster"]).check_paths(uploaded_root=tmp_path)


def test_async_needs_a_batch_in_flight() -> None:
    """Async mode keeps ``max_staleness`` batches ahead of the learner: 0 would train on nothing."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algorithm.mode=async", "algorithm.max_staleness=0"])
    assert info.value.field_path == "algorithm.max_staleness"
    assert load_config(None, ["algorithm.mode=sync", "algorithm.max_staleness=0"]).algorithm.max_staleness == 0
