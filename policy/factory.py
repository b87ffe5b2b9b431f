"""The one place a config becomes a policy: ``model.arch`` -> ``UnifiedPolicy`` (LM + flow generator + VAE +
bridge) or ``JanusPolicy`` (one autoregressive model, images as VQ codes).

Rollout workers, the learner (and its KL reference) and the GvU reward all call :func:`build_policy` with the
run's ``model`` section, so every replica of a run is the same architecture, built the same way. Both
classes implement :class:`policy.protocol.Policy`, what the service touches; where their data truly differs
(latents and SDE windows vs image-code tokens) callers branch on ``policy.arch``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from policy.config import PolicyConfig
from policy.janus import JanusPolicy
from policy.model import UnifiedPolicy
from policy.persist import CONFIG_FILE
from policy.protocol import Policy

POLICY_CLASSES: dict[str, type] = {"unified": UnifiedPolicy, "janus": JanusPolicy}


def policy_class(arch: str) -> type:
    """The policy class of ``model.arch``."""
    try:
        return POLICY_CLASSES[arch]
    except KeyError:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(POLICY_CLASSES)}") from None


def build_policy(cfg: PolicyConfig | Mapping[str, Any]) -> Policy:
    """The policy of a ``model`` section (a PolicyConfig or its dict), in eval mode."""
    if not isinstance(cfg, PolicyConfig):
        cfg = PolicyConfig.model_validate(dict(cfg))
    return policy_class(cfg.arch).from_config(cfg).eval()


def load_policy_dir(directory: str | Path) -> Policy:
    """A saved policy directory: ``UnifiedPolicy.save_pretrained``'s layout, or a Janus checkpoint (a Hugging
    Face directory whose ``config.json`` has ``model_type: janus``, e.g. ``JanusPolicy.save_pretrained``), or a
    LoRA Janus's adapters directory."""
    d = Path(directory)
    meta_file = d / CONFIG_FILE
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} does not exist")
    meta = json.loads(meta_file.read_text())
    if meta.get("model_type") == "janus":
        return JanusPolicy.from_pretrained(str(d)).eval()
    if meta.get("policy", {}).get("arch") == "janus":
        return JanusPolicy.from_adapters(d).eval()
    return UnifiedPolicy.from_pretrained(d).eval()


__all__ = ["POLICY_CLASSES", "Policy", "build_policy", "load_policy_dir", "policy_class"]
