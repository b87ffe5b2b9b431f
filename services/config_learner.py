"""The ``learner`` section: DeepSpeed ranks, optimizer, what trains, memory settings, weight sync."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from services.config_types import Beta, NonNegFloat, PosFloat, PosInt, Section
from services.overrides import ConfigError


class SyncConfig(Section):
    backend: Literal["object_store", "nccl"] = "object_store"  # nccl: the collective group (gloo on CPU)
    bucket_mb: PosFloat = 32
    timeout_s: PosFloat = 120


class LearnerConfig(Section):
    num_workers: PosInt = 1
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    lr: PosFloat = 1e-4
    weight_decay: NonNegFloat = 0.0
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    grad_clip: NonNegFloat = 1.0
    mini_batches: PosInt = 1
    shared_prefix: bool = True  # each group's prompt goes through the LM once (policy/shared_prefix.py)
    train_lm: bool = True
    train_generator: bool = True
    lm_lr_scale: NonNegFloat = 1.0  # stage 2: the LM and bridge learn at lr x this (0: GvU's scorer held)
    generator_lr_scale: NonNegFloat = 1.0  # stage 2: the generator learns at lr x this (0: UAE's LM-only mode)
    # memory (7B-class runs; learner/memory.py): recompute activations in backward, keep states on the host
    gradient_checkpointing_lm: bool = False
    gradient_checkpointing_generator: bool = False
    offload_params: bool = False
    offload_optimizer: bool = False
    sync: SyncConfig = Field(default_factory=SyncConfig)
    num_cpus_per_worker: NonNegFloat = 1.0
    num_gpus_per_worker: NonNegFloat = 0.0
    call_timeout_s: PosFloat = 1800  # the longest the driver waits on a learner call (a step, a save)

    @model_validator(mode="after")
    def _something_trains(self) -> LearnerConfig:
        if not (self.train_lm or self.train_generator):
            raise ConfigError(
                "learner.train_lm", "train_lm and train_generator are both false: nothing to train"
            )
        return self

    @model_validator(mode="after")
    def _memory(self) -> LearnerConfig:
        if self.offload_params and self.zero_stage < 3:
            raise ConfigError("learner.offload_params", f"parameter offload needs learner.zero_stage 3 (ZeRO-3 "
                              f"partitions the parameters it moves to the host), got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage < 1:
            raise ConfigError("learner.offload_optimizer", "optimizer offload needs learner.zero_stage >= 1 "
                              "(ZeRO keeps the optimizer states it moves to the host), got 0")
        if self.gradient_checkpointing_lm and not self.train_lm:
            raise ConfigError("learner.gradient_checkpointing_lm", "the LM is not trained (learner.train_lm "
                              "false): its forward keeps no activations to recompute")
        return self


__all__ = ["LearnerConfig", "SyncConfig"]
