"""Scaling that never blocks or kills, and bounded waits, on a real local Ray: a SIGSTOPped rollout worker
is declared dead after ``rollout.call_timeout_s``, killed and replaced, and its prompts are re-done with
their seeds; a late error of the replaced actor spares its successor; a scale-up whose placement cannot be
met stays pending (visible in MLflow) while steps go on and joins once it is placed; only the owner token
resizes a run, within the bounds; a failure after the learner step leaves a post-step checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from service_helpers import FAST_VAE_FIT, metric, ray_down, run_config  # noqa: F401

from policy.factory import build_policy
from recipes import get_recipe
from rollout.fleet_health import Event, WorkerState
from rollout.pool import WORKER_LOST
from services import control, scale
from services.cluster import start_ray, worker_pool
from services.driver import Run, task_dataset
from sync import make_publisher
from tasks.sampler import PromptSampler

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_down")]

BIN = Path(sys.executable).parent
TINY = [
    "sft.steps=2", "sft.batch_size=8", "task.train_size=64", "task.eval_size=4", "rollout.prompts_per_step=4",
    "rollout.group_size=2", "rollout.max_new_tokens=8", "tracking.log_images_every=0", "checkpoint.every=0",
    "algorithm.eval_every=0",
    *FAST_VAE_FIT,
]


def _gone(pid: int, timeout_s: float = 60.0) -> bool:
    """The process has exited (or is a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.2)
    return False


def _key(trajs) -> list:
    return [(t.prompt_id, t.group_index, t.input_ids.tolist()) for t in trajs]


def test_sigstopped_worker_is_declared_dead_replaced_and_late_error_spares_successor(tmp_path):
    cfg = run_config(tmp_path, "stop", TINY, "rollout.call_timeout_s=6", "rollout.start_timeout_s=120",
                     "rollout.num_workers=2", "cluster.num_cpus=3")
    start_ray(cfg)
    pool = worker_pool(cfg, 2)
    stopped = None
    try:
        policy = build_policy(cfg.model)
        pool.sync(make_publisher("object_store").publish(1, policy.trainable_state_dict().items()))
        assert sorted(pool.health.schedulable()) == [0, 1]
        items = PromptSampler(task_dataset(cfg, "train"), 4, 0).next_batch()
        reqs = get_recipe(cfg.recipe).requests(items)
        want = _key(pool.generate(reqs, seed=7))

        old_actor, old_instance = pool.actor(0), pool.health.instance(0)
        stopped = ray.get(old_actor.pid.remote(), timeout=30)
        os.kill(stopped, signal.SIGSTOP)  # hung, not dead: only the timeout can find it
        late = old_actor.version.remote()  # queued on the stopped process: fails once it is killed
        t0 = time.monotonic()
        got = pool.generate(reqs, seed=7)
        took = time.monotonic() - t0
        assert _key(got) == want, "the re-queued prompts were not re-done with their seeds"
        assert took >= cfg.rollout.call_timeout_s  # it waited for the stopped worker exactly that long ...
        assert took < cfg.rollout.call_timeout_s + 90  # ... and then went on
        rec = pool.health.record(0)
        assert Event.CALL_FAILED in [h[1] for h in rec.history] and rec.restarts == 1
        assert rec.instance != old_instance
        assert _gone(stopped), "the silent worker was not killed"
        stopped = None
        assert pool.wait_ready(120) and sorted(pool.health.schedulable()) == [0, 1]
        new_actor = pool.actor(0)
        assert ray.get(new_actor.pid.remote(), timeout=30) != stopped

        with pytest.raises(WORKER_LOST) as err:  # the replaced actor's error arrives late ...
            ray.get(late, timeout=60)
        restarts, failures = pool.health.restarts, pool.health.failures
        assert pool.worker_failed(0, old_instance, err.value) is False  # ... and spares its successor
        assert pool.actor(0) is new_actor and pool.health.state(0) is WorkerState.HEALTHY
        assert (pool.health.restarts, pool.health.failures, pool.health.late_reports) == (restarts, failures, 1)
        assert pool.metrics()["fleet/late_reports"] == 1
        assert _key(pool.generate(reqs, seed=7)) == want
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        pool.shutdown()


