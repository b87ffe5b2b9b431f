"""The DeepSpeed learner: one Ray actor per rank, all in one placement group.

Each rank builds the policy of the config's ``model.arch`` (``policy.factory.build_policy``), wraps its
trainable part in a DeepSpeed engine (ZeRO stage from the config; torch's AdamW; gloo on CPU, NCCL on GPU),
recomputes old log-probs on its own model, and takes one optimizer step per mini-batch over both modalities
(a Janus policy: its image codes are tokens, so the text loss alone). Rank 0 publishes weights and writes
checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import torch

from learner.batch import TrainBatch, average_metrics
from learner.objective import GRPOSettings, PolicyOutputs, grpo_loss, policy_outputs, sft_loss
from learner.sft import sft_batch
from policy.config import PolicyConfig
from policy.factory import Policy, build_policy
from sync import make_publisher


def _cpu_deepspeed_without_jit() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op on first use (~1-2 min of
    C++ build); gloo does the same work, so on CPU the op is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class LearnerWorker:
    """Plain class; ``learner.group`` wraps it with ``ray.remote``."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, policy_cfg: PolicyConfig,
                 learner_cfg: Any, algo_cfg: Any, sft_cfg: Any, seed: int = 0, num_threads: int = 1,
                 sde_steps: int = 8) -> None:
        """``learner_cfg`` / ``algo_cfg`` / ``sft_cfg``: the run config's frozen ``learner`` / ``algorithm`` /
        ``sft`` sections (``services.config``), read by attribute; ``sde_steps``: the rollout's denoising steps
        (stage 1 samples its noisy latents on the same schedule)."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0")
        torch.set_num_threads(max(1, num_threads))
        torch.manual_seed(seed)
        import deepspeed

        self.rank, self.world_size = rank, world_size
        self.cuda = torch.cuda.is_available() and learner_cfg.num_gpus_per_worker > 0
        if not self.cuda:
            _cpu_deepspeed_without_jit()
        deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo")
        self.cfg, self.algo, self.sft_cfg, self.sde_steps = learner_cfg, algo_cfg, sft_cfg, sde_steps
        self.policy = build_policy(policy_cfg)
        self._freeze(learner_cfg)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        understanding = {id(p) for m in self.policy.module_groups()["understanding"] for p in m.parameters()}
        groups = [{"params": [p for p in params if id(p) in understanding], "understanding": True,
                   "lr": learner_cfg.lr * learner_cfg.lm_lr_scale},
                  {"params": [p for p in params if id(p) not in understanding], "understanding": False}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learner_cfg.lr, fused=True,
                                      betas=tuple(learner_cfg.betas), weight_decay=learner_cfg.weight_decay)
        bf16 = policy_cfg.dtype == "bfloat16"
        # ZeRO 0 in fp32: DeepSpeed clips with torch's clip_grad_norm_ and drops the norm it returns, so the
        # learner clips there itself (same call, same place: after the reduction, before the step) and
        # reports the norm; elsewhere DeepSpeed's optimizer clips and reports it
        self._trainable = params
        self._clip_here = learner_cfg.zero_stage == 0 and not bf16
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0 if self._clip_here else learner_cfg.grad_clip,
            "zero_optimization": {"stage": learner_cfg.zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.policy, optimizer=optimizer, model_parameters=params, config=ds_config)
        if world_size == 1 and learner_cfg.zero_stage == 0:
            # one rank: the data-parallel all-reduce is the identity, but DeepSpeed still flattens every
            # gradient into buckets, reduces and copies them back (40 ms of a 0.4 s backward at 256 x 12)
            self.engine.enable_backward_allreduce = False
        self.shared_prefix = learner_cfg.shared_prefix
        self.settings = GRPOSettings.from_dict(algo_cfg.model_dump())
        self.publisher = make_publisher(learner_cfg.sync.backend, bucket_mb=learner_cfg.sync.bucket_mb)
        self.reference: Policy | None = None
        self.version = 0
        self.steps_done = 0
        self.sft_generator = torch.Generator().manual_seed(seed + 17)

    # ---- set-up ----------------------------------------------------------------------------
    def _freeze(self, cfg: Any) -> None:
        p, groups = self.policy, self.policy.module_groups()
        if not cfg.train_lm:
            for m in groups["understanding"]:
                m.requires_grad_(False)
        if not cfg.train_generator or p.cfg.freeze_generator:
            for m in groups["generation"]:
                m.requires_grad_(False)

    def set_sampling(self, temperature: float, noise_level: float) -> None:
        """The rollout's temperature and SDE noise level: the learner recomputes log-probs under them."""
        self.settings.temperature, self.settings.noise_level = temperature, noise_level

    def snapshot_reference(self) -> None:
        """Freeze a plain (not DeepSpeed-managed) copy of the current policy as the KL reference, only
        when a KL term is on. Built from the config, then loaded with the (gathered) current weights."""
        if self.settings.beta_text or self.settings.beta_img:
            reference = build_policy(self.policy.cfg)
            with self._gathered():
                reference.load_trainable({k: v.detach().clone() for k, v in self.policy.trainable_state_dict().items()})
            self.reference = reference.to(self.policy.device).eval().requires_grad_(False)

    @contextlib.contextmanager
    def _gathered(self):
        """Full parameters on every rank (a no-op below ZeRO-3)."""
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.policy.parameters()), modifier_rank=None):
                yield
        else:
            yield

    # ---- training --------------------------------------------------------------------------
    def _step(self, loss: torch.Tensor) -> dict[str, float]:
        """Backward, gradient clipping and one optimizer step; the gradient norm before clipping."""
        self.engine.backward(loss)
        norm = None
        if self._clip_here:
            clip = self.cfg.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(self._trainable, clip if clip > 0 else float("inf"))
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if norm is None else norm
        return {} if norm is None else {"grad_norm": float(norm)}

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        """GRPO + Flow-GRPO on this rank's shard: recompute old log-probs, then a step per mini-batch.
        With one mini-batch the old log-probs are the training forward's own values, detached (the
        ratio is 1 at the only update), which saves a full forward pass."""
        t0 = time.perf_counter()
        self.engine.train()
        s = self.settings
        batch = batch.to(self.policy.device)  # trajectories arrive on the CPU
        n = batch.input_ids.shape[0]
        chunks = torch.arange(n, device=batch.input_ids.device).chunk(max(1, min(self.cfg.mini_batches, n)))
        old = None
        if len(chunks) > 1:
            with torch.no_grad():
                old = policy_outputs(self.policy, batch, s.temperature, s.noise_level, self.shared_prefix)
        with torch.no_grad():
            ref = None if self.reference is None else policy_outputs(self.reference, batch, s.temperature,
                                                                     s.noise_level, self.shared_prefix)
        rows = []
        for idx in chunks:
            mb = batch if len(chunks) == 1 else batch.select(idx)
            out = policy_outputs(self.policy, mb, s.temperature, s.noise_level, self.shared_prefix)
            mb_old = _detached(out) if old is None else _select_outputs(old, batch, idx)
            mb_ref = None if ref is None else _select_outputs(ref, batch, idx)
            loss, m = grpo_loss(out, mb_old, mb, s, mb_ref)
            m.update(self._step(loss))
            rows.append(m)
        metrics = _behaviour_gap(batch, mb_old if old is None else old)  # one chunk: its outputs are the old ones
        metrics.update(average_metrics(rows))
        self.steps_done += 1
        metrics["learn/time_s"] = time.perf_counter() - t0
        return metrics

    def sft_step(self, examples: list[dict]) -> dict[str, float]:
        """Stage 1 on raw examples (see ``learner.sft``): text cross-entropy + flow matching + bridge."""
        self.engine.train()
        batch = sft_batch(self.policy, examples, self.sde_steps, self.sft_generator).to(self.policy.device)
        loss, m = sft_loss(self.policy, batch, self.sft_cfg.text_weight, self.sft_cfg.flow_weight,
                           self.sft_generator)
        m.update({f"sft/{k}": v for k, v in self._step(loss).items()})
        return m

    def set_lr(self, lr: float, reset_state: bool = False, lm_scale: float = 1.0) -> None:
        """New learning rate (the LM and bridge at ``lr * lm_scale``); ``reset_state`` also drops the
        optimizer's moments (a fresh AdamW for the next stage: SFT's second moments would otherwise shrink
        the first RL updates for hundreds of steps)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * lm_scale if g.get("understanding") else lr
        if reset_state:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the torch optimizer
            inner.state.clear()

    # ---- weights out -----------------------------------------------------------------------
    def publish(self, bump: bool = True):
        """Bucket the trainable weights into the sync backend; returns the WeightHandle (rank 0)."""
        if bump:
            self.version += 1
        with self._gathered():
            if self.rank != 0:
                return None
            state = {k: v.detach().cpu() for k, v in self.policy.trainable_state_dict().items()}
            return self.publisher.publish(self.version, state.items())

    def save(self, directory: str) -> None:
        """Weights as safetensors (rank 0), optimizer and engine state through DeepSpeed (all ranks)."""
        d = Path(directory)
        with self._gathered():
            if self.rank == 0:
                self.policy.save_pretrained(d / "policy")
        self.engine.save_checkpoint(str(d / "deepspeed"), tag="state", exclude_frozen_parameters=True,
                                    client_state={"version": self.version, "steps_done": self.steps_done})
        if self.rank == 0:
            torch_state = {"sft_generator": self.sft_generator.get_state().tolist()}
            (d / "learner_rng.json").write_text(__import__("json").dumps(torch_state))

    def load(self, directory: str) -> int:
        import json

        d = Path(directory)
        _, client = self.engine.load_checkpoint(str(d / "deepspeed"), tag="state", load_module_strict=False)
        if client is None:
            raise RuntimeError(f"checkpoint {d}: DeepSpeed state could not be loaded")
        self.version, self.steps_done = int(client["version"]), int(client["steps_done"])
        rng = json.loads((d / "learner_rng.json").read_text())
        self.sft_generator.set_state(torch.tensor(rng["sft_generator"], dtype=torch.uint8))
        return self.version

    def weights_digest(self) -> dict[str, float]:
        """Parameter sums, to check that workers hold the learner's weights."""
        with self._gathered():
            return self.policy.weights_digest()


def _behaviour_gap(batch: TrainBatch, old: PolicyOutputs) -> dict[str, float]:
    """How far the rollout's behaviour log-probs are from the learner's recomputation (should be ~0)."""
    m = batch.loss_mask
    out = {"learn/logp_gap_text": float((old.logp - batch.behaviour_logp)[m].abs().max()) if m.any() else 0.0}
    if old.img_logp is not None:
        out["learn/logp_gap_image"] = float((old.img_logp - batch.seg_log_probs).abs().max())
    return out


def _detached(o: PolicyOutputs) -> PolicyOutputs:
    d = lambda t: None if t is None else t.detach()  # noqa: E731
    return PolicyOutputs(d(o.logp), d(o.entropy), d(o.img_logp), d(o.img_mean), d(o.img_std))


def _select_outputs(o: PolicyOutputs, batch: TrainBatch, rows: torch.Tensor) -> PolicyOutputs:
    seg = torch.isin(batch.seg_rows, rows)
    pick = lambda t: None if t is None else t[seg]  # noqa: E731
    return PolicyOutputs(o.logp[rows], o.entropy[rows], pick(o.img_logp), pick(o.img_mean), pick(o.img_std))
