"""Evaluation. ``evaluate(pool, cfg, reward=...)`` follows the recipe's ``evaluation`` (``recipes``): ``accuracy``
(CLEAR) measures answer accuracy on held-out images, clean and per degradation severity, with the generation
trigger rate and time per sample (greedy decoding through the rollout pool); ``heldout_reward`` (UAE, GvU)
measures the mean reward (and each component) on held-out prompts, scored by the run's reward actor. The
reconstruction benchmark (UAE's Unified-Score) is ``services.reconstruction``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from recipes import Recipe, get_recipe
from reward.answer import answer_reward
from services.config import RunConfig
from tasks import build_dataset
from tasks.items import PromptItem


# ------------------------------------------------------------------------------------------- evaluation
def eval_sets(cfg: RunConfig, severities: list[int] | None = None) -> dict[str, list[PromptItem]]:
    """The held-out split, clean and at each severity (every image degraded)."""
    t = cfg.task
    common = dict(size=t.eval_size, seed=cfg.seed, split="eval", image_size=t.image_size,
                  degradations=t.degradations, question_types=t.question_types,
                         shuffle_choices=t.shuffle_choices)
    sets = {"clean": list(build_dataset(t.name, **common, severities=[1], degrade_prob=0.0))}
    for s in severities or [3]:
        sets[f"severity{s}"] = list(build_dataset(t.name, **common, severities=[s], degrade_prob=1.0))
    return sets


def accuracy(pool, items: list[PromptItem], seed: int = 0, recipe: Recipe | None = None) -> dict[str, float]:
    """Greedy answers to ``items`` (requests of ``recipe``, default CLEAR): accuracy, trigger rate, time."""
    recipe = recipe or get_recipe("clear")
    t0 = time.perf_counter()
    trajs = pool.generate(recipe.requests(items), seed, {"group_size": 1, "temperature": 0.0})
    dt = time.perf_counter() - t0
    correct = [answer_reward(t.response_text, t.meta) for t in trajs]
    return {"accuracy": sum(correct) / len(correct), "trigger_rate": sum(t.generated_image for t in trajs) / len(trajs),
            "time_per_sample_s": dt / len(trajs)}


def heldout_reward(pool, reward, cfg: RunConfig) -> dict[str, float]:
    """``heldout_reward`` recipes (UAE / GvU): mean reward (total and per component) of one greedy / seeded
    sample per held-out prompt, scored by the run's reward actor (GvU: with the current policy weights)."""
    t = cfg.task
    items = list(build_dataset(t.name, size=t.eval_size, seed=cfg.seed, split="eval", image_size=t.image_size,
                               degradations=t.degradations, severities=[1], degrade_prob=0.0,
                               question_types=t.question_types, shuffle_choices=t.shuffle_choices))
    t0 = time.perf_counter()
    trajs = pool.generate(get_recipe(cfg.recipe).requests(items, t.image_size), cfg.seed,
                          {"group_size": 1, "temperature": 0.0})
    dt = time.perf_counter() - t0
    totals, comps = reward.score_values(trajs)
    out = {}
    for name, vals in {"reward": totals, **comps}.items():
        v = np.asarray(vals, dtype=float)
        v = v[np.isfinite(v)]
        if v.size:
            out[f"eval/heldout/{name}" if name == "reward" else f"eval/heldout/reward/{name}"] = float(v.mean())
    out["eval/heldout/time_per_sample_s"] = dt / max(1, len(trajs))
    return out


def evaluate(pool, cfg: RunConfig, severities: list[int] | None = None, reward=None) -> dict[str, float]:
    """Flat metrics. CLEAR: eval/<set>/<metric> for clean and each severity. UAE / GvU: eval/heldout/...
    (mean reward on held-out prompts, needs the run's ``reward`` actor; without it there is nothing to do)."""
    recipe = get_recipe(cfg.recipe)
    if recipe.evaluation == "heldout_reward":
        return heldout_reward(pool, reward, cfg) if reward is not None else {}
    out = {}
    for name, items in eval_sets(cfg, severities).items():
        for k, v in accuracy(pool, items, cfg.seed, recipe).items():
            out[f"eval/{name}/{k}"] = v
    return out


def run_eval(cfg: RunConfig, checkpoint: str, benchmark: str | None = None, out_dir: str | None = None,
             images: str | None = None) -> int:
    """``unigrpo eval``: ``degradation`` (CLEAR): a checkpoint's accuracy on clean and each severity;
    ``reconstruction`` (UAE's Unified-Score over ``images`` or the shapes eval split, ``services.reconstruction``).
    Either way: a JSON file, a PNG bar chart and the same in MLflow."""
    import ray

    from services.cluster import policy_dir_of, publish_policy_dir, start_ray, worker_pool
    from services.tracking import Tracker, plot_bars

    if benchmark == "reconstruction":
        from services.reconstruction import run_reconstruction

        print(json.dumps(run_reconstruction(cfg, checkpoint, out_dir, images), indent=1))
        return 0
    if benchmark not in (None, "degradation"):
        raise SystemExit(f"eval: benchmark {benchmark!r} is not available in this build")
    if get_recipe(cfg.recipe).evaluation != "accuracy":
        raise SystemExit(f"eval: the degradation benchmark measures answer accuracy; recipe {cfg.recipe!r} has "
                         "--benchmark reconstruction (and its held-out reward in the training run)")
    start_ray(cfg)
    pool = worker_pool(cfg, 1)
    pool.sync(publish_policy_dir(policy_dir_of(checkpoint)))
    metrics = evaluate(pool, cfg, [1, 2, 3])
    out = Path(out_dir or "eval_out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(metrics, indent=1))
    bars = {k.split("/")[1]: v for k, v in metrics.items() if k.endswith("/accuracy")}
    plot_bars(bars, "accuracy by severity", out / "eval.png")
    tracker = Tracker(cfg)
    tracker.log_metrics(metrics, 0)
    tracker.log_file(out / "eval.json", "eval")
    tracker.log_file(out / "eval.png", "eval")
    tracker.end()
    pool.shutdown()
    ray.shutdown()
    print(json.dumps(metrics, indent=1))
    return 0
