"""GvU on a Janus policy (``model.arch: janus``): the rollout's trajectories and the learner's recomputation
(in process), the run on the real service (local Ray, DeepSpeed learner on CPU, MLflow on a temporary SQLite
file, the tiny Janus of ``configs/gvu_janus_tiny.yaml`` saved as a Janus directory), and the config rules of the
architecture."""

from __future__ import annotations

import mlflow
import pytest
import torch
import yaml
from service_helpers import RECIPE_TINY, metric, ray_down, record_syncs, run_config  # noqa: F401 (ray_down: a fixture)

from learner.batch import collate
from learner.objective import policy_outputs
from policy.factory import build_policy, load_policy_dir
from policy.janus import JanusPolicy
from recipes import get_recipe
from reward.actor import with_policy_config
from reward.registry import RewardSet
from rollout.image import janus_gvu_rollout
from rollout.interleaved import RolloutSettings
from rollout.registry import get_rollout
from services import driver
from services.config import ConfigError, load_config
from tasks import build_dataset

CONFIG = "configs/gvu_janus_tiny.yaml"


def test_janus_gvu_trajectories_reward_and_learner_logprobs():
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    policy = build_policy(cfg.model)
    assert isinstance(policy, JanusPolicy) and policy.cfg == cfg.model
    assert get_rollout(get_recipe("gvu").rollout, "janus") is janus_gvu_rollout
    items = list(build_dataset("shapes_vqa", size=3, seed=0, split="train", degrade_prob=0.0))
    s = RolloutSettings(group_size=2, temperature=1.0)
    trajs = janus_gvu_rollout(policy, None, get_recipe("gvu").requests(items), s, 5, torch.Generator().manual_seed(0))
    n = policy.n_image_tokens
    assert [(t.prompt_id, t.group_index) for t in trajs] == [(i.prompt_id, g) for i in items for g in (0, 1)]
    for t in trajs:
        t.validate()
        codes = t.meta["generated_codes"]
        # the loss mask covers exactly the n sampled codes (after the prompt), as joint-space token ids
        assert t.loss_mask.tolist() == [False] * t.prompt_len + [True] * n and t.policy_version == 5
        assert torch.equal(t.input_ids[t.loss_mask], codes + policy.image_offset) and t.images == []
        assert t.input_ids[t.prompt_len - 1] == policy.token_ids["img_start"] and t.generated_image
        assert (t.behaviour_logp[t.loss_mask] < 0).all() and (t.behaviour_logp[~t.loss_mask] == 0).all()
    # the learner's recomputation (right-padded batch, one forward) matches the sampler's behaviour log-probs
    batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
    with torch.no_grad():
        out = policy_outputs(policy, batch, s.temperature, 0.7)
    assert out.img_logp is None and float((out.logp - batch.behaviour_logp)[batch.loss_mask].abs().max()) < 1e-5
    assert (out.entropy[batch.loss_mask] > 0).all()
    # the gvu reward reads the decoded image: same codes, same score; another image, another score
    rewards = RewardSet(with_policy_config([c.scorer_spec() for c in cfg.reward.components], cfg.model.model_dump()))
    scores, _ = rewards.combine(trajs)
    assert all(0 < r <= 1 for r in scores)
    again, _ = rewards.combine(trajs[:1])
    assert again[0] == pytest.approx(scores[0], rel=1e-6)
    other = dict(trajs[0].meta, generated_codes=(trajs[0].meta["generated_codes"] + 1) % policy.codebook_size)
    assert rewards.combine([other])[0][0] != pytest.approx(scores[0], rel=1e-6)
    greedy = [janus_gvu_rollout(policy, None, get_recipe("gvu").requests(items[:1]),
                                RolloutSettings(group_size=1, temperature=0.0), 5, None)[0] for _ in range(2)]
    assert torch.equal(greedy[0].meta["generated_codes"], greedy[1].meta["generated_codes"])  # no noise drawn


