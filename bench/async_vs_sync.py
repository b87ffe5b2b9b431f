"""Async vs sync: the same run (same Run, same actors) in ``algorithm.mode: async`` with
``max_staleness: 1`` (step t+1's rollout overlaps step t's learning) against ``sync``; steps/s ratio.

The config: the tiny default model, 8 prompts x 4, 56 new tokens; 1 rollout worker on 1 core, 1 learner
on the other (the sync split is printed: on the 2-core box the rollout takes about twice the learning). Overlap can only
pay off where cores are idle: on a shared 2-core box under load it cannot. Blocks alternate on one ``Run`` (sync, async, sync, async, ...);
an async block starts with one priming step and ends with one draining step, neither timed.

    python -m bench.async_vs_sync [--reps 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import time

from bench.common import PeakMemory, bench_config, median, quiet, start_run, stop_run


def sync_block(run, n: int) -> tuple[list[float], list[dict]]:
    run.cfg = run.cfg.model_copy(update={"algorithm": run.cfg.algorithm.model_copy(update={"mode": "sync"})})
    times, ms = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        m, _ = run.rl_step()
        times.append(time.perf_counter() - t0)
        ms.append(m)
    return times, ms


def async_block(run, n: int) -> list[float]:
    run.cfg = run.cfg.model_copy(update={"algorithm": run.cfg.algorithm.model_copy(update={"mode": "async"})})
    _, pre = run.rl_step()  # priming: a sync rollout, then the next one is prefetched
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        _, pre = run.rl_step(pre)
        times.append(time.perf_counter() - t0)
    run.cfg = run.cfg.model_copy(update={"algorithm": run.cfg.algorithm.model_copy(update={"mode": "sync"})})
    run.rl_step(pre)  # drain the prefetched rollout
    return times


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
                        "algorithm.max_staleness": 1})
    with PeakMemory() as mem:
        run = start_run(cfg)
        s_t, a_t, splits = [], [], []
        try:
            sync_block(run, 1)  # warm-up
            for i in range(args.reps):
                t, ms = sync_block(run, args.steps)
                s_t += t
                splits += ms
                a_t += async_block(run, args.steps)
                print(f"  rep {i}: sync {median(s_t):.3f} s/step, async {median(a_t):.3f} s/step", flush=True)
        finally:
            stop_run(run)
    split = {k: median([m[k] for m in splits]) for k in ("time/rollout_s", "time/reward_s", "time/learn_s",
                                                          "time/sync_s")}
    print("sync step split (medians): " + ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in split.items()))
    print(f"sync {median(s_t):.3f} s/step, async (max_staleness 1) {median(a_t):.3f} s/step")
    print(mem.line())
    print(f"async/sync steps per second: {median(s_t) / median(a_t):.2f}x")


if __name__ == "__main__":
    main()
