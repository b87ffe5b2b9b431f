"""The learner's memory settings as DeepSpeed takes them (``learner.*`` of the run config).

Precision. ``model.dtype: bfloat16`` builds the policy in bf16 and turns on DeepSpeed's bf16 mode: the
forward, the backward and the gradients are bf16, and the optimizer keeps an fp32 master copy of every
trainable parameter with fp32 AdamW moments (ZeRO 0: DeepSpeed's unfused mixed-precision optimizer;
ZeRO 1-3: the ZeRO optimizer's fp32 partitions). After each step the master weights are cast back to the
bf16 model. ``float32`` trains in fp32 throughout.

    bytes per trainable parameter:  bf16 weight 2 + bf16 grad 2 + fp32 master 4 + fp32 m 4 + fp32 v 4

Offload (ZeRO's ``offload_optimizer`` / ``offload_param``, device ``cpu``). ``offload_optimizer`` (ZeRO >= 1)
keeps the fp32 master weights, the moments and the fp32 gradient partitions in host memory and runs the
optimizer step there; ``offload_params`` (ZeRO 3) keeps the parameter partitions in host memory and gathers
each layer's parameters to the device when it runs. The client optimizer stays torch's AdamW
(``zero_force_ds_cpu_optimizer: false``): DeepSpeed's CPUAdam would compile C++ on first use, and torch's
AdamW steps host tensors too. Pinned host buffers are used on GPU ranks only.
"""

from __future__ import annotations

from typing import Any


def zero_config(stage: int, offload_params: bool, offload_optimizer: bool, cuda: bool) -> dict[str, Any]:
    """DeepSpeed's ``zero_optimization`` section."""
    out: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        out["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if offload_params:
        out["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return out


def deepspeed_config(learner_cfg: Any, bf16: bool, clip_in_learner: bool, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config of a learner rank: one micro-batch per step, ZeRO stage and offload from
    ``learner_cfg`` (the run's ``learner`` section), bf16 mode, and DeepSpeed's gradient clipping unless the
    learner clips itself (``clip_in_learner``)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0 if clip_in_learner else learner_cfg.grad_clip,
        "zero_optimization": zero_config(learner_cfg.zero_stage, learner_cfg.offload_params,
                                         learner_cfg.offload_optimizer, cuda),
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if learner_cfg.offload_optimizer or learner_cfg.offload_params:
        cfg["zero_force_ds_cpu_optimizer"] = False  # torch's AdamW steps the host partitions
    return cfg


__all__ = ["deepspeed_config", "zero_config"]
