"""Run-time control of a running training: the rollout pool's size, and what happens when a core actor
(learner, reward) fails.

* ``RunControl`` is a small named Ray actor the driver starts for each run
  (``unigrpo-control-<run_name>`` in namespace ``unigrpo``, owned by the driver: it goes when the run
  goes). It holds the *desired* rollout pool size; ``unigrpo scale --run RUN --rollout-workers N``
  (``services.scale``) writes it, the driver reads it between steps.
* ``PoolController`` is the driver side: between two steps it applies the desired size (manual request
  or the optional autoscale policy from ``rollout.autoscale``) with ``RolloutPool.scale`` (new workers:
  own placement group, current weights before any prompt; removed workers: idle at that point, drained)
  and reports the applied size back.
* ``core_failure`` turns a dead learner / reward actor into one line for the user, and tells whether the
  learner can still write a checkpoint.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

log = logging.getLogger(__name__)

#: What stops a run (the rollout pool handles its own workers' deaths; these come from the learner or the
#: reward actor).
CORE_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)

NAMESPACE = "unigrpo"
PREFIX = "unigrpo-control-"


def actor_name(run_name: str) -> str:
    return f"{PREFIX}{run_name}"


class RunControl:
    """Desired rollout pool size of one run (plain class; ``start_control`` makes it a named actor)."""

    def __init__(self, run_name: str, size: int, mlflow_run_id: str | None = None) -> None:
        self.run_name = run_name
        self.mlflow_run_id = mlflow_run_id
        self.desired = int(size)
        self.applied = int(size)
        self.step = 0
        self.requests = 0  # manual requests so far (the driver sees a new one by this counter)
        self.updated = time.time()

    def set_rollout_workers(self, n: int) -> dict:
        n = int(n)
        if n < 1:
            raise ValueError(f"rollout workers must be >= 1, got {n}")
        previous, self.desired = self.desired, n
        self.requests += 1
        self.updated = time.time()
        return {"run": self.run_name, "previous": previous, "desired": n, "applied": self.applied,
                "step": self.step}

    def desired_rollout_workers(self) -> tuple[int, int]:
        """(desired size, number of manual requests so far)."""
        return self.desired, self.requests

    def report(self, applied: int, step: int, desired: int | None = None) -> None:
        """The driver applied ``applied`` workers before ``step`` (``desired``: the autoscaler's choice)."""
        self.applied, self.step = int(applied), int(step)
        if desired is not None:
            self.desired = int(desired)

    def status(self) -> dict:
        return {"run": self.run_name, "mlflow_run_id": self.mlflow_run_id, "desired": self.desired,
                "applied": self.applied, "step": self.step, "requests": self.requests, "updated": self.updated}


def start_control(run_name: str, size: int, mlflow_run_id: str | None = None) -> Any:
    """The run's named control actor (0 CPUs). A leftover one of the same name (a previous driver of this
    run that did not exit cleanly) is replaced."""
    import ray

    name = actor_name(run_name)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        for _ in range(100):  # the name is released asynchronously
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.05)
    except ValueError:
        pass
    handle = ray.remote(RunControl).options(name=name, namespace=NAMESPACE, num_cpus=0, max_concurrency=4).remote(
        run_name, size, mlflow_run_id)
    ray.get(handle.status.remote())
    return handle


