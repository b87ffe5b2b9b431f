"""UAE and GvU rollouts on the tiny policy, the "gvu" reward, the rollout registry by kind, and the recipe
registry (each recipe's requests, stage-1 examples, rollout and architecture limits on shapes items)."""

from __future__ import annotations

import copy
import dataclasses
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
from rollout.caption import caption_condition, caption_text_ids, uae_rollout
from rollout.engine import HFTextEngine
from rollout.image import gvu_rollout, janus_gvu_rollout
from rollout.interleaved import RolloutSettings
from rollout.registry import ROLLOUTS, get_rollout, rollout_kinds
from tasks.describe import CAPTION_INSTRUCTION

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
        # the reconstruction's condition is the caption alone, as a generation prompt: no image slot in it
        caption = [i for i in t.input_ids[t.prompt_len:].tolist() if i != policy.token_ids["eos"]]
        cond, start = caption_condition(policy, caption)
        assert seg.cond_ids.tolist() == cond and seg.cond_end == len(seg.cond_ids) and seg.cond_start == start == 0
        assert policy.token_ids["img"] not in seg.cond_ids.tolist()
    assert trajs[0].meta["k"] == 1
    _check_learner_recomputes(policy, trajs)


def test_uae_condition_is_the_caption_between_its_answer_markers(policy):
    """A caption written as stage 1 teaches (<answer> text </answer> <eos>) conditions the generator on its
    text alone, in the layout stage 1's generation rows have ("\\n" description "\\n" <gen>); without markers,
    on all that was written; an unclosed <answer> keeps the rest."""
    ids, tok = policy.token_ids, policy.tokenizer
    text = tok.encode("a red circle on the left", add_special_tokens=False)
    marked = [ids["answer_start"], *text, ids["answer_end"], ids["eos"]]
    assert caption_text_ids(marked, ids) == text == caption_text_ids([*text, ids["eos"]], ids)
    assert caption_text_ids([7, ids["answer_start"], *text], ids) == text
    cond, start = caption_condition(policy, marked)
    gen_row = tok.encode("\na red circle on the left\n", add_special_tokens=False) + [ids["gen"]]  # recipes.uae
    assert cond == gen_row and start == 0


def test_uae_reconstruction_does_not_see_the_input_image_once_the_caption_is_fixed(policy):
    """Same captions, another input image in the slot: the caption's log-probs change (it was read from the
    image), the reconstruction's window log-probs and its condition do not (text is the only latent)."""
    trajs = _uae(policy)
    batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    other = copy.copy(batch)
    other.slot_latents = policy.encode_image(torch.rand(batch.slot_latents.shape[0], 3, 32, 32,
                                                        generator=torch.Generator().manual_seed(7)))
    with torch.no_grad():
        a = policy_outputs(policy, batch, SETTINGS.temperature, SETTINGS.sde_noise_level)
        b = policy_outputs(policy, other, SETTINGS.temperature, SETTINGS.sde_noise_level)
    m = batch.loss_mask
    assert (a.logp[m] - b.logp[m]).abs().max() > 1e-4
    assert torch.equal(a.img_logp, b.img_logp) and torch.equal(a.img_mean, b.img_mean)


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
    assert ROLLOUTS["unified"]["interleaved"] is interleaved.rollout
    assert get_rollout("caption") is uae_rollout and get_rollout("image") is gvu_rollout
    assert get_rollout("image", "janus") is janus_gvu_rollout and rollout_kinds("janus") == ("image",)
    with pytest.raises(ValueError, match="known"):
        get_rollout("nope")
    with pytest.raises(ValueError, match="known: image"):
        get_rollout("interleaved", "janus")


def test_group_advantages_over_gvu_rewards(policy):
    """End to end over the GvU recipe's pieces: rollout -> reward -> group advantages are finite."""
    trajs = _gvu(policy, seed=2)
    rs = RewardSet([{"name": "gvu"}], resources={"policy": policy})
    totals, _ = rs.combine(trajs)
    adv = group_advantages(torch.tensor(totals), SETTINGS.group_size)
    assert torch.isfinite(adv).all()


# ---- recipes -----------------------------------------------------------------------------------
def _shapes(n: int = 4, degrade_prob: float = 1.0):
    from tasks import build_dataset

    return list(build_dataset("shapes_vqa", size=n, seed=0, split="train", degrade_prob=degrade_prob))


