"""Run-time control of a running training: the rollout pool's size, and what happens when a core actor
(learner, reward) fails.

* ``RunControl`` is a small named Ray actor the driver starts for each run
  (``unigrpo-control-<run_name>`` in namespace ``unigrpo``, owned by the driver: it goes when the run
  goes). It holds the *desired* rollout pool size; ``unigrpo scale --run RUN --rollout-workers N``
  (``services.scale``) writes it, the driver reads it between steps. Only the run's owner can: every
  change carries the owner token the run writes to ``<checkpoint.dir>/<run_name>/owner.token`` (mode 0600)
  at start; a request is clamped to the pool size bounds (``rollout.autoscale.min_workers`` /
  ``max_workers``).
* ``PoolController`` is the driver side: between two steps it applies the desired size (manual request
  or the optional autoscale policy from ``rollout.autoscale``) with ``RolloutPool.scale``, which never
  waits for a new worker (it comes up in the background and joins once it holds the current weights;
  removed workers are idle at that point and drained), and reports the applied size back.
* ``RunSupervisor.save_consistent`` writes the checkpoint a stopped run resumes from: the learner's state
  with the sampler position and step count that match it (before the learner step: the step's start;
  after it: the step just trained; during it: none, the last complete checkpoint stays); async mode also
  carries the batches in flight generated under older versions (``services.inflight``).
* ``core_failure`` turns a dead learner / reward actor into one line for the user, and tells whether the
  learner can still write a checkpoint.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

log = logging.getLogger(__name__)

#: What stops a run (the rollout pool handles its own workers' deaths; these come from the learner or the
#: reward actor).
CORE_FAILURES = (RayActorError, ActorDiedError, ActorUnavailableError)

NAMESPACE = "unigrpo"
PREFIX = "unigrpo-control-"
TOKEN_FILE = "owner.token"  # beside the run's checkpoints: <checkpoint.dir>/<run_name>/owner.token
TOKEN_ENV = "UNIGRPO_RUN_TOKEN"  # `unigrpo scale` also takes the token from here


class NotOwner(PermissionError):
    """A resize request without the run's owner token."""


def write_owner_token(run_dir: str | os.PathLike[str]) -> tuple[str, Path]:
    """A fresh owner token in ``run_dir/owner.token`` (readable by this user only); (token, its path)."""
    path = Path(run_dir).resolve() / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(16)
    tmp = path.with_name(f".{TOKEN_FILE}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.replace(tmp, path)
    return token, path


def actor_name(run_name: str) -> str:
    return f"{PREFIX}{run_name}"


class RunControl:
    """Desired rollout pool size of one run (plain class; ``start_control`` makes it a named actor).

    ``token``: the owner token every change must carry (None: no check); ``bounds``: (min, max) pool size
    a request is clamped to; ``token_file``: where the owner finds the token (shown in errors and status)."""

    def __init__(self, run_name: str, size: int, mlflow_run_id: str | None = None, token: str | None = None,
                 bounds: tuple[int, int] = (1, 2**31 - 1), token_file: str | None = None) -> None:
        self.run_name = run_name
        self.mlflow_run_id = mlflow_run_id
        self.desired = int(size)
        self.applied = int(size)
        self.step = 0
        self.requests = 0  # manual requests so far (the driver sees a new one by this counter)
        self.updated = time.time()
        self._token = token
        self.bounds = (int(bounds[0]), int(bounds[1]))
        self.token_file = token_file
        self.rejected = 0  # requests without the owner token

    def _check(self, token: str | None) -> None:
        if self._token is not None and not (token and secrets.compare_digest(str(token), self._token)):
            self.rejected += 1
            where = f" (the owner's token is in {self.token_file})" if self.token_file else ""
            raise NotOwner(f"run {self.run_name!r}: {'wrong' if token else 'no'} owner token; only the run's "
                           f"owner can resize it{where}")

    def set_rollout_workers(self, n: int, token: str | None = None) -> dict:
        """Set the desired size (clamped to ``bounds``); raises NotOwner without the owner token."""
        self._check(token)
        n = int(n)
        if n < 1:
            raise ValueError(f"rollout workers must be >= 1, got {n}")
        lo, hi = self.bounds
        previous, self.desired = self.desired, min(max(n, lo), hi)
        self.requests += 1
        self.updated = time.time()
        return {"run": self.run_name, "previous": previous, "requested": n, "desired": self.desired,
                "clamped": self.desired != n, "bounds": self.bounds, "applied": self.applied, "step": self.step}

    def desired_rollout_workers(self) -> tuple[int, int]:
        """(desired size, number of manual requests so far)."""
        return self.desired, self.requests

    def report(self, applied: int, step: int, desired: int | None = None, token: str | None = None) -> None:
        """The driver applied ``applied`` workers before ``step`` (``desired``: the autoscaler's choice)."""
        self._check(token)
        self.applied, self.step = int(applied), int(step)
        if desired is not None:
            self.desired = int(desired)

    def status(self) -> dict:
        return {"run": self.run_name, "mlflow_run_id": self.mlflow_run_id, "desired": self.desired,
                "applied": self.applied, "step": self.step, "requests": self.requests, "updated": self.updated,
                "bounds": self.bounds, "token_file": self.token_file, "rejected": self.rejected}


def start_control(run_name: str, size: int, mlflow_run_id: str | None = None, token: str | None = None,
                  bounds: tuple[int, int] = (1, 2**31 - 1), token_file: str | None = None) -> Any:
    """The run's named control actor (0 CPUs; arguments as ``RunControl``). A leftover one of the same name
    (a previous driver of this run that did not exit cleanly) is replaced."""
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
        run_name, size, mlflow_run_id, token, bounds, token_file)
    ray.get(handle.status.remote(), timeout=120)
    return handle


