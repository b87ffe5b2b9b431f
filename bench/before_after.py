"""The rollout hot paths before and after the issue-6 changes, side by side in one process: the HF text
engine (``rollout/engine.py``) and the SDE window sampler (``policy/sde.py``) as of commit ``BEFORE``
(loaded from git) against the working tree, on the same policy, requests, seeds and thread count.
Checks that both give the same tokens and log-probs, then times interleaved repetitions (medians).

    python -m bench.before_after [--reps 8]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import MEDIUM_LM, PeakMemory, machine

BEFORE = "9a66911"
ROOT = Path(__file__).resolve().parents[1]


def _old_module(path: str, name: str):
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    f = Path(tempfile.mkdtemp()) / f"{name}.py"
    f.write_text(src)
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _time(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def engine_ab(lm: dict, reps: int) -> tuple[float, float, int, float]:
    from policy.config import PolicyConfig
    from policy.model import UnifiedPolicy
    from policy.prompting import encode_prompt
    from rollout import engine as new

    old = _old_module("rollout/engine.py", "engine_before")
    p = UnifiedPolicy.from_config(PolicyConfig(lm_tiny=lm)).eval()
    ids = p.token_ids
    s = new.SamplingSettings(1.0, 1.0, (ids["eos"], ids["gen"]))
    reqs = []  # 8 prompts x 4 samples, images on most, 32 new tokens
    for k in range(8):
        img = k % 4 != 0
        lat = torch.randn(1, *p.latent_shape) if img else torch.zeros((0, *p.latent_shape))
        prompt = encode_prompt(p.tokenizer, f"what colour is shape {k}? A) red B) blue C) green", p.n_image_tokens,
                               with_image=img)
        reqs += [new.TextRequest(prompt, lat, 32) for _ in range(4)]
    e_new, e_old = new.HFTextEngine(p), old.HFTextEngine(p)
    a = e_new.generate(reqs, s, torch.Generator().manual_seed(3))
    b = e_old.generate(reqs, s, torch.Generator().manual_seed(3))
    same = sum(x.token_ids == y.token_ids and x.finish == y.finish for x, y in zip(a, b))
    gap = max((abs(u - v) for x, y in zip(a, b) for u, v in zip(x.logprobs, y.logprobs)), default=0.0)
    t_old, t_new = [], []
    for _ in range(reps):
        t_old += _time(lambda: e_old.generate(reqs, s, torch.Generator().manual_seed(3)), 1)
        t_new += _time(lambda: e_new.generate(reqs, s, torch.Generator().manual_seed(3)), 1)
    return statistics.median(t_old), statistics.median(t_new), same, gap


def sde_ab(reps: int) -> tuple[float, float, float, float]:
    from policy import sde as new
    from policy.config import PolicyConfig
    from policy.model import UnifiedPolicy

    old = _old_module("policy/sde.py", "sde_before")
    p = UnifiedPolicy.from_config(PolicyConfig()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc, pooled = p.condition(torch.randn(32, p.cfg.cond_tokens, p.lm.config.hidden_size, generator=g),
                                  p.cfg.cond_tokens)
    noise, sig = torch.randn((32, *p.latent_shape), generator=g), new.flow_sigmas(8)

    def vel(x, s):
        return p.velocity(x, s, enc, pooled)

    res = {"old_sde": [], "old_ode": [], "new_sde": [], "new_ode": []}
    with torch.no_grad():
        for r in range(reps):
            for tag, mod in (("old", old), ("new", new)):
                gen = torch.Generator().manual_seed(r)
                starts = new.window_starts(32, 8, 2, "random", 0, gen)
                res[f"{tag}_sde"] += _time(lambda mod=mod, starts=starts, gen=gen: mod.sample_latents(
                    vel, noise, sig, 2, 0.7, starts, gen), 1)
                res[f"{tag}_ode"] += _time(lambda mod=mod: mod.sample_ode(vel, noise, sig), 1)
    m = {k: statistics.median(v) for k, v in res.items()}
    return m["old_sde"], m["old_ode"], m["new_sde"], m["new_ode"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # a rollout worker's
    print(machine(), flush=True)
    with PeakMemory() as mem:
        rows = {size: engine_ab(lm, args.reps) for size, lm in (("tiny", {}), ("medium", MEDIUM_LM))}
        sde = sde_ab(args.reps * 2)
    for size, (t_old, t_new, same, gap) in rows.items():
        print(f"HF engine, {size} LM, 8 prompts x 4, 32 new tokens: before {t_old * 1e3:.0f} ms, after "
              f"{t_new * 1e3:.0f} ms ({t_old / t_new:.2f}x); identical tokens {same}/32, max log-prob gap {gap:.1e}")
    o_s, o_o, n_s, n_o = sde
    print(f"SDE window sampler, tiny DiT, batch 32, 8 steps, window 2: before {o_s * 1e3:.1f} ms "
          f"(+{(o_s / o_o - 1) * 100:.1f}% over its Euler), after {n_s * 1e3:.1f} ms (+{(n_s / n_o - 1) * 100:.1f}% "
          f"over its Euler); Euler before {o_o * 1e3:.1f} ms, after {n_o * 1e3:.1f} ms")
    print(mem.line())
    print("engine speed-up after/before: " + ", ".join(f"{k} {v[0] / v[1]:.2f}x" for k, v in rows.items()))


if __name__ == "__main__":
    main()
