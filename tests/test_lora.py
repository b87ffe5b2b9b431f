"""LoRA (``model.lora``, ``policy.lora``) without Ray: what trains, weight sync through the real collective
path (gloo, learner side and a real ``RolloutWorker`` in one process) with the per-module manifest, a sync
that withholds a module, the policy directory and its merged export, the KL reference, config errors and the
memory estimate."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from diffusers import SD3Transformer2DModel
from transformers import AutoModelForCausalLM

from learner.reference import LoraReference
from policy.config import PolicyConfig
from policy.estimate import MemorySettings, estimate_memory, model_parts
from policy.factory import load_policy_dir
from policy.lora import ADAPTERS_FILE, merged, merged_weights, plain_state_dict
from policy.model import UnifiedPolicy
from rollout.interleaved import RolloutSettings
from rollout.worker import RolloutWorker
from services.cli import main
from sync import NcclPublisher, WeightSyncError, WeightSyncMismatch, free_port, manifest

LORA = {"enabled": True, "rank": 4, "alpha": 8.0}


def _policy(lora: bool = True, **kw) -> UnifiedPolicy:
    return UnifiedPolicy.from_config(PolicyConfig(**({"lora": LORA} if lora else {}), **kw))


def _trained(policy: UnifiedPolicy, seed: int = 1) -> UnifiedPolicy:
    """Move every trainable tensor (what a few learner steps do), lora_B included (else adapters are no-ops)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in policy.trainable_state_dict().values():
            t.add_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * 0.05)
    return policy


