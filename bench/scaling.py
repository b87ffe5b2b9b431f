"""Rollout scaling: 1 vs 2 rollout workers on the rollout alone (``RolloutPool.generate`` of one step's
prompts: 16 prompts x 4, 64 new tokens, the CLEAR recipe with images, the medium LM by default), the
same ``Run`` scaled between blocks (``RolloutPool.scale``); rollout samples/s ratio.

On a 2-core box the ceiling is 2x for the rollout and less for the step: the two workers share the two
cores with the learner, the reward actor, the driver and Ray's own processes (and with whatever else
runs on the box), and one rollout call is split into 2 chunks, so the slower chunk decides.

    python -m bench.scaling [--reps 3] [--steps 4] [--lm medium|tiny]
"""

from __future__ import annotations

import argparse
import time

from bench.common import MEDIUM_LM, PeakMemory, bench_config, median, quiet, start_run, stop_run


def block(run, n: int) -> list[float]:
    from recipes.clear import clear_request

    times = []
    for _ in range(n):
        reqs = [clear_request(i) for i in run.sampler.next_batch()]
        t0 = time.perf_counter()
        run.pool.generate(reqs, run.step)
        times.append(time.perf_counter() - t0)
        run.step += 1
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--lm", choices=["tiny", "medium"], default="medium",
                   help="medium: compute-bound decoding; tiny: per-token call latency dominates")
    args = p.parse_args(argv)
    quiet()
    cfg = bench_config({"rollout.num_workers": 1, "rollout.max_new_tokens": args.max_new_tokens,
                        "rollout.prompts_per_step": args.prompts, "algorithm.zero_variance": "zero"},
                       lm=MEDIUM_LM if args.lm == "medium" else None)
    n = args.prompts * cfg.rollout.group_size
    res = {1: [], 2: []}
    with PeakMemory() as mem:
        run = start_run(cfg)
        try:
            block(run, 1)
            for i in range(args.reps):
                for w in (1, 2):
                    run.pool.scale(w)
                    block(run, 1)  # first call on a new worker: lazy inits
                    res[w].extend(block(run, args.steps))
                print(f"  rep {i}: rollout 1 worker {median(res[1]):.3f} s, 2 workers {median(res[2]):.3f} s",
                      flush=True)
        finally:
            stop_run(run)
    for w in (1, 2):
        r = median(res[w])
        print(f"{w} worker(s): rollout {r:.3f} s ({n / r:.1f} samples/s)")
    print(mem.line())
    print(f"rollout samples/s ratio 2/1 workers: {median(res[1]) / median(res[2]):.2f}x")


if __name__ == "__main__":
    main()
