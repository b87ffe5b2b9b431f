"""The GPU path of the unified policy, without Ray: the tiny policy on CUDA agrees with the CPU, a rollout
worker given a GPU samples CLEAR trajectories there (and returns CPU tensors), a DeepSpeed learner on one GPU
(NCCL, world size 1) trains on them, and its weights, loaded into the worker, drive the next rollout.

Every test is marked ``gpu`` and skips without CUDA (``-m "not gpu"`` deselects them on CPU machines).
TF32 is off, so CPU/GPU comparisons are float32 against float32. Lines starting ``GPU-REPORT`` (run with
``-s``) give the measured gaps and wall times.
"""

from __future__ import annotations

import math
import socket
import time

import numpy as np
import pytest
import torch

from learner.batch import collate
from learner.objective import _conditioning, policy_outputs
from learner.sharding import shard_batch
from policy.factory import build_policy
from policy.sde import draw_normal, flow_sigmas, sample_latents, window_log_probs, window_starts
from recipes import get_recipe
from rollout.interleaved import RolloutSettings, generate_images
from rollout.worker import RolloutWorker
from services.config import load_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SETTINGS = RolloutSettings(group_size=4, max_new_tokens=12, sde_steps=8, sde_window=2)
ADVANTAGES = [1.0, -1.0, 0.5, -0.5]
DEV = torch.device("cuda")
TEXT = "What colour is the shape? A) red B) green C) blue D) yellow"


def report(**values) -> None:
    print("GPU-REPORT " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in values.items()), flush=True)


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _cfg(*overrides: str):
    return load_config(None, ["learner.num_gpus_per_worker=1", "rollout.num_gpus_per_worker=1", *overrides])


def _requests(n: int = 4) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"prompt_id": f"p{i}", "text": TEXT, "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             "meta": {}} for i in range(n)]


def _make_gen_likely(policy) -> None:
    """The tiny random model triggers generation often (same edit on every replica)."""
    with torch.no_grad():
        policy.lm.lm_head.weight[policy.token_ids["gen"]] += 1.0


def _tensors(traj) -> dict[str, torch.Tensor]:
    out = {"input_ids": traj.input_ids, "loss_mask": traj.loss_mask, "behaviour_logp": traj.behaviour_logp,
           "slot_latents": traj.slot_latents}
    for i, seg in enumerate(traj.images):
        for name in ("latents", "next_latents", "sigmas", "sigma_nexts", "log_probs", "final_latent"):
            out[f"images[{i}].{name}"] = getattr(seg, name)
    return out


def _check_cpu_trajectories(trajs, version: int, need_image: bool = True) -> None:
    assert any(t.images for t in trajs) or not need_image, "no trajectory generated an image"
    for t in trajs:
        t.validate()
        assert t.policy_version == version
        for name, x in _tensors(t).items():
            assert x.device.type == "cpu", f"{name} is on {x.device}"
            if x.is_floating_point():
                assert torch.isfinite(x).all(), name
        for seg in t.images:
            assert seg.window == SETTINGS.sde_window


def _worker(cfg) -> RolloutWorker:
    r = cfg.rollout
    w = RolloutWorker(0, cfg.model, SETTINGS, num_gpus=r.num_gpus_per_worker)
    _make_gen_likely(w.policy)
    w.policy_version = 0  # the weights it was built with (the learner builds the same ones)
    return w


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _learner(cfg):
    pytest.importorskip("deepspeed")
    from learner import actor
    from learner.actor import LearnerWorker

    def edited_policy(policy_cfg):  # the edit goes in before DeepSpeed takes the weights: under ZeRO-3 or
        policy = build_policy(policy_cfg)  # bf16 the optimizer's fp32 copy would overwrite a later one
        _make_gen_likely(policy)
        return policy

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(actor, "build_policy", edited_policy)
        lw = LearnerWorker(0, 1, "127.0.0.1", _free_port(), cfg.model, cfg.learner, cfg.algorithm, cfg.sft,
                           cfg.seed)
    lw.set_sampling(SETTINGS.temperature, SETTINGS.sde_noise_level)
    return lw