def _inputs():
    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def _velocity(policy, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c, s = policy.latent_shape[0], policy.latent_shape[1]
    x = torch.randn(2, c, s, s, generator=g)
    enc = torch.randn(2, 5, policy.generator.config.joint_attention_dim, generator=g)
    pooled = torch.randn(2, policy.generator.config.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return policy.velocity(x, torch.tensor([0.7, 0.3]), enc, pooled)


def _outputs(policy):
    with torch.no_grad():
        return policy.token_logprobs(*_inputs())[0], _velocity(policy)


def _close(a, b, tol=1e-5) -> bool:
    return all(torch.allclose(x, y, atol=tol, rtol=tol) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------------ what trains
def test_only_adapters_and_heads_train_and_a_fresh_adapter_is_the_base():
    p = _policy()
    state = p.trainable_state_dict()
    assert {k.split(".")[0] for k in state} == {"lm", "generator", "bridge", "connector"}
    assert all(".lora_" in k for k in state if k.startswith(("lm.", "generator.")))
    assert {n for n, q in p.named_parameters() if q.requires_grad} == set(state)
    modules = p.adapted_modules()
    # tiny Qwen2: 2 layers x 7 projections; tiny SD3: 2 blocks x 8 attention projections, no to_add_out in the last
    assert len([m for m in modules if m.startswith("lm.")]) == 14
    assert len([m for m in modules if m.startswith("generator.")]) == 15
    assert all(len(names) == 2 for names in modules.values())  # lora_A, lora_B
    assert sum(v.numel() for v in state.values()) < 0.1 * sum(q.numel() for q in p.parameters())
    assert _close(_outputs(p), _outputs(_policy(lora=False)), 0.0)  # lora_B = 0: exactly the base


def test_frozen_generator_gets_no_adapter():
    p = _policy(freeze_generator=True)
    assert not [m for m in p.adapted_modules() if m.startswith("generator.")]
    assert not [k for k in p.trainable_state_dict() if k.startswith("generator.")]


@pytest.mark.parametrize("train_tower", [False, True])
def test_vlm_vision_tower_gets_adapters_only_when_trained(tmp_path, train_tower):
    """A Qwen2.5-VL ``lm_path``: the text layers are adapted; the vision tower (its ``qkv`` / ``proj`` linears
    matched by the targets too) only with ``model.train_vision_tower``, and its base stays frozen either way."""
    from vlm_dirs import save_qwen25_vl

    vl = save_qwen25_vl(tmp_path / "Qwen2.5-VL-tiny")
    lora = {**LORA, "lm_target_modules": ["q_proj", "qkv"] if train_tower else ["q_proj"]}
    p = UnifiedPolicy.from_config(PolicyConfig(lm_path=str(vl), cond_tokens=8, train_vision_tower=train_tower,
                                               lora=lora))
    lm = [m for m in p.adapted_modules() if m.startswith("lm.")]
    tower = [m for m in lm if m.startswith("lm.model.visual.")]
    assert len(lm) - len(tower) == p.lm_config.num_hidden_layers  # one q_proj per text layer
    assert bool(tower) == train_tower
    assert not [n for n, q in p.named_parameters() if q.requires_grad and ".lora_" not in n
                and not n.startswith(("bridge.", "connector."))]
    if not train_tower:  # the tower's linears are not candidates: 'qkv' matches nothing there
        with pytest.raises(ValueError, match="model.lora.lm_target_modules: 'qkv' matches no linear layer"):
            UnifiedPolicy.from_config(PolicyConfig(lm_path=str(vl), cond_tokens=8, lora={**LORA,
                                                   "lm_target_modules": ["qkv"]}))


# ----------------------------------------------------------------------------------------- weight sync
def _gloo_sync(learner: UnifiedPolicy, cfg: PolicyConfig, send, digests, version: int = 1, worker=None):
    """Learner rank 0 (a gloo NcclPublisher) -> one real RolloutWorker (``sync_backend: nccl`` on the CPU), or
    the given holder (a RewardActor), in one process; returns (the holder, the handle, the error its update
    raised or None)."""
    worker = worker or RolloutWorker(0, cfg, RolloutSettings(), sync_backend="nccl")
    pub, port = NcclPublisher(dist_backend="gloo"), free_port()
    join = threading.Thread(target=worker.join_sync_group, args=("127.0.0.1", port, 2, 1, "lora", 60.0))
    join.start()
    pub.init_group("127.0.0.1", port, 2, 0, "lora", 60.0)
    join.join()
    handle = pub.publish(version, send.items(), manifest=digests)
    error: list[BaseException | None] = [None]

    def receive():
        try:
            worker.update_weights(handle, 30.0)
        except WeightSyncError as e:
            error[0] = e

    t = threading.Thread(target=receive)
    t.start()
    pub.wait(30.0)
    t.join(60)
    pub.close()
    for r in getattr(worker, "_receivers", {"": getattr(worker, "receiver", None)}).values():
        r.close()
    return worker, handle, error[0]


@pytest.mark.parametrize("lora", [False, True])
def test_sync_full_and_lora_reaches_the_worker_verified(lora):
    learner = _trained(_policy(lora))
    state = learner.trainable_state_dict()
    digests = manifest.build(state, learner.adapted_modules())
    worker, handle, error = _gloo_sync(learner, learner.cfg, state, digests)
    assert error is None and worker.version() == 1
    assert worker.weights_digest() == learner.weights_digest()
    assert _close(_outputs(worker.policy), _outputs(learner), 0.0)
    if lora:  # only adapters and heads travel, every adapted module in the manifest
        assert set(handle.manifest) == set(learner.adapted_modules()) and len(handle.manifest) == 29
        assert all(d.count == 2 for d in handle.manifest.values())
        full = sum(v.numel() * v.element_size() for v in _policy(lora=False).trainable_state_dict().values())
        assert handle.total_bytes < 0.25 * full
    else:
        assert handle.manifest == {}


@pytest.mark.parametrize("how", ["dropped", "unlisted", "altered"])
def test_lora_sync_with_one_module_withheld_fails_loudly(how):
    """``dropped``: a module's tensors are not sent (the manifest of what was sent says 0 of 2); ``unlisted``:
    neither sent nor in the manifest; ``altered``: sent, but not what the manifest was computed on."""
    learner = _trained(_policy())
    state, modules = learner.trainable_state_dict(), learner.adapted_modules()
    module = "generator.transformer_blocks.1.attn.add_k_proj"
    send = {k: v for k, v in state.items() if k not in modules[module]}
    if how == "dropped":
        digests = manifest.build(send, modules)
    elif how == "unlisted":
        digests = manifest.build(send, {m: n for m, n in modules.items() if m != module})
    else:
        digests, send = manifest.build(state, modules), {k: v.clone() for k, v in state.items()}
        send[modules[module][1]] += 1e-3
    worker, _, error = _gloo_sync(learner, learner.cfg, send, digests)
    assert isinstance(error, WeightSyncMismatch), error
    msg = str(error)
    assert module in msg and "version 1" in msg and "failed verification for 1 module(s)" in msg
    assert {"dropped": "0/2 tensors arrived", "unlisted": "not in the manifest", "altered": "checksum"}[how] in msg
    assert worker.version() == -1  # the worker did not take the version


def test_gvu_reward_policy_follows_a_lora_sync_verified():
    """The reward actor's own LoRA policy (GvU scores with it): a whole sync is taken, a withheld module fails."""
    from reward.actor import RewardActor

    learner = _trained(_policy())
    spec = {"name": "gvu", "weight": 1.0, "kwargs": {"policy_config": learner.cfg.model_dump(mode="json")}}
    state, modules = learner.trainable_state_dict(), learner.adapted_modules()
    actor, _, error = _gloo_sync(learner, learner.cfg, state, manifest.build(state, modules), worker=RewardActor([spec]))
    assert error is None and actor.version() == 1 and actor.weights_digest() == learner.weights_digest()
    module = "lm.model.layers.1.mlp.down_proj"
    send = {k: v for k, v in state.items() if k not in modules[module]}
    actor, _, error = _gloo_sync(learner, learner.cfg, send, manifest.build(send, modules), version=2, worker=actor)
    assert isinstance(error, WeightSyncError) and module in str(error) and actor.version() == 1


def test_lora_sync_without_a_manifest_fails_on_a_lora_worker():
    """A publisher that ships the adapters but no manifest (built without ``model.lora``): nothing verifies."""
    learner = _trained(_policy())
    _, _, error = _gloo_sync(learner, learner.cfg, learner.trainable_state_dict(), {})
    assert isinstance(error, WeightSyncError) and "failed verification for 29 module(s)" in str(error)
    assert "not in the manifest (2/2 tensors arrived)" in str(error)


# ----------------------------------------------------------------------------- policy dir and export
def test_policy_dir_holds_adapters_and_heads_only_and_reloads(tmp_path):
    p = _trained(_policy())
    p.save_pretrained(tmp_path / "pol")
    files = {f.name for f in (tmp_path / "pol").iterdir()}
    assert {ADAPTERS_FILE, "heads.safetensors", "config.json", "tokenizer"} <= files
    assert not {"lm", "generator", "vae"} & files  # the base is the model section's, loaded once per replica
    q = load_policy_dir(tmp_path / "pol")
    assert q.lora is not None
    assert all(torch.equal(v, q.trainable_state_dict()[k]) for k, v in p.trainable_state_dict().items())
    assert _close(_outputs(q), _outputs(p), 0.0)


def test_export_merges_into_plain_transformers_and_diffusers_dirs(tmp_path, capsys):
    p = _trained(_policy())
    p.save_pretrained(tmp_path / "pol")
    assert main(["export", "--checkpoint", str(tmp_path / "pol"), "--out", str(tmp_path / "merged")]) == 0
    assert "adapters merged" in capsys.readouterr().out
    out = tmp_path / "merged"
    assert json.loads((out / "config.json").read_text())["policy"]["lora"]["enabled"] is False
    lm = AutoModelForCausalLM.from_pretrained(out / "lm", local_files_only=True).eval()
    ids, mask = _inputs()
    with torch.no_grad():
        assert torch.allclose(lm(input_ids=ids, attention_mask=mask).logits, p.lm(input_ids=ids, attention_mask=mask).logits,
                              atol=1e-5)
    gen = SD3Transformer2DModel.from_pretrained(out / "generator", local_files_only=True)
    assert not any("lora" in k or "base_layer" in k for k in gen.state_dict())
    q = load_policy_dir(out)
    assert q.lora is None and _close(_outputs(q), _outputs(p))
    assert not _close(_outputs(q), _outputs(_policy(lora=False)), 1e-3)  # the adapters are in the weights
    assert _close(_outputs(merged(p)), _outputs(p))


def test_plain_lm_state_is_the_merged_lm_and_the_adapted_layers_are_what_changes():
    """What a vLLM engine loads at start (``plain_state_dict``) and after each sync (``merged_weights``)."""
    p = _trained(_policy())
    plain, ref = plain_state_dict(p.lm), merged(p).lm.state_dict()
    assert set(plain) == set(ref) and all(torch.allclose(plain[k], ref[k], atol=1e-6) for k in ref)
    changed = merged_weights(p.lm)
    assert set(changed) == {m[len("lm."):] + ".weight" for m in p.adapted_modules() if m.startswith("lm.")}
    base = _policy(lora=False).lm.state_dict()
    assert all(torch.equal(plain[k], base[k]) for k in base if k not in changed)  # the rest is the base


# --------------------------------------------------------------------------------------- KL reference
def test_kl_reference_is_the_base_with_the_adapter_off_when_the_snapshot_is_the_base():
    p = _policy()
    reference = LoraReference(p, {k: v.clone() for k, v in p.trainable_state_dict().items()})
    assert reference.is_base and all(k.startswith(("bridge.", "connector.")) for k in reference.swapped)
    base_then = _outputs(_policy(lora=False))
    _trained(p)  # stage 2 moves adapters and heads
    now = _outputs(p)
    before = {k: v.clone() for k, v in p.trainable_state_dict().items()}
    p.train()
    with reference.applied() as ref:
        assert not ref.training
        assert _close(_outputs(ref), base_then, 0.0)
    assert p.training and _close(_outputs(p), now, 0.0)
    assert all(torch.equal(v, before[k]) for k, v in p.trainable_state_dict().items())  # restored exactly


def test_kl_reference_after_stage1_trained_the_adapter_is_the_stage1_policy():
    p = _trained(_policy(), seed=3)  # stage 1 trained the adapters: the reference is NOT the base
    stage1 = _outputs(p)
    reference = LoraReference(p, {k: v.clone() for k, v in p.trainable_state_dict().items()})
    assert not reference.is_base
    _trained(p, seed=4)
    with reference.applied() as ref:
        got = _outputs(ref)
    assert _close(got, stage1, 0.0)
    assert not _close(got, _outputs(_policy(lora=False)), 1e-3)


# --------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("sets, field, words", [
    (["model.lora.lm_target_modules=[q_proj,q_prj]"], "model.lora.lm_target_modules", "'q_prj' matches no linear"),
    (["model.lora.generator_target_modules=[to_qq]"], "model.lora.generator_target_modules", "'to_qq'"),
    (["model.lora.lm_target_modules=[]", "model.lora.generator_target_modules=[]"], "model.lora.lm_target_modules",
     "adapt nothing"),
    (["model.freeze_generator=true", "learner.train_generator=false", "model.lora.generator_target_modules=[to_q]"],
     "model.lora.generator_target_modules", "freeze_generator"),
])
@pytest.mark.parametrize("command", [["check-config", "--check-paths"], ["train"]])
def test_lora_config_errors_name_the_field_and_exit_2(capsys, command, sets, field, words):
    argv = [*command, "--set", "model.lora.enabled=true"]
    for s in sets:
        argv += ["--set", s]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"config error: {field}:" in err and words in err, err


def test_build_rejects_a_target_that_matches_nothing():
    with pytest.raises(ValueError, match=r"model\.lora\.lm_target_modules: 'qproj' matches no linear layer"):
        UnifiedPolicy.from_config(PolicyConfig(lora={**LORA, "lm_target_modules": ["qproj"]}))


# ------------------------------------------------------------------------------------------- estimate
def test_estimate_counts_adapters_and_heads_as_the_trainable_part():
    cfg = PolicyConfig(lora=LORA)
    parts = model_parts(cfg)
    policy = _policy()
    trainable = sum(q.numel() for q in policy.parameters() if q.requires_grad)
    assert sum(p.params for p in parts if p.trainable) == trainable
    assert sum(p.params for p in parts) == sum(q.numel() for q in policy.parameters())
    assert {p.name for p in parts if p.trainable} == {"lm.lora", "generator.lora", "bridge", "connector"}
    e = estimate_memory(parts, MemorySettings(kl_reference=True))
    assert e.lines["optimizer"] == 8 * trainable and e.lines["gradients"] == 4 * trainable
    assert e.lines["reference"] == 4 * trainable  # the adapter + head snapshot, not a copy of the base


# ------------------------------------------------------------------------------------------------ Janus
JANUS = {"arch": "janus", "janus_tiny": {"text": {"num_hidden_layers": 2}}}


def _janus(lora: bool = True):
    from policy.janus import JanusPolicy

    return JanusPolicy.from_config(PolicyConfig(**JANUS, **({"lora": LORA} if lora else {})))


def _janus_outputs(policy):
    """Log-probs of a prompt followed by image codes: the text head and the generation head both count."""
    ids = policy.generation_prompt("a red square") + policy.image_ids(torch.arange(policy.n_image_tokens)).tolist()
    ids = torch.tensor([ids])
    with torch.no_grad():
        return (policy.token_logprobs(ids, torch.ones_like(ids))[0],)


def test_janus_lora_adapts_the_language_model_and_the_generation_head_only():
    p = _janus()
    trainable = {n for n, q in p.named_parameters() if q.requires_grad}
    assert trainable == set(p.trainable_state_dict()) and all(".lora_" in n for n in trainable)
    modules = p.adapted_modules()
    lm = [m for m in modules if m.startswith("model.model.language_model.")]
    gen = [m for m in modules if m.startswith(("model.model.generation_aligner.", "model.model.generation_head."))]
    assert len(lm) == 2 * 7 and sorted(m.rsplit(".", 1)[-1] for m in gen) == ["fc1", "proj_out", "vision_head"]
    assert len(modules) == len(lm) + len(gen)  # nothing in the vision encoder, the aligner or the VQ model
    assert _close(_janus_outputs(p), _janus_outputs(_janus(lora=False)), 0.0)  # a fresh adapter is the base
    _trained(p)
    assert not _close(_janus_outputs(p), _janus_outputs(_janus(lora=False)), 1e-3)
    with p.lora.disabled(p):
        assert _close(_janus_outputs(p), _janus_outputs(_janus(lora=False)), 0.0)


def test_janus_lora_sync_is_verified_per_module_and_fails_on_a_withheld_one():
    learner = _trained(_janus())
    state, modules = learner.trainable_state_dict(), learner.adapted_modules()
    fresh = lambda: RolloutWorker(0, learner.cfg, RolloutSettings(), sync_backend="nccl", rollout_kind="image")  # noqa: E731
    worker, handle, error = _gloo_sync(learner, learner.cfg, state, manifest.build(state, modules), worker=fresh())
    assert error is None and worker.version() == 1 and worker.weights_digest() == learner.weights_digest()
    assert set(handle.manifest) == set(modules) and _close(_janus_outputs(worker.policy), _janus_outputs(learner), 0.0)
    module = "model.model.generation_head.vision_head"
    send = {k: v for k, v in state.items() if k not in modules[module]}
    worker, _, error = _gloo_sync(learner, learner.cfg, send, manifest.build(send, modules), worker=fresh())
    assert isinstance(error, WeightSyncMismatch) and module in str(error) and worker.version() == -1


def test_janus_lora_dir_reloads_and_exports_a_plain_janus_dir(tmp_path, capsys):
    from transformers import JanusForConditionalGeneration

    p = _trained(_janus())
    p.save_pretrained(tmp_path / "pol")
    assert {f.name for f in (tmp_path / "pol").iterdir()} == {ADAPTERS_FILE, "config.json"}  # no base copy
    q = load_policy_dir(tmp_path / "pol")
    assert q.lora is not None and q.weights_digest() == p.weights_digest()
    assert _close(_janus_outputs(q), _janus_outputs(p), 0.0)
    assert main(["export", "--checkpoint", str(tmp_path / "pol"), "--out", str(tmp_path / "merged")]) == 0
    assert "adapters merged" in capsys.readouterr().out
    plain = JanusForConditionalGeneration.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    r = load_policy_dir(tmp_path / "merged")
    assert r.lora is None and _close(_janus_outputs(r), _janus_outputs(p))


def test_janus_lora_kl_reference_is_the_base_with_the_adapter_off():
    p = _janus()
    ref = LoraReference(p, {k: v.clone() for k, v in p.trainable_state_dict().items()})
    _trained(p)
    moved = _janus_outputs(p)
    with ref.applied() as r:
        assert _close(_janus_outputs(r), _janus_outputs(_janus(lora=False)), 0.0)
    assert _close(_janus_outputs(p), moved, 0.0)  # swapped back


def test_janus_lora_estimate_and_a_target_that_matches_nothing(capsys):
    cfg = PolicyConfig(**JANUS, lora=LORA)
    parts = model_parts(cfg)
    p = _janus()
    assert sum(x.params for x in parts if x.trainable) == sum(q.numel() for q in p.parameters() if q.requires_grad)
    assert {x.name for x in parts if x.trainable} == {"lm.lora", "generator.lora"}
    with pytest.raises(ValueError, match=r"model\.lora\.generator_target_modules: 'to_q' matches no linear"):
        model_parts(PolicyConfig(**JANUS, lora={**LORA, "generator_target_modules": ["to_q"]}))
    assert main(["check-config", "--config", "configs/gvu_janus.yaml", "--estimate",
                 "--set", "model.lora.enabled=true"]) == 0
    out = capsys.readouterr().out
    assert "lm.lora" in out and "generator.lora" in out
