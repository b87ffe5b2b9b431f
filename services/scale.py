"""``unigrpo scale --run RUN --rollout-workers N [--address ADDR]``: set the desired rollout pool size of a
running run through its control actor (``services.control.RunControl``); the driver applies it before its
next step. ``--address http://head:8265`` runs this same command on the cluster as a small Ray job."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from services.control import NAMESPACE, PREFIX, actor_name


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


def _scale_via_job(run: str, n: int, address: str) -> int:
    """``--address http://head:8265``: run this same command on the cluster as a small Ray job."""
    from services.jobs import job_client

    client = job_client(address)
    jid = client.submit_job(entrypoint=f"python -m services.scale --run {run} --rollout-workers {int(n)}")
    for _ in range(600):
        st = client.get_job_status(jid)
        if st.is_terminal():
            break
        time.sleep(0.5)
    sys.stdout.write(client.get_job_logs(jid))
    return 0 if str(st) == "SUCCEEDED" or getattr(st, "value", None) == "SUCCEEDED" else 1


def scale(run: str, rollout_workers: int, address: str | None = None) -> int:
    """``unigrpo scale``: set the desired rollout pool size of a running run (applied before its next
    step). Exit 0 on success, 1 when no such run is running."""
    if address and address.startswith(("http://", "https://")):
        return _scale_via_job(run, rollout_workers, address)
    import ray

    _connect(address)
    handle = _find(run)
    if handle is None:
        names = [e["name"][len(PREFIX):] for e in ray.util.list_named_actors(all_namespaces=True)
                 if e.get("namespace") == NAMESPACE and e.get("name", "").startswith(PREFIX)]
        sys.stderr.write(f"no running unigrpo run named {run!r} on this cluster"
                         f" (running: {', '.join(names) or 'none'})\n")
        return 1
    r = ray.get(handle.set_rollout_workers.remote(int(rollout_workers)), timeout=30)
    print(f"run {r['run']}: rollout workers {r['applied']} -> {r['desired']} (applied before the next step; "
          f"now at step {r['step']})", flush=True)
    return 0


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m services.scale")
    p.add_argument("--run", required=True)
    p.add_argument("--rollout-workers", required=True, type=int)
    p.add_argument("--address", default=None)
    a = p.parse_args(argv)
    return scale(a.run, a.rollout_workers, a.address)


if __name__ == "__main__":
    sys.exit(_main())