def _published(learner) -> list[tuple[str, torch.Tensor]]:
    """What ``LearnerWorker.publish`` ships: the trainable tensors (gathered under ZeRO-3), on the CPU."""
    with learner._gathered():
        return [(k, v.detach().cpu()) for k, v in learner.policy.trainable_state_dict().items()]


def _sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, *args, **kw):
    _sync()
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    _sync()
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def cfg():
    return _cfg()


@pytest.fixture(scope="module")
def worker(cfg):
    return _worker(cfg)


@pytest.fixture(scope="module")
def learner(cfg):
    return _learner(cfg)


# ---- (a) the policy on CUDA agrees with the CPU ------------------------------------------------
def test_policy_on_cuda_matches_cpu(cfg):
    cpu = build_policy(cfg.model.model_dump())
    gpu = build_policy(cfg.model.model_dump()).to(DEV)
    for p in (cpu, gpu):
        _make_gen_likely(p)
    worker = RolloutWorker(0, cfg.model, SETTINGS, num_gpus=0)  # a CPU rollout to score
    _make_gen_likely(worker.policy)
    worker.policy_version = 0
    batch = collate(worker.generate(_requests(2), seed=3), torch.zeros(8), cpu.token_ids["pad"])
    assert batch.num_segments > 0
    with torch.no_grad():
        out_c = policy_outputs(cpu, batch, 1.0, SETTINGS.sde_noise_level)
        out_g = policy_outputs(gpu, batch.to(DEV), 1.0, SETTINGS.sde_noise_level)
        m = batch.loss_mask
        gap_logp = float((out_g.logp.cpu() - out_c.logp)[m].abs().max())
        gap_img = float((out_g.img_logp.cpu() - out_c.img_logp).abs().max())
        # the velocity itself, on the recorded window latents and the LM's conditioning
        _, h_c = cpu.lm_forward(batch.input_ids, batch.attention_mask, batch.slot_latents)
        gb = batch.to(DEV)
        _, h_g = gpu.lm_forward(gb.input_ids, gb.attention_mask, gb.slot_latents)
        x, s = batch.seg_latents[:, 0], batch.seg_sigmas[:, 0]
        v_c = cpu.velocity(x, s, *_conditioning(cpu, h_c, batch, 1))
        v_g = gpu.velocity(x.to(DEV), s.to(DEV), *_conditioning(gpu, h_g, gb, 1))
        gap_v = float((v_g.cpu() - v_c).abs().max() / v_c.abs().max())
    report(test="policy_cuda_vs_cpu", token_logp_max_abs=gap_logp, window_logp_max_abs=gap_img,
           velocity_max_rel=gap_v)
    assert out_g.logp.device.type == DEV.type and v_g.device.type == DEV.type
    assert gap_logp < 1e-4 and gap_img < 1e-3 and gap_v < 1e-4


# ---- (b) a rollout worker on CUDA --------------------------------------------------------------
def test_rollout_worker_on_cuda_returns_cpu_trajectories(worker):
    assert worker.policy.device.type == DEV.type
    trajs, first_s = _timed(worker.generate, _requests(), seed=0)
    again, gen_s = _timed(worker.generate, _requests(), seed=0)
    _check_cpu_trajectories(trajs, 0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(trajs, again))  # a seed fixes the draws
    assert all(t.meta["worker_id"] == 0 for t in trajs)
    finals = torch.stack([t.images[0].final_latent for t in trajs if t.images])
    pixels = worker.decode(finals)
    assert pixels.device.type == "cpu" and pixels.shape[1] == 3 and 0 <= pixels.min() and pixels.max() <= 1
    report(test="rollout_generate", trajectories=len(trajs), images=int(finals.shape[0]),
           first_call_s=first_s, generate_s=gen_s)


