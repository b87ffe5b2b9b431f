"""UAE and GvU rollouts on the tiny policy, the "gvu" reward, and the recipe -> rollout registry."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from learner.advantage import group_advantages
from learner.batch import collate
from learner.objective import policy_outputs
from policy.config import PolicyConfig
from policy.model import UnifiedPolicy
from reward.registry import REWARDS, RewardSet, get_reward
from rollout import interleaved
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings
from rollout.recipes import ROLLOUTS, get_rollout, gvu_rollout, uae_rollout

torch.set_num_threads(1)

SETTINGS = RolloutSettings(group_size=2, max_new_tokens=6, sde_steps=4, sde_window=2,
                           sde_window_position="random")


@pytest.fixture(scope="module")
def policy() -> UnifiedPolicy:
    return UnifiedPolicy.from_config(PolicyConfig(seed=0))


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _uae(policy, seed: int = 0):
    reqs = [{"prompt_id": "a", "image": _image(1), "meta": {"k": 1}}, {"prompt_id": "b", "image": _image(2)}]
    return uae_rollout(policy, HFTextEngine(policy), reqs, SETTINGS, version=3,
                       generator=torch.Generator().manual_seed(seed))


def _gvu(policy, seed: int = 0):
    reqs = [{"prompt_id": "p", "text": "a red circle"}, {"prompt_id": "q", "text": "two blue squares"}]
    return gvu_rollout(policy, HFTextEngine(policy), reqs, SETTINGS, version=5,
                       generator=torch.Generator().manual_seed(seed))


def _check_learner_recomputes(policy, trajs) -> None:
    """The learner's recomputation (collate + policy_outputs) reproduces the behaviour log-probs."""
    batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    with torch.no_grad():
        out = policy_outputs(policy, batch, SETTINGS.temperature, SETTINGS.sde_noise_level)
    m = batch.loss_mask
    assert torch.allclose(out.logp[m], batch.behaviour_logp[m], atol=1e-4)
    assert torch.allclose(out.img_logp, batch.seg_log_probs, atol=1e-3)


# ---- UAE ---------------------------------------------------------------------------------------
def test_uae_rollout_caption_reconstruction_window(policy):
    trajs = _uae(policy)
    assert [(t.prompt_id, t.group_index) for t in trajs] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for t in trajs:
        t.validate()
        assert t.response_len >= 1 and t.loss_mask[t.prompt_len:].all() and not t.loss_mask[: t.prompt_len].any()
        assert t.policy_version == 3
        src, rec = t.meta["source_image"], t.meta["reconstruction"]
        assert src.dtype == torch.float32 and src.shape == (3, 32, 32) and 0 <= src.min() and src.max() <= 1
        assert rec.shape == src.shape and rec.dtype == torch.float32 and torch.isfinite(rec).all()
        assert t.slot_latents.shape == (1, *policy.latent_shape)  # only the input image
        assert int((t.input_ids == policy.token_ids["img"]).sum()) == policy.n_image_tokens
        (seg,) = t.images
        assert seg.window == SETTINGS.sde_window and torch.isfinite(seg.log_probs).all()
        assert seg.cond_end == t.input_ids.shape[0]
    assert trajs[0].meta["k"] == 1
    _check_learner_recomputes(policy, trajs)


def test_uae_reward_clip_similarity_scores_reconstructions(policy):
    trajs = _uae(policy, seed=1)
    rs = RewardSet([{"name": "clip_similarity", "kwargs": {"tiny": True, "device": "cpu"}}])
    totals, comps = rs.combine(trajs)
    assert all(math.isfinite(v) and -1.0 <= v <= 1.0 for v in totals)


def test_uae_needs_an_image(policy):
    with pytest.raises(ValueError, match="no image"):
        uae_rollout(policy, HFTextEngine(policy), [{"prompt_id": "x", "text": "?"}], SETTINGS, 0)


