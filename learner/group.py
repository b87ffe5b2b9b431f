"""The learner group: W LearnerWorker actors in one placement group, called in lock-step."""

from __future__ import annotations

import socket
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from learner.actor import LearnerWorker
from learner.batch import TrainBatch, average_metrics
from learner.sharding import shard_batch
from policy.config import PolicyConfig
from sync.group import WEIGHT_SYNC
from sync.placement import wait_placement


def _rendezvous_address(world_size: int) -> tuple[str, int]:
    """Run on rank 0's node: the address the ranks meet at (loopback for one rank) and a free port."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ("127.0.0.1" if world_size == 1 else ray.util.get_node_ip_address()), port


class LearnerGroup:
    def __init__(self, policy_cfg: PolicyConfig, learner_cfg: Any, algo_cfg: Any, sft_cfg: Any, seed: int,
                 custom_resource: str | None = None, sde_cfg: Any = None) -> None:
        """The run config's frozen ``model`` / ``learner`` / ``algorithm`` / ``sft`` sections (see
        ``LearnerWorker``); ``sde_cfg``: ``rollout.sde``."""
        w = learner_cfg.num_workers
        bundle = {"CPU": learner_cfg.num_cpus_per_worker}
        if learner_cfg.num_gpus_per_worker:
            bundle["GPU"] = learner_cfg.num_gpus_per_worker
        if custom_resource:
            bundle[custom_resource] = 1
        self.mini_batches = learner_cfg.mini_batches
        self.pg = placement_group([bundle] * w, strategy="PACK")
        wait_placement(self.pg, bundle)
        self.timeout_s = learner_cfg.call_timeout_s
        on_rank0 = PlacementGroupSchedulingStrategy(self.pg, 0)
        addr, port = ray.get(ray.remote(_rendezvous_address).options(num_cpus=0, scheduling_strategy=on_rank0)
                             .remote(w), timeout=self.timeout_s)
        cls = ray.remote(LearnerWorker)
        # collective weight sync: rank 0 takes the group's calls on a thread of their own (sync.group)
        rank0 = (ray.remote(concurrency_groups={WEIGHT_SYNC: 1})(LearnerWorker)
                 if learner_cfg.sync.backend == "nccl" else cls)
        self.workers = [
            (rank0 if i == 0 else cls).options(num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0),
                                               scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i)).remote(
                i, w, addr, port, policy_cfg, learner_cfg, algo_cfg, sft_cfg, seed,
                max(1, int(bundle["CPU"])), sde_cfg)
            for i in range(w)
        ]

    def _gather(self, refs: list, method: str) -> list:
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"learner {method}: no answer from every rank within learner.call_timeout_s = "
                               f"{self.timeout_s:g} s") from None

    def call_all(self, method: str, *args) -> list:
        """Every rank runs ``method(*args)``; their answers in rank order."""
        return self._gather([getattr(wk, method).remote(*args) for wk in self.workers], method)

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """One GRPO step on the whole batch: whole groups per rank, the same optimizer steps on every rank
        (``learner.sharding``); the metrics averaged over ranks."""
        shards = shard_batch(batch, self.mini_batches, len(self.workers))
        return average_metrics(self._gather([wk.train_step.remote(sh) for wk, sh in zip(self.workers, shards)],
                                            "train_step"))

    def sft_step(self, examples: list[dict]) -> dict[str, float]:
        """One stage-1 step on the whole (global) batch of examples; every rank takes its share."""
        return average_metrics(self.call_all("sft_step", examples))

    def publish(self, bump: bool = True):
        return self.call_all("publish", bump)[0]

    def call(self, method: str, *args):
        """Every rank runs ``method``; rank 0's answer."""
        return self.call_all(method, *args)[0]

    def shutdown(self) -> None:
        for wk in self.workers:
            ray.kill(wk)
        remove_placement_group(self.pg)
