"""The reward actor: scores trajectories with a fixed set of weighted rewards.

``RewardActor`` is a plain class (importable and testable without Ray); the driver makes it a Ray actor:

    actor = make_reward_actor(cfg.reward.specs, num_cpus=1)
    scored = ray.get(actor.score.remote(trajectories))

Models (CLIP, DINOv2, ...) load once, in the constructor.

Rewards that score with the policy itself (GvU: ``reward/gvu.py``) hold a policy of the run's ``model.arch``
(``UnifiedPolicy`` or ``JanusPolicy``) in the reward set's ``resources["policy"]`` (built once by the
reward's setup from the spec's ``policy_config`` kwarg). The driver
keeps it current: after every publish it calls ``update_weights(handle, timeout_s)`` with the SAME
``WeightHandle`` the rollout workers get; the actor receives the buckets through its own
``sync`` receiver and loads them with :func:`reward.gvu.gvu_sync`. ``version()`` is the
policy version the reward scores with (-1 before the first update, or when no reward holds a policy).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from policy.trajectory import Trajectory
from reward.names import POLICY_REWARDS
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
        self.policy_version = -1
        self.sync_s = 0.0
        self._receivers: dict[str, Any] = {}

    def ready(self) -> bool:
        return True

    # ---- the policy some rewards score with (GvU) ----------------------------------------------
    @property
    def policy(self) -> Any:
        """The policy a reward holds (``resources["policy"]``), or None."""
        return self.rewards.resources.get("policy")

    def needs_policy(self) -> bool:
        return self.policy is not None

    def update_weights(self, handle: Any, timeout_s: float = 60.0) -> int:
        """Receive the learner's published weights (the rollout workers' handle) into the reward's policy.

        Returns the version now held; a no-op (returning the handle's version) when no reward holds a policy.
        Raises ``WeightSyncTimeout`` within ``timeout_s`` when the weights cannot arrive.
        """
        from reward.gvu import gvu_sync
        from sync import make_receiver, manifest

        policy = self.policy
        if policy is None:
            return int(handle.version)
        t0 = time.perf_counter()
        backend = handle.backend
        if backend not in self._receivers:
            self._receivers[backend] = make_receiver(backend)
        received: list[str] = []
        n = gvu_sync(policy, manifest.recording(self._receivers[backend].receive(handle, timeout_s), received),
                     share=True)
        manifest.verify(handle, policy.adapted_modules(), received, policy.trainable_state_dict())
        for ctx in self.rewards.contexts.values():  # GvUState.version: which version scored a batch
            if hasattr(ctx.state, "version"):
                ctx.state.version = int(handle.version)
        self.policy_version = int(handle.version)
        self.sync_s = time.perf_counter() - t0
        self.n_synced_tensors = n
        return self.policy_version

    def join_sync_group(self, addr: str, port: int, world_size: int, rank: int, name: str, timeout_s: float) -> None:
        """Join the driver's collective weight group (``sync.group``) as receiver ``rank``."""
        from sync import make_receiver, transport

        backend = transport("nccl", self.policy is not None and self.policy.device.type == "cuda")
        self._receivers.setdefault(backend, make_receiver(backend)).init_group(addr, port, world_size, rank, name,
                                                                               timeout_s)

    def version(self) -> int:
        return self.policy_version

    def weights_digest(self) -> dict[str, float]:
        """Per-tensor sums of the reward policy's trainable weights (empty without a policy)."""
        return self.policy.weights_digest() if self.policy is not None else {}

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


def needs_policy(specs: Sequence[dict | RewardSpec]) -> bool:
    """Whether any component scores with the policy (and so must follow the learner's weights)."""
    return any(RewardSpec.from_dict(s).name in POLICY_REWARDS for s in specs)


def with_policy_config(specs: Sequence[dict | RewardSpec], policy_cfg: dict | None) -> list[dict]:
    """Spec dicts where every policy-scoring component without ``policy_path`` / ``policy_config`` gets
    ``kwargs.policy_config = policy_cfg`` (the run's ``model`` section: the reward builds the same policy)."""
    out = []
    for s in specs:
        s = RewardSpec.from_dict(s)
        d = {"name": s.name, "weight": s.weight, "kwargs": dict(s.kwargs), "label": s.label}
        if (policy_cfg is not None and s.name in POLICY_REWARDS and not d["kwargs"].get("policy_path")
                and d["kwargs"].get("policy_config") is None):
            d["kwargs"]["policy_config"] = dict(policy_cfg)
        out.append(d)
    return out


def make_reward_actor(specs: Sequence[dict | RewardSpec], *, num_cpus: float = 1, num_gpus: float = 0,
                      resources: dict | None = None, name: str | None = None, policy_cfg: dict | None = None,
                      **options: Any) -> Any:
    """Start a ``RewardActor`` as a Ray actor and return its handle.

    ``resources`` are shared objects handed to reward setups (not Ray resources); ``policy_cfg`` (a
    PolicyConfig dict) is given to the rewards that score with the policy (:func:`with_policy_config`);
    extra keyword arguments go to ``.options()`` (``scheduling_strategy``, ``max_restarts``, ``runtime_env``...).
    """
    import ray

    specs = with_policy_config(specs, policy_cfg)

    opts: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus, **options}
    if name is not None:
        opts["name"] = name
    threads = max(1, math.floor(num_cpus)) if num_cpus else 1
    spec_dicts = [s if isinstance(s, dict) else {"name": s.name, "weight": s.weight, "kwargs": s.kwargs,
                                                  "label": s.label} for s in specs]
    return ray.remote(RewardActor).options(**opts).remote(spec_dicts, resources, threads)
