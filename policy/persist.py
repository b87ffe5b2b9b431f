"""A unified policy's directory (``UnifiedPolicy.save_pretrained`` / ``from_pretrained``): what is written and
how it loads back, local files only."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from policy.config import PolicyConfig
from policy.lora import ADAPTERS_FILE, HEADS
from policy.pipeline import SCHEDULER_CONFIG, FlowSchedule

HEADS_FILE = "heads.safetensors"
SCHEDULER_DIR = "scheduler"
CONFIG_FILE = "config.json"
FORMAT = "unigrpo-policy/1"


def save_policy(policy, directory: str | Path) -> None:
    """config.json + tokenizer/ + lm/ + generator/ + vae/ + heads.safetensors (safetensors only), and
    scheduler/scheduler_config.json when the policy has a pipeline scheduler. With LoRA, adapters.safetensors
    instead of lm/, generator/ and vae/: the base is the one the ``model`` section in config.json names
    (``policy.lora.merged`` for a self-contained copy)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    policy.tokenizer.save_pretrained(d / "tokenizer")
    if policy.lora is not None:
        adapters = {k: v for k, v in policy.trainable_state_dict().items() if not k.startswith(HEADS)}
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, str(d / ADAPTERS_FILE))
    else:
        policy.lm.save_pretrained(d / "lm")
        if policy.vision is not None:  # lm/ is then a VLM directory as users have it (its preprocessor config)
            policy.vision.processor.save_pretrained(d / "lm")
        policy.generator.save_pretrained(d / "generator", safe_serialization=True)
        policy.vae.save_pretrained(d / "vae", safe_serialization=True)
    heads = {f"bridge.{k}": v for k, v in policy.bridge.state_dict().items()}
    if policy.connector is not None:
        heads |= {f"connector.{k}": v for k, v in policy.connector.state_dict().items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(d / HEADS_FILE))
    meta = {
        "format": FORMAT,
        "policy": policy.cfg.model_dump(mode="json"),
        "lm": policy.lm.config.to_dict(),
        "generator_class": type(policy.generator).__name__,
        "generator": dict(policy.generator.config),
        "vae": dict(policy.vae.config),
        "latent_shape": list(policy.latent_shape),
        "n_image_tokens": policy.n_image_tokens,
        "token_ids": policy.token_ids,
    }
    if policy.schedule is not None:
        (d / SCHEDULER_DIR).mkdir(exist_ok=True)
        (d / SCHEDULER_DIR / SCHEDULER_CONFIG).write_text(json.dumps(policy.schedule.to_config(), indent=2))
    (d / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str))


def load_policy(cls, directory: str | Path):
    """Load what :func:`save_policy` wrote (local files only, no network); ``cls``: the policy class."""
    d = Path(directory)
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{d / CONFIG_FILE} does not exist")
    meta = json.loads((d / CONFIG_FILE).read_text())
    lora = bool(meta["policy"].get("lora", {}).get("enabled"))
    paths = {"tokenizer_path": str(d / "tokenizer")} | ({} if lora else {
        "lm_path": str(d / "lm"),
        "generator_path": str(d / "generator"),
        "vae_path": str(d / "vae"),
    })
    cfg = PolicyConfig(**{**meta["policy"], **paths})
    policy = cls.from_config(cfg)
    sched = d / SCHEDULER_DIR / SCHEDULER_CONFIG
    if sched.is_file():
        policy.schedule = FlowSchedule.from_config(json.loads(sched.read_text()), str(sched))
    heads = load_file(str(d / HEADS_FILE)) | (load_file(str(d / ADAPTERS_FILE)) if lora else {})
    result = policy.load_state_dict(heads, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(HEADS) or ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{d / HEADS_FILE}: missing {missing}, unexpected {result.unexpected_keys}")
    return policy
