"""Qwen-Image pipeline directories (policy/qwen_image.py): a tiny random-init ``QwenImagePipeline`` saved by diffusers
(tests/qwen_image_dirs.py) is the whole unified model of a config that differs from configs/uae_qwen_image.yaml
only in paths and sizes. Its text encoder is the LM, its transformer reads the LM's hidden states directly, its
scheduler's dynamic shift gives the sampler's sigmas, a text-to-image prompt is encoded as the pipeline encodes
it (its template, its condition), and sampling through the policy equals diffusers' own pipeline on the same
condition and noise. With Ray: a group of UAE rollouts, the reward, one learner step, a
checkpoint that reloads; and a whole short ``unigrpo train`` from the directory, the workers following the
learner's weights."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from PIL import Image
from qwen_image_dirs import save_qwen_image
from service_helpers import FAST_VAE_FIT, metric, record_syncs
from transformers import Qwen2_5_VLForConditionalGeneration

from learner.batch import collate
from learner.group import LearnerGroup
from learner.objective import policy_outputs
from policy import qwen_image
from policy.estimate import model_parts
from policy.model import UnifiedPolicy
from policy.pipeline import FlowSchedule
from policy.sde import flow_sigmas, sample_ode
from reward.registry import combine
from rollout.caption import caption_condition, uae_rollout
from rollout.engine import HFTextEngine
from rollout.image import gvu_prompt, gvu_rollout
from rollout.interleaved import RolloutSettings
from services import driver
from services.config import ConfigError, load_config
from sync import manifest
from sync.object_store import ObjectStoreReceiver

torch.set_num_threads(1)

REAL = "configs/uae_qwen_image.yaml"


@pytest.fixture(scope="module")
def qi_dir(tmp_path_factory):
    return save_qwen_image(tmp_path_factory.mktemp("pipelines") / "Qwen-Image")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A JSONL of 10 image rows (the real config's task kind), 32 x 32 PNGs beside it."""
    root = tmp_path_factory.mktemp("uae-data")
    rng = np.random.default_rng(0)
    rows = []
    for k in range(10):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{k}.png")
        rows.append(json.dumps({"id": f"i{k}", "image": f"{k}.png", "question": "Describe the image.", "answer": "-"}))
    (root / "images.jsonl").write_text("\n".join(rows) + "\n")
    return root / "images.jsonl"


def tiny(qi_dir, data, tmp_path, *extra: str):
    """configs/uae_qwen_image.yaml with local paths and CPU sizes (nothing else differs)."""
    return load_config(REAL, [
        f"model.generator_path={qi_dir}", "model.image_size=32", "model.cond_tokens=32", "model.bridge_patch=2",
        "model.dtype=float32", f"task.path={data}", "task.train_size=8", "task.eval_size=2", "task.image_size=32",
        "rollout.num_workers=1", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "rollout.num_cpus_per_worker=0.5", "rollout.num_gpus_per_worker=0", "rollout.sde.steps=4",
        "reward.components.0.kwargs={tiny: true, backbones: [{kind: clip, weight: 1.0}]}", "reward.num_cpus=0.5",
        "learner.num_workers=1", "learner.mini_batches=1", "learner.num_cpus_per_worker=1",
        "learner.num_gpus_per_worker=0", "algorithm.steps=2", "tracking.log_images_every=1",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"checkpoint.dir={tmp_path}/ckpt", "checkpoint.every=2",
        "cluster.use_custom_resources=false", *FAST_VAE_FIT, *extra])


@pytest.fixture(scope="module")
def policy(qi_dir, data, tmp_path_factory):
    cfg = tiny(qi_dir, data, tmp_path_factory.mktemp("run")).check_paths()
    return UnifiedPolicy.from_config(cfg.model)