@ray.remote(num_cpus=1)
class _Blocker:
    """Holds one CPU of the local cluster, so a rollout worker's placement cannot be met while it lives."""

    def ping(self) -> bool:
        return True


def test_unplaceable_scale_up_stays_pending_then_joins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 4 CPUs: learner 1 + reward 0.5 + one rollout worker 1; the blocker takes 1 of the 1.5 left
    cfg = run_config(tmp_path, "pending", TINY, "rollout.num_workers=1", "rollout.autoscale.max_workers=2",
                     "cluster.num_cpus=4", "sft.enabled=false")
    run = Run(cfg, resume=False)
    blocker = _Blocker.remote()
    try:
        ray.get(blocker.ping.remote(), timeout=60)
        run.publish_and_sync()
        assert scale.scale(run="pending", rollout_workers=99) == 0  # clamped to max_workers = 2
        metrics = []
        for step in range(4):
            if step == 2:  # the CPU comes free: the pending placement is met, the worker comes up meanwhile
                ray.kill(blocker)
                assert run.pool.wait_ready(180), run.pool.metrics()
            run.supervisor.before_step()
            m = run.rl_step()
            run.supervisor.after_step(m)
            run.tracker.log_metrics(m, run.step)
            metrics.append(m)
        for m in metrics[:2]:  # steps go on with one worker; the other stays pending, visible, no error
            assert m["pool/size"] == 2 and m["pool/pending"] == 1 and m["pool/placing"] == 1
            assert m["fleet/stale"] == 1 and m["fleet/schedulable"] == 1
        for m in metrics[2:]:
            assert m["pool/pending"] == 0 and m["fleet/stale"] == 0 and m["fleet/schedulable"] == 2
        assert run.step == 4
        status = ray.get(ray.get_actor(control.actor_name("pending"), namespace=control.NAMESPACE).status.remote())
        assert status["desired"] == 2 and status["bounds"] == (1, 2)
        pending = metric(cfg.tracking.resolved_uri(), run.tracker.run_id, "pool/pending")
        assert [v for _, v in pending] == [1.0, 1.0, 0.0, 0.0]
    finally:
        run.tracker.end()
        run.shutdown()


def test_only_the_owner_token_resizes_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = run_config(tmp_path, "owned", TINY, "rollout.num_workers=1", "sft.enabled=false",
                     "rollout.autoscale.max_workers=3")
    run = Run(cfg, resume=False)
    try:
        token_file = tmp_path / "ckpt" / "owned" / control.TOKEN_FILE
        assert token_file.stat().st_mode & 0o077 == 0  # readable by the owner only
        handle = ray.get_actor(control.actor_name("owned"), namespace=control.NAMESPACE)
        with pytest.raises(control.NotOwner, match="no owner token"):
            ray.get(handle.set_rollout_workers.remote(2), timeout=30)
        with pytest.raises(control.NotOwner, match="wrong owner token"):
            ray.get(handle.set_rollout_workers.remote(2, "0" * 32), timeout=30)
        wrong = tmp_path / "wrong.token"
        wrong.write_text("f" * 32)
        env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
        env.pop(control.TOKEN_ENV, None)
        cli = [str(BIN / "unigrpo"), "scale", "--run", "owned", "--rollout-workers"]
        bad = subprocess.run([*cli, "2", "--token-file", str(wrong)], env=env, capture_output=True, text=True,
                             timeout=180)
        assert bad.returncode == 1 and "wrong owner token" in bad.stderr and str(token_file) in bad.stderr, bad.stderr
        assert ray.get(handle.status.remote())["desired"] == 1
        ok = subprocess.run([*cli, "7"], env=env, capture_output=True, text=True, timeout=180)  # the run's file
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert "1 -> 3" in ok.stdout and "clamped" in ok.stdout
        status = ray.get(handle.status.remote())
        assert status["desired"] == 3 and status["rejected"] == 3 and status["requests"] == 1
        run.supervisor.before_step()  # the driver applies it without waiting for the new workers
        assert run.pool.size == 3
    finally:
        run.tracker.end()
        run.shutdown()
