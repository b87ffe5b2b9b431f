"""Bad input to the commands that start Ray: one ``config error`` line, exit 2, before Ray starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _vl_dir(tmp_path: Path) -> Path:
    d = tmp_path / "Qwen2.5-VL-7B-Instruct"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl",
                                               "architectures": ["Qwen2_5_VLForConditionalGeneration"]}))
    return d


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    cfg = str(ROOT / "services" / "default.yaml")
    return {
        "train": ["train"],
        "eval": ["eval", "--config", cfg, "--checkpoint", str(tmp_path)],
        "serve": ["serve", "reward"],
        "submit": ["submit", "--address", "http://127.0.0.1:9", "--config", cfg],
    }


@pytest.mark.parametrize("command", ["train", "eval", "serve", "submit"])
@pytest.mark.parametrize("override, field", [
    ("task.path=data/no-such-file.jsonl", "task.path"),
    ("model.lm_path=no/such/lm", "model.lm_path"),
    ("reward.components.0.name=answr", "reward.components[0].name"),
])
def test_bad_paths_and_names_exit_2_before_ray(tmp_path: Path, command: str, override: str, field: str) -> None:
    extra = ["--set", "task.name=jsonl"] if field == "task.path" else []
    res = _cli(*_commands(tmp_path)[command], *extra, "--set", override)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("config error: ") and field in lines[0], res.stderr
    assert "Ray" not in res.stdout + res.stderr  # nothing was started


@pytest.mark.parametrize("command", ["train", "eval", "serve"])
def test_unsupported_lm_dir_exits_2_before_ray(tmp_path: Path, command: str) -> None:
    res = _cli(*_commands(tmp_path)[command], "--set", f"model.lm_path={_vl_dir(tmp_path)}")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and "model.lm_path" in lines[0] and "qwen2_5_vl" in lines[0], res.stderr
    assert "supported: *ForCausalLM" in lines[0]
    assert "Ray" not in res.stdout + res.stderr


def test_eval_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    res = _cli("eval", "--config", str(ROOT / "services" / "default.yaml"), "--checkpoint", str(tmp_path / "no"))
    assert res.returncode == 2 and res.stderr.startswith("config error: --checkpoint: path does not exist")
