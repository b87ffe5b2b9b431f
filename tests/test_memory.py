"""Memory settings of 7B-class runs on the tiny policy: gradient checkpointing (same loss and gradients, fewer
saved activations), ZeRO-3 with parameter and optimizer offload to the host (the same step), and bf16 with
fp32 master weights and optimizer states (learner/memory.py, policy/recompute.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from learner.batch import collate
from learner.group import LearnerGroup
from learner.memory import deepspeed_config
from learner.objective import GRPOSettings, grpo_loss, policy_outputs
from policy.model import UnifiedPolicy
from policy.recompute import enable_gradient_checkpointing
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout
from services.config import ConfigError, load_config

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the shape? A) red B) green C) blue D) yellow"


def _batch(policy, prompts: int = 2, group: int = 3):
    with torch.no_grad():  # make the tiny LM trigger generation often
        policy.lm.lm_head.weight[policy.token_ids["gen"]] += 1.0
    g = torch.Generator().manual_seed(0)
    reqs = [{"prompt_id": f"p{i}", "text": QUESTION, "meta": {},
             "image": (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()} for i in range(prompts)]
    trajs = rollout(policy.eval(), HFTextEngine(policy), reqs, RolloutSettings(group_size=group, max_new_tokens=10,
                    sde_steps=4, sde_window=2), 1, torch.Generator().manual_seed(1))
    assert any(t.generated_image for t in trajs)
    adv = torch.linspace(-1.0, 1.0, len(trajs))
    return collate(trajs, adv, policy.token_ids["pad"])


def _loss_and_grads(policy, batch):
    """The learner's loss (fresh old log-probs: ratio 1) and the gradient of every trainable parameter; the
    bytes of the tensors autograd saved for backward during the forward."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    policy.train()
    s = GRPOSettings()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = policy_outputs(policy, batch, 1.0, s.noise_level)
    with torch.no_grad():
        old = policy_outputs(policy, batch, 1.0, s.noise_level)
    loss, _ = grpo_loss(out, old, batch, s)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved[0]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    cfg = load_config(None, ["model.cond_tokens=8"]).model
    plain, ckpt = UnifiedPolicy.from_config(cfg), UnifiedPolicy.from_config(cfg)
    assert enable_gradient_checkpointing(ckpt, lm=True, generator=True) == ["Qwen2ForCausalLM", "SD3Transformer2DModel"]
    assert ckpt.lm.is_activation_checkpointing and all(layer.gradient_checkpointing for layer in ckpt.lm.model.layers)
    assert ckpt.generator.gradient_checkpointing and not plain.generator.gradient_checkpointing
    assert not plain.lm.is_activation_checkpointing
    batch = _batch(plain)
    with torch.no_grad():
        ckpt.lm.lm_head.weight.copy_(plain.lm.lm_head.weight)  # the same <gen> bias as the rollout policy's
    loss_a, grads_a, saved_a = _loss_and_grads(plain, batch)
    loss_b, grads_b, saved_b = _loss_and_grads(ckpt, batch)
    assert torch.isfinite(loss_a) and abs(float(loss_a - loss_b)) <= 1e-5
    assert grads_a.keys() == grads_b.keys() and {n.split(".")[0] for n in grads_a} >= {"lm", "generator", "bridge",
                                                                                         "connector"}
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=0, atol=1e-5, msg=n)
    assert saved_b < 0.6 * saved_a, (saved_a, saved_b)  # the layers' activations are recomputed, not kept


def test_checkpointing_one_side_leaves_the_other():
    policy = UnifiedPolicy.from_config(load_config(None).model)
    assert enable_gradient_checkpointing(policy, lm=False, generator=True) == ["SD3Transformer2DModel"]
    assert policy.generator.gradient_checkpointing and not policy.lm.is_activation_checkpointing


def test_memory_config_errors_name_the_field():
    for overrides, field in ((["learner.offload_params=true", "learner.zero_stage=2"], "learner.offload_params"),
                             (["learner.offload_optimizer=true"], "learner.offload_optimizer"),
                             (["learner.gradient_checkpointing_lm=true", "learner.train_lm=false"],
                              "learner.gradient_checkpointing_lm")):
        with pytest.raises(ConfigError) as info:
            load_config(None, overrides)
        assert info.value.field_path == field
    with pytest.raises(ConfigError) as info:
        load_config(str(ROOT / "configs" / "gvu_janus_tiny.yaml"), ["learner.gradient_checkpointing_generator=true"])
    assert info.value.field_path == "learner.gradient_checkpointing_generator"
    load_config(None, ["learner.zero_stage=1", "learner.offload_optimizer=true"])  # valid at ZeRO 1-3


