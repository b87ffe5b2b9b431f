"""The training service end to end on real components: a local Ray cluster, DeepSpeed on CPU, MLflow on a
temporary SQLite file. Runs are tiny (a few SFT and GRPO steps)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import ray
from safetensors.torch import load_file
from service_helpers import FAST_VAE_FIT, metric, ray_down, run_config  # noqa: F401

from recipes.clear import clear_request
from services import checkpoint, inflight, stop
from services.driver import Run, train
from sync import WeightSyncError

TINY = [
    "sft.steps=4", "sft.batch_size=8", "task.train_size=64", "task.eval_size=4", "rollout.prompts_per_step=4",
    "rollout.group_size=4", "rollout.max_new_tokens=12", "tracking.log_images_every=1", "checkpoint.every=2",
    *FAST_VAE_FIT,
]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_down")]


def _cfg(tmp_path, name: str, *extra: str, config: str | None = None):
    return run_config(tmp_path, name, TINY, *extra, config=config)


def test_train_logs_metrics_images_and_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # checkpoint.every=0: the final policy logged for the registry is a checkpoint written for it
    cfg = _cfg(tmp_path, "e2e", "algorithm.steps=2", "algorithm.eval_every=1", "checkpoint.every=0",
               "tracking.log_model=registered")
    summary = train(cfg)
    uri = cfg.tracking.resolved_uri()
    rid = summary["run_id"]
    assert summary["steps"] == 2
    for key in ("reward/total/mean", "reward/answer/mean", "reward/format/mean", "accuracy", "rollout/trigger_rate",
                "time/rollout_s", "time/reward_s", "time/learn_s", "time/sync_s", "samples_per_s",
                "rollout/version_lag", "pool/size", "sft/text_ce"):
        assert metric(uri, rid, key), key
    assert [s for s, _ in metric(uri, rid, "reward/total/mean")] == [1, 2]
    assert [s for s, _ in metric(uri, rid, "eval/severity3/accuracy")] == [0, 1, 2]  # stage 1, every step, final
    client = mlflow.tracking.MlflowClient(uri)
    arts = {a.path for a in client.list_artifacts(rid)} | {a.path for d in ("samples", "plots", "config")
                                                           for a in client.list_artifacts(rid, d)}
    assert "config/resolved.yaml" in arts and "plots/reward_curve.png" in arts
    assert any(p.startswith("samples/") and p.endswith(".png") for p in arts)
    assert (tmp_path / "runs" / "e2e" / "reward_curve.png").stat().st_size > 1000
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"):
        assert metric(uri, rid, key), key  # MLflow's system metrics of the driver node
    final = checkpoint.latest(tmp_path / "ckpt" / "e2e")
    assert final is not None and final.name == "step-000002"
    logged = {a.path for d in ("policy", "policy/lm") for a in client.list_artifacts(rid, d)}
    assert {"policy/config.json", "policy/lm"} <= logged and any(p.endswith(".safetensors") for p in logged)
    version = client.get_model_version("e2e", "1")
    assert version.run_id == rid and version.source.endswith("/policy")
    assert client.get_run(rid).data.tags["policy_model"] == "models:/e2e/1"


def test_weights_reach_workers_and_killed_worker_loses_no_group(tmp_path):
    cfg = _cfg(tmp_path, "sync", "algorithm.steps=1")
    run = Run(cfg, resume=False)
    try:
        run.publish_and_sync()
        m = run.rl_step()
        assert m["policy_version"] == 2
        learner = run.learner.call("weights_digest")
        for wid in run.pool.health.schedulable():
            assert ray.get(run.pool.actor(wid).version.remote()) == 2
            worker = ray.get(run.pool.actor(wid).weights_digest.remote())
            assert worker.keys() == learner.keys()
            assert all(abs(worker[k] - learner[k]) <= 1e-6 * (1 + abs(learner[k])) for k in learner)

        items = run.sampler.next_batch()
        requests = [clear_request(i) for i in items]
        # the worker dies inside the step: the pool still counts it healthy when it hands out prompts
        ray.kill(run.pool.actor(run.pool.health.schedulable()[0]), no_restart=True)
        trajs = run.pool.generate(requests, seed=5)
        got = sorted((tr.prompt_id, tr.group_index) for tr in trajs)
        want = sorted((r["prompt_id"], g) for r in requests for g in range(cfg.rollout.group_size))
        assert got == want  # every group, once
        assert run.pool.health.failures >= 1 and run.pool.health.restarts >= 1
        assert run.pool.wait_ready(180)  # the replacement comes up in the background, with the current weights
        assert len(run.pool.health.schedulable()) == cfg.rollout.num_workers
        assert all(tr.policy_version == 2 for tr in trajs)
    finally:
        run.tracker.end()
        run.shutdown()


# zero-variance groups kept: every step trains (the tiny policy's groups often all agree), under KL
DISTRIBUTED_KL = ("learner.num_workers=2", "learner.zero_stage=3", "algorithm.beta_text=0.05",
                  "algorithm.beta_img=0.05", "algorithm.zero_variance=zero")


ASYNC_PIPELINE = ("algorithm.mode=async", "algorithm.max_staleness=2", "tracking.log_images_every=0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """``get(variant)``: the uninterrupted 4-step run the resume tests compare with (its directory and
    summary), run once per variant for the module."""
    done: dict[tuple, tuple] = {}

    def get(variant: tuple, config: str | None = None):
        if (variant, config) not in done:
            d = tmp_path_factory.mktemp("full")
            with pytest.MonkeyPatch.context() as mp:
                mp.chdir(d)
                done[variant, config] = d, train(_cfg(d, "full", "algorithm.steps=4", *variant, config=config))
            ray.shutdown()
        return done[variant, config]

    return get


def _assert_same_final_weights(a, b) -> None:
    """Two runs' last checkpoints hold the same policy (every tensor within 1e-6)."""
    a, b = checkpoint.latest(a), checkpoint.latest(b)
    assert a.name == b.name == "step-000004"
    for sub in ("lm", "generator"):
        wa = load_file(next((a / "policy" / sub).glob("*.safetensors")))
        wb = load_file(next((b / "policy" / sub).glob("*.safetensors")))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert (wa[k] - wb[k]).abs().max() <= 1e-6, k


