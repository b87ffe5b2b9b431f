"""W learner ranks against one: GRPO step time, per-rank peak memory and the per-rank parameter memory
under ZeRO-3 (W = 2 should hold about half of W = 1's), on the same batch, in one run.

    python -m bench.learner_ranks [--steps 3]

A 2-core box cannot speed a step up with a second rank (the ranks share the cores and add a gloo
all-reduce); the figure to read here is the memory per rank. The last line prints the ratios.
"""

from __future__ import annotations

import argparse
import time

import ray
import torch

from bench.common import MEDIUM_LM, PeakMemory, bench_config, median, quiet


def _batch(cfg):
    from learner.batch import collate
    from policy.model import UnifiedPolicy
    from recipes.clear import clear_request
    from rollout.engine import HFTextEngine
    from rollout.interleaved import RolloutSettings, rollout
    from services.driver import task_dataset

    policy = UnifiedPolicy.from_config(cfg.model).eval()
    items = list(task_dataset(cfg, "train"))[: cfg.rollout.prompts_per_step]
    trajs = rollout(policy, HFTextEngine(policy), [clear_request(i) for i in items],
                    RolloutSettings(group_size=cfg.rollout.group_size, max_new_tokens=cfg.rollout.max_new_tokens), 1,
                    torch.Generator().manual_seed(0))
    adv = torch.randn(len(trajs), generator=torch.Generator().manual_seed(1))
    return collate(trajs, adv, policy.token_ids["pad"])


def main(argv: list[str] | None = None) -> None:
    from learner.group import LearnerGroup

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    quiet()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = {}
    with PeakMemory() as mem:
        for zero in (0, 3):
            for world in (1, 2):
                cfg = bench_config({"learner.num_workers": world, "learner.zero_stage": zero,
                                    "rollout.prompts_per_step": 4}, lm=MEDIUM_LM)
                batch = _batch(cfg)
                group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
                try:
                    group.train_step(batch)  # warm-up
                    times = []
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        group.train_step(batch)
                        times.append(time.perf_counter() - t0)
                    report = group.call_all("memory_report")
                finally:
                    group.shutdown()
                rows[(zero, world)] = (median(times), max(r["param_mib"] for r in report),
                                       max(r["peak_rss_mib"] for r in report))
                t, pm, rss = rows[(zero, world)]
                print(f"ZeRO-{zero} W={world}: step {t:.2f} s, parameters per rank {pm:.1f} MiB, "
                      f"peak RSS per rank {rss:.0f} MiB", flush=True)
    ray.shutdown()
    print(mem.line())
    z3 = rows[(3, 2)][1] / rows[(3, 1)][1]
    print(f"W=2 / W=1: step time x{rows[(0, 2)][0] / rows[(0, 1)][0]:.2f} (ZeRO-0), "
          f"x{rows[(3, 2)][0] / rows[(3, 1)][0]:.2f} (ZeRO-3); ZeRO-3 parameters per rank x{z3:.2f} "
          f"({rows[(3, 2)][1]:.1f} vs {rows[(3, 1)][1]:.1f} MiB); peak RSS per rank "
          f"x{rows[(3, 2)][2] / rows[(3, 1)][2]:.2f} (ZeRO-3)")


if __name__ == "__main__":
    main()
