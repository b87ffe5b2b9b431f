"""UAE's reconstruction reward: cosine similarity of an image and its reconstruction in the embedding space
of one or more frozen vision backbones (CLIP, DINOv2, ...), averaged with weights.

Everything stays on tensors: images are resized with ``torch.nn.functional.interpolate`` and normalised
with the backbone's mean / std (no PIL round trip). The similarity is row-wise (``src[i]`` vs ``rec[i]``);
no B x B matrix is formed.

Backbone spec (a dict):

- ``path`` (a local directory) or ``name`` (resolved from the local Hugging Face cache only; nothing is
  downloaded); neither is needed with ``tiny``.
- ``kind``: ``clip`` (``CLIPVisionModelWithProjection``: projected image embedding, also loads the vision
  half of a full ``CLIPModel`` checkpoint), ``dinov2`` (``Dinov2Model``: CLS token of
  ``last_hidden_state``) or ``auto`` (from the checkpoint's ``model_type``).
- ``weight`` (default 1.0), optional ``label``, ``image_size``, ``resize_size``, ``mean``, ``std``.
- ``tiny`` (or ``ImageSimilarity(..., tiny=True)``): build a small randomly initialised model from a
  config (tests, CPU smoke runs); ``tiny_config`` overrides its fields; ``tiny_class: "CLIPModel"`` builds
  a full CLIP model and uses ``get_image_features``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

KINDS = ("clip", "dinov2", "auto")

TINY_CLIP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=32, patch_size=8, projection_dim=16)
TINY_CLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=128, max_position_embeddings=16, projection_dim=16,
                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=32,
                   patch_size=8)


@dataclass
class Backbone:
    """One frozen vision model with its preprocessing."""

    label: str
    kind: str  # clip | clip_full | dinov2 | generic: how the embedding is read
    model: nn.Module
    weight: float
    crop_size: int
    resize_size: int
    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] (or uint8) -> normalised (B,3,crop,crop) on the model's device and dtype.

        Resize the shortest edge to ``resize_size`` (bicubic, antialiased), centre-crop ``crop_size``.
        """
        x = to_float_images(images).to(self.device, torch.float32)
        h, w = x.shape[-2:]
        scale = self.resize_size / min(h, w)
        nh, nw = max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp_(0.0, 1.0)
        top, left = (nh - self.crop_size) // 2, (nw - self.crop_size) // 2
        x = x[..., top : top + self.crop_size, left : left + self.crop_size]
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(self.dtype)

    @torch.no_grad()
    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> (B, D) float32 embeddings."""
        if self.kind == "clip":
            out = self.model(pixel_values=pixel_values).image_embeds
        elif self.kind in ("clip_full", "generic") and hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixel_values)
            if not torch.is_tensor(out):
                out = out.pooler_output
        else:  # dinov2 and other ViTs: CLS token of the last hidden state
            out = self.model(pixel_values=pixel_values).last_hidden_state[:, 0]
        return out.float()


# --------------------------------------------------------------------------------------------- images
def to_float_images(images: Any) -> torch.Tensor:
    """A batch (B,3,H,W) / (B,H,W,3) or one image (3,H,W) / (H,W,3), uint8 or float, numpy or torch,
    -> float32 (B,3,H,W) in [0,1]. uint8 is divided by 255; floats are taken as already in [0,1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not torch.is_tensor(images):
        raise TypeError(f"expected a tensor or numpy array, got {type(images).__name__}")
    x = images
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"expected (B,3,H,W) or (3,H,W) images, got shape {tuple(images.shape)}")
    if x.shape[1] != 3 and x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] != 3:
        raise ValueError(f"expected 3 channels, got shape {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


# --------------------------------------------------------------------------------------------- loading
def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(table)}")
    return table[dtype]


