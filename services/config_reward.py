"""The ``reward`` section: the weighted reward components (which advantage each enters), the backend, the Serve app."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from reward.names import KNOWN_REWARDS, unknown_reward
from services.config_types import NonNegFloat, NonNegInt, PosFloat, PosInt, Section
from services.overrides import ConfigError


class RewardComponent(Section):
    name: Annotated[str, Field(min_length=1)]
    weight: Annotated[float, Field(allow_inf_nan=False)] = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    applies_to: Literal["trajectory", "denoising"] = "trajectory"

    def scorer_spec(self) -> dict:
        """The reward set's spec: a ``denoising`` component is scored and logged, out of the total (weight 0);
        the driver weights it into the denoising steps' own advantage (``services.step_batch``)."""
        return {"name": self.name, "weight": self.weight if self.applies_to == "trajectory" else 0.0,
                "kwargs": dict(self.kwargs)}


class ServeAutoscaling(Section):
    min_replicas: NonNegInt = 1
    max_replicas: PosInt = 2

    @model_validator(mode="after")
    def _bounds(self) -> ServeAutoscaling:
        if self.min_replicas > self.max_replicas:
            raise ConfigError(
                "reward.serve.autoscaling.min_replicas",
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})",
            )
        return self


class ServeConfig(Section):
    route_prefix: str = "/reward"
    max_body_mb: PosFloat = 16
    autoscaling: ServeAutoscaling = Field(default_factory=ServeAutoscaling)

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v


def _default_components() -> list[RewardComponent]:
    return [RewardComponent(name="answer", weight=1.0), RewardComponent(name="format", weight=0.1)]


class RewardConfig(Section):
    backend: Literal["actor", "serve"] = "actor"
    components: list[RewardComponent] = Field(default_factory=_default_components)
    num_cpus: NonNegFloat = 0.5
    num_gpus: NonNegFloat = 0.0  # the reward actor's; a policy-scoring reward (gvu) then runs on the GPU
    timeout_s: PosFloat = 600  # one scoring call (a batch of trajectories) answers within this, or the run stops
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("components")
    @classmethod
    def _components(cls, v: list[RewardComponent]) -> list[RewardComponent]:
        if not v:
            raise ValueError("at least one reward component is needed")
        names = [c.name for c in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate component names: {', '.join(dup)}")
        check_reward_names(names)
        return v


def check_reward_names(names: list[str]) -> None:
    """ConfigError naming ``reward.components[i].name`` for the first name that is no known reward."""
    for i, name in enumerate(names):
        if unknown_reward(name):
            raise ConfigError(f"reward.components[{i}].name",
                              f"unknown reward {name!r}; known: {', '.join(KNOWN_REWARDS)} "
                              "(or 'package.module:function')")
