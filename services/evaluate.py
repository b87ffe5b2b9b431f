"""Evaluation. ``evaluate(pool, cfg, reward=...)`` follows the recipe's ``evaluation`` (``recipes``):
``accuracy`` (CLEAR) answers held-out images, clean and per degradation severity; ``heldout_reward`` (UAE,
GvU) measures the mean reward (and each component) on held-out prompts, scored by the run's reward actor.
The reconstruction benchmark (UAE's Unified-Score) is ``services.reconstruction``.

CLEAR's report (:func:`accuracy_report`), per eval set (``clean``, ``severity<s>`` for each of
``evaluation.severities``, every image degraded) and per mode of ``evaluation.modes``:

- ``greedy`` / ``sampled``: as the model chooses (temperature 0 / ``rollout.temperature``): accuracy and the
  generation trigger rate;
- ``forced``: every response opens with <gen>, so every answer reads a generated restoration; ``forbidden``:
  <gen> is never sampled (``rollout.interleaved``); their difference is what generating is worth, with the
  exact McNemar test over the same images (``forced_vs_forbidden``);
- restoration (with ``forced``): PSNR and SSIM of the decoded generation against the clean image, next to
  the degraded input's own PSNR / SSIM (``tasks.quality``).

Flat metric names (MLflow): ``eval/<set>/accuracy``, ``eval/<set>/trigger_rate`` and
``eval/<set>/time_per_sample_s`` are the greedy mode's; ``eval/<set>/<mode>/accuracy|trigger_rate`` the
others'; ``eval/<set>/restoration/psnr_db|ssim``, ``eval/<set>/input/psnr_db|ssim``;
``eval/<set>/forced_vs_forbidden/diff|mcnemar_p``. The evals every ``algorithm.eval_every`` steps run
``evaluation.every_modes`` on clean and the highest severity. :func:`compare` pairs two reports of the same items
(stage 1 vs stage 2): ``compare/<set>/<mode>/diff|mcnemar_p|bootstrap_p|...`` (``services.stats``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recipes import Recipe, get_recipe
from reward.answer import answer_reward
from services.config import RunConfig
from services.stats import mcnemar_exact, paired_comparison, paired_score_comparison
from tasks import build_dataset
from tasks.items import PromptItem
from tasks.quality import psnr, ssim

SAMPLE_ROWS = 4  # degraded | restoration | clean rows per set in the report's sample strip


# ------------------------------------------------------------------------------------------- eval sets
def eval_sets(cfg: RunConfig, severities: list[int] | None = None) -> dict[str, list[PromptItem]]:
    """The held-out split, clean and at each severity (every image degraded)."""
    t = cfg.task
    common = dict(size=t.eval_size, seed=cfg.seed, split="eval", image_size=t.image_size,
                  degradations=t.degradations, question_types=t.question_types, shuffle_choices=t.shuffle_choices)
    sets = {"clean": list(build_dataset(t.name, **common, severities=[1], degrade_prob=0.0))}
    for s in severities or cfg.evaluation.severities:
        sets[f"severity{s}"] = list(build_dataset(t.name, **common, severities=[s], degrade_prob=1.0))
    return sets


def mode_overrides(mode: str, cfg: RunConfig) -> dict:
    """Rollout settings of one evaluation mode (one sample per item)."""
    table = {"greedy": {"temperature": 0.0, "generation": "auto"},
             "sampled": {"temperature": cfg.rollout.temperature, "generation": "auto"},
             "forced": {"temperature": 0.0, "generation": "force"},
             "forbidden": {"temperature": 0.0, "generation": "forbid"}}
    return {"group_size": 1, "reference_latents": False, "gold_answer_logprob": False, **table[mode]}


# ---------------------------------------------------------------------------------------------- report
@dataclass
class EvalReport:
    """What one evaluation measured: flat ``metrics``; per set, the item ids and each mode's per-item
    correctness (what paired tests need); per set, a sample strip (degraded | restoration | clean)."""

    metrics: dict[str, float] = field(default_factory=dict)
    prompt_ids: dict[str, list[str]] = field(default_factory=dict)
    correct: dict[str, dict[str, list[bool]]] = field(default_factory=dict)
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # set -> name -> per-item score
    samples: dict[str, np.ndarray] = field(default_factory=dict)

    def severity_table(self) -> dict[str, dict[str, dict[str, float]]]:
        """set -> group (greedy, sampled, forced, forbidden, restoration, input, forced_vs_forbidden) ->
        metric, from the flat metrics."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for key, v in self.metrics.items():
            parts = key.split("/")
            if parts[0] != "eval" or len(parts) < 3 or parts[1] not in self.prompt_ids:
                continue
            group, name = ("greedy", parts[2]) if len(parts) == 3 else (parts[2], "/".join(parts[3:]))
            out.setdefault(parts[1], {}).setdefault(group, {})[name] = v
        return out

    def to_json(self) -> dict:
        items = {s: {"prompt_ids": ids, "correct": {m: [int(c) for c in v] for m, v in self.correct.get(s, {}).items()}}
                 for s, ids in self.prompt_ids.items()}
        for s, named in self.scores.items():  # NaN (a dropped reward) as null
            items[s]["scores"] = {k: [float(x) if np.isfinite(x) else None for x in v] for k, v in named.items()}
        return {"metrics": self.metrics, "by_set": self.severity_table(), "items": items}

    @classmethod
    def from_json(cls, data: dict) -> EvalReport:
        items = data.get("items") or {}
        return cls(metrics=dict(data.get("metrics") or {}),
                   prompt_ids={s: list(v["prompt_ids"]) for s, v in items.items()},
                   correct={s: {m: [bool(c) for c in cs] for m, cs in v.get("correct", {}).items()}
                            for s, v in items.items()},
                   scores={s: {k: [np.nan if x is None else float(x) for x in xs] for k, xs in v["scores"].items()}
                           for s, v in items.items() if v.get("scores")})