@pytest.mark.parametrize("variant", [(), DISTRIBUTED_KL, ASYNC_PIPELINE],
                         ids=["one-rank", "two-ranks-zero3-kl", "async-depth-2"])
def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch, variant, uninterrupted):
    """Resume equals the uninterrupted run: weights, sampler, RNG, MLflow run; with two ZeRO-3 ranks and
    KL terms on too (the KL reference comes back from the checkpoint)."""
    monkeypatch.chdir(tmp_path)
    full_dir, full = uninterrupted(variant)
    train(_cfg(tmp_path / "b", "split", "algorithm.steps=2", *variant))
    ray.shutdown()
    resumed_cfg = _cfg(tmp_path / "b", "split", "algorithm.steps=4", *variant)
    resumed = train(resumed_cfg, resume=True)
    assert resumed["steps"] == 4
    b = checkpoint.latest(tmp_path / "b" / "ckpt" / "split")
    _assert_same_final_weights(full_dir / "ckpt" / "full", tmp_path / "b" / "ckpt" / "split")
    ua, ub = _cfg(full_dir, "full").tracking.resolved_uri(), resumed_cfg.tracking.resolved_uri()
    assert resumed["run_id"] == checkpoint.load_state(b)["mlflow_run_id"]
    assert not mlflow.tracking.MlflowClient(ua).list_artifacts(full["run_id"], "policy")  # log_model: none
    rb = _assert_same_metrics(ua, full["run_id"], ub, resumed["run_id"])
    if variant is DISTRIBUTED_KL:
        # every step trained under the KL terms (tests/test_learner.py checks the restored reference itself)
        assert rb["learn/trained_samples"] > 0 and "text/kl_ref" in rb and (b / "kl_reference.safetensors").exists()


def _assert_same_metrics(ua: str, full_id: str, ub: str, resumed_id: str) -> dict:
    """The resumed run continued the same MLflow run (steps 1-4) and logged what the uninterrupted run logged
    (the latest value of every key but timings, within 1e-5); the resumed run's latest metrics."""
    ma = dict(metric(ua, full_id, "reward/total/mean"))
    mb = dict(metric(ub, resumed_id, "reward/total/mean"))
    assert sorted(mb) == [1, 2, 3, 4]
    assert ma[4] == pytest.approx(mb[4], abs=1e-6)
    ra = mlflow.tracking.MlflowClient(ua).get_run(full_id).data.metrics  # latest value of each key
    rb = mlflow.tracking.MlflowClient(ub).get_run(resumed_id).data.metrics
    timing = ("time/", "samples_per_s", "eval/", "learn/time_s", "autoscale/", "system/")  # system: the machine
    compared = [k for k in ra if not k.startswith(timing) and not k.endswith(("time_per_sample_s", "seconds")) and "sft/" not in k]
    assert len(compared) > 10
    for k in compared:
        assert ra[k] == pytest.approx(rb[k], abs=1e-5), k
    return rb


