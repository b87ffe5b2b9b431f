"""The learner's objectives over a :class:`TrainBatch`: the unified GRPO loss (text tokens and denoising
steps under one advantage) and the stage-1 supervised loss (text cross-entropy + flow matching)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from learner.batch import TrainBatch
from learner.losses import aggregation_denominator, image_policy_loss, text_policy_loss, total_loss
from learner.sft import SFTShard
from learner.sharding import GlobalCounts
from policy.prompting import mask_unsampleable
from policy.sde import restoration_flow, window_log_probs
from policy.shared_prefix import (
    PrefixPlan,
    lm_hidden_shared_prefix,
    plan_shared_prefix,
    shared_prefix_off,
    takes_block_mask,
)


@dataclass
class GRPOSettings:
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl: str = "k3"
    beta_text: float = 0.0
    agg: str = "token-mean"
    clip_img: float = 1e-3
    beta_img: float = 0.0
    lambda_img: float = 1.0
    temperature: float = 1.0
    noise_level: float = 0.7

    @classmethod
    def from_dict(cls, d: dict) -> GRPOSettings:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class PolicyOutputs:
    logp: torch.Tensor  # (B, T): logp[:, t] = log p(x_t | x_<t) where x_t was sampled (loss_mask), else 0
    entropy: torch.Tensor  # (B, T): of the distribution x_t was drawn from, where sampled, else 0
    img_logp: torch.Tensor | None  # (S, W)
    img_mean: torch.Tensor | None  # (S, W, C, h, w)
    img_std: torch.Tensor | None  # (S, W)


def _conditioning(policy, hidden: torch.Tensor, batch: TrainBatch, repeat: int):
    """The generator's condition of each segment: from its row's hidden states in [``seg_cond_start``,
    ``seg_cond_end``), or, for segments with a condition sequence of their own (``seg_cond_ids``), from an LM
    pass over that sequence alone (the rollout's ``generate_images`` on the same ids)."""
    if batch.seg_cond_ids.shape[1]:
        ids = batch.seg_cond_ids
        attn = (torch.arange(ids.shape[1], device=ids.device)[None] < batch.seg_cond_end[:, None]).long()
        hidden = policy.lm_hidden(ids, attn)
        enc, pooled = policy.condition(hidden, batch.seg_cond_end, cond_start=batch.seg_cond_start)
    else:
        enc, pooled = policy.condition(hidden[batch.seg_rows], batch.seg_cond_end, cond_start=batch.seg_cond_start)
    return enc.repeat_interleave(repeat, 0), pooled.repeat_interleave(repeat, 0)


def shared_prefix_plan(policy, batch: TrainBatch, shared_prefix: bool = True) -> PrefixPlan | None:
    """The packed layout :func:`lm_hidden` runs the batch in, or None for the padded forward: ``shared_prefix``
    off, an attention implementation without custom masks, a batch holding a VLM's input images (the reason
    is logged once, ``policy.shared_prefix.shared_prefix_off``), or no prompt shared by two rows."""
    if not (shared_prefix and takes_block_mask(policy.lm_config)) or shared_prefix_off(batch.vision_images):
        return None
    # rows with an image conditioned on their whole sequence (GvU's prompt) need their last token's hidden
    # state; segments with a condition sequence of their own (UAE, ``seg_cond_ids``) do not read the row
    length = batch.attention_mask.sum(1)
    keep_last = torch.zeros_like(length, dtype=torch.bool)
    if batch.seg_cond_ids.shape[1] == 0:
        keep_last[batch.seg_rows[batch.seg_cond_end == length[batch.seg_rows]]] = True
    return plan_shared_prefix(batch.input_ids, batch.attention_mask, batch.loss_mask, batch.slot_counts,
                              batch.slot_latents, policy.token_ids["img"], policy.n_image_tokens, keep_last)


def lm_hidden(policy, batch: TrainBatch, shared_prefix: bool = True) -> torch.Tensor:
    """The LM's last hidden states (B,T,H) of the batch, no LM head; ``shared_prefix``: each distinct
    prompt once, followed by the completions that continue it (``policy.shared_prefix``: same values,
    fewer tokens through the LM; :func:`shared_prefix_plan` says when the padded batch runs instead)."""
    plan = shared_prefix_plan(policy, batch, shared_prefix)
    if plan is None:
        return policy.lm_hidden(batch.input_ids, batch.attention_mask, batch.slot_latents, batch.vision_images)
    return lm_hidden_shared_prefix(policy, batch.input_ids, batch.attention_mask, batch.slot_latents, plan)


def policy_outputs(policy, batch: TrainBatch, temperature: float, noise_level: float,
                   shared_prefix: bool = True) -> PolicyOutputs:
    """One LM forward gives the token log-probs and, causally, the generator's conditioning; the image
    windows' log-probs are recomputed from the stored latents in one generator batch.

    Janus (``policy.arch == "janus"``): image codes are tokens of the sequence, so the one forward gives
    log p of text AND code tokens (each from its own head); there are no windows (``img_*`` None) and
    ``grpo_loss`` is the text policy loss alone, one advantage per trajectory."""
    if policy.arch == "janus":
        logp, entropy, _ = policy.token_stats(batch.input_ids, batch.attention_mask, temperature=temperature)
        return PolicyOutputs(logp, entropy, None, None, None)
    hidden = lm_hidden(policy, batch, shared_prefix)
    # the LM head only where a token was sampled: logits at t predict token t + 1
    sampled = batch.loss_mask[:, 1:]
    logits = policy.text_logits(hidden[:, :-1][sampled])  # (N, V), N sampled tokens
    logits = mask_unsampleable(logits.float(), policy.token_ids)
    logp_all = torch.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    lp = logp_all.gather(-1, batch.input_ids[:, 1:][sampled][:, None]).squeeze(-1)
    lp = torch.where(torch.isfinite(lp), lp, torch.zeros_like(lp))
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all.clamp(min=-1e4)).sum(-1)
    zeros = hidden.new_zeros(sampled.shape, dtype=lp.dtype)
    logp = F.pad(zeros.masked_scatter(sampled, lp), (1, 0))  # (B, T): 0 where nothing was sampled
    entropy = F.pad(zeros.detach().masked_scatter(sampled, ent), (1, 0))
    if batch.num_segments == 0 or batch.seg_latents.shape[1] == 0:
        return PolicyOutputs(logp, entropy, None, None, None)
    w = batch.seg_latents.shape[1]
    enc, pooled = _conditioning(policy, hidden, batch, w)
    img_logp, mean, std = window_log_probs(
        lambda x, s: policy.velocity(x, s, enc, pooled),
        batch.seg_latents, batch.seg_next_latents, batch.seg_sigmas, batch.seg_sigma_nexts, noise_level,
    )
    return PolicyOutputs(logp, entropy, img_logp, mean, std)


