"""unigrpo vs TRL's GRPOTrainer on the same text-only task; prints samples/s of each and the ratio.

Same: the Qwen2 LM of ``UnifiedPolicy`` built from the config (same seed, same weights) and the project's
tokenizer; the same text-only prompts (shapes-VQA questions with choices, no image); B prompts x G
samples per step; the same response length (``max_new_tokens`` = TRL ``max_completion_length``),
temperature 1, top_p 1; the same reward (answer + 0.1 x format, ``reward.registry``); the same loss
(token-level mean over the batch with clip 0.2 / 0.28, beta 0: unigrpo ``agg: token-mean`` = TRL
``loss_type: dapo``; group std-scaled advantages; zero-variance groups kept); the same optimizer (AdamW
lr 2e-4, betas (0.9, 0.999), weight decay 0, grad-norm clip 1, constant lr); one optimizer step per batch.

unigrpo runs as the real service: ``services.driver.Run.rl_step`` over a local Ray cluster (2 rollout
workers of 1 thread each, 1 reward actor, 1 DeepSpeed learner with 2 threads: ``learner.num_cpus_per_worker:
2``, since in sync mode the rollout workers are idle while it learns; object-store weight sync every
step). TRL runs in this process (``use_cpu``, 2 torch threads: the whole box) with no Ray cluster up: each
unigrpo block starts its own cluster (weights version 1, three warm-up steps) and stops it before the TRL
block (an idle cluster takes ~10% of a core, which slowed TRL's step by 10-15%). Steps are timed per step
(TRL through a callback); the first step of each block is dropped. Blocks are interleaved (unigrpo, TRL,
unigrpo, TRL, ...) and medians reported.

    python -m bench.vs_trl [--reps 3] [--steps 3] [--sizes tiny,medium] [--learner-cpus 2] [--set K=V ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import yaml

from bench.common import (
    MEDIUM_LM,
    PeakMemory,
    bench_config,
    median,
    quiet,
    start_run,
    stop_run,
    text_task,
)

B, G = 8, 4


SPLIT = ("time/rollout_s", "time/learn_s", "time/reward_s", "time/sync_s")


def _unigrpo_block(run, steps: int) -> tuple[list[float], dict[str, float]]:
    """Step times (the first dropped) and the median split of the kept steps."""
    times, splits = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        m = run.rl_step()
        times.append(time.perf_counter() - t0)
        splits.append(m)
    return times[1:], {k.split("/")[1]: median([m[k] for m in splits[1:]]) for k in SPLIT}


def _trl_trainer(cfg, task_path: str, steps: int, out_dir: str):
    import datasets
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from policy.model import UnifiedPolicy
    from policy.tokenizer import special_token_ids
    from reward.registry import RewardSet
    from tasks import build_dataset
    from tasks.items import format_prompt

    policy = UnifiedPolicy.from_config(cfg.model)
    lm, tok = policy.lm, policy.tokenizer
    items = list(build_dataset("jsonl", path=task_path))
    # unigrpo's prompt body is "\n" + text + "\n" (policy.prompting.encode_prompt, no image slot)
    rows = [{"prompt": "\n" + format_prompt(it) + "\n", "answer": it.answer, "choices": it.choices}
            for it in items]
    ds = datasets.Dataset.from_list(rows)
    reward_set = RewardSet([c.model_dump() for c in cfg.reward.components])

    def reward(prompts, completions, answer, choices, **_):
        trajs = [{"response_text": c, "meta": {"answer": a, "choices": ch, "answer_type": "choice"}}
                 for c, a, ch in zip(completions, answer, choices)]
        return reward_set.combine(trajs)[0]

    r, L, a = cfg.rollout, cfg.learner, cfg.algorithm
    args = GRPOConfig(
        output_dir=out_dir, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6,
        max_steps=steps, per_device_train_batch_size=B * G, gradient_accumulation_steps=1, num_generations=G,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
        beta=a.beta_text, epsilon=a.clip_low, epsilon_high=a.clip_high, loss_type="dapo",
        scale_rewards="group", num_iterations=1, mask_truncated_completions=False,
        learning_rate=L.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=L.weight_decay,
        adam_beta1=L.betas[0], adam_beta2=L.betas[1], max_grad_norm=L.grad_clip,
        seed=cfg.seed, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=True,
    )
    lm.generation_config.pad_token_id = special_token_ids(tok)["pad"]
    lm.generation_config.eos_token_id = special_token_ids(tok)["eos"]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    trainer = GRPOTrainer(model=lm, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[timer])
    return trainer, timer


def _trl_block(cfg, task_path: str, steps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        trainer, timer = _trl_trainer(cfg, task_path, steps, d)
        trainer.train()
    return timer.times[1:]


def medium_lm(layers: int, hidden: int) -> dict:
    """``bench.common.MEDIUM_LM`` with ``layers`` layers ``hidden`` wide (heads of 64, MLP 3x wide)."""
    return {**MEDIUM_LM, "num_hidden_layers": layers, "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_attention_heads": max(1, hidden // 64)}


def compare(size: str, reps: int, steps: int, task_path: str, learner_cpus: float = 2.0, medium_layers: int = 8,
            changes: dict | None = None, medium_hidden: int = 256) -> dict:
    lm = medium_lm(medium_layers, medium_hidden) if size == "medium" else None
    cfg = bench_config({"task.name": "jsonl", "task.path": task_path, "rollout.max_images": 0,
                        "rollout.prompts_per_step": B, "rollout.group_size": G, "rollout.max_new_tokens": 16,
                        "algorithm.zero_variance": "zero", "algorithm.agg": "token-mean",
                        "learner.num_cpus_per_worker": learner_cpus, **(changes or {})}, lm=lm)
    ours, theirs = [], []
    for i in range(reps):
        run = start_run(cfg)
        try:
            _unigrpo_block(run, 3)  # warm-up: lazy inits in every actor, a fresh process's allocator
            mine, split = _unigrpo_block(run, steps)
        finally:
            stop_run(run)
        other = _trl_block(cfg, task_path, steps)
        ours, theirs = ours + mine, theirs + other
        print(f"  [{size}] rep {i}: unigrpo {median(mine):.3f} s/step, TRL {median(other):.3f} s/step "
              f"(block ratio {median(other) / median(mine):.2f}x; all so far {median(ours):.3f} vs "
              f"{median(theirs):.3f}); unigrpo split " + ", ".join(f"{k} {v:.3f}" for k, v in split.items()),
              flush=True)
    n = B * G
    res = {"size": size, "unigrpo_s": median(ours), "trl_s": median(theirs),
           "unigrpo_sps": n / median(ours), "trl_sps": n / median(theirs)}
    res["ratio"] = res["unigrpo_sps"] / res["trl_sps"]
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="steps per block (the first of each is dropped)")
    p.add_argument("--sizes", default="tiny,medium")
    p.add_argument("--learner-cpus", type=float, default=2.0, help="learner.num_cpus_per_worker (= its threads)")
    p.add_argument("--medium-layers", type=int, default=8,
                   help="layers of the medium LM (bench.common.MEDIUM_LM otherwise): TRL's step must take >= 1 s")
    p.add_argument("--medium-hidden", type=int, default=256, help="width of the medium LM")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="unigrpo config change, e.g. --set learner.shared_prefix=false (the padded learner)")
    args = p.parse_args(argv)
    changes = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    quiet()
    task_path = text_task()
    results = []
    with PeakMemory() as mem:
        for size in args.sizes.split(","):
            results.append(compare(size, args.reps, args.steps, task_path, args.learner_cpus, args.medium_layers,
                                   changes, args.medium_hidden))
    for r in results:
        print(f"{r['size']:>6}: unigrpo {r['unigrpo_sps']:.1f} samples/s ({r['unigrpo_s']:.2f} s/step), "
              f"TRL {r['trl_sps']:.1f} samples/s ({r['trl_s']:.2f} s/step), ratio {r['ratio']:.2f}x"
              + ("" if r["size"] != "medium" or r["trl_s"] >= 1.0 else "  (TRL step < 1 s: raise --medium-layers)"))
    print(mem.line())
    print("ratio unigrpo/TRL samples/s: " + ", ".join(f"{r['size']} {r['ratio']:.2f}x" for r in results))


if __name__ == "__main__":
    main()
