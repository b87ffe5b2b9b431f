"""Build or load the sub-models of the policy: tokenizer, LM, VAE, generator.

Tiny models come from the config (random init, no download); real ones from local directories
(``local_files_only``: never the network). ``lm_path`` is a causal LM (``AutoModelForCausalLM``) or a
vision-language model (``AutoModelForImageTextToText``: Qwen2.5-VL, Qwen3-VL; ``policy.vision``), the class
read from its ``config.json``. ``generator_path`` is a transformer directory or a diffusers
pipeline directory (``policy.pipeline``): then the transformer, the VAE (unless ``vae_path`` is set) and the
scheduler come from its subfolders.
"""

from __future__ import annotations

import inspect
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from policy.config import PolicyConfig
from policy.pipeline import FlowSchedule, PipelineDir, check_generator_dir
from policy.tokenizer import build_tiny_tokenizer, load_tokenizer
from policy.vision import is_vlm_dir, load_image_processor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(cfg: PolicyConfig) -> torch.dtype:
    return DTYPES[cfg.dtype]


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast a freshly built (float32) diffusers module only when another dtype is asked for."""
    if dtype == torch.float32:
        return module
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # "modules to keep in float32: []" noise
    try:
        return module.to(dtype)
    finally:
        diffusers.utils.logging.set_verbosity(level)


def _check_keys(field: str, keys: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(keys) - allowed)
    if unknown:
        raise ValueError(f"model.{field}: unknown {what} key(s) {unknown}")


def _init_params(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def build_tokenizer(cfg: PolicyConfig) -> PreTrainedTokenizerBase:
    """``tokenizer_path``, else the LM (or Janus) directory, else the tiny in-code BPE."""
    path = cfg.tokenizer_path or (cfg.janus_path if cfg.arch == "janus" else cfg.lm_path)
    return load_tokenizer(path) if path else build_tiny_tokenizer()


def build_lm(cfg: PolicyConfig, vocab_size: int) -> PreTrainedModel:
    """Causal LM or VLM from ``lm_path``, or a tiny Qwen2; embeddings grow to ``vocab_size`` when needed."""
    dtype = torch_dtype(cfg)
    if cfg.lm_path:
        auto = AutoModelForImageTextToText if is_vlm_dir(cfg.lm_path) else AutoModelForCausalLM
        lm = auto.from_pretrained(cfg.lm_path, dtype=dtype, local_files_only=True)
    else:
        kwargs = cfg.lm_tiny_config()
        _check_keys(
            "lm_tiny", cfg.lm_tiny, set(Qwen2Config().to_dict()) | _init_params(Qwen2Config), "Qwen2Config"
        )
        kwargs.setdefault("vocab_size", vocab_size)
        # _from_config builds in ``dtype`` but keeps the RoPE buffers in float32, as from_pretrained does
        lm = Qwen2ForCausalLM._from_config(Qwen2Config(**kwargs), dtype=dtype)
    if lm.get_input_embeddings().num_embeddings < vocab_size:
        lm.resize_token_embeddings(vocab_size)
    return lm


def build_image_processor(cfg: PolicyConfig):
    """The image processor of a VLM ``lm_path`` (its ``preprocessor_config.json``), else None."""
    return load_image_processor(cfg.lm_path) if cfg.lm_path and is_vlm_dir(cfg.lm_path) else None


def pipeline_of(cfg: PolicyConfig) -> PipelineDir | None:
    """The checked pipeline directory ``generator_path`` names, or None (a transformer directory or tiny)."""
    return check_generator_dir(cfg.generator_path, cfg.generator_class) if cfg.generator_path else None


def build_schedule(cfg: PolicyConfig) -> FlowSchedule | None:
    """The pipeline scheduler's sigma schedule, or None (no scheduler: ``policy.sde.flow_sigmas``)."""
    pipe = pipeline_of(cfg)
    return pipe.schedule if pipe is not None else None


def build_vae(cfg: PolicyConfig) -> AutoencoderKL:
    """Frozen AutoencoderKL (requires_grad False, eval): ``vae_path``, else the pipeline's ``vae/``, else tiny."""
    pipe = pipeline_of(cfg)
    path = cfg.vae_path or (str(pipe.vae) if pipe is not None else None)
    if path:
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=torch_dtype(cfg), local_files_only=True)
    else:
        _check_keys("vae_tiny", cfg.vae_tiny, _init_params(AutoencoderKL), "AutoencoderKL")
        vae = _cast(AutoencoderKL(**cfg.vae_tiny_config()), torch_dtype(cfg))
    vae.requires_grad_(False)
    return vae.eval()


def latent_geometry(cfg: PolicyConfig, vae: AutoencoderKL) -> tuple[int, int]:
    """(latent channels, latent side) of an ``image_size`` image through this VAE."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.image_size % factor:
        raise ValueError(f"model.image_size: {cfg.image_size} is not divisible by the VAE factor {factor}")
    return int(vae.config.latent_channels), cfg.image_size // factor


def generator_cls(cfg: PolicyConfig) -> type:
    cls = getattr(diffusers, cfg.generator_class, None)
    if cls is None or not isinstance(cls, type):
        raise ValueError(f"model.generator_class: diffusers has no class {cfg.generator_class!r}")
    return cls


def build_generator(cfg: PolicyConfig, latent_channels: int, latent_side: int) -> torch.nn.Module:
    """The diffusion transformer named by ``generator_class`` (from ``generator_path``, its ``transformer/``
    when that is a pipeline directory, or tiny)."""
    cls = generator_cls(cfg)
    pipe = pipeline_of(cfg)
    if cfg.generator_path:
        path = str(pipe.transformer) if pipe is not None else cfg.generator_path
        gen = cls.from_pretrained(path, torch_dtype=torch_dtype(cfg), local_files_only=True)
    else:
        _check_keys("generator_tiny", cfg.generator_tiny, _init_params(cls), cfg.generator_class)
        gen = _cast(cls(**cfg.generator_tiny_config(latent_channels, latent_side)), torch_dtype(cfg))
    in_ch = gen.config.get("in_channels")
    if in_ch is not None and in_ch != latent_channels:
        raise ValueError(f"model.generator: in_channels {in_ch} != VAE latent_channels {latent_channels}")
    if cfg.freeze_generator:
        gen.requires_grad_(False)
    return gen
