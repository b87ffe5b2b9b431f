"""A clean console: a tiny ``unigrpo train`` prints its stage progress bars and the eval summary, not the
libraries' warnings, log lines and progress bars (from the driver or the Ray workers); ``--verbose`` shows
them again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_helpers import FAST_VAE_FIT

ROOT = Path(__file__).resolve().parents[1]
# One SFT step, one GRPO step, a checkpoint after it (save_pretrained: "Writing model shards").
TINY_TRAIN = [*FAST_VAE_FIT, "sft.steps=1", "sft.batch_size=4", "algorithm.steps=1", "algorithm.eval_every=0",
              "rollout.num_workers=1", "rollout.prompts_per_step=2", "rollout.group_size=2",
              "rollout.max_new_tokens=6", "task.train_size=16", "task.eval_size=4", "checkpoint.every=1",
              "tracking.log_images_every=0"]
# What the libraries print unless told not to (transformers' deprecation of `past_key_values` in every
# worker that runs the LM, save_pretrained's progress bar, DeepSpeed / MLflow / Ray notices).
NOISE = ("FutureWarning", "past_key_values", "Writing model shards", "Setting accelerator to CPU",
         "INFO mlflow", "Token authentication is enabled", "DeprecationWarning")


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UNIGRPO_", "RAY_ADDRESS"))}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/mlflow.db",
               MLFLOW_DISABLE_TELEMETRY="true", RAY_USAGE_STATS_ENABLED="0")
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY",
                "MLFLOW_LOGGING_LEVEL", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
        env.pop(key, None)  # the libraries' defaults, as a user's shell has them
    return env


def _train(tmp_path: Path, *flags: str) -> str:
    """stdout + stderr of a tiny ``unigrpo train`` run in ``tmp_path``."""
    sets = [a for kv in [*TINY_TRAIN, f"checkpoint.dir={tmp_path}/ckpt", "run_name=console"] for a in ("--set", kv)]
    p = subprocess.run([sys.executable, "-m", "services.cli", "train", *flags, *sets], cwd=tmp_path,
                       env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert (tmp_path / "ckpt" / "console" / "step-000001" / "COMPLETE").exists()
    return out


@pytest.mark.slow
def test_train_console_shows_progress_and_eval_only(tmp_path):
    out = _train(tmp_path)
    assert "stage 1 (SFT)" in out and "stage 2 (GRPO)" in out
    assert "eval/clean/accuracy:" in out and "mlflow_run_id=" in out
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the console:\n{out[-4000:]}"
    lines = [ln for ln in out.replace("\r", "\n").splitlines() if ln.strip()]
    ours = ("VAE fit", "tiny VAE", "stage 1 (SFT)", "stage 2 (GRPO)", "eval/", "compare/", "mlflow_run_id=",
            "(raylet)")  # raylet: Ray's health notes
    unexpected = [ln for ln in lines if not ln.startswith(ours)]
    assert not unexpected, unexpected


@pytest.mark.slow
def test_train_verbose_shows_library_output(tmp_path):
    out = _train(tmp_path, "--verbose")
    assert "past_key_values" in out and "deprecated" in out  # transformers' deprecation, from the Ray workers
    assert "Writing model shards" in out  # the learner's checkpoint
    assert "INFO mlflow" in out  # the driver


def _in_fresh_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)


QUIET_PROBE = """
import logging, sys, warnings
from services import console
console.configure(verbose={verbose})
import transformers.utils.logging as tl
import huggingface_hub.utils as hub
warnings.warn_explicit("old api", FutureWarning, "x.py", 1, module="transformers.models.x")
warnings.warn_explicit("user warning", UserWarning, "x.py", 1, module="services.driver")
logging.getLogger("DeepSpeed").warning("routine notice")
print("bars", tl.is_progress_bar_enabled(), hub.are_progress_bars_disabled(), "level", tl.get_verbosity())
print("hook", console.ray_runtime_env())
"""


def test_quiet_filters_at_the_source_and_verbose_keeps_everything(tmp_path):
    quiet = _in_fresh_python(QUIET_PROBE.format(verbose=False), tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "bars False True level 40" in quiet.stdout  # transformers: no bars, errors only
    assert "services.console.quiet_libraries" in quiet.stdout
    assert "old api" not in quiet.stderr and "routine notice" not in quiet.stderr
    assert "user warning" in quiet.stderr  # the project's own warnings still show

    loud = _in_fresh_python(QUIET_PROBE.format(verbose=True), tmp_path)
    assert loud.returncode == 0, loud.stderr
    assert "bars True False" in loud.stdout and "hook None" in loud.stdout
    assert "old api" in loud.stderr and "user warning" in loud.stderr


def test_verbose_flag_on_train_eval_serve():
    from services.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "--verbose"]).verbose
    assert not parser.parse_args(["train"]).verbose
    assert parser.parse_args(["eval", "--config", "c.yaml", "--checkpoint", "d", "--verbose"]).verbose
    assert parser.parse_args(["serve", "policy", "--verbose"]).verbose
