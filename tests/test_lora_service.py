"""LoRA on the real service: the DeepSpeed learner (Ray actor) trains adapters and heads only, keeps its KL
reference without a base copy, checkpoints and resumes exactly; ``unigrpo train`` (``services.driver.train``)
runs stage 1 and a GRPO step end to end with every sync reaching the workers verified."""

from __future__ import annotations

import pytest
import ray
import torch
from safetensors.torch import load_file
from service_helpers import FAST_VAE_FIT, metric, ray_down, record_syncs, run_config  # noqa: F401

from learner.batch import collate
from learner.group import LearnerGroup
from policy.factory import load_policy_dir
from policy.lora import ADAPTERS_FILE
from policy.model import UnifiedPolicy
from rollout.engine import HFTextEngine
from rollout.interleaved import RolloutSettings, rollout
from services import checkpoint
from services.cluster import policy_dir_of, publish_policy_dir, worker_pool
from services.config import load_config
from services.driver import train
from services.vae_fit import with_checkpoint_vae
from sync import WeightSyncMismatch, make_publisher, manifest

pytestmark = pytest.mark.usefixtures("ray_down")

LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8"]


def _batch(cfg):
    policy = UnifiedPolicy.from_config(cfg.model).eval()
    with torch.no_grad():  # make the tiny model trigger generation often
        head = policy.lm.lm_head
        getattr(head, "base_layer", head).weight[policy.token_ids["gen"]] += 1.0  # an adapted head wraps it
    reqs = [{"prompt_id": f"p{i}", "text": "What colour is the shape? A) red B) green C) blue D) yellow",
             "image": (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(i)) * 255).to(torch.uint8).numpy(),
             "meta": {}} for i in range(2)]
    trajs = rollout(policy, HFTextEngine(policy), reqs, RolloutSettings(group_size=4, max_new_tokens=10), 1,
                    torch.Generator().manual_seed(0))
    assert any(t.generated_image for t in trajs)
    return collate(trajs, torch.tensor([1.0, -1.0, 0.5, -0.5] * 2), policy.token_ids["pad"])


def _base_sum(group) -> float:
    return group.call("__ray_call__", lambda self: float(sum(
        p.double().sum() for n, p in self.policy.named_parameters() if not p.requires_grad)))


def test_lora_learner_trains_adapters_keeps_the_base_and_resumes_exactly(tmp_path):
    ray.init(num_cpus=2, include_dashboard=False)
    cfg = load_config(None, [*LORA, "model.lora.lm_target_modules=[q_proj,v_proj,lm_head]",
                             "algorithm.beta_text=0.05", "algorithm.beta_img=0.05"])
    batch = _batch(cfg)
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    try:
        group.call_all("snapshot_reference")
        assert group.call("__ray_call__", lambda self: self.reference.is_base)  # no stage 1: the base
        base, start = _base_sum(group), group.call("weights_digest")
        first = group.train_step(batch)
        second = group.train_step(batch)
        assert first["text/kl_ref"] == 0.0 and second["text/kl_ref"] > 0  # the reference stays where it was
        assert second["image/kl_ref"] > 0
        after = group.call("weights_digest")
        assert _base_sum(group) == base  # the base never moves
        changed = {k.split(".")[0] for k in start if start[k] != after[k]}
        assert changed == {"lm", "generator", "bridge", "connector"}, changed
        assert all(".lora_" in k for k in start if k.startswith(("lm.", "generator.")))
        handle = group.publish()
        assert handle.version == 1 and set(handle.names()) == set(start)
        assert len(handle.manifest) == 2 * 2 + 1 + 15  # q/v of 2 layers, lm_head, 15 generator projections
        group.call_all("save", str(tmp_path / "ck"))
        third = group.train_step(batch)
        want = group.call("weights_digest")
    finally:
        group.shutdown()
    ref = load_file(str(tmp_path / "ck" / "kl_reference.safetensors"))
    assert set(ref) == set(start)  # adapters and heads, no base copy
    assert set(load_file(str(tmp_path / "ck" / "policy" / ADAPTERS_FILE))) == {k for k in start if ".lora_" in k}
    resumed = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
    try:
        assert resumed.call_all("load", str(tmp_path / "ck")) == [1]
        assert resumed.call("__ray_call__", lambda self: self.reference.weights_digest()) == start
        again = resumed.train_step(batch)
        got = resumed.call("weights_digest")
    finally:
        resumed.shutdown()
    assert got == want and again["text/loss"] == third["text/loss"]


