"""The tiny CLIP scorer, fitted: a ``clip_similarity`` backbone written ``{kind: clip, fit: true}`` is the tiny
CLIP image tower (``reward.clip_similarity.TINY_CLIP_VISION``) trained in code, before stage 1, on the task's
(clean image, description) pairs, so that the cosine similarity of two images' embeddings says whether they
show the same thing. (A random-init tiny CLIP puts any two task images within ~0.99 of each other: a UAE
reward with no range.)

- **What is trained**: the tower, from ``model.seed``, with a text side that exists only for the fit: the
  mean of learned embeddings of the description's words and adjacent word pairs ("red circle" binds a colour
  to its shape). CLIP's symmetric contrastive loss over a batch, every pair with the same description counted
  as a positive (``contrastive_loss``). Adam, ``SETTINGS``, on the first ``min(images, task.train_size)``
  clean training images.
- **Measured** on held-out images (the task's eval split): image -> description retrieval (top-1 among their
  distinct descriptions) and the mean cosine of two images with different descriptions, for the fitted tower
  and for the random one it started from: printed, logged (``clip_fit/*``) and written to ``fit.json``.
- **Cached** beside the checkpoints, ``<checkpoint.dir>/tiny-clip/<key>/`` (``save_pretrained`` layout,
  ``preprocessor_config.json``, ``fit.json``), ``key`` a hash of everything the fit depends on
  (``services.vae_fit.cached_fit``: written aside and renamed).

``prepare(cfg)`` returns the config with each such backbone replaced by ``{kind: clip, path: <that dir>}``:
the reward actor (or serve app) and ``unigrpo eval --benchmark reconstruction`` load the same tower.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reward.clip_similarity import CLIP_MEAN, CLIP_STD, TINY_CLIP_VISION, Backbone, load_backbone
from services.config import RunConfig
from services.vae_fit import FIT_FILE, cached_fit, clean_items, minibatch_fit
from tasks.describe import describe_item

FIT_KEY = "fit"  # a backbone spec's key that asks for the fitted tower
CACHE_DIR = "tiny-clip"
SETTINGS = {"images": 2000, "eval_images": 200, "epochs": 60, "batch_size": 128, "lr": 2e-3}


def fitted_backbones(cfg: RunConfig) -> list[tuple[int, int]]:
    """(component index, backbone index) of every ``clip_similarity`` backbone spec with ``fit: true``."""
    return [(i, j) for i, c in enumerate(cfg.reward.components) if c.name == "clip_similarity"
            for j, b in enumerate(c.kwargs.get("backbones") or []) if isinstance(b, dict) and b.get(FIT_KEY)]


def fit_key(cfg: RunConfig) -> str:
    t = cfg.task
    what = {"tower": TINY_CLIP_VISION, "model_seed": cfg.model.seed, "seed": cfg.seed, "fit": SETTINGS,
            "task": [t.name, t.image_size, t.question_types, t.shuffle_choices, t.train_size, t.eval_size]}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fitted_dir(cfg: RunConfig) -> Path:
    """Where this config's fitted tower is cached: ``<checkpoint.dir>/tiny-clip/<key>/``."""
    return Path(cfg.checkpoint.dir) / CACHE_DIR / fit_key(cfg)


def words(description: str) -> list[str]:
    """The text side's tokens: the description's words and its adjacent word pairs."""
    w = description.replace(":", " ").replace(",", " ").split()
    return w + [f"{a} {b}" for a, b in zip(w, w[1:])]


