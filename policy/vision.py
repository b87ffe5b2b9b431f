"""The understanding side's own vision path when ``model.lm_path`` is a vision-language model directory
(Qwen2.5-VL, Qwen3-VL): its image processor, its vision tower and its multimodal rope positions.

An input image enters the prompt as the VLM's own token run ``<|vision_start|> <|image_pad|>*n <|vision_end|>``
(n = the processor's patch grid / spatial merge^2); the tower's features replace the ``<|image_pad|>``
embeddings and the text model runs on the VLM's 3-D (temporal, height, width) rope positions, computed by the
model's own ``get_rope_index``. Trajectories keep the raw input images (uint8, H x W x 3); the processor is
deterministic (PIL / numpy), so the rollout and the learner give the tower the same pixel values.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from policy.config import VLM_TYPES


def lm_dir_model_type(path: str | None) -> str | None:
    """``model_type`` of the ``config.json`` in ``path`` (None: no path or no readable config)."""
    if not path:
        return None
    f = Path(path) / "config.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def is_vlm_dir(path: str | None) -> bool:
    return lm_dir_model_type(path) in VLM_TYPES


def load_image_processor(path: str) -> Any:
    """The VLM directory's own image processor (``preprocessor_config.json``), PIL / numpy based: never
    transformers' full ``AutoProcessor``, whose video processor needs torchvision."""
    from transformers import AutoImageProcessor

    if not (Path(path) / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"model.lm_path: {path} holds a vision-language model but no "
                                "preprocessor_config.json (its image processor)")
    return AutoImageProcessor.from_pretrained(path, local_files_only=True)


