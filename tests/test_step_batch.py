"""One step's batch (``services.step_batch``): the denoising steps' own advantage from an ``applies_to: denoising``
reward (``latent_quality``: the restoration against the clean image's latent), its contract through collate and
the loss, and the CLEAR rollout's reference latents. CPU, no Ray."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from learner.batch import collate
from learner.objective import GRPOSettings, grpo_loss, policy_outputs
from policy.model import UnifiedPolicy
from policy.prompting import mask_unsampleable
from policy.trajectory import ImageSegment, Trajectory
from recipes.clear import clear_request
from reward.registry import RewardSet
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout
from services.config import ConfigError, load_config
from services.step_batch import assemble
from tasks import build_dataset

LQ = ["reward.components=[{name: answer}, {name: latent_quality, weight: 0.5, applies_to: denoising}]"]


def _traj(pid: str, k: int, generated: bool) -> Trajectory:
    t = 6
    seg = ImageSegment(cond_end=3, latents=torch.zeros(2, 4, 4, 4), next_latents=torch.zeros(2, 4, 4, 4),
                       sigmas=torch.ones(2), sigma_nexts=torch.ones(2), log_probs=torch.zeros(2),
                       final_latent=torch.zeros(4, 4, 4))
    return Trajectory(prompt_id=pid, group_index=k, input_ids=torch.arange(t), prompt_len=3,
                      loss_mask=torch.tensor([False] * 3 + [True] * 3), behaviour_logp=torch.zeros(t),
                      slot_latents=torch.zeros(1, 4, 4, 4), images=[seg] if generated else [])


def _normalised(x: list[float]) -> torch.Tensor:
    v = torch.tensor(x)
    return (v - v.mean()) / (v.std() + 1e-6)


def test_a_denoising_reward_adds_its_own_group_advantage_to_the_denoising_steps_only() -> None:
    cfg = load_config(None, LQ)
    trajs = [_traj("a", k, generated=k < 3) for k in range(4)]
    totals, quality = [1.0, 0.0, 1.0, 0.0], [-0.1, -0.4, -0.2, 0.0]  # the last did not generate: not in g'
    step = assemble(trajs, totals, {"answer": totals, "latent_quality": quality}, cfg, 0)
    a = _normalised(totals)
    assert torch.allclose(step.advantages, a)
    expected = a.clone()
    expected[:3] += 0.5 * _normalised(quality[:3])
    assert torch.allclose(step.image_advantages, expected)
    batch = step.collate(pad_id=0)
    assert torch.allclose(batch.seg_advantages, expected[:3]) and torch.equal(batch.seg_rows, torch.arange(3))
    sub = batch.select(torch.tensor([2, 3]))  # a mini-batch keeps each segment's own advantage
    assert torch.allclose(sub.seg_advantages, expected[2:3]) and torch.allclose(sub.advantages, a[2:])
    # without the denoising reward (or at lambda_img 0) the denoising steps take the row's advantage
    for c in (load_config(None, []), load_config(None, [*LQ, "algorithm.lambda_img=0"])):
        plain = assemble(trajs, totals, {"answer": totals, "latent_quality": quality}, c, 0)
        assert plain.image_advantages is None and torch.allclose(plain.collate(0).seg_advantages, a[:3])


def test_a_group_equal_in_answer_reward_trains_only_its_denoising_steps() -> None:
    trajs = [_traj("same", k, generated=True) for k in range(4)] + [_traj("flat", k, generated=True) for k in range(4)]
    totals = [1.0] * 8
    comps = {"answer": totals, "latent_quality": [-0.1, -0.3, -0.2, -0.4] + [-0.2] * 4}
    step = assemble(trajs, totals, comps, load_config(None, LQ), 0)
    assert len(step.kept) == 4 and {t.prompt_id for t in step.kept} == {"same"}  # "flat": no signal at all
    assert all(not t.loss_mask.any() for t in step.kept)  # no text token enters the loss
    assert all(t.loss_mask.sum() == 3 for t in trajs)  # the scored trajectories are left as they were
    assert torch.equal(step.advantages, torch.zeros(4))
    assert torch.allclose(step.image_advantages, 0.5 * _normalised(comps["latent_quality"][:4]))
    assert step.metrics["rollout/zero_variance_groups"] == 2 and step.metrics["rollout/denoising_only_groups"] == 1
    # at lambda_img 0 the denoising reward is only logged: both groups are dropped, as without it
    off = assemble(trajs, totals, comps, load_config(None, [*LQ, "algorithm.lambda_img=0"]), 0)
    assert off.kept == [] and off.metrics["reward/latent_quality/mean"] == pytest.approx(-0.225)


def test_denoising_components_stay_out_of_the_total_and_bad_targets_name_the_field() -> None:
    cfg = load_config(None, LQ)
    specs = [c.scorer_spec() for c in cfg.reward.components]
    assert specs[1] == {"name": "latent_quality", "weight": 0.0, "kwargs": {}}
    z, ref = torch.ones(4, 4, 4), torch.zeros(4, 4, 4)
    views = [{"response_text": "Answer: A", "meta": {"answer": "A", "choices": ["red", "blue"], "generated_latent": z,
                                                        "reference_latent": ref}},
             {"response_text": "Answer: B", "meta": {"answer": "A", "choices": ["red", "blue"]}}]
    totals, comps = RewardSet(specs).combine(views)
    assert totals == [1.0, 0.0] and comps["latent_quality"] == [-1.0, 0.0]
    with pytest.raises(ConfigError, match=r"reward\.components\.1\.applies_to|reward\.components\[1\]\.applies_to"):
        load_config(None, ["reward.components=[{name: answer}, {name: latent_quality, applies_to: text}]"])
    for name in ("latent_quality", "answer_likelihood"):  # only the CLEAR rollout records what they score
        with pytest.raises(ConfigError, match=r"reward\.components\[1\]\.name.*needs recipe clear") as e:
            load_config("configs/gvu_tiny.yaml", [f"reward.components=[{{name: gvu}}, {{name: {name}}}]"])
        assert e.value.field_path == "reward.components[1].name"


def test_the_loss_gives_the_denoising_steps_their_own_advantage() -> None:
    cfg = load_config(None, [])
    policy = UnifiedPolicy.from_config(cfg.model).eval()
    data = build_dataset("shapes_vqa", size=2, seed=0, split="eval", image_size=32, degrade_prob=1.0)
    items = [data[k] for k in range(2)]
    trajs = rollout(policy, HFTextEngine(policy), [clear_request(i) for i in items],
                    RolloutSettings(group_size=2, max_new_tokens=8, generation="force"), 1,
                    torch.Generator().manual_seed(0))
    base = torch.tensor([1.0, -1.0, 0.5, -0.5])
    s = GRPOSettings()
    losses = {}
    for name, img in (("same", None), ("own", torch.tensor([-1.0, 1.0, 2.0, 0.0]))):
        step_batch = collate(trajs, base, 0, img)
        out = policy_outputs(policy, step_batch, 1.0, s.noise_level)
        old = policy_outputs(policy, step_batch, 1.0, s.noise_level)
        _, losses[name] = grpo_loss(out, old, step_batch, s)
    assert losses["same"]["text/loss"] == pytest.approx(losses["own"]["text/loss"])
    assert losses["same"]["image/loss"] != pytest.approx(losses["own"]["image/loss"])


def test_the_clear_rollout_attaches_the_clean_images_latent_to_what_generated() -> None:
    cfg = load_config(None, [])
    policy = UnifiedPolicy.from_config(cfg.model).eval()
    data = build_dataset("shapes_vqa", size=3, seed=0, split="eval", image_size=32, degrade_prob=1.0)
    items = [data[k] for k in range(3)]
    reqs = [clear_request(i) for i in items]
    reqs[2]["meta"]["reference_image"] = None  # an item without a clean image
    settings = RolloutSettings(group_size=2, max_new_tokens=8, generation="force", reference_latents=True)
    trajs = rollout(policy, HFTextEngine(policy), reqs, settings, 1, torch.Generator().manual_seed(0))
    clean = torch.stack([torch.tensor(np.asarray(i.meta["clean_image"])).permute(2, 0, 1) for i in items[:2]])
    with torch.no_grad():
        expected = policy.encode_image(clean.float() / 255.0)
    for t in trajs[:4]:
        assert torch.allclose(t.meta["reference_latent"], expected[int(t.prompt_id != items[0].prompt_id)], atol=1e-6)
    assert all("reference_latent" not in t.meta for t in trajs[4:])
    assert all("reference_image" not in t.meta for t in trajs)  # the rollout reads it; trajectories do not carry it
    for off in (replace(settings, generation="forbid"), replace(settings, reference_latents=False)):
        again = rollout(policy, HFTextEngine(policy), reqs[:1], off, 1, torch.Generator().manual_seed(0))
        assert all("reference_latent" not in t.meta for t in again)
    from services.cluster import rollout_settings

    with_reward = load_config(None, LQ)
    assert rollout_settings(with_reward).reference_latents and not rollout_settings(cfg).reference_latents


def test_the_rollout_records_the_gold_answers_log_prob_after_each_generated_image() -> None:
    cfg = load_config(None, [])
    policy = UnifiedPolicy.from_config(cfg.model).eval()
    data = build_dataset("shapes_vqa", size=2, seed=0, split="eval", image_size=32, degrade_prob=1.0)
    reqs = [clear_request(data[k]) for k in range(2)]
    reqs[1]["meta"]["answer"] = None  # no gold answer: nothing recorded
    settings = RolloutSettings(group_size=2, max_new_tokens=8, generation="force", gold_answer_logprob=True)
    trajs = rollout(policy, HFTextEngine(policy), reqs, settings, 1, torch.Generator().manual_seed(0))
    ids = policy.token_ids
    for t in trajs[:2]:  # teacher-force the gold answer right after the generated image's slot, one row alone
        context = t.input_ids[: int(torch.nonzero(t.input_ids == ids["img_end"]).max()) + 1].tolist()
        gold = [ids["answer_start"], *policy.tokenizer.encode(t.meta["answer"], add_special_tokens=False),
                ids["answer_end"]]
        x = torch.tensor([context + gold])
        with torch.no_grad():
            logits, _ = policy.lm_forward(x, torch.ones_like(x), t.slot_latents)
        logp = torch.log_softmax(mask_unsampleable(logits.float(), ids), -1)[0]
        expected = sum(float(logp[len(context) - 1 + k, g]) for k, g in enumerate(gold))
        assert t.meta["answer_logprob"] == pytest.approx(expected, abs=1e-4)
    assert all("answer_logprob" not in t.meta for t in trajs[2:])
    values = RewardSet([{"name": "answer_likelihood", "weight": 1.0}]).combine(trajs)[1]["answer_likelihood"]
    assert values[:2] == [t.meta["answer_logprob"] for t in trajs[:2]] and values[2:] == [0.0, 0.0]
    # the run config turns the recording on with the reward; evaluation modes leave it off
    from services.cluster import rollout_settings
    from services.evaluate import mode_overrides

    with_reward = load_config(None, ["reward.components=[{name: answer}, {name: answer_likelihood, "
                                     "applies_to: denoising}]"])
    assert rollout_settings(with_reward).gold_answer_logprob and not rollout_settings(cfg).gold_answer_logprob
    assert not any(mode_overrides("greedy", with_reward)[k] for k in ("gold_answer_logprob", "reference_latents"))
