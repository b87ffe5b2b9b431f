"""A tiny random-init SD3 pipeline directory as diffusers' ``StableDiffusion3Pipeline.save_pretrained`` writes it
(model_index.json, transformer/, vae/, scheduler/ with SD3.5's shift 3; no text encoders: the policy's LM conditions
it), for the tests that load a generator from a pipeline directory."""

from __future__ import annotations

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)

SHIFT = 3.0  # SD3.5's scheduler shift


def save_sd3_pipeline(root, shift: float = SHIFT, **scheduler) -> None:
    """A tiny SD3 pipeline directory in the hub's layout (no text encoders: the policy's LM conditions it)."""
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,))
    vae = AutoencoderKL(  # SD3's VAE layout: 16 latent channels, shift_factor and scaling_factor
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=1,
        latent_channels=16, norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift, **scheduler),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
        tokenizer_3=None)
    pipe.save_pretrained(root)
