"""Run configuration: pydantic models loaded from YAML (overrides and one-line errors: ``services.overrides``).

Every model forbids unknown keys, so a typo is an error naming its field path. The embedded default
(``services/default.yaml``, package data) is the tiny CPU CLEAR run. ``RunConfig.check_paths()`` checks
that local files named by the config exist; plain validation never touches the file system, so a
real-scale config validates on a machine without the weights.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from policy.config import PolicyConfig
from policy.pipeline import PipelineDirError, check_generator_dir
from recipes import RECIPES, get_recipe
from services.config_learner import LearnerConfig, SyncConfig
from services.config_reward import RewardComponent, RewardConfig, ServeConfig
from services.config_types import NonNegFloat, NonNegInt, PosFloat, PosInt, Prob
from services.config_types import Section as _Section
from services.lm_support import check_lm_dir, check_pipeline_lm
from services.lora_checks import check_lora_targets
from services.overrides import ConfigError, apply_overrides, first_error, format_validation_error

__all__ = [
    "ConfigError",
    "RunConfig",
    "TaskConfig",
    "RolloutConfig",
    "SDEConfig",
    "VLLMConfig",
    "AutoscaleConfig",
    "RewardConfig",
    "RewardComponent",
    "ServeConfig",
    "LearnerConfig",
    "SyncConfig",
    "AlgorithmConfig",
    "SFTConfig",
    "VAEFitConfig",
    "EvaluationConfig",
    "TrackingConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "PolicyConfig",
    "load_config",
    "load_yaml",
    "default_config_text",
    "apply_overrides",
    "validate_config",
    "flatten",
    "to_yaml",
    "format_validation_error",
]


# The degradation suite's corruptions (tasks.degrade.CORRUPTIONS; severity s -> intensity LEVELS[s - 1]).
Degradation = Literal[
    "defocus_blur", "motion_blur", "gaussian_noise", "low_light",
    "jpeg_compression", "pixelate", "packet_loss", "quantization",
    "fog", "rain", "snow", "shadow_glare",
    "oversharpen", "contrast_reduction", "saturation_shift", "elastic_warp",
]  # fmt: skip
SHAPES_QUESTION_TYPES = ("color", "shape", "count", "position")


# --------------------------------------------------------------------------------------------- task
class TaskConfig(_Section):
    name: Literal["shapes_vqa", "jsonl", "tsv"] = "shapes_vqa"
    path: str | None = None
    train_size: PosInt = 20000
    eval_size: PosInt = 1000
    image_size: PosInt = 32
    degradations: list[Degradation] = Field(default_factory=lambda: ["defocus_blur", "gaussian_noise", "jpeg_compression", "low_light"])
    severities: list[Annotated[int, Field(ge=1, le=3)]] = Field(default_factory=lambda: [1, 2, 3])
    degrade_prob: Prob = 0.75
    # A list (equal weights) or name -> sampling weight. shapes_vqa knows color, shape, count, position.
    shuffle_choices: bool = False  # fixed choice order keeps the tiny default learnable in minutes
    question_types: list[str] | dict[str, NonNegFloat] = Field(
        default_factory=lambda: {"color": 0.7, "shape": 0.1, "count": 0.1, "position": 0.1}
    )
    on_bad_row: Literal["stop", "skip"] = "stop"

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one severity is needed")
        return v

    @field_validator("question_types")
    @classmethod
    def _question_types(cls, v: list[str] | dict[str, float]) -> list[str] | dict[str, float]:
        names = list(v)
        if not names or any(not str(q).strip() for q in names):
            raise ValueError("a non-empty list (or name -> weight mapping) of non-empty names is needed")
        if isinstance(v, dict) and sum(v.values()) <= 0:
            raise ValueError("the question type weights must not all be 0")
        return v

    @model_validator(mode="after")
    def _known_question_types(self) -> TaskConfig:
        if self.name == "shapes_vqa":
            bad = [q for q in self.question_types if q not in SHAPES_QUESTION_TYPES]
            if bad:
                raise ConfigError(
                    "task.question_types",
                    f"unknown question types {bad} for shapes_vqa; known: {list(SHAPES_QUESTION_TYPES)}",
                )
        return self

    @model_validator(mode="after")
    def _path_needed(self) -> TaskConfig:
        if self.name in ("jsonl", "tsv") and not self.path:
            raise ConfigError("task.path", f"required when task.name is {self.name!r}")
        return self


# ------------------------------------------------------------------------------------------ rollout
class SDEConfig(_Section):
    steps: PosInt = 8
    window: PosInt = 2
    window_position: Literal["fixed", "random"] = "random"
    window_start: NonNegInt = 0
    noise_level: NonNegFloat = 0.7
    strength: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None  # null: the recipe's

    @model_validator(mode="after")
    def _window(self) -> SDEConfig:
        if self.window > self.steps:
            raise ConfigError("rollout.sde.window", f"window ({self.window}) must be <= steps ({self.steps})")
        if self.window_position == "fixed" and self.window_start + self.window > self.steps:
            raise ConfigError(
                "rollout.sde.window_start",
                f"window_start + window ({self.window_start} + {self.window}) must be <= steps ({self.steps})",
            )
        return self


class VLLMConfig(_Section):
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5
    enforce_eager: bool = True


class AutoscaleConfig(_Section):
    enabled: bool = False
    min_workers: PosInt = 1
    max_workers: PosInt = 4
    target_rollout_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if self.min_workers > self.max_workers:
            raise ConfigError(
                "rollout.autoscale.min_workers",
                f"min_workers ({self.min_workers}) must be <= max_workers ({self.max_workers})",
            )
        return self


class RolloutConfig(_Section):
    engine: Literal["hf", "vllm"] = "hf"
    num_workers: PosInt = 2
    prompts_per_step: PosInt = 16
    group_size: Annotated[int, Field(ge=2)] = 8
    max_new_tokens: PosInt = 16
    temperature: PosFloat = 1.0
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    max_images: NonNegInt = 1
    num_cpus_per_worker: NonNegFloat = 1.0
    num_gpus_per_worker: NonNegFloat = 0.0
    call_timeout_s: PosFloat = 300  # a rollout call answers within this, or its worker is declared dead
    start_timeout_s: PosFloat = 600  # a new / restarted worker is built and holds weights within this
    sde: SDEConfig = Field(default_factory=SDEConfig)
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig)

    @model_validator(mode="after")
    def _engine(self) -> RolloutConfig:
        if self.engine == "vllm" and self.num_gpus_per_worker <= 0:
            raise ConfigError("rollout.num_gpus_per_worker", "engine 'vllm' needs num_gpus_per_worker > 0")
        return self


# ---------------------------------------------------------------------------------------- algorithm
class AlgorithmConfig(_Section):
    steps: PosInt = 200
    mode: Literal["sync", "async"] = "sync"
    max_staleness: NonNegInt = 1
    adv_scale: Literal["std", "none"] = "std"
    zero_variance: Literal["drop", "zero"] = "drop"
    clip_low: Prob = 0.2
    clip_high: NonNegFloat = 0.28
    kl: Literal["k1", "k2", "k3"] = "k3"
    beta_text: NonNegFloat = 0.0
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    clip_img: NonNegFloat = 1e-3
    beta_img: NonNegFloat = 0.0
    lambda_img: NonNegFloat = 1.0
    eval_every: NonNegInt = 50


class SFTConfig(_Section):
    enabled: bool = True
    steps: NonNegInt = 600
    batch_size: PosInt = 32
    lr: PosFloat = 2e-3
    flow_weight: NonNegFloat = 1.0
    text_weight: NonNegFloat = 1.0
    generate_prob: Prob = 1.0  # CLEAR: share of degraded images whose target is generate-then-answer
    clean_slot_prob: Prob = 0.0  # CLEAR: share of those whose image slot holds the clean latent, not the own generation
    reset_optimizer: bool = True  # stage 2 starts with a fresh optimizer state (moments), at learner.lr


class VAEFitConfig(_Section):
    """The tiny VAE fitted to the task's clean images before stage 1 (``services/vae_fit.py``)."""

    enabled: bool = True
    images: PosInt = 2400
    eval_images: PosInt = 256
    epochs: PosInt = 2
    batch_size: PosInt = 32
    lr: PosFloat = 2e-3
    kl_weight: NonNegFloat = 1e-6


