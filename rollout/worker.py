"""The rollout worker: one Ray actor (own placement group), a policy replica, a text engine, and the
weight-receive path. It holds a policy version; the driver never gives it prompts while it is stale.
The policy and the rollout follow the config's ``model.arch`` (``policy.factory.build_policy``,
``rollout.registry.get_rollout``)."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import torch

from policy.config import PolicyConfig
from policy.factory import build_policy
from policy.trajectory import Trajectory
from rollout.engine import HFTextEngine, TextEngine
from rollout.interleaved import RolloutSettings
from rollout.registry import get_rollout
from sync import WeightHandle, make_receiver, manifest, transport


class RolloutWorker:
    """Plain class; the pool wraps it with ``ray.remote``. ``version`` is -1 until weights arrive.

    With ``num_gpus`` > 0 (``rollout.num_gpus_per_worker``) and CUDA present, the policy lives on the GPU
    and sampling runs there; the noise still comes from the CPU generator of ``generate``'s seed, and the
    trajectories it returns hold CPU tensors. A Janus policy goes to the GPU whenever there is one."""

    def __init__(self, worker_id: int, policy_cfg: PolicyConfig, settings: RolloutSettings, engine: str = "hf",
                 engine_kwargs: dict | None = None, sync_backend: str = "object_store",
                 rollout_kind: str = "interleaved", num_threads: int = 1, num_gpus: float = 0.0) -> None:
        torch.set_num_threads(max(1, num_threads))
        self.worker_id = worker_id
        cfg = policy_cfg
        self.policy = build_policy(cfg)
        if torch.cuda.is_available() and (num_gpus > 0 or self.policy.arch == "janus"):
            self.policy.to("cuda")  # rollout.num_gpus_per_worker > 0: Ray gave this actor its GPU
        self.engine = make_engine(engine, self.policy, **(engine_kwargs or {}))
        self.settings = settings
        self.receiver = make_receiver(transport(sync_backend, self.policy.device.type == "cuda"))
        self.rollout_kind = rollout_kind
        self.rollout = get_rollout(rollout_kind, cfg.arch)
        self.policy_version = -1

    def update_weights(self, handle: WeightHandle, timeout_s: float = 60.0) -> int:
        """Load the published weights (bucketed), verify every adapted module against the handle's manifest
        (LoRA, ``sync.manifest``: a module that did not arrive whole raises WeightSyncError), take their version."""
        t0 = time.perf_counter()
        received: list[str] = []
        self.engine.load_weights(manifest.recording(self.receiver.receive(handle, timeout_s), received))
        manifest.verify(handle, self.policy.adapted_modules(), received, self.policy.trainable_state_dict())
        self.policy_version = handle.version
        self.last_sync_s = time.perf_counter() - t0
        return self.policy_version

    def join_sync_group(self, addr: str, port: int, world_size: int, rank: int, name: str, timeout_s: float) -> None:
        """Join the driver's collective weight group (``sync.group``) as receiver ``rank``."""
        self.receiver.init_group(addr, port, world_size, rank, name, timeout_s)

    def generate(self, requests: list[dict], seed: int, overrides: dict | None = None,
                 expected_version: int | None = None) -> list[Trajectory]:
        """G trajectories per request, stamped with this worker's policy version. ``seed`` fixes the
        sampling noise of this call (so a re-queued chunk gives the same result on any worker);
        ``overrides`` replaces rollout settings for this call (evaluation: group_size 1, temperature 0)."""
        if self.policy_version < 0:
            raise RuntimeError(f"rollout worker {self.worker_id} has no weights yet (stale)")
        if expected_version is not None and expected_version != self.policy_version:
            raise RuntimeError(f"rollout worker {self.worker_id} holds version {self.policy_version}, "
                               f"driver expected {expected_version}")
        settings = replace(self.settings, **(overrides or {}))
        generator = torch.Generator().manual_seed(seed)
        trajs = self.rollout(self.policy, self.engine, requests, settings, self.policy_version, generator)
        for t in trajs:
            t.meta["worker_id"] = self.worker_id
        return trajs

    def decode(self, generated: torch.Tensor) -> torch.Tensor:
        """What generated an image -> pixels (B,3,H,W) in [0, 1] (sample images, reconstruction rewards):
        final latents (B,C,h,w) of a unified policy, VQ codes (B,n) of a Janus one."""
        with torch.no_grad():
            if self.policy.arch == "janus":
                return self.policy.decode_image_tokens(generated).cpu()
            return self.policy.decode_latent(generated.to(self.policy.device)).cpu()

    def weights_digest(self) -> dict[str, float]:
        return self.policy.weights_digest()

    def version(self) -> int:
        return self.policy_version

    def pid(self) -> int:
        return os.getpid()


def make_engine(name: str, policy, **kwargs) -> TextEngine:
    """``hf`` (transformers, any device) or ``vllm`` (GPU, the ``vllm`` extra)."""
    if name == "hf":
        return HFTextEngine(policy)
    if name == "vllm":
        from rollout.vllm_engine import VLLMTextEngine  # GPU only: vllm is an optional extra

        return VLLMTextEngine(policy, **kwargs)
    raise ValueError(f"rollout.engine: unknown engine {name!r} (hf | vllm)")
