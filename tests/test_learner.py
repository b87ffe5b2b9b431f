"""The DeepSpeed learner on CPU (a real Ray actor): one step trains both modalities under one advantage,
with the frozen reference policy's KL terms."""

import pytest
import ray
import torch

from learner.batch import collate
from learner.group import LearnerGroup
from policy.model import UnifiedPolicy
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout
from services.config import load_config


def _trajectories(cfg):
    policy = UnifiedPolicy.from_config(cfg.model).eval()
    with torch.no_grad():  # make the tiny model trigger generation often
        policy.lm.lm_head.weight[policy.token_ids["gen"]] += 1.0
    reqs = [{"prompt_id": f"p{i}", "text": "What colour is the shape? A) red B) green C) blue D) yellow",
             "image": (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy(), "meta": {}} for i in range(4)]
    trajs = rollout(policy, HFTextEngine(policy), reqs, RolloutSettings(group_size=4, max_new_tokens=12), 1,
                    torch.Generator().manual_seed(0))
    assert any(t.generated_image for t in trajs)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5] * 4)
    return collate(trajs, adv, policy.token_ids["pad"])


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_one_step_trains_lm_and_generator_with_reference_kl(local_ray, zero_stage):
    cfg = load_config(None, ["algorithm.beta_text=0.05", "algorithm.beta_img=0.05", f"learner.zero_stage={zero_stage}"])
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    try:
        group.call_all("snapshot_reference")
        before = group.call("weights_digest")
        m = group.train_step(_trajectories(cfg))
        after = group.call("weights_digest")
        for key in ("text/loss", "image/loss", "text/kl_ref", "image/kl_ref", "text/clipfrac", "image/clipfrac",
                    "text/entropy", "grad_norm"):
            assert key in m and m[key] == m[key], key  # present and not NaN
        assert 0 < m["grad_norm"] < float("inf")  # ZeRO 0: the learner clips and reports it; ZeRO 3: DeepSpeed
        changed = {k.split(".")[0] for k in before if abs(before[k] - after[k]) > 0}
        assert {"lm", "generator", "bridge", "connector"} <= changed
        handle = group.publish()
        assert handle.version == 1 and handle.total_bytes > 0
    finally:
        group.shutdown()


def test_stage_switch_fresh_optimizer_and_held_lm(local_ray):
    """``set_lr(lr, reset_state, lm_scale, generator_scale)`` at the SFT -> GRPO switch: the optimizer's
    moments are dropped; with ``lm_scale`` 0 (``learner.lm_lr_scale``) a GRPO step moves the generator side
    only, with ``generator_scale`` 0 (``learner.generator_lr_scale``) the understanding side only."""
    cfg = load_config(None)
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    n_state = lambda: ray.get(group.workers[0].__ray_call__.remote(lambda self: len(getattr(self.optimizer, "optimizer", self.optimizer).state)))  # noqa: E731
    try:
        batch = _trajectories(cfg)
        group.train_step(batch)
        assert n_state() > 0
        group.call_all("set_lr", 1e-3, True, 0.0)
        assert n_state() == 0
        before = group.call("weights_digest")
        group.train_step(batch)
        after = group.call("weights_digest")
        changed = {k.split(".")[0] for k in before if abs(before[k] - after[k]) > 0}
        assert changed == {"generator", "connector"}, changed
        group.call_all("set_lr", 1e-3, False, 1.0, 0.0)  # learner.generator_lr_scale 0: UAE's LM-only mode
        group.train_step(batch)
        held = group.call("weights_digest")
        changed = {k.split(".")[0] for k in after if abs(after[k] - held[k]) > 0}
        assert changed == {"lm", "bridge"}, changed
    finally:
        group.shutdown()