def test_recipe_registry_lists_the_three_recipes():
    from recipes import RECIPES, Recipe, get_recipe, register_recipe

    assert list(RECIPES) == ["clear", "uae", "gvu"] and all(isinstance(r, Recipe) for r in RECIPES.values())
    assert {n: r.evaluation for n, r in RECIPES.items()} == {"clear": "accuracy", "uae": "heldout_reward",
                                                             "gvu": "heldout_reward"}
    assert {n: r.rollout for n, r in RECIPES.items()} == {"clear": "interleaved", "uae": "caption", "gvu": "image"}
    assert get_recipe("gvu").architectures == ("unified", "janus") and get_recipe("clear").architectures == ("unified",)
    with pytest.raises(ValueError, match="known: clear, uae, gvu"):
        get_recipe("dpo")
    with pytest.raises(ValueError, match="already registered"):
        register_recipe(dataclasses.replace(get_recipe("uae"), summary="another"))
    with pytest.raises(AttributeError):  # frozen
        get_recipe("clear").rollout = "caption"


def test_each_recipe_builds_requests_that_its_rollout_runs(policy):
    from recipes import RECIPES

    items = _shapes(2)
    for recipe in RECIPES.values():
        reqs = recipe.requests(items)
        assert [r["prompt_id"] for r in reqs] == [it.prompt_id for it in items]
        trajs = recipe.rollout_fn("unified")(policy, HFTextEngine(policy), reqs, SETTINGS, 1,
                                             torch.Generator().manual_seed(0))
        assert len(trajs) == len(items) * SETTINGS.group_size, recipe.name
        for t in trajs:
            t.validate()
        specs = recipe.default_reward_components()
        assert specs and all(s["name"] in REWARDS or s["name"] == "gvu" for s in specs)
        specs[0]["kwargs"]["x"] = 1  # copies: the recipe's defaults do not change
        assert "x" not in recipe.rewards[0].get("kwargs", {})


def test_recipe_requests_carry_what_each_recipe_needs():
    from recipes import get_recipe
    from tasks.describe import describe_item

    items = _shapes(4)
    clear = get_recipe("clear").requests(items)
    assert all(r["image"] is it.image and r["meta"]["answer"] == it.answer and r["meta"]["severity"] >= 1
               for r, it in zip(clear, items))
    uae = get_recipe("uae").requests(items)
    assert all(r["image"] is it.meta["clean_image"] and "text" not in r for r, it in zip(uae, items))
    gvu = get_recipe("gvu").requests(items)
    assert all(r["image"] is None and r["text"] == describe_item(it) == r["meta"]["description"]
               for r, it in zip(gvu, items))
    from tasks.items import PromptItem

    with pytest.raises(ValueError, match="no image"):
        get_recipe("uae").requests([PromptItem("t", None, "a prompt", None, "")])
    assert get_recipe("gvu").requests([PromptItem("t", None, "a red circle", None, "")])[0]["text"] == "a red circle"


def test_recipe_sft_examples():
    from recipes import get_recipe
    from recipes.clear import generates

    items = _shapes(6)
    clear = get_recipe("clear").sft_examples(items, 0.5)
    assert [e["generate"] for e in clear] == [generates(it, 0.5) for it in items]
    assert all(e["clean_image"] is it.meta["clean_image"] and e["answer"] == it.answer for e, it in zip(clear, items))
    assert not any(e["generate"] for e in get_recipe("clear").sft_examples(_shapes(4, degrade_prob=0.0)))
    gvu = get_recipe("gvu").sft_examples(items)
    assert [e["generate"] for e in gvu] == [False, True] * 3
    assert gvu[0]["image"] is not None and gvu[1]["image"] is None and gvu[1]["text"] == gvu[1]["answer"]
    uae = get_recipe("uae").sft_examples(items)  # GvU's halves with UAE's caption instruction
    assert [e["generate"] for e in uae] == [False, True] * 3
    assert uae[0]["text"] == CAPTION_INSTRUCTION and uae[0]["answer"] == gvu[0]["answer"]
    assert uae[1]["image"] is None and uae[1]["text"] == gvu[1]["text"] == uae[1]["answer"]
    bare = dataclasses.replace(get_recipe("uae"), sft=None)
    with pytest.raises(ValueError, match="no stage-1"):
        bare.sft_examples(items)


def test_recipe_architecture_limits():
    from recipes import get_recipe
    from services.config import load_config

    janus = load_config("configs/gvu_janus_tiny.yaml", [])
    assert get_recipe("gvu").problems(janus) == []
    fields = [p.field for p in get_recipe("clear").problems(janus.model_copy(update={
        "sft": janus.sft.model_copy(update={"enabled": True})}))]
    assert fields == ["recipe", "sft.enabled"]
    uae = load_config("configs/uae_tiny.yaml", [])
    assert uae.sft.enabled and get_recipe("uae").first_problem(uae) is None
    assert dataclasses.replace(get_recipe("uae"), sft=None).first_problem(uae).field == "sft.enabled"
    from services.config import ConfigError

    with pytest.raises(ConfigError) as info:  # the run config applies the recipe's limits
        load_config("configs/gvu_janus_tiny.yaml", ["sft.enabled=true"])
    assert info.value.field_path == "sft.enabled"
