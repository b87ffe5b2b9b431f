"""The reconstruction benchmark: UAE's Unified-Score of a checkpoint over a folder of images.

For every image x: the policy captions it (greedy), the generator reconstructs x' from the caption alone, read
as a generation prompt without the image (``rollout.caption.uae_rollout``, the same path as training), and each
vision backbone b scores
``cos(f_b(x), f_b(x'))``. The Unified-Score is the weighted mean over backbones of the per-image mean;
per-backbone means are reported too. Scores lie in [-1, 1].

    unigrpo eval --config FILE --checkpoint DIR --benchmark reconstruction [--images DIR] [--out DIR]

Images: every ``.png/.jpg/.jpeg/.bmp/.webp`` file of ``--images`` (sorted), centre-cropped to a square and
resized to ``model.image_size``; without ``--images``, the clean images of the shapes eval split
(``task.eval_size`` of them). Backbones: the config's ``clip_similarity`` reward component (its kwargs, as in
training); a config without one (CLEAR, GvU) must name them there.

Outputs in ``--out`` (default ``eval_out``): ``reconstruction.json`` (scores, per image too),
``reconstruction.png`` (a bar per backbone and the overall score) and ``samples.png`` (source | reconstruction
strips of the first images); the same metrics (``eval/reconstruction/...``) and files go to MLflow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from services.config import RunConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def load_images(folder: str | Path, size: int) -> tuple[list[np.ndarray], list[str]]:
    """(H,W,3) uint8 images of ``folder`` (sorted by name), centre-cropped square and resized to ``size``."""
    from PIL import Image

    d = Path(folder)
    if not d.is_dir():
        raise SystemExit(f"eval: --images {folder}: not a directory")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"eval: --images {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        out.append(np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.uint8).copy())
    return out, [f.name for f in files]


def shapes_images(cfg: RunConfig) -> tuple[list[np.ndarray], list[str]]:
    """The clean images of the shapes eval split (the default image set)."""
    from tasks import build_dataset

    t = cfg.task
    ds = build_dataset("shapes_vqa", size=t.eval_size, seed=cfg.seed, split="eval", image_size=cfg.model.image_size,
                       degradations=t.degradations, severities=[1], degrade_prob=0.0)
    items = list(ds)
    return [it.meta["clean_image"] for it in items], [it.prompt_id for it in items]


def similarity_of(cfg: RunConfig):
    """The ``ImageSimilarity`` of the config's ``clip_similarity`` component (backbones, tiny, device...)."""
    from reward.registry import clip_setup

    comp = next((c for c in cfg.reward.components if c.name == "clip_similarity"), None)
    if comp is None:
        raise SystemExit("eval: the reconstruction benchmark needs a 'clip_similarity' reward component in the "
                         "config (it names the vision backbones)")
    return clip_setup(dict(comp.kwargs), {})


def unified_score(pool, sim, images: list[np.ndarray], names: list[str], seed: int = 0,
                  chunk: int = 64) -> dict:
    """Caption (greedy) -> reconstruct -> similarity per backbone; ``pool`` must run the ``uae`` rollout."""
    per: dict[str, list[float]] = {label: [] for label in sim.labels}
    total: list[float] = []
    sources, recons = [], []
    captions: list[str] = []
    t0 = time.perf_counter()
    for lo in range(0, len(images), chunk):
        reqs = [{"prompt_id": f"recon-{i}", "image": images[i]} for i in range(lo, min(lo + chunk, len(images)))]
        trajs = pool.generate(reqs, seed + lo, {"group_size": 1, "temperature": 0.0})
        src = [t.meta["source_image"] for t in trajs]
        rec = [t.meta["reconstruction"] for t in trajs]
        tot, by = sim.similarity(src, rec)
        total += [float(v) for v in tot]
        for label, v in by.items():
            per[label] += [float(x) for x in v]
        captions += [t.response_text for t in trajs]
        if len(sources) < 8:
            sources += src[: 8 - len(sources)]
            recons += rec[: 8 - len(recons)]
    dt = time.perf_counter() - t0
    result = {
        "benchmark": "reconstruction",
        "n_images": len(images),
        "unified_score": float(np.mean(total)),
        "per_backbone": {label: float(np.mean(v)) for label, v in per.items()},
        "backbone_weights": dict(sim.weights),
        "time_per_image_s": dt / max(1, len(images)),
        "per_image": [{"name": n, "score": s, **{label: per[label][i] for label in per}, "caption": c}
                      for i, (n, s, c) in enumerate(zip(names, total, captions))],
    }
    result["_samples"] = (sources, recons)
    return result


