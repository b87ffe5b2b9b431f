"""The tiny VAE, fitted: before stage 1, a run whose model builds a tiny VAE (``model.vae_path`` null,
``model.arch: unified``) on an image task (``shapes_vqa``) trains that VAE to reconstruct the task's clean
training images, so latents (the bridge's input, the generator's output) are images a person can judge.

- **What is trained**: the ``model.vae_tiny`` AutoencoderKL (same architecture and latent geometry as the
  random-init one), from ``model.seed``, on the first ``min(vae_fit.images, task.train_size)`` clean training
  images for ``vae_fit.epochs`` epochs of ``vae_fit.batch_size``, Adam at ``vae_fit.lr`` with a one-cycle
  schedule. Loss: ``mean((D(z) - x)^2) + kl_weight * KL(q(z|x) || N(0, I))`` (pixels in [-1, 1], z sampled).
- **Latent scale**: ``shift_factor`` and ``scaling_factor`` are set to the mean and 1 / std of the training
  images' latent means, so the latents the policy sees are ``(z - shift) * scale``: zero mean, unit variance.
- **Measured**: PSNR and SSIM of the reconstructions of ``min(vae_fit.eval_images, task.eval_size)`` held-out
  clean images (the task's eval split): printed, logged to MLflow (``vae_fit/*``, with a strip of clean |
  reconstruction pairs) and written to ``fit.json`` beside the weights.
- **Cached** beside the checkpoints, ``<checkpoint.dir>/tiny-vae/<key>/`` (diffusers layout + ``fit.json``),
  ``key`` a hash of everything the fit depends on; a later run (or ``--resume``) with the same key loads it.
  Written to a temporary directory and renamed, so a stopped fit never leaves a partial cache.

The run then uses ``model.vae_path`` = that directory: every actor loads the same fitted VAE, and every saved
policy holds it (``policy/vae/``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from policy.pipeline import is_pipeline_dir
from services.config import RunConfig
from tasks import build_dataset
from tasks.quality import psnr, ssim

FIT_FILE = "fit.json"
CACHE_DIR = "tiny-vae"


def applies(cfg: RunConfig) -> bool:
    """Whether this run fits its VAE: enabled, a tiny unified-model VAE (no ``vae_path``, and no pipeline
    directory in ``generator_path``, whose ``vae/`` is the model's), and a task with images."""
    m = cfg.model
    return (cfg.vae_fit.enabled and m.arch == "unified" and m.vae_path is None
            and not is_pipeline_dir(m.generator_path) and cfg.task.name == "shapes_vqa")


def clean_items(cfg: RunConfig, split: str, n: int) -> list:
    """The first ``n`` items of the task's ``split``, undegraded (``meta["clean_image"]`` uint8 (H, W, 3))."""
    t = cfg.task
    return list(build_dataset(t.name, size=n, seed=cfg.seed, split=split, image_size=t.image_size, degradations=[],
                              degrade_prob=0.0, question_types=t.question_types, shuffle_choices=t.shuffle_choices))


def clean_images(cfg: RunConfig, split: str, n: int) -> np.ndarray:
    """The first ``n`` clean images of the task's ``split`` (uint8, (n, H, W, 3))."""
    return np.stack([it.meta["clean_image"] for it in clean_items(cfg, split, n)])


def cached_fit(final: Path, make: Callable[[Path], dict]) -> tuple[dict, bool]:
    """``(record, cached)``: the ``fit.json`` record in ``final`` when a fit is cached there, else
    ``make(tmp)`` fits into a temporary directory that is then renamed to ``final`` (a stopped fit never
    leaves a partial cache; a concurrent run that wrote the same key first wins)."""
    if (final / FIT_FILE).is_file():
        return json.loads((final / FIT_FILE).read_text()), True
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    record = make(tmp)
    try:
        os.replace(tmp, final)
    except OSError:  # another run wrote the same key meanwhile: the same fit, keep theirs
        if not (final / FIT_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return record, False


def fit_key(cfg: RunConfig) -> str:
    """A hash of what the fitted VAE depends on: architecture, seeds, the images and the fit settings."""
    t = cfg.task
    what = {"vae": cfg.model.vae_tiny_config(), "model_seed": cfg.model.seed, "dtype": cfg.model.dtype,
            "seed": cfg.seed, "task": [t.name, t.image_size, t.question_types, t.shuffle_choices],
            "images": min(cfg.vae_fit.images, t.train_size), "eval_images": min(cfg.vae_fit.eval_images, t.eval_size),
            "fit": cfg.vae_fit.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_path(cfg: RunConfig) -> Path:
    return Path(cfg.checkpoint.dir) / CACHE_DIR / fit_key(cfg)


def _to_unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [-1, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def minibatch_fit(desc: str, n: int, epochs: int, batch_size: int, seed: int,
                  loss_of: Callable[[torch.Tensor, torch.Generator], torch.Tensor], opt: torch.optim.Optimizer,
                  sched=None, progress: bool = True) -> list[float]:
    """``epochs`` passes over ``n`` rows, each a seeded permutation cut into batches: one optimizer (and
    ``sched``) step on ``loss_of(batch indices, generator)`` per batch, under a progress bar; the losses."""
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = tqdm(total=epochs * math.ceil(n / batch_size), desc=desc, unit="step", dynamic_ncols=True,
               disable=not progress)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for k in range(0, n, batch_size):
            loss = loss_of(order[k:k + batch_size], g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return losses


def train_vae(vae: AutoencoderKL, images: np.ndarray, epochs: int, batch_size: int, lr: float,
              kl_weight: float, seed: int, progress: bool = True) -> list[float]:
    """Fit ``vae`` in place to reconstruct ``images`` (uint8 (N, H, W, 3)); returns the per-step losses.
    One pass of a seeded permutation per epoch; ``loss = mean((D(z) - x)^2) + kl_weight * mean_batch KL``."""
    x_all = _to_unit_range(images)
    n = x_all.shape[0]
    steps = max(1, epochs * math.ceil(n / batch_size))
    vae.requires_grad_(True)
    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)

    def loss_of(idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=g)).sample
        return (recon - x).pow(2).mean() + kl_weight * post.kl().mean()

    losses = minibatch_fit("VAE fit", n, epochs, batch_size, seed, loss_of, opt, sched, progress)
    vae.requires_grad_(False)
    vae.eval()
    return losses


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> tuple[float, float]:
    """(mean, std) over every element of the latent means ``E(x)`` of ``images``."""
    z = torch.cat([vae.encode(_to_unit_range(images[i:i + batch])).latent_dist.mean
                   for i in range(0, len(images), batch)])
    return float(z.mean()), float(z.std())


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """``D(E(x))`` through the latent means: uint8 (N, H, W, 3) -> float (N, H, W, 3) in [0, 1]."""
    out = []
    for i in range(0, len(images), batch):
        x = _to_unit_range(images[i:i + batch])
        y = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((y + 1.0) / 2.0).clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def reconstruction_quality(vae: AutoencoderKL, images: np.ndarray) -> dict[str, float]:
    """Mean PSNR (dB) and SSIM of ``D(E(x))`` against ``x`` over ``images``."""
    rec = reconstruct(vae, images)
    return {"psnr_db": float(psnr(rec, images).mean()), "ssim": float(ssim(rec, images).mean())}


def fit(cfg: RunConfig, out_dir: Path, progress: bool = True) -> dict:
    """Build the tiny VAE from ``model.seed``, fit it, set its latent shift / scale, measure it on held-out
    images and save it (diffusers layout + ``fit.json``) into ``out_dir``. Returns the fit record."""
    f, t = cfg.vae_fit, cfg.task
    t0 = time.perf_counter()
    train = clean_images(cfg, "train", min(f.images, t.train_size))
    held = clean_images(cfg, "eval", min(f.eval_images, t.eval_size))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.model.seed)
        vae = AutoencoderKL(**cfg.model.vae_tiny_config())
    losses = train_vae(vae, train, f.epochs, f.batch_size, f.lr, f.kl_weight, cfg.seed, progress)
    shift, std = latent_stats(vae, train)
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / max(std, 1e-6))
    quality = reconstruction_quality(vae, held)
    record = {**quality, "train_images": len(train), "eval_images": len(held), "steps": len(losses),
              "final_loss": losses[-1], "shift_factor": shift, "scaling_factor": 1.0 / max(std, 1e-6),
              "seconds": time.perf_counter() - t0, "key": fit_key(cfg)}
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.dtype != "float32":
        vae = vae.to(getattr(torch, cfg.model.dtype))
    vae.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / FIT_FILE).write_text(json.dumps(record, indent=1))
    return record


