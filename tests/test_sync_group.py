"""The collective weight group (``learner.sync.backend: nccl``; gloo on CPU, the same code) on real Ray
actors: the learner's rank 0 broadcasts, rollout workers receive; the group is rebuilt when its
membership changes; a member killed during a broadcast fails that sync within the timeout, never a hang."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray
from service_helpers import FAST_VAE_FIT, ray_down  # noqa: F401

from learner.group import LearnerGroup
from rollout.interleaved import RolloutSettings
from rollout.worker import RolloutWorker
from services.config import load_config
from sync import WeightSyncTimeout
from sync.group import CollectiveGroup, GroupBuildError, GroupMember

TIMEOUT_S = 8.0
pytestmark = pytest.mark.slow


def _worker(cfg, wid):
    return ray.remote(RolloutWorker).options(num_cpus=0.5).remote(
        wid, cfg.model, RolloutSettings(group_size=2, max_new_tokens=4), "hf", None, "nccl")


def _sync(learner, group, workers):
    """One broadcast to ``workers`` (the group's members); the version they hold."""
    handle = group.stamp(learner.publish())  # staged on the learner, addressed to the group
    loads = [w.update_weights.remote(handle, TIMEOUT_S) for w in workers]
    done = group.send(handle, TIMEOUT_S)
    versions = ray.get(loads, timeout=3 * TIMEOUT_S)
    ray.get(done, timeout=3 * TIMEOUT_S)
    assert handle.backend == "gloo" and handle.group["name"] == f"unigrpo_weights_{group.epoch}"
    return versions, handle.version


def test_group_broadcasts_rebuilds_and_survives_a_killed_member(local_ray):
    cfg = load_config(None, ["learner.sync.backend=nccl"])
    learner = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    workers = {i: _worker(cfg, i) for i in range(3)}
    try:
        ray.get([w.weights_digest.remote() for w in workers.values()], timeout=300)  # every actor is up
        learner.call("weights_digest")
        group = CollectiveGroup(learner.workers[0], TIMEOUT_S)
        members = lambda ids: [GroupMember(("rollout", i), workers[i]) for i in ids]  # noqa: E731
        assert group.ensure(members([0, 1])) and not group.ensure(members([0, 1]))
        versions, v = _sync(learner, group, [workers[0], workers[1]])
        assert versions == [v, v] == [1, 1]
        digest = learner.call("weights_digest")
        assert all(ray.get(workers[i].weights_digest.remote(), timeout=30) == digest for i in (0, 1))

        # the pool grows: a new membership, a new group; the newcomer gets the current weights
        assert group.ensure(members([0, 1, 2])) and group.epoch == 2
        versions, v = _sync(learner, group, list(workers.values()))
        assert versions == [2, 2, 2]

        # a member dies after the version is staged: the publisher's send fails within the timeout
        pid = ray.get(workers[1].__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        handle = group.stamp(learner.publish())
        os.kill(pid, signal.SIGKILL)
        live = [workers[0].update_weights.remote(handle, TIMEOUT_S), workers[2].update_weights.remote(handle, TIMEOUT_S)]
        t0 = time.monotonic()
        with pytest.raises(WeightSyncTimeout):
            ray.get(group.send(handle, TIMEOUT_S), timeout=4 * TIMEOUT_S)
        assert time.monotonic() - t0 < 3 * TIMEOUT_S
        ray.wait(live, num_returns=2, timeout=3 * TIMEOUT_S)  # each returns or fails by its own timeout
        group.invalidate()

        # a build that includes the dead member names it as lost (the others only waited for it)
        with pytest.raises(GroupBuildError) as err:
            group.ensure(members([0, 1, 2]))
        assert err.value.lost == {("rollout", 1)}

        # the run goes on without it: a new group, every live member at the learner's version
        assert group.ensure(members([0, 2]))
        versions, v = _sync(learner, group, [workers[0], workers[2]])
        assert versions == [v, v] and v == handle.version + 1
        digest = learner.call("weights_digest")
        assert all(ray.get(workers[i].weights_digest.remote(), timeout=30) == digest for i in (0, 2))
    finally:
        learner.shutdown()
        for w in workers.values():
            ray.kill(w)


def test_training_run_over_the_collective_group_scales_and_survives_a_kill(tmp_path, monkeypatch, ray_down):  # noqa: F811
    """A whole Run with ``learner.sync.backend: nccl`` (gloo here): scale 1 -> 2 -> 1, a worker SIGKILLed
    just before a broadcast; after every sync each member of the group holds the learner's weights."""
    from service_helpers import run_config

    from services import scale
    from services.driver import Run

    ray.shutdown()  # this test starts its own cluster through the Run
    monkeypatch.chdir(tmp_path)
    cfg = run_config(tmp_path, "collective", [
        *FAST_VAE_FIT, "sft.enabled=false", "task.train_size=64", "task.eval_size=4", "rollout.prompts_per_step=2",
        "rollout.group_size=4", "rollout.max_new_tokens=8", "tracking.log_images_every=0", "checkpoint.every=0",
        "rollout.num_workers=1", "learner.sync.backend=nccl", "learner.sync.timeout_s=10",
        "rollout.autoscale.max_workers=2", "cluster.num_cpus=4"])
    run = Run(cfg, resume=False)
    checks: list[tuple[int, int, bool]] = []

    def check():
        learner = run.learner.call("weights_digest")
        members = [k[1] for k in run.sync_group.keys if k[0] == "rollout"]
        digests = [ray.get(run.pool.actor(w).weights_digest.remote(), timeout=60) for w in members]
        checks.append((run.version, len(members), all(d == learner for d in digests)))

    try:
        run.publish_and_sync()
        check()
        assert scale.scale(run="collective", rollout_workers=2) == 0
        run.supervisor.before_step()  # the new worker comes up in the background while this step runs
        run.supervisor.after_step(run.rl_step())
        check()
        deadline = time.monotonic() + 300
        while len(run.pool.joinable()) < 2 and time.monotonic() < deadline:
            time.sleep(2)
        run.supervisor.before_step()  # built: the next sync's group takes it
        run.supervisor.after_step(run.rl_step())
        check()
        assert checks[-1][1] == 2, checks
        pid = ray.get(run.pool.actor(0).__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        os.kill(pid, signal.SIGKILL)  # dies in the group: the next broadcast fails and is sent again
        run.supervisor.before_step()
        m = run.rl_step()
        run.supervisor.after_step(m)
        check()
        assert checks[-1][1] >= 1 and run.pool.health.record(0).history  # worker 0 was replaced
        assert scale.scale(run="collective", rollout_workers=1) == 0
        run.supervisor.before_step()
        run.supervisor.after_step(run.rl_step())
        check()
        assert checks[-1][1] == 1
        assert all(same for _, _, same in checks), checks
        assert [v for v, _, _ in checks] == list(range(1, len(checks) + 1))
    finally:
        run.tracker.end()
        run.shutdown()


ASYNC_GVU = [*FAST_VAE_FIT, "sft.enabled=false", "task.train_size=64", "task.eval_size=4", "rollout.prompts_per_step=2",
             "rollout.group_size=4", "tracking.log_images_every=0", "algorithm.steps=3", "checkpoint.every=3",
             "algorithm.eval_every=0", "algorithm.mode=async", "algorithm.max_staleness=2",
             "learner.sync.timeout_s=30", "cluster.num_cpus=4"]


def test_async_run_over_the_collective_group_delivers_each_version_exactly(tmp_path, monkeypatch, ray_down):  # noqa: F811
    """Async GvU (max_staleness 2: deliveries run on the pipeline thread while the learner trains on): over
    the group (gloo), after each version's delivery every rollout worker and the reward actor hold exactly
    that version's weights (the learner's digest when it published it); the learner publishes the same
    weights at every version, and ends with the same weights, as over the object store."""
    from safetensors.torch import load_file
    from service_helpers import run_config

    from services import checkpoint, driver

    config = str(Path(__file__).resolve().parents[1] / "configs" / "gvu_tiny.yaml")
    publish, deliver = driver.Run.publish, driver.Run.deliver
    published: dict[str, dict[int, dict]] = {}
    delivered: dict[str, list[tuple[int, int, list[int], list[dict]]]] = {}

    def spy_publish(self, bump: bool = True):
        handle = publish(self, bump)  # between two train calls: the learner holds this version
        published[self.cfg.learner.sync.backend][handle.version] = self.learner.call("weights_digest")
        return handle

    def spy_deliver(self, handle):
        if threading.current_thread() is not threading.main_thread() and handle.version <= self.cfg.algorithm.steps:
            # the pipeline's delivery of v waits until the learner has trained the next step and published
            # v + 1 (it trains on the batch queued before it): what v's members load must still be v
            deadline = time.monotonic() + 120
            while self.version <= handle.version and time.monotonic() < deadline:
                time.sleep(0.05)
        learner = self.version
        deliver(self, handle)  # on the pipeline thread: nothing else reaches the holders until its next job
        holders = [self.pool.actor(w) for w in self.pool.health.schedulable()] + [self.reward.actor]
        delivered[self.cfg.learner.sync.backend].append(
            (handle.version, learner, ray.get([a.version.remote() for a in holders], timeout=60),
             ray.get([a.weights_digest.remote() for a in holders], timeout=60)))

    monkeypatch.setattr(driver.Run, "publish", spy_publish)
    monkeypatch.setattr(driver.Run, "deliver", spy_deliver)
    monkeypatch.chdir(tmp_path)
    final = {}
    for backend in ("nccl", "object_store"):
        published[backend], delivered[backend] = {}, []
        cfg = run_config(tmp_path / backend, backend, ASYNC_GVU, f"learner.sync.backend={backend}", config=config)
        assert driver.train(cfg)["steps"] == 3
        ray.shutdown()
        final[backend] = checkpoint.latest(tmp_path / backend / "ckpt" / backend)

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-6 * (1 + abs(b[k])) for k in b)

    for backend in ("nccl", "object_store"):
        assert [v for v, *_ in delivered[backend]] == [1, 2, 3, 4], delivered[backend]
        for version, _, versions, digests in delivered[backend]:
            assert versions == [version] * (cfg.rollout.num_workers + 1)  # the rollout workers and the reward
            assert all(same(d, published[backend][version]) for d in digests), (backend, version)
    # versions 2 and 3 were delivered after the learner had published the next one, whose weights differ
    assert [(v, learner > v) for v, learner, *_ in delivered["nccl"]] == [(1, False), (2, True), (3, True), (4, False)]
    assert not any(same(published["nccl"][v], published["nccl"][v + 1]) for v in (1, 2, 3))
    assert all(same(published["nccl"][v], published["object_store"][v]) for v in (1, 2, 3, 4))
    assert final["nccl"].name == final["object_store"].name == "step-000003"
    for sub in ("lm", "generator"):
        a = load_file(next((final["nccl"] / "policy" / sub).glob("*.safetensors")))
        b = load_file(next((final["object_store"] / "policy" / sub).glob("*.safetensors")))
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a), sub
