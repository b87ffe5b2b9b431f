"""A tiny random-init Qwen-Image pipeline directory as users have it, written by diffusers' own
``QwenImagePipeline.save_pretrained``: model_index.json, text_encoder/ (Qwen2_5_VLForConditionalGeneration),
tokenizer/ (built in code with Qwen's special tokens), transformer/ (QwenImageTransformer2DModel), vae/
(AutoencoderKLQwenImage: 16 latent channels, factor 8, the published latents_mean / latents_std) and scheduler/
(FlowMatchEulerDiscreteScheduler with Qwen-Image's dynamic shift settings). No download."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLForConditionalGeneration
from vlm_dirs import TEXT, image_processor, qwen25_vl_config, qwen_tokenizer

# Qwen/Qwen-Image scheduler/scheduler_config.json (policy.known_archs.QWEN_IMAGE_SCHEDULER)
QWEN_IMAGE_SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                            num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
                            use_dynamic_shifting=True)


def save_qwen_image(root: Path, seed: int = 0, processor: bool = False) -> Path:
    """The tiny pipeline at ``root``; ``processor``: also a ``processor/`` with the VLM's image processor config
    (as Qwen-Image-Edit ships one)."""
    root = Path(root)
    tok = qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen2_5_VLForConditionalGeneration(qwen25_vl_config(tok))
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=TEXT["hidden_size"], axes_dims_rope=(4, 6, 6))
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True])
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=vae,
                             text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(root)
    if processor:
        image_processor().save_pretrained(root / "processor")
    return root