def prepare(cfg: RunConfig, tracker=None, progress: bool = True) -> RunConfig:
    """The run config to build every actor from: unchanged when the fit does not apply, else with
    ``model.vae_path`` on the (cached or newly) fitted VAE. Prints its held-out PSNR; with a ``tracker``,
    logs ``vae_fit/*`` and a strip of held-out clean | reconstruction pairs."""
    if not applies(cfg):
        return cfg
    final = cache_path(cfg)
    record, cached = cached_fit(final, lambda tmp: fit(cfg, tmp, progress))
    how = "cached" if cached else f"fitted in {record['seconds']:.0f} s"
    print(f"tiny VAE ({how}, {final}): held-out reconstruction PSNR {record['psnr_db']:.2f} dB, "
          f"SSIM {record['ssim']:.3f} on {record['eval_images']} images", flush=True)
    out = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vae_path": str(final)})})
    if tracker is not None:
        tracker.log_metrics({f"vae_fit/{k}": record[k] for k in ("psnr_db", "ssim", "seconds", "final_loss")}, 0)
        tracker.log_image(reconstruction_strip(out, final), "vae_fit/reconstructions.png")
    return out


def reconstruction_strip(cfg: RunConfig, vae_dir: Path, n: int = 6) -> np.ndarray:
    """Rows of held-out clean images over their reconstructions (uint8), for MLflow."""
    from services.tracking import image_strip

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).float().eval()
    held = clean_images(cfg, "eval", min(n, cfg.task.eval_size))
    rec = (reconstruct(vae, held) * 255).round().astype(np.uint8)
    top, bottom = image_strip(list(held)), image_strip(list(rec))
    gap = np.full((8, top.shape[1], 3), 255, dtype=np.uint8)
    return np.concatenate([top, gap, bottom])


def with_checkpoint_vae(cfg: RunConfig, policy_dir: str | os.PathLike[str]) -> RunConfig:
    """The config to build actors that evaluate a saved policy: a tiny-VAE model (``model.vae_path`` null)
    takes the policy's own ``vae/`` (the fitted one the run trained with), so decoded latents match it; a LoRA
    policy directory (no ``vae/``: ``policy.lora``) takes the ``model.vae_path`` its ``config.json`` names."""
    vae = Path(policy_dir) / "vae"
    if not (vae / "config.json").is_file():
        meta = Path(policy_dir) / "config.json"
        saved = json.loads(meta.read_text()).get("policy", {}).get("vae_path") if meta.is_file() else None
        vae = Path(saved) if saved else vae
    if cfg.model.arch != "unified" or cfg.model.vae_path is not None or not (vae / "config.json").is_file():
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"vae_path": str(vae)})})
