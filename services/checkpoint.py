"""Atomic checkpoints: written into a temporary directory, then renamed into place.

step-000010/
  policy/            weights as safetensors (+ config JSON, tokenizer)
  deepspeed/         optimizer and engine state through DeepSpeed
  learner_rng.json   the learner's RNG state
  state.json         step, sampler position, RNG states, policy version, MLflow run id
  COMPLETE           written last: a directory without it is partial and never resumed from
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

STATE = "state.json"
MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict:
    return {"torch": torch.get_rng_state().tolist()}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def save(root: str | Path, step: int, state: dict, write_payload, keep: int = 2) -> Path:
    """``write_payload(tmp_dir)`` writes the weights/optimizer; then state.json and the marker; then
    the rename. Keeps the newest ``keep`` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_payload(str(tmp))
    (tmp / STATE).write_text(json.dumps({**state, "step": step}, indent=1))
    (tmp / MARKER).write_text("ok\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (partial ones are skipped), or None."""
    root = Path(root)
    done = sorted(p for p in root.glob("step-*") if (p / MARKER).exists())
    return done[-1] if done else None


def load_state(directory: str | Path) -> dict:
    d = Path(directory)
    if not (d / MARKER).exists():
        raise CheckpointError(f"checkpoint {d} is partial (no {MARKER} marker); cannot resume from it")
    try:
        state = json.loads((d / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {d}: {STATE} unreadable: {e}") from None
    for key in ("step", "sampler", "policy_version", "mlflow_run_id"):
        if key not in state:
            raise CheckpointError(f"checkpoint {d}: {STATE} lacks '{key}'")
    if not (d / "policy").is_dir() or not (d / "deepspeed").is_dir():
        raise CheckpointError(f"checkpoint {d}: missing policy/ or deepspeed/ directory")
    return state