def image_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (3,H,W) in [0,1] -> (H,W,3) uint8, the layout the policy's input path reads (exact for an image
    that came as uint8)."""
    return (x.detach().cpu().permute(1, 2, 0) * 255.0).round().clamp(0, 255).to(torch.uint8)


def empty_images() -> torch.Tensor:
    """No input images: (0, 0, 0, 3) uint8."""
    return torch.zeros((0, 0, 0, 3), dtype=torch.uint8)


def stack_images(parts: list[torch.Tensor]) -> torch.Tensor:
    """Images (n_i, H, W, 3) of several rows as one (sum n_i, H, W, 3) tensor (empty parts dropped)."""
    parts = [p for p in parts if p.shape[0]]
    return torch.cat(parts) if parts else empty_images()


@dataclass(frozen=True)
class VisionFeatures:
    """The tower's output for a batch's images: ``embeds`` (N, H) at the ``<|image_pad|>`` positions in
    row-major order, ``grid`` (M, 3) the processor's (t, h, w) patch grid per image, ``deepstack``: Qwen3-VL's
    per-layer features at those positions (None for Qwen2.5-VL)."""

    embeds: torch.Tensor
    grid: torch.Tensor
    deepstack: list[torch.Tensor] | None


@dataclass(frozen=True)
class LMInputs:
    """One LM call's inputs (``UnifiedPolicy.lm_inputs``): ``embeds`` (B, T, H); ``position_ids`` (B, T), or
    (3, B, T) for a VLM; ``extra`` text-model keyword arguments; ``delta`` (B,) a VLM's rope delta (the next
    token's position minus its index among the row's real tokens; None for a causal LM)."""

    embeds: torch.Tensor
    position_ids: torch.Tensor
    extra: dict[str, Any]
    delta: torch.Tensor | None


def input_image_mode(cfg: Any, is_vlm: bool) -> str:
    """``model.input_image`` resolved: null -> ``vision`` for a VLM, ``bridge`` for a causal LM; ``vision`` /
    ``both`` on a causal LM are errors."""
    mode = cfg.input_image or ("vision" if is_vlm else "bridge")
    if mode != "bridge" and not is_vlm:
        raise ValueError(f"model.input_image: {mode!r} needs a vision-language model directory in model.lm_path "
                         f"({', '.join(VLM_TYPES)}); a causal LM reads the input image through the bridge only")
    return mode


class VisionSide:
    """The VLM's processor, tower and position ids (``vlm`` a ``*ForConditionalGeneration`` model)."""

    def __init__(self, vlm: nn.Module, processor: Any) -> None:
        self.vlm = vlm
        self.processor = processor
        c = vlm.config
        self.image_token = int(c.image_token_id)
        self.start_token = int(c.vision_start_token_id)
        self.end_token = int(c.vision_end_token_id)
        self.merge = int(c.vision_config.spatial_merge_size)
        self.cache_kwarg = cache_keyword(self.text_model)

    @property
    def model_type(self) -> str:
        return str(self.vlm.config.model_type)

    @property
    def tower(self) -> nn.Module:
        return self.vlm.model.visual

    @property
    def text_model(self) -> nn.Module:
        return self.vlm.model.language_model

    def token_ids(self) -> dict[str, int]:
        return {"vision_start": self.start_token, "vision_pad": self.image_token, "vision_end": self.end_token}

    # ---- processor ----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (M, H, W, 3) -> (pixel_values (P, D) float32, image_grid_thw (M, 3) long)."""
        arrays = [np.ascontiguousarray(x) for x in images.cpu().numpy()]
        out = self.processor(images=arrays, return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"].long()

    @staticmethod
    def sized(image: np.ndarray | torch.Tensor, side: int) -> torch.Tensor:
        """An input image (H, W, 3) uint8 as the tower reads it: ``side`` x ``side`` (PIL bicubic when it is
        another size), so a batch's images stack and the rollout and the learner see the same pixels."""
        arr = np.array(image, dtype=np.uint8)  # a copy: writable
        if arr.shape[:2] != (side, side):
            from PIL import Image

            arr = np.asarray(Image.fromarray(arr).resize((side, side), Image.Resampling.BICUBIC))
        return torch.tensor(arr)

    def n_tokens(self, grid: torch.Tensor) -> list[int]:
        """``<|image_pad|>`` tokens of each image of a (M, 3) grid."""
        return (grid.prod(-1) // self.merge**2).tolist()

    def slot(self, image: np.ndarray | torch.Tensor) -> list[int]:
        """The prompt's token run of one input image (H, W, 3) uint8."""
        _, grid = self.preprocess(torch.as_tensor(np.asarray(image))[None])
        return [self.start_token, *[self.image_token] * self.n_tokens(grid)[0], self.end_token]

    # ---- tower --------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor, device: torch.device) -> VisionFeatures:
        """The tower's features of uint8 images (M, H, W, 3) on ``device`` (gradients flow when it trains)."""
        pixels, grid = self.preprocess(images)
        grid = grid.to(device)
        out = self.vlm.model.get_image_features(pixels.to(device), grid, return_dict=True)
        embeds = torch.cat(list(out.pooler_output), dim=0)
        deep = getattr(out, "deepstack_features", None)
        return VisionFeatures(embeds, grid, [d if torch.is_tensor(d) else torch.cat(list(d)) for d in deep]
                              if deep is not None else None)

    def scatter(self, input_ids: torch.Tensor, embeds: torch.Tensor, feats: VisionFeatures | None
                ) -> tuple[torch.Tensor, dict[str, Any]]:
        """``embeds`` with the tower's features at the ``<|image_pad|>`` positions; the text model's extra
        keyword arguments (deepstack) beside."""
        mask = input_ids == self.image_token
        n = int(mask.sum())
        have = 0 if feats is None else int(feats.embeds.shape[0])
        if n != have:
            raise ValueError(f"embed: {n} <|image_pad|> tokens in input_ids, but the input images give {have} "
                             "vision features")
        if n == 0:
            return embeds, {}
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), feats.embeds.to(embeds.dtype))
        extra: dict[str, Any] = {}
        if feats.deepstack is not None:
            extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": [d.to(embeds.dtype) for d in feats.deepstack]}
        return embeds, extra

    # ---- positions ----------------------------------------------------------------------------------
    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, grid: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(position_ids (3, B, T), delta (B,)): the model's multimodal rope positions of a padded batch
        (``get_rope_index``; padding positions 0) and, per row, what a next token's position exceeds its
        index among the row's real tokens by (max position + 1 - real tokens)."""
        mm_types = (input_ids == self.image_token).int()
        if grid is None or grid.shape[0] == 0:
            grid = None
        pos, delta = self.vlm.model.get_rope_index(input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid,
                                                   attention_mask=attention_mask)
        return pos, delta.reshape(-1).to(pos.device)


def cache_keyword(model: nn.Module) -> str:
    """The model's keyword for the KV cache (transformers renames ``past_key_values`` -> ``cache``)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def next_positions(attention_mask: torch.Tensor, delta: torch.Tensor | None, q_len: int) -> torch.Tensor:
    """Positions of the last ``q_len`` tokens of a padded batch (B, P+T): ``cumsum(mask) - 1`` (B, q) for a
    causal LM (``delta`` None), that plus the row's rope ``delta`` on all three axes (3, B, q) for a VLM."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
    if delta is None:
        return pos
    return (pos + delta.to(pos.device)[:, None]).unsqueeze(0).expand(3, -1, -1)