def test_lora_run_trains_through_unigrpo_train(tmp_path, monkeypatch):
    """Stage 1 trains the adapters (so the KL reference is the stage-1 policy, not the base) and one GRPO step
    trains them further: zero-variance groups are kept and LoRA dropout is on, so the KL term against the
    (eval-mode) reference has a gradient even where the tiny policy's rewards all agree. Then the checkpoint
    feeds an evaluation pool (``unigrpo eval``'s path), and a sync that withholds a module stops it."""
    monkeypatch.chdir(tmp_path)
    cfg = run_config(tmp_path, "lora", [*FAST_VAE_FIT, *LORA], "model.lora.dropout=0.1", "sft.steps=2",
                     "sft.batch_size=4", "task.train_size=16", "task.eval_size=2", "rollout.prompts_per_step=2",
                     "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.num_workers=1", "algorithm.steps=1",
                     "checkpoint.every=1", "algorithm.beta_text=0.05", "algorithm.zero_variance=zero",
                     "tracking.log_images_every=0")
    syncs = record_syncs(monkeypatch, lambda run: [run.pool.actor(w) for w in run.pool.health.schedulable()])
    summary = train(cfg)
    assert summary["steps"] == 1
    uri = cfg.tracking.resolved_uri()
    assert metric(uri, summary["run_id"], "learn/trained_samples")[0][1] == 4
    assert metric(uri, summary["run_id"], "text/kl_ref")
    assert [v for v, *_ in syncs] == [1, 2] and all(same and versions == [v] for v, versions, same, _ in syncs)
    first, last = syncs[0][3], syncs[-1][3]  # after stage 1, after the GRPO step
    assert set(first) == set(last) and all(".lora_" in k or k.startswith(("bridge.", "connector.")) for k in first)
    fresh = UnifiedPolicy.from_config(cfg.model.model_copy(update={"vae_path": None})).weights_digest()
    assert any(fresh[k] != first[k] for k in first if ".lora_B." in k)  # stage 1 trained the adapters
    assert any(first[k] != last[k] for k in first if ".lora_" in k)  # and the GRPO step did
    final = checkpoint.latest(tmp_path / "ckpt" / "lora")
    assert final is not None and (final / "policy" / ADAPTERS_FILE).is_file()
    assert not (final / "policy" / "lm").exists()
    policy = load_policy_dir(final / "policy")
    assert policy.lora is not None and policy.weights_digest() == last

    ray.init(num_cpus=2, include_dashboard=False)
    eval_cfg = with_checkpoint_vae(cfg, policy_dir_of(final))
    assert eval_cfg.model.vae_path == policy.cfg.vae_path is not None  # the fitted VAE the run trained with
    pool = worker_pool(eval_cfg, 1)
    try:
        pool.sync(publish_policy_dir(policy_dir_of(final)))
        assert pool.wait_ready(120)
        (wid,) = pool.health.schedulable()
        assert ray.get(pool.actor(wid).weights_digest.remote()) == last
        state, modules = policy.trainable_state_dict(), policy.adapted_modules()
        module = "lm.model.layers.0.self_attn.v_proj"
        send = {k: v for k, v in state.items() if k not in modules[module]}
        bad = make_publisher("object_store").publish(2, send.items(), manifest=manifest.build(send, modules))
        with pytest.raises(WeightSyncMismatch, match=module.replace(".", r"\.")):
            pool.sync(bad)
    finally:
        pool.shutdown()


def test_lora_learner_under_zero3_two_ranks_with_kl_equals_one_rank(tmp_path):
    """ZeRO 3 over two ranks with a KL term: DeepSpeed partitions the frozen base too, the reference pass
    gathers the adapters and heads to swap them, two steps move the adapters and heads only and take the
    same steps (gradient norms, weights) as one rank at ZeRO 0; the gathered publish is whole."""
    ray.init(num_cpus=2, include_dashboard=False)
    kl = [*LORA, "algorithm.beta_text=0.1", "algorithm.beta_img=0.1", "learner.num_cpus_per_worker=0.5"]
    runs = {}
    for name, sets in (("one", ["learner.zero_stage=0"]), ("zero3", ["learner.zero_stage=3", "learner.num_workers=2"])):
        cfg = load_config(None, [*kl, *sets])
        batch = _batch(cfg)
        group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed)
        try:
            group.call("snapshot_reference")
            start = group.call("weights_digest")
            steps = [group.train_step(batch) for _ in range(2)]
            runs[name] = (start, steps, group.call("weights_digest"))
            if name == "zero3":
                handle = group.publish()
                assert set(handle.names()) == set(start) and len(handle.manifest) == 29
        finally:
            group.shutdown()
    (start, steps, after), (_, steps3, after3) = runs["one"], runs["zero3"]
    assert {k.split(".")[0] for k in start if start[k] != after[k]} == {"lm", "generator", "bridge", "connector"}
    assert steps[1]["text/kl_ref"] > 0 and steps3[1]["text/kl_ref"] > 0  # the policy left its reference
    for m, m3 in zip(steps, steps3, strict=True):
        assert m3["grad_norm"] == pytest.approx(m["grad_norm"], rel=1e-4)
    assert after3 == pytest.approx(after, rel=1e-5, abs=1e-6)
