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


def _enable(model: nn.Module) -> None:
    """Non-reentrant checkpointing of one model's blocks (transformers >= 5.x names it
    ``activation_checkpointing_enable``; before, and in diffusers, ``*gradient_checkpointing_enable``)."""
    from diffusers import ModelMixin

    if isinstance(model, ModelMixin):
        model.enable_gradient_checkpointing()
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def enable_gradient_checkpointing(policy, lm: bool, generator: bool) -> list[str]:
    """Checkpoint the understanding side's transformers models (``lm``: a unified policy's LM / VLM, Janus's
    language and vision models) and the generation side's diffusers transformers (``generator``), found in
    ``policy.module_groups()``. Returns the class names turned on; ValueError when a side asked for has none."""
    groups = policy.module_groups()
    done: list[str] = []
    sides = (("lm", lm, "understanding", _transformers_models, "transformers model"),
             ("generator", generator, "generation", _diffusers_models, "diffusers transformer"))
    for field, asked, side, find, kind in sides:
        if not asked:
            continue
        found = find(groups[side])
        if not found:
            raise ValueError(f"learner.gradient_checkpointing_{field}: the policy's {side} side has no {kind} "
                             "that supports gradient checkpointing")
        for m in found:
            _enable(m)
            done.append(type(m).__name__)
    return done


__all__ = ["enable_gradient_checkpointing"]
