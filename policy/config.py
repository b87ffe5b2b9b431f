"""PolicyConfig: what the policy is built from (tiny from configs, or local checkpoints).

``arch`` picks the architecture (``policy.factory.build_policy`` is the one place that reads it):
``unified`` = LM + flow generator + VAE + bridge (``policy.model.UnifiedPolicy``, the ``lm_*`` /
``generator_*`` / ``vae_*`` fields); ``janus`` = one autoregressive model that generates images as VQ
codes (``policy.janus.JanusPolicy``: ``janus_path`` or, when null, a tiny one from ``janus_tiny``).

No torch / transformers import here: ``services/config.py`` embeds this as the ``model`` section and
validates YAML without loading weights. Paths are only checked by :meth:`PolicyConfig.check_paths`
(called when the model is actually loaded), so real-scale configs validate on a machine without weights.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from policy.pipeline import QWEN_IMAGE

# Defaults of the tiny model; the ``*_tiny`` fields are overrides merged on top of these.
TINY_LM: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
    # vocab_size: set from the tokenizer at build time
}

TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "scaling_factor": 1.0,
    # sample_size: set from image_size at build time
}

TINY_GENERATOR: dict[str, Any] = {
    "patch_size": 2,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,  # must equal num_attention_heads * attention_head_dim
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 16,
    # sample_size / in_channels / out_channels: set from the VAE latent at build time
}


#: ``config.json`` ``model_type`` of the vision-language models ``lm_path`` may name (policy/vision.py).
VLM_TYPES = ("qwen2_5_vl", "qwen3_vl")

# The fields only one architecture reads (``PolicyConfig.unused_fields`` names those set for the other).
UNIFIED_FIELDS = ("lm_path", "lm_tiny", "generator_path", "generator_tiny", "vae_path", "vae_tiny", "read_generation")
JANUS_FIELDS = ("janus_path", "janus_tiny")
JANUS_TINY_KEYS = ("text", "vision", "vq")  # overrides of policy.janus_tiny.TINY_TEXT / TINY_VISION / TINY_VQ

#: LoRA targets (``model.lora``): module-name suffixes, as peft matches them. The LM's are the attention and MLP
#: projections of Qwen2 / Qwen2.5-VL / Qwen3-VL text layers; the generator's the joint-attention projections
#: of SD3 / SD3.5 blocks (image and context streams) for ``arch: unified``; for ``arch: janus`` (whose LM, a
#: Llama, also generates) the first layer of the generation aligner and the two of the generation head.
LM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GENERATOR_LORA_TARGETS = {
    "unified": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
    "janus": ("fc1", "proj_out", "vision_head"),
}


class FieldError(ValueError):
    """A ``model`` section problem tied to one field path inside the section (``lora.lm_target_modules``);
    ``services.overrides.first_error`` prefixes the section's own path."""

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path, self.message = field_path, message
        super().__init__(f"{field_path}: {message}")


