"""Rollout scaling: 1 vs 2 rollout workers on a rollout-bound config (long responses, a small learner
step), the same ``Run`` scaled between blocks (``RolloutPool.scale``); rollout samples/s and step ratio.

On a 2-core box the ceiling is 2x for the rollout and less for the step: the two workers share the two
cores with the learner, the reward actor, the driver and Ray's own processes (and with whatever else
runs on the box), and one rollout call is split into 2 chunks, so the slower chunk decides.

    python -m bench.scaling [--reps 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

from bench.common import PeakMemory, bench_config, machine, median, start_run, stop_run


def block(run, n: int) -> tuple[list[float], list[float]]:
    roll, step = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        m, _ = run.rl_step()
        step.append(time.perf_counter() - t0)
        roll.append(m["time/rollout_s"])
    return roll, step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    print(machine(), flush=True)
    cfg = bench_config({"rollout.num_workers": 1, "rollout.max_new_tokens": args.max_new_tokens,
                        "rollout.prompts_per_step": args.prompts, "algorithm.zero_variance": "zero"})
    n = args.prompts * cfg.rollout.group_size
    res = {1: ([], []), 2: ([], [])}
    with PeakMemory() as mem:
        run = start_run(cfg)
        try:
            block(run, 1)
            for i in range(args.reps):
                for w in (1, 2):
                    run.pool.scale(w)
                    block(run, 1)  # first call on a new worker: lazy inits
                    r, s = block(run, args.steps)
                    res[w][0].extend(r)
                    res[w][1].extend(s)
                print(f"  rep {i}: rollout 1 worker {median(res[1][0]):.3f} s, 2 workers {median(res[2][0]):.3f} s",
                      flush=True)
        finally:
            stop_run(run)
    for w in (1, 2):
        r, s = median(res[w][0]), median(res[w][1])
        print(f"{w} worker(s): rollout {r:.3f} s ({n / r:.1f} samples/s), step {s:.3f} s ({n / s:.1f} samples/s)")
    step_ratio = median(res[1][1]) / median(res[2][1])
    print(f"step ratio 2/1 workers: {step_ratio:.2f}x")
    print(mem.line())
    print(f"rollout samples/s ratio 2/1 workers: {median(res[1][0]) / median(res[2][0]):.2f}x")


if __name__ == "__main__":
    main()
