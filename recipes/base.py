"""What a recipe is: one frozen :class:`Recipe` that says everything the service does differently per recipe.

- ``request`` turns a task item into a rollout request (``Recipe.requests`` maps a batch, in order);
- ``sft`` builds the stage-1 examples ``learner.sft.sft_shard`` takes (None: the recipe has no stage 1);
- ``rollout`` names the rollout kind the workers run (``rollout.registry.get_rollout(kind, arch)``);
- ``rewards`` are the default reward components (``reward.components`` entries);
- ``evaluation`` is how a run is evaluated (``services.evaluate``): ``accuracy`` (answer accuracy, clean and
  by degradation severity) or ``heldout_reward`` (mean reward on held-out prompts);
- ``architectures`` are the ``model.arch`` values that can run it; ``Recipe.problems`` also applies each
  architecture's limits (``recipes.arch``), so a config that cannot run fails at validation.

Recipe functions take plain arguments; ``problems`` reads a run config by duck typing (``cfg.model``,
``cfg.sft``, ``cfg.rollout``, ``cfg.reward``, ``cfg.learner``), so this package never imports ``services``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from recipes.arch import ARCHITECTURES, architecture_problems
from reward.names import RESTORATION_REWARDS
from tasks.items import PromptItem

Evaluation = Literal["accuracy", "heldout_reward"]
RequestFn = Callable[[PromptItem, int], dict]  # (item, image_size) -> rollout request
SFTFn = Callable[[Sequence[PromptItem], float], list[dict]]  # (items, generate_prob) -> stage-1 examples


class ConfigProblem(NamedTuple):
    """A setting a recipe cannot run with: the field path to change and why."""

    field: str
    message: str


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    request: RequestFn
    rollout: str
    rewards: tuple[dict, ...]
    evaluation: Evaluation
    sft: SFTFn | None = None
    architectures: tuple[str, ...] = ("unified",)
    restores: bool = False  # its generations restore the input image (rollout.sde.strength < 1 may start from it)
    default_strength: float = 1.0  # rollout.sde.strength when the config leaves it null

    def requests(self, items: Sequence[PromptItem], image_size: int = 32) -> list[dict]:
        """One rollout request per task item, in order (``image_size``: for items that hold no image)."""
        return [self.request(it, image_size) for it in items]

    def sft_examples(self, items: Sequence[PromptItem], generate_prob: float = 1.0) -> list[dict]:
        """Stage-1 examples (``learner.sft.sft_shard``); ValueError when the recipe has no stage 1."""
        if self.sft is None:
            raise ValueError(f"recipe {self.name!r} has no stage-1 SFT")
        return self.sft(items, generate_prob)

    def rollout_fn(self, arch: str = "unified") -> Callable[..., list]:
        """The rollout function the workers run for this recipe on ``arch``."""
        from rollout.registry import get_rollout  # torch: only where a rollout runs

        return get_rollout(self.rollout, arch)

    def default_reward_components(self) -> list[dict]:
        """Fresh copies of the default ``reward.components`` entries."""
        return [{**c, "kwargs": dict(c.get("kwargs") or {})} for c in self.rewards]

    def problems(self, cfg: Any) -> list[ConfigProblem]:
        """What in a run config this recipe (with the config's ``model.arch``) cannot run, in the order a
        user should fix it; empty when it can run."""
        out = [ConfigProblem(f, m) for f, m in architecture_problems(cfg, self.name, self.architectures)]
        if self.sft is None and cfg.sft.enabled:
            out.append(ConfigProblem("sft.enabled", f"recipe {self.name!r} has no stage-1 SFT; set it to false"))
        if cfg.rollout.sde.strength < 1 and not self.restores:
            out.append(ConfigProblem("rollout.sde.strength", f"recipe {self.name!r} generates from text, not from "
                                     "an input image: strength < 1 (start from the input image) needs clear"))
        elif cfg.rollout.sde.strength < 1 and cfg.model.input_image == "vision":
            out.append(ConfigProblem("rollout.sde.strength", "strength < 1 starts from the input image's latent: "
                                     "model.input_image must be bridge or both"))
        for i, c in enumerate(cfg.reward.components):  # services.clip_fit: a scorer fitted to the task's images
            fits = [j for j, b in enumerate(c.kwargs.get("backbones") or []) if isinstance(b, dict) and b.get("fit")]
            if fits and (c.name != "clip_similarity" or cfg.task.name != "shapes_vqa"):
                out.append(ConfigProblem(f"reward.components[{i}].kwargs.backbones[{fits[0]}].fit",
                                         "a fitted tiny CLIP scorer is trained on the shapes_vqa task's images and "
                                         "descriptions: it needs reward 'clip_similarity' and task.name shapes_vqa"))
        for i, c in enumerate(cfg.reward.components):  # recorded by the CLEAR rollout (rollout.interleaved)
            if c.name in RESTORATION_REWARDS and not (self.restores and ARCHITECTURES[cfg.model.arch].flow_generator):
                out.append(ConfigProblem(f"reward.components[{i}].name", f"{c.name!r} scores a restoration of the "
                                         "input image in the flow generator's latents: it needs recipe clear on an "
                                         "architecture with a flow generator (model.arch unified)"))
        if cfg.model.read_generation != "latent" and not self.restores:
            out.append(ConfigProblem("model.read_generation", f"recipe {self.name!r} never reads a generated image "
                                     "back; only clear does"))
        return out

    def first_problem(self, cfg: Any) -> ConfigProblem | None:
        found = self.problems(cfg)
        return found[0] if found else None

