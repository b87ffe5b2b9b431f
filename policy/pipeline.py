"""Diffusers pipeline directories as the generator: ``model.generator_path`` may name a directory with a
``model_index.json`` (as ``DiffusionPipeline.save_pretrained`` writes it and the hub ships it). Its
``transformer/``, ``vae/`` and ``scheduler/`` subfolders are read. SD3's text encoders are not (the policy's own
LM conditions the transformer, through the connector); Qwen-Image's text encoder IS the policy's LM (its
``text_encoder/`` Qwen2.5-VL, ``tokenizer/`` and, where the pipeline has one, ``processor/``;
``policy.qwen_image``), so one Qwen-Image directory is the whole unified model.

    <pipeline>/model_index.json          {"_class_name": "StableDiffusion3Pipeline",
                                          "transformer": ["diffusers", "SD3Transformer2DModel"],
                                          "vae": ["diffusers", "AutoencoderKL"],
                                          "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], ...}
    <pipeline>/transformer/              config.json + weights   -> the generator
    <pipeline>/vae/                      config.json + weights   -> the VAE (unless ``model.vae_path`` is set)
    <pipeline>/scheduler/                scheduler_config.json   -> the sampler's sigmas (its ``shift``)
    <pipeline>/text_encoder/, tokenizer/, [processor/]           -> Qwen-Image: the LM (unless ``model.lm_path``)

No torch import (``RunConfig.check_paths`` calls :func:`check_generator_dir` before anything loads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"

#: transformer class in ``model_index.json`` -> (the VAE classes it pairs with, what it is)
SUPPORTED_TRANSFORMERS: dict[str, tuple[tuple[str, ...], str]] = {
    "SD3Transformer2DModel": (("AutoencoderKL",), "SD3 / SD3.5 (StableDiffusion3Pipeline), conditioned through "
                                                  "the connector"),
    "QwenImageTransformer2DModel": (("AutoencoderKLQwenImage",), "Qwen-Image (QwenImagePipeline), its "
                                                                 "text_encoder the LM, conditioned directly on "
                                                                 "its hidden states"),
}
QWEN_IMAGE = "QwenImageTransformer2DModel"
#: transformer class -> the sigmas its pipeline gives the scheduler (``FlowSchedule.pipeline_sigmas``)
PIPELINE_SIGMAS = {QWEN_IMAGE: "linspace"}
#: transformer class -> the text encoder its pipeline holds (the policy's LM; ``model_index.json`` class)
TEXT_ENCODERS = {QWEN_IMAGE: "Qwen2_5_VLForConditionalGeneration"}
PREPROCESSOR_CONFIG = "preprocessor_config.json"
SUPPORTED_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
# Scheduler options that change the sigmas in ways the sampler does not reproduce: must be off.
_UNSUPPORTED_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                        "stochastic_sampling")


class PipelineDirError(ValueError):
    """A pipeline directory the generator cannot be loaded from; ``field`` names the config field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def is_pipeline_dir(path: str | Path | None) -> bool:
    """True when ``path`` is a directory holding a ``model_index.json``."""
    return path is not None and (Path(path).expanduser() / MODEL_INDEX).is_file()


@dataclass(frozen=True)
class FlowSchedule:
    """What a ``FlowMatchEulerDiscreteScheduler``'s ``scheduler_config.json`` says about its sigmas."""

    shift: float = 1.0
    num_train_timesteps: int = 1000
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    # what the pipeline passes to ``set_timesteps``: "scheduler" = only the step count (SD3: the scheduler's own
    # linspace over its training sigmas); "linspace" = sigmas linspace(1, 1/K, K) (QwenImagePipeline)
    pipeline_sigmas: str = "scheduler"

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "scheduler") -> FlowSchedule:
        """From a scheduler config dict; options whose sigmas the sampler does not reproduce raise."""
        name = config.get("_class_name", SUPPORTED_SCHEDULERS[0])
        if name not in SUPPORTED_SCHEDULERS:
            raise PipelineDirError("model.generator_path", f"{where}: scheduler {name!r} is not supported; "
                                                           f"supported: {', '.join(SUPPORTED_SCHEDULERS)}")
        on = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
        if on:
            raise PipelineDirError("model.generator_path", f"{where}: scheduler option(s) {on} are not supported "
                                                           "by the SDE sampler")
        if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise PipelineDirError("model.generator_path", f"{where}: unknown time_shift_type "
                                                           f"{config['time_shift_type']!r}")
        if config.get("pipeline_sigmas", "scheduler") not in ("scheduler", "linspace"):
            raise PipelineDirError("model.generator_path", f"{where}: unknown pipeline_sigmas "
                                                           f"{config['pipeline_sigmas']!r}")
        defaults = cls()
        kw = {f: config[f] for f in cls.__dataclass_fields__ if config.get(f) is not None}
        out = cls(**{**defaults.__dict__, **kw})
        if out.shift <= 0 or out.num_train_timesteps < 1:
            raise PipelineDirError("model.generator_path", f"{where}: shift must be > 0 and num_train_timesteps >= 1")
        return out

    def to_config(self) -> dict[str, Any]:
        """A ``scheduler_config.json`` that :meth:`from_config` (and diffusers, which ignores
        ``pipeline_sigmas``) read back."""
        return {"_class_name": SUPPORTED_SCHEDULERS[0], **self.__dict__}

    def mu(self, image_seq_len: int) -> float:
        """Resolution-dependent shift (diffusers' ``calculate_shift``), linear in the image token count:
        mu = base_shift + (max_shift - base_shift) * (L - base_len) / (max_len - base_len)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        return image_seq_len * m + (self.base_shift - m * self.base_image_seq_len)

    def sigmas(self, steps: int, image_seq_len: int):
        """The K + 1 sigmas of ``steps`` denoising steps as the pipeline runs them (``policy.sde.scheduler_sigmas``),
        a float32 tensor."""
        from policy.sde import scheduler_sigmas

        mu = self.mu(image_seq_len) if self.use_dynamic_shifting else None
        return scheduler_sigmas(steps, self.shift, self.num_train_timesteps, mu, self.time_shift_type,
                                self.shift_terminal, self.pipeline_sigmas == "linspace")


@dataclass(frozen=True)
class PipelineDir:
    """A checked pipeline directory: its root and the classes of the parts the policy loads."""

    root: Path
    pipeline_class: str
    transformer_class: str
    vae_class: str
    schedule: FlowSchedule

    @property
    def transformer(self) -> Path:
        return self.root / "transformer"

    @property
    def vae(self) -> Path:
        return self.root / "vae"

    @property
    def holds_lm(self) -> bool:
        """Whether the pipeline's text encoder is the policy's LM (Qwen-Image)."""
        return self.transformer_class in TEXT_ENCODERS

    @property
    def text_encoder(self) -> Path:
        return self.root / "text_encoder"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def processor(self) -> Path | None:
        """The pipeline's ``processor/`` (its image processor config), None where it has none."""
        p = self.root / "processor"
        return p if (p / PREPROCESSOR_CONFIG).is_file() else None