class LoraSettings(BaseModel):
    """``model.lora``: low-rank adapters (peft) on the LM and on the generator (``policy.lora``). Enabled, only
    the adapters and the fresh heads (bridge, connector) train, travel in weight syncs and are checkpointed;
    the base weights are loaded once per replica and never change. An empty target list leaves that side
    without an adapter (its base frozen)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    rank: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)  # the update is (alpha / rank) * B @ A
    dropout: float = Field(0.0, ge=0, lt=1)
    lm_target_modules: list[str] = Field(default_factory=lambda: list(LM_LORA_TARGETS))
    generator_target_modules: list[str] | None = None  # null: GENERATOR_LORA_TARGETS[model.arch]

    @field_validator("lm_target_modules", "generator_target_modules")
    @classmethod
    def _names(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        bad = [t for t in v if not t or t != t.strip() or t.startswith(".") or t.endswith(".")]
        if bad:
            raise ValueError(f"invalid module name(s) {bad}: a module-name suffix such as 'q_proj'")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate module name(s) in {v}")
        return v

    def generator_targets(self, arch: str, freeze_generator: bool) -> list[str]:
        """The generator's targets (``arch``'s defaults when unset): none when ``model.freeze_generator`` (the
        generator is then the reward environment's, never adapted)."""
        if freeze_generator:
            return []
        given = self.generator_target_modules
        return list(GENERATOR_LORA_TARGETS[arch] if given is None else given)


class PolicyConfig(BaseModel):
    """The ``model`` section. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["unified", "janus"] = "unified"
    janus_path: str | None = None  # a local JanusForConditionalGeneration directory (with its tokenizer)
    janus_tiny: dict[str, dict[str, Any]] = Field(default_factory=dict)  # {text|vision|vq: overrides}
    lm_path: str | None = None
    lm_tiny: dict[str, Any] = Field(default_factory=dict)
    tokenizer_path: str | None = None
    generator_class: str = "SD3Transformer2DModel"
    # a transformer directory or a diffusers pipeline (policy/pipeline.py); Qwen-Image: a pipeline (or a saved policy's)
    generator_path: str | None = Field(None, validate_default=True)
    generator_tiny: dict[str, Any] = Field(default_factory=dict)
    vae_path: str | None = None
    vae_tiny: dict[str, Any] = Field(default_factory=dict)
    image_size: int = Field(32, gt=0)
    cond_tokens: int = Field(32, gt=0)
    bridge_patch: int = Field(2, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    freeze_generator: bool = False
    # CLEAR: what the LM reads of a generated image: its latent through the bridge (the Latent Representation
    # Bridge), or (pixels, the paper's ablation) its decoded 8-bit image encoded again by the VAE
    read_generation: Literal["latent", "pixels"] = "latent"
    # a vision-language lm_path (policy/vision.py): how the input image reaches the LM, and its vision tower
    input_image: Literal["vision", "bridge", "both"] | None = None  # null: vision for a VLM, else bridge
    train_vision_tower: bool = False
    lora: LoraSettings = Field(default_factory=LoraSettings)

    @field_validator("image_size")
    @classmethod
    def _image_size_multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {v}")
        return v

    @field_validator("generator_path")
    @classmethod
    def _qwen_image_loads_from_a_directory(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None and info.data.get("arch") == "unified" and info.data.get("generator_class") == QWEN_IMAGE:
            raise ValueError(f"{QWEN_IMAGE} loads from a Qwen-Image pipeline directory (QwenImagePipeline: "
                             "model_index.json, text_encoder/, transformer/, vae/, scheduler/); there is no tiny one")
        return v

    @field_validator("janus_tiny")
    @classmethod
    def _janus_tiny_keys(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        unknown = sorted(set(v) - set(JANUS_TINY_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; known: {list(JANUS_TINY_KEYS)}")
        return v

    @model_validator(mode="after")
    def _lora(self) -> PolicyConfig:
        lo = self.lora
        if not lo.enabled:
            return self
        if self.freeze_generator and lo.generator_target_modules:
            raise FieldError("lora.generator_target_modules", "model.freeze_generator keeps the generator "
                             "without an adapter; set [] or drop freeze_generator")
        if not lo.lm_target_modules and not lo.generator_targets(self.arch, self.freeze_generator):
            raise FieldError("lora.lm_target_modules", "empty, and the generator gets no adapter either: "
                             "LoRA would adapt nothing")
        return self

    def unused_fields(self) -> list[str]:
        """Fields set to a non-default value that ``arch`` does not read (a config mistake)."""
        fields = type(self).model_fields
        other = JANUS_FIELDS if self.arch == "unified" else UNIFIED_FIELDS
        return [f for f in other if getattr(self, f) != fields[f].get_default(call_default_factory=True)]

    # ---- merged sub-configs -------------------------------------------------------------------
    def lm_tiny_config(self) -> dict[str, Any]:
        """Qwen2Config kwargs of the tiny LM (defaults + ``lm_tiny`` overrides)."""
        return {**TINY_LM, **self.lm_tiny}

    def vae_tiny_config(self) -> dict[str, Any]:
        """AutoencoderKL kwargs of the tiny VAE."""
        return {"sample_size": self.image_size, **TINY_VAE, **self.vae_tiny}

    def generator_tiny_config(self, latent_channels: int, latent_side: int) -> dict[str, Any]:
        """Generator kwargs of the tiny DiT for a latent of ``latent_channels`` x side x side."""
        base = {"sample_size": latent_side, "in_channels": latent_channels, "out_channels": latent_channels}
        return {**base, **TINY_GENERATOR, **self.generator_tiny}

    # ---- paths ---------------------------------------------------------------------------------
    def check_paths(self, prefix: str = "model") -> None:
        """Raise FileNotFoundError naming the field for every set path that does not exist."""
        for name in ("lm_path", "tokenizer_path", "generator_path", "vae_path", "janus_path"):
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"{prefix}.{name}: {path} does not exist")

    # ---- real-scale presets (validate without weights) -----------------------------------------
    @classmethod
    def real_clear(cls, root: str = "/models", **overrides: Any) -> PolicyConfig:
        """CLEAR: Qwen2.5-7B-Instruct LM + SD3.5-medium DiT / VAE, both trained."""
        sd = f"{root}/stable-diffusion-3.5-medium"
        base = dict(
            lm_path=f"{root}/Qwen2.5-7B-Instruct",
            tokenizer_path=f"{root}/Qwen2.5-7B-Instruct",
            generator_class="SD3Transformer2DModel",
            generator_path=sd,  # a diffusers pipeline directory: transformer/, vae/, scheduler/ (shift 3.0)
            image_size=512,  # 16 x 64 x 64 latent
            cond_tokens=256,
            bridge_patch=4,  # 256 image tokens per slot
            dtype="bfloat16",
        )
        return cls(**{**base, **overrides})

    @classmethod
    def real_uae(cls, root: str = "/models", **overrides: Any) -> PolicyConfig:
        """UAE: same backbone; the generator is frozen (part of the reward environment)."""
        return cls.real_clear(root, **{"freeze_generator": True, **overrides})

    @classmethod
    def real_gvu(cls, root: str = "/models", **overrides: Any) -> PolicyConfig:
        """GvU: same backbone; generator and LM trained from the model's own understanding reward."""
        return cls.real_clear(root, **overrides)