def _size_of(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        for k in ("shortest_edge", "height", "width"):
            if k in v and v[k]:
                return int(v[k])
    return None


def _read_preprocessor(source: str | None) -> dict:
    """``preprocessor_config.json`` of a local directory, or of a hub name already in the local cache."""
    if not source:
        return {}
    f: Any = os.path.join(source, "preprocessor_config.json")
    if not os.path.isdir(source):
        try:
            from huggingface_hub import try_to_load_from_cache

            f = try_to_load_from_cache(source, "preprocessor_config.json")
        except Exception:
            f = None
    if isinstance(f, str) and os.path.isfile(f):
        with open(f) as fh:
            return json.load(fh)
    return {}


def _build_tiny(kind: str, spec: dict, seed: int) -> tuple[nn.Module, str, int]:
    import transformers as tf

    overrides = dict(spec.get("tiny_config") or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind in ("clip", "auto"):
            vision = {**TINY_CLIP_VISION, **overrides}
            if spec.get("tiny_class") == "CLIPModel":
                proj = vision.pop("projection_dim")
                cfg = tf.CLIPConfig(text_config={**TINY_CLIP_TEXT, "projection_dim": proj},
                                    vision_config=vision, projection_dim=proj)
                return tf.CLIPModel(cfg), "clip_full", vision["image_size"]
            cfg = tf.CLIPVisionConfig(**vision)
            return tf.CLIPVisionModelWithProjection(cfg), "clip", cfg.image_size
        if kind == "dinov2":
            cfg = tf.Dinov2Config(**{**TINY_DINOV2, **overrides})
            return tf.Dinov2Model(cfg), "dinov2", cfg.image_size
    raise ValueError(f"unknown backbone kind {kind!r}; expected one of {KINDS}")


def _load_local(kind: str, source: str, dtype: torch.dtype) -> tuple[nn.Module, str, int]:
    import transformers as tf

    kw = dict(local_files_only=True, dtype=dtype)
    if kind == "auto":
        mt = tf.AutoConfig.from_pretrained(source, local_files_only=True).model_type
        kind = {"clip": "clip", "clip_vision_model": "clip", "dinov2": "dinov2",
                "dinov2_with_registers": "dinov2"}.get(mt, "generic")
    if kind == "clip":
        model = tf.CLIPVisionModelWithProjection.from_pretrained(source, **kw)
        return model, "clip", int(model.config.image_size)
    if kind == "dinov2":
        model = tf.AutoModel.from_pretrained(source, **kw)
        return model, "dinov2", int(getattr(model.config, "image_size", 224))
    model = tf.AutoModel.from_pretrained(source, **kw)
    cfg = getattr(model.config, "vision_config", model.config)
    return model, "generic", int(getattr(cfg, "image_size", 224))


def load_backbone(spec: dict, *, tiny: bool = False, device: str | torch.device | None = "cpu",
                  dtype: str | torch.dtype = "float32", seed: int = 0, label: str | None = None) -> Backbone:
    """Build one ``Backbone`` from a spec dict (see the module docstring)."""
    if spec.get("fit"):
        raise ValueError("a backbone with 'fit: true' is the tiny CLIP a run fits to its task before stage 1 "
                         "(services.clip_fit.prepare turns it into a 'path'); build the reward from the prepared config")
    kind = str(spec.get("kind", "auto")).lower()
    if kind not in KINDS:
        raise ValueError(f"backbone kind must be one of {KINDS}, got {kind!r}")
    weight = float(spec.get("weight", 1.0))
    if not weight >= 0.0:
        raise ValueError(f"backbone weight must be >= 0, got {weight}")
    dev, dt = _resolve_device(device), _resolve_dtype(dtype)
    source = spec.get("path") or spec.get("name")
    if bool(spec.get("tiny", tiny)):
        model, read_as, native = _build_tiny(kind, spec, seed)
        model = model.to(dt)
    else:
        if not source:
            raise ValueError(f"backbone spec needs 'path' or 'name' (or tiny=True): {spec}")
        model, read_as, native = _load_local(kind, str(source), dt)
    model = model.to(dev).eval().requires_grad_(False)

    pre = _read_preprocessor(None if spec.get("tiny", tiny) else str(source))
    default_mean, default_std = (CLIP_MEAN, CLIP_STD) if read_as.startswith("clip") else (IMAGENET_MEAN, IMAGENET_STD)
    mean = spec.get("mean") or pre.get("image_mean") or default_mean
    std = spec.get("std") or pre.get("image_std") or default_std
    crop = int(spec.get("image_size") or _size_of(pre.get("crop_size")) or
               (_size_of(pre.get("size")) if not pre.get("crop_size") else None) or
               (224 if read_as == "dinov2" and native > 224 else native))
    resize = int(spec.get("resize_size") or _size_of(pre.get("size")) or crop)
    return Backbone(
        label=label or str(spec.get("label") or read_as.replace("_full", "")),
        kind=read_as,
        model=model,
        weight=weight,
        crop_size=crop,
        resize_size=max(resize, crop),
        mean=torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
        std=torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
    )


# --------------------------------------------------------------------------------------------- similarity
class ImageSimilarity:
    """Weighted mean over backbones of the cosine similarity of (source, reconstruction) embeddings.

    ``similarity(src, rec) -> (total (B,), {label: (B,)})``; images are (B,3,H,W) in [0,1] (uint8 is also
    accepted), or lists of (3,H,W) images of any sizes.
    """

    def __init__(self, backbones: Sequence[dict], *, tiny: bool = False, device: str | torch.device | None = "cpu",
                 dtype: str | torch.dtype = "float32", max_batch: int = 64, seed: int = 0) -> None:
        if not backbones:
            raise ValueError("ImageSimilarity needs at least one backbone")
        self.backbones: list[Backbone] = []
        seen: dict[str, int] = {}
        for i, spec in enumerate(backbones):
            bb = load_backbone(dict(spec), tiny=tiny, device=device, dtype=dtype, seed=seed + i)
            n = seen.get(bb.label, 0)
            seen[bb.label] = n + 1
            if n:
                bb.label = f"{bb.label}_{n}"
            self.backbones.append(bb)
        total = sum(b.weight for b in self.backbones)
        if total <= 0:
            raise ValueError("backbone weights must sum to a positive number")
        self.weights = {b.label: b.weight / total for b in self.backbones}
        self.max_batch = int(max_batch)

    @property
    def labels(self) -> list[str]:
        return [b.label for b in self.backbones]

    def _pixels(self, bb: Backbone, images: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        if isinstance(images, (list, tuple)):
            return torch.cat([bb.preprocess(to_float_images(im)) for im in images], dim=0)
        return bb.preprocess(images)

    @torch.no_grad()
    def embed(self, images: torch.Tensor | Sequence[Any], backbone: str | int = 0) -> torch.Tensor:
        """(B, D) float32 embeddings of ``images`` under one backbone (by label or index)."""
        bb = self.backbones[backbone] if isinstance(backbone, int) else self.backbones[self.labels.index(backbone)]
        px = self._pixels(bb, images)
        return torch.cat([bb.embed(px[i : i + self.max_batch]) for i in range(0, px.shape[0], self.max_batch)])

    @torch.no_grad()
    def similarity(self, src: torch.Tensor | Sequence[Any], rec: torch.Tensor | Sequence[Any]
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Row-wise cosine similarity, weighted over backbones: ``(total (B,), {label: (B,)})`` on CPU."""
        n_src = len(src) if isinstance(src, (list, tuple)) else to_float_images(src).shape[0]
        n_rec = len(rec) if isinstance(rec, (list, tuple)) else to_float_images(rec).shape[0]
        if n_src != n_rec:
            raise ValueError(f"src and rec batch sizes differ: {n_src} vs {n_rec}")
        per: dict[str, torch.Tensor] = {}
        total = torch.zeros(n_src, dtype=torch.float32)
        for i, bb in enumerate(self.backbones):
            a, b = self.embed(src, i), self.embed(rec, i)
            s = F.cosine_similarity(a, b, dim=-1, eps=1e-8).cpu()
            per[bb.label] = s
            total += self.weights[bb.label] * s
        return total, per

    def __call__(self, src: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        return self.similarity(src, rec)[0]