def test_deepspeed_config_of_the_memory_settings():
    cfg = load_config(None, ["learner.zero_stage=3", "learner.offload_params=true", "learner.offload_optimizer=true"])
    ds = deepspeed_config(cfg.learner, bf16=True, clip_in_learner=False, cuda=True)
    assert ds["zero_optimization"] == {"stage": 3, "offload_param": {"device": "cpu", "pin_memory": True},
                                       "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == cfg.learner.grad_clip
    plain = deepspeed_config(load_config(None).learner, bf16=False, clip_in_learner=True, cuda=False)
    assert plain["zero_optimization"] == {"stage": 0} and "zero_force_ds_cpu_optimizer" not in plain
    assert plain["bf16"] == {"enabled": False} and plain["gradient_clipping"] == 0.0


def test_zero3_offload_step_equals_the_step_without_offload(local_ray):
    """ZeRO-3 with parameters and optimizer states offloaded to the host (and both sides checkpointed) takes the
    same step as ZeRO-3 without offload: the same weights after one GRPO step."""
    # run inside the worker (nested: pickled by value)
    def _offload_flags(self) -> dict:
        o = self.optimizer
        return {"offload_optimizer": bool(getattr(o, "offload_optimizer", False)),
                "offload_param": bool(getattr(o, "offload_param", False)),
                "checkpointing": bool(self.policy.lm.is_activation_checkpointing and self.policy.generator.gradient_checkpointing)}

    base = ["learner.zero_stage=3", "model.cond_tokens=8", "learner.gradient_checkpointing_lm=true",
            "learner.gradient_checkpointing_generator=true"]
    cfgs = [load_config(None, base), load_config(None, base + ["learner.offload_params=true",
                                                                "learner.offload_optimizer=true"])]
    batch = _batch(UnifiedPolicy.from_config(cfgs[0].model))
    states, flags = [], []
    for cfg in cfgs:
        group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
        try:
            flags.append(group.call("__ray_call__", _offload_flags))
            start = group.call("trainable_state")
            m = group.train_step(batch)
            assert 0 < m["grad_norm"] < float("inf")
            states.append(group.call("trainable_state"))
        finally:
            group.shutdown()
    assert flags == [{"offload_optimizer": False, "offload_param": False, "checkpointing": True},
                     {"offload_optimizer": True, "offload_param": True, "checkpointing": True}]
    plain, offloaded = states
    assert sum(not torch.equal(start[k], plain[k]) for k in start) > len(start) // 2  # the step moved the weights
    for k in plain:
        torch.testing.assert_close(offloaded[k], plain[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_bf16_keeps_fp32_master_weights_and_optimizer_state(local_ray, zero_stage):
    """``model.dtype: bfloat16``: the model (forward, backward) is bf16; DeepSpeed's bf16 mode keeps an fp32 copy
    of every trainable parameter and fp32 AdamW moments, and the step moves the bf16 weights."""
    def _precision(self) -> dict:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the torch AdamW DeepSpeed steps
        # ZeRO 3 swaps its fp32 partitions into the torch optimizer only during a step
        master = [p for g in inner.param_groups for p in g["params"]] or list(self.optimizer.fp32_partitioned_groups_flat)
        state = [v for s in inner.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
        return {"model": sorted({str(p.dtype) for p in self._trainable}), "master": sorted({str(p.dtype) for p in master}),
                "master_numel": sum(p.numel() for p in master), "trainable_numel": sum(getattr(p, "ds_numel", p.numel()) for p in self._trainable),
                "state": sorted({str(v.dtype) for v in state}), "optimizer": type(self.optimizer).__name__}

    cfg = load_config(None, ["model.dtype=bfloat16", "model.cond_tokens=8", f"learner.zero_stage={zero_stage}"])
    batch = _batch(UnifiedPolicy.from_config(load_config(None, ["model.cond_tokens=8"]).model))
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    try:
        before = group.call("weights_digest")
        m = group.train_step(batch)
        after = group.call("weights_digest")
        p = group.call("__ray_call__", _precision)
    finally:
        group.shutdown()
    assert p["model"] == ["torch.bfloat16"] and p["master"] == ["torch.float32"] and p["state"] == ["torch.float32"]
    assert p["master_numel"] >= p["trainable_numel"] > 0, p  # ZeRO's flat partitions may pad
    assert 0 < m["grad_norm"] < float("inf") and m["loss"] == m["loss"]
    assert sum(before[k] != after[k] for k in before) > len(before) // 2