def _unit(pixels) -> np.ndarray:
    """Decoded pixels (N, 3, H, W) tensor in [0, 1] -> float (N, H, W, 3)."""
    return pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float64)


def _strip_rows(items: list[PromptItem], restored: np.ndarray, n: int = SAMPLE_ROWS) -> np.ndarray:
    """One row per item: degraded input | restoration | clean source (uint8, 4x nearest upscaled). The first
    item of each degradation kind comes first, so a strip of a mixed set shows every kind; then the rest in order."""
    from services.tracking import image_strip

    seen: set = set()
    firsts, others = [], []
    for it, rec in zip(items, restored):
        kind = it.meta.get("degradation")
        (others if kind in seen else firsts).append((it, rec))
        seen.add(kind)
    rows = []
    for it, rec in (firsts + others)[:n]:
        rows.append(image_strip([it.image, (rec * 255).round().astype(np.uint8), it.meta["clean_image"]]))
    gap = np.full((8, rows[0].shape[1], 3), 255, dtype=np.uint8)
    parts = []
    for r in rows:
        parts += [r, gap]
    return np.concatenate(parts[:-1])


def run_mode(pool, items: list[PromptItem], mode: str, cfg: RunConfig, recipe: Recipe):
    """(trajectories, per-item correctness, seconds) of one mode over ``items``."""
    t0 = time.perf_counter()
    trajs = pool.generate(recipe.requests(items), cfg.seed, mode_overrides(mode, cfg))
    dt = time.perf_counter() - t0
    return trajs, [bool(answer_reward(t.response_text, t.meta)) for t in trajs], dt


def restoration_metrics(pool, items: list[PromptItem], trajs) -> tuple[dict[str, float], np.ndarray]:
    """PSNR / SSIM of each trajectory's decoded generation, and of the degraded input, against the clean
    image (means over the items whose trajectory generated); and those decoded generations (N, H, W, 3) in
    [0, 1]. Empty when none generated."""
    import torch

    made = [(it, t) for it, t in zip(items, trajs) if t.generated() is not None]  # forced: every one
    if not made:
        return {}, np.zeros((0,))
    latents = torch.stack([t.generated() for _, t in made])
    restored = _unit(pool.call("decode", latents))
    clean = np.stack([it.meta["clean_image"] for it, _ in made])
    shown = np.stack([it.image for it, _ in made])
    if restored.shape[1:3] != clean.shape[1:3]:
        raise ValueError(f"restoration: decoded images are {restored.shape[1:3]}, clean ones {clean.shape[1:3]}")
    m = {"restoration/psnr_db": float(psnr(restored, clean).mean()),
         "restoration/ssim": float(ssim(restored, clean).mean()),
         "input/psnr_db": float(psnr(shown, clean).mean()), "input/ssim": float(ssim(shown, clean).mean())}
    return m, restored


