"""The DeepSpeed learner: one Ray actor per rank, all in one placement group.

Each rank builds the policy of the config's ``model.arch`` (``policy.factory.build_policy``), wraps its
trainable part in a DeepSpeed engine (ZeRO stage from the config; torch's AdamW; gloo on CPU, NCCL on GPU),
recomputes old log-probs on its own model, and takes one optimizer step per mini-batch over both modalities
(a Janus policy: its image codes are tokens, so the text loss alone). Rank 0 publishes weights and writes
checkpoints.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from learner.batch import TrainBatch, average_metrics
from learner.memory import deepspeed_config
from learner.objective import GRPOSettings, PolicyOutputs, grpo_loss, policy_outputs, sft_loss
from learner.reference import CopyReference, LoraReference, make_reference
from learner.sft import sft_shard
from learner.sharding import RankShard
from policy.config import PolicyConfig
from policy.factory import build_policy
from policy.recompute import enable_gradient_checkpointing
from sync import free_port, make_publisher, manifest, transport


def _cpu_deepspeed_without_jit() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op on first use (~1-2 min of
    C++ build); gloo does the same work, so on CPU the op is marked unavailable."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


REFERENCE_FILE = "kl_reference.safetensors"


class LearnerWorker:
    """Plain class; ``learner.group`` wraps it with ``ray.remote``."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, policy_cfg: PolicyConfig,
                 learner_cfg: Any, algo_cfg: Any, sft_cfg: Any, seed: int = 0, num_threads: int = 1,
                 sde_cfg: Any = None) -> None:
        """``learner_cfg`` / ``algo_cfg`` / ``sft_cfg``: the run config's frozen ``learner`` / ``algorithm`` /
        ``sft`` sections (``services.config``), read by attribute; ``sde_cfg``: the rollout's ``sde`` section
        (stage 1 samples its own generations with the same steps and start; None: 8 steps from noise)."""
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
        self.cfg, self.algo, self.sft_cfg = learner_cfg, algo_cfg, sft_cfg
        self.sde_steps = 8 if sde_cfg is None else sde_cfg.steps
        self.sde_strength = 1.0 if sde_cfg is None else sde_cfg.strength
        self.policy = build_policy(policy_cfg)
        self._freeze(learner_cfg)
        # the learner's forward alone builds a backward graph: checkpointing is turned on here only
        enable_gradient_checkpointing(self.policy, learner_cfg.gradient_checkpointing_lm,
                                      learner_cfg.gradient_checkpointing_generator)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        understanding = {id(p) for m in self.policy.module_groups()["understanding"] for p in m.parameters()}
        groups = [{"params": [p for p in params if id(p) in understanding], "understanding": True,
                   "lr": learner_cfg.lr * learner_cfg.lm_lr_scale},
                  {"params": [p for p in params if id(p) not in understanding], "understanding": False,
                   "lr": learner_cfg.lr * learner_cfg.generator_lr_scale}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learner_cfg.lr, fused=True,
                                      betas=tuple(learner_cfg.betas), weight_decay=learner_cfg.weight_decay)
        bf16 = policy_cfg.dtype == "bfloat16"
        # ZeRO 0 in fp32: DeepSpeed clips with torch's clip_grad_norm_ and drops the norm it returns, so the
        # learner clips there itself (same call, same place: after the reduction, before the step) and
        # reports the norm; elsewhere DeepSpeed's optimizer clips and reports it
        self._trainable = params
        self._clip_here = learner_cfg.zero_stage == 0 and not bf16
        ds_config = deepspeed_config(learner_cfg, bf16, self._clip_here, self.cuda)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=self.policy, optimizer=optimizer, model_parameters=params, config=ds_config)
        if world_size == 1 and learner_cfg.zero_stage == 0:
            # one rank: the data-parallel all-reduce is the identity, but DeepSpeed still flattens every
            # gradient into buckets, reduces and copies them back (40 ms of a 0.4 s backward at 256 x 12)
            self.engine.enable_backward_allreduce = False
        self.shared_prefix = learner_cfg.shared_prefix
        self.settings = GRPOSettings.from_dict(algo_cfg.model_dump())
        self.publisher = make_publisher(transport(learner_cfg.sync.backend, self.cuda), bucket_mb=learner_cfg.sync.bucket_mb)
        self.reference: CopyReference | LoraReference | None = None
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
        """Freeze the current policy as the KL reference, only when a KL term is on (``learner.reference``: a
        plain copy built from the config and loaded with the (gathered) current weights; with LoRA, the
        adapter and head tensors only, the base being the learner's own)."""
        if self._kl_on:
            with self._gathered():
                self._set_reference({k: v.detach().clone() for k, v in self.policy.trainable_state_dict().items()})

    @property
    def _kl_on(self) -> bool:
        return bool(self.settings.beta_text or self.settings.beta_img)

    def _set_reference(self, trainable: dict[str, torch.Tensor]) -> None:
        self.reference = make_reference(self.policy, trainable)

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
        if self.cfg.zero_stage == 0:
            # a sub-module this mini-batch did not use has no gradient; ZeRO's flat partitions (and the
            # data-parallel all-reduce) treat it as zero, so AdamW's moments move it the same on every W
            for p in self._trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        norm = None
        if self._clip_here:
            clip = self.cfg.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(self._trainable, clip if clip > 0 else float("inf"))
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if norm is None else norm
        return {} if norm is None else {"grad_norm": float(norm)}

    def train_step(self, shard: RankShard) -> dict[str, float]:
        """GRPO + Flow-GRPO on this rank's shard (``learner.sharding``): recompute old log-probs, then one
        optimizer step per mini-batch, every rank in lock-step. With one mini-batch the old log-probs are
        the training forward's own values, detached (the ratio is 1 at the only update), which saves a
        full forward pass."""
        t0 = time.perf_counter()
        self.engine.train()
        s = self.settings
        mbs = [mb.to(self.policy.device) for mb in shard.minibatches]  # trajectories arrive on the CPU
        outputs = lambda policy, mb: policy_outputs(policy, mb, s.temperature, s.noise_level, self.shared_prefix)  # noqa: E731
        with torch.no_grad():
            olds = [outputs(self.policy, mb) for mb in mbs] if len(mbs) > 1 else None
            refs = [None] * len(mbs)
            if self.reference is not None:
                with self.reference.applied() as reference:
                    refs = [outputs(reference, mb) for mb in mbs]
        rows, gaps = [], []
        for i, mb in enumerate(mbs):
            out = outputs(self.policy, mb)
            old = _detached(out) if olds is None else olds[i]
            loss, m = grpo_loss(out, old, mb, s, refs[i], shard.counts[i], shard.world_size)
            m.update(self._step(loss))
            rows.append(m)
            gaps.append(_behaviour_gap(mb, old))
        metrics = {k: max(g[k] for g in gaps if k in g) for k in set().union(*gaps)}
        metrics.update(average_metrics(rows))
        self.steps_done += 1
        metrics["learn/time_s"] = time.perf_counter() - t0
        return metrics

    def sft_step(self, examples: list[dict]) -> dict[str, float]:
        """Stage 1 on the global batch of raw examples (see ``learner.sft``), this rank's share: text
        cross-entropy + flow matching + bridge."""
        self.engine.train()
        shard = sft_shard(self.policy, examples, self.sde_steps, self.sft_generator, self.rank, self.world_size,
                          self.sde_strength, self.sft_cfg.clean_slot_prob)
        shard.batch = shard.batch.to(self.policy.device)
        loss, m = sft_loss(self.policy, shard, self.sft_cfg.text_weight, self.sft_cfg.flow_weight, self.world_size)
        m.update({f"sft/{k}": v for k, v in self._step(loss).items()})
        return m

    def set_lr(self, lr: float, reset_state: bool = False, lm_scale: float = 1.0, generator_scale: float = 1.0) -> None:
        """New learning rate (the LM and bridge at ``lr * lm_scale``, the generator at ``lr * generator_scale``);
        ``reset_state`` also drops the optimizer's moments (a fresh AdamW for the next stage: SFT's second
        moments would otherwise shrink the first RL updates for hundreds of steps)."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr * (lm_scale if g.get("understanding") else generator_scale)
        if reset_state:
            inner = getattr(self.optimizer, "optimizer", self.optimizer)  # ZeRO wraps the torch optimizer
            inner.state.clear()

    # ---- weights out -----------------------------------------------------------------------
    def publish(self, bump: bool = True):
        """Bucket the trainable weights into the sync backend; returns the WeightHandle (rank 0). The
        collective backend stages a copy of them for ``send_weights`` (``sync.nccl.NcclPublisher.stage``)."""
        if bump:
            self.version += 1
        with self._gathered():
            if self.rank != 0:
                return None
            state = {k: v.detach().cpu() for k, v in self.policy.trainable_state_dict().items()}
            digests = manifest.build(state, self.policy.adapted_modules())  # LoRA: per adapted module
            ship = getattr(self.publisher, "stage", self.publisher.publish)
            return ship(self.version, state.items(), manifest=digests)

    def sync_rendezvous(self) -> tuple[str, int]:
        """This rank's node address and a free port there: where a collective weight group meets."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def join_sync_group(self, addr: str, port: int, world_size: int, rank: int, name: str, timeout_s: float) -> None:
        """Rank 0 joins the collective weight group as its publisher (``sync.group``)."""
        self.publisher.init_group(addr, port, world_size, rank, name, timeout_s)

    def send_weights(self, version: int, timeout_s: float) -> None:
        """Collective backend: broadcast the staged ``version`` to the weight group and wait until every
        receiver has it (called in the ``sync.group.WEIGHT_SYNC`` concurrency group, beside training)."""
        self.publisher.send(version, timeout_s)

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
            (d / "learner_rng.json").write_text(json.dumps(torch_state))
            if self.reference is not None:  # the KL reference's trainable part (the rest is the base model's)
                save_file({k: v.detach().cpu().contiguous() for k, v in self.reference.snapshot.items()},
                          str(d / REFERENCE_FILE))

    def load(self, directory: str) -> int:
        """Engine, optimizer, counters, stage-1 RNG and the KL reference from a checkpoint of ``save``."""
        d = Path(directory)
        _, client = self.engine.load_checkpoint(str(d / "deepspeed"), tag="state", load_module_strict=False)
        if client is None:
            raise RuntimeError(f"checkpoint {d}: DeepSpeed state could not be loaded")
        self.version, self.steps_done = int(client["version"]), int(client["steps_done"])
        rng = json.loads((d / "learner_rng.json").read_text())
        self.sft_generator.set_state(torch.tensor(rng["sft_generator"], dtype=torch.uint8))
        if (d / REFERENCE_FILE).exists():
            self._set_reference(load_file(str(d / REFERENCE_FILE)))
        elif self._kl_on:
            raise RuntimeError(f"checkpoint {d} has no {REFERENCE_FILE}, but algorithm.beta_text / beta_img > 0 "
                               "need the KL reference it was trained against")
        return self.version

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The full trainable weights on the CPU (gathered under ZeRO-3), every rank alike."""
        with self._gathered():
            return {k: v.detach().cpu().clone() for k, v in self.policy.trainable_state_dict().items()}

    def memory_report(self) -> dict[str, float]:
        """This rank's share of the parameters (its ZeRO-3 partition, else all of them) in MiB, and its
        process's peak resident memory in MiB."""
        import resource

        mib = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                  for p in self.policy.parameters()) / 2**20
        return {"param_mib": mib, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def weights_digest(self) -> dict[str, float]:
        """Parameter sums, to check that workers hold the learner's weights."""
        with self._gathered():
            return self.policy.weights_digest()


def _behaviour_gap(batch: TrainBatch, old: PolicyOutputs) -> dict[str, float]:
    """How far the rollout's behaviour log-probs are from the learner's recomputation (should be ~0);
    padding rows (weight 0) do not count."""
    m = batch.loss_mask & (batch.row_weight[:, None] > 0)
    out = {"learn/logp_gap_text": float((old.logp - batch.behaviour_logp)[m].abs().max()) if m.any() else 0.0}
    real = batch.seg_weight > 0
    if old.img_logp is not None and bool(real.any()):
        out["learn/logp_gap_image"] = float((old.img_logp - batch.seg_log_probs)[real].abs().max())
    return out


def _detached(o: PolicyOutputs) -> PolicyOutputs:
    d = lambda t: None if t is None else t.detach()  # noqa: E731
    return PolicyOutputs(d(o.logp), d(o.entropy), d(o.img_logp), d(o.img_mean), d(o.img_std))