def test_one_directory_is_the_whole_model(qi_dir, policy):
    """The LM is the pipeline's Qwen2.5-VL text encoder (text-only: no processor/), the generator and VAE its
    transformer and VAE, with no connector; the unused vision tower is frozen and not synced."""
    assert isinstance(policy.lm, Qwen2_5_VLForConditionalGeneration) and policy.vision is None
    assert policy.input_image_mode == "bridge" and policy.connector is None
    assert isinstance(policy.generator, QwenImageTransformer2DModel) and isinstance(policy.vae, AutoencoderKLQwenImage)
    for ours, saved in ((policy.generator, QwenImageTransformer2DModel.from_pretrained(qi_dir / "transformer")),
                        (policy.vae, AutoencoderKLQwenImage.from_pretrained(qi_dir / "vae"))):
        a, b = ours.state_dict(), saved.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    enc = Qwen2_5_VLForConditionalGeneration.from_pretrained(qi_dir / "text_encoder").state_dict()
    ours = policy.lm.state_dict()
    assert all(torch.equal(ours[k], enc[k]) for k in enc if "embed_tokens" not in k and "lm_head" not in k)
    assert policy.latent_shape == (16, 4, 4) and policy.image_seq_len == 4  # factor 8, 2 x 2 packed tokens
    assert not any(k.startswith(("connector.", "lm.model.visual.")) for k in policy.trainable_state_dict())
    assert not any(p.requires_grad for p in policy.lm.model.visual.parameters())


