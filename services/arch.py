"""What each model architecture (``model.arch``) supports, checked when a run config validates
(``RunConfig`` calls :func:`check_architecture`), so a combination that cannot run fails before any actor
starts, with one ``ConfigError`` naming the field to change.

``unified`` (LM + flow generator + VAE + bridge) runs every recipe. ``janus`` (JanusForConditionalGeneration:
images are VQ-code tokens sampled by the LM itself) runs GvU: its rollout samples the codes
(``rollout.recipes.janus_gvu_rollout``), the GvU reward reads the decoded image with Janus's understanding
encoder, and GRPO trains the codes through the text policy loss. It has no flow generator, bridge or latent
slots, so CLEAR and UAE, stage-1 SFT (flow matching, bridge warm start) and the vLLM text engine do not apply.
"""

from __future__ import annotations

from typing import Any

from services.overrides import ConfigError

__all__ = ["check_architecture"]


def check_architecture(cfg: Any) -> None:
    """Raise ConfigError for the first setting of ``cfg`` (a RunConfig) its ``model.arch`` cannot run."""
    m = cfg.model
    for name in m.unused_fields():
        use = "model.janus_path / model.janus_tiny" if m.arch == "janus" else "model.arch: janus"
        raise ConfigError(f"model.{name}",
                          f"is not used by model.arch {m.arch!r} (set it to null / {{}}, or use {use})")
    if m.arch != "janus":
        return
    why = "model.arch 'janus' generates images as VQ-code tokens"
    rules = (
        ("recipe", cfg.recipe != "gvu",
         f"{cfg.recipe!r} needs the flow generator and latent bridge of model.arch 'unified'; {why} and runs "
         "recipe gvu"),
        ("sft.enabled", cfg.sft.enabled,
         "stage-1 SFT (text cross-entropy + flow matching) is not available for model.arch 'janus'; set it to false "
         "(a pretrained Janus already understands and generates)"),
        ("rollout.engine", cfg.rollout.engine != "hf",
         f"{why} with its own transformers sampler; use 'hf'"),
        ("rollout.top_p", cfg.rollout.top_p < 1.0,
         "nucleus sampling of image codes is not implemented for model.arch 'janus'; use 1.0"),
        ("reward.backend", cfg.reward.backend != "actor" and any(c.name == "gvu" for c in cfg.reward.components),
         "the gvu reward scores with the current Janus weights, which only the reward actor receives; use 'actor'"),
    )
    for field, bad, message in rules:
        if bad:
            raise ConfigError(field, message)
