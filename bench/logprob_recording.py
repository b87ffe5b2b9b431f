"""Log-prob recording: latent sampling with the stochastic window and its log-probs
(``policy.sde.sample_latents``, what rollouts run) against plain Euler sampling (``policy.sde.sample_ode``)
of the same generator, the same conditioning, the same noise and the same number of steps.

The generator is the policy's DiT built from the config: ``tiny`` is the embedded default's (2 layers,
width 32), ``medium`` 4 layers of width 64 (``SIZES``); 8x8x4 latents (32x32 images), 32 conditioning
tokens, one torch thread (a rollout worker's). Repetitions alternate their order (SDE ODE, ODE SDE, ...);
medians.

    python -m bench.logprob_recording [--reps 30] [--batch 32] [--steps 8] [--window 2]
Prints the extra time of recording in percent.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import PeakMemory, machine, median

SIZES = {
    "tiny": {},
    "medium": {"generator_tiny": {"num_layers": 4, "attention_head_dim": 16, "num_attention_heads": 4,
                                  "joint_attention_dim": 64, "caption_projection_dim": 64,
                                  "pooled_projection_dim": 64}},
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--window", type=int, default=2)
    p.add_argument("--sizes", default="tiny,medium")
    p.add_argument("--threads", type=int, default=1, help="torch threads (a rollout worker has 1)")
    args = p.parse_args(argv)
    from policy.config import PolicyConfig
    from policy.model import UnifiedPolicy
    from policy.sde import flow_sigmas, sample_latents, sample_ode, window_starts

    torch.set_num_threads(args.threads)
    print(machine(), flush=True)
    results = {}
    with PeakMemory() as mem:
        for size in args.sizes.split(","):
            policy = UnifiedPolicy.from_config(PolicyConfig(**SIZES[size])).eval()
            g = torch.Generator().manual_seed(0)
            hidden = torch.randn(args.batch, policy.cfg.cond_tokens, policy.lm.config.hidden_size, generator=g)
            with torch.no_grad():
                enc, pooled = policy.condition(hidden, policy.cfg.cond_tokens)
            noise = torch.randn((args.batch, *policy.latent_shape), generator=g)
            sigmas = flow_sigmas(args.steps)

            def velocity(x, s, enc=enc, pooled=pooled, policy=policy):
                return policy.velocity(x, s, enc, pooled)

            sde_s, ode_s = [], []
            with torch.no_grad():
                for rep in range(args.reps + 1):
                    gen = torch.Generator().manual_seed(rep)

                    def sde(gen=gen, noise=noise, sigmas=sigmas, velocity=velocity):
                        starts = window_starts(args.batch, args.steps, args.window, "random", 0, gen)
                        sample_latents(velocity, noise, sigmas, args.window, 0.7, starts, gen)

                    def ode(noise=noise, sigmas=sigmas, velocity=velocity):
                        sample_ode(velocity, noise, sigmas)

                    order = [(sde, sde_s), (ode, ode_s)]
                    for fn, out in order if rep % 2 else order[::-1]:  # A B, B A, ...: no order bias
                        t0 = time.perf_counter()
                        fn()
                        if rep:
                            out.append(time.perf_counter() - t0)
            n_gen = sum(p.numel() for p in policy.generator.parameters())
            results[size] = (median(sde_s), median(ode_s), n_gen, tuple(policy.latent_shape))
    for size, (sde, ode, n_gen, shape) in results.items():
        print(f"{size:>6} (DiT {n_gen / 1e6:.2f}M params, latent {shape}, batch {args.batch}, {args.steps} steps, "
              f"window {args.window}): SDE+log-probs {sde * 1e3:.1f} ms, Euler {ode * 1e3:.1f} ms, "
              f"extra {(sde / ode - 1) * 100:+.1f}%")
    print(mem.line())
    print("log-prob recording extra time: " + ", ".join(f"{s} {(v[0] / v[1] - 1) * 100:+.1f}%"
                                                         for s, v in results.items()))


if __name__ == "__main__":
    main()
