"""``unigrpo check-config --estimate``: the run config's model at full size on the meta device (no weights) and
the learner's memory per rank for its ZeRO stage, dtype, gradient checkpointing and offload settings
(``policy.estimate`` has the formulas)."""

from __future__ import annotations

from services.config import RunConfig

PROMPT_TOKENS = 64  # text of a prompt (question, description) besides its image slots, for the activation line


def memory_settings(cfg: RunConfig):
    """The learner settings of ``cfg`` as ``policy.estimate.MemorySettings``."""
    from policy.estimate import MemorySettings, rows_per_rank

    le, a, r = cfg.learner, cfg.algorithm, cfg.rollout
    return MemorySettings(
        ranks=le.num_workers, zero_stage=le.zero_stage, dtype=cfg.model.dtype,
        gradient_checkpointing_lm=le.gradient_checkpointing_lm,
        gradient_checkpointing_generator=le.gradient_checkpointing_generator,
        offload_optimizer=le.offload_optimizer, offload_params=le.offload_params,
        kl_reference=bool(a.beta_text or a.beta_img),
        rows_per_rank=rows_per_rank(r.prompts_per_step * r.group_size, le.num_workers, le.mini_batches))


def estimate_text(cfg: RunConfig, title: str = "") -> str:
    """The parts table and the per-rank memory lines of ``cfg``."""
    from policy.estimate import estimate_memory, format_estimate, model_parts
    from recipes import get_recipe

    le = cfg.learner
    reads_generated = get_recipe(cfg.recipe).rollout == "interleaved"  # CLEAR answers after reading its image
    parts = model_parts(cfg.model, le.train_lm, le.train_generator, PROMPT_TOKENS + cfg.rollout.max_new_tokens,
                        cfg.rollout.sde.window, reads_generated)
    return format_estimate(estimate_memory(parts, memory_settings(cfg)), title)
