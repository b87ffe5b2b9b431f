"""The run config's LoRA check that reads the model's layers; ``services.config`` calls it, a problem is one
ConfigError naming its field."""

from __future__ import annotations

from policy.config import PolicyConfig
from services.overrides import ConfigError


def check_lora_targets(model: PolicyConfig) -> None:
    """Every ``model.lora.*_target_modules`` entry matches a linear layer of the full-size part (meta device,
    from its ``config.json``: ``policy.estimate.lora_plan``)."""
    from policy.estimate import lora_plan

    try:
        lora_plan(model)
    except ValueError as e:
        field, _, message = str(e).partition(": ")
        raise ConfigError(field, message) from None
