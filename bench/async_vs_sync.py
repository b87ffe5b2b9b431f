"""Async vs sync: the same run (same Run, same actors) in ``algorithm.mode: async`` with
``max_staleness`` 1 and 2 (that many batches generated and scored ahead of the learner,
``services.pipeline``) against ``sync``; steps/s ratios.

The config: the tiny default model, 8 prompts x 4, 56 new tokens; 1 rollout worker on 1 core, 1 learner
on the other (the sync split is printed). Overlap can only pay off where cores are idle: on a shared 2-core
box under load it cannot. Blocks alternate on one ``Run`` (sync, async 1, async 2, sync, ...); an async block
starts by filling its pipeline (the first step is not timed) and ends by draining it.

    python -m bench.async_vs_sync [--reps 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

from bench.common import PeakMemory, bench_config, median, quiet, start_run, stop_run


def block(run, n: int, depth: int) -> tuple[list[float], list[dict]]:
    """``n`` timed steps in sync mode (``depth`` 0) or async with ``depth`` batches in flight."""
    from services.pipeline import RolloutPipeline

    run.pipeline = RolloutPipeline(run, depth) if depth else None
    times, ms = [], []
    try:
        if depth:
            run.rl_step()  # fills the pipeline
        for _ in range(n):
            t0 = time.perf_counter()
            ms.append(run.rl_step())
            times.append(time.perf_counter() - t0)
        run.settle()
    finally:
        if run.pipeline is not None:
            run.pipeline.shutdown()
        run.pipeline = None
    return times, ms


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=56)
    p.add_argument("--prompts", type=int, default=8)
    args = p.parse_args(argv)
    quiet()
    cfg = bench_config({"rollout.num_workers": 1, "rollout.max_new_tokens": args.max_new_tokens,
                        "rollout.prompts_per_step": args.prompts, "algorithm.zero_variance": "zero",
                        "algorithm.max_staleness": 2, "algorithm.eval_every": 0})
    times: dict[int, list[float]] = {0: [], 1: [], 2: []}
    splits: list[dict] = []
    with PeakMemory() as mem:
        run = start_run(cfg)
        try:
            block(run, 1, 0)  # warm-up
            for i in range(args.reps):
                for depth in (0, 1, 2):
                    t, ms = block(run, args.steps, depth)
                    times[depth] += t
                    splits += ms if depth == 0 else []
                print(f"  rep {i}: " + ", ".join(f"{'sync' if d == 0 else f'async {d}'} {median(t):.3f} s/step"
                                                  for d, t in times.items()), flush=True)
        finally:
            stop_run(run)
    split = {k: median([m[k] for m in splits]) for k in ("time/rollout_s", "time/reward_s", "time/learn_s",
                                                          "time/sync_s")}
    print("sync step split (medians): " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in split.items()))
    print(mem.line())
    s = median(times[0])
    print(f"async/sync steps per second: max_staleness 1 {s / median(times[1]):.2f}x, "
          f"max_staleness 2 {s / median(times[2]):.2f}x")


if __name__ == "__main__":
    main()
