"""Rollout fleet health: a pure state machine over worker states (no Ray, no I/O).

The driver / control actor reports what it observes (a call failed, a restart began or finished, weights
were loaded, a worker is being drained) and asks :meth:`FleetHealth.schedulable` who may get prompts.

    HEALTHY --call_failed--> DEAD --restart_started--> RESTARTING --restart_done--> STALE
    STALE --weights_loaded(current)--> HEALTHY          (weights_loaded(older) keeps it STALE)
    HEALTHY | STALE | DEAD --drain--> DRAINING --drained--> REMOVED (scale-down: always drain, then drained)

A new worker (``add_worker``) starts STALE: it gets the current weights before any prompt. A failed
restart (``call_failed`` while RESTARTING) goes back to DEAD. ``call_failed`` on a DEAD or DRAINING
worker keeps its state (several in-flight calls fail together; a worker being removed is not restarted)
but is counted. REMOVED is final (the id may be added again as a new worker).
Anything else raises :class:`InvalidTransition`.

Reports are attributed to one actor *instance*: every worker record carries ``instance``, a fleet-wide
number that ``add_worker`` and ``restart_started`` give out afresh (a restarted worker is a new process).
An event reported with ``instance=`` that is not the record's current one (or any report about a REMOVED
worker) comes from an actor that was already replaced or removed: it changes nothing and is counted in
``late_reports``, so a late error from a dead predecessor never marks its fresh successor DEAD.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = ["WorkerState", "Event", "InvalidTransition", "WorkerRecord", "FleetHealth", "TRANSITIONS"]


class WorkerState(StrEnum):
    HEALTHY = "healthy"
    DEAD = "dead"
    RESTARTING = "restarting"
    STALE = "stale"
    DRAINING = "draining"
    REMOVED = "removed"


class Event(StrEnum):
    CALL_FAILED = "call_failed"
    RESTART_STARTED = "restart_started"
    RESTART_DONE = "restart_done"
    WEIGHTS_LOADED = "weights_loaded"
    DRAIN = "drain"
    DRAINED = "drained"


S, E = WorkerState, Event

#: (state, event) -> next state. WEIGHTS_LOADED from STALE is resolved by version (HEALTHY or STALE).
TRANSITIONS: dict[tuple[WorkerState, Event], WorkerState] = {
    (S.HEALTHY, E.CALL_FAILED): S.DEAD,
    (S.STALE, E.CALL_FAILED): S.DEAD,
    (S.DEAD, E.CALL_FAILED): S.DEAD,
    (S.RESTARTING, E.CALL_FAILED): S.DEAD,
    (S.DRAINING, E.CALL_FAILED): S.DRAINING,
    (S.DEAD, E.RESTART_STARTED): S.RESTARTING,
    (S.RESTARTING, E.RESTART_DONE): S.STALE,
    (S.STALE, E.WEIGHTS_LOADED): S.HEALTHY,
    (S.HEALTHY, E.WEIGHTS_LOADED): S.HEALTHY,
    (S.DRAINING, E.WEIGHTS_LOADED): S.DRAINING,
    (S.HEALTHY, E.DRAIN): S.DRAINING,
    (S.STALE, E.DRAIN): S.DRAINING,
    (S.DEAD, E.DRAIN): S.DRAINING,
    (S.DRAINING, E.DRAINED): S.REMOVED,
}


class InvalidTransition(ValueError):
    """An event that is not allowed in the worker's current state."""

    def __init__(self, worker: Hashable, state: WorkerState, event: Event, detail: str = "") -> None:
        self.worker, self.state, self.event = worker, state, event
        msg = f"worker {worker!r}: event {event.value!r} is not allowed in state {state.value!r}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


@dataclass
class WorkerRecord:
    """One worker: state, the weight version it holds (None: none yet), and its own counters."""

    worker_id: Hashable
    state: WorkerState = WorkerState.STALE
    version: int | None = None
    instance: int = 0  # the actor instance now behind this id (fleet-wide unique)
    failures: int = 0
    restarts: int = 0
    late_reports: int = 0  # reports about an instance that was already replaced or removed
    history: list[tuple[WorkerState, Event, WorkerState]] = field(default_factory=list)