# ---- GvU ---------------------------------------------------------------------------------------
def test_gvu_rollout_image_segments(policy):
    trajs = _gvu(policy)
    assert len(trajs) == 4
    for t in trajs:
        t.validate()
        assert t.response_len == 0 and t.response_text == ""
        assert t.input_ids[-1] == policy.token_ids["gen"] and t.prompt_len == t.input_ids.shape[0]
        assert t.slot_latents.shape == (0, *policy.latent_shape)
        (seg,) = t.images
        assert seg.cond_end == t.prompt_len and torch.isfinite(seg.log_probs).all()
        assert torch.equal(t.meta["generated_latent"], seg.final_latent)
        assert t.meta["generated_latent"].shape == policy.latent_shape
    assert trajs[0].meta["prompt_text"] == "a red circle" and trajs[3].meta["prompt_text"] == "two blue squares"
    again = _gvu(policy)
    assert all(torch.equal(a.meta["generated_latent"], b.meta["generated_latent"]) for a, b in zip(trajs, again))
    _check_learner_recomputes(policy, trajs)


def test_gvu_reward_prefers_the_trained_description(policy):
    from reward.gvu import gvu_scores, gvu_sync

    trained = copy.deepcopy(policy).train()
    torch.manual_seed(0)
    latent = torch.randn(1, *policy.latent_shape)
    desc, other = "a red circle on the left", "two blue squares at the bottom"
    # a few dozen SGD steps of the text CE  -mean_j log p(d_j | image, "Describe the image", d_<j)
    opt = torch.optim.Adam([p for p in trained.parameters() if p.requires_grad], lr=3e-3)
    from reward.gvu import INSTRUCTION, _sequences

    rows, starts = _sequences(trained, [desc], INSTRUCTION)
    ids = torch.tensor(rows)
    attn = torch.ones_like(ids)
    for _ in range(30):
        logp, _ = trained.token_logprobs(ids, attn, latent)
        loss = -logp[0, starts[0]:].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    lat2 = latent.repeat(2, 1, 1, 1)
    s = gvu_scores(trained, lat2, [desc, other])
    assert s[0] > s[1] and 0 < float(s[1]) and float(s[0]) <= 1
    assert torch.equal(gvu_scores(trained, lat2, [desc, desc])[0], gvu_scores(trained, lat2, [desc, desc])[1])
    assert torch.allclose(gvu_scores(trained, latent, [desc]), s[:1], atol=1e-5)  # batching does not matter
    # weight sync: the base policy scores like the trained one once it has its weights
    fresh = copy.deepcopy(policy)
    before = gvu_scores(fresh, lat2, [desc, other])
    assert gvu_sync(fresh, trained.trainable_state_dict().items()) > 0
    assert not torch.allclose(before, s) and torch.allclose(gvu_scores(fresh, lat2, [desc, other]), s, atol=1e-6)


def test_gvu_reward_registered_and_scores_rollouts(policy):
    import reward.gvu  # noqa: F401

    fn, setup = get_reward("gvu")
    assert REWARDS["gvu"] is fn and setup is not None
    trajs = _gvu(policy)
    rs = RewardSet([{"name": "gvu"}], resources={"policy": policy})
    totals, comps = rs.combine(trajs)
    assert all(0 < v <= 1 for v in totals) and comps["gvu"] == totals
    assert rs.combine(trajs)[0] == totals  # deterministic
    bad = copy.copy(trajs[0])
    bad.meta = {"prompt_text": "x"}
    bad.images = []
    assert math.isnan(rs.combine([bad])[0][0])
    with pytest.raises(ValueError, match="resources"):
        RewardSet([{"name": "gvu"}])


# ---- registry ----------------------------------------------------------------------------------
def test_rollout_registry():
    assert ROLLOUTS["clear"] is interleaved.rollout
    assert get_rollout("uae") is uae_rollout and get_rollout("gvu") is gvu_rollout
    with pytest.raises(ValueError, match="known"):
        get_rollout("nope")


def test_group_advantages_over_gvu_rewards(policy):
    """End to end over the GvU recipe's pieces: rollout -> reward -> group advantages are finite."""
    trajs = _gvu(policy, seed=2)
    rs = RewardSet([{"name": "gvu"}], resources={"policy": policy})
    totals, _ = rs.combine(trajs)
    adv = group_advantages(torch.tensor(totals), SETTINGS.group_size)
    assert torch.isfinite(adv).all()