# nothing bounds the pipeline before step 4: with max_staleness 2, batches 3 and 4 are in flight after step 2
ASYNC_DEEP = (*ASYNC_PIPELINE, "checkpoint.every=4")
# GvU: a continuous reward (the policy's own understanding), so every group has an advantage and every step
# moves the generator's weights by what its batch holds (the tiny CLEAR policy's groups mostly all agree)
GVU_TINY = str(Path(__file__).resolve().parents[1] / "configs" / "gvu_tiny.yaml")


def test_async_sigterm_mid_pipeline_resumes_to_the_same_weights(tmp_path, monkeypatch, uninterrupted):
    """SIGTERM after step 2 of an async GvU run (max_staleness 2): batches 3 and 4, generated under versions
    1 and 2 (older than the learner's 3), are in flight; the checkpoint written on the way out carries them,
    and the resumed run trains them as they were (same trajectories, same version lag), ending with the
    uninterrupted run's weights and metrics."""
    monkeypatch.chdir(tmp_path)
    full_dir, full = uninterrupted(ASYNC_DEEP, GVU_TINY)
    rl_step = Run.rl_step

    def sigterm_after_step_2(self):
        m = rl_step(self)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # held by the step guard until the step ends
        return m

    monkeypatch.setattr(Run, "rl_step", sigterm_after_step_2)
    cfg = _cfg(tmp_path, "split", "algorithm.steps=4", *ASYNC_DEEP, config=GVU_TINY)
    with pytest.raises(stop.Interrupted, match="interrupted at step 2") as e:
        train(cfg)
    assert e.value.exit_code == 128 + signal.SIGTERM
    root = tmp_path / "ckpt" / "split"
    saved = checkpoint.latest(root)
    assert saved.name == "step-000002"
    state = checkpoint.load_state(saved)
    assert state["policy_version"] == 3 and state["carried_steps"] == [2, 3]
    carried = inflight.read(saved)
    assert [(b.step, b.version) for b in carried] == [(2, 1), (3, 2)]
    assert all(t.policy_version == b.version for b in carried for t in b.trajectories)
    assert all(len(b.trajectories) == cfg.rollout.prompts_per_step * cfg.rollout.group_size for b in carried)
    # the sampler resumes before batch 3: its prompts (and batch 4's) are drawn again and matched by id
    assert state["sampler"]["position"] + state["sampler"]["epoch"] * state["sampler"]["dataset_len"] == \
        2 * cfg.rollout.prompts_per_step
    monkeypatch.setattr(Run, "rl_step", rl_step)
    resumed = train(cfg, resume=True)
    assert resumed["steps"] == 4 and resumed["run_id"] == state["mlflow_run_id"]
    _assert_same_final_weights(full_dir / "ckpt" / "full", root)
    ua, ub = _cfg(full_dir, "full", config=GVU_TINY).tracking.resolved_uri(), cfg.tracking.resolved_uri()
    lag = [v for _, v in metric(ub, resumed["run_id"], "rollout/version_lag")]
    assert lag == [v for _, v in metric(ua, full["run_id"], "rollout/version_lag")] == [0, 1, 2, 2], lag
    # the behaviour log-probs trained on are those of versions 1 and 2 (the learner's own log-probs differ
    # from them by as much as in the uninterrupted run), not of the resumed weights
    for key in ("learn/logp_gap_image", "learn/trained_samples", "reward/total/mean", "reward/gvu/std"):
        ha, hb = dict(metric(ua, full["run_id"], key)), dict(metric(ub, resumed["run_id"], key))
        assert sorted(ha) == sorted(hb) == [1, 2, 3, 4], key
        assert all(hb[s] == pytest.approx(ha[s], rel=1e-5, abs=1e-7) for s in ha), (key, ha, hb)
    assert all(v > 0 for _, v in metric(ub, resumed["run_id"], "learn/trained_samples"))
    assert dict(metric(ub, resumed["run_id"], "learn/logp_gap_image"))[3] > 0
    _assert_same_metrics(ua, full["run_id"], ub, resumed["run_id"])