EvalMode = Literal["greedy", "sampled", "forced", "forbidden"]
EVAL_MODES: tuple[str, ...] = ("greedy", "sampled", "forced", "forbidden")


class EvaluationConfig(_Section):
    """The held-out report (``services/evaluate.py``) before and after stage 2 and in ``unigrpo eval``."""

    severities: list[Annotated[int, Field(ge=1, le=3)]] = Field(default_factory=lambda: [1, 2, 3])
    modes: list[EvalMode] = Field(default_factory=lambda: list(EVAL_MODES))
    every_modes: list[EvalMode] = Field(default_factory=lambda: ["greedy"])
    bootstrap_samples: PosInt = 10_000

    @field_validator("severities", "modes", "every_modes")
    @classmethod
    def _not_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("at least one entry is needed")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate entries in {v}")
        return v


# ------------------------------------------------------------------------------- tracking / ckpt / ray
class TrackingConfig(_Section):
    uri: str | None = None
    experiment: Annotated[str, Field(min_length=1)] = "unigrpo"
    log_images_every: NonNegInt = 20
    # The final policy directory at the end of a finished run: not logged, a run artifact ("policy/"), or
    # that artifact registered as a new version of the model named after the run (real weights are GBs).
    log_model: Literal["none", "artifact", "registered"] = "none"

    def resolved_uri(self, cwd: str | os.PathLike[str] | None = None) -> str:
        """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``."""
        if self.uri:
            return self.uri
        env = os.environ.get("MLFLOW_TRACKING_URI")
        if env:
            return env
        base = Path(cwd) if cwd is not None else Path.cwd()
        return f"sqlite:///{(base / 'mlflow.db').resolve()}"


