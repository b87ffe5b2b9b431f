"""``unigrpo scale --run RUN --rollout-workers N [--address ADDR] [--token-file PATH]``: set the desired
rollout pool size of a running run through its control actor (``services.control.RunControl``); the driver
applies it before its next step (a new worker joins once it holds the current weights). The request
carries the run's owner token: from ``--token-file``, else ``$UNIGRPO_RUN_TOKEN``, else the
``owner.token`` file the run wrote beside its checkpoints (the path the control actor reports). A request
above or below the pool size bounds is clamped to them. ``--address http://head:8265`` runs this same
command on the cluster as a small Ray job (a token read here travels in the job's environment)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from services.control import NAMESPACE, PREFIX, TOKEN_ENV, NotOwner, actor_name


def _connect(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS") or "auto"
    kw: dict = {"namespace": NAMESPACE}
    if not addr.startswith("ray://"):
        kw.update(log_to_driver=False, configure_logging=False)
    ray.init(address=addr, **kw)


def _find(run: str) -> Any:
    """The control actor by run name, or by the MLflow run id it was started with."""
    import ray

    try:
        return ray.get_actor(actor_name(run), namespace=NAMESPACE)
    except ValueError:
        pass
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != NAMESPACE or not entry.get("name", "").startswith(PREFIX):
            continue
        h = ray.get_actor(entry["name"], namespace=NAMESPACE)
        if ray.get(h.status.remote(), timeout=30).get("mlflow_run_id") == run:
            return h
    return None


def _read_token(path: str | os.PathLike[str]) -> str:
    return Path(path).read_text().strip()


def _token(handle: Any, token_file: str | None) -> str | None:
    """The owner token: ``token_file``, ``$UNIGRPO_RUN_TOKEN``, or the file the run reports (if readable)."""
    import ray

    if token_file:
        return _read_token(token_file)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    path = ray.get(handle.status.remote(), timeout=30).get("token_file")
    try:
        return _read_token(path) if path else None
    except OSError:
        return None  # not readable here: the control actor says where it is


def _scale_via_job(run: str, n: int, address: str, token_file: str | None = None) -> int:
    """``--address http://head:8265``: run this same command on the cluster as a small Ray job."""
    import shlex

    from services.jobs import job_client

    client = job_client(address)
    token = _read_token(token_file) if token_file else os.environ.get(TOKEN_ENV)
    env = {"runtime_env": {"env_vars": {TOKEN_ENV: token}}} if token else {}
    jid = client.submit_job(
        entrypoint=f"python -m services.scale --run {shlex.quote(run)} --rollout-workers {int(n)}", **env)
    for _ in range(600):
        st = client.get_job_status(jid)
        if st.is_terminal():
            break
        time.sleep(0.5)
    sys.stdout.write(client.get_job_logs(jid))
    return 0 if str(st) == "SUCCEEDED" or getattr(st, "value", None) == "SUCCEEDED" else 1


def scale(run: str, rollout_workers: int, address: str | None = None, token_file: str | None = None) -> int:
    """``unigrpo scale``: set the desired rollout pool size of a running run (applied before its next
    step). Exit 0 on success, 1 when no such run is running or the owner token is missing or wrong."""
    if address and address.startswith(("http://", "https://")):
        return _scale_via_job(run, rollout_workers, address, token_file)
    import ray

    _connect(address)
    handle = _find(run)
    if handle is None:
        names = [e["name"][len(PREFIX):] for e in ray.util.list_named_actors(all_namespaces=True)
                 if e.get("namespace") == NAMESPACE and e.get("name", "").startswith(PREFIX)]
        sys.stderr.write(f"no running unigrpo run named {run!r} on this cluster"
                         f" (running: {', '.join(names) or 'none'})\n")
        return 1
    try:
        token = _token(handle, token_file)
        r = ray.get(handle.set_rollout_workers.remote(int(rollout_workers), token), timeout=30)
    except NotOwner as e:
        sys.stderr.write(f"unigrpo scale: {getattr(e, 'cause', None) or e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"unigrpo scale: cannot read the owner token: {e}\n")
        return 1
    clamped = (f"; {r['requested']} is outside the pool size bounds {list(r['bounds'])}, clamped"
               if r["clamped"] else "")
    print(f"run {r['run']}: rollout workers {r['applied']} -> {r['desired']} (applied before the next step; "
          f"now at step {r['step']}{clamped})", flush=True)
    return 0


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m services.scale")
    p.add_argument("--run", required=True)
    p.add_argument("--rollout-workers", required=True, type=int)
    p.add_argument("--address", default=None)
    p.add_argument("--token-file", default=None)
    a = p.parse_args(argv)
    return scale(a.run, a.rollout_workers, a.address, a.token_file)


if __name__ == "__main__":
    sys.exit(_main())
