"""The rollout pool: N RolloutWorker actors, each in its own placement group, whose size changes at run
time. Health follows ``fleet_health`` (a pure state machine); this module does the Ray side of it:
creating, syncing, replacing and draining workers, and re-queueing the prompts of failed calls so no
group is lost or duplicated.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from policy.config import PolicyConfig
from policy.trajectory import Trajectory
from rollout.fleet_health import FleetHealth, WorkerState
from rollout.interleaved import RolloutSettings
from rollout.worker import RolloutWorker
from sync.placement import wait_placement

log = logging.getLogger(__name__)
WORKER_LOST = (RayActorError, ActorDiedError, ActorUnavailableError)


@dataclass
class PoolSpec:
    policy_cfg: PolicyConfig  # the run's frozen ``model`` section
    settings: RolloutSettings
    engine: str = "hf"
    engine_kwargs: dict | None = None
    sync_backend: str = "object_store"
    rollout_kind: str = "interleaved"  # rollout.registry's kind, from the run's recipe
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    custom_resource: str | None = None
    sync_timeout_s: float = 120.0
    max_attempts: int = 3


@dataclass
class _Member:
    worker_id: int
    actor: ray.actor.ActorHandle
    pg: PlacementGroup


class RolloutPool:
    def __init__(self, spec: PoolSpec, num_workers: int) -> None:
        self.spec = spec
        self.health = FleetHealth()
        self.members: dict[int, _Member] = {}
        self.handle = None  # the current WeightHandle
        self._next_id = 0
        for _ in range(num_workers):
            self._add()

    # ---- membership ------------------------------------------------------------------------
    def _spawn(self, worker_id: int, pg: PlacementGroup) -> ray.actor.ActorHandle:
        s = self.spec
        return ray.remote(RolloutWorker).options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, 0),
        ).remote(worker_id, s.policy_cfg, s.settings, s.engine, s.engine_kwargs, s.sync_backend, s.rollout_kind,
                 max(1, int(s.num_cpus)), s.num_gpus)

    def _add(self) -> int:
        """A new worker in its own placement group; STALE until it holds the current weights."""
        wid, self._next_id = self._next_id, self._next_id + 1
        bundle = {"CPU": self.spec.num_cpus}
        if self.spec.num_gpus:
            bundle["GPU"] = self.spec.num_gpus
        if self.spec.custom_resource:
            bundle[self.spec.custom_resource] = 1
        pg = placement_group([bundle])
        wait_placement(pg, bundle)
        self.members[wid] = _Member(wid, self._spawn(wid, pg), pg)
        self.health.add_worker(wid)
        if self.handle is not None:
            self._load(wid)
        return wid

    def _load(self, wid: int, attempt: int = 1) -> None:
        """The current weights into worker ``wid`` (STALE -> HEALTHY); a worker that dies meanwhile is
        replaced (up to ``max_attempts`` times)."""
        m = self.members[wid]
        try:
            version = ray.get(m.actor.update_weights.remote(self.handle, self.spec.sync_timeout_s),
                              timeout=self.spec.sync_timeout_s + 30)
        except WORKER_LOST:
            self.health.call_failed(wid)
            if attempt >= self.spec.max_attempts:
                raise
            self._replace(wid, attempt + 1)
            return
        self.health.weights_loaded(wid, version)

    def _replace(self, wid: int, attempt: int = 1) -> None:
        """A dead worker gets a fresh actor in its placement group and the current weights."""
        m = self.members[wid]
        self.health.restart_started(wid)
        ray.kill(m.actor, no_restart=True)
        m.actor = self._spawn(wid, m.pg)
        self.health.restart_done(wid)
        if self.handle is not None:
            self._load(wid, attempt)

    def _remove(self, wid: int, drain_timeout_s: float = 600.0) -> None:
        """A DRAINING worker finishes what it has queued (its calls run in order, so a no-op call returns
        after them), then goes with its placement group."""
        m = self.members.pop(wid)
        try:
            ray.get(m.actor.version.remote(), timeout=drain_timeout_s)
        except WORKER_LOST:
            self.health.call_failed(wid)  # died while draining: nothing left to finish
        except ray.exceptions.GetTimeoutError:
            log.warning("rollout worker %d did not drain in %.0f s; removing it", wid, drain_timeout_s)
        ray.kill(m.actor, no_restart=True)
        remove_placement_group(m.pg)
        self.health.drained(wid)

    def scale(self, n: int) -> None:
        """Grow (each new worker: own placement group, STALE until it has loaded the current weights, so
        it gets no prompt before) or shrink (the newest workers are drained: they finish queued calls,
        then go). The driver scales between steps."""
        if n < 1:
            raise ValueError(f"rollout pool size must be >= 1, got {n}")
        while len(self.members) < n:
            self._add()
        for wid in sorted(self.members, reverse=True)[: max(0, len(self.members) - n)]:
            self.health.drain(wid)
            self._remove(wid)

    @property
    def size(self) -> int:
        return len(self.members)

    # ---- weights ---------------------------------------------------------------------------
    def sync(self, handle) -> float:
        """Every worker loads ``handle`` (in parallel); a worker that fails is replaced."""
        t0 = time.perf_counter()
        self.handle = handle
        self.health.set_version(handle.version)
        futures = {m.actor.update_weights.remote(handle, self.spec.sync_timeout_s): wid
                   for wid, m in self.members.items()}
        for f, wid in futures.items():
            try:
                self.health.weights_loaded(wid, ray.get(f, timeout=self.spec.sync_timeout_s + 30))
            except WORKER_LOST:
                self.health.call_failed(wid)
                self._replace(wid)
        return time.perf_counter() - t0

    # ---- sampling --------------------------------------------------------------------------
    def generate(self, requests: list[dict], seed: int, overrides: dict | None = None) -> list[Trajectory]:
        """Split requests into one chunk per schedulable worker; a chunk whose worker dies is re-queued
        (same seed) on another worker. Returns trajectories in request order."""
        ready = self.health.schedulable()
        if not ready:
            raise RuntimeError("no rollout worker holds the current weights")
        n = min(len(ready), len(requests))
        chunks = [requests[i::n] for i in range(n)]
        results: list[list[Trajectory] | None] = [None] * n
        attempts = [0] * n
        pending = {}

        def submit(ci: int) -> None:
            wid = self.health.schedulable()[(ci + attempts[ci]) % len(self.health.schedulable())]
            attempts[ci] += 1
            ref = self.members[wid].actor.generate.remote(chunks[ci], seed * 1009 + ci, overrides)
            pending[ref] = (ci, wid)

        for ci in range(n):
            submit(ci)
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            ci, wid = pending.pop(ref)
            try:
                results[ci] = ray.get(ref)
            except WORKER_LOST as e:
                log.warning("rollout worker %d died during sampling (%s); re-queueing %d prompts",
                            wid, type(e).__name__, len(chunks[ci]))
                if self.health.state(wid) in (WorkerState.HEALTHY, WorkerState.STALE):
                    self.health.call_failed(wid)
                    self._replace(wid)
                if attempts[ci] >= self.spec.max_attempts:
                    raise RuntimeError(f"prompt chunk {ci} failed on {attempts[ci]} workers") from e
                submit(ci)
        order = {r["prompt_id"]: i for i, r in enumerate(requests)}
        trajs = [t for chunk in results for t in chunk]
        return sorted(trajs, key=lambda t: (order[t.prompt_id], t.group_index))

    def call(self, method: str, *args):
        """Run a method on a schedulable worker (decode images, ...); a dead one is replaced and the call
        goes to the next."""
        for attempt in range(self.spec.max_attempts):
            wid = self.health.schedulable()[0]
            try:
                return ray.get(getattr(self.members[wid].actor, method).remote(*args))
            except WORKER_LOST:
                if attempt + 1 >= self.spec.max_attempts:
                    raise
                self.health.call_failed(wid)
                self._replace(wid)

    def actor(self, wid: int):
        return self.members[wid].actor

    def metrics(self) -> dict[str, float]:
        return {"pool/size": float(self.size), **{k: float(v) for k, v in self.health.snapshot().items()}}

    def shutdown(self) -> None:
        for wid in list(self.members):
            m = self.members.pop(wid)
            ray.kill(m.actor, no_restart=True)
            remove_placement_group(m.pg)
