"""Async mode's rollout pipeline: up to k = ``algorithm.max_staleness`` batches generated and scored ahead
of the learner, on one background thread, in an order fixed by the step index.

The thread runs its jobs first in, first out: the generation (and scoring) of batch b, and the delivery of
each published version to the pool (and to a reward that follows the policy). While the learner trains
step s, batches s+1 .. s+k are queued or running; after step s the driver publishes version s+1 and
queues its delivery, then batch s+k+1, which is therefore generated under version s+1: whatever the
timing, every batch is generated under the same version, with the same seed, in every run. Trajectories
whose version lags the learner by more than k are still dropped and counted (``services.step_batch.assemble``).

Batches never span a checkpoint or an evaluation: the pipeline is not filled past the step after which
one is due, so every batch trained after a checkpoint is generated under the checkpoint's version (or a
later one), and a resumed run refills the pipeline exactly as the uninterrupted run did (exact resume).
The sampler position a checkpoint records is the one before the oldest batch in flight
(``served_sampler_state``): their prompts are drawn again on resume.

A checkpoint written when the run stops (Ctrl-C, SIGTERM, a failure) can find batches in flight that were
generated under versions older than its own, which a resumed run could not generate again: ``carry`` waits
for them (in step order, each at most a rollout wait; a second Ctrl-C ends the wait) and the checkpoint
keeps them (``services.inflight``); ``restore`` puts them back, and ``fill`` hands them out at their steps
instead of generating them, with the prompts the sampler draws for them (checked by id). A batch that
failed, did not finish in time or is not all of its version's trajectories is not carried, nor any after
it: those are generated again on resume, under the resumed weights.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from recipes import get_recipe
from services.checkpoint import CheckpointError
from services.inflight import CarriedBatch


@dataclass
class InFlight:
    """One queued batch: the step it trains, its prompts, the sampler state before they were drawn, the
    policy version it is generated under."""

    step: int
    items: list
    sampler_before: dict
    result: cf.Future  # (trajectories, totals, components, {rollout_s, reward_s, pool metrics})
    version: int


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of step ``step``'s batch (the same in sync and async mode, on any worker)."""
    return seed * 100003 + step


class RolloutPipeline:
    def __init__(self, run: Any, depth: int) -> None:
        self.run, self.depth = run, depth
        self.jobs = cf.ThreadPoolExecutor(1, thread_name_prefix="rollout-pipeline")
        self.inflight: deque[InFlight] = deque()
        self.deliveries: deque[cf.Future] = deque()
        self.last_sync_s = 0.0
        self.carried: dict[int, CarriedBatch] = {}  # batches a resumed run takes from its checkpoint

    # ---- jobs (on the pipeline thread) ------------------------------------------------------
    def _rollout(self, items: list, seed: int) -> tuple:
        run = self.run
        t0 = time.perf_counter()
        trajs = run.pool.generate(get_recipe(run.cfg.recipe).requests(items), seed)
        t1 = time.perf_counter()
        totals, comps = run.reward.score_values(trajs)
        pool = run.pool.metrics()  # here, between two jobs: the driver thread never waits on the pool's lock
        return trajs, totals, comps, {"rollout_s": t1 - t0, "reward_s": time.perf_counter() - t1, "pool": pool}

    def _deliver(self, handle: Any) -> float:
        return self.run.sync_version(handle)  # collective sync: the version staged at publish time

    # ---- the driver's side ------------------------------------------------------------------
    def fill(self, step: int, last: int) -> None:
        """Queue batches up to ``min(step + depth, last)`` (``last``: the last step before a checkpoint, an
        evaluation or the end), drawing their prompts now, in step order."""
        nxt = self.inflight[-1].step + 1 if self.inflight else step
        while nxt <= min(step + self.depth, last):
            before = self.run.sampler.state_dict()
            items = self.run.sampler.next_batch()
            kept = self.carried.pop(nxt, None)
            if kept is None:
                fut = self.jobs.submit(self._rollout, items, rollout_seed(self.run.cfg.seed, nxt))
                version = self.run.version  # its delivery is queued before this batch (or done)
            else:
                fut, version = self._restored(kept, items), kept.version
            self.inflight.append(InFlight(nxt, items, before, fut, version))
            nxt += 1

    @staticmethod
    def _restored(b: CarriedBatch, items: list) -> cf.Future:
        ids = tuple(i.prompt_id for i in items)
        if ids != b.prompt_ids:
            raise CheckpointError(f"the checkpoint's batch of step {b.step} holds prompts {list(b.prompt_ids)[:4]}, "
                                  f"the sampler draws {list(ids)[:4]} (resume with the same config)")
        fut: cf.Future = cf.Future()
        fut.set_result((b.trajectories, b.totals, b.components, {"rollout_s": 0.0, "reward_s": 0.0, "pool": b.pool}))
        return fut

    def take(self, step: int, timeout_s: float) -> tuple[list, tuple]:
        """Step ``step``'s batch: (items, (trajectories, totals, components, timings)), waiting at most
        ``timeout_s``."""
        head = self.inflight[0]
        if head.step != step:
            raise RuntimeError(f"the rollout pipeline holds step {head.step} first, the learner is at step {step}")
        try:
            out = head.result.result(timeout=timeout_s)
        except cf.TimeoutError:
            raise TimeoutError(f"step {step}'s rollout did not finish within {timeout_s:g} s") from None
        self.inflight.popleft()
        return head.items, out

    def deliver_later(self, handle: Any) -> None:
        """Queue the delivery of a published version behind the batches queued so far."""
        self.deliveries.append(self.jobs.submit(self._deliver, handle))
        while self.deliveries and self.deliveries[0].done():
            self.last_sync_s = self.deliveries.popleft().result()

    def drain(self, timeout_s: float) -> None:
        """Wait until every queued job has finished (before an evaluation or a checkpoint)."""
        for b in self.inflight:
            b.result.result(timeout=timeout_s)
        while self.deliveries:
            self.last_sync_s = self.deliveries.popleft().result(timeout=timeout_s)

    def served_sampler_state(self) -> dict | None:
        """The sampler state before the oldest batch in flight (None: nothing in flight)."""
        return self.inflight[0].sampler_before if self.inflight else None

    def carry(self, version: int, wait_s: float) -> list[CarriedBatch]:
        """The batches in flight generated under versions older than ``version`` (the checkpoint's), in step
        order, each waited for at most ``wait_s``; the first one that failed, is not done in time, holds
        trajectories of another version, or whose wait a stop signal ends, ends the list."""
        out = []
        for b in self.inflight:
            if b.version >= version:
                break
            try:
                trajs, totals, comps, done = b.result.result(timeout=wait_s)
            except KeyboardInterrupt:  # a second Ctrl-C: stop waiting, save what is done
                break
            except Exception:  # noqa: BLE001 - failed, cancelled or not done in time: generated again on resume
                break
            if any(t.policy_version != b.version for t in trajs):
                break
            out.append(CarriedBatch(b.step, b.version, tuple(i.prompt_id for i in b.items), trajs, totals, comps,
                                    done["pool"]))
        return out

    def restore(self, batches: list[CarriedBatch]) -> None:
        """Batches a checkpoint carried: ``fill`` hands them out at their steps."""
        self.carried = {b.step: b for b in batches}

    def discard(self) -> None:
        """Forget the batches in flight (the run stops or rewinds; their prompts are drawn again)."""
        for b in self.inflight:
            b.result.cancel()
        self.inflight.clear()

    def shutdown(self) -> None:
        self.discard()
        self.jobs.shutdown(wait=False, cancel_futures=True)