class FleetHealth:
    """Worker states, the current weight version, and fleet counters (``failures``, ``restarts``,
    ``late_reports``)."""

    def __init__(self, current_version: int = 0) -> None:
        self.current_version = current_version
        self.workers: dict[Hashable, WorkerRecord] = {}
        self.failures = 0  # call_failed events reported (about a current instance)
        self.restarts = 0  # restarts started
        self.late_reports = 0  # reports about replaced / removed instances, ignored
        self._instances = 0

    def _new_instance(self) -> int:
        self._instances += 1
        return self._instances

    # ------------------------------------------------------------------------------ membership
    def add_worker(self, worker_id: Hashable, version: int | None = None) -> WorkerRecord:
        """Register a worker (new or scaled up). HEALTHY only if it already holds the current version."""
        if worker_id in self.workers and self.workers[worker_id].state is not WorkerState.REMOVED:
            raise ValueError(f"worker {worker_id!r} is already in the fleet")
        state = WorkerState.HEALTHY if version == self.current_version else WorkerState.STALE
        rec = self.workers[worker_id] = WorkerRecord(worker_id, state, version, self._new_instance())
        return rec

    def set_version(self, version: int) -> None:
        """The learner published ``version``; versions never go back."""
        if version < self.current_version:
            raise ValueError(f"weight version {version} is older than the current {self.current_version}")
        self.current_version = version

    # ---------------------------------------------------------------------------------- events
    def apply(self, worker_id: Hashable, event: Event | str, version: int | None = None,
              instance: int | None = None) -> WorkerState:
        """Apply one event; returns the new state. Unknown workers raise KeyError, bad moves InvalidTransition.
        ``instance``: the actor instance the report is about; a stale one is a late report (no change)."""
        event = Event(event)
        rec = self.record(worker_id)
        if self.is_late(worker_id, instance):
            rec.late_reports += 1
            self.late_reports += 1
            return rec.state
        before = rec.state
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise InvalidTransition(worker_id, before, event)
        if event is Event.WEIGHTS_LOADED:
            if version is None:
                raise ValueError("weights_loaded needs the loaded version")
            if version > self.current_version:
                raise InvalidTransition(worker_id, before, event,
                                        f"version {version} is newer than the current {self.current_version}")
            rec.version = version
            if before is WorkerState.STALE and version != self.current_version:
                after = WorkerState.STALE
        elif event is Event.CALL_FAILED:
            rec.failures += 1
            self.failures += 1
        elif event is Event.RESTART_STARTED:
            rec.restarts += 1
            self.restarts += 1
            rec.instance = self._new_instance()
        elif event is Event.RESTART_DONE:
            rec.version = None  # a fresh process holds no trained weights
        rec.state = after
        rec.history.append((before, event, after))
        return after

    def call_failed(self, worker_id: Hashable, instance: int | None = None) -> WorkerState:
        return self.apply(worker_id, Event.CALL_FAILED, instance=instance)

    def restart_started(self, worker_id: Hashable) -> WorkerState:
        return self.apply(worker_id, Event.RESTART_STARTED)

    def restart_done(self, worker_id: Hashable) -> WorkerState:
        return self.apply(worker_id, Event.RESTART_DONE)

    def weights_loaded(self, worker_id: Hashable, version: int, instance: int | None = None) -> WorkerState:
        return self.apply(worker_id, Event.WEIGHTS_LOADED, version, instance)

    def drain(self, worker_id: Hashable) -> WorkerState:
        return self.apply(worker_id, Event.DRAIN)

    def drained(self, worker_id: Hashable) -> WorkerState:
        return self.apply(worker_id, Event.DRAINED)

    # --------------------------------------------------------------------------------- queries
    def record(self, worker_id: Hashable) -> WorkerRecord:
        try:
            return self.workers[worker_id]
        except KeyError:
            raise KeyError(f"unknown worker {worker_id!r}") from None

    def state(self, worker_id: Hashable) -> WorkerState:
        return self.record(worker_id).state

    def instance(self, worker_id: Hashable) -> int:
        """The actor instance now behind ``worker_id`` (tag each remote call with it)."""
        return self.record(worker_id).instance

    def is_late(self, worker_id: Hashable, instance: int | None) -> bool:
        """A report about ``instance`` comes from a replaced or removed actor (None: untagged, never late)."""
        rec = self.record(worker_id)
        return instance is not None and (instance != rec.instance or rec.state is WorkerState.REMOVED)

    def schedulable(self, max_staleness: int = 0) -> list[Hashable]:
        """HEALTHY workers whose version is within ``max_staleness`` of current (0: exactly current)."""
        return [
            w for w, r in self.workers.items()
            if r.state is WorkerState.HEALTHY and r.version is not None
            and 0 <= self.current_version - r.version <= max_staleness
        ]

    def in_state(self, *states: WorkerState) -> list[Hashable]:
        return [w for w, r in self.workers.items() if r.state in states]

    def needs_weights(self) -> list[Hashable]:
        """Workers that should be sent the current weights (STALE, or HEALTHY on an older version)."""
        return [
            w for w, r in self.workers.items()
            if r.state in (WorkerState.STALE, WorkerState.HEALTHY) and r.version != self.current_version
        ]

    def active(self) -> list[Hashable]:
        """Every worker not REMOVED (what counts toward the pool size)."""
        return [w for w, r in self.workers.items() if r.state is not WorkerState.REMOVED]

    def counts(self) -> dict[str, int]:
        c = Counter(r.state.value for r in self.workers.values())
        return {s.value: c.get(s.value, 0) for s in WorkerState}

    def snapshot(self) -> dict[str, Any]:
        """Flat numbers for logging (``fleet/healthy``, ``fleet/failures``, ...)."""
        out: dict[str, Any] = {f"fleet/{k}": v for k, v in self.counts().items()}
        out.update({"fleet/failures": self.failures, "fleet/restarts": self.restarts,
                    "fleet/late_reports": self.late_reports,
                    "fleet/version": self.current_version, "fleet/schedulable": len(self.schedulable())})
        return out

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(self.workers.values())