def accuracy_report(pool, cfg: RunConfig, severities: list[int] | None = None,
                    modes: list[str] | None = None) -> EvalReport:
    """CLEAR's report over ``eval_sets`` for each of ``modes`` (default ``evaluation.modes``)."""
    recipe = get_recipe(cfg.recipe)
    modes = list(modes or cfg.evaluation.modes)
    report = EvalReport()
    for name, items in eval_sets(cfg, severities).items():
        report.prompt_ids[name] = [str(it.prompt_id) for it in items]
        report.correct[name] = {}
        for mode in modes:
            trajs, correct, dt = run_mode(pool, items, mode, cfg, recipe)
            report.correct[name][mode] = correct
            prefix = f"eval/{name}/" if mode == "greedy" else f"eval/{name}/{mode}/"
            report.metrics[prefix + "accuracy"] = float(np.mean(correct))
            report.metrics[prefix + "trigger_rate"] = float(np.mean([t.generated_image for t in trajs]))
            report.metrics[prefix + "time_per_sample_s"] = dt / max(1, len(trajs))
            if mode == "forced":
                m, restored = restoration_metrics(pool, items, trajs)
                report.metrics.update({f"eval/{name}/{k}": v for k, v in m.items()})
                if m:
                    report.samples[name] = _strip_rows([it for it, t in zip(items, trajs) if t.generated_image],
                                                       restored)
        if "forced" in modes and "forbidden" in modes:
            f, n = report.correct[name]["forced"], report.correct[name]["forbidden"]
            b = sum(x and not y for x, y in zip(n, f))  # right without generating, wrong with it
            c = sum(y and not x for x, y in zip(n, f))  # wrong without, right with
            report.metrics[f"eval/{name}/forced_vs_forbidden/diff"] = float(np.mean(f) - np.mean(n))
            report.metrics[f"eval/{name}/forced_vs_forbidden/mcnemar_p"] = mcnemar_exact(b, c)
    return report


