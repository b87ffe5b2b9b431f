"""``unigrpo submit``: a training run as a Ray job, through the Jobs API.

The job's runtime environment carries the project (``working_dir`` = the repository root, minus the
virtualenv, checkpoints, MLflow files, runs and .git) and the run config: the resolved YAML is written
into the working directory just for the upload (removed again once the job is submitted), so the job
runs exactly the config that was validated here, overrides included. The entrypoint is
``unigrpo train --config <file>`` when the console script is on the cluster's PATH, else
``python -m services.cli train --config <file>``. ``MLFLOW_TRACKING_URI`` (and ``MLFLOW_EXPERIMENT_NAME``)
set here are passed on to the job.

The driver prints ``mlflow_run_id=<id>`` as soon as its MLflow run exists; ``submit`` reads it from the
job's logs and prints it. ``--wait`` streams the logs and returns the job's status as the exit code
(0 SUCCEEDED, 1 otherwise).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXCLUDES = ["/.venv", "/venv", ".git", "/checkpoints", "mlflow.db", "/mlruns", "/mlartifacts", "/runs", "/out",
            "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache", "*.egg-info", "/.whl", "/shared"]
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")
RUN_ID_LINE = re.compile(r"mlflow_run_id=([0-9a-fA-F]{8,})")


def _enable_token_auth() -> None:
    """Ray >= 2.5x protects the dashboard with a token when one exists locally (``~/.ray/auth_token``);
    ``ray.init`` picks it up by itself, the Jobs SDK only when told. Do what ``ray.init`` does."""
    if os.environ.get("RAY_AUTH_MODE") is not None:
        return
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # older Ray: no token auth
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def job_client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    _enable_token_auth()
    return JobSubmissionClient(address)


def entrypoint(config_file: str) -> str:
    """The job's command: the console script if the cluster has it, else the module (the working dir is
    on PYTHONPATH in both cases, so the uploaded code is what runs)."""
    f = shlex.quote(config_file)
    return (f"if command -v unigrpo >/dev/null 2>&1; then exec unigrpo train --config {f}; "
            f"else exec python -m services.cli train --config {f}; fi")


def runtime_env(config_file: str, root: Path = ROOT, env: dict[str, str] | None = None) -> dict:
    env_vars = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    env_vars["UNIGRPO_CONFIG_FILE"] = config_file
    env_vars.update(env or {})
    return {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars}


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _find_run_id(text: str) -> str | None:
    m = RUN_ID_LINE.search(text)
    return m.group(1) if m else None


def _wait_run_id(client: Any, job_id: str, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rid = _find_run_id(client.get_job_logs(job_id))
        if rid or client.get_job_status(job_id).is_terminal():
            return rid or _find_run_id(client.get_job_logs(job_id))
        time.sleep(1.0)
    return None


async def _stream(client: Any, job_id: str, out) -> str | None:
    rid = None
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()
        if rid is None:
            rid = _find_run_id(chunk)
    return rid


def submit(address: str, cfg: Any, config_path: str | None = None, overrides: list[str] | None = None,
           wait: bool = False, *, root: Path | str = ROOT, env: dict[str, str] | None = None,
           run_id_timeout_s: float = 180.0, agent_timeout_s: float = 300.0, out=None) -> int:
    """Submit ``cfg`` (already validated and resolved) as a Ray job at ``address`` (the dashboard URL,
    e.g. ``http://head:8265``). Prints ``job_id=...`` and ``mlflow_run_id=...``; returns the exit code."""
    from services.config import to_yaml

    out = out or sys.stdout
    root = Path(root).resolve()
    client = job_client(address)
    name = f"unigrpo-submit-{cfg.run_name}-{uuid.uuid4().hex[:8]}.yaml"
    cfg_file = root / name
    header = (f"# unigrpo submit: resolved from {config_path or '<embedded default>'}"
              + (f" with --set {' '.join(overrides)}" if overrides else "") + "\n")
    cfg_file.write_text(header + to_yaml(cfg))
    try:
        deadline = time.monotonic() + agent_timeout_s
        while True:
            try:
                job_id = client.submit_job(
                    entrypoint=entrypoint(name), runtime_env=runtime_env(name, root, env),
                    submission_id=f"unigrpo-{cfg.run_name}-{uuid.uuid4().hex[:8]}",
                    metadata={"unigrpo_run_name": cfg.run_name, "config": str(config_path or "")},
                )
                break
            except RuntimeError as e:  # a freshly started head answers before its job agent is up
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(2.0)
    finally:
        cfg_file.unlink(missing_ok=True)  # the package is uploaded by now
    print(f"job_id={job_id}", file=out, flush=True)
    print(f"  logs:   ray job logs --address {address} --follow {job_id}", file=out, flush=True)
    print(f"  scale:  unigrpo scale --run {cfg.run_name} --rollout-workers N", file=out, flush=True)
    if not wait:
        rid = _wait_run_id(client, job_id, run_id_timeout_s)
        print(f"mlflow_run_id={rid}" if rid else "mlflow_run_id=<not yet known: see the job's logs>",
              file=out, flush=True)
        return 0
    rid = asyncio.run(_stream(client, job_id, out))
    status = client.get_job_status(job_id)
    for _ in range(50):  # the log stream can end just before the status is final
        if status.is_terminal():
            break
        time.sleep(0.2)
        status = client.get_job_status(job_id)
    rid = rid or _find_run_id(client.get_job_logs(job_id))
    print(f"job {job_id} {_status_name(status)}" + (f"; mlflow_run_id={rid}" if rid else ""), file=out,
          flush=True)
    return 0 if _status_name(status) == "SUCCEEDED" else 1
