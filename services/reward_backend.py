"""Where one step's rewards are computed: the run's reward backend, behind one interface.

``start_reward(cfg)`` returns a :class:`RewardBackend` (``reward.backend``):

* ``actor`` -> :class:`ActorReward`: one ``reward.actor.RewardActor`` Ray actor (the default);
* ``serve`` -> :class:`ServeReward`: the Ray Serve reward app (``services.serve_reward``), one application
  per run, called through its deployment handle (no HTTP route).

Either way the driver calls ``score_values(trajectories)`` (only what rewards read is sent:
``reward.registry.reward_view``), ``update_weights(handle, timeout_s)`` when a reward scores with the policy
(GvU), and ``shutdown()``. The reward functions themselves are in ``reward/`` (``reward.registry``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import ray

from reward.actor import make_reward_actor, needs_policy, with_policy_config
from reward.registry import reward_view
from services.config import RunConfig

log = logging.getLogger(__name__)

Scores = tuple[list[float], dict[str, list[float]]]


class RewardBackend(Protocol):
    follows_policy: bool  # a reward scores with the policy: it receives every published version

    def score_values(self, trajectories: list) -> Scores: ...
    def update_weights(self, handle: Any, timeout_s: float) -> None: ...
    def alive(self, timeout_s: float = 15.0) -> bool: ...
    def shutdown(self) -> None: ...


class ActorReward:
    """``reward.backend: actor``: one ``RewardActor`` (its handle; ``start_reward`` makes it)."""

    def __init__(self, actor: Any, *, follows_policy: bool = False, timeout_s: float = 600.0) -> None:
        self.actor, self.follows_policy, self.timeout_s = actor, follows_policy, timeout_s

    def score_values(self, trajectories: list) -> Scores:
        return ray.get(self.actor.score_values.remote([reward_view(t) for t in trajectories]),
                       timeout=self.timeout_s)

    def update_weights(self, handle: Any, timeout_s: float) -> None:
        ray.get(self.actor.update_weights.remote(handle, timeout_s), timeout=timeout_s + 30)

    def alive(self, timeout_s: float = 15.0) -> bool:
        try:
            ray.get(self.actor.__ray_ready__.remote(), timeout=timeout_s)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not usable"
            return False

    def shutdown(self) -> None:
        ray.kill(self.actor)


class ServeReward:
    """``reward.backend: serve``: the Serve reward app, scored through its deployment handle."""

    follows_policy = False  # the Serve app holds no policy (config validation rejects gvu with serve)

    def __init__(self, cfg: RunConfig) -> None:
        from ray import serve

        from services.serve_reward import RewardServeClient, build_reward_app

        self.name = f"unigrpo-reward-{cfg.run_name}"
        try:
            serve.start(proxy_location="Disabled")  # no-op when Serve already runs on the cluster
        except Exception as e:  # noqa: BLE001
            log.info("serve.start: %s", e)
        handle = serve.run(build_reward_app(cfg), name=self.name, route_prefix=None, blocking=False)
        self.client = RewardServeClient(handle, timeout_s=cfg.reward.timeout_s)

    def score_values(self, trajectories: list) -> Scores:
        return self.client.score_values(trajectories)

    def update_weights(self, handle: Any, timeout_s: float) -> None:
        raise RuntimeError("the Serve reward app holds no policy")

    def alive(self, timeout_s: float = 15.0) -> bool:
        return True  # Serve restarts its own replicas

    def shutdown(self) -> None:
        from ray import serve

        try:
            serve.delete(self.name)
        except Exception as e:  # noqa: BLE001
            log.warning("could not delete Serve app %s: %s", self.name, e)


def start_reward(cfg: RunConfig) -> RewardBackend:
    """The run's reward backend (``reward.backend``)."""
    if cfg.reward.backend == "serve":
        return ServeReward(cfg)
    # policy-scoring rewards (GvU) build the run's own policy from its ``model`` section
    specs = with_policy_config([c.scorer_spec() for c in cfg.reward.components], cfg.model.model_dump())
    actor = make_reward_actor(specs, num_cpus=cfg.reward.num_cpus, num_gpus=cfg.reward.num_gpus)
    return ActorReward(actor, follows_policy=needs_policy(specs), timeout_s=cfg.reward.timeout_s)
