"""Build or load the sub-models of the policy: tokenizer, LM, VAE, generator.

Tiny models come from the config (random init, no download); real ones from local directories
(``local_files_only``: never the network). ``lm_path`` is a causal LM (``AutoModelForCausalLM``) or a
vision-language model (``AutoModelForImageTextToText``: Qwen2.5-VL, Qwen3-VL; ``policy.vision``), the class
read from its ``config.json``. ``generator_path`` is a transformer directory or a diffusers
pipeline directory (``policy.pipeline``): then the transformer, the VAE (unless ``vae_path`` is set) and the
scheduler come from its subfolders, and for Qwen-Image the LM too (:func:`lm_sources`). The VAE class
(``AutoencoderKL`` or Qwen-Image's ``AutoencoderKLQwenImage``) is the one its ``config.json`` names.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from policy.config import PolicyConfig
from policy.pipeline import PREPROCESSOR_CONFIG, QWEN_IMAGE, FlowSchedule, PipelineDir, check_generator_dir
from policy.qwen_image import vae_factor_channels
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


VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderKLQwenImage": AutoencoderKLQwenImage}
TOKENIZER_CONFIG = "tokenizer_config.json"


def _has(path: str | None, name: str) -> bool:
    return bool(path) and (Path(path) / name).is_file()


def lm_sources(cfg: PolicyConfig) -> tuple[str | None, str | None, str | None]:
    """(LM, tokenizer, image processor) directories of a unified policy (None: tiny LM / tiny tokenizer / no
    vision side). ``lm_path`` and ``tokenizer_path`` when set; a Qwen-Image pipeline (``generator_path``) fills
    the rest: its ``text_encoder/`` is the LM, its ``tokenizer/`` the tokenizer (unless the LM directory holds
    one), its ``processor/`` the image processor unless the LM directory holds a ``preprocessor_config.json``.
    A Qwen-Image text encoder without any image processor runs text-only (input images through the bridge); any
    other vision-language ``lm_path`` needs its own."""
    pipe = pipeline_of(cfg)
    holds = pipe is not None and pipe.holds_lm
    lm = cfg.lm_path or (str(pipe.text_encoder) if holds else None)
    tok = cfg.tokenizer_path or (str(pipe.tokenizer) if holds and not _has(lm, TOKENIZER_CONFIG) else lm)
    if not (lm and is_vlm_dir(lm)):
        return lm, tok, None
    if _has(lm, PREPROCESSOR_CONFIG):
        return lm, tok, lm
    if holds and pipe.processor is not None:
        return lm, tok, str(pipe.processor)
    return lm, tok, None if cfg.generator_class == QWEN_IMAGE else lm  # else: load_image_processor names the file


def build_tokenizer(cfg: PolicyConfig) -> PreTrainedTokenizerBase:
    """``tokenizer_path``, else the LM's (or Janus) directory (:func:`lm_sources`), else the tiny in-code BPE."""
    path = (cfg.tokenizer_path or cfg.janus_path) if cfg.arch == "janus" else lm_sources(cfg)[1]
    return load_tokenizer(path) if path else build_tiny_tokenizer()


def build_lm(cfg: PolicyConfig, vocab_size: int) -> PreTrainedModel:
    """Causal LM or VLM from ``lm_path`` (or a Qwen-Image pipeline's text encoder), or a tiny Qwen2; embeddings
    grow to ``vocab_size`` when needed."""
    dtype = torch_dtype(cfg)
    path = lm_sources(cfg)[0]
    if path:
        auto = AutoModelForImageTextToText if is_vlm_dir(path) else AutoModelForCausalLM
        lm = auto.from_pretrained(path, dtype=dtype, local_files_only=True)
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
    """The image processor of a VLM LM (its ``preprocessor_config.json``, :func:`lm_sources`), else None."""
    path = lm_sources(cfg)[2]
    return load_image_processor(path) if path else None


def pipeline_of(cfg: PolicyConfig) -> PipelineDir | None:
    """The checked pipeline directory ``generator_path`` names, or None (a transformer directory or tiny)."""
    return check_generator_dir(cfg.generator_path, cfg.generator_class) if cfg.generator_path else None


def build_schedule(cfg: PolicyConfig) -> FlowSchedule | None:
    """The pipeline scheduler's sigma schedule, or None (no scheduler: ``policy.sde.flow_sigmas``)."""
    pipe = pipeline_of(cfg)
    return pipe.schedule if pipe is not None else None


def vae_class(path: str) -> type:
    """The VAE class a VAE directory's ``config.json`` names (``AutoencoderKL`` when it names none)."""
    f = Path(path) / "config.json"
    name = json.loads(f.read_text(encoding="utf-8")).get("_class_name", "AutoencoderKL") if f.is_file() else \
        "AutoencoderKL"
    if name not in VAE_CLASSES:
        raise ValueError(f"model.vae_path: {path} holds a {name!r}; supported: {', '.join(VAE_CLASSES)}")
    return VAE_CLASSES[name]


def build_vae(cfg: PolicyConfig) -> torch.nn.Module:
    """Frozen VAE (requires_grad False, eval): ``vae_path``, else the pipeline's ``vae/``, else a tiny AutoencoderKL."""
    pipe = pipeline_of(cfg)
    path = cfg.vae_path or (str(pipe.vae) if pipe is not None else None)
    if path:
        vae = vae_class(path).from_pretrained(path, torch_dtype=torch_dtype(cfg), local_files_only=True)
    else:
        _check_keys("vae_tiny", cfg.vae_tiny, _init_params(AutoencoderKL), "AutoencoderKL")
        vae = _cast(AutoencoderKL(**cfg.vae_tiny_config()), torch_dtype(cfg))
    vae.requires_grad_(False)
    return vae.eval()


def vae_factor(config: Any) -> tuple[int, int]:
    """(spatial factor, latent channels) of a VAE config (AutoencoderKL: 2^(blocks - 1); Qwen-Image's: 2^len(
    temperal_downsample))."""
    if "z_dim" in config:
        return vae_factor_channels(config)
    return 2 ** (len(config["block_out_channels"]) - 1), int(config["latent_channels"])


def latent_geometry(cfg: PolicyConfig, vae: torch.nn.Module) -> tuple[int, int]:
    """(latent channels, latent side) of an ``image_size`` image through this VAE."""
    factor, channels = vae_factor(vae.config)
    if cfg.image_size % factor:
        raise ValueError(f"model.image_size: {cfg.image_size} is not divisible by the VAE factor {factor}")
    return channels, cfg.image_size // factor


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
    packed = int(gen.config.patch_size) ** 2 if cfg.generator_class == QWEN_IMAGE else 1  # 2x2 patches as channels
    if in_ch is not None and in_ch != latent_channels * packed:
        raise ValueError(f"model.generator: in_channels {in_ch} != VAE latent_channels {latent_channels}"
                         + (f" x {packed} (packed patches)" if packed > 1 else ""))
    if cfg.freeze_generator:
        gen.requires_grad_(False)
    return gen