def test_rollout_worker_on_cuda_nucleus_and_greedy(worker):
    """top_p < 1 (draws from the truncated distribution, behaviour log-probs under the untruncated one, as
    the learner recomputes them) and evaluation's greedy overrides (temperature 0, one sample)."""
    trajs = worker.generate(_requests(2), seed=6, overrides={"top_p": 0.7})
    _check_cpu_trajectories(trajs, 0, need_image=False)
    batch = collate(trajs, torch.zeros(len(trajs)), worker.policy.token_ids["pad"])
    with torch.no_grad():
        out = policy_outputs(worker.policy, batch.to(DEV), 1.0, SETTINGS.sde_noise_level)
    m = batch.loss_mask
    gap = float((out.logp.cpu() - batch.behaviour_logp)[m].abs().max())
    greedy = [worker.generate(_requests(2), seed=k, overrides={"temperature": 0.0, "group_size": 1}) for k in (7, 8)]
    assert all(torch.equal(a.input_ids[: a.prompt_len + 1], b.input_ids[: b.prompt_len + 1])
               for a, b in zip(*greedy))  # the first token is greedy (later ones follow any image's noise)
    report(test="nucleus_rollout", logp_gap_text=gap)
    assert gap < 1e-3


@pytest.mark.parametrize("recipe", ["uae", "gvu"])
def test_uae_gvu_rollouts_on_cuda(cfg, recipe):
    """The other recipes' rollouts on a GPU worker: CPU trajectories (and meta tensors) whose behaviour
    log-probs the policy recomputes on the GPU."""
    w = RolloutWorker(0, cfg.model, SETTINGS, rollout_kind=get_recipe(recipe).rollout, num_gpus=1)
    w.policy_version = 0
    trajs = w.generate(_requests(2), seed=5)
    _check_cpu_trajectories(trajs, 0)
    key = "reconstruction" if recipe == "uae" else "generated_latent"
    assert all(t.meta[key].device.type == "cpu" and torch.isfinite(t.meta[key]).all() for t in trajs)
    batch = collate(trajs, torch.zeros(len(trajs)), w.policy.token_ids["pad"])
    with torch.no_grad():
        out = policy_outputs(w.policy, batch.to(DEV), SETTINGS.temperature, SETTINGS.sde_noise_level)
    m = batch.loss_mask
    gap_text = float((out.logp.cpu() - batch.behaviour_logp)[m].abs().max()) if m.any() else 0.0
    gap_img = float((out.img_logp.cpu() - batch.seg_log_probs).abs().max())
    report(test=f"{recipe}_rollout", logp_gap_text=gap_text, logp_gap_image=gap_img)
    assert gap_text < 1e-3 and gap_img < 1e-3


# ---- (c) learner on one GPU, weights back into the worker --------------------------------------
def _gaps(m: dict) -> tuple[float, float]:
    return m["learn/logp_gap_text"], m.get("learn/logp_gap_image", math.nan)


def test_learner_train_step_on_cuda_and_weights_into_worker(worker, learner):
    assert learner.cuda == (DEV.type == "cuda") and learner.policy.device.type == DEV.type
    assert learner.weights_digest() == worker.weights_digest()  # both built from the config, same edit
    trajs = worker.generate(_requests(), seed=1)
    _check_cpu_trajectories(trajs, 0)
    batch = collate(trajs, torch.tensor(ADVANTAGES * 4), learner.policy.token_ids["pad"])
    before = learner.weights_digest()
    m, step_s = _timed(learner.train_step, shard_batch(batch, learner.cfg.mini_batches, 1)[0])
    after = learner.weights_digest()
    gap_text, gap_img = _gaps(m)
    report(test="train_step", loss=m["loss"], logp_gap_text=gap_text, logp_gap_image=gap_img,
           grad_norm=m.get("grad_norm", math.nan), train_step_s=step_s, segments=batch.num_segments)
    assert math.isfinite(m["loss"]) and math.isfinite(m["text/loss"]) and math.isfinite(m["image/loss"])
    assert gap_text < 1e-3 and gap_img < 1e-3
    changed = {k.split(".")[0] for k in before if before[k] != after[k]}
    assert {"lm", "generator", "bridge", "connector"} <= changed

    worker.engine.load_weights(_published(learner))  # what update_weights does with a received handle
    worker.policy_version = 1
    assert worker.weights_digest() == learner.weights_digest()
    trajs2 = worker.generate(_requests(), seed=2, expected_version=1)
    _check_cpu_trajectories(trajs2, 1)
    # the worker's behaviour log-probs under the new weights are what the learner recomputes
    m2, step2_s = _timed(learner.train_step, shard_batch(collate(trajs2, torch.tensor(ADVANTAGES * 4),
                                                                 learner.policy.token_ids["pad"]), 1, 1)[0])
    gap_text2, gap_img2 = _gaps(m2)
    report(test="train_step_after_sync", loss=m2["loss"], logp_gap_text=gap_text2, logp_gap_image=gap_img2,
           train_step_s=step2_s)
    assert math.isfinite(m2["loss"]) and gap_text2 < 1e-3 and gap_img2 < 1e-3


