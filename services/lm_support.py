"""Which model directories ``model.lm_path`` may name, read from the directory's ``config.json`` (no
transformers import): the one place that lists the supported kinds: causal LMs (``*ForCausalLM``) and the
vision-language models of ``policy.config.VLM_TYPES`` (with their ``preprocessor_config.json``). ``RunConfig.check_paths`` calls
:func:`check_lm_dir` before any actor starts, so an unsupported directory fails with one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from policy.config import VLM_TYPES
from policy.pipeline import PREPROCESSOR_CONFIG, QWEN_IMAGE, PipelineDir
from services.overrides import ConfigError

#: ``config.json`` ``architectures`` suffix -> what ``policy.build.build_lm`` loads it with.
SUPPORTED_LM_KINDS = {"ForCausalLM": "a decoder-only causal LM (AutoModelForCausalLM), e.g. Qwen2ForCausalLM"}
#: ``config.json`` ``model_type`` of the vision-language models loaded with AutoModelForImageTextToText.
SUPPORTED_VLM_TYPES = {t: "a vision-language model (AutoModelForImageTextToText) with its preprocessor_config.json"
                       for t in VLM_TYPES}


def supported_text() -> str:
    kinds = [f"*{suffix}: {what}" for suffix, what in SUPPORTED_LM_KINDS.items()]
    return "; ".join([*kinds, f"model_type {' / '.join(SUPPORTED_VLM_TYPES)}: {SUPPORTED_VLM_TYPES[VLM_TYPES[0]]}"])


def check_lm_dir(path: str | Path, field: str = "model.lm_path", input_image: str | None = None,
                 text_encoder: str | bool = False) -> None:
    """Raise ConfigError naming ``field`` unless ``path`` is a model directory of a supported kind (a VLM
    with its image processor config; ``text_encoder`` True or ``model.generator_class`` QwenImageTransformer2DModel:
    the LM is a Qwen-Image text encoder, which may come without one and then runs text-only); ``input_image``
    ``vision`` / ``both`` (``model.input_image``) need a VLM."""
    text_encoder = text_encoder is True or text_encoder == QWEN_IMAGE
    d = Path(path).expanduser()
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(field, f"{path} has no config.json (not a transformers model directory); "
                                 f"supported: {supported_text()}")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(field, f"{cfg_file} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(field, f"{cfg_file} is not a JSON object")
    model_type = cfg.get("model_type", "?")
    if model_type in SUPPORTED_VLM_TYPES:
        if not (d / PREPROCESSOR_CONFIG).is_file() and not text_encoder:
            raise ConfigError(field, f"{path} holds a {model_type!r} vision-language model but no "
                                     f"preprocessor_config.json (its image processor); supported: {supported_text()}")
        return
    if input_image in ("vision", "both"):
        raise ConfigError("model.input_image", f"{input_image!r} needs a vision-language model directory in "
                                               f"{field}; {path} holds a {model_type!r} model")
    archs = [a for a in cfg.get("architectures") or [] if isinstance(a, str)]
    if not archs:
        return  # nothing declared: the loader decides from model_type
    if not any(a.endswith(suffix) for a in archs for suffix in SUPPORTED_LM_KINDS):
        raise ConfigError(field, f"{path} holds a {model_type!r} model ({', '.join(archs)}), which is not "
                                 f"supported; supported: {supported_text()}")


def check_pipeline_lm(pipe: PipelineDir, lm_path: Path | None, input_image: str | None) -> None:
    """A pipeline whose text encoder is the LM (Qwen-Image): its ``text_encoder/`` must be a supported VLM unless
    ``model.lm_path`` replaces it; ``input_image`` ``vision`` / ``both`` need an image processor (``lm_path``'s,
    or the pipeline's ``processor/``)."""
    lm = lm_path or pipe.text_encoder
    if lm_path is None:
        check_lm_dir(lm, "model.generator_path", text_encoder=True)
    if input_image in ("vision", "both") and not (lm / PREPROCESSOR_CONFIG).is_file() and pipe.processor is None:
        raise ConfigError("model.input_image", f"{input_image!r} needs the text encoder's image processor: neither "
                                               f"{lm} nor {pipe.root / 'processor'} holds a {PREPROCESSOR_CONFIG} "
                                               "(without one the LM reads input images through the bridge)")