@pytest.mark.parametrize("steps", [2, 4, 10, 28])
def test_sigmas_are_the_pipelines(qi_dir, policy, steps):
    """policy.sigmas = the scheduler's set_timesteps(sigmas=linspace(1, 1/K, K), mu=calculate_shift(L)), as
    QwenImagePipeline calls it, for the policy's image size and others (L = packed image tokens)."""
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(qi_dir / "scheduler")
    c = sched.config
    for seq_len in (policy.image_seq_len, 1024, 4096):
        mu = calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
        retrieve_timesteps(sched, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        ours = policy.sigmas(steps) if seq_len == policy.image_seq_len else policy.schedule.sigmas(steps, seq_len)
        assert torch.equal(ours, sched.sigmas)
    assert sched.sigmas[-2] == pytest.approx(0.02)  # shift_terminal
    assert not torch.allclose(policy.sigmas(steps), flow_sigmas(steps), atol=1e-3)


def test_sampling_and_decoding_equal_diffusers_pipeline(qi_dir, policy):
    """The LM's hidden states of two contexts of different lengths condition the transformer (real tokens
    first, padding masked); Euler sampling over the policy's sigmas and the VAE decode give what
    QwenImagePipeline gives for those prompt embeddings, mask and noise."""
    tok = policy.tokenizer
    texts = ["what colour is the shape", "a red circle"]
    seqs = [tok.encode(t) for t in texts]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [policy.token_ids["pad"]] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        _, hidden = policy.lm_forward(ids, attn)
        enc, mask = policy.condition(hidden, torch.tensor([len(s) for s in seqs]))
    n = policy.cfg.cond_tokens
    for i, s in enumerate(seqs):  # row i: its last min(n, len) hidden states, left-aligned
        k = min(n, len(s))
        assert mask[i].tolist() == [True] * k + [False] * (n - k)
        assert torch.equal(enc[i, :k], hidden[i, len(s) - k:len(s)]) and not enc[i, k:].any()
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    steps = 4
    with torch.no_grad():
        ours = sample_ode(lambda x, s: policy.velocity(x, s, enc, mask), noise, policy.sigmas(steps))
        pixels = policy.decode_latent(ours)
    pipe = QwenImagePipeline.from_pretrained(qi_dir)
    kw = dict(prompt_embeds=enc, prompt_embeds_mask=mask.long(), latents=qwen_image.pack(noise, 2), height=32,
              width=32, num_inference_steps=steps)
    theirs = pipe(**kw, output_type="latent").images
    assert theirs.shape == (2, 4, 64)
    assert torch.allclose(qwen_image.pack(ours, 2), theirs, atol=1e-5, rtol=1e-5)
    assert torch.allclose(pixels, pipe(**kw, output_type="pt").images, atol=1e-4)
    # the mask is what the transformer reads: a padded row's velocity equals the same row unpadded
    k = int(mask[1].sum())
    v_pad = policy.velocity(noise[1:], torch.tensor([0.5]), enc[1:], mask[1:])
    v_cut = policy.velocity(noise[1:], torch.tensor([0.5]), enc[1:, :k], mask[1:, :k])
    assert torch.allclose(v_pad, v_cut, atol=1e-5)


def _template(tok) -> tuple[list[int], list[int]]:
    """The pipeline template's prefix and suffix ids, each half tokenized alone."""
    prefix, suffix = qwen_image.PROMPT_TEMPLATE.split("{}")
    return tok.encode(prefix, add_special_tokens=False), tok.encode(suffix, add_special_tokens=False)


def test_text_to_image_condition_is_the_pipelines(qi_dir, policy):
    """GvU's prompt and UAE's caption condition are QwenImagePipeline's prompt template around the text, and the
    generator's condition (encoder_hidden_states + mask) is what its ``_get_qwen_prompt_embeds`` gives for the same
    texts, with the same text encoder weights and tokenizer: the hidden states after the template's system part,
    left-aligned, right-padded, masked. The pipeline tokenizes the whole formatted string; on these texts that is
    the prefix, the text and the suffix tokenized apart (asserted). Its drop index (34) is the prefix's length under
    Qwen's tokenizer; the test directory's tiny tokenizer encodes the prefix in more tokens, so the pipeline is
    given that count (the policy computes it the same way, from its own tokenization of the prefix)."""
    pipe = QwenImagePipeline.from_pretrained(qi_dir)
    assert pipe.prompt_template_encode == qwen_image.PROMPT_TEMPLATE
    tok, ids = policy.tokenizer, policy.token_ids
    prefix, suffix = _template(tok)
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])  # Qwen's chat tokens, single ids
    assert [t for t in prefix + suffix if t in (start, end)] == [start, end, start, end, start]
    texts = ["what colour is the shape", "a red circle"]
    prompts = [gvu_prompt(policy, t) for t in texts]
    for text, (prompt, start) in zip(texts, prompts):
        assert prompt == prefix + tok.encode(text, add_special_tokens=False) + suffix and start == len(prefix)
        assert prompt == pipe.tokenizer(qwen_image.PROMPT_TEMPLATE.format(text)).input_ids
    caption = tok.encode(texts[1], add_special_tokens=False) + [ids["eos"]]  # as sampled: eos dropped
    assert caption_condition(policy, caption) == prompts[1]
    pipe.prompt_template_encode_start_idx = len(prefix)
    width = max(len(p) for p, _ in prompts)
    batch = torch.tensor([p + [ids["pad"]] * (width - len(p)) for p, _ in prompts])
    attn = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p, _ in prompts])
    with torch.no_grad():
        theirs, theirs_mask = pipe._get_qwen_prompt_embeds(texts, device=torch.device("cpu"))
        _, hidden = policy.lm_forward(batch, attn)
        enc, mask = policy.condition(hidden, attn.sum(1), cond_start=[s for _, s in prompts])
    n = theirs.shape[1]
    assert n == max(len(p) - s for p, s in prompts) <= policy.cfg.cond_tokens  # the whole text and suffix
    assert torch.equal(mask[:, :n], theirs_mask.bool()) and not mask[:, n:].any() and not enc[:, n:].any()
    gap = float((enc[:, :n] - theirs).abs().max())
    assert gap < 1e-5, gap


