"""Fleet health state machine (pure Python, no Ray)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rollout import fleet_health
from rollout.fleet_health import TRANSITIONS, Event, FleetHealth, InvalidTransition, WorkerState

S = WorkerState


def fleet(n: int = 2, version: int = 3) -> FleetHealth:
    f = FleetHealth(current_version=version)
    for i in range(n):
        f.add_worker(f"w{i}", version=version)
    return f


def to_state(f: FleetHealth, w: str, state: WorkerState) -> None:
    """Drive a HEALTHY worker into ``state`` through valid events."""
    path = {
        S.HEALTHY: [],
        S.DEAD: ["call_failed"],
        S.RESTARTING: ["call_failed", "restart_started"],
        S.STALE: ["call_failed", "restart_started", "restart_done"],
        S.DRAINING: ["drain"],
        S.REMOVED: ["drain", "drained"],
    }[state]
    for ev in path:
        f.apply(w, ev)
    assert f.state(w) is state


def test_module_imports_no_ray() -> None:
    tree = ast.parse(Path(fleet_health.__file__).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "ray" not in roots and "torch" not in roots


def test_new_worker_is_stale_until_current_weights() -> None:
    f = FleetHealth(current_version=5)
    f.add_worker("a")
    assert f.state("a") is S.STALE and f.schedulable() == [] and f.needs_weights() == ["a"]
    assert f.weights_loaded("a", 4) is S.STALE  # an older version does not make it healthy
    assert f.weights_loaded("a", 5) is S.HEALTHY
    assert f.schedulable() == ["a"] and f.needs_weights() == []
    f.add_worker("b", version=5)
    assert f.state("b") is S.HEALTHY
    with pytest.raises(ValueError, match="already"):
        f.add_worker("b")


def test_full_failure_cycle_and_counters() -> None:
    f = fleet(2)
    assert f.call_failed("w0") is S.DEAD
    assert f.schedulable() == ["w1"]
    assert f.restart_started("w0") is S.RESTARTING
    assert f.restart_done("w0") is S.STALE
    rec = f.record("w0")
    assert rec.version is None  # a fresh process holds no trained weights
    assert f.schedulable() == ["w1"]  # STALE never gets prompts
    assert f.weights_loaded("w0", 3) is S.HEALTHY
    assert sorted(f.schedulable()) == ["w0", "w1"]
    assert (f.failures, f.restarts) == (1, 1) and (rec.failures, rec.restarts) == (1, 1)
    assert [h[1] for h in rec.history] == [Event.CALL_FAILED, Event.RESTART_STARTED, Event.RESTART_DONE,
                                           Event.WEIGHTS_LOADED]


def test_restarted_worker_stale_across_version_bump() -> None:
    f = fleet(1, version=1)
    to_state(f, "w0", S.STALE)
    f.set_version(2)  # learner published while it was restarting
    assert f.weights_loaded("w0", 1) is S.STALE
    assert f.schedulable() == []
    assert f.weights_loaded("w0", 2) is S.HEALTHY and f.schedulable() == ["w0"]


def test_healthy_on_old_version_not_schedulable() -> None:
    f = fleet(2, version=1)
    f.set_version(2)
    assert f.schedulable() == [] and sorted(f.needs_weights()) == ["w0", "w1"]
    assert sorted(f.schedulable(max_staleness=1)) == ["w0", "w1"]  # async mode may allow lag
    f.weights_loaded("w0", 2)
    assert f.schedulable() == ["w0"]
    with pytest.raises(ValueError, match="older"):
        f.set_version(1)


def test_failed_restart_goes_back_to_dead() -> None:
    f = fleet(1)
    to_state(f, "w0", S.RESTARTING)
    assert f.call_failed("w0") is S.DEAD
    assert f.restart_started("w0") is S.RESTARTING
    assert (f.failures, f.restarts) == (2, 2)


def test_repeated_failures_on_dead_worker_counted_once_state() -> None:
    f = fleet(1)
    f.call_failed("w0")
    assert f.call_failed("w0") is S.DEAD  # other in-flight calls failing too
    assert f.failures == 2 and f.state("w0") is S.DEAD


def test_scale_down_drain() -> None:
    f = fleet(3)
    assert f.drain("w2") is S.DRAINING
    assert sorted(f.schedulable()) == ["w0", "w1"]
    assert f.weights_loaded("w2", 3) is S.DRAINING  # an in-flight sync may still land
    assert f.drained("w2") is S.REMOVED
    assert sorted(f.active()) == ["w0", "w1"]
    to_state(f, "w1", S.DEAD)
    assert f.drain("w1") is S.DRAINING  # same protocol for a dead worker: drain, then drained
    assert f.drained("w1") is S.REMOVED
    to_state(f, "w0", S.STALE)
    assert f.drain("w0") is S.DRAINING
    assert f.call_failed("w0") is S.DRAINING  # a draining worker that dies is not restarted ...
    assert f.failures == 3  # w1's death, w0's death before its restart, and this one
    assert f.drained("w0") is S.REMOVED  # ... only finished
    assert f.active() == [] and f.counts()["removed"] == 3
    f.add_worker("w2")  # an id can be reused once removed
    assert f.state("w2") is S.STALE


ALL_EVENTS = list(Event)


@pytest.mark.parametrize("state", list(WorkerState))
@pytest.mark.parametrize("event", ALL_EVENTS)
def test_transition_table(state: WorkerState, event: Event) -> None:
    f = fleet(1)
    to_state(f, "w0", state)
    version = 3 if event is Event.WEIGHTS_LOADED else None
    if (state, event) in TRANSITIONS:
        f.apply("w0", event, version)
        assert f.state("w0") is TRANSITIONS[(state, event)]
    else:
        with pytest.raises(InvalidTransition, match=f"{event.value!r} is not allowed in state {state.value!r}"):
            f.apply("w0", event, version)
        assert f.state("w0") is state  # unchanged


@pytest.mark.parametrize(
    "state,event",
    [(S.HEALTHY, "restart_done"), (S.HEALTHY, "restart_started"), (S.DEAD, "weights_loaded"),
     (S.RESTARTING, "weights_loaded"), (S.STALE, "restart_done"), (S.REMOVED, "call_failed"),
     (S.REMOVED, "drain"), (S.HEALTHY, "drained"), (S.RESTARTING, "drain")],
)
def test_invalid_transitions_raise(state: WorkerState, event: str) -> None:
    f = fleet(1)
    to_state(f, "w0", state)
    with pytest.raises(InvalidTransition):
        f.apply("w0", event, 3)


def test_bad_inputs() -> None:
    f = fleet(1)
    with pytest.raises(KeyError, match="unknown worker 'nope'"):
        f.call_failed("nope")
    with pytest.raises(ValueError):
        f.apply("w0", "explode")
    with pytest.raises(InvalidTransition, match="newer than the current"):
        f.weights_loaded("w0", 4)
    with pytest.raises(ValueError, match="needs the loaded version"):
        f.apply("w0", Event.WEIGHTS_LOADED)


def test_snapshot() -> None:
    f = fleet(3)
    f.call_failed("w0")
    f.drain("w1")
    snap = f.snapshot()
    assert snap["fleet/healthy"] == 1 and snap["fleet/dead"] == 1 and snap["fleet/draining"] == 1
    assert snap["fleet/failures"] == 1 and snap["fleet/schedulable"] == 1 and snap["fleet/version"] == 3


def test_late_failure_of_replaced_instance_spares_its_successor() -> None:
    f = fleet(2)
    old = f.instance("w0")
    assert old != f.instance("w1")  # instances are fleet-wide, not per id
    assert f.call_failed("w0", instance=old) is S.DEAD
    f.restart_started("w0")
    new = f.instance("w0")
    assert new != old and new != f.instance("w1")
    f.restart_done("w0")
    assert f.weights_loaded("w0", 3, instance=new) is S.HEALTHY
    # a second in-flight call of the dead predecessor fails after the replacement is up
    assert f.call_failed("w0", instance=old) is S.HEALTHY
    assert f.schedulable() == ["w0", "w1"] and f.needs_weights() == []
    assert (f.failures, f.late_reports, f.record("w0").late_reports) == (1, 1, 1)
    assert [h[1] for h in f.record("w0").history].count(Event.CALL_FAILED) == 1
    # the successor's own failure still counts
    assert f.call_failed("w0", instance=new) is S.DEAD
    assert f.snapshot()["fleet/late_reports"] == 1 and f.failures == 2


def test_late_weights_of_replaced_instance_do_not_make_successor_healthy() -> None:
    f = fleet(1)
    old = f.instance("w0")
    for ev in ("call_failed", "restart_started", "restart_done"):
        f.apply("w0", ev)
    assert f.weights_loaded("w0", 3, instance=old) is S.STALE  # the old process's load answered late
    assert f.schedulable() == [] and f.record("w0").version is None
    assert f.weights_loaded("w0", 3, instance=f.instance("w0")) is S.HEALTHY


def test_reports_about_removed_or_reused_ids_are_late() -> None:
    f = fleet(1)
    old = f.instance("w0")
    f.drain("w0")
    f.drained("w0")
    assert f.call_failed("w0", instance=old) is S.REMOVED  # no InvalidTransition: a late report
    f.add_worker("w0")  # the id is reused by a new worker: a new instance
    assert f.instance("w0") != old
    assert f.call_failed("w0", instance=old) is S.STALE
    assert f.late_reports == 2 and f.failures == 0
    with pytest.raises(InvalidTransition):  # untagged reports keep the strict table
        f.apply("w0", "restart_done")