def plot_scores(result: dict, out_png: Path):
    """A bar per backbone plus the overall Unified-Score; the axis spans [-1, 1] when a score is negative."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = {**result["per_backbone"], "unified": result["unified_score"]}
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.bar(list(bars), list(bars.values()), color=["#4c72b0"] * (len(bars) - 1) + ["#dd8452"])
    for i, v in enumerate(bars.values()):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    ax.set_ylim(-1.05 if min(bars.values()) < 0 else 0, 1.05)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("cosine similarity")
    ax.set_title(f"reconstruction (Unified-Score), {result['n_images']} images")
    fig.tight_layout()
    fig.savefig(out_png)
    return fig


def run_reconstruction(cfg: RunConfig, checkpoint: str, out_dir: str | None = None,
                       images: str | None = None) -> dict:
    """``unigrpo eval --benchmark reconstruction``: load the checkpoint into one ``uae`` rollout worker, score
    the images, write JSON + PNG, log to MLflow. Returns the result (without per-image rows)."""
    import ray

    from services.clip_fit import prepare
    from services.cluster import policy_dir_of, publish_policy_dir, start_ray, worker_pool
    from services.tracking import Tracker, image_strip
    from services.vae_fit import with_checkpoint_vae

    cfg = with_checkpoint_vae(cfg, policy_dir_of(checkpoint))  # the run's own (fitted) VAE decodes
    cfg = prepare(cfg)  # a fitted tiny CLIP scorer: the run's (cached beside its checkpoints)
    sim = similarity_of(cfg)
    imgs, names = load_images(images, cfg.model.image_size) if images else shapes_images(cfg)
    started = not ray.is_initialized()
    start_ray(cfg)
    pool = worker_pool(cfg.model_copy(update={"recipe": "uae"}), 1)
    try:
        pool.sync(publish_policy_dir(policy_dir_of(checkpoint)))
        result = unified_score(pool, sim, imgs, names, cfg.seed)
    finally:
        pool.shutdown()
        if started:
            ray.shutdown()
    sources, recons = result.pop("_samples")
    result.update(checkpoint=str(checkpoint), images=str(images) if images else "shapes_vqa eval split")
    out = Path(out_dir or "eval_out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "reconstruction.json").write_text(json.dumps(result, indent=1))
    plot_scores(result, out / "reconstruction.png")
    from PIL import Image

    def u8(x):
        return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)

    strips = [image_strip([u8(s), u8(r)]) for s, r in zip(sources, recons)]
    Image.fromarray(np.concatenate(strips, axis=0)).save(out / "samples.png")
    metrics = {f"eval/reconstruction/{k}": v for k, v in result["per_backbone"].items()}
    metrics["eval/reconstruction/unified_score"] = result["unified_score"]
    metrics["eval/reconstruction/time_per_image_s"] = result["time_per_image_s"]
    tracker = Tracker(cfg)
    tracker.log_metrics(metrics, 0)
    for f in ("reconstruction.json", "reconstruction.png", "samples.png"):
        tracker.log_file(out / f, "eval")
    tracker.end()
    summary = {k: v for k, v in result.items() if k != "per_image"}
    summary["mlflow_run_id"] = tracker.run_id
    return summary