def test_template_rollouts_match_the_learners_recomputation(policy):
    """UAE (the caption's own condition sequence) and GvU (the row's prompt) on Qwen-Image: the segments record
    the template's system part as ``cond_start``, and the learner's recomputed window log-probs equal the
    behaviour ones; the window reaches back to the prefix, so the skip changes them."""
    prefix, suffix = _template(policy.tokenizer)
    s = RolloutSettings(group_size=2, max_new_tokens=6, sde_steps=4, sde_window=2)
    img = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    uae = uae_rollout(policy, HFTextEngine(policy), [{"prompt_id": "p0", "image": img}], s, 1,
                      torch.Generator().manual_seed(0))
    gvu = gvu_rollout(policy, HFTextEngine(policy), [{"prompt_id": "q0", "text": "a red circle"}], s, 1,
                      torch.Generator().manual_seed(1))
    for trajs in (uae, gvu):
        for t in trajs:
            t.validate()
            (seg,) = t.images
            cond = (t.input_ids if seg.cond_ids is None else seg.cond_ids)[:seg.cond_end].tolist()
            assert cond[:len(prefix)] == prefix and cond[-len(suffix):] == suffix and seg.cond_start == len(prefix)
            assert seg.cond_end - seg.cond_start < policy.cfg.cond_tokens  # the window would reach the prefix
        batch = collate(trajs, torch.zeros(len(trajs)), policy.token_ids["pad"])
        with torch.no_grad():
            out = policy_outputs(policy, batch, s.temperature, s.sde_noise_level)
            batch.seg_cond_start = torch.zeros_like(batch.seg_cond_start)
            unskipped = policy_outputs(policy, batch, s.temperature, s.sde_noise_level)
        gap = float((out.img_logp - batch.seg_log_probs).abs().max())
        assert gap < 1e-5, gap
        assert float((unskipped.img_logp - batch.seg_log_probs).abs().max()) > 1e-3


def test_estimate_reads_the_directorys_parts(qi_dir, data, tmp_path, policy):
    """``check-config --estimate`` on the tiny directory: the parts the policy builds, from the pipeline's folders
    (the LM's vocabulary before the special tokens are added)."""
    parts = {p.name: p for p in model_parts(tiny(qi_dir, data, tmp_path).model, train_generator=False)}
    assert set(parts) == {"lm", "vision", "bridge", "generator", "vae"} and not parts["vision"].trainable
    for name in ("bridge", "generator", "vae"):
        assert parts[name].params == sum(p.numel() for p in getattr(policy, name).parameters())
    assert parts["lm"].source == str(qi_dir / "text_encoder" / "config.json")
    assert parts["vae"].source == str(qi_dir / "vae" / "config.json")


def test_config_errors_name_the_field(qi_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="model.generator_path.*Qwen-Image pipeline"):
        load_config(REAL, ["model.generator_path=null"])
    with pytest.raises(ConfigError, match="model.input_image.*image processor"):
        tiny(qi_dir, data, tmp_path, "model.input_image=vision").check_paths()
    with pytest.raises(ConfigError, match="model.generator_class"):
        tiny(qi_dir, data, tmp_path, "model.generator_class=SD3Transformer2DModel").check_paths()