def _component(index: dict[str, Any], name: str, where: Path) -> str:
    entry = index.get(name)
    if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
        raise PipelineDirError("model.generator_path", f"{where / MODEL_INDEX} has no {name!r} component")
    if not (where / name).is_dir():
        raise PipelineDirError("model.generator_path", f"{where} has no {name}/ folder")
    return str(entry[1])


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PipelineDirError("model.generator_path", f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise PipelineDirError("model.generator_path", f"{path} is not a JSON object")
    return data


def read_pipeline_dir(path: str | Path) -> PipelineDir:
    """Read and check a pipeline directory (supported transformer, VAE and scheduler; folders present)."""
    root = Path(path).expanduser()
    index = _read_json(root / MODEL_INDEX)
    transformer = _component(index, "transformer", root)
    if transformer not in SUPPORTED_TRANSFORMERS:
        supported = "; ".join(f"{k}: {v[1]}" for k, v in SUPPORTED_TRANSFORMERS.items())
        raise PipelineDirError("model.generator_path", f"{root}: transformer {transformer!r} is not supported; "
                                                       f"supported: {supported}")
    vae = _component(index, "vae", root)
    if vae not in SUPPORTED_TRANSFORMERS[transformer][0]:
        raise PipelineDirError("model.generator_path", f"{root}: VAE {vae!r} does not pair with {transformer}")
    _component(index, "scheduler", root)
    sched_file = root / "scheduler" / SCHEDULER_CONFIG
    if not sched_file.is_file():
        raise PipelineDirError("model.generator_path", f"{sched_file} does not exist")
    schedule = FlowSchedule.from_config(_read_json(sched_file), str(sched_file))
    if transformer in PIPELINE_SIGMAS:
        schedule = replace(schedule, pipeline_sigmas=PIPELINE_SIGMAS[transformer])
    if transformer in TEXT_ENCODERS:  # the LM lives in the pipeline: its text encoder and tokenizer
        encoder = _component(index, "text_encoder", root)
        if encoder != TEXT_ENCODERS[transformer]:
            raise PipelineDirError("model.generator_path", f"{root}: text_encoder {encoder!r} is not the "
                                                           f"{TEXT_ENCODERS[transformer]} {transformer} is trained on")
        _component(index, "tokenizer", root)
        if not (root / "text_encoder" / "config.json").is_file():
            raise PipelineDirError("model.generator_path", f"{root / 'text_encoder'} has no config.json")
    return PipelineDir(root, str(index.get("_class_name", "?")), transformer, vae, schedule)


def check_generator_dir(path: str | Path, generator_class: str) -> PipelineDir | None:
    """The checked pipeline directory ``path`` names, or None for a plain transformer directory. A plain
    directory that is the ``transformer/`` folder of a pipeline raises (its scheduler would be ignored), as
    does a pipeline whose transformer class differs from ``model.generator_class``."""
    p = Path(path).expanduser()
    if is_pipeline_dir(p):
        pipe = read_pipeline_dir(p)
        if pipe.transformer_class != generator_class:
            raise PipelineDirError("model.generator_class", f"{generator_class} but {p / MODEL_INDEX} holds a "
                                                            f"{pipe.transformer_class}")
        return pipe
    if is_pipeline_dir(p.parent) and p.name == "transformer":
        raise PipelineDirError("model.generator_path", f"{p} is the transformer/ folder of a diffusers pipeline; "
                                                       f"point generator_path at {p.parent} so that its scheduler "
                                                       "drives the sampler")
    return None


__all__ = ["QWEN_IMAGE", "TEXT_ENCODERS", "FlowSchedule", "PipelineDir", "PipelineDirError", "check_generator_dir", "is_pipeline_dir",
           "read_pipeline_dir"]