# ---- (d) the SDE sampler on CUDA ---------------------------------------------------------------
def test_sde_window_log_probs_on_cuda_recomputed(cfg):
    gpu = build_policy(cfg.model.model_dump()).to(DEV)
    cpu = build_policy(cfg.model.model_dump())
    contexts = [gpu.image_placeholder_ids() + [5, 6, 7, gpu.token_ids["gen"]]] * 3
    latents = [torch.randn((1, *gpu.latent_shape), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    s = RolloutSettings(sde_steps=6, sde_window=3)
    segs_c, final_c = generate_images(cpu, contexts, latents, s, torch.Generator().manual_seed(7))
    segs_g, final_g = generate_images(gpu, contexts, latents, s, torch.Generator().manual_seed(7))
    assert final_g.device.type == "cpu" and all(g.log_probs.device.type == "cpu" for g in segs_g)
    # the same seed gives the same noise and windows on both devices
    assert all(torch.equal(c.sigmas, g.sigmas) for c, g in zip(segs_c, segs_g))
    final_gap = float((final_g - final_c).abs().max())
    lp_dev_gap = float(max((c.log_probs - g.log_probs).abs().max() for c, g in zip(segs_c, segs_g)))

    # sample_latents directly on CUDA, then the learner's recomputation from the recorded window
    with torch.no_grad():
        ids = torch.tensor(contexts, device=DEV)
        _, hidden = gpu.lm_forward(ids, torch.ones_like(ids), torch.cat(latents).to(DEV))
        enc, pooled = gpu.condition(hidden, ids.shape[1])
        gen = torch.Generator().manual_seed(11)
        noise = draw_normal((3, *gpu.latent_shape), gen, DEV)
        starts = window_starts(3, s.sde_steps, s.sde_window, "random", 0, gen)
        rec = sample_latents(lambda x, sg: gpu.velocity(x, sg, enc, pooled), noise, flow_sigmas(s.sde_steps),
                             s.sde_window, s.sde_noise_level, starts, gen)
        w = s.sde_window
        lp, _, _ = window_log_probs(
            lambda x, sg: gpu.velocity(x, sg, enc.repeat_interleave(w, 0), pooled.repeat_interleave(w, 0)),
            rec.latents, rec.next_latents, rec.sigmas, rec.sigma_nexts, s.sde_noise_level)
    recompute_gap = float((lp - rec.log_probs).abs().max())
    report(test="sde_window", final_latent_cuda_vs_cpu=final_gap, window_logp_cuda_vs_cpu=lp_dev_gap,
           window_logp_recompute_gap=recompute_gap)
    assert rec.log_probs.device.type == DEV.type and torch.isfinite(rec.log_probs).all()
    assert final_gap < 1e-3 and lp_dev_gap < 1e-3 and recompute_gap < 1e-4


# ---- (e) stage-1 SFT on CUDA -------------------------------------------------------------------
def test_sft_step_on_cuda(learner):
    rng = np.random.default_rng(5)
    img = lambda: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # noqa: E731
    examples = [{"text": TEXT, "image": img(), "clean_image": img(), "answer": "A", "generate": i % 2 == 0}
                for i in range(4)]
    examples.append({"text": "a red circle", "image": None, "clean_image": img(), "answer": "B", "generate": True})
    before = learner.weights_digest()
    m, sft_s = _timed(learner.sft_step, examples)
    after = learner.weights_digest()
    report(test="sft_step", loss=m["sft/loss"], text_ce=m["sft/text_ce"], flow_mse=m["sft/flow_mse"], sft_step_s=sft_s)
    assert all(math.isfinite(m[k]) for k in ("sft/loss", "sft/text_ce", "sft/flow_mse"))
    assert {"lm", "generator", "bridge", "connector"} <= {k.split(".")[0] for k in before if before[k] != after[k]}


# ---- (f) what real configs run: bfloat16 and ZeRO-2 --------------------------------------------
def test_bf16_zero2_rollout_and_train_step():
    cfg = _cfg("model.dtype=bfloat16", "learner.zero_stage=2")
    worker, learner = _worker(cfg), _learner(cfg)
    assert worker.weights_digest() == learner.weights_digest()
    trajs = worker.generate(_requests(), seed=4)
    _check_cpu_trajectories(trajs, 0)
    batch = collate(trajs, torch.tensor(ADVANTAGES * 4), learner.policy.token_ids["pad"])
    assert batch.loss_mask.any() and batch.num_segments > 0
    before = learner.weights_digest()
    m, step_s = _timed(learner.train_step, shard_batch(batch, learner.cfg.mini_batches, 1)[0])
    after = learner.weights_digest()
    gap_text, gap_img = _gaps(m)
    report(test="bf16_zero2_train_step", loss=m["loss"], logp_gap_text=gap_text, logp_gap_image=gap_img,
           train_step_s=step_s)
    assert math.isfinite(m["loss"]) and gap_text < 0.5 and gap_img < 0.5  # bf16: loose, the numbers are reported
    assert any(before[k] != after[k] for k in before)
    worker.engine.load_weights(_published(learner))
    assert worker.weights_digest() == learner.weights_digest()


# ---- (g) ZeRO-3 with the KL reference and two mini-batches, two RL iterations, checkpoint round trip ----
def test_zero3_kl_reference_minibatches_iterations_and_checkpoint(tmp_path):
    cfg = _cfg("learner.zero_stage=3", "learner.mini_batches=2", "algorithm.beta_text=0.05",
               "algorithm.beta_img=0.05")
    worker, learner = _worker(cfg), _learner(cfg)
    learner.snapshot_reference()
    assert learner.reference is not None and learner.reference.device.type == DEV.type
    assert worker.weights_digest() == learner.weights_digest()
    saved = None
    for it in range(3):
        trajs = worker.generate(_requests(), seed=10 + it, expected_version=it)
        _check_cpu_trajectories(trajs, it, need_image=it == 0)  # later steps may learn not to generate
        batch = collate(trajs, torch.tensor(ADVANTAGES * 4), learner.policy.token_ids["pad"])
        before = learner.weights_digest()
        m = learner.train_step(shard_batch(batch, learner.cfg.mini_batches, 1)[0])
        after = learner.weights_digest()
        gap_text, gap_img = _gaps(m)
        report(test=f"zero3_kl_iteration{it}", loss=m["loss"], kl_text=m["text/kl_ref"],
               kl_image=m.get("image/kl_ref", math.nan), logp_gap_text=gap_text, logp_gap_image=gap_img,
               segments=batch.num_segments)
        assert all(math.isfinite(m[k]) for k in ("loss", "text/kl_ref"))
        assert gap_text < 1e-3
        trained = {"lm", "bridge"}
        if batch.num_segments:
            assert math.isfinite(m["image/kl_ref"]) and gap_img < 1e-3
            trained |= {"generator", "connector"}
        assert trained <= {k.split(".")[0] for k in before if before[k] != after[k]}
        worker.engine.load_weights(_published(learner))
        worker.policy_version = it + 1
        assert worker.weights_digest() == learner.weights_digest()
        if it == 1:  # checkpoint after the second step; the third is undone by loading it
            learner.save(str(tmp_path / "ckpt"))
            saved = after
    assert learner.load(str(tmp_path / "ckpt")) == learner.version
    restored = learner.weights_digest()
    assert all(restored[k] == pytest.approx(saved[k], rel=1e-6, abs=1e-6) for k in saved)
