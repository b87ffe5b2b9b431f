"""reward/: answer parsing, format, image similarity, combination, and the Ray reward actor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reward.answer import answer_reward, extract_answer, parse_choice, parse_number
from reward.format import format_reward
from reward.registry import REWARDS, RewardSet, RewardSpec, RewardStats, combine, count_nan, register_reward

CHOICES = ["cat", "dog", "a red car", "blue sky"]
MC = {"answer": "B", "choices": CHOICES}


# ------------------------------------------------------------------------------------------ answer
@pytest.mark.parametrize(
    "text, meta, expected",
    [
        # multiple choice: the right letter in many spellings
        ("<answer>B</answer>", MC, 1.0),
        ("<answer>(B)</answer>", MC, 1.0),
        ("<answer>B)</answer>", MC, 1.0),
        ("<answer>b</answer>", MC, 1.0),
        ("<answer> B. </answer>", MC, 1.0),
        ("<answer>(B) dog</answer>", MC, 1.0),
        ("<answer>Option B</answer>", MC, 1.0),
        ("<answer>dog</answer>", MC, 1.0),
        ("<answer>Dog.</answer>", MC, 1.0),
        ("<answer>red car</answer>", {"answer": "C", "choices": CHOICES}, 1.0),  # article dropped
        ("<answer>A</answer>", {"answer": "cat", "choices": CHOICES}, 1.0),  # gold given as choice text
        ("<answer>D</answer>", {"answer": 3, "choices": CHOICES}, 1.0),  # gold given as an index
        ("think <answer>A</answer> wait <answer>B</answer>", MC, 1.0),  # the last answer counts
        ("I think... \nAnswer: B", MC, 1.0),  # fallback line
        # wrong / missing
        ("<answer>C</answer>", MC, 0.0),
        ("<answer>cat</answer>", MC, 0.0),
        ("<answer>E</answer>", MC, 0.0),  # not a choice
        ("<answer></answer>", MC, 0.0),
        ("the answer is obviously B", MC, 0.0),  # no tag, no "Answer:" line
        ("", MC, 0.0),
        ("<answer>B", MC, 0.0),  # unclosed
        # numbers with tolerance
        ("<answer>42</answer>", {"answer": "42"}, 1.0),
        ("<answer>42.0</answer>", {"answer": 42}, 1.0),
        ("<answer>0.75</answer>", {"answer": "3/4"}, 1.0),
        ("<answer>3/4</answer>", {"answer": "0.75"}, 1.0),
        ("<answer>-1 1/2</answer>", {"answer": "-1.5"}, 1.0),
        ("<answer>1,000</answer>", {"answer": "1000"}, 1.0),
        ("<answer>$12.50</answer>", {"answer": "12.5"}, 1.0),
        ("<answer>3.14159</answer>", {"answer": "3.1416"}, 1.0),  # within rel_tol 1e-4
        ("<answer>3.14</answer>", {"answer": "3.1416"}, 0.0),
        ("<answer>3.14</answer>", {"answer": "3.1416", "rel_tol": 1e-2}, 1.0),
        ("<answer>x = 7</answer>", {"answer": "7"}, 1.0),  # last number in the answer
        ("<answer>1/0</answer>", {"answer": "0"}, 0.0),
        ("<answer>8</answer>", {"answer": "7"}, 0.0),
        # normalised text
        ("<answer>The Eiffel Tower!</answer>", {"answer": "eiffel tower"}, 1.0),
        ("<answer>  an   apple </answer>", {"answer": "Apple"}, 1.0),
        ("<answer>pear</answer>", {"answer": ["apple", "pear"]}, 1.0),
        ("<answer>banana</answer>", {"answer": "apple"}, 0.0),
        ("<answer>42</answer>", {"answer": "42", "answer_type": "text"}, 1.0),
    ],
)
def test_answer_table(text: str, meta: dict, expected: float) -> None:
    assert answer_reward(text, meta) == expected


@pytest.mark.parametrize(
    "payload",
    [
        "__import__('os').system('touch /tmp/unigrpo_pwned')",
        "eval('1+1')",
        "exec(\"import os\")",
        "(lambda: __import__('subprocess'))()",
        "2**10**10",
    ],
)
def test_malicious_answers_are_just_wrong(payload: str, tmp_path) -> None:
    for meta in (MC, {"answer": "1024"}, {"answer": "2"}, {"answer": "os"}):
        assert answer_reward(f"<answer>{payload}</answer>", meta) == 0.0
        assert answer_reward(f"Answer: {payload}", meta) == 0.0
    assert not (tmp_path / "unigrpo_pwned").exists()


def test_answer_helpers() -> None:
    assert extract_answer("x <answer> 5 </answer>") == "5"
    assert extract_answer("no answer here") is None
    assert parse_number("3/4") == 0.75
    assert parse_number("1e3") == 1000.0
    assert parse_number("abc") is None
    assert parse_number("9" * 500) is None  # too long: rejected, not parsed
    assert parse_choice("(c)", CHOICES) == "C"
    assert parse_choice("a dog", CHOICES) == "B"  # the choice text, not the letter A
    assert parse_choice("blue sky", CHOICES) == "D"
    assert parse_choice("Z", CHOICES) is None


def test_answer_without_gold_raises() -> None:
    with pytest.raises(KeyError):
        answer_reward("<answer>B</answer>", {})


# ------------------------------------------------------------------------------------------ format
@pytest.mark.parametrize(
    "text, expected",
    [
        ("reasoning here <answer>B</answer>", 1.0),
        ("<answer>B</answer>\n", 1.0),
        ("thinking <answer>42</answer><|endoftext|>", 1.0),
        ("<answer>B</answer> and more text", 0.0),
        ("<answer>A</answer> <answer>B</answer>", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer>   </answer>", 0.0),
        ("</answer>B<answer>", 0.0),
        ("<answer>B", 0.0),
        ("Answer: B", 0.0),
        ("", 0.0),
    ],
)
def test_format(text: str, expected: float) -> None:
    assert format_reward(text, {}) == expected


# ------------------------------------------------------------------------------------------ similarity
@pytest.fixture(scope="module")
def sim():
    from reward.clip_similarity import ImageSimilarity

    return ImageSimilarity([{"kind": "clip", "weight": 3.0}, {"kind": "dinov2", "weight": 1.0}], tiny=True)


def test_identical_images_similarity_one(sim) -> None:
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 56)
    total, per = sim.similarity(x, x.clone())
    assert total.shape == (3,)
    assert torch.allclose(total, torch.ones(3), atol=1e-4)
    for v in per.values():
        assert torch.allclose(v, torch.ones(3), atol=1e-4)


def test_unrelated_images_lower(sim) -> None:
    torch.manual_seed(1)
    noise = torch.rand(4, 3, 32, 32)
    const = torch.full((4, 3, 32, 32), 0.5)
    same, _ = sim.similarity(noise, noise)
    diff, per = sim.similarity(noise, const)
    assert (diff < same - 1e-3).all()
    for v in per.values():
        assert (v < 1 - 1e-3).all()


def test_backbones_weighted_average(sim) -> None:
    torch.manual_seed(2)
    a, b = torch.rand(5, 3, 32, 32), torch.rand(5, 3, 32, 32)
    total, per = sim.similarity(a, b)
    assert set(per) == {"clip", "dinov2"}
    assert not torch.allclose(per["clip"], per["dinov2"])
    assert torch.allclose(total, 0.75 * per["clip"] + 0.25 * per["dinov2"], atol=1e-6)
    # row-wise: a one-row call agrees with the batched one
    t1, _ = sim.similarity(a[2:3], b[2:3])
    assert torch.allclose(t1, total[2:3], atol=1e-5)


def test_similarity_accepts_uint8_and_lists(sim) -> None:
    torch.manual_seed(3)
    x = torch.rand(2, 3, 32, 32)
    u8 = (x * 255).round().to(torch.uint8)
    hwc = [u8[i].permute(1, 2, 0).numpy() for i in range(2)]
    total, _ = sim.similarity(hwc, [u8[0], u8[1]])
    assert torch.allclose(total, torch.ones(2), atol=1e-4)


def test_tiny_full_clip_model_uses_get_image_features() -> None:
    from reward.clip_similarity import ImageSimilarity

    s = ImageSimilarity([{"kind": "clip", "tiny_class": "CLIPModel"}], tiny=True)
    assert s.backbones[0].kind == "clip_full"
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(s(x, x), torch.ones(2), atol=1e-4)


def test_backbone_from_local_path(tmp_path) -> None:
    """A saved checkpoint + preprocessor_config.json loads offline and matches the in-memory model."""
    import json

    from reward.clip_similarity import load_backbone

    bb = load_backbone({"kind": "dinov2"}, tiny=True, seed=5)
    bb.model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 40},
         "crop_size": {"height": 32, "width": 32}}))
    loaded = load_backbone({"kind": "auto", "path": str(tmp_path)})
    assert loaded.kind == "dinov2" and loaded.crop_size == 32 and loaded.resize_size == 40
    px = torch.rand(2, 3, 32, 32)
    assert torch.allclose(bb.embed(px), loaded.embed(px), atol=1e-5)


# ------------------------------------------------------------------------------------------ combine
class _T:
    def __init__(self, text: str, meta: dict) -> None:
        self.response_text, self.meta = text, meta


def test_combine_weights_and_components() -> None:
    trajs = [_T("<answer>B</answer>", MC), _T("<answer>C</answer>", MC), _T("B", MC)]
    specs = [RewardSpec("answer", 1.0), RewardSpec("format", 0.5)]
    totals, comps = combine(trajs, specs)
    assert comps == {"answer": [1.0, 0.0, 0.0], "format": [1.0, 1.0, 0.0]}
    assert totals == [1.5, 0.5, 0.0]


def test_nan_component_makes_total_nan_and_is_counted() -> None:
    def flaky(trajectories, ctx):
        out = []
        for t in trajectories:
            if t.meta.get("boom"):
                raise RuntimeError("scorer crashed")
            out.append(math.nan if t.meta.get("nan") else (math.inf if t.meta.get("inf") else 0.25))
        return out

    register_reward("test_flaky", flaky, overwrite=True)
    try:
        trajs = [_T("<answer>B</answer>", MC), _T("<answer>B</answer>", {**MC, "nan": True}),
                 _T("<answer>B</answer>", {**MC, "boom": True}), _T("<answer>B</answer>", {**MC, "inf": True})]
        stats = RewardStats()
        rs = RewardSet([{"name": "answer"}, {"name": "test_flaky", "weight": 2.0}])
        totals, comps = combine(trajs, rs, stats=stats)
        assert totals[0] == 1.5
        assert all(math.isnan(t) for t in totals[1:])
        assert comps["answer"] == [1.0, 1.0, 1.0, 1.0]  # the healthy component survives
        assert math.isnan(comps["test_flaky"][2])
        assert count_nan(totals) == 3
        assert stats.n_nan_total == 3 and stats.failed == {"test_flaky": 1}
        assert stats.nonfinite == {"test_flaky": 2}
        assert rs.stats.as_dict()["n_failed"] == 1
        assert "scorer crashed" in stats.last_errors[0]
        # a log-only (weight 0) component never invalidates the total
        totals0, _ = combine(trajs, [{"name": "answer"}, {"name": "test_flaky", "weight": 0.0}])
        assert totals0 == [1.0, 1.0, 1.0, 1.0]
    finally:
        REWARDS.pop("test_flaky", None)


def test_missing_gold_is_nan_not_zero() -> None:
    totals, comps = combine([_T("<answer>B</answer>", {}), _T("<answer>B</answer>", MC)], [{"name": "answer"}])
    assert math.isnan(totals[0]) and totals[1] == 1.0


def test_spec_validation() -> None:
    with pytest.raises(KeyError):
        RewardSet([{"name": "no_such_reward"}])
    with pytest.raises(ValueError):
        RewardSpec.from_dict({"name": "answer", "wieght": 1.0})
    with pytest.raises(ValueError):
        RewardSet([{"name": "answer"}, {"name": "answer"}])
    RewardSet([{"name": "answer"}, {"name": "answer", "label": "answer_strict", "kwargs": {"rel_tol": 0}}])


def test_clip_similarity_reward_from_meta() -> None:
    torch.manual_seed(4)
    img = torch.rand(3, 32, 32)
    u8 = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    trajs = [
        _T("a caption", {"source_image": img, "reconstruction": img.clone()}),
        _T("a caption", {"source_image": u8, "reconstruction": torch.full((3, 48, 48), 0.5)}),
        _T("a caption", {"source_image": img}),  # no reconstruction -> NaN
    ]
    spec = {"name": "clip_similarity", "kwargs": {"tiny": True,
                                                  "backbones": [{"kind": "clip"}, {"kind": "dinov2"}]}}
    totals, comps = combine(trajs, [spec])
    assert abs(totals[0] - 1.0) < 1e-4
    assert totals[1] < totals[0] - 1e-3
    assert math.isnan(totals[2])
    assert set(comps) == {"clip_similarity", "clip_similarity/clip", "clip_similarity/dinov2"}


# ------------------------------------------------------------------------------------------ Ray actor
@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _traj(i: int, text: str, meta: dict):
    from policy.trajectory import Trajectory

    t = 6
    return Trajectory(prompt_id=f"p{i // 2}", group_index=i % 2, input_ids=torch.arange(t), prompt_len=3,
                      loss_mask=torch.tensor([False] * 3 + [True] * 3), behaviour_logp=torch.zeros(t),
                      slot_latents=torch.zeros(1, 4, 4, 4), response_text=text, meta=meta)


def test_reward_actor_end_to_end(ray_local) -> None:
    from reward.actor import make_reward_actor

    ray = ray_local
    img = torch.rand(3, 32, 32)
    specs = [
        {"name": "answer", "weight": 1.0},
        {"name": "format", "weight": 0.2},
        {"name": "clip_similarity", "weight": 1.0, "kwargs": {"tiny": True, "backbones": [{"kind": "clip"}]}},
    ]
    actor = make_reward_actor(specs, num_cpus=1)
    trajs = [
        _traj(0, "<answer>B</answer>", {**MC, "source_image": img, "reconstruction": img}),
        _traj(1, "hmm <answer>C</answer>", {**MC, "source_image": img, "reconstruction": img}),
        _traj(2, "Answer: B", {**MC, "source_image": img, "reconstruction": img}),
        _traj(3, "<answer>B</answer>", {**MC}),  # no images -> clip_similarity NaN -> total NaN
    ]
    scored = ray.get(actor.score.remote(trajs), timeout=60)
    assert [t.prompt_id for t in scored] == ["p0", "p0", "p1", "p1"]
    assert scored[0].reward == pytest.approx(2.2, abs=1e-4)
    assert scored[1].reward == pytest.approx(1.2, abs=1e-4)
    assert scored[2].reward == pytest.approx(2.0, abs=1e-4)
    assert math.isnan(scored[3].reward)
    assert scored[0].reward_components["answer"] == 1.0
    assert scored[1].reward_components == pytest.approx({"answer": 0.0, "format": 1.0, "clip_similarity": 1.0},
                                                        abs=1e-4)
    # the driver's path sends only what rewards read (services.reward_backend.ActorReward): the same numbers
    from services.reward_backend import ActorReward

    totals, comps = ActorReward(actor).score_values(trajs)
    assert totals[:3] == pytest.approx([t.reward for t in scored[:3]], abs=1e-6) and math.isnan(totals[3])
    assert comps["answer"] == [t.reward_components["answer"] for t in scored]
    ray.get(actor.reset_stats.remote(), timeout=30)
    ray.get(actor.score.remote(trajs), timeout=60)
    stats = ray.get(actor.stats.remote(), timeout=30)
    assert stats["n_scored"] == 4 and stats["n_nan_total"] == 1
    assert stats["nonfinite"] == {"clip_similarity": 1}
    ray.kill(actor)


def test_reward_view_keeps_what_rewards_read() -> None:
    from policy.trajectory import ImageSegment
    from reward.registry import reward_view

    t = _traj(0, "<answer>B</answer>", {**MC})
    final = torch.randn(4, 4, 4)
    w = torch.zeros(2, 4, 4, 4)
    t.images = [ImageSegment(3, w, w, torch.zeros(2), torch.zeros(2), torch.zeros(2), final)]
    view = reward_view(t)
    assert set(view) == {"response_text", "meta"} and view["response_text"] == t.response_text
    assert view["meta"]["generated_latent"] is final and "generated_latent" not in t.meta  # not mutated
    assert view["meta"]["answer"] == MC["answer"]
    assert reward_view(view) is view  # dicts are already views
    assert combine([view], [{"name": "answer"}])[0] == combine([t], [{"name": "answer"}])[0] == [1.0]


def test_trajectory_pickles_tensors_as_numpy_and_back() -> None:
    """policy.trajectory: trajectories cross Ray with numpy-backed tensor fields; what comes back has the
    same values and dtypes, writable tensors, and ``meta`` untouched."""
    import pickle

    from policy.trajectory import ImageSegment

    t = _traj(0, "<answer>B</answer>", {**MC, "clean_image": np.zeros((2, 2, 3), np.uint8)})
    w = torch.randn(2, 4, 4, 4)
    t.images = [ImageSegment(3, w, w + 1, torch.ones(2), torch.zeros(2), torch.randn(2), torch.randn(4, 4, 4))]
    t.behaviour_logp = t.behaviour_logp.to(torch.bfloat16)  # numpy has no bfloat16: stays a tensor
    state = t.__getstate__()
    assert isinstance(state["input_ids"], np.ndarray) and isinstance(state["behaviour_logp"], torch.Tensor)
    back = pickle.loads(pickle.dumps(t))
    for name in ("input_ids", "loss_mask", "behaviour_logp", "slot_latents"):
        a, b = getattr(t, name), getattr(back, name)
        assert isinstance(b, torch.Tensor) and b.dtype == a.dtype and torch.equal(a, b), name
    seg, seg_back = t.images[0], back.images[0]
    assert seg_back.cond_end == 3 and torch.equal(seg_back.next_latents, seg.next_latents)
    assert isinstance(back.meta["clean_image"], np.ndarray) and back.meta["answer"] == "B"
    back.input_ids += 1  # writable
    read_only = t.__getstate__()
    read_only["input_ids"].setflags(write=False)  # as Ray returns arrays from its object store
    other = type(t).__new__(type(t))
    other.__setstate__(read_only)
    other.input_ids[0] = 7
    assert int(t.input_ids[0]) == 0  # copied, not aliased
