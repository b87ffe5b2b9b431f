"""The cluster: start (or join) Ray, build a rollout pool from the run config, publish a saved policy.

Training (``services.driver``), evaluation (``services.evaluate``, ``services.reconstruction``) and the
Serve apps all place their actors through these helpers, so a run and an eval of it see the same pool.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import ray

from recipes import get_recipe
from rollout.interleaved import RolloutSettings
from rollout.pool import PoolSpec, RolloutPool
from services.config import RunConfig
from services.console import ray_runtime_env
from sync import RAY_SYSTEM_CONFIG, WeightHandle, make_publisher, manifest


def start_ray(cfg: RunConfig) -> bool:
    """Join ``cluster.address`` / ``$RAY_ADDRESS``, else start a local cluster. True when this call started
    Ray (the caller then owns it and shuts it down)."""
    if ray.is_initialized():
        return False
    address = cfg.cluster.resolved_address()
    # runtime_env: each worker quiets library warnings / progress bars at start (services.console)
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False, runtime_env=ray_runtime_env())
    if address:
        ray.init(address=address, **kw)
        return True
    # A local cluster gets at least the logical CPUs the run's actors ask for (a small box oversubscribes
    # its cores rather than deadlock on placement), plus room to scale the pool out.
    r = cfg.rollout
    need = (cfg.learner.num_workers * cfg.learner.num_cpus_per_worker + cfg.reward.num_cpus
            + max(r.num_workers, r.autoscale.max_workers) * r.num_cpus_per_worker + 1)
    # RAY_SYSTEM_CONFIG: objects leave the store as soon as they are out of scope, so each weight sync reuses
    # the previous version's resident pages (an external cluster: RAY_free_objects_period_milliseconds=0)
    ray.init(num_cpus=cfg.cluster.num_cpus or max(os.cpu_count() or 1, int(np.ceil(need))),
             _system_config=RAY_SYSTEM_CONFIG, **kw)
    return True


def rollout_settings(cfg: RunConfig, group_size: int | None = None) -> RolloutSettings:
    """The rollout section as the workers' ``RolloutSettings`` (``group_size``: override, e.g. 1 to serve)."""
    r, s = cfg.rollout, cfg.rollout.sde
    return RolloutSettings(
        group_size=group_size or r.group_size, max_new_tokens=r.max_new_tokens, temperature=r.temperature,
        top_p=r.top_p, max_images=r.max_images, sde_steps=s.steps, sde_window=s.window,
        sde_window_position=s.window_position, sde_window_start=s.window_start, sde_noise_level=s.noise_level,
        sde_strength=s.strength,
        reference_latents=any(c.name == "latent_quality" for c in cfg.reward.components),
        gold_answer_logprob=any(c.name == "answer_likelihood" for c in cfg.reward.components))


def worker_pool(cfg: RunConfig, n: int) -> RolloutPool:
    """A pool of ``n`` rollout workers for ``cfg`` (each in its own placement group)."""
    r = cfg.rollout
    spec = PoolSpec(
        policy_cfg=cfg.model, settings=rollout_settings(cfg), engine=r.engine,
        engine_kwargs=r.vllm.model_dump() if r.engine == "vllm" else None, sync_backend=cfg.learner.sync.backend,
        rollout_kind=get_recipe(cfg.recipe).rollout, num_cpus=r.num_cpus_per_worker, num_gpus=r.num_gpus_per_worker,
        custom_resource=cfg.cluster.rollout_resource if cfg.cluster.use_custom_resources else None,
        sync_timeout_s=cfg.learner.sync.timeout_s, call_timeout_s=r.call_timeout_s, start_timeout_s=r.start_timeout_s)
    return RolloutPool(spec, n)


def policy_dir_of(checkpoint: str | os.PathLike[str]) -> Path:
    """A checkpoint directory's ``policy/`` subfolder, or the directory itself when it is a policy."""
    p = Path(checkpoint)
    return p / "policy" if (p / "policy").is_dir() else p


def publish_policy_dir(policy_dir: Path) -> WeightHandle:
    """Publish a saved policy's trainable weights through the object store (version 1)."""
    from policy.factory import load_policy_dir

    policy = load_policy_dir(policy_dir)
    state = policy.trainable_state_dict()
    return make_publisher("object_store").publish(1, state.items(),
                                                  manifest=manifest.build(state, policy.adapted_modules()))
