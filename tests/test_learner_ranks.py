"""W learner ranks take the step one rank takes: the shard plan (whole groups, the same optimizer steps on
every rank, zero-weight padding where a share lacks rows or images), the globally normalised losses
(the mean over ranks of their gradients is one rank's gradient), and real DeepSpeed ranks over gloo."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from learner.batch import collate
from learner.objective import GRPOSettings, grpo_loss, policy_outputs, sft_loss
from learner.sft import sft_shard
from learner.sharding import balance, padding_donors, shard_batch, split_evenly
from policy.config import PolicyConfig
from policy.model import UnifiedPolicy
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout

GROUPS = {"g0": (4, True), "g1": (3, False), "g2": (2, False)}  # rows, whether the group generated images


@pytest.fixture(scope="module")
def policy() -> UnifiedPolicy:
    return UnifiedPolicy.from_config(PolicyConfig(seed=0))


@pytest.fixture(scope="module")
def batch(policy):
    """Three groups of uneven size; only the first holds generated images."""
    sampler = copy.deepcopy(policy).eval()
    with torch.no_grad():  # make the tiny model trigger generation often
        sampler.lm.lm_head.weight[sampler.token_ids["gen"]] += 1.0
    reqs = [{"prompt_id": f"p{i}", "text": "What colour is the shape? A) red B) green C) blue D) yellow",
             "image": (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy(),
             "meta": {}} for i in range(6)]
    trajs = rollout(sampler, HFTextEngine(sampler), reqs, RolloutSettings(group_size=4, max_new_tokens=12), 1,
                    torch.Generator().manual_seed(0))
    with_img = [t for t in trajs if t.generated_image]
    without = [t for t in trajs if not t.generated_image]
    assert len(with_img) >= 2 and len(without) >= 5
    picked = []
    for name, (n, gen) in GROUPS.items():
        pool = with_img if gen else without
        take = (pool[:1] + without[-(n - 1):]) if gen else [pool.pop(0) for _ in range(n)]
        picked += [dataclasses.replace(t, prompt_id=name) for t in take]
    adv = torch.linspace(-1.0, 1.0, len(picked))
    return collate(picked, adv, policy.token_ids["pad"])


# ----------------------------------------------------------------------------- the plan


def test_split_and_balance():
    assert split_evenly(list(range(5)), 3) == [[0, 1], [2, 3], [4]]
    assert split_evenly([1], 3) == [[1], [], []]
    assert balance([4, 3, 2], 2) == [[0], [1, 2]]
    assert balance([1, 1, 1, 1, 1], 2) == [[0, 2, 4], [1, 3]]
    assert padding_donors([5, 6, 7], [[6], [6, 7]], []) == [6]  # one row holding both missing features
    assert padding_donors([5, 6, 7], [[6], [7]], [5]) == [6, 7]
    assert padding_donors([5, 6, 7], [[], []], []) == [5]  # an empty share still gets a row
    assert padding_donors([5, 6, 7], [[6]], [6, 7]) == []


@pytest.mark.parametrize("world,mini_batches", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 3)])
def test_shards_are_whole_groups_with_equal_steps(batch, world, mini_batches):
    shards = shard_batch(batch, mini_batches, world)
    m = min(mini_batches, len(GROUPS))
    assert len(shards) == world and {len(s.minibatches) for s in shards} == {m}
    for i in range(m):
        parts = [s.minibatches[i] for s in shards]
        real = [p.row_group[p.row_weight > 0].tolist() for p in parts]
        # every trajectory of the mini-batch is on exactly one rank, groups unsplit
        flat = sorted(g for r in real for g in r)
        assert flat == sorted(g for g in batch.row_group.tolist() if g in set(flat))
        assert all(set(a).isdisjoint(b) for j, a in enumerate(real) for b in real[j + 1:])
        counts = {s.counts[i] for s in shards}
        assert len(counts) == 1 and next(iter(counts)).sequences == len(flat)
        # every rank runs the generator where any rank does (a zero-weight image at worst)
        if any(p.num_segments for p in parts):
            assert all(p.num_segments > 0 for p in parts)
        assert all(p.num_rows > 0 for p in parts)
        for p in parts:
            assert torch.equal(p.seg_weight, p.row_weight[p.seg_rows])
    total_real = sum(int(p.row_weight.sum()) for s in shards for p in s.minibatches)
    assert total_real == batch.num_rows


# ----------------------------------------------------------------------------- the math


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _perturbed(policy, scale=0.01):
    other = copy.deepcopy(policy)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other.eval()


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("world,mini_batches", [(2, 1), (3, 2)])
def test_mean_of_rank_gradients_is_one_ranks_gradient(policy, batch, agg, world, mini_batches):
    """DeepSpeed steps on the mean over ranks of their gradients: with the global denominators and the
    W factor that mean equals one rank's gradient on the whole mini-batch, KL terms and padding included."""
    s = GRPOSettings(agg=agg, beta_text=0.05, beta_img=0.05, clip_low=0.1, clip_high=0.1, clip_img=1e-3)
    old_policy, ref_policy = _perturbed(policy, 0.02), _perturbed(policy, 0.05)
    policy.train()

    def rank_loss(mb, counts, w):
        with torch.no_grad():
            old = policy_outputs(old_policy, mb, 1.0, 0.7)
            ref = policy_outputs(ref_policy, mb, 1.0, 0.7)
        return grpo_loss(policy_outputs(policy, mb, 1.0, 0.7), old, mb, s, ref, counts, w)[0]

    one = shard_batch(batch, mini_batches, 1)[0]
    many = shard_batch(batch, mini_batches, world)
    for i, (mb, counts) in enumerate(zip(one.minibatches, one.counts)):
        loss1 = rank_loss(mb, counts, 1)
        g1 = _grads(policy, loss1)
        losses, grads = [], []
        for sh in many:
            loss_r = rank_loss(sh.minibatches[i], sh.counts[i], world)
            losses.append(loss_r.item())
            grads.append(_grads(policy, loss_r))
        assert sum(losses) / world == pytest.approx(loss1.item(), abs=1e-6)
        trained = {"lm", "generator", "bridge", "connector"} if mb.num_segments else {"lm", "bridge"}
        assert {n.split(".")[0] for n in g1} >= trained
        for n, g in g1.items():
            mean = sum(gr[n] if n in gr else torch.zeros_like(g) for gr in grads) / world
            torch.testing.assert_close(mean, g, rtol=1e-4, atol=1e-6, msg=n)