class WordBag(nn.Module):
    """Text side of the fit: the mean of learned embeddings of ``words(description)`` (unseen ones share a row)."""

    def __init__(self, descriptions: list[str], dim: int) -> None:
        super().__init__()
        self.index = {w: k for k, w in enumerate(sorted({w for d in descriptions for w in words(d)}))}
        self.table = nn.EmbeddingBag(len(self.index) + 1, dim, mode="mean")

    def forward(self, descriptions: list[str]) -> torch.Tensor:
        ids, offsets = [], []
        for d in descriptions:
            offsets.append(len(ids))
            ids += [self.index.get(w, len(self.index)) for w in words(d)]
        return self.table(torch.tensor(ids), torch.tensor(offsets))


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, same: torch.Tensor,
                     log_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric loss with several positives per row:
        L = 1/2 [CE(s I T^T, P) + CE(s T I^T, P)],   I, T row-normalised,  s = min(exp(log_scale), 100),
        P = the same-description indicator (B, B), each row normalised to sum to 1 (symmetric, so both ways)."""
    logits = log_scale.exp().clamp(max=100.0) * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    p = same.float() / same.float().sum(1, keepdim=True)
    return -0.5 * ((p * logits.log_softmax(1)).sum(1).mean() + (p * logits.T.log_softmax(1)).sum(1).mean())


def _same(descriptions: list[str]) -> torch.Tensor:
    codes = {d: k for k, d in enumerate(dict.fromkeys(descriptions))}
    c = torch.tensor([codes[d] for d in descriptions])
    return c[:, None] == c[None, :]


@torch.no_grad()
def separation(tower: Backbone, images: torch.Tensor, descriptions: list[str], text: WordBag | None = None) -> dict:
    """Mean cosine of two held-out images with different descriptions (and with the same one, where any pair
    shares it); with ``text``: top-1 image -> description retrieval among the distinct descriptions."""
    emb = F.normalize(tower.embed(tower.preprocess(images)), dim=-1)
    cos, same = emb @ emb.T, _same(descriptions)
    other = ~torch.eye(len(emb), dtype=torch.bool)
    out = {"cross_cosine": float(cos[~same].mean())}
    if (same & other).any():
        out["same_description_cosine"] = float(cos[same & other].mean())
    if text is not None:
        distinct = list(dict.fromkeys(descriptions))
        best = (emb @ F.normalize(text(distinct), dim=-1).T).argmax(1)
        out["retrieval_top1"] = float(np.mean([distinct[k] == d for k, d in zip(best.tolist(), descriptions)]))
    return out


def _pairs(cfg: RunConfig, split: str, n: int) -> tuple[torch.Tensor, list[str]]:
    items = clean_items(cfg, split, n)
    return torch.as_tensor(np.stack([it.meta["clean_image"] for it in items])), [describe_item(it) for it in items]


def fit(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict:
    """Fit the tower (see the module docstring), measure it and save it into ``out_dir``; the fit record."""
    t0, s = time.perf_counter(), SETTINGS
    images, descs = _pairs(cfg, "train", min(s["images"], cfg.task.train_size))
    held, held_descs = _pairs(cfg, "eval", min(s["eval_images"], cfg.task.eval_size))
    tower = load_backbone({"kind": "clip"}, tiny=True, seed=cfg.model.seed)
    random_init = separation(tower, held, held_descs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model.seed)
        text = WordBag(descs, TINY_CLIP_VISION["projection_dim"])
    log_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))
    model = tower.model.train().requires_grad_(True)
    opt = torch.optim.Adam([*model.parameters(), *text.parameters(), log_scale], lr=s["lr"])
    pixels, same = tower.preprocess(images), _same(descs)

    def loss_of(idx: torch.Tensor, _: torch.Generator) -> torch.Tensor:
        return contrastive_loss(model(pixel_values=pixels[idx]).image_embeds, text([descs[i] for i in idx]),
                                same[idx][:, idx], log_scale)

    losses = minibatch_fit("CLIP scorer fit", len(descs), s["epochs"], s["batch_size"], cfg.seed, loss_of, opt,
                           progress=progress)
    model.eval().requires_grad_(False)
    fitted = separation(tower, held, held_descs, text)
    record = {**fitted, "random_init": random_init, "train_images": len(descs), "eval_images": len(held_descs),
              "steps": len(losses), "final_loss": losses[-1], "seconds": time.perf_counter() - t0, "key": fit_key(cfg)}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    size = int(TINY_CLIP_VISION["image_size"])
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "crop_size": {"height": size, "width": size},
        "size": {"shortest_edge": size}}, indent=1))
    (out_dir / FIT_FILE).write_text(json.dumps(record, indent=1))
    return record


def prepare(cfg: RunConfig, tracker=None, progress: bool = True) -> RunConfig:
    """The run config to build the reward from: unchanged without a ``fit: true`` backbone, else with each
    of them on the (cached or newly) fitted tower. Prints its held-out figures; logs ``clip_fit/*``."""
    found = fitted_backbones(cfg)
    if not found:
        return cfg
    final = fitted_dir(cfg)
    record, cached = cached_fit(final, lambda tmp: fit(cfg, tmp, progress))
    how = "cached" if cached else f"fitted in {record['seconds']:.0f} s"
    print(f"tiny CLIP scorer ({how}, {final}): held-out retrieval top-1 {record['retrieval_top1']:.3f}, cosine of "
          f"two different images {record['cross_cosine']:.3f} (random init {record['random_init']['cross_cosine']:.3f}) "
          f"on {record['eval_images']} images", flush=True)
    components = [c.model_copy(deep=True) for c in cfg.reward.components]
    for i, j in found:
        spec = components[i].kwargs["backbones"][j]
        kept = {k: v for k, v in spec.items() if k in ("weight", "label")}
        components[i].kwargs["backbones"][j] = {**kept, "kind": "clip", "path": str(final), "tiny": False}
    if tracker is not None:
        tracker.log_metrics({"clip_fit/retrieval_top1": record["retrieval_top1"],
                             "clip_fit/cross_cosine": record["cross_cosine"],
                             "clip_fit/cross_cosine_random_init": record["random_init"]["cross_cosine"],
                             "clip_fit/seconds": record["seconds"]}, 0)
    return cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"components": components})})
