"""Fault tolerance on a real local Ray: rollout workers killed (SIGKILL) as sampling starts, while loading
weights and while idle cost no group; a dead reward actor stops the run with one line and a checkpoint
that ``--resume`` finishes from."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import pytest
import ray
from service_helpers import FAST_VAE_FIT, ray_down, run_config  # noqa: F401

from services import checkpoint, control
from services.driver import Run, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_down")]

TINY = [
    "sft.steps=2", "sft.batch_size=8", "task.train_size=64", "task.eval_size=4", "rollout.prompts_per_step=4",
    "rollout.group_size=4", "rollout.max_new_tokens=24", "tracking.log_images_every=0", "checkpoint.every=2",
    *FAST_VAE_FIT,
]


def _cfg(tmp_path, name: str, *extra: str):
    return run_config(tmp_path, name, TINY, *extra)


def _pid(run: Run, wid: int) -> int:
    return ray.get(run.pool.actor(wid).pid.remote())


def _kill_before_step(monkeypatch, step: int, actors_of) -> None:
    """Kill ``actors_of(run)`` (no restart) just before step ``step`` runs (after its predecessor's checkpoint)."""
    orig = control.RunSupervisor.before_step

    def before_step(self):
        orig(self)
        if self.run.step == step:
            for actor in actors_of(self.run):
                ray.kill(actor, no_restart=True)

    monkeypatch.setattr(control.RunSupervisor, "before_step", before_step)


def test_killed_rollout_workers_lose_no_group(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "faults", "algorithm.steps=4", "rollout.num_workers=2")
    run = Run(cfg, resume=False)
    pool = run.pool
    calls: list[dict] = []  # one per pool.generate: requests, trajectories, failures seen inside it
    plan: dict[str, int] = {}  # "sampling" / "sync": worker pid to kill at the next such call
    orig_generate, orig_sync = pool.generate, pool.sync

    def generate(requests, seed, overrides=None):
        before = pool.health.failures
        pid = plan.pop("sampling", None)
        if pid:  # dies as its chunk goes out: the pool learns it only from that call (a timer could fire after
            os.kill(pid, signal.SIGKILL)  # a fast sampling call had returned, and the step would not see it)
        trajs = orig_generate(requests, seed, overrides)
        held = {w: ray.get(pool.actor(w).version.remote()) for w in pool.health.schedulable()}
        calls.append({"requests": requests, "trajs": trajs, "failed": pool.health.failures - before, "held": held})
        return trajs

    def sync(handle):
        before = pool.health.failures
        pid = plan.pop("sync", None)
        if pid:
            os.kill(pid, signal.SIGKILL)
        out = orig_sync(handle)
        calls.append({"sync_failed": pool.health.failures - before})
        return out

    monkeypatch.setattr(pool, "generate", generate)
    monkeypatch.setattr(pool, "sync", sync)
    try:
        run.publish_and_sync()
        steps = []
        for step in range(4):
            assert pool.wait_ready(180)  # a replacement comes up in the background; the next kill waits for it
            wids = pool.health.schedulable()
            if step == 0:
                plan["sampling"] = _pid(run, wids[0])   # dies as its chunk is sent for sampling
            elif step == 1:
                plan["sync"] = _pid(run, wids[1])       # dies as the new weights go out after the step
            elif step == 2:
                os.kill(_pid(run, wids[0]), signal.SIGKILL)  # dies idle between steps
                time.sleep(1.0)
            n0 = len(calls)
            run.supervisor.before_step()
            m = run.rl_step()
            run.supervisor.after_step(m)
            steps.append((m, calls[n0:]))

        for step, (m, cs) in enumerate(steps):
            gen = [c for c in cs if "trajs" in c]
            assert len(gen) == 1
            c = gen[0]
            got = sorted((t.prompt_id, t.group_index) for t in c["trajs"])
            want = sorted((r["prompt_id"], g) for r in c["requests"] for g in range(cfg.rollout.group_size))
            assert got == want, f"step {step}: a group was lost or duplicated"
            for t in c["trajs"]:  # made by a worker that held exactly this version
                assert t.policy_version == c["held"][t.meta["worker_id"]] == m["policy_version"] - 1
            assert m["pool/size"] == 2
        assert steps[0][1][0]["failed"] >= 1, "the kill during sampling was not seen by that step's sampling"
        assert [c for c in steps[1][1] if "sync_failed" in c][0]["sync_failed"] >= 1
        assert steps[2][1][0]["failed"] >= 1, "the idle worker's death was not found at the next call"
        assert steps[3][1][0]["failed"] == 0
        assert pool.health.failures >= 3 and pool.health.restarts >= 3
        assert pool.wait_ready(180) and len(pool.health.schedulable()) == 2
        assert steps[-1][0]["fleet/failures"] >= 3 and steps[-1][0]["fleet/restarts"] >= 3
    finally:
        run.tracker.end()
        run.shutdown()


def test_dead_reward_actor_stops_run_then_resume_finishes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "rfail", "algorithm.steps=5", "rollout.num_workers=1")
    orig = control.RunSupervisor.before_step
    _kill_before_step(monkeypatch, 3, lambda run: [run.reward.actor])  # after the step-2 checkpoint, before step 4 scores
    with pytest.raises(SystemExit) as e:
        train(cfg)
    msg = str(e.value.code)
    assert "\n" not in msg and "reward actor failed" in msg and "--resume" in msg and "step 3" in msg, msg
    root = tmp_path / "ckpt" / "rfail"
    assert checkpoint.latest(root).name == "step-000003"  # written from the learner after the failure
    state = checkpoint.load_state(checkpoint.latest(root))
    ray.shutdown()

    monkeypatch.setattr(control.RunSupervisor, "before_step", orig)
    resumed = train(cfg, resume=True)
    assert resumed["steps"] == 5 and resumed["run_id"] == state["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(cfg.tracking.resolved_uri())
    steps = sorted(m.step for m in client.get_metric_history(resumed["run_id"], "reward/total/mean"))
    assert steps == [1, 2, 3, 4, 5]  # every step once, in the same MLflow run
    assert client.get_run(resumed["run_id"]).info.status == "FINISHED"


def test_dead_learner_stops_run_with_a_resumable_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "lfail", "algorithm.steps=4", "rollout.num_workers=1")
    _kill_before_step(monkeypatch, 3, lambda run: run.learner.workers)  # after the step-2 checkpoint
    with pytest.raises(SystemExit) as e:
        train(cfg)
    msg = str(e.value.code)
    assert "\n" not in msg and "learner failed" in msg and "--resume" in msg, msg
    latest = checkpoint.latest(tmp_path / "ckpt" / "lfail")
    assert latest.name == "step-000002"  # the learner is gone: the last periodic checkpoint
    assert checkpoint.load_state(latest)["step"] == 2
