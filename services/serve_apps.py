"""Ray Serve HTTP apps: the reward (``services.serve_reward``) and the trained policy (``services.serve_policy``).

    unigrpo serve reward [--config FILE] [--host 127.0.0.1] [--port 8000]
    unigrpo serve policy --checkpoint DIR [--config FILE]

``serve(app, cfg, ...)`` starts an app and blocks (the CLI); ``start_reward_app`` / ``start_policy_app``
start one and return its deployment handle (tests, the training driver). HTTP binds 127.0.0.1 unless a
host is given. What both apps share (body limits,
4xx errors, image decoding) is in ``services.http_io``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger(__name__)

POLICY_ROUTE_PREFIX = "/policy"


# ------------------------------------------------------------------------------------------ Serve
def init_ray(cfg: Any) -> bool:
    """Connect to ``cluster.address`` / ``$RAY_ADDRESS`` or start a local Ray; True when this call did."""
    import ray

    if ray.is_initialized():
        return False
    from services.console import ray_runtime_env

    address = cfg.cluster.resolved_address() if cfg is not None else None
    if address:
        ray.init(address=address, runtime_env=ray_runtime_env())
    else:
        ray.init(num_cpus=cfg.cluster.num_cpus if cfg is not None else None, include_dashboard=False,
                 runtime_env=ray_runtime_env())
    return True


def ensure_serve(cfg: Any, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Connect to (or start) Ray and start Serve's HTTP proxy on ``host:port``."""
    from ray import serve

    init_ray(cfg)
    serve.start(http_options={"host": host, "port": int(port)})


def start_reward_app(cfg: Any, host: str = "127.0.0.1", port: int = 8000, *, name: str = "reward") -> Any:
    """Deploy the reward app (non-blocking) at ``cfg.reward.serve.route_prefix``; returns its handle."""
    from ray import serve

    from services.clip_fit import prepare
    from services.serve_reward import build_reward_app

    cfg = prepare(cfg)  # a fitted tiny CLIP scorer (fit: true): the cached one, else fitted now
    ensure_serve(cfg, host, port)
    return serve.run(build_reward_app(cfg), name=name, route_prefix=cfg.reward.serve.route_prefix,
                     blocking=False)


def start_policy_app(cfg: Any, checkpoint: str, host: str = "127.0.0.1", port: int = 8000, *,
                     name: str = "policy", route_prefix: str = POLICY_ROUTE_PREFIX,
                     max_body_mb: float | None = None) -> Any:
    """Deploy the policy app for ``checkpoint`` (non-blocking) at ``route_prefix``; returns its handle."""
    from ray import serve

    from services.serve_policy import build_policy_app

    ensure_serve(cfg, host, port)
    app = build_policy_app(cfg, checkpoint, max_body_mb=max_body_mb)
    return serve.run(app, name=name, route_prefix=route_prefix, blocking=False)


def serve(app: str, cfg: Any, checkpoint: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Start ``app`` ("reward" | "policy") and block until Ctrl-C / SIGTERM (``unigrpo serve``): then Serve
    and a local Ray this call started are shut down, and ``services.stop.Interrupted`` is raised."""
    import ray
    from ray import serve as ray_serve

    from services import stop
    from services.config import ConfigError

    if app == "policy":
        if not checkpoint:
            raise ConfigError("--checkpoint", "required for `unigrpo serve policy`")
        from pathlib import Path

        if not (Path(checkpoint) / "config.json").is_file():
            raise ConfigError("--checkpoint", f"{checkpoint} is not a policy checkpoint (no config.json)")
    elif app != "reward":
        raise ConfigError("app", f"unknown app {app!r} (reward | policy)")
    owns_ray = init_ray(cfg)
    stop.install()  # after ray.init, which replaces the SIGTERM handler
    try:
        if app == "reward":
            start_reward_app(cfg, host, port)
            prefix = cfg.reward.serve.route_prefix.rstrip("/")
            paths = [f"POST {prefix}/score", f"GET {prefix}/healthz"]
        else:
            start_policy_app(cfg, checkpoint, host, port)
            paths = [f"POST {POLICY_ROUTE_PREFIX}/answer", f"GET {POLICY_ROUTE_PREFIX}/healthz"]
        for p in paths:
            print(f"serving {p.split()[0]} http://{host}:{port}{p.split()[1]}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as e:
        raise stop.Interrupted(stop.signum_of(e), f"serve {app}: stopped") from None
    finally:
        with stop.ignored():
            try:
                ray_serve.shutdown()
            finally:
                if owns_ray and ray.is_initialized():
                    ray.shutdown()