class CheckpointConfig(_Section):
    dir: Annotated[str, Field(min_length=1)] = "checkpoints"
    every: NonNegInt = 20
    keep: PosInt = 2


class ClusterConfig(_Section):
    address: str | None = None
    num_cpus: PosInt | None = None
    rollout_resource: Annotated[str, Field(min_length=1)] = "rollout_gpu"
    learner_resource: Annotated[str, Field(min_length=1)] = "learner_gpu"
    use_custom_resources: bool = False

    def resolved_address(self) -> str | None:
        """``address``, else ``$RAY_ADDRESS``, else None (start a local Ray)."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


# ---------------------------------------------------------------------------------------------- run
_MODEL_PATH_FIELDS = ("lm_path", "tokenizer_path", "generator_path", "vae_path", "janus_path")


class RunConfig(_Section):
    run_name: Annotated[str, Field(min_length=1)] = "clear-tiny"
    recipe: str = "clear"  # a registered recipe (recipes.RECIPES)
    seed: NonNegInt = 0
    model: PolicyConfig = Field(default_factory=PolicyConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    vae_fit: VAEFitConfig = Field(default_factory=VAEFitConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("recipe")
    @classmethod
    def _known_recipe(cls, v: str) -> str:
        if v not in RECIPES:
            raise ValueError(f"unknown recipe {v!r}; known: {', '.join(RECIPES)}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _recipe_strength(cls, data: Any) -> Any:
        """A null ``rollout.sde.strength`` becomes the recipe's (CLEAR restores from its input image) where the
        input image's latent is in the context (``model.input_image`` bridge / both, or the tiny LM), else 1."""
        recipe = data.get("recipe", "clear") if isinstance(data, dict) else None
        rollout = (data.get("rollout") or {}) if recipe in RECIPES else None
        sde = (rollout.get("sde") or {}) if isinstance(rollout, dict) else None
        if not isinstance(sde, dict) or sde.get("strength") is not None:
            return data  # set, or malformed (the fields' own validation names it)
        model = data.get("model") or {}
        image = model.get("input_image") if isinstance(model, dict) else None
        latent_read = image in ("bridge", "both") or (image is None and not model.get("lm_path"))  # the tiny LM: bridge
        strength = get_recipe(recipe).default_strength if latent_read else 1.0  # no input latent: from noise
        return {**data, "rollout": {**rollout, "sde": {**sde, "strength": strength}}}

    @model_validator(mode="after")
    def _cross_section(self) -> RunConfig:
        if self.algorithm.mode == "async" and self.algorithm.max_staleness < 1:
            raise ConfigError("algorithm.max_staleness", "async mode keeps max_staleness batches in flight ahead "
                              "of the learner: it must be >= 1 (0 would train on nothing)")
        if self.learner.mini_batches > self.rollout.prompts_per_step:
            raise ConfigError(
                "learner.mini_batches",
                f"{self.learner.mini_batches} mini-batches > {self.rollout.prompts_per_step} prompt groups per "
                "step (rollout.prompts_per_step): a mini-batch is whole groups",
            )
        if getattr(self.model, "freeze_generator", False) and self.learner.train_generator:
            raise ConfigError("learner.train_generator", "must be false when model.freeze_generator is true")
        if not (  # the pool's size bounds: the autoscaler and `unigrpo scale` stay within them
            self.rollout.autoscale.min_workers
            <= self.rollout.num_workers
            <= self.rollout.autoscale.max_workers
        ):
            raise ConfigError(
                "rollout.num_workers",
                f"{self.rollout.num_workers} is outside the pool size bounds (rollout.autoscale) "
                f"[{self.rollout.autoscale.min_workers}, {self.rollout.autoscale.max_workers}]",
            )
        problem = get_recipe(self.recipe).first_problem(self)  # recipe x model.arch limits (recipes/)
        if problem is not None:
            raise ConfigError(problem.field, problem.message)
        return self

    def check_paths(self, uploaded_root: str | os.PathLike[str] | None = None) -> RunConfig:
        """Raise ConfigError naming the first configured local path that does not exist, or a
        ``model.lm_path`` directory of an unsupported kind (``services.lm_support``).

        Checks the model's weight/tokenizer directories and the task's data file. Call this before a
        run; plain validation does not touch the file system. ``uploaded_root`` (``unigrpo submit``): only
        relative paths are checked, under that directory (the job's working directory); absolute ones
        name the cluster's file system.
        """
        def local(value: str) -> Path | None:
            p = Path(value).expanduser()
            if uploaded_root is None:
                return p
            return None if p.is_absolute() else Path(uploaded_root) / p

        pipe = None
        for name in _MODEL_PATH_FIELDS:
            value = getattr(self.model, name, None)
            where = local(value) if value else None
            if where is None:
                continue
            if not where.exists():
                raise ConfigError(f"model.{name}", f"path does not exist: {value}")
            if name == "lm_path":
                check_lm_dir(where, input_image=self.model.input_image, text_encoder=self.model.generator_class)
            if name == "generator_path":
                try:
                    pipe = check_generator_dir(where, self.model.generator_class)
                except PipelineDirError as e:
                    raise ConfigError(e.field, e.message) from None
        if self.model.lora.enabled and uploaded_root is None:  # every target entry matches a layer (meta device)
            check_lora_targets(self.model)
        if pipe is not None and pipe.holds_lm:
            check_pipeline_lm(pipe, local(self.model.lm_path) if self.model.lm_path else None, self.model.input_image)
        elif self.model.input_image in ("vision", "both") and not self.model.lm_path and self.model.arch == "unified":
            raise ConfigError("model.input_image", f"{self.model.input_image!r} needs a vision-language model "
                                                   "directory in model.lm_path (the tiny LM reads images through "
                                                   "the bridge)")
        where = local(self.task.path) if self.task.path else None
        if where is not None and not where.exists():
            raise ConfigError("task.path", f"path does not exist: {self.task.path}")
        return self


