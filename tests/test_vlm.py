"""A vision-language model as the understanding side (``model.lm_path`` = a Qwen2.5-VL / Qwen3-VL directory saved
by ``save_pretrained`` with its tokenizer, chat template and image processor, ``tests/vlm_dirs.py``): the input
image goes through the VLM's own processor and vision tower with its multimodal rope positions, in the rollout
engine and in the learner's recomputation alike; generated latents still enter through the bridge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from pipeline_dirs import save_sd3_pipeline
from transformers import Qwen2_5_VLForConditionalGeneration
from vlm_dirs import save_qwen3_vl, save_qwen25_vl

from learner.batch import collate
from learner.group import LearnerGroup
from learner.objective import lm_hidden, policy_outputs
from policy.config import PolicyConfig
from policy.model import UnifiedPolicy
from reward.actor import RewardActor
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout
from services.config import ConfigError, load_config
from sync import manifest
from sync.object_store import ObjectStoreReceiver

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What colour is the shape? A) red B) green C) blue D) yellow"


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return save_qwen25_vl(tmp_path_factory.mktemp("models") / "Qwen2.5-VL-tiny")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> Path:
    """A tiny SD3 pipeline directory (the generator a VLM is paired with in the real-scale configs)."""
    root = tmp_path_factory.mktemp("sd3") / "sd3"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        save_sd3_pipeline(root)
    return root


def _image(seed: int) -> np.ndarray:
    return (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()


def _policy(vl_dir: Path, **kw) -> UnifiedPolicy:
    policy = UnifiedPolicy.from_config(PolicyConfig(lm_path=str(vl_dir), cond_tokens=8, **kw))
    with torch.no_grad():  # make the tiny LM trigger generation often
        policy.lm.lm_head.weight[policy.token_ids["gen"]] += 1.0
    return policy


def _rollout(policy, images, group_size: int = 4, seed: int = 0, generation: str = "auto"):
    reqs = [{"prompt_id": f"p{i}", "text": QUESTION, "image": im, "meta": {"answer": "A", "choices": list("ABCD")}}
            for i, im in enumerate(images)]
    return rollout(policy, HFTextEngine(policy), reqs,
                   RolloutSettings(group_size=group_size, max_new_tokens=10, sde_steps=4, sde_window=2,
                                   generation=generation), 1, torch.Generator().manual_seed(seed))


def test_vl_directory_loads_its_class_processor_and_vision_tokens(vl_dir):
    cfg = load_config(None, [f"model.lm_path={vl_dir}"])
    cfg.check_paths()  # supported: no ConfigError
    policy = _policy(vl_dir)
    assert isinstance(policy.lm, Qwen2_5_VLForConditionalGeneration)
    assert policy.input_image_mode == "vision" and type(policy.vision.processor).__name__.startswith("Qwen2VL")
    assert "torchvision" not in sys.modules
    tokens, latents, vision = policy.input_image(_image(0))
    ids = policy.token_ids
    assert tokens == [ids["vision_start"], *[ids["vision_pad"]] * 4, ids["vision_end"]]  # 4x4 patches, 2x2 merge
    assert latents.shape[0] == 0 and vision.shape == (1, 32, 32, 3) and vision.dtype == torch.uint8
    assert ids["vision_pad"] == policy.lm.config.image_token_id and ids["img"] not in tokens
    both = UnifiedPolicy.from_config(PolicyConfig(lm_path=str(vl_dir), cond_tokens=8, input_image="both"))
    tokens, latents, vision = both.input_image(_image(0))
    assert tokens[:6] == [ids["vision_start"], *[ids["vision_pad"]] * 4, ids["vision_end"]]
    assert tokens[6:] == both.image_placeholder_ids() and latents.shape[0] == 1 and vision.shape[0] == 1


def test_unsupported_and_incomplete_directories_are_config_errors(vl_dir, tmp_path):
    llava = tmp_path / "llava"
    llava.mkdir()
    (llava / "config.json").write_text(json.dumps({"model_type": "llava",
                                                   "architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(ConfigError, match="'llava'.*not supported; supported: .*qwen2_5_vl"):
        load_config(None, [f"model.lm_path={llava}"]).check_paths()
    bare = tmp_path / "bare-vl"
    bare.mkdir()
    (bare / "config.json").write_text((vl_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="no preprocessor_config.json"):
        load_config(None, [f"model.lm_path={bare}"]).check_paths()
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.input_image=vision"]).check_paths()  # the tiny LM has no tower
    assert info.value.field_path == "model.input_image"
    with pytest.raises(ValueError, match="model.input_image"):
        UnifiedPolicy.from_config(PolicyConfig(input_image="both"))


@pytest.mark.parametrize("save", [save_qwen25_vl, save_qwen3_vl], ids=["qwen2.5-vl", "qwen3-vl"])
def test_behaviour_and_recomputed_logprobs_agree(save, tmp_path):
    """The engine (left-padded prefill shared by the group, KV-cached decoding on rope deltas) and the learner
    (right-padded, full multimodal positions) give the same log-probs, with and without a generated image."""
    policy = _policy(save(tmp_path / "vl"))
    trajs = _rollout(policy, [_image(0), _image(1)], group_size=3)
    assert any(t.generated_image for t in trajs) and all(t.vision_images.shape == (1, 32, 32, 3) for t in trajs)
    batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    assert batch.vision_counts.tolist() == [1] * len(trajs) and batch.vision_images.shape[0] == len(trajs)
    with torch.no_grad():
        out = policy_outputs(policy, batch, 1.0, 0.7)
    gap = ((out.logp - batch.behaviour_logp) * batch.loss_mask).abs().max()
    assert gap < 1e-5, gap
    assert out.img_logp is not None
    seg = torch.stack([s.log_probs for t in trajs for s in t.images])
    assert (out.img_logp - seg).abs().max() < 1e-4


def test_input_image_changes_the_answer_logprobs(vl_dir):
    policy = _policy(vl_dir)
    trajs = _rollout(policy, [_image(0)], group_size=2)
    batch = collate(trajs, torch.zeros(2), policy.token_ids["pad"])
    other = collate(trajs, torch.zeros(2), policy.token_ids["pad"])
    other.vision_images = torch.from_numpy(np.stack([_image(7)] * 2))
    with torch.no_grad():
        a, b = policy_outputs(policy, batch, 1.0, 0.7), policy_outputs(policy, other, 1.0, 0.7)
    assert ((a.logp - b.logp).abs() * batch.loss_mask).max() > 1e-4


@pytest.mark.parametrize("train_tower", [True, False])
def test_vision_tower_gradients_follow_the_config(vl_dir, train_tower):
    policy = _policy(vl_dir, train_vision_tower=train_tower).train()
    trajs = _rollout(policy, [_image(0)], group_size=2)
    batch = collate(trajs, torch.zeros(2), policy.token_ids["pad"])
    lm_hidden(policy, batch).square().mean().backward()
    tower = list(policy.vision.tower.parameters())
    grads = [p.grad for p in tower]
    if train_tower:
        assert all(p.requires_grad for p in tower) and any(g is not None and g.abs().sum() > 0 for g in grads)
        assert any(k.startswith("lm.model.visual.") for k in policy.trainable_state_dict())
    else:
        assert not any(p.requires_grad for p in tower) and all(g is None for g in grads)
        assert not any(k.startswith("lm.model.visual.") for k in policy.trainable_state_dict())
    assert policy.lm.model.language_model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rollouts_reward_learner_step_sync_and_checkpoint(local_ray, vl_dir, sd3_dir, tmp_path, lora):
    """One group of CLEAR rollouts on the VLM + an SD3 pipeline directory, the reward, one learner step (the
    learner builds the same policy from the same config and reports the behaviour-vs-recomputed gap), weight sync
    into a rollout policy (verified per adapted module with LoRA), and a checkpoint that loads back as a VLM with
    the trained weights (LoRA: adapters and heads only, on the base the config names)."""
    cfg = load_config(None, [f"model.lm_path={vl_dir}", f"model.generator_path={sd3_dir}", "model.cond_tokens=8",
                             "model.train_vision_tower=true", "rollout.sde.steps=4", "rollout.sde.window=2",
                             *(["model.lora.enabled=true", "model.lora.rank=4"] if lora else [])])
    cfg.check_paths()
    policy = UnifiedPolicy.from_config(cfg.model)  # the learner builds the same policy from the same config
    trajs = _rollout(policy, [_image(0)], group_size=4, generation="force")  # every sample generates
    assert len(trajs) == 4 and all(t.generated_image for t in trajs)
    totals, parts = RewardActor([c.scorer_spec() for c in cfg.reward.components]).score_values(trajs)
    assert len(totals) == 4 and {"answer", "format"} <= set(parts) and all(r == r for r in totals)
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed, None, cfg.rollout.sde)
    try:
        before = group.call("weights_digest")
        assert before == policy.weights_digest()
        m = group.train_step(collate(trajs, torch.tensor([1.0, -1.0, 0.5, -0.5]), policy.token_ids["pad"]))
        after = group.call("weights_digest")
        assert 0 < m["grad_norm"] < float("inf") and m["image/loss"] == m["image/loss"]
        assert m["learn/logp_gap_text"] < 1e-5 and m["learn/logp_gap_image"] < 1e-4, m
        changed = {k for k in before if before[k] != after[k]}
        assert any(k.startswith("lm.model.visual.") for k in changed)  # the tower trained (LoRA: its adapters)
        assert {"generator", "connector", "bridge"} <= {k.split(".")[0] for k in changed}
        assert not lora or all(".lora_" in k for k in changed if not k.startswith(("bridge.", "connector.")))
        handle = group.publish()
        assert bool(handle.manifest) == lora and set(handle.manifest) == set(policy.adapted_modules())
        received: list[str] = []
        HFTextEngine(policy).load_weights(manifest.recording(ObjectStoreReceiver().receive(handle, 60), received))
        manifest.verify(handle, policy.adapted_modules(), received, policy.trainable_state_dict())
        synced = policy.weights_digest()
        assert synced.keys() == after.keys()
        assert all(abs(synced[k] - after[k]) <= 1e-6 * (1 + abs(after[k])) for k in after)
        group.call_all("save", str(tmp_path / "ckpt"))
    finally:
        group.shutdown()
    saved = tmp_path / "ckpt" / "policy"
    assert (saved / "lm" / "preprocessor_config.json").is_file() != lora  # LoRA: no copy of the base
    loaded = UnifiedPolicy.from_pretrained(saved)
    assert isinstance(loaded.lm, Qwen2_5_VLForConditionalGeneration) and loaded.vision is not None
    assert (loaded.lora is not None) == lora
    digest = loaded.weights_digest()
    assert digest.keys() == after.keys()
    assert all(abs(digest[k] - after[k]) <= 1e-6 * (1 + abs(after[k])) for k in after)
    again = _rollout(loaded, [_image(0)], group_size=2)  # the reloaded VLM rolls out
    assert all(t.vision_images.shape[0] == 1 for t in again)


@pytest.mark.slow
def test_unigrpo_train_runs_a_tiny_vl_config_to_the_end(vl_dir, sd3_dir, tmp_path):
    """CLEAR's two stages through ``unigrpo train`` from the directories: a Qwen2.5-VL and an SD3 pipeline."""
    config = yaml.safe_load((ROOT / "configs" / "clear_qwen25vl_tiny.yaml").read_text())
    config["model"]["lm_path"], config["model"]["generator_path"] = str(vl_dir), str(sd3_dir)
    config["checkpoint"]["dir"] = str(tmp_path / "ckpt")
    config["tracking"]["uri"] = f"sqlite:///{tmp_path}/vl.db"
    path = tmp_path / "vl.yaml"
    path.write_text(yaml.safe_dump(config))
    res = subprocess.run([sys.executable, "-m", "services.cli", "train", "--config", str(path)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=900,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-4000:]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/vl.db")
    run = client.search_runs([client.get_experiment_by_name(config["tracking"]["experiment"]).experiment_id])[0]
    gaps = [m.value for m in client.get_metric_history(run.info.run_id, "learn/logp_gap_text")]
    assert len(gaps) == config["algorithm"]["steps"] and max(gaps) < 1e-4, gaps
    final = tmp_path / "ckpt" / config["run_name"] / f"step-{config['algorithm']['steps']:06d}" / "policy"
    assert (final / "lm" / "preprocessor_config.json").is_file()
    assert json.loads((final / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0  # SD3's
    assert json.loads((final / "vae" / "config.json").read_text())["latent_channels"] == 16  # its VAE, not a fit


def test_vllm_multimodal_prompt_collapses_each_image_run(vl_dir):
    """What the vLLM engine sends for a VLM prompt: token ids with each ``<|image_pad|>`` run as one token
    (vLLM's processor expands it from the same preprocessor config), and the images as PIL images."""
    from rollout.vllm_engine import vllm_vision_prompt

    policy = _policy(vl_dir)
    tokens, _, vision = policy.input_image(_image(0))
    pad = policy.token_ids["vision_pad"]
    prompt = vllm_vision_prompt(tokens + [7, 8], vision, pad)
    assert prompt["prompt_token_ids"] == [policy.token_ids["vision_start"], pad, policy.token_ids["vision_end"], 7, 8]
    (img,) = prompt["multi_modal_data"]["image"]
    assert img.size == (32, 32) and np.array_equal(np.asarray(img), vision[0].numpy())