def test_one_rank_skips_the_identity_all_reduce(local_ray):
    """One rank at ZeRO 0: DeepSpeed's data-parallel gradient all-reduce (flatten, reduce, copy back) is
    turned off, and the step is the same as with it on (on one rank it is the identity)."""
    cfg = load_config(None)
    batch = _trajectories(cfg)
    groups = [LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed) for _ in range(2)]
    state = lambda g: ray.get(g.workers[0].__ray_call__.remote(  # noqa: E731
        lambda self: {k: v.detach().clone() for k, v in self.policy.trainable_state_dict().items()}))
    try:
        flags = [ray.get(g.workers[0].__ray_call__.remote(lambda self: self.engine.enable_backward_allreduce))
                 for g in groups]
        assert flags == [False, False]
        ray.get(groups[1].workers[0].__ray_call__.remote(
            lambda self: setattr(self.engine, "enable_backward_allreduce", True)))
        start = state(groups[0])
        for g in groups:
            g.train_step(batch)
        skipped, reduced = state(groups[0]), state(groups[1])
    finally:
        for g in groups:
            g.shutdown()
    assert any(not torch.equal(start[k], skipped[k]) for k in start)  # the step moved the weights
    for k in skipped:
        torch.testing.assert_close(skipped[k], reduced[k], rtol=0, atol=1e-7, msg=k)


def test_train_batch_select_and_to():
    """A mini-batch keeps its rows' slots and image segments (re-indexed); ``to`` moves every field."""
    from dataclasses import fields

    batch = _trajectories(load_config(None))
    rows = torch.tensor([3, 0])
    sub = batch.select(rows)
    assert torch.equal(sub.input_ids, batch.input_ids[[0, 3]]) and torch.equal(sub.advantages, batch.advantages[[0, 3]])
    assert sub.num_segments == int(torch.isin(batch.seg_rows, rows).sum())
    assert set(sub.seg_rows.tolist()) <= {0, 1} and sub.slot_latents.shape[0] == int(sub.slot_counts.sum())
    moved = batch.to("meta")
    assert all(getattr(moved, f.name).device.type == "meta" for f in fields(moved))


def test_stage_one_samples_with_the_rollouts_sde_steps(local_ray):
    """Stage 1's own generations use ``rollout.sde.steps`` (the SFT section has no steps of its own), and the
    learner rank reads its typed sections by attribute: a key the schema lacks would raise here."""
    from recipes import get_recipe
    from services.driver import task_dataset

    cfg = load_config(None, ["rollout.sde.steps=3", "rollout.sde.window=1", "task.train_size=8"])
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed, None, cfg.rollout.sde)
    try:
        assert group.call("__ray_call__", lambda self: self.sde_steps) == 3
        examples = get_recipe("clear").sft_examples(list(task_dataset(cfg, "train"))[:4], generate_prob=1.0)
        m = group.sft_step(examples)
        assert m["sft/text_ce"] > 0
    finally:
        group.shutdown()


def test_kl_reference_is_saved_and_restored(local_ray, tmp_path):
    """The KL reference goes into each checkpoint and comes back on load: after a resume the KL terms are
    taken against the stage-1 policy, not against the resumed weights."""
    cfg = load_config(None, ["algorithm.beta_text=0.05", "algorithm.beta_img=0.05"])
    batch = _trajectories(cfg)
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    try:
        group.call_all("snapshot_reference")
        reference = group.call("weights_digest")
        group.train_step(batch)
        trained = group.call("weights_digest")
        group.call_all("save", str(tmp_path / "ck"))
    finally:
        group.shutdown()
    assert trained != reference
    resumed = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    try:
        resumed.call_all("load", str(tmp_path / "ck"))
        got_reference = resumed.call("__ray_call__", lambda self: self.reference.weights_digest())
        got_trained = resumed.call("weights_digest")
    finally:
        resumed.shutdown()
    for want, got in ((reference, got_reference), (trained, got_trained)):
        assert want.keys() == got.keys() and all(abs(want[k] - got[k]) <= 1e-6 * (1 + abs(want[k])) for k in want)