def grpo_loss(
    out: PolicyOutputs, old: PolicyOutputs, batch: TrainBatch, s: GRPOSettings, ref: PolicyOutputs | None = None,
    counts: GlobalCounts | None = None, world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One rank's share of a global mini-batch's loss, times the world size W:

        L_r = W * [ L_text,r + lambda_img * sum_{s,k} w_s l_{s,k} / (K * B) ],

    L_text,r: the text policy loss summed over this rank's rows and divided by the global mini-batch's
    count (``counts``: tokens for token-mean, sequences for the seq-mean modes); l_{s,k} the Flow-GRPO
    term of image segment s's step k under its advantage (``seg_advantages``: its row's, plus a denoising-only
    reward's when one is configured), w_s its weight, B the global mini-batch's
    trajectories (the image term is averaged per trajectory: a batch where few samples generated gives
    those few images their share of the batch). DeepSpeed averages gradients over the W ranks, so the
    step follows grad of sum_r L_r / W: one rank's loss on the whole mini-batch. ``counts`` None: this
    batch alone is the mini-batch (W = 1)."""
    if counts is None:
        counts = GlobalCounts(int(batch.loss_mask.sum()), batch.num_rows, int(batch.input_ids.shape[1]))
    text, tm = text_policy_loss(
        out.logp, old.logp, batch.advantages, batch.loss_mask,
        ref_logp=None if ref is None else ref.logp, clip_low=s.clip_low, clip_high=s.clip_high,
        beta=s.beta_text, kl=s.kl, agg=s.agg, row_weight=batch.row_weight,
        denominator=aggregation_denominator(s.agg, counts.tokens, counts.sequences, counts.width),
    )
    metrics = {f"text/{k}": v for k, v in tm.items()}
    mask = batch.loss_mask.float() * batch.row_weight[:, None]
    metrics["text/entropy"] = ((out.entropy * mask).sum() / mask.sum().clamp(min=1)).item()
    image = None
    if out.img_logp is not None:
        image, im = image_policy_loss(
            out.img_logp, old.img_logp, batch.seg_advantages, clip=s.clip_img, beta=s.beta_img,
            mean=out.img_mean, ref_mean=None if ref is None else ref.img_mean, std=out.img_std,
            weight=batch.seg_weight, denominator=float(out.img_logp.shape[1] * max(1, counts.sequences)),
        )
        metrics.update({f"image/{k}": v for k, v in im.items()})
        metrics["image/loss"] = world_size * image.item()
    loss = world_size * total_loss(text, image, s.lambda_img)
    metrics["text/loss"] = world_size * text.item()
    metrics["loss"] = loss.item()
    return loss, metrics


def sft_loss(
    policy, shard: SFTShard, text_weight: float = 1.0, flow_weight: float = 1.0, world_size: int = 1,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Stage 1: text cross-entropy on the target tokens + flow matching that restores each image
    segment's target latent (``seg_final``) from the sampler's start (noise; at ``rollout.sde.strength`` s < 1
    the noised input latent, ``policy.sde.restoration_flow``), conditioned on the context before it; this
    rank's share of the global batch's loss, times the world size W (DeepSpeed averages gradients over ranks):

        x_t = x_0 + u (x_s - x_0),  t = s u,  v* = (x_s - x_0) / s     (s = 1: x_t = (1 - t) x_0 + t eps, v* = eps - x_0)
        L_r = W * [ text_weight * sum_{rows of r} w CE / N_tokens
                    + flow_weight * sum_{images of r} w mean_latent ||v(x_t, t) - v*||^2 / N_images ].
    """
    batch = shard.batch
    logits, hidden = policy.lm_forward(batch.input_ids, batch.attention_mask, batch.slot_latents,
                                       images=batch.vision_images)
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.loss_mask[:, 1:].float() * batch.row_weight[:, None]
    ce = -world_size * (logp * mask).sum() / max(1, shard.tokens)
    loss = text_weight * ce
    metrics = {"sft/text_ce": ce.item()}
    if batch.num_segments:
        x0, dev = batch.seg_final, batch.seg_final.device
        sources = None if shard.flow_sources is None else shard.flow_sources.to(dev)
        xt, t, target = restoration_flow(x0, shard.flow_noise.to(dev), sources, shard.flow_times.to(dev),
                                         shard.strength if sources is not None else 1.0)
        enc, pooled = _conditioning(policy, hidden, batch, 1)
        err = (policy.velocity(xt, t, enc, pooled) - target).pow(2).flatten(1).mean(-1)
        fm = world_size * (batch.seg_weight * err).sum() / max(1, shard.images)
        loss = loss + flow_weight * fm
        metrics["sft/flow_mse"] = fm.item()
    with torch.no_grad():
        pred = logits[:, :-1].argmax(-1) == batch.input_ids[:, 1:]
        metrics["sft/token_acc"] = ((pred.float() * mask).sum() / mask.sum().clamp(min=1)).item()
    metrics["sft/loss"] = loss.item()
    return loss, metrics
