"""Qwen-Image as the policy's generator: ``QwenImageTransformer2DModel`` + ``AutoencoderKLQwenImage`` from a
``QwenImagePipeline`` directory, conditioned directly on the hidden states of its own text encoder, the
Qwen2.5-VL that is the policy's LM (``policy.pipeline.lm_sources``): no connector sits between them.

What carries over from diffusers' QwenImagePipeline (``pipeline_qwenimage.py``):

- **Prompt.** A standalone text-to-image prompt (GvU's description, UAE's caption) is the pipeline's
  ``prompt_template_encode`` around the prompt's tokens (:func:`generation_prompt`); the condition skips the
  template's system part, ``<|im_start|>system ... <|im_end|>\\n<|im_start|>user\\n`` (the pipeline's
  ``prompt_template_encode_start_idx`` = 34 tokens with Qwen's tokenizer; here the length of the prefix as the
  policy's tokenizer encodes it), so it holds the prompt's tokens and the template's suffix. A generation in
  the middle of a conversation (CLEAR's ``<gen>``) conditions on its context as it is.
- **Condition.** The pipeline feeds the transformer the text encoder's last hidden states of the prompt tokens
  after its system template (``drop_idx``), left-aligned and right-padded, with their mask
  (``encoder_hidden_states`` + ``encoder_hidden_states_mask``). Here the tokens are the last ``model.cond_tokens``
  of the trajectory's own context in [``cond_start``, ``cond_end``) (what the LM has read when it generates,
  less a template's system part), packed the same way: real tokens first, padding after, masked.
- **Latents.** The VAE's latents are 5-D (B, C, T=1, H, W), normalised per channel with the config's
  ``latents_mean`` / ``latents_std``: z_norm = (z - mean) / std, z = z_norm * std + mean. The policy keeps them as
  (B, C, h, w) (the sampler's math is elementwise); the transformer reads them as 2 x 2 patches packed into
  (B, h/2 * w/2, 4C) tokens with ``img_shapes`` [(1, h/2, w/2)].
- **Time.** The transformer takes ``timestep = t / 1000`` with t = sigma * 1000 (the scheduler's timesteps); the
  sigmas are the scheduler's ``set_timesteps(sigmas=linspace(1, 1/K, K), mu)`` with mu from the packed image
  token count (``calculate_shift``; ``policy.pipeline.FlowSchedule``).
"""

from __future__ import annotations

import torch
from torch import nn

from policy.pipeline import QWEN_IMAGE

QWEN_IMAGE_VAE = "AutoencoderKLQwenImage"
# QwenImagePipeline.prompt_template_encode: the prompt goes where "{}" is
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
# transformer options of the other Qwen-Image variants (guidance-distilled, layered): their inputs are not built here
_UNSUPPORTED = ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope")


def is_qwen_image(generator_class: str) -> bool:
    return generator_class == QWEN_IMAGE


def is_frames_vae(vae: nn.Module) -> bool:
    """Whether the VAE reads and writes 5-D (B, C, T, H, W) tensors (Qwen-Image's)."""
    return type(vae).__name__ == QWEN_IMAGE_VAE


def check_transformer(generator: nn.Module, lm_hidden: int) -> None:
    """The loaded transformer's config against what :func:`velocity` passes it and the LM it reads."""
    c = generator.config
    on = [k for k in _UNSUPPORTED if c.get(k)]
    if on:
        raise ValueError(f"model.generator_path: {QWEN_IMAGE} with {on} is not supported (text-to-image "
                         "Qwen-Image only)")
    if int(c.joint_attention_dim) != lm_hidden:
        raise ValueError(f"model.lm_path: the LM's hidden size {lm_hidden} != the transformer's joint_attention_dim "
                         f"{c.joint_attention_dim}: Qwen-Image reads its text encoder's hidden states directly")


def generation_prompt(tokenizer, prompt_ids: list[int]) -> tuple[list[int], int]:
    """A text-to-image prompt as the pipeline encodes it: (the template's prefix ids + ``prompt_ids`` + its suffix
    ids, the prefix's length), the prefix and suffix being :data:`PROMPT_TEMPLATE`'s two halves tokenized
    alone. The length is how many leading tokens the condition skips (``cond_start``), as the pipeline drops
    ``prompt_template_encode_start_idx`` tokens (its prefix under Qwen's tokenizer)."""
    prefix, suffix = (tokenizer.encode(part, add_special_tokens=False) for part in PROMPT_TEMPLATE.split("{}"))
    return prefix + list(prompt_ids) + suffix, len(prefix)


def text_condition(window: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A context window (B, L, H) and its mask (B, L) -> (encoder_hidden_states, encoder_hidden_states_mask): the
    valid tokens first in their order, padding (zeros, mask False) after, as the pipeline's prompt embeddings."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
    mask = valid.gather(1, order)
    enc = window.gather(1, order.unsqueeze(-1).expand_as(window))
    return torch.where(mask.unsqueeze(-1), enc, torch.zeros_like(enc)), mask


def pack(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/p)(w/p), C p^2): p x p patches, row-major (the pipeline's ``_pack_latents``)."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpack(tokens: torch.Tensor, c: int, h: int, w: int, p: int) -> torch.Tensor:
    """The inverse of :func:`pack`: (B, (h/p)(w/p), C p^2) -> (B, C, h, w)."""
    b = tokens.shape[0]
    x = tokens.view(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def velocity(generator: nn.Module, latent: torch.Tensor, sigma: torch.Tensor, encoder_hidden_states: torch.Tensor,
             mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The transformer's velocity (B, C, h, w) at ``sigma`` (B,) for latents (B, C, h, w) in ``dtype``."""
    b, c, h, w = latent.shape
    p = int(generator.config.patch_size)
    timestep = (sigma * 1000.0).to(dtype) / 1000.0  # the pipeline's t / 1000, t = sigma * 1000 cast to the latents'
    out = generator(
        hidden_states=pack(latent.to(dtype), p),
        encoder_hidden_states=encoder_hidden_states.to(dtype),
        encoder_hidden_states_mask=mask,
        timestep=timestep,
        img_shapes=[[(1, h // p, w // p)]] * b,
        return_dict=False,
    )[0]
    return unpack(out, c, h, w, p)


def latent_norm(vae: nn.Module, device: torch.device) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """The VAE latent's (shift, scale), z_norm = (z - shift) * scale: AutoencoderKL's scalars (shift_factor,
    scaling_factor); Qwen-Image's per channel (C, 1, 1) float32 (latents_mean, 1 / latents_std)."""
    c = vae.config
    if not is_frames_vae(vae):
        return float(c.get("shift_factor") or 0.0), float(c.scaling_factor)
    mean = torch.tensor(c.latents_mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    std = torch.tensor(c.latents_std, dtype=torch.float32, device=device).view(-1, 1, 1)
    return mean, 1.0 / std


def to_vae(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) as the VAE reads it: one frame (B, C, 1, H, W) for Qwen-Image's 5-D VAE."""
    return x[:, :, None] if is_frames_vae(vae) else x


def from_vae(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The VAE's output back to (B, C, H, W) (the one frame of a 5-D VAE)."""
    return x[:, :, 0] if is_frames_vae(vae) else x


def vae_factor_channels(config) -> tuple[int, int]:
    """(spatial factor, latent channels) of an AutoencoderKLQwenImage config: 2^len(temperal_downsample), z_dim."""
    return 2 ** len(config["temperal_downsample"]), int(config["z_dim"])