@pytest.mark.slow
@pytest.mark.usefixtures("ray_down")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_janus_gvu_trains_on_the_service(tmp_path, monkeypatch, lora):
    """GvU on a Janus directory as users have it (``model.janus_path``: the tiny Janus saved with its tokenizer
    and chat template), through the service: one learner, a rollout worker and the reward actor all load it.
    With ``model.lora``: adapters only train and travel (every sync verified per adapted module), and the
    checkpoint holds them, not a copy of the base."""
    janus_dir = tmp_path / "Janus-Pro-tiny"
    build_policy(load_config(CONFIG, []).model).save_pretrained(janus_dir)
    # the reward actor and every rollout worker
    seen = record_syncs(monkeypatch, lambda run: [run.reward.actor] + [m.actor for m in run.pool.members.values()])
    adapters = ["model.lora.enabled=true", "model.lora.rank=4"] if lora else []
    cfg = run_config(tmp_path, "gvu-janus-tiny", RECIPE_TINY, f"model.janus_path={janus_dir}", *adapters, config=CONFIG)
    assert cfg.model.arch == "janus" and not cfg.sft.enabled
    summary = driver.train(cfg)
    assert summary["steps"] == 2
    # the initial publish (v1) and one per step: the reward actor AND every rollout worker hold the learner's weights
    assert [(v, vs) for v, vs, *_ in seen] == [(1, [1, 1]), (2, [2, 2]), (3, [3, 3])]
    assert all(same for _, _, same, _ in seen) and seen[0][3] != seen[-1][3]  # ... and they changed
    uri, rid = cfg.tracking.resolved_uri(), summary["run_id"]
    gvu = metric(uri, rid, "reward/gvu/mean")
    assert [s for s, _ in gvu] == [1, 2] and all(0 < v <= 1 for _, v in gvu)
    gap = metric(uri, rid, "learn/logp_gap_text")
    assert [s for s, _ in gap] == [1, 2] and all(v < 1e-4 for _, v in gap), gap
    assert metric(uri, rid, "text/loss") and not metric(uri, rid, "image/loss")  # codes train as tokens, no flow loss
    assert all(v == 1.0 for _, v in metric(uri, rid, "rollout/trigger_rate"))
    assert metric(uri, rid, "eval/heldout/reward/gvu") and not metric(uri, rid, "sft/text_ce")
    arts = mlflow.tracking.MlflowClient(uri).list_artifacts(rid, "samples")
    assert any(a.path.endswith(".png") for a in arts)
    # the step-2 checkpoint is a Janus directory (LoRA: the adapters) that loads back with the learner's weights
    policy_dir = tmp_path / "ckpt" / cfg.run_name / "step-000002" / "policy"
    saved = load_policy_dir(policy_dir)
    assert isinstance(saved, JanusPolicy) and saved.weights_digest() == pytest.approx(seen[-1][3], rel=1e-6)
    assert (saved.lora is not None) == lora == (not (policy_dir / "model.safetensors").exists())
    if lora:
        assert set(seen[-1][3]) == set(saved.trainable_state_dict()) and all(".lora_" in k for k in seen[-1][3])


@pytest.mark.parametrize("overrides, field", [
    (["recipe=clear"], "recipe"),
    (["recipe=uae"], "recipe"),
    (["sft.enabled=true"], "sft.enabled"),
    (["rollout.engine=vllm", "rollout.num_gpus_per_worker=1"], "rollout.engine"),
    (["rollout.top_p=0.9"], "rollout.top_p"),
    (["model.lm_path=/models/x"], "model.lm_path"),
    (["model.janus_tiny={bogus: {}}"], "model.janus_tiny"),
    (["model.arch=unified"], "model.janus_tiny"),  # janus-only fields under the unified architecture
])
def test_janus_config_rejects_what_it_cannot_run(overrides, field):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIG, ["model.janus_tiny={text: {hidden_size: 64}}", *overrides])
    assert info.value.field_path == field


def test_janus_tiny_sub_config_keys_are_checked_when_built():
    with pytest.raises(ValueError, match="model.janus_tiny.vq"):
        build_policy({"arch": "janus", "janus_tiny": {"vq": {"bogus": 1}}})


def test_janus_configs_validate_and_cli_exit_codes(capsys):
    from services.cli import main

    assert main(["check-config", "--config", "configs/gvu_janus.yaml"]) == 0  # no weights on this machine
    real = yaml.safe_load(capsys.readouterr().out)
    assert real["model"]["arch"] == "janus" and real["model"]["janus_path"] == "/models/Janus-Pro-7B"
    with pytest.raises(SystemExit) as info:
        main(["check-config", "--config", CONFIG, "--set", "sft.enabled=true"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("config error: sft.enabled: ") and err.count("\n") == 1