# ------------------------------------------------------------------------------------- driver side
class PoolController:
    """Applies the desired pool size between steps (manual requests first, else the autoscale policy).

    Autoscale (``rollout.autoscale.enabled``): with ``f = rollout_s / (rollout_s + learn_s)`` of the last
    step, add a worker when ``f > target + band``, remove one when ``f < target - band``, within
    ``[min_workers, max_workers]``, at most one change per ``cooldown`` steps. A manual ``unigrpo scale``
    pauses the autoscaler for the rest of the run (the user's number wins).
    """

    band = 0.1
    cooldown = 2

    def __init__(self, pool: Any, cfg: Any, handle: Any) -> None:
        self.pool = pool
        self.auto = cfg.rollout.autoscale
        self.handle = handle
        self.seen_requests = 0
        self.manual = False
        self.last_change = -10**9
        self.fraction: float | None = None
        self.changes = 0

    def observe(self, metrics: dict) -> None:
        r, lrn = metrics.get("time/rollout_s"), metrics.get("time/learn_s")
        if r is not None and lrn is not None and r + lrn > 0:
            self.fraction = float(r) / float(r + lrn)

    def _autoscale_target(self, step: int) -> int | None:
        a = self.auto
        if not a.enabled or self.manual or self.fraction is None or step - self.last_change < self.cooldown:
            return None
        n = self.pool.size
        if self.fraction > a.target_rollout_fraction + self.band and n < a.max_workers:
            return n + 1
        if self.fraction < a.target_rollout_fraction - self.band and n > a.min_workers:
            return n - 1
        return None

    def apply(self, step: int) -> dict[str, float]:
        """Scale the pool to the desired size now (call between steps); returns metrics."""
        import ray

        desired, requests = ray.get(self.handle.desired_rollout_workers.remote(), timeout=30)
        target = None
        if requests != self.seen_requests:
            self.seen_requests, self.manual, target = requests, True, desired
        else:
            target = self._autoscale_target(step)
        before = self.pool.size
        if target is not None and target != before:
            t0 = time.perf_counter()
            self.pool.scale(target)
            self.last_change, self.changes = step, self.changes + 1
            log.warning("rollout pool %d -> %d workers before step %d (%s, %.1f s)", before, self.pool.size,
                        step + 1, "manual" if self.manual else "autoscale", time.perf_counter() - t0)
        self.handle.report.remote(self.pool.size, step, target if target is not None and not self.manual else None)
        m = {"pool/desired": float(target if target is not None else self.pool.size),
             "pool/scale_events": float(self.changes)}
        if self.fraction is not None:
            m["autoscale/rollout_fraction"] = self.fraction
        return m


class RunSupervisor:
    """What the driver loop calls around each GRPO step: ``before_step`` (remember the sampler / RNG
    position, apply the pool size), ``after_step`` (autoscale input, pool metrics) and ``failed`` (a core
    actor died: write a resumable checkpoint when the learner still can, return the one-line message)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        self.pool = PoolController(run.pool, run.cfg,
                                   start_control(run.cfg.run_name, run.pool.size, run.tracker.run_id))
        self._start: tuple | None = None
        self._metrics: dict[str, float] = {}

    def before_step(self) -> None:
        from services import checkpoint

        r = self.run
        self._start = (r.step, r.served_sampler_state(), checkpoint.rng_state())
        self._metrics = self.pool.apply(r.step)

    def after_step(self, metrics: dict) -> None:
        metrics.update(self._metrics)
        metrics["pool/size"] = float(self.run.pool.size)
        self.pool.observe(metrics)

    def failed(self, exc: BaseException) -> str:
        """The message to stop the run with (after saving what can be saved)."""
        from services import checkpoint

        r = self.run
        who, learner_ok = core_failure(r, exc)
        saved = None
        if learner_ok and self._start is not None and self._start[0] == r.step:
            # the step that failed has not reached the learner: its prompts are re-done on resume
            if not (r.ckpt_root / f"step-{r.step:06d}" / checkpoint.MARKER).exists():
                try:
                    r.sampler.load_state_dict(self._start[1])
                    r.sampler_before_prefetch = None
                    checkpoint.restore_rng(self._start[2])
                    saved = r.save()
                except Exception as e:  # noqa: BLE001 - fall back to the last periodic checkpoint
                    log.warning("could not save a checkpoint after the failure: %s", one_line(e))
        latest = saved or checkpoint.latest(r.ckpt_root)
        where = (f"resume from {latest} with `unigrpo train --resume` (same config)" if latest
                 else "no checkpoint to resume from yet")
        return (f"run {r.cfg.run_name!r} stopped at step {r.step}: the {who} failed ({one_line(exc)}); "
                f"{where}")


def core_failure(run: Any, exc: BaseException) -> tuple[str, bool]:
    """Which core actor failed (``"reward actor"``, ``"learner"``, or ``"a Ray actor"``) and whether the
    learner still answers (so a checkpoint can be written from it)."""
    import ray

    def alive(handles: list) -> bool:
        try:
            ray.get([h.__ray_ready__.remote() for h in handles], timeout=15)
            return True
        except Exception:  # noqa: BLE001 - any failure means "not usable"
            return False

    learner_ok = alive(list(run.learner.workers))
    reward = getattr(run, "reward", None)
    reward_ok = reward.alive() if reward is not None else True
    if not learner_ok:
        who = "learner"
    elif not reward_ok or "reward" in str(exc).lower():
        who = "reward actor"
    else:
        who = "Ray actor"
    return who, learner_ok


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    first = text.split(" Traceback")[0]
    return f"{type(exc).__name__}: {first[:200]}"