# ------------------------------------------------------------------------------------- driver side
class PoolController:
    """Applies the desired pool size between steps (manual requests first, else the autoscale policy).

    Autoscale (``rollout.autoscale.enabled``): with ``f = rollout_s / (rollout_s + learn_s)`` of the last
    step, add a worker when ``f > target + band``, remove one when ``f < target - band``, within
    ``[min_workers, max_workers]``, at most one change per ``cooldown`` steps. A manual ``unigrpo scale``
    pauses the autoscaler for the rest of the run (the user's number wins). No worker is added while one is
    still coming up (``pool.pending``). Every target is clamped to the bounds; the control actor's answer
    is waited for at most ``rollout.call_timeout_s`` (no answer: no change this step).
    """

    band = 0.1
    cooldown = 2

    def __init__(self, pool: Any, cfg: Any, handle: Any, token: str | None = None) -> None:
        self.pool = pool
        self.auto = cfg.rollout.autoscale
        self.timeout_s = cfg.rollout.call_timeout_s
        self.handle = handle
        self.token = token
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
        if self.fraction > a.target_rollout_fraction + self.band and n < a.max_workers and not self.pool.pending:
            return n + 1
        if self.fraction < a.target_rollout_fraction - self.band and n > a.min_workers:
            return n - 1
        return None

    def apply(self, step: int) -> dict[str, float]:
        """Scale the pool to the desired size now (call between steps); returns metrics."""
        import ray

        try:
            desired, requests = ray.get(self.handle.desired_rollout_workers.remote(), timeout=self.timeout_s)
        except (ray.exceptions.GetTimeoutError, *CORE_FAILURES) as e:
            log.warning("the run's control actor did not answer (%s); pool size unchanged this step", one_line(e))
            desired, requests = self.pool.size, self.seen_requests
        target = None
        if requests != self.seen_requests:
            self.seen_requests, self.manual, target = requests, True, desired
        else:
            target = self._autoscale_target(step)
        if target is not None:
            target = min(max(target, self.auto.min_workers), self.auto.max_workers)
        before = self.pool.size
        if target is not None and target != before:
            t0 = time.perf_counter()
            self.pool.scale(target)
            self.last_change, self.changes = step, self.changes + 1
            log.warning("rollout pool %d -> %d workers before step %d (%s, %.1f s; new workers join once they "
                        "hold the weights)", before, self.pool.size, step + 1,
                        "manual" if self.manual else "autoscale", time.perf_counter() - t0)
        self.handle.report.remote(self.pool.size, step, target if target is not None and not self.manual else None,
                                  self.token)
        m = {"pool/desired": float(target if target is not None else self.pool.size),
             "pool/scale_events": float(self.changes)}
        if self.fraction is not None:
            m["autoscale/rollout_fraction"] = self.fraction
        return m


class RunSupervisor:
    """What the driver loop calls around each GRPO step: ``before_step`` (remember the sampler / RNG
    position, apply the pool size), ``after_step`` (autoscale input, pool metrics), ``save_consistent``
    and ``failed`` (something stopped the run: write a resumable checkpoint when the learner still can,
    return the one-line message).

    ``run.phase`` says what the learner holds: ``setup`` (before the first sync: nothing to save),
    ``rollout`` (the step started, the learner not called yet: pre-step state), ``learn`` (the learner
    step in flight: unknown) and ``done`` (the learner holds the state of ``run.step`` completed steps)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        a = run.cfg.rollout.autoscale
        token, path = write_owner_token(run.ckpt_root)
        handle = start_control(run.cfg.run_name, run.pool.size, run.tracker.run_id, token,
                               (a.min_workers, a.max_workers), str(path))
        self.pool = PoolController(run.pool, run.cfg, handle, token)
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

    def save_consistent(self) -> Path | None:
        """Write a checkpoint that matches what the learner holds (``run.phase``), unless one of that step
        exists; returns its directory, or None when the learner's state is unknown or not set up yet.
        Raises what ``run.save()`` raises (e.g. the learner is gone)."""
        from services import checkpoint

        r = self.run
        phase = getattr(r, "phase", "done")
        wait_s = None
        if phase == "rollout":
            # the step has not reached the learner: back to its start, its prompts are re-done on resume
            # (async: the batches in flight that are done already are carried, the pipeline is not waited on)
            if self._start is None or self._start[0] != r.step:
                return None
            r.sampler.load_state_dict(self._start[1])
            checkpoint.restore_rng(self._start[2])
            wait_s = 0.0
        elif phase != "done":
            return None
        done = r.ckpt_root / f"step-{r.step:06d}"
        if (done / checkpoint.MARKER).exists():
            return done
        return r.save(wait_s)

    def failed(self, exc: BaseException) -> str:
        """The message to stop the run with (after saving what can be saved)."""
        from services import checkpoint

        r = self.run
        who, learner_ok = core_failure(r, exc)
        saved = None
        if learner_ok:
            try:
                saved = self.save_consistent()
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
    elif isinstance(exc, CORE_FAILURES):
        who = "Ray actor"
    else:
        who = "step"
    return who, learner_ok


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    first = text.split(" Traceback")[0]
    return f"{type(exc).__name__}: {first[:200]}"
