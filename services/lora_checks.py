"""The run config's LoRA checks that span sections (``model.lora`` against the learner)
or read the model's layers; ``services.config`` calls them, each problem one ConfigError naming its field."""

from __future__ import annotations

from policy.config import PolicyConfig
from services.overrides import ConfigError


def check_lora(model: PolicyConfig, zero_stage: int, kl: bool) -> None:
    """``model.lora`` with the ZeRO stage and a KL term (``algorithm.beta_*`` > 0)."""
    if not model.lora.enabled:
        return
    if zero_stage == 3 and kl:
        raise ConfigError("learner.zero_stage", "3 partitions the adapters, and the LoRA KL reference swaps its "
                          "snapshot into them in place (learner/reference.py): use ZeRO 0-2 with a KL term")


def check_lora_targets(model: PolicyConfig) -> None:
    """Every ``model.lora.*_target_modules`` entry matches a linear layer of the full-size part (meta device,
    from its ``config.json``: ``policy.estimate.lora_plan``)."""
    from policy.estimate import lora_plan

    try:
        lora_plan(model)
    except ValueError as e:
        field, _, message = str(e).partition(": ")
        raise ConfigError(field, message) from None
