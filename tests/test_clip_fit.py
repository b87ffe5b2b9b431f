"""The fitted tiny CLIP scorer (``services.clip_fit``): its loss, what the fit reaches on held-out images, the
cache, the config it prepares, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from reward.clip_similarity import ImageSimilarity, load_backbone
from services import clip_fit
from services.config import ConfigError, load_config


def test_contrastive_loss_is_clips_loss_when_every_description_differs():
    """P = I when no two rows share a description: the loss is CLIP's symmetric cross-entropy; a shared
    description spreads a row's target over both."""
    g = torch.Generator().manual_seed(0)
    img, txt, scale = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.tensor(2.0)
    logits = scale.exp() * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(6)) + F.cross_entropy(logits.T, torch.arange(6)))
    distinct = clip_fit._same([f"d{k}" for k in range(6)])
    torch.testing.assert_close(clip_fit.contrastive_loss(img, txt, distinct, scale), clip)
    shared = clip_fit._same(["a", "a", "b", "c", "d", "e"])
    assert shared[0, 1] and shared[1, 0] and int(shared.sum()) == 8
    assert not torch.isclose(clip_fit.contrastive_loss(img, txt, shared, scale), clip)


def test_words_bind_colour_to_shape():
    w = clip_fit.words("two shapes: a red circle on the left and a blue square at the top")
    assert "red circle" in w and "blue square" in w and "shapes" in w and "shapes:" not in w


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clip")
    cfg = load_config("configs/uae_tiny.yaml", ["task.train_size=400", "task.eval_size=100",
                                                 f"checkpoint.dir={tmp}/ckpt"])
    return cfg, clip_fit.prepare(cfg, progress=False)


def test_the_fitted_tower_separates_held_out_images(prepared, capsys):
    """On 100 held-out images after a fit on 400: two images with different descriptions are far apart where
    the random-init tower has them within ~0.99; the description is retrieved well above chance; the reward
    built from the prepared config scores an image against itself 1 and against another far lower."""
    cfg, ready = prepared
    final = clip_fit.fitted_dir(cfg)
    record = json.loads((final / "fit.json").read_text())
    assert record["random_init"]["cross_cosine"] > 0.9
    assert record["cross_cosine"] < 0.3 and record["same_description_cosine"] > record["cross_cosine"] + 0.4
    distinct = len(set(clip_fit._pairs(cfg, "eval", 100)[1]))
    assert record["retrieval_top1"] > 5.0 / distinct  # chance is 1 / distinct
    spec = ready.reward.components[0].kwargs["backbones"][0]
    assert spec == {"weight": 1.0, "kind": "clip", "path": str(final), "tiny": False}
    assert cfg.reward.components[0].kwargs["backbones"][0]["fit"] is True  # the input config is not changed
    sim = ImageSimilarity(ready.reward.components[0].kwargs["backbones"])
    images, descs = clip_fit._pairs(cfg, "eval", 100)
    other = next(k for k, d in enumerate(descs) if d != descs[0])
    total, _ = sim.similarity(images[[0, 0]], images[[0, other]])
    assert total[0] == pytest.approx(1.0, abs=1e-5) and total[1] < 0.5
    # the cache: a second prepare loads the same tower without fitting again
    mtime = (final / "model.safetensors").stat().st_mtime_ns
    again = clip_fit.prepare(cfg, progress=False)
    assert "cached" in capsys.readouterr().out and again.reward == ready.reward
    assert (final / "model.safetensors").stat().st_mtime_ns == mtime


def test_an_unprepared_fit_spec_and_a_task_without_descriptions_are_refused(tmp_path):
    with pytest.raises(ValueError, match="prepare"):
        load_backbone({"kind": "clip", "fit": True})
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(ConfigError) as info:
        load_config("configs/uae_tiny.yaml", ["task.name=jsonl", f"task.path={rows}"])
    assert info.value.field_path == "reward.components[0].kwargs.backbones[0].fit"
    with pytest.raises(ConfigError) as info:  # only clip_similarity reads backbones
        load_config(None, ["reward.components=[{name: answer, kwargs: {backbones: [{fit: true}]}}]"])
    assert info.value.field_path == "reward.components[0].kwargs.backbones[0].fit"
    assert clip_fit.prepare(load_config(None, [])) == load_config(None, [])  # nothing to fit: unchanged