# ------------------------------------------------------------------------------------------ loading
def default_config_text() -> str:
    """The embedded default config (``services/default.yaml``) as text."""
    return resources.files("services").joinpath("default.yaml").read_text(encoding="utf-8")


def _parse_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError("", f"{source}: invalid YAML: {msg}") from e
    except RecursionError:
        raise ConfigError("", f"{source}: invalid YAML: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{source}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_yaml(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """The raw mapping of a YAML config file (None: the embedded default)."""
    if path is None:
        return _parse_yaml(default_config_text(), "default.yaml")
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError("", f"cannot read config file {str(p)!r}: {e.strerror or e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError("", f"{p}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line}); "
                              "save it as UTF-8") from None
    return _parse_yaml(text, str(p))


def validate_config(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping; raises ConfigError (one field path, one line)."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(*first_error(e)) from e


def load_config(path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (None: the embedded default), apply ``a.b=c`` overrides, validate.

    Raises ConfigError on any problem. Does not check that paths exist (see ``RunConfig.check_paths``).
    """
    data = load_yaml(path)
    data = apply_overrides(data, overrides or [], RunConfig)
    return validate_config(data)


# ------------------------------------------------------------------------------------------- output
def flatten(cfg: RunConfig | BaseModel | dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted key -> string value, for MLflow params. Lists are JSON; values capped at 500 chars."""
    data = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else str(k))
            return
        if isinstance(node, (dict, list, tuple)):
            text = json.dumps(node, sort_keys=True, default=str)
        elif node is None:
            text = "None"
        else:
            text = str(node)
        out[key] = text if len(text) <= 500 else text[:497] + "..."

    walk(data, prefix)
    return out


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (field order kept)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=None)
