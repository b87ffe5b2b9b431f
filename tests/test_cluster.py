"""Running on a cluster, on this box: a real Ray head (``ray start --head`` on 127.0.0.1 with the dashboard,
so the Jobs API runs), ``unigrpo submit --wait`` and ``unigrpo scale`` as subprocesses against it; the
rollout pool scaled 1 -> 2 -> 1 during a run; the Serve reward backend."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import ray
from service_helpers import FAST_VAE_FIT

from services import control, scale
from services.config import load_config
from services.driver import Run, train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [
    "sft.steps=2", "sft.batch_size=8", "task.train_size=64", "task.eval_size=4", "rollout.prompts_per_step=4",
    "rollout.group_size=4", "rollout.max_new_tokens=12", "tracking.log_images_every=0", "checkpoint.every=0",
    *FAST_VAE_FIT,
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _ray_down():
    yield
    if ray.is_initialized():
        ray.shutdown()


def _wait_jobs_api(url: str, token: str, head: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited"
        try:
            req = urllib.request.Request(f"{url}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise AssertionError("the Jobs API did not come up")


@pytest.fixture
def ray_head(tmp_path):
    """A head node with the dashboard (Jobs API) on 127.0.0.1, run as ``ray start --head --block`` in its
    own process group, which is what the finalizer stops (not ``ray stop``: that kills every Ray process
    on the machine). Ray >= 2.5x turns token auth on by default: the test uses its own token (never the
    user's ~/.ray one) and hands it to every client through the environment."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the `ray` CLI is not installed next to this Python")
    tmp = tempfile.mkdtemp(prefix="ugr", dir="/tmp")  # AF_UNIX socket paths must stay under 108 bytes
    token = secrets.token_hex(32)
    (tmp_path / "ray_token").write_text(token)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(tmp_path / "ray_token"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TMPDIR": tmp}  # its address file stays out of /tmp/ray: no one else's ray.init() finds it
    env.pop("RAY_ADDRESS", None)
    gcs, dash = _free_port(), _free_port()
    start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true", "--num-cpus=4",
             f"--temp-dir={tmp}", "--disable-usage-stats",
             # every agent port free too: another Ray on the box (a local cluster) holds the defaults
             *(f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                        "metrics-export-port", "runtime-env-agent-port",
                                                        "ray-client-server-port"))]
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_jobs_api(f"http://127.0.0.1:{dash}", token, head)
        yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(head.pid, sig)  # the head's own process group: only what this test started
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def test_submit_job_scale_and_mlflow(ray_head, tmp_path):
    env = {**ray_head["env"], "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/job.db"}
    sets = [*TINY, "run_name=jobrun", "algorithm.steps=12", "rollout.num_workers=1",
            f"checkpoint.dir={tmp_path}/ckpt"]
    cmd = [str(BIN / "unigrpo"), "submit", "--address", ray_head["dashboard"], "--wait"]
    for s in sets:
        cmd += ["--set", s]
    cmd += ["--config", str(ROOT / "services" / "default.yaml")]
    sub = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    run_id = None
    deadline = time.monotonic() + 600  # an upper bound: a loaded box can take minutes to start the job
    try:
        for line in sub.stdout:  # until the driver has announced its MLflow run
            lines.append(line)
            if line.startswith("mlflow_run_id="):
                run_id = line.strip().split("=", 1)[1]
                break
            assert time.monotonic() < deadline, "".join(lines[-50:])
        assert run_id, "".join(lines[-50:])
        assert any(ln.startswith("job_id=") for ln in lines)
        # the run's control actor appears once its actors are up; `unigrpo scale` over the GCS address
        scaled = None
        for _ in range(60):
            scaled = subprocess.run([str(BIN / "unigrpo"), "scale", "--run", "jobrun", "--rollout-workers", "2",
                                     "--address", ray_head["gcs"]], env=env, capture_output=True, text=True,
                                    timeout=120)
            if scaled.returncode == 0:
                break
            time.sleep(1.0)
        assert scaled.returncode == 0, scaled.stderr[-2000:]
        assert "rollout workers 1 -> 2" in scaled.stdout
        rest, _ = sub.communicate(timeout=600)
    finally:
        if sub.poll() is None:
            sub.kill()
    lines.append(rest)
    out = "".join(lines)
    assert sub.returncode == 0, out[-3000:]
    assert "SUCCEEDED" in out.strip().splitlines()[-1]
    assert not list(ROOT.glob("unigrpo-submit-*.yaml"))  # the uploaded config file does not linger
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/job.db")
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.data.params["run_name"] == "jobrun"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "reward/total/mean"))
    assert [s for s, _ in hist] == list(range(1, 13))
    sizes = [v for _, v in sorted((m.step, m.value) for m in client.get_metric_history(run_id, "pool/size"))]
    assert sizes[0] in (1.0, 2.0) and sizes[-1] == 2.0 and set(sizes) <= {1.0, 2.0}


