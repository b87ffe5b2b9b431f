"""The reward actor: scores trajectories with a fixed set of weighted rewards.

``RewardActor`` is a plain class (importable and testable without Ray); the driver makes it a Ray actor:

    actor = make_reward_actor(cfg.reward.specs, num_cpus=1)
    scored = ray.get(actor.score.remote(trajectories))

Models (CLIP, DINOv2, ...) load once, in the constructor.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from policy.trajectory import Trajectory
from reward.registry import RewardSet, RewardSpec


class RewardActor:
    """Fills ``Trajectory.reward`` (NaN when any weighted component failed) and ``reward_components``."""

    def __init__(self, specs: Sequence[dict | RewardSpec], resources: dict | None = None,
                 torch_threads: int | None = None) -> None:
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))
        t0 = time.perf_counter()
        self.rewards = RewardSet(specs, resources)
        self.setup_s = time.perf_counter() - t0
        self.score_s = 0.0
        self.n_calls = 0

    def ready(self) -> bool:
        return True

    def score(self, trajectories: list[Trajectory]) -> list[Trajectory]:
        """Score a batch in place and return it (Ray sends the scored copies back)."""
        t0 = time.perf_counter()
        totals, components = self.rewards.combine(trajectories)
        for i, t in enumerate(trajectories):
            t.reward = float(totals[i])
            t.reward_components = {k: float(v[i]) for k, v in components.items()}
        self.score_s += time.perf_counter() - t0
        self.n_calls += 1
        return trajectories

    def score_values(self, trajectories: Sequence[Any]) -> tuple[list[float], dict[str, list[float]]]:
        """Only the numbers, for callers that do not need the trajectories back (less traffic)."""
        return self.rewards.combine(trajectories)

    def specs(self) -> list[dict]:
        return [{"name": s.name, "weight": s.weight, "kwargs": s.kwargs, "label": s.label}
                for s in self.rewards.specs]

    def stats(self) -> dict:
        """Counts since construction: scored, NaN totals, per component failed (raised) / non-finite."""
        d = self.rewards.stats.as_dict()
        d.update(n_calls=self.n_calls, setup_s=self.setup_s, score_s=self.score_s)
        return d

    def reset_stats(self) -> None:
        from reward.registry import RewardStats

        self.rewards.stats = RewardStats()
        self.n_calls, self.score_s = 0, 0.0


def make_reward_actor(specs: Sequence[dict | RewardSpec], *, num_cpus: float = 1, num_gpus: float = 0,
                      resources: dict | None = None, name: str | None = None, **options: Any) -> Any:
    """Start a ``RewardActor`` as a Ray actor and return its handle.

    ``resources`` are shared objects handed to reward setups (not Ray resources); extra keyword arguments
    go to ``.options()`` (``scheduling_strategy``, ``max_restarts``, ``runtime_env``...).
    """
    import ray

    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, **options}
    if name is not None:
        opts["name"] = name
    threads = max(1, math.floor(num_cpus)) if num_cpus else 1
    spec_dicts = [s if isinstance(s, dict) else {"name": s.name, "weight": s.weight, "kwargs": s.kwargs,
                                                  "label": s.label} for s in specs]
    return ray.remote(RewardActor).options(**opts).remote(spec_dicts, resources, threads)
