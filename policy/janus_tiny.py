"""Sizes of the tiny Janus (``model.arch: janus`` with ``janus_path: null``): random init from a config, no
download. ``model.janus_tiny`` overrides them per part (``text`` / ``vision`` / ``vq``)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import JanusConfig

TINY_TEXT: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}
TINY_VISION: dict[str, Any] = {  # SigLIP-style understanding encoder: 16x16 pixels, 4x4 patches
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 4,
    "mlp_ratio": 2.0,
    "depth": 2,
    "num_image_tokens": 16,
}
TINY_VQ: dict[str, Any] = {  # 4x4 codes -> 8x8 pixels (one upsample); GroupNorm(32) needs channels % 32 == 0
    "embed_dim": 8,
    "num_embeddings": 64,
    "latent_channels": 32,
    "base_channels": 32,
    "channel_multiplier": [1, 1],
    "num_res_blocks": 1,
    "num_hidden_layers": 2,
}


def tiny_janus_config(text_vocab: int, image_token_id: int, text: dict | None = None, vision: dict | None = None,
                      vq: dict | None = None) -> JanusConfig:
    """A small ``JanusConfig``: dims that must agree are derived (LM hidden = aligner / head widths).
    Override keys the sub-config does not know raise ValueError naming ``model.janus_tiny.<part>``."""
    from transformers import CONFIG_MAPPING, JanusConfig, JanusVisionConfig, JanusVQVAEConfig

    _check_keys("text", text, CONFIG_MAPPING[(text or {}).get("model_type", TINY_TEXT["model_type"])])
    _check_keys("vision", vision, JanusVisionConfig)
    _check_keys("vq", vq, JanusVQVAEConfig)
    t = {**TINY_TEXT, **(text or {}), "vocab_size": int(text_vocab)}
    h = int(t["hidden_size"])
    v = {**TINY_VISION, "projection_dim": h, **(vision or {})}
    q = {**TINY_VQ, "projection_dim": h, "image_token_embed_dim": h, **(vq or {})}
    return JanusConfig(text_config=t, vision_config=v, vq_config=q, image_token_id=int(image_token_id))


def _check_keys(part: str, overrides: dict | None, cls: type) -> None:
    known = set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(f"model.janus_tiny.{part}: unknown {cls.__name__} key(s) {unknown}")