def test_scale_1_2_1_while_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*TINY, "run_name=scaler", "rollout.num_workers=1", f"checkpoint.dir={tmp_path}/ck",
                             f"tracking.uri=sqlite:///{tmp_path}/scale.db"])
    run = Run(cfg, resume=False)
    pool = run.pool
    seen: list[dict] = []
    orig = pool.generate

    def generate(requests, seed, overrides=None):
        trajs = orig(requests, seed, overrides)
        held = {w: ray.get(pool.actor(w).version.remote()) for w in pool.health.schedulable()}
        seen.append({"requests": requests, "trajs": trajs, "held": held})
        return trajs

    monkeypatch.setattr(pool, "generate", generate)
    try:
        run.publish_and_sync()
        plan = {1: 2, 3: 1}  # before step k: `unigrpo scale` to n (through the named control actor)
        sizes, used = [], []
        for step in range(5):
            if step in plan:
                assert scale.scale(run="scaler", rollout_workers=plan[step]) == 0
            if step == 2:  # the worker added before step 1 comes up in the background; by now it is in
                assert pool.wait_ready(180)
            run.supervisor.before_step()
            m = run.rl_step()
            run.supervisor.after_step(m)
            c = seen[-1]
            got = sorted((t.prompt_id, t.group_index) for t in c["trajs"])
            want = sorted((r["prompt_id"], g) for r in c["requests"] for g in range(cfg.rollout.group_size))
            assert got == want, f"step {step}: a group was lost or duplicated"
            for t in c["trajs"]:
                assert t.policy_version == c["held"][t.meta["worker_id"]] == m["policy_version"] - 1
            sizes.append(m["pool/size"])
            used.append(len({t.meta["worker_id"] for t in c["trajs"]}))
        assert sizes == [1, 2, 2, 1, 1]
        assert used[1] in (1, 2) and used[2:] == [2, 1, 1]  # step 1 did not wait for the added worker
        new = pool.health.record(1)
        assert new.history[0][1].value == "weights_loaded" and new.state.value == "removed"
        status = ray.get(ray.get_actor(control.actor_name("scaler"), namespace=control.NAMESPACE).status.remote())
        assert status["applied"] == 1 and status["requests"] == 2
        assert scale.scale(run="no-such-run", rollout_workers=2) == 1
    finally:
        run.tracker.end()
        run.shutdown()


def test_serve_reward_backend_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*TINY, "run_name=served", "algorithm.steps=2", "rollout.num_workers=1",
                             "reward.backend=serve", "reward.serve.autoscaling.min_replicas=1",
                             "reward.serve.autoscaling.max_replicas=1", f"checkpoint.dir={tmp_path}/ck",
                             f"tracking.uri=sqlite:///{tmp_path}/served.db"])
    summary = train(cfg)
    assert summary["steps"] == 2
    client = mlflow.tracking.MlflowClient(cfg.tracking.resolved_uri())
    for key in ("reward/total/mean", "reward/answer/mean", "reward/format/mean", "time/reward_s"):
        assert len(client.get_metric_history(summary["run_id"], key)) == 2, key


@pytest.mark.parametrize("start, target, want", [(1, 0.01, 2), (2, 1.0, 1)])
def test_autoscale_follows_rollout_fraction(tmp_path, monkeypatch, start, target, want):
    """``rollout.autoscale``: a rollout share of the step above target + band adds a worker (up to max),
    below target - band removes one (down to min); the pool size and the share are MLflow metrics."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*TINY, f"run_name=auto{start}", "algorithm.steps=4", f"rollout.num_workers={start}",
                             "rollout.autoscale.enabled=true", "rollout.autoscale.min_workers=1",
                             "rollout.autoscale.max_workers=2", f"rollout.autoscale.target_rollout_fraction={target}",
                             "sft.enabled=false", "algorithm.zero_variance=zero", "algorithm.eval_every=0",
                             f"checkpoint.dir={tmp_path}/ck",
                             f"tracking.uri=sqlite:///{tmp_path}/auto.db"])
    summary = train(cfg)
    client = mlflow.tracking.MlflowClient(cfg.tracking.resolved_uri())
    history = lambda key: [m.value for m in sorted(client.get_metric_history(summary["run_id"], key),  # noqa: E731
                                                    key=lambda m: m.step)]
    sizes, fraction = history("pool/size"), history("autoscale/rollout_fraction")
    assert sizes[0] == start and sizes[-1] == want and len(set(sizes)) == 2, sizes
    assert history("pool/scale_events")[-1] == 1  # one change, then the bound holds it
    assert len(fraction) >= 3 and all(0 < f < 1 for f in fraction)
