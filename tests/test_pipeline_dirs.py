"""Generators from diffusers pipeline directories (policy/pipeline.py): a tiny random-init SD3 pipeline saved by
diffusers' own ``StableDiffusion3Pipeline.save_pretrained`` (model_index.json, transformer/, vae/, scheduler/ with
shift 3) loads through a config whose ``model.generator_path`` names it; its scheduler gives the sampler's
sigmas; it rolls out, trains a learner step and reloads from the saved checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
)
from pipeline_dirs import SHIFT, save_sd3_pipeline

from learner.batch import collate
from learner.group import LearnerGroup
from policy.model import UnifiedPolicy
from policy.pipeline import FlowSchedule, PipelineDirError, check_generator_dir
from policy.sde import flow_sigmas, sample_latents, scheduler_sigmas, window_log_probs, window_starts
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout
from services.config import ConfigError, load_config

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines") / "sd3"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_sd3_pipeline(root)
    return root


def _cfg(sd3_dir, *extra: str):
    return load_config(None, [f"model.generator_path={sd3_dir}", "model.cond_tokens=8", *extra])


@pytest.fixture(scope="module")
def policy(sd3_dir):
    cfg = _cfg(sd3_dir)
    cfg.check_paths()
    return UnifiedPolicy.from_config(cfg.model)


@pytest.mark.parametrize("steps", [1, 4, 10, 28])
@pytest.mark.parametrize("config,mu", [({"shift": 3.0}, None), ({"shift": 1.0}, None),
                                       ({"shift": 3.0, "shift_terminal": 0.05}, None),
                                       ({"use_dynamic_shifting": True}, 0.9),
                                       ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.3)])
def test_scheduler_sigmas_equal_diffusers(steps, config, mu):
    if steps == 1 and "shift_terminal" in config:
        steps = 2  # one step cannot be stretched to a terminal value (diffusers divides by zero)
    sched = FlowMatchEulerDiscreteScheduler(**config)
    sched.set_timesteps(steps, mu=mu)
    ours = scheduler_sigmas(steps, config.get("shift", 1.0), 1000, mu, config.get("time_shift_type", "exponential"),
                            config.get("shift_terminal"))
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.equal(ours, sched.sigmas)


def test_pipeline_dir_loads_transformer_vae_and_scheduler(sd3_dir, policy):
    assert isinstance(policy.generator, SD3Transformer2DModel) and isinstance(policy.vae, AutoencoderKL)
    saved_t = SD3Transformer2DModel.from_pretrained(sd3_dir / "transformer")
    saved_v = AutoencoderKL.from_pretrained(sd3_dir / "vae")
    for ours, saved in ((policy.generator, saved_t), (policy.vae, saved_v)):
        a, b = ours.state_dict(), saved.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert policy.latent_shape == (16, 8, 8) and policy.vae.config.shift_factor == pytest.approx(0.0609)
    assert policy.schedule == FlowSchedule(shift=SHIFT)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_dir / "scheduler")
    for steps in (4, 10):
        sched.set_timesteps(steps)
        assert torch.equal(policy.sigmas(steps), sched.sigmas)
        assert not torch.allclose(policy.sigmas(steps), flow_sigmas(steps), atol=1e-3)  # the shift is in them


def test_sampler_records_the_schedulers_sigmas(policy):
    """The SDE window of ``sample_latents`` over the policy's sigmas holds the scheduler's (sigma, sigma_next)
    pairs, and the learner's recomputation of the window gives the behaviour log-probs back."""
    steps, window = 6, 2
    sig = policy.sigmas(steps)
    enc, pooled = torch.randn(3, 8, 32), torch.randn(3, 32)
    velocity = lambda x, s: policy.velocity(x, s, enc, pooled)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    starts = window_starts(3, steps, window, "random", 0, gen)
    with torch.no_grad():
        rec = sample_latents(velocity, torch.randn(3, *policy.latent_shape, generator=gen), sig, window, 0.7,
                             starts, gen)
        per_row = lambda x, s: policy.velocity(x, s, enc.repeat_interleave(window, 0),  # noqa: E731
                                               pooled.repeat_interleave(window, 0))  # row b*W + j: sample b
        lp, _, _ = window_log_probs(per_row, rec.latents, rec.next_latents, rec.sigmas, rec.sigma_nexts, 0.7)
    ks = starts[:, None] + torch.arange(window)[None]
    assert torch.equal(rec.sigmas, sig[ks]) and torch.equal(rec.sigma_nexts, sig[ks + 1])
    assert (lp - rec.log_probs).abs().max() < 1e-5