def test_stage_one_ranks_share_the_global_batch(policy):
    """Stage 1: the same noise whatever the world size (drawn for the whole batch), each example on one
    rank, and the mean of the ranks' gradients is one rank's."""
    g = torch.Generator().manual_seed(3)
    img = lambda: (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()  # noqa: E731
    examples = [{"text": "What colour? A) red B) green", "image": img(), "clean_image": img(), "answer": "A",
                 "generate": i in (0, 1)} for i in range(5)]
    policy.train()

    def loss(rank, world):
        shard = sft_shard(policy, examples, 3, torch.Generator().manual_seed(7), rank, world)
        return shard, sft_loss(policy, shard, 1.0, 1.0, world)[0]

    shard1, loss1 = loss(0, 1)
    g1 = _grads(policy, loss1)
    for world in (2, 3):
        parts = [loss(r, world) for r in range(world)]
        assert all(sh.batch.num_segments > 0 for sh, _ in parts)  # every rank runs the generator
        assert sum(int(sh.batch.row_weight.sum()) for sh, _ in parts) == len(examples)
        assert sum(lo.item() for _, lo in parts) / world == pytest.approx(loss1.item(), abs=1e-6)
        grads = [_grads(policy, lo) for _, lo in parts]
        for n, gr in g1.items():
            torch.testing.assert_close(sum(x[n] for x in grads) / world, gr, rtol=1e-4, atol=1e-6, msg=n)


def test_clean_slot_prob_teaches_the_reader_on_the_clean_latent(policy):
    """sft.clean_slot_prob: 1 puts the clean latent in every generate-then-answer slot, 0 the own generation;
    the flow-matching targets and noise are the same either way."""
    g = torch.Generator().manual_seed(5)
    img = lambda: (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()  # noqa: E731
    examples = [{"text": "What colour? A) red B) green", "image": img(), "clean_image": img(), "answer": "A",
                 "generate": i < 3} for i in range(4)]
    shard = lambda p, s=1.0: sft_shard(policy, examples, 3, torch.Generator().manual_seed(7), strength=s,  # noqa: E731
                                       clean_slot_prob=p)
    own, taught = shard(0.0), shard(1.0)
    clean = policy.encode_image(torch.as_tensor(np.stack([e["clean_image"] for e in examples[:3]])
                                                ).permute(0, 3, 1, 2).float() / 255)
    for b in (own.batch, taught.batch):
        assert torch.allclose(b.seg_final, clean, atol=1e-5)  # the flow targets: the clean latents
    assert torch.equal(own.flow_noise, taught.flow_noise) and torch.equal(own.flow_times, taught.flow_times)
    slots = lambda b: torch.stack([b.slot_latents[i] for i in range(len(b.slot_latents)) if i % 2])  # noqa: E731
    assert torch.allclose(slots(taught.batch), clean, atol=1e-5)
    assert not torch.allclose(slots(own.batch), clean, atol=1e-2)
    restored = shard(0.0, 0.5)  # a restoration start: the paths start from the input latents
    assert restored.strength == 0.5 and restored.flow_sources.shape == clean.shape


# ----------------------------------------------------------------------------- DeepSpeed ranks over gloo


def _stepped(cfg, batch, examples):
    from learner.group import LearnerGroup

    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed, None,
                         cfg.rollout.sde.model_copy(update={"steps": 3}))
    try:
        sft = group.sft_step(examples)
        m = group.train_step(batch)
        state = group.call("trainable_state")
    finally:
        group.shutdown()
    return sft, m, state


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_w_ranks_equal_one_rank(local_ray, batch, zero_stage):
    """One stage-1 step and one GRPO step (2 mini-batches, uneven groups, ranks without images or rows)
    at W = 1, 2, 3: the same losses and the same weights after the steps."""
    from services.config import load_config

    g = torch.Generator().manual_seed(3)
    img = lambda: (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()  # noqa: E731
    examples = [{"text": "What colour? A) red B) green", "image": img(), "clean_image": img(), "answer": "A",
                 "generate": i in (0, 1)} for i in range(5)]
    results = {}
    for world in (1, 2, 3):
        cfg = load_config(None, [f"learner.num_workers={world}", f"learner.zero_stage={zero_stage}",
                                 "learner.num_cpus_per_worker=1", "learner.mini_batches=2",
                                 "rollout.prompts_per_step=3", "algorithm.beta_text=0.02"])
        results[world] = _stepped(cfg, batch, examples)
    sft1, m1, state1 = results[1]
    for world in (2, 3):
        sft, m, state = results[world]
        assert sft["sft/loss"] == pytest.approx(sft1["sft/loss"], abs=1e-5)
        assert m["loss"] == pytest.approx(m1["loss"], abs=1e-5)
        assert m["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        for k, v in state1.items():
            torch.testing.assert_close(state[k], v, rtol=0, atol=1e-5, msg=f"W={world} {k}")
