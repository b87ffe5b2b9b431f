"""UAE and GvU on the real service (local Ray, DeepSpeed on CPU, MLflow on a temporary SQLite file), and the
reconstruction benchmark. Runs are tiny: 2 GRPO steps each (GvU after 2 SFT steps)."""

from __future__ import annotations

import json
import math

import mlflow
import numpy as np
import pytest
import ray
from PIL import Image
from service_helpers import RECIPE_TINY as TINY
from service_helpers import metric, record_syncs

from recipes import get_recipe
from services import driver
from services.config import load_config
from services.evaluate import run_eval
from tasks import build_dataset
from tasks.describe import describe_shapes

pytestmark = pytest.mark.slow

LM_ONLY = ["learner.generator_lr_scale=0", "algorithm.lambda_img=0"]  # stage 1 trains the generator, stage 2 holds it


def _cfg(tmp_path, recipe: str, *extra: str):
    return load_config(f"configs/{recipe}_tiny.yaml",
                       [*TINY, f"checkpoint.dir={tmp_path}/ckpt", f"tracking.uri=sqlite:///{tmp_path}/{recipe}.db",
                        *extra])


@pytest.fixture(scope="module", autouse=True)
def _one_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()




def test_requests_per_recipe():
    items = list(build_dataset("shapes_vqa", size=6, seed=0, split="train", degrade_prob=1.0))
    clear, uae, gvu = (get_recipe(r).requests(items) for r in ("clear", "uae", "gvu"))
    assert all("Answer" in r["text"] and r["image"] is items[i].image for i, r in enumerate(clear))
    for it, r in zip(items, uae):  # the clean image, no question
        assert r["image"] is it.meta["clean_image"] and "text" not in r
    for it, r in zip(items, gvu):  # a description of the image, no image
        assert r["image"] is None and r["text"] == describe_shapes(it.meta["objects"], 32)
        assert it.meta["objects"][0]["color"] in r["text"] and it.meta["objects"][0]["kind"] in r["text"]
    assert describe_shapes([{"kind": "circle", "color": "red", "cx": 6, "cy": 16, "r": 4}], 32) == \
        "a red circle on the left"
    with pytest.raises(ValueError, match="recipe"):
        get_recipe("nope").requests(items)


@pytest.fixture(scope="module")
def uae_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uae")
    cfg = _cfg(tmp, "uae", *LM_ONLY)  # LM only: the stage-1 generator held (the config's default is joint)
    return cfg, driver.train(cfg), tmp


def test_uae_lm_only_trains_on_the_service(uae_run):
    cfg, summary, _ = uae_run
    assert cfg.learner.generator_lr_scale == 0 and cfg.algorithm.lambda_img == 0 and cfg.sft.enabled
    uri, rid = cfg.tracking.resolved_uri(), summary["run_id"]
    assert summary["steps"] == 2
    rewards = metric(uri, rid, "reward/clip_similarity/mean")
    assert [s for s, _ in rewards] == [1, 2] and all(-1 <= v <= 1 for _, v in rewards)
    assert metric(uri, rid, "reward/total/mean") and metric(uri, rid, "text/loss")
    assert not metric(uri, rid, "eval/clean/accuracy")  # no CLEAR accuracy eval for UAE
    assert metric(uri, rid, "eval/heldout/reward/clip_similarity")
    assert metric(uri, rid, "sft/text_ce") and metric(uri, rid, "sft/flow_mse")  # stage 1: both halves
    (fit,) = metric(uri, rid, "clip_fit/cross_cosine")  # the scorer fitted to the task's images first
    assert fit[1] < metric(uri, rid, "clip_fit/cross_cosine_random_init")[0][1]


def test_reconstruction_benchmark_writes_json_png_and_mlflow(uae_run, tmp_path):
    cfg, _, tmp = uae_run
    ckpt = next((tmp / "ckpt" / cfg.run_name).glob("step-*"))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):  # different sizes: centre-cropped and resized to model.image_size
        Image.fromarray(rng.integers(0, 256, (40 + 8 * k, 48, 3), dtype=np.uint8)).save(imgs / f"{k}.png")
    # two backbones: per-backbone scores and their weighted mean
    two = load_config("configs/uae_tiny.yaml", [
        *TINY, f"tracking.uri=sqlite:///{tmp_path}/eval.db",
        "reward.components.0.kwargs.backbones=[{kind: clip, weight: 1.0}, {kind: dinov2, weight: 1.0}]"])
    out = tmp_path / "out"
    assert run_eval(two, checkpoint=str(ckpt), benchmark="reconstruction", out_dir=str(out), images=str(imgs)) == 0
    res = json.loads((out / "reconstruction.json").read_text())
    assert res["n_images"] == 3 and set(res["per_backbone"]) == {"clip", "dinov2"}
    assert all(-1 <= v <= 1 for v in res["per_backbone"].values())
    assert res["unified_score"] == pytest.approx(np.mean(list(res["per_backbone"].values())), abs=1e-5)
    assert len(res["per_image"]) == 3 and all(-1 <= r["score"] <= 1 for r in res["per_image"])
    assert (out / "reconstruction.png").stat().st_size > 1000 and (out / "samples.png").exists()
    c = mlflow.tracking.MlflowClient(two.tracking.resolved_uri())
    run = _last_run(c)
    assert math.isclose(run.data.metrics["eval/reconstruction/unified_score"], res["unified_score"], abs_tol=1e-6)
    assert {a.path for a in c.list_artifacts(run.info.run_id, "eval")} >= {"eval/reconstruction.json",
                                                                           "eval/reconstruction.png"}
    with pytest.raises(SystemExit, match="clip_similarity"):  # backbones come from the config
        run_eval(load_config("configs/gvu_tiny.yaml", TINY), checkpoint=str(ckpt), benchmark="reconstruction",
                 out_dir=str(out))


def _last_run(client):
    exp = client.get_experiment_by_name("unigrpo")
    return client.search_runs(exp.experiment_id, order_by=["start_time DESC"])[0]


def test_gvu_trains_and_reward_actor_follows_the_learner(tmp_path, monkeypatch):
    seen = record_syncs(monkeypatch, lambda run: [run.reward.actor])
    cfg = _cfg(tmp_path, "gvu", "checkpoint.every=0")
    summary = driver.train(cfg)
    assert summary["steps"] == 2
    # the initial publish (v1) and one per step; the reward's policy holds the learner's weights each time
    assert [(v, vs) for v, vs, *_ in seen] == [(1, [1]), (2, [2]), (3, [3])] and all(s for _, _, s, _ in seen)
    uri, rid = cfg.tracking.resolved_uri(), summary["run_id"]
    gvu = metric(uri, rid, "reward/gvu/mean")
    assert [s for s, _ in gvu] == [1, 2] and all(0 < v <= 1 for _, v in gvu)
    assert metric(uri, rid, "sft/text_ce") and metric(uri, rid, "image/loss")
    assert metric(uri, rid, "eval/heldout/reward/gvu") and not metric(uri, rid, "eval/clean/accuracy")
    paired = summary["comparison"]  # stage 2 vs stage 1 on the same held-out prompts, paired per prompt
    assert paired["compare/heldout/reward/n"] == cfg.task.eval_size and 0 < paired["compare/heldout/reward/bootstrap_p"] <= 1
    assert paired["compare/heldout/reward/diff"] == pytest.approx(
        paired["compare/heldout/reward/mean_after"] - paired["compare/heldout/reward/mean_before"], abs=1e-9)
    assert summary["final"]["eval/heldout/reward"] == pytest.approx(paired["compare/heldout/reward/mean_after"])