def compare(before: EvalReport, after: EvalReport, n_boot: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Paired stage-1 vs stage-2 tests for every set and mode both reports answered on the same items:
    ``compare/<set>/<mode>/<stat>`` (``services.stats.paired_comparison``: after - before); per-item scores (the
    held-out reward) as ``compare/<set>/<name>/<stat>`` (``services.stats.paired_score_comparison``)."""
    out: dict[str, float] = {}
    for name, ids in after.prompt_ids.items():
        if before.prompt_ids.get(name) != ids:
            continue  # not the same items: no paired test
        for mode, corr in after.correct.get(name, {}).items():
            prev = before.correct.get(name, {}).get(mode)
            if prev is None or len(prev) != len(corr):
                continue
            for k, v in paired_comparison(prev, corr, n_boot, seed).items():
                out[f"compare/{name}/{mode}/{k}"] = v
        for score, vals in after.scores.get(name, {}).items():
            prev = before.scores.get(name, {}).get(score)
            if prev is None or len(prev) != len(vals):
                continue
            for k, v in paired_score_comparison(prev, vals, n_boot, seed).items():
                out[f"compare/{name}/{score}/{k}"] = v
    return out


# ------------------------------------------------------------------------------------------ entry points
def heldout_reward(pool, reward, cfg: RunConfig) -> EvalReport:
    """``heldout_reward`` recipes (UAE / GvU): mean reward (total and per component) of one greedy / seeded
    sample per held-out prompt, scored by the run's reward actor (GvU: with the current policy weights); the
    per-prompt total reward is kept (set ``heldout``) for the paired stage-1 vs stage-2 test."""
    t = cfg.task
    if t.name != "shapes_vqa":  # a file task has no held-out split: its first eval_size rows
        items = list(build_dataset(t.name, path=t.path, on_bad_row=t.on_bad_row))[: t.eval_size]
    else:
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
    return EvalReport(metrics=out, prompt_ids={"heldout": [str(it.prompt_id) for it in items]},
                      scores={"heldout": {"reward": [float(v) for v in totals]}})


def evaluate_report(pool, cfg: RunConfig, reward=None, full: bool = True) -> EvalReport:
    """The recipe's evaluation as a report. CLEAR: ``full`` = ``evaluation.modes`` on clean and every severity
    of ``evaluation.severities``; else ``evaluation.every_modes`` on clean and the highest severity (the evals
    every ``algorithm.eval_every`` steps). UAE / GvU: the held-out reward (needs the run's ``reward`` actor)."""
    recipe = get_recipe(cfg.recipe)
    if recipe.evaluation == "heldout_reward":
        return heldout_reward(pool, reward, cfg) if reward is not None else EvalReport()
    if full:
        return accuracy_report(pool, cfg)
    return accuracy_report(pool, cfg, [max(cfg.evaluation.severities)], cfg.evaluation.every_modes)


def evaluate(pool, cfg: RunConfig, reward=None, full: bool = True) -> dict[str, float]:
    """Flat metrics of :func:`evaluate_report`."""
    return evaluate_report(pool, cfg, reward, full).metrics


def log_report(tracker, report: EvalReport, step: int, out_dir: str | Path, suffix: str = "",
               comparison: dict[str, float] | None = None) -> Path:
    """Write ``<out_dir>/eval<suffix>.json`` (the report, with ``comparison`` when given), its figures
    (``generation_by_severity<suffix>.png``: accuracy per mode and trigger rate by severity, CLEAR's Figure 5 in
    shape; ``restoration<suffix>.png``: PSNR / SSIM of restoration vs input) and sample strips; log the
    metrics at ``step`` and the files to MLflow under ``eval/``. Returns the JSON path."""
    from services.eval_plots import plot_generation_by_severity, plot_restoration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = report.to_json()
    if comparison:
        data["comparison"] = comparison
    path = out / f"eval{suffix}.json"
    path.write_text(json.dumps(data, indent=1))
    tracker.log_metrics({**report.metrics, **(comparison or {})}, step)
    tracker.log_file(path, "eval")
    table = report.severity_table()
    label = suffix.strip("_") or "checkpoint"
    for name, plot in (("generation_by_severity", plot_generation_by_severity), ("restoration", plot_restoration)):
        png = out / f"{name}{suffix}.png"
        if plot(table, label, png) is not None:
            tracker.log_file(png, "eval")
    for name, strip in report.samples.items():
        tracker.log_image(strip, f"eval/samples{suffix}_{name}.png")
    return path


def run_eval(cfg: RunConfig, checkpoint: str, benchmark: str | None = None, out_dir: str | None = None,
             images: str | None = None, baseline: str | None = None) -> int:
    """``unigrpo eval``: ``degradation`` (CLEAR): a checkpoint's report on clean and each of
    ``evaluation.severities`` (every mode of ``evaluation.modes``, restoration), paired against ``baseline``
    (an earlier ``eval_*.json`` on the same items, e.g. stage 1's) when given; ``reconstruction`` (UAE's
    Unified-Score over ``images`` or the shapes eval split, ``services.reconstruction``). Either way: a JSON
    file, PNG figures and the same in MLflow."""
    import ray

    from services.cluster import policy_dir_of, publish_policy_dir, start_ray, worker_pool
    from services.tracking import Tracker
    from services.vae_fit import with_checkpoint_vae

    if benchmark == "reconstruction":
        from services.reconstruction import run_reconstruction

        print(json.dumps(run_reconstruction(cfg, checkpoint, out_dir, images), indent=1))
        return 0
    if benchmark not in (None, "degradation"):
        raise SystemExit(f"eval: benchmark {benchmark!r} is not available in this build")
    if get_recipe(cfg.recipe).evaluation != "accuracy":
        raise SystemExit(f"eval: the degradation benchmark measures answer accuracy; recipe {cfg.recipe!r} has "
                         "--benchmark reconstruction (and its held-out reward in the training run)")
    before = None
    if baseline is not None:
        try:
            before = EvalReport.from_json(json.loads(Path(baseline).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"eval: --baseline {baseline}: not an eval JSON ({e})") from None
    policy_dir = policy_dir_of(checkpoint)
    cfg = with_checkpoint_vae(cfg, policy_dir)
    start_ray(cfg)
    pool = worker_pool(cfg, 1)
    pool.sync(publish_policy_dir(policy_dir))
    report = accuracy_report(pool, cfg)
    comparison = compare(before, report, cfg.evaluation.bootstrap_samples, cfg.seed) if before else None
    tracker = Tracker(cfg)
    path = log_report(tracker, report, 0, out_dir or "eval_out", "", comparison)
    tracker.end()
    pool.shutdown()
    ray.shutdown()
    print(json.dumps({**report.metrics, **(comparison or {})}, indent=1))
    print(f"eval report: {path}")
    return 0