def test_failure_after_the_learner_step_resumes_to_the_same_weights(tmp_path, monkeypatch, uninterrupted):
    """A failure between the learner step and the end of the step (here: the new weights do not reach the
    pool) leaves a checkpoint of the post-step state (weights, sampler, step); resuming from it ends where
    the uninterrupted run ends, each batch trained once."""
    monkeypatch.chdir(tmp_path)
    full_dir, full = uninterrupted(())
    deliver = Run.deliver

    def fails_after_step_3(self, handle):
        if self.step == 3:
            raise WeightSyncError("injected: version 4 did not reach the pool")
        return deliver(self, handle)

    monkeypatch.setattr(Run, "deliver", fails_after_step_3)
    cfg = _cfg(tmp_path, "split", "algorithm.steps=4")
    with pytest.raises(WeightSyncError, match="injected") as e:
        train(cfg)
    note = " ".join(getattr(e.value, "__notes__", []))
    assert "stopped at step 3" in note and "step-000003" in note and "--resume" in note, note
    root = tmp_path / "ckpt" / "split"
    saved = checkpoint.latest(root)
    assert saved.name == "step-000003"  # written after the failure (checkpoint.every=2 writes steps 2 and 4)
    state = checkpoint.load_state(saved)
    assert state["sampler"]["position"] + state["sampler"]["epoch"] * state["sampler"]["dataset_len"] == \
        3 * cfg.rollout.prompts_per_step  # the batch of step 3 counts as served: it is not trained again
    ray.shutdown()
    monkeypatch.setattr(Run, "deliver", deliver)
    resumed = train(cfg, resume=True)
    assert resumed["steps"] == 4 and resumed["run_id"] == state["mlflow_run_id"]
    _assert_same_final_weights(full_dir / "ckpt" / "full", root)
    ma = dict(metric(_cfg(full_dir, "full").tracking.resolved_uri(), full["run_id"], "reward/total/mean"))
    mb = dict(metric(cfg.tracking.resolved_uri(), resumed["run_id"], "reward/total/mean"))
    assert ma[4] == pytest.approx(mb[4], abs=1e-6)


def test_resume_rejects_partial_checkpoint(tmp_path):
    d = tmp_path / "ckpt" / "x" / "step-000002"
    d.mkdir(parents=True)
    (d / "state.json").write_text("{}")
    assert checkpoint.latest(tmp_path / "ckpt" / "x") is None
    with pytest.raises(checkpoint.CheckpointError, match="partial"):
        checkpoint.load_state(d)


@pytest.mark.parametrize("override,field", [
    ("rollout.bogus=1", "rollout.bogus"),
    ("rollout.group_size=many", "rollout.group_size"),
    ("rollout.prompts_per_step=-3", "rollout.prompts_per_step"),
    ("model.lm_path=/does/not/exist", "model.lm_path"),
])
def test_bad_config_exits_2_naming_the_field(override, field):
    p = subprocess.run([sys.executable, "-m", "services.cli", "train", "--set", override],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and field in lines[0] and "Traceback" not in p.stderr


@pytest.mark.parametrize("depth", [1, 2])
def test_async_pipeline_keeps_depth_batches_in_flight(tmp_path, monkeypatch, depth):
    """Async mode: ``max_staleness`` batches generated ahead of the learner (their version lag grows to
    it, nothing is dropped); a checkpoint counts only the batches trained on as served, and no batch
    generated before it is trained after it."""
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, f"async{depth}", "algorithm.steps=5", "algorithm.mode=async",
               f"algorithm.max_staleness={depth}", "checkpoint.every=3", "tracking.log_images_every=0",
               "algorithm.eval_every=0")
    summary = train(cfg)
    served = json.loads((tmp_path / "ckpt" / cfg.run_name / "step-000003" / "state.json").read_text())["sampler"]
    # batches 4 and 5 were already drawn (queued behind the step-3 weights) when it was written
    assert served["epoch"] * served["dataset_len"] + served["position"] == 3 * cfg.rollout.prompts_per_step
    uri, rid = cfg.tracking.resolved_uri(), summary["run_id"]
    lag = [v for _, v in metric(uri, rid, "rollout/version_lag")]
    stale = [v for _, v in metric(uri, rid, "rollout/stale_dropped")]
    # steps 1-3 were filled from the stage-1 policy (up to the checkpoint after step 3), steps 4-5 after it
    assert lag == ([0, 1, 1, 0, 1] if depth == 1 else [0, 1, 2, 0, 1]), lag
    assert all(v == 0 for v in stale)
