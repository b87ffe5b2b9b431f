"""Profile the hot paths in one process (no Ray): the rollout (``RolloutWorker.generate``) and the
learner step (``LearnerWorker.train_step``), with the torch profiler's op table or under py-spy:

    python -m bench.profile_paths rollout [--lm medium] [--tokens 16]         # torch profiler table
    py-spy record -o rollout.svg -- python -m bench.profile_paths rollout --plain
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import MEDIUM_LM, bench_config


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["rollout", "learn"])
    p.add_argument("--lm", default="tiny", choices=["tiny", "medium"])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--plain", action="store_true", help="no torch profiler (for py-spy)")
    p.add_argument("--text-only", action="store_true")
    args = p.parse_args(argv)
    from bench.common import text_task
    from bench.overhead import LocalStep
    from learner.sharding import shard_batch
    from recipes.clear import clear_request
    from services.step_batch import assemble

    changes = {"rollout.num_workers": 1, "rollout.max_new_tokens": args.tokens,
               "rollout.prompts_per_step": args.prompts, "algorithm.zero_variance": "zero"}
    if args.text_only:
        changes.update({"task.name": "jsonl", "task.path": text_task(), "rollout.max_images": 0})
    cfg = bench_config(changes, lm=MEDIUM_LM if args.lm == "medium" else None)
    local = LocalStep(cfg)
    reqs = [clear_request(i) for i in local.sampler.next_batch()]
    trajs = local.worker.generate(reqs, 0)
    totals, comps = local.reward.score_values(trajs)
    batch = assemble(trajs, totals, comps, cfg, local.version).collate(local.pad_id)

    def once():
        if args.what == "rollout":
            local.worker.generate(reqs, 1)
        else:
            local.learner.train_step(shard_batch(batch, cfg.learner.mini_batches, 1)[0])

    once()
    if args.plain:
        t0 = time.perf_counter()
        for _ in range(args.reps):
            once()
        print(f"{args.what}: {(time.perf_counter() - t0) / args.reps * 1e3:.1f} ms per call")
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.reps):
            once()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
