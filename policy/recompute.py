"""Gradient (activation) checkpointing of the policy's transformer stacks, for the learner's forward.

A checkpointed layer keeps only its input in the forward and recomputes its activations in the backward
(non-reentrant ``torch.utils.checkpoint``: the recomputation replays the layer's RNG state, so loss and
gradients are those of the plain forward). transformers' models checkpoint their decoder layers (a VLM also
its vision blocks); diffusers' transformers their blocks, only while gradients are enabled. Rollout workers
and no-grad recomputations never build a backward graph, so only the learner turns this on.
"""

from __future__ import annotations

from torch import nn


def _transformers_models(modules: list[nn.Module]) -> list[nn.Module]:
    from transformers import PreTrainedModel

    return [m for m in modules if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]


def _diffusers_models(modules: list[nn.Module]) -> list[nn.Module]:
    from diffusers import ModelMixin

    return [m for m in modules if isinstance(m, ModelMixin) and m._supports_gradient_checkpointing]


def enable_gradient_checkpointing(policy, lm: bool, generator: bool) -> list[str]:
    """Checkpoint the understanding side's transformers models (``lm``: a unified policy's LM / VLM, Janus's
    language and vision models) and the generation side's diffusers transformers (``generator``), found in
    ``policy.module_groups()``. Returns the class names turned on; ValueError when a side asked for has none."""
    groups = policy.module_groups()
    done: list[str] = []
    if lm:
        found = _transformers_models(groups["understanding"])
        if not found:
            raise ValueError("learner.gradient_checkpointing_lm: the policy's understanding side has no "
                             "transformers model that supports gradient checkpointing")
        for m in found:
            # activation_checkpointing_enable: transformers >= 5.x's name; gradient_checkpointing_enable before
            enable = getattr(m, "activation_checkpointing_enable", None) or m.gradient_checkpointing_enable
            enable({"use_reentrant": False})
            done.append(type(m).__name__)
    if generator:
        found = _diffusers_models(groups["generation"])
        if not found:
            raise ValueError("learner.gradient_checkpointing_generator: the policy's generation side has no "
                             "diffusers transformer that supports gradient checkpointing")
        for m in found:
            m.enable_gradient_checkpointing()
            done.append(type(m).__name__)
    return done


__all__ = ["enable_gradient_checkpointing"]