def test_pipeline_processor_gives_the_lm_its_vision_tower(tmp_path, data):
    """A pipeline with processor/ (Qwen-Image-Edit's layout): the LM reads input images with its own tower."""
    d = save_qwen_image(tmp_path / "Qwen-Image-Edit", processor=True)
    cfg = tiny(d, data, tmp_path, "model.input_image=vision").check_paths()
    p = UnifiedPolicy.from_config(cfg.model)
    assert p.vision is not None and p.input_image_mode == "vision"
    tokens, _, images = p.input_image((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    assert images.shape == (1, 32, 32, 3) and p.token_ids["vision_pad"] in tokens


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_uae_rollouts_reward_learner_step_and_checkpoint_reload(local_ray, qi_dir, data, tmp_path, lora):
    """One group of UAE rollouts from the directory's policy, the config's reward, one learner step (the learner
    builds the same policy from the same config; LM and generator both train here: all their weights, or their
    LoRA adapters), a weight sync into a fresh replica (verified per adapted module with LoRA), a checkpoint that
    loads back with the scheduler and the trained weights."""
    cfg = tiny(qi_dir, data, tmp_path, "model.freeze_generator=false", "learner.train_generator=true",
               "algorithm.lambda_img=1.0", f"model.lora.enabled={str(lora).lower()}")
    policy = UnifiedPolicy.from_config(cfg.model)
    img = (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)
    trajs = uae_rollout(policy, HFTextEngine(policy), [{"prompt_id": "p0", "image": img, "meta": {}}],
                        RolloutSettings(group_size=4, max_new_tokens=6, sde_steps=4, sde_window=2), 1,
                        torch.Generator().manual_seed(0))
    assert len(trajs) == 4 and all(len(t.images) == 1 for t in trajs)
    sig = policy.sigmas(4)
    for seg in (s for t in trajs for s in t.images):  # windows on the scheduler's schedule
        assert all(bool((sig == x).any()) for x in seg.sigmas) and all(bool((sig == x).any()) for x in seg.sigma_nexts)
    rewards, parts = combine(trajs, [c.scorer_spec() for c in cfg.reward.components])
    assert len(rewards) == 4 and all(-1 <= r <= 1 for r in rewards) and set(parts) == {"clip_similarity"}
    adv = torch.tensor(rewards) - torch.tensor(rewards).mean()
    group = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed, None, cfg.rollout.sde)
    try:
        before = group.call("weights_digest")
        m = group.train_step(collate(trajs, adv / (adv.std() + 1e-6), policy.token_ids["pad"]))
        after = group.call("weights_digest")
        assert m["image/loss"] == m["image/loss"] and 0 < m["grad_norm"] < float("inf")
        assert m["learn/logp_gap_image"] < 1e-5  # the templated caption's condition, recomputed
        changed = {k for k in before if before[k] != after[k]}
        assert {k.split(".")[0] for k in changed} == {"lm", "bridge", "generator"}
        assert not lora or all(".lora_" in k for k in changed if not k.startswith("bridge."))  # adapters only
        handle = group.publish()
        replica, received = UnifiedPolicy.from_config(cfg.model), []
        HFTextEngine(replica).load_weights(manifest.recording(ObjectStoreReceiver().receive(handle, 60), received))
        manifest.verify(handle, replica.adapted_modules(), received, replica.trainable_state_dict())
        assert bool(handle.manifest) == lora and set(handle.manifest) == set(replica.adapted_modules())
        assert replica.weights_digest() == pytest.approx(after, rel=1e-6, abs=1e-6)
        group.call_all("save", str(tmp_path / "ckpt"))
    finally:
        group.shutdown()
    loaded = UnifiedPolicy.from_pretrained(tmp_path / "ckpt" / "policy")
    assert loaded.schedule == policy.schedule and loaded.schedule.pipeline_sigmas == "linspace"
    assert torch.equal(loaded.sigmas(4), sig) and loaded.connector is None
    digest = loaded.weights_digest()
    assert digest.keys() == after.keys()
    assert all(abs(digest[k] - after[k]) <= 1e-6 * (1 + abs(after[k])) for k in after)


def test_unigrpo_train_from_the_directory(local_ray, qi_dir, data, tmp_path, monkeypatch):
    """``services.driver.train`` on the tiny config: 2 steps, rollout worker and learner on the same weights after
    every sync (sync mode, where each step's sync is one call the test can observe; the config's async mode
    delivers behind the queued batches), the reward logged, a checkpoint that reloads as a Qwen-Image policy."""
    seen = record_syncs(monkeypatch, lambda run: [m.actor for m in run.pool.members.values()])
    cfg = tiny(qi_dir, data, tmp_path, "algorithm.mode=sync")
    summary = driver.train(cfg)
    assert summary["steps"] == 2
    assert [(v, vs) for v, vs, *_ in seen] == [(1, [1]), (2, [2]), (3, [3])] and all(s for _, _, s, _ in seen)
    assert seen[0][3] != seen[-1][3]  # the learner's weights moved
    uri, rid = cfg.tracking.resolved_uri(), summary["run_id"]
    rewards = metric(uri, rid, "reward/clip_similarity/mean")
    assert [s for s, _ in rewards] == [1, 2] and all(-1 <= v <= 1 for _, v in rewards)
    assert [s for s, _ in metric(uri, rid, "text/loss")] == [1, 2]
    ckpt = next((tmp_path / "ckpt" / cfg.run_name).glob("step-*"))
    loaded = UnifiedPolicy.from_pretrained(ckpt / "policy")
    assert isinstance(loaded.generator, QwenImageTransformer2DModel) and loaded.connector is None
    shipped = FlowSchedule.from_config(json.loads((qi_dir / "scheduler" / "scheduler_config.json").read_text()))
    assert loaded.schedule == replace(shipped, pipeline_sigmas="linspace")