def test_transformer_subfolder_and_mismatched_class_are_config_errors(sd3_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.generator_path.*transformer/ folder"):
        _cfg(sd3_dir / "transformer").check_paths()
    with pytest.raises(PipelineDirError, match="model.generator_class"):
        check_generator_dir(sd3_dir, "FluxTransformer2DModel")
    karras = tmp_path / "karras"
    save_sd3_pipeline(karras, use_karras_sigmas=True)
    with pytest.raises(ConfigError, match="use_karras_sigmas"):
        _cfg(karras).check_paths()
    index = json.loads((sd3_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"


def test_save_pretrained_keeps_the_schedule(policy, tmp_path):
    policy.save_pretrained(tmp_path / "ckpt")
    loaded = UnifiedPolicy.from_pretrained(tmp_path / "ckpt")
    assert loaded.schedule == policy.schedule and torch.equal(loaded.sigmas(10), policy.sigmas(10))


def test_rollouts_learner_step_and_checkpoint_reload(local_ray, sd3_dir, tmp_path):
    """One group of CLEAR rollouts on the pipeline's policy, one learner step (the learner builds the same
    policy from the same config), a checkpoint that loads back with the scheduler and the trained weights."""
    cfg = _cfg(sd3_dir, "rollout.sde.steps=4", "rollout.sde.window=2")
    policy = UnifiedPolicy.from_config(cfg.model)
    with torch.no_grad():  # make the tiny LM trigger generation often
        policy.lm.lm_head.weight[policy.token_ids["gen"]] += 1.0
    reqs = [{"prompt_id": "p0", "text": "What colour is the shape? A) red B) green C) blue D) yellow",
             "image": (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy(), "meta": {}}]
    trajs = rollout(policy, HFTextEngine(policy), reqs, RolloutSettings(group_size=4, max_new_tokens=12,
                                                                        sde_steps=4, sde_window=2), 1,
                    torch.Generator().manual_seed(0))
    assert len(trajs) == 4 and any(t.generated_image for t in trajs)
    sig = policy.sigmas(4)
    for seg in (s for t in trajs for s in t.images):  # the rollout's windows are on the scheduler's schedule
        assert all(bool(torch.isclose(sig, x).any()) for x in seg.sigmas)
        assert all(bool(torch.isclose(sig, x).any()) for x in seg.sigma_nexts)
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed, None, cfg.rollout.sde)
    try:
        before = group.call("weights_digest")
        m = group.train_step(collate(trajs, torch.tensor([1.0, -1.0, 0.5, -0.5]), policy.token_ids["pad"]))
        after = group.call("weights_digest")
        assert m["image/loss"] == m["image/loss"] and 0 < m["grad_norm"] < float("inf")
        assert {"generator", "connector"} <= {k.split(".")[0] for k in before if before[k] != after[k]}
        group.call_all("save", str(tmp_path / "ckpt"))
    finally:
        group.shutdown()
    loaded = UnifiedPolicy.from_pretrained(tmp_path / "ckpt" / "policy")
    assert loaded.schedule == FlowSchedule(shift=SHIFT) and torch.equal(loaded.sigmas(4), policy.sigmas(4))
    digest = loaded.weights_digest()
    assert digest.keys() == after.keys()
    assert all(abs(digest[k] - after[k]) <= 1e-6 * (1 + abs(after[k])) for k in after)
