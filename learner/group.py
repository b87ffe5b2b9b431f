"""The learner group: W LearnerWorker actors in one placement group, called in lock-step."""

from __future__ import annotations

import socket
from typing import Any

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.actor import LearnerWorker
from learner.batch import TrainBatch, average_metrics
from policy.config import PolicyConfig
from sync.placement import wait_placement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shards(n: int, world: int) -> list[torch.Tensor]:
    return [idx for idx in torch.arange(n).chunk(world)] + [torch.arange(0)] * max(0, world - n)


class LearnerGroup:
    def __init__(self, policy_cfg: PolicyConfig, learner_cfg: Any, algo_cfg: Any, sft_cfg: Any, seed: int,
                 custom_resource: str | None = None, sde_steps: int = 8) -> None:
        """The run config's frozen ``model`` / ``learner`` / ``algorithm`` / ``sft`` sections (see
        ``LearnerWorker``); ``sde_steps``: ``rollout.sde.steps``."""
        w = learner_cfg.num_workers
        bundle = {"CPU": learner_cfg.num_cpus_per_worker}
        if learner_cfg.num_gpus_per_worker:
            bundle["GPU"] = learner_cfg.num_gpus_per_worker
        if custom_resource:
            bundle[custom_resource] = 1
        self.pg = placement_group([bundle] * w, strategy="PACK")
        wait_placement(self.pg, bundle)
        addr, port = "127.0.0.1" if w == 1 else ray.util.get_node_ip_address(), _free_port()
        cls = ray.remote(LearnerWorker)
        self.workers = [
            cls.options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i)).remote(
                i, w, addr, port, policy_cfg, learner_cfg, algo_cfg, sft_cfg, seed,
                max(1, int(bundle["CPU"])), sde_steps)
            for i in range(w)
        ]

    def call_all(self, method: str, *args) -> list:
        """Every rank runs ``method(*args)``; their answers in rank order."""
        return ray.get([getattr(wk, method).remote(*args) for wk in self.workers])

    def _sharded(self, method: str, items, select) -> list[dict]:
        shards = _shards(len(items) if isinstance(items, list) else items.input_ids.shape[0], len(self.workers))
        return ray.get([getattr(wk, method).remote(select(items, idx)) for wk, idx in zip(self.workers, shards)])

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return average_metrics(self._sharded("train_step", batch, lambda b, idx: b.select(idx)))

    def sft_step(self, examples: list[dict]) -> dict[str, float]:
        return average_metrics(self._sharded("sft_step", examples, lambda e, idx: [e[i] for i in idx.tolist()]))

    def publish(self, bump: bool = True):
        return self.call_all("publish", bump)[0]

    def call(self, method: str, *args):
        """Every rank runs ``method``; rank 0's answer."""
        return self.call_all(method, *args)[0]

    def shutdown(self) -> None:
        for wk in self.workers:
            ray.kill(wk)
        remove_placement_group(self.pg)
