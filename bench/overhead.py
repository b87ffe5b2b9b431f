"""Orchestration overhead: one ``Run.rl_step`` (Ray: rollout worker, reward actor, DeepSpeed learner,
object-store weight sync) against the same computation in this process with no Ray.

The in-process side builds the same plain classes the actors wrap (``RolloutWorker``, ``RewardActor``,
``LearnerWorker`` with its DeepSpeed engine) from the same config and runs: sample prompts -> rollout
(``RolloutWorker.generate``) -> reward -> ``assemble`` + ``collate`` -> ``LearnerWorker.train_step`` ->
copy the trainable weights into the rollout policy. One rollout worker on the Ray side and one torch
thread everywhere (what each actor gets), so both sides do the same work serially; the difference is
Ray (serialisation, object store, actor calls, scheduling), the driver's bookkeeping and the bucketed sync.
Each Ray block starts its own cluster and stops it before the in-process block, so the in-process side
does not share the box with an idle cluster (which would understate the overhead); and each block, on
either side, starts from the initial weights, optimizer state and prompt order with the same seeds, so
both sides sample the same tokens and do the same work.

    python -m bench.overhead [--reps 3] [--steps 2]
Prints (step - compute) / step from the medians.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from bench.common import MEDIUM_LM, PeakMemory, bench_config, median, quiet, start_run, stop_run


class LocalStep:
    """The computation of one rl_step, in one process."""

    def __init__(self, cfg) -> None:
        import torch

        from learner.actor import LearnerWorker
        from policy.build import build_tokenizer
        from policy.tokenizer import special_token_ids
        from recipes import get_recipe
        from reward.actor import RewardActor
        from rollout.worker import RolloutWorker
        from services.cluster import rollout_settings
        from services.driver import task_dataset
        from sync.nccl import free_port
        from tasks.sampler import PromptSampler

        self.cfg = cfg
        self.worker = RolloutWorker(0, cfg.model, rollout_settings(cfg), "hf", None,
                                    cfg.learner.sync.backend, get_recipe(cfg.recipe).rollout, 1)
        L = cfg.learner
        self.learner = LearnerWorker(0, 1, "127.0.0.1", free_port(), cfg.model, L, cfg.algorithm, cfg.sft,
                                     cfg.seed, 1, cfg.rollout.sde)
        self.learner.set_sampling(cfg.rollout.temperature, cfg.rollout.sde.noise_level)
        self.learner.snapshot_reference()
        self.reward = RewardActor([c.model_dump() for c in cfg.reward.components])
        self.sampler = PromptSampler(task_dataset(cfg, "train"), cfg.rollout.prompts_per_step, cfg.seed)
        self.pad_id = special_token_ids(build_tokenizer(cfg.model))["pad"]
        self.version = 0
        self.step_i = 0
        torch.set_num_threads(1)
        self._start = tempfile.mkdtemp(prefix="unigrpo-bench-local-")
        self.learner.save(self._start)  # the initial weights and (empty) optimizer state
        self._sampler_start = self.sampler.state_dict()
        self._sync()

    def reset(self) -> None:
        """Back to the initial weights, optimizer state and prompt order: a fresh ``Run`` starts from the
        same ones (same config seed), so with the same seeds both sides then sample and train on the same
        tokens. (Without this the two sides' weights drift apart and with them how long the samples are:
        the sampled length, not Ray, decided the difference.)"""
        self.learner.load(self._start)
        self.sampler.load_state_dict(self._sampler_start)
        self.version = self.step_i = 0
        self._sync()

    def _sync(self) -> None:
        self.version += 1
        state = {k: v.detach() for k, v in self.learner.policy.trainable_state_dict().items()}
        self.worker.engine.load_weights(state.items())
        self.worker.policy_version = self.version

    def __call__(self) -> None:
        from learner.sharding import shard_batch
        from recipes.clear import clear_request
        from services.step_batch import assemble

        items = self.sampler.next_batch()
        trajs = self.worker.generate([clear_request(i) for i in items], (self.cfg.seed * 100003 + self.step_i) * 1009)
        totals, comps = self.reward.score_values(trajs)
        step = assemble(trajs, totals, comps, self.cfg, self.version)
        if step.kept:
            self.learner.train_step(shard_batch(step.collate(self.pad_id), self.cfg.learner.mini_batches, 1)[0])
        self._sync()
        self.step_i += 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="timed steps per block")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per block: a fresh process's first steps page in its allocator's memory")
    args = p.parse_args(argv)
    quiet()
    cfg = bench_config({"rollout.num_workers": 1, "rollout.max_new_tokens": args.max_new_tokens,
                        "rollout.prompts_per_step": args.prompts, "algorithm.zero_variance": "zero"}, lm=MEDIUM_LM)
    with PeakMemory() as mem:
        local = LocalStep(cfg)
        ray_s, local_s, splits = [], [], []
        for i in range(args.reps):  # both sides from the initial weights each rep: the same work
            run = start_run(cfg)  # a fresh cluster, stopped before the in-process block
            try:
                for _ in range(args.warmup):
                    run.rl_step()
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    m = run.rl_step()
                    ray_s.append(time.perf_counter() - t0)
                    splits.append(m)
            finally:
                stop_run(run)
            local.reset()
            for _ in range(args.warmup):
                local()
            for _ in range(args.steps):
                t0 = time.perf_counter()
                local()
                local_s.append(time.perf_counter() - t0)
            print(f"  rep {i}: Ray step {median(ray_s[-args.steps:]):.3f} s, in-process "
                  f"{median(local_s[-args.steps:]):.3f} s", flush=True)
    step, compute = median(ray_s), median(local_s)
    split = {k: median([m[k] for m in splits]) for k in ("time/rollout_s", "time/reward_s", "time/learn_s",
                                                          "time/sync_s")}
    print("Ray step split (medians): " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in split.items()))
    print(f"unigrpo step {step:.3f} s, same computation in one process {compute:.3f} s "
          f"({cfg.rollout.prompts_per_step} prompts x {cfg.rollout.group_size}, {cfg.rollout.max_new_tokens} "
          f"new tokens, medium LM)" + ("" if step >= 1.0 else "  (step < 1 s: raise --prompts or --max-new-tokens)"))
    print(mem.line())
    print(f"overhead (step - compute) / step: {(step - compute) / step * 100:.1f}%")


if __name__ == "__main__":
    main()
