"""The service's actors on one GPU through Ray: a DeepSpeed learner actor (NCCL, one rank) and two rollout
worker actors share the device by fractional ``num_gpus`` (0.5 + 0.25 + 0.25). Three steps of rollout ->
train_step -> object-store publish -> sync: every actor runs on CUDA, trajectories come back as CPU tensors,
the learner's recomputed log-probs match the workers' behaviour log-probs, and after the last sync the
workers hold the learner's weights.

Marked ``gpu``; skips without CUDA. Lines starting ``GPU-REPORT`` (run with ``-s``) give the times."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

from learner.batch import collate
from learner.group import LearnerGroup
from policy.build import build_tokenizer
from policy.tokenizer import special_token_ids
from rollout.interleaved import RolloutSettings
from rollout.pool import PoolSpec, RolloutPool
from services.config import load_config
from sync import RAY_SYSTEM_CONFIG

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_learner_and_rollout_actors_share_one_gpu():
    # local functions: cloudpickle sends them by value (the actors cannot import this test module)
    def placement(self) -> tuple[str, list]:
        return str(self.policy.device), ray.get_gpu_ids()

    def make_gen_likely(self) -> None:
        """The tiny random model then starts an image often; the workers get it with the next publish."""
        with torch.no_grad():
            self.policy.lm.lm_head.weight[self.policy.token_ids["gen"]] += 1.0

    ray.init(num_cpus=8, num_gpus=1, include_dashboard=False, _system_config=RAY_SYSTEM_CONFIG)
    learner = pool = None
    try:
        cfg = load_config(None, ["learner.num_gpus_per_worker=0.5", "rollout.num_gpus_per_worker=0.25"])
        settings = (RolloutSettings(group_size=4, max_new_tokens=12, max_images=1, sde_steps=8, sde_window=2,
                                        sde_noise_level=cfg.rollout.sde.noise_level))
        learner = LearnerGroup(cfg.model, cfg.learner, cfg.algorithm, cfg.sft, cfg.seed, None)
        learner.call_all("set_sampling", 1.0, cfg.rollout.sde.noise_level)
        pool = RolloutPool(PoolSpec(policy_cfg=cfg.model, settings=settings, rollout_kind="interleaved",
                                    num_cpus=1, num_gpus=0.25), 2)
        actors = [learner.workers[0]] + [m.actor for m in pool.members.values()]
        placements = ray.get([a.__ray_call__.remote(placement) for a in actors])
        assert all(dev.startswith("cuda") and ids for dev, ids in placements), placements
        ray.get(learner.workers[0].__ray_call__.remote(make_gen_likely))
        pool.sync(learner.publish(True))
        pad = special_token_ids(build_tokenizer(cfg.model))["pad"]
        rng = np.random.default_rng(0)
        reqs = [{"prompt_id": f"p{i}", "text": "What colour is the shape? A) red B) green C) blue D) yellow",
                 "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "meta": {}} for i in range(8)]
        images = 0
        for step in range(3):
            t0 = time.perf_counter()
            trajs = pool.generate(reqs, seed=step)
            t1 = time.perf_counter()
            assert len(trajs) == 32 and all(t.input_ids.device.type == "cpu" for t in trajs)
            images += sum(len(t.images) for t in trajs)
            adv = torch.tensor(rng.standard_normal(len(trajs)), dtype=torch.float32)
            m = learner.train_step(collate(trajs, adv, pad))
            t2 = time.perf_counter()
            handle = learner.publish(True)
            pool.sync(handle)
            print(f"GPU-REPORT test=ray_step step={step} rollout_s={t1 - t0:.3g} learn_s={t2 - t1:.3g} "
                  f"sync_s={time.perf_counter() - t2:.3g} logp_gap_text={m['learn/logp_gap_text']:.3g} "
                  f"logp_gap_image={m.get('learn/logp_gap_image', float('nan')):.3g}", flush=True)
            assert m["learn/logp_gap_text"] < 1e-3
            assert m.get("learn/logp_gap_image", 0.0) < 1e-3
        assert images > 0
        learned, held = learner.call("weights_digest"), pool.call("weights_digest")
        assert learned.keys() == held.keys()
        assert all(learned[k] == held[k] for k in learned)
    finally:
        if pool is not None:
            pool.shutdown()
        if learner is not None:
            learner.shutdown()
        ray.shutdown()
