"""A vision-language model (tiny Qwen2.5-VL directory, ``tests/vlm_dirs.py``) on every path that shows the
understanding side an image: CLEAR's stage 1 (SFT), UAE's captioning rollout, GvU's reward, and the learner's
shared-prefix forward (off for batches with tower inputs, on for a VLM that reads images through the bridge)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from vlm_dirs import save_qwen25_vl

import policy.shared_prefix as shared_prefix_module
from learner.batch import collate
from learner.objective import lm_hidden, policy_outputs, sft_loss, shared_prefix_plan
from learner.sft import sft_shard
from policy.config import PolicyConfig
from policy.model import UnifiedPolicy
from policy.prompting import encode_prompt
from policy.shared_prefix import shared_prefix_off
from policy.vision import image_to_uint8
from reward.gvu import gvu_scores, tower_images
from rollout.caption import UAE_INSTRUCTION, uae_rollout
from rollout.engine import HFTextEngine
from rollout.image import gvu_rollout
from rollout.interleaved import RolloutSettings, rollout

torch.set_num_threads(1)
QUESTION = "What colour is the shape? A) red B) green C) blue D) yellow"
SETTINGS = RolloutSettings(group_size=3, max_new_tokens=8, sde_steps=4, sde_window=2)


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory) -> Path:
    return save_qwen25_vl(tmp_path_factory.mktemp("models") / "Qwen2.5-VL-tiny")


def _image(seed: int) -> np.ndarray:
    return (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()


def _policy(vl_dir: Path, **kw) -> UnifiedPolicy:
    return UnifiedPolicy.from_config(PolicyConfig(lm_path=str(vl_dir), cond_tokens=8, **kw))


def _run(policy) -> list[int]:
    ids = policy.token_ids
    return [ids["vision_start"], *[ids["vision_pad"]] * 4, ids["vision_end"]]  # 32 x 32: 4 merged patches


# ------------------------------------------------------------------------------------------------ stage 1
def _examples(images: list[np.ndarray]) -> list[dict]:
    return [{"text": QUESTION, "image": im, "clean_image": _image(50 + i), "answer": "A", "generate": i == 0}
            for i, im in enumerate(images)]


def test_sft_feeds_the_input_image_through_the_tower_and_the_bridge(vl_dir):
    """CLEAR stage 1 with ``input_image: both``: each prompt holds the VLM's vision run and the bridge slot of the
    same input image, the tower and the bridge both get gradients, the batched loss equals the rows' losses
    one by one, and another input image gives other answer log-probs."""
    policy = _policy(vl_dir, input_image="both", train_vision_tower=True).train()
    shard = sft_shard(policy, _examples([_image(0), _image(1)]), 4, torch.Generator().manual_seed(0))
    b = shard.batch
    run, slot = _run(policy), policy.image_placeholder_ids()
    for row in b.input_ids:
        assert row[: len(run) + len(slot)].tolist() == run + slot
    assert b.vision_images.shape == (2, 32, 32, 3) and torch.equal(b.vision_images[1], torch.from_numpy(_image(1)))
    assert b.slot_counts.tolist() == [2, 1]  # the input image's latent (+ row 0's own generation)
    loss, m = sft_loss(policy, shard)
    loss.backward()
    assert m["sft/flow_mse"] > 0
    tower = [p.grad for p in policy.vision.tower.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in tower)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.bridge.proj.parameters())
    with torch.no_grad():  # the batch's answer log-probs are each row's alone (padding, feature order)
        logp, _ = policy.token_logprobs(b.input_ids, b.attention_mask, b.slot_latents, vision_images=b.vision_images)
        lat = b.slot_latents.split(b.slot_counts.tolist())
        for i in range(2):
            n = int(b.attention_mask[i].sum())
            alone, _ = policy.token_logprobs(b.input_ids[i : i + 1, :n], b.attention_mask[i : i + 1, :n], lat[i],
                                             vision_images=b.vision_images[i : i + 1])
            assert (alone[0] - logp[i, :n]).abs().max() < 1e-5
        other = sft_shard(policy, _examples([_image(7), _image(1)]), 4, torch.Generator().manual_seed(0)).batch
        moved, _ = policy.token_logprobs(other.input_ids, other.attention_mask, other.slot_latents,
                                         vision_images=other.vision_images)
    answer = b.loss_mask[0]
    assert (moved[0] - logp[0])[answer].abs().max() > 1e-4  # row 0 saw another image
    assert (moved[1] - logp[1])[b.loss_mask[1]].abs().max() < 1e-5  # row 1 did not


def test_sft_with_the_vision_mode_reads_no_bridge_slot(vl_dir):
    policy = _policy(vl_dir)  # a VLM's default: input_image vision
    b = sft_shard(policy, [{**e, "generate": False} for e in _examples([_image(0)])], 4,
                  torch.Generator().manual_seed(0)).batch
    assert b.input_ids[0, :6].tolist() == _run(policy) and b.slot_latents.shape[0] == 0
    assert policy.token_ids["img"] not in b.input_ids[0].tolist() and b.vision_images.shape[0] == 1


# ------------------------------------------------------------------------------------------------- UAE
@pytest.mark.parametrize("mode", ["vision", "both", "bridge"])
def test_uae_captions_read_the_input_image_through_the_tower(vl_dir, mode):
    policy = _policy(vl_dir, input_image=mode)
    reqs = [{"prompt_id": "p0", "image": _image(0), "meta": {}}]
    trajs = uae_rollout(policy, HFTextEngine(policy), reqs, SETTINGS, 1, torch.Generator().manual_seed(0))
    head = (_run(policy) if mode != "bridge" else []) + (policy.image_placeholder_ids() if mode != "vision" else [])
    body = encode_prompt(policy.tokenizer, UAE_INSTRUCTION, policy.n_image_tokens, with_image=False)
    for t in trajs:
        assert t.input_ids[: t.prompt_len].tolist() == head + body
        assert t.vision_images.shape[0] == (mode != "bridge") and t.slot_latents.shape[0] == (mode != "vision")
    batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    assert (shared_prefix_plan(policy, batch) is None) == (mode != "bridge")  # packed only without tower inputs
    with torch.no_grad():
        out = policy_outputs(policy, batch, 1.0, SETTINGS.sde_noise_level)
    gap = ((out.logp - batch.behaviour_logp) * batch.loss_mask).abs().max()
    assert gap < 1e-5, gap  # behaviour (KV-cached engine) vs the learner's recomputation
    seg = torch.stack([s.log_probs for t in trajs for s in t.images])
    assert (out.img_logp - seg).abs().max() < 1e-5
    if mode == "bridge":
        return
    assert torch.equal(trajs[0].vision_images[0], torch.from_numpy(_image(0)))
    other = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    other.vision_images = torch.from_numpy(np.stack([_image(7)] * len(trajs)))
    with torch.no_grad():
        moved = policy_outputs(policy, other, 1.0, SETTINGS.sde_noise_level)
    assert ((moved.logp - out.logp).abs() * batch.loss_mask).max() > 1e-4  # the caption depends on the image


# ------------------------------------------------------------------------------------------------- GvU
def test_gvu_scores_the_generated_image_through_the_tower(vl_dir):
    """The GvU reward on a VLM (``input_image: vision``) decodes each generated latent and reads the pixels with
    the tower: the batched scores equal each row scored alone from the sequence the docstring gives, and another
    image gives another score."""
    policy = _policy(vl_dir)
    reqs = [{"prompt_id": "p0", "text": "a red circle", "meta": {}}]
    trajs = gvu_rollout(policy, None, reqs, SETTINGS, 1, torch.Generator().manual_seed(0))
    latents = torch.stack([t.meta["generated_latent"] for t in trajs])
    descs = ["a red circle", "a blue square", "red"]
    batched = gvu_scores(policy, latents, descs, answer_tags=True, max_batch=3)
    one = gvu_scores(policy, latents, descs, answer_tags=True, max_batch=1)
    assert torch.isfinite(batched).all() and (batched - one).abs().max() < 1e-6
    pixels = policy.decode_latent(latents)
    for i, d in enumerate(descs):
        img = image_to_uint8(pixels[i])
        head = (policy.vision.slot(img) + encode_prompt(policy.tokenizer, "Describe the image", policy.n_image_tokens,
                                                        with_image=False) + [policy.token_ids["answer_start"]])
        desc = policy.tokenizer.encode(d, add_special_tokens=False)
        ids = torch.tensor([head + desc])
        with torch.no_grad():
            logp, _ = policy.token_logprobs(ids, torch.ones_like(ids), None, vision_images=img[None])
        assert abs(math.exp(float(logp[0, len(head):].mean())) - float(batched[i])) < 1e-6
    assert torch.equal(tower_images(policy, latents), torch.stack([image_to_uint8(x) for x in pixels]))
    flipped = gvu_scores(policy, latents.flip(-1), descs, answer_tags=True)
    assert (flipped - batched).abs().max() > 1e-6  # the score reads the image


# ------------------------------------------------------------------------------------------ shared prefix
def test_shared_prefix_is_off_for_tower_inputs_and_on_for_a_bridge_vlm(vl_dir, caplog):
    vision = _policy(vl_dir)
    req = [{"prompt_id": "p0", "text": QUESTION, "image": _image(0), "meta": {}}]
    batch = collate(rollout(vision, HFTextEngine(vision), req, SETTINGS, 1, torch.Generator().manual_seed(0)),
                    torch.zeros(3), vision.token_ids["pad"])
    assert batch.vision_images.shape[0] == 3
    with caplog.at_level(logging.WARNING, logger="policy.shared_prefix"):
        assert shared_prefix_plan(vision, batch) is None
        assert shared_prefix_plan(vision, batch) is None
        reason = shared_prefix_off(batch.vision_images)
    logged = [r.getMessage() for r in caplog.records if r.name == "policy.shared_prefix"]
    assert reason and "vision-language input images" in reason
    assert logged.count(reason) <= 1 and reason in shared_prefix_module._LOGGED  # logged, once per process
    with torch.no_grad():
        assert torch.equal(lm_hidden(vision, batch, True), lm_hidden(vision, batch, False))
    bridge = _policy(vl_dir, input_image="bridge")  # the VLM reads the input image through the bridge only
    b = collate(rollout(bridge, HFTextEngine(bridge), req, SETTINGS, 1, torch.Generator().manual_seed(0)),
                torch.zeros(3), bridge.token_ids["pad"])
    assert b.vision_images.shape[0] == 0
    plan = shared_prefix_plan(bridge, b)
    assert plan is not None and plan.num_prompts == 1
    with torch.no_grad():
        packed, padded = lm_hidden(bridge, b, True), lm_hidden(bridge, b, False)
    m = b.attention_mask.bool().clone()
    m[torch.arange(3), m.sum(1) - 1] = False  # a row's last token is left out of the packed rows
    assert (packed - padded)[m].abs().max() < 1e-5
    with torch.no_grad():
        out = policy_outputs(bridge, b, 1.0, SETTINGS.sde_noise_level)
    assert ((out.logp - b.behaviour_logp) * b.loss_mask).abs().max() < 1e-5
