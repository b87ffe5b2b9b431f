"""Published architectures the memory estimate (``policy.estimate``) builds when a configured directory is not on
this machine: each is the model's ``config.json`` as its hub repository ships it, written as a transformers /
diffusers config dict (shape fields only; tokenizer ids and dtype kept where the class reads them).

Keys are the directory names users download them into (``/models/<key>``, ``.../<pipeline>/transformer``).
"""

from __future__ import annotations

from typing import Any

# Qwen/Qwen2.5-7B-Instruct, config.json
QWEN25_7B: dict[str, Any] = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "hidden_act": "silu",
}

# Qwen/Qwen2.5-VL-7B-Instruct, config.json (text decoder as Qwen2.5-7B; 32-block ViT, 1280 wide, merger to 3584)
QWEN25_VL_7B: dict[str, Any] = {
    "model_type": "qwen2_5_vl", "architectures": ["Qwen2_5_VLForConditionalGeneration"], "hidden_size": 3584,
    "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False,
    "hidden_act": "silu", "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: 24 blocks, dual attention in 0-12)
SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
    "dual_attention_layers": list(range(13)), "in_channels": 16, "joint_attention_dim": 4096,
    "num_attention_heads": 24, "num_layers": 24, "out_channels": 16, "patch_size": 2,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm", "sample_size": 128,
}

# stabilityai/stable-diffusion-3.5-medium, vae/config.json (the SD3 VAE: 16 latent channels, factor 8)
SD35_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 16, "layers_per_block": 2,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "use_quant_conv": False, "use_post_quant_conv": False, "force_upcast": True,
}

# stabilityai/stable-diffusion-3.5-medium, scheduler/scheduler_config.json
SD35_SCHEDULER: dict[str, Any] = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                                  "shift": 3.0}

# Qwen/Qwen-Image, transformer/config.json (MMDiT: 60 dual-stream blocks, 24 x 128 wide, reads Qwen2.5-VL's 3584-wide
# hidden states; latents packed as 2 x 2 patches of 16 channels)
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "_class_name": "QwenImageTransformer2DModel", "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
    "guidance_embeds": False, "in_channels": 64, "joint_attention_dim": 3584, "num_attention_heads": 24,
    "num_layers": 60, "out_channels": 16, "patch_size": 2,
}

# Qwen/Qwen-Image, vae/config.json (a causal 3-D VAE: 16 latent channels, spatial factor 8, per-channel statistics)
QWEN_IMAGE_VAE: dict[str, Any] = {
    "_class_name": "AutoencoderKLQwenImage", "attn_scales": [], "base_dim": 96, "dim_mult": [1, 2, 4, 4],
    "dropout": 0.0, "num_res_blocks": 2, "temperal_downsample": [False, True, True], "z_dim": 16,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
                     -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
                    1.6382, 1.1253, 2.8251, 1.916],
}

# Qwen/Qwen-Image, scheduler/scheduler_config.json (dynamic, resolution-dependent shift; terminal sigma 0.02)
QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.5,
    "invert_sigmas": False, "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0,
    "shift_terminal": 0.02, "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}

# deepseek-community/Janus-Pro-7B, config.json (transformers' JanusConfig: a 30-layer 4096-wide Llama text model,
# SigLIP-L/16 at 384 px for understanding, a 16384-code VQ tokenizer for generation)
JANUS_PRO_7B: dict[str, Any] = {
    "model_type": "janus", "architectures": ["JanusForConditionalGeneration"], "image_token_id": 100581,
    "tie_word_embeddings": False,
    "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30,
                    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 102400,
                    "max_position_embeddings": 16384, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 384, "patch_size": 16, "mlp_ratio": 4.0,
                      "projection_dim": 4096, "depth": 2, "num_image_tokens": 576},
    "vq_config": {"embed_dim": 8, "num_embeddings": 16384, "latent_channels": 256, "base_channels": 128,
                  "channel_multiplier": [1, 1, 2, 2, 4], "num_res_blocks": 2, "num_patches": 24,
                  "projection_dim": 4096, "image_token_embed_dim": 4096, "num_hidden_layers": 2},
}

#: directory name -> config dict
KNOWN: dict[str, dict[str, Any]] = {
    "Qwen2.5-7B-Instruct": QWEN25_7B,
    "Qwen2.5-VL-7B-Instruct": QWEN25_VL_7B,
    "stable-diffusion-3.5-medium/transformer": SD35_MEDIUM_TRANSFORMER,
    "stable-diffusion-3.5-medium/vae": SD35_VAE,
    "stable-diffusion-3.5-medium/scheduler": SD35_SCHEDULER,
    "Qwen-Image/text_encoder": QWEN25_VL_7B,  # the pipeline's text encoder is Qwen2.5-VL-7B-Instruct
    "Qwen-Image/transformer": QWEN_IMAGE_TRANSFORMER,
    "Qwen-Image/vae": QWEN_IMAGE_VAE,
    "Qwen-Image/scheduler": QWEN_IMAGE_SCHEDULER,
    "Janus-Pro-7B": JANUS_PRO_7B,
}

#: published parameter counts (model cards), the estimate's plausibility check in the tests
PUBLISHED_PARAMS: dict[str, float] = {
    "Qwen2.5-7B-Instruct": 7.61e9,
    "Qwen2.5-VL-7B-Instruct": 8.29e9,
    "stable-diffusion-3.5-medium/transformer": 2.5e9,  # incl. the 384 x 384 x 1536 positional-embedding buffer
    "Qwen-Image/transformer": 20e9,  # "a 20B MMDiT"
    "Janus-Pro-7B": 7.4e9,
}


def known_key(path: str, sub: str | None = None) -> str | None:
    """The table's key for a directory ``path`` (optionally its subfolder ``sub``), matched on its last one or
    two path components; None when the architecture is not in the table."""
    parts = [p for p in str(path).rstrip("/").split("/") if p] + ([sub] if sub else [])
    for n in (2, 1):
        key = "/".join(parts[-n:])
        if key in KNOWN:
            return key
    return None


def known_config(path: str, sub: str | None = None) -> dict[str, Any] | None:
    """The table's config for ``path`` (see :func:`known_key`), or None."""
    key = known_key(path, sub)
    return None if key is None else KNOWN[key]
