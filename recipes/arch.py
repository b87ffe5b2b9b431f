"""What each model architecture (``model.arch``) can run, checked when a run config validates
(``Recipe.problems``), so a combination that cannot run fails before any actor starts, naming the field to
change.

``unified`` (LM + flow generator + VAE + bridge) runs every recipe and every setting. ``janus``
(JanusForConditionalGeneration: images are VQ-code tokens sampled by the LM itself) runs GvU: its rollout
samples the codes (``rollout.image.janus_gvu_rollout``), the GvU reward reads the decoded image with Janus's
understanding encoder, and GRPO trains the codes through the text policy loss. It has no flow generator,
bridge or latent slots, so stage-1 SFT (flow matching, bridge warm start) and the vLLM text engine do not
apply. Which recipes run on which architecture is each recipe's ``architectures``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reward.names import POLICY_REWARDS


@dataclass(frozen=True)
class ArchitectureLimits:
    """The settings one ``model.arch`` supports."""

    name: str
    images: str  # how it makes images, for messages
    stage1_sft: bool = True
    engines: tuple[str, ...] = ("hf", "vllm")
    nucleus_sampling: bool = True
    flow_generator: bool = True  # a diffusers transformer the learner can checkpoint
    # reward backends that keep a policy-scoring reward (POLICY_REWARDS) on the current weights;
    # None: any backend
    policy_reward_backends: tuple[str, ...] | None = None


ARCHITECTURES: dict[str, ArchitectureLimits] = {
    "unified": ArchitectureLimits("unified", "with a flow generator and a latent bridge"),
    "janus": ArchitectureLimits("janus", "as VQ-code tokens with its own transformers sampler",
                                stage1_sft=False, engines=("hf",), nucleus_sampling=False, flow_generator=False,
                                policy_reward_backends=("actor",)),
}


def architecture_problems(cfg: Any, recipe: str, runs_on: tuple[str, ...]) -> list[tuple[str, str]]:
    """(field, message) for each setting of ``cfg`` (a run config) its ``model.arch`` cannot run with
    ``recipe`` (which runs on the architectures ``runs_on``), in the order a user should fix them."""
    m = cfg.model
    use = "model.janus_path / model.janus_tiny" if m.arch == "janus" else "model.arch: janus"
    out = [(f"model.{name}", f"is not used by model.arch {m.arch!r} (set it to null / {{}}, or use {use})")
           for name in m.unused_fields()]
    a = ARCHITECTURES[m.arch]
    made = f"model.arch {a.name!r} generates images {a.images}"
    if m.arch not in runs_on:
        out.append(("recipe", f"{recipe!r} runs on model.arch {' / '.join(runs_on)}; {made}"))
    if cfg.sft.enabled and not a.stage1_sft:
        out.append(("sft.enabled", f"stage-1 SFT (text cross-entropy + flow matching) is not available for "
                                   f"model.arch {a.name!r}; set it to false (a pretrained model of it already "
                                   "understands and generates)"))
    if cfg.learner.gradient_checkpointing_generator and not a.flow_generator:
        out.append(("learner.gradient_checkpointing_generator", f"{made}, with no flow generator to checkpoint "
                                                                "(learner.gradient_checkpointing_lm covers its LM)"))
    if cfg.rollout.engine not in a.engines:
        out.append(("rollout.engine", f"{made}; use {' / '.join(repr(e) for e in a.engines)}"))
    if cfg.rollout.top_p < 1.0 and not a.nucleus_sampling:
        out.append(("rollout.top_p", f"nucleus sampling of images is not implemented for model.arch {a.name!r}; "
                                     "use 1.0"))
    backends = a.policy_reward_backends
    if (backends is not None and cfg.reward.backend not in backends
            and any(c.name in POLICY_REWARDS for c in cfg.reward.components)):
        out.append(("reward.backend", f"a policy-scoring reward ({', '.join(POLICY_REWARDS)}) scores with the current "
                                      f"weights, which on model.arch {a.name!r} only the "
                                      f"{' / '.join(backends)} backend receives"))
    return out
