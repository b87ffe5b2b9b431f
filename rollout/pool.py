"""The rollout pool: N RolloutWorker actors, each in its own placement group, whose size changes at run
time. Health follows ``fleet_health`` (a pure state machine); this module does the Ray side of it:
creating, syncing, replacing and draining workers, and re-queueing the prompts of failed calls so no
group is lost or duplicated.

Nothing here waits without a bound, and nothing that a worker does blocks the run:

* A member comes up in the background: placement group, then the actor (its model build), then the current
  weights. It is STALE (``pool/pending``) until it holds them and gets prompts from then on. A placement
  that cannot be met stays pending (logged once after ``start_timeout_s``); it never raises.
* Every wait on a remote call has a deadline: a sampling / decode call ``call_timeout_s``, a weight load
  ``sync_timeout_s + call_timeout_s``, a fresh actor's build and first load ``start_timeout_s``. A call
  past its deadline or lost with its actor declares that actor instance dead: it is killed, a fresh actor
  takes its place (in the same placement group, in the background) and the call's prompts go to another
  worker with the same seed.
* Every call is tagged with the actor instance it went to (``FleetHealth.instance``): a failure reported
  by an instance that was already replaced is a late report and never touches its successor.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from policy.config import PolicyConfig
from policy.trajectory import Trajectory
from rollout.fleet_health import FleetHealth, WorkerState
from rollout.interleaved import RolloutSettings
from rollout.worker import RolloutWorker
from sync import WeightSyncError, WeightSyncMismatch

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
    sync_timeout_s: float = 120.0  # learner.sync.timeout_s
    call_timeout_s: float = 300.0  # rollout.call_timeout_s
    start_timeout_s: float = 600.0  # rollout.start_timeout_s
    max_attempts: int = 3  # a chunk's tries on workers; a member's consecutive failed starts


@dataclass
class _Member:
    """One pool slot: its placement group and, once placed, the actor instance behind it."""

    worker_id: int
    pg: PlacementGroup
    placed: Any  # pg.ready()'s ObjectRef
    since: float  # when the slot was created (placement) or its actor (re)started
    actor: Any = None  # None: not placed yet, or dead and given up on
    instance: int = 0  # FleetHealth instance of ``actor``
    joined: bool = False  # has held weights (or was part of the initial pool): sync waits for it
    load: Any = None  # in-flight update_weights ObjectRef
    load_deadline: float = 0.0
    built: Any = None  # collective sync: a call that returns once the actor is built (it may then join a group)
    start_failures: int = 0
    warned: bool = False
    notes: list[str] = field(default_factory=list)


class RolloutPool:
    def __init__(self, spec: PoolSpec, num_workers: int) -> None:
        """``num_workers`` members; waits (up to ``start_timeout_s``) until they are placed and built, so the
        first sync reaches them all. Members that cannot be placed stay pending; none placed raises."""
        self.spec = spec
        self.health = FleetHealth()
        self.members: dict[int, _Member] = {}
        self.handle = None  # the current WeightHandle
        # learner.sync.backend nccl: weights arrive only by a broadcast to the driver's group (sync.group),
        # so members load in ``sync`` when they are in it, never on their own
        self.collective = spec.sync_backend == "nccl"
        self._next_id = 0
        self._lock = threading.RLock()
        for _ in range(num_workers):
            self._add()
        self._startup()

    # ---- membership ------------------------------------------------------------------------
    def _bundle(self) -> dict:
        bundle = {"CPU": self.spec.num_cpus}
        if self.spec.num_gpus:
            bundle["GPU"] = self.spec.num_gpus
        if self.spec.custom_resource:
            bundle[self.spec.custom_resource] = 1
        return bundle

    def _spawn(self, m: _Member) -> None:
        s = self.spec
        m.actor = ray.remote(RolloutWorker).options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(m.pg, 0),
        ).remote(m.worker_id, s.policy_cfg, s.settings, s.engine, s.engine_kwargs, s.sync_backend, s.rollout_kind,
                 max(1, int(s.num_cpus)), s.num_gpus)
        m.instance, m.since = self.health.instance(m.worker_id), time.monotonic()
        m.built = m.actor.version.remote() if self.collective else None

    def _add(self) -> int:
        """A new member: its placement group is requested (not waited for); STALE until it holds the
        current weights."""
        wid, self._next_id = self._next_id, self._next_id + 1
        pg = placement_group([self._bundle()])
        self.members[wid] = _Member(wid, pg, pg.ready(), time.monotonic())
        self.health.add_worker(wid)
        return wid

    def _startup(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        while time.monotonic() < deadline and any(m.actor is None for m in self.members.values()):
            refs = [m.placed for m in self.members.values() if m.actor is None]
            ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
            self._advance()
        built = {m.actor.version.remote(): m for m in self.members.values() if m.actor is not None}
        if not built:
            raise RuntimeError(
                f"no rollout worker could be placed in {self.spec.start_timeout_s:.0f} s (each asks for "
                f"{self._bundle()}; the cluster has {ray.available_resources()} available): lower "
                "rollout.num_cpus_per_worker / num_gpus_per_worker or add nodes")
        done, _ = ray.wait(list(built), num_returns=len(built), timeout=max(0.0, deadline - time.monotonic()))
        for ref, m in built.items():
            try:
                if ref not in done:
                    raise TimeoutError(f"not built within {self.spec.start_timeout_s:.0f} s")
                ray.get(ref)
                m.joined = True
            except (*WORKER_LOST, TimeoutError) as e:
                self._declare_dead(m, e)
        if not any(m.joined for m in self.members.values()):
            raise RuntimeError("no rollout worker could be started; see the worker logs above")

    def _advance(self) -> None:
        """One non-blocking pass: placed members get their actor, finished loads are taken, loads past
        their deadline declare their worker dead, members behind the current version get a load."""
        now = time.monotonic()
        for m in list(self.members.values()):
            state = self.health.state(m.worker_id)
            if state is WorkerState.DRAINING:
                continue
            if m.actor is None:
                if state is WorkerState.DEAD:
                    continue  # given up on after max_attempts failed starts
                if ray.wait([m.placed], timeout=0)[0]:
                    self._spawn(m)
                elif not m.warned and now - m.since > self.spec.start_timeout_s:
                    m.warned = True
                    log.warning("rollout worker %d: placement %s still pending after %.0f s (cluster has %s "
                                "available); it stays pending and joins once placed", m.worker_id,
                                self._bundle(), now - m.since, ray.available_resources())
                continue
            if m.load is not None:
                if ray.wait([m.load], timeout=0)[0]:
                    self._load_done(m)
                elif now > m.load_deadline:
                    self._declare_dead(m, TimeoutError(f"weights not loaded by the deadline ({self._load_s(m):.0f} s)"))
                    continue
            if m.actor is not None and m.load is None and self.handle is not None and not self.collective \
                    and self.health.record(m.worker_id).version != self.handle.version:
                self._submit_load(m)

    def _load_s(self, m: _Member) -> float:
        fresh = self.health.record(m.worker_id).version is None and not m.joined
        return self.spec.sync_timeout_s + (self.spec.start_timeout_s if fresh else self.spec.call_timeout_s)

    def _submit_load(self, m: _Member) -> None:
        m.load = m.actor.update_weights.remote(self.handle, self.spec.sync_timeout_s)
        m.load_deadline = time.monotonic() + self._load_s(m)

    def _load_done(self, m: _Member) -> None:
        ref, m.load = m.load, None
        try:
            version = ray.get(ref, timeout=self.spec.call_timeout_s)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, WeightSyncMismatch):  # loaded, but not what was published: never retried
                raise e.cause from None
            if self.collective and isinstance(e.cause, WeightSyncError):
                # a broadcast that broke (another member died): this one is alive, only behind a version;
                # it loads again from the next group the driver builds
                log.warning("rollout worker %d missed version %d: %s", m.worker_id, self.handle.version,
                            str(e.cause).splitlines()[0][:200])
                return
            self._declare_dead(m, e)
            return
        except Exception as e:  # noqa: BLE001 - a worker that cannot load is not usable: replaced
            self._declare_dead(m, e)
            return
        self.health.weights_loaded(m.worker_id, version, m.instance)
        m.joined, m.start_failures = True, 0

    def _declare_dead(self, m: _Member, why: BaseException | str) -> None:
        """The current actor instance of ``m`` failed: killed, and a fresh one started in its placement
        group (background); after ``max_attempts`` failed starts in a row the member stays DEAD."""
        wid = m.worker_id
        log.warning("rollout worker %d (instance %d) declared dead: %s", wid, m.instance,
                    why if isinstance(why, str) else f"{type(why).__name__}: {str(why)[:200]}")
        fresh = not m.joined or self.health.record(wid).version is None
        if self.health.state(wid) is not WorkerState.DEAD:
            self.health.call_failed(wid, m.instance)
        if m.actor is not None:
            ray.kill(m.actor, no_restart=True)
        m.actor, m.load, m.joined = None, None, False
        m.start_failures += 1 if fresh else 0
        if self.health.state(wid) is WorkerState.DRAINING:
            return
        if m.start_failures >= self.spec.max_attempts:
            log.error("rollout worker %d failed to start %d times in a row; left DEAD (the pool goes on "
                      "without it)", wid, m.start_failures)
            return
        self.health.restart_started(wid)
        self._spawn(m)
        self.health.restart_done(wid)
        if self.handle is not None and not self.collective:
            self._submit_load(m)

    def worker_failed(self, wid: int, instance: int, why: BaseException | str) -> bool:
        """A call to instance ``instance`` of worker ``wid`` failed or timed out. True when that instance is
        still the current one (it is then killed and replaced); False for a late report about an instance
        that was already replaced or removed (counted, nothing else happens)."""
        with self._lock:
            m = self.members.get(wid)
            if m is None or self.health.is_late(wid, instance) or m.actor is None:
                self.health.call_failed(wid, instance)  # late (or already DEAD): counted, nothing else
                return False
            self._declare_dead(m, why)
            return True

    def _remove(self, wid: int) -> None:
        """A DRAINING member finishes what it has queued (its calls run in order, so a no-op call returns
        after them; at most ``call_timeout_s``), then goes with its placement group."""
        m = self.members.pop(wid)
        if m.actor is not None:
            try:
                ray.get(m.actor.version.remote(), timeout=self.spec.call_timeout_s)
            except WORKER_LOST:
                self.health.call_failed(wid, m.instance)  # died while draining: nothing left to finish
            except ray.exceptions.GetTimeoutError:
                log.warning("rollout worker %d did not drain in %.0f s; removing it", wid, self.spec.call_timeout_s)
            ray.kill(m.actor, no_restart=True)
        remove_placement_group(m.pg)
        self.health.drained(wid)

    def scale(self, n: int) -> None:
        """Grow (new members come up in the background: placement, build, weights; prompts once they hold
        the current weights) or shrink (members not up yet go first, then the newest: each finishes its
        queued calls, then goes). Never waits for a placement."""
        if n < 1:
            raise ValueError(f"rollout pool size must be >= 1, got {n}")
        with self._lock:
            while len(self.members) < n:
                self._add()
            extra = max(0, len(self.members) - n)
            order = sorted(self.members.values(), key=lambda m: (m.worker_id in self.health.schedulable(),
                                                                 -m.worker_id))
            for m in order[:extra]:
                self.health.drain(m.worker_id)
                self._remove(m.worker_id)
            self._advance()

    @property
    def size(self) -> int:
        """Members counted toward the pool (up or still coming up)."""
        return len(self.members)

    @property
    def pending(self) -> int:
        """Members that do not hold the current weights yet (placing, building, loading, restarting)."""
        ready = set(self.health.schedulable())
        return sum(1 for wid in self.members if wid not in ready)

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until every member holds the current weights; True if they do."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                self._advance()
                if not self.pending:
                    return True
                refs = [m.load if m.actor is not None else m.placed for m in self.members.values()
                        if (m.load is not None or m.actor is None)]
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if refs:
                ray.wait(refs, num_returns=1, timeout=min(left, 1.0))
            else:
                time.sleep(min(left, 0.2))

    # ---- weights ---------------------------------------------------------------------------
    def joinable(self) -> list[tuple[int, int, Any]]:
        """Collective sync: (worker id, instance, actor) of the members built and not draining: those the
        driver's next weight group takes."""
        with self._lock:
            self._advance()
            out = []
            for m in self.members.values():
                if m.actor is None or m.built is None or self.health.state(m.worker_id) in (
                        WorkerState.DRAINING, WorkerState.DEAD):
                    continue
                if ray.wait([m.built], timeout=0)[0]:
                    out.append((m.worker_id, m.instance, m.actor))
            return out

    def sync(self, handle, group: list[tuple[int, int]] | None = None) -> float:
        """Every member loads ``handle`` (in parallel). The wait covers the members that are up (each load
        bounded by its deadline; one that fails or runs past it is replaced); members still coming up get
        the weights in the background. Collective sync: ``group`` lists the (worker id, instance) of the
        group's receivers; exactly those load (the broadcast needs each of them), the others wait for a
        later group."""
        t0 = time.perf_counter()
        with self._lock:
            self.handle = handle
            self.health.set_version(handle.version)
            if self.collective:
                for wid, inst in group or []:
                    m = self.members.get(wid)
                    if m is not None and m.actor is not None and m.instance == inst:
                        m.joined = True
                        self._submit_load(m)
            self._advance()
            while True:
                waiting = [m for m in self.members.values() if m.joined and m.load is not None]
                if not waiting:
                    break
                left = min(m.load_deadline for m in waiting) - time.monotonic()
                ray.wait([m.load for m in waiting], num_returns=len(waiting), timeout=max(0.0, left))
                self._advance()
        return time.perf_counter() - t0

    # ---- sampling --------------------------------------------------------------------------
    def _dispatch(self, calls: list[tuple[str, tuple]]) -> list:
        """Run each ``(method, args)`` on some worker holding the current weights (one call in flight per
        worker); a call whose worker dies or does not answer within ``call_timeout_s`` is re-queued on
        another. Returns the answers in order."""
        queue, attempts = deque(range(len(calls))), [0] * len(calls)
        results: list = [None] * len(calls)
        inflight: dict[Any, tuple[int, int, int, float]] = {}  # ref -> (call, worker, instance, deadline)
        while queue or inflight:
            self._advance()
            busy = {wid for _, wid, _, _ in inflight.values()}
            for wid in self.health.schedulable():
                if not queue:
                    break
                if wid in busy:
                    continue
                ci = queue.popleft()
                if attempts[ci] >= self.spec.max_attempts:
                    raise RuntimeError(f"rollout call {calls[ci][0]!r} failed on {attempts[ci]} workers")
                attempts[ci] += 1
                m = self.members[wid]
                ref = getattr(m.actor, calls[ci][0]).remote(*calls[ci][1])
                inflight[ref] = (ci, wid, m.instance, time.monotonic() + self.spec.call_timeout_s)
            if not inflight:  # nobody holds the current weights: wait for a member coming up
                loading = [m for m in self.members.values() if m.actor is not None and m.load is not None]
                if not loading:
                    raise RuntimeError(f"no rollout worker can take prompts ({self.health.counts()}; "
                                       f"{sum(m.actor is None for m in self.members.values())} not placed)")
                left = min(m.load_deadline for m in loading) - time.monotonic()
                ray.wait([m.load for m in loading], num_returns=1, timeout=max(0.0, left))
                continue
            left = min(d for *_, d in inflight.values()) - time.monotonic()
            done, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.0, left))
            now = time.monotonic()
            for ref in done:
                ci, wid, inst, _ = inflight.pop(ref)
                try:
                    results[ci] = ray.get(ref, timeout=self.spec.call_timeout_s)
                except WORKER_LOST as e:
                    log.warning("rollout worker %d died during %s (%s); re-queueing it", wid, calls[ci][0],
                                type(e).__name__)
                    self.worker_failed(wid, inst, e)
                    queue.appendleft(ci)
            for ref, (ci, wid, inst, deadline) in list(inflight.items()):
                if now >= deadline:
                    del inflight[ref]
                    self.worker_failed(wid, inst, f"{calls[ci][0]} did not answer in {self.spec.call_timeout_s:.0f} s")
                    queue.appendleft(ci)
        return results

    def generate(self, requests: list[dict], seed: int, overrides: dict | None = None) -> list[Trajectory]:
        """Split requests into one chunk per pool member (its seed fixed by the chunk, so the result does not
        depend on which worker samples it, nor on a re-queue); returns trajectories in request order."""
        with self._lock:
            n = max(1, min(self.size, len(requests)))
            chunks = [requests[i::n] for i in range(n)]
            results = self._dispatch([("generate", (c, seed * 1009 + ci, overrides)) for ci, c in enumerate(chunks)])
        order = {r["prompt_id"]: i for i, r in enumerate(requests)}
        trajs = [t for chunk in results for t in chunk]
        return sorted(trajs, key=lambda t: (order[t.prompt_id], t.group_index))

    def call(self, method: str, *args):
        """Run a method on a worker holding the current weights (decode images, ...); a dead or silent one
        is replaced and the call goes to the next."""
        with self._lock:
            return self._dispatch([(method, args)])[0]

    def actor(self, wid: int):
        return self.members[wid].actor

    def metrics(self) -> dict[str, float]:
        with self._lock:
            self._advance()
            placing = sum(1 for m in self.members.values() if m.actor is None)
            return {"pool/size": float(self.size), "pool/pending": float(self.pending),
                    "pool/placing": float(placing),
                    **{k: float(v) for k, v in self.health.snapshot().items()}}

    def shutdown(self) -> None:
        with self._lock:
            for wid in list(self.members):
                m = self.members.pop(wid)
                if m.actor is not None:
                    ray.kill(m.actor, no_restart=True)
                remove_placement_group(m.pg)
