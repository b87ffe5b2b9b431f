"""Policy losses: GRPO on text tokens, Flow-GRPO on denoising steps, and their sum.

Pure functions of tensors; registries name the KL estimators and token aggregations (as verl does), so a
config picks them by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOG_RATIO_CLAMP = 20.0
KL_CLAMP = 10.0


# KL(pi || pi_ref) per token, from d = logp - logp_ref.
def _kl_k1(d: torch.Tensor) -> torch.Tensor:
    return d  # k1 = logp - logp_ref


def _kl_k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d**2  # k2 = 0.5 (logp - logp_ref)^2


def _kl_k3(d: torch.Tensor) -> torch.Tensor:
    return torch.exp(-d) - (-d) - 1  # k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1  (>= 0)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _kl_k1, "k2": _kl_k2, "k3": _kl_k3}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, log-ratio clamped to +-20 and the result to +-10 for stability."""
    if kl not in KL_ESTIMATORS:
        raise ValueError(f"kl must be one of {sorted(KL_ESTIMATORS)}, got {kl!r}")
    d = (logp - ref_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return KL_ESTIMATORS[kl](d).clamp(-KL_CLAMP, KL_CLAMP)


# Aggregations of a (B, T) per-token loss under a (B, T) mask (row weights folded in). ``denom``: the
# global count the sum is divided by (NeMo-RL's global normalisation: every rank and mini-batch divides by
# the whole mini-batch's count, so W ranks' summed shares are one rank's loss); None: this batch's own.
def _token_mean(x: torch.Tensor, m: torch.Tensor, denom: float | None = None) -> torch.Tensor:
    return (x * m).sum() / (m.sum().clamp(min=1) if denom is None else denom)  # sum_bt x m / sum_bt m


def _seq_mean_token_mean(x: torch.Tensor, m: torch.Tensor, denom: float | None = None) -> torch.Tensor:
    per_seq = (x * m).sum(-1) / m.sum(-1).clamp(min=1)  # mean_b (sum_t x m / sum_t m)
    return per_seq.mean() if denom is None else per_seq.sum() / denom


def _seq_mean_token_sum_norm(x: torch.Tensor, m: torch.Tensor, denom: float | None = None) -> torch.Tensor:
    return (x * m).sum() / (m.shape[0] * m.shape[1] if denom is None else denom)  # Dr. GRPO: / (B * T_max)


AGGREGATIONS: dict[str, Callable[..., torch.Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def aggregation_denominator(agg: str, tokens: int, sequences: int, width: int) -> float:
    """The global count ``agg`` divides by: tokens (token-mean), sequences (seq-mean-token-mean) or
    sequences x padded width (seq-mean-token-sum-norm)."""
    return float(max(1, {"token-mean": tokens, "seq-mean-token-mean": sequences,
                         "seq-mean-token-sum-norm": sequences * width}[agg]))


def _check(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _per_sequence_shape(name: str, x: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, dims: str) -> tuple[int, int]:
    """(B, N) of a (B, N) log-prob tensor whose old values match it and whose advantages are (B,)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be ({dims}), got shape {tuple(x.shape)}")
    b, n = x.shape
    _check(name, x, (b, n))
    _check(f"old_{name}", old, (b, n))
    _check("advantages", adv, (b,))
    return b, n


def _ratio_stats(ratio: torch.Tensor, sel: torch.Tensor) -> dict[str, float]:
    r = ratio.detach()[sel]
    if r.numel() == 0:
        return {"ratio_min": 1.0, "ratio_mean": 1.0, "ratio_max": 1.0}
    return {"ratio_min": r.min().item(), "ratio_mean": r.mean().item(), "ratio_max": r.max().item()}


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO surrogate per element: max(-A rho, -A clip(rho, 1-eps_low, 1+eps_high)), rho = exp(logp - old).

    Returns (loss, rho, clipped_low, clipped_high); the clipped side passes no gradient.
    """
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    active = clipped > unclipped
    return loss, ratio, active & (ratio < 1 - clip_low), active & (ratio > 1 + clip_high)


def text_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    kl: str = "k3",
    agg: str = "token-mean",
    row_weight: torch.Tensor | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO on tokens. logp / old_logp / mask (B, T); advantages (B,), one per sequence.

    L_text = agg( max(-rho_t A, -clip(rho_t, 1-eps_low, 1+eps_high) A) + beta KL_t ),
    rho_t = exp(logp_t - logp_old_t), KL_t from ``kl`` in {k1, k2, k3} against ``ref_logp``;
    ``row_weight`` (B,) scales each row's mask (0: a padding row), ``denominator`` replaces the
    aggregation's own count (``aggregation_denominator`` over the global mini-batch).
    """
    b, t = _per_sequence_shape("logp", logp, old_logp, advantages, "batch, tokens")
    if mask.shape != (b, t):
        raise ValueError(f"mask must have shape {(b, t)}, got {tuple(mask.shape)}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {sorted(AGGREGATIONS)}, got {agg!r}")
    m = mask.to(logp.dtype) if row_weight is None else mask.to(logp.dtype) * row_weight[:, None].to(logp.dtype)
    sel = m > 0
    per_token, ratio, low, high = clipped_surrogate(logp, old_logp.detach(), advantages[:, None], clip_low, clip_high)
    metrics: dict[str, float] = {}
    if ref_logp is not None and beta != 0.0:
        _check("ref_logp", ref_logp, (b, t))
        kl_t = kl_penalty(logp, ref_logp.detach(), kl)
        per_token = per_token + beta * kl_t
        metrics["kl_ref"] = _token_mean(kl_t.detach(), m).item()
    loss = AGGREGATIONS[agg](per_token, m, denominator)
    n = m.sum().clamp(min=1)
    with torch.no_grad():
        d = (logp - old_logp).detach()
        metrics.update(
            clipfrac_low=(low & sel).sum().item() / n.item(),
            clipfrac_high=(high & sel).sum().item() / n.item(),
            approx_kl=_token_mean(0.5 * d**2, m).item(),  # k2(old || new), the usual PPO monitor
            **_ratio_stats(ratio, sel),
        )
    metrics["clipfrac"] = metrics["clipfrac_low"] + metrics["clipfrac_high"]
    return loss, metrics


def image_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip: float = 1e-4,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-GRPO on denoising steps. log_prob / old_log_prob (B, K); advantages (B,).

    L_img = sum_{b,k} w_b [ max(-rho_k A, -clip(rho_k, 1-eps, 1+eps) A)
                            + beta * mean_latent((mean_k - mean_ref_k)^2) / (2 std_k^2) ] / D,
    rho_k = exp(log_prob_k - log_prob_old_k); ``mean`` / ``ref_mean`` (B, K, ...) and ``std`` (B, K) are the
    SDE step's mean and standard deviation under the policy and the reference; ``weight`` w (B,) is 1 per
    image (0: a padding row's) and the denominator D is B * K (the mean) unless given.
    """
    b, k = _per_sequence_shape("log_prob", log_prob, old_log_prob, advantages, "batch, steps")
    per_step, ratio, low, high = clipped_surrogate(log_prob, old_log_prob.detach(), advantages[:, None], clip, clip)
    w = torch.ones(b, dtype=log_prob.dtype, device=log_prob.device) if weight is None else weight.to(log_prob.dtype)
    d = float(b * k) if denominator is None else denominator
    loss = (w[:, None] * per_step).sum() / d
    metrics: dict[str, float] = {}
    if beta != 0.0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("beta != 0 needs mean, ref_mean and std")
        if mean.shape[:2] != (b, k) or ref_mean.shape != mean.shape or std.shape != (b, k):
            raise ValueError(
                f"mean/ref_mean must be ({b}, {k}, ...) alike and std ({b}, {k}); got "
                f"{tuple(mean.shape)}, {tuple(ref_mean.shape)}, {tuple(std.shape)}"
            )
        sq = ((mean - ref_mean.detach()) ** 2).flatten(2).mean(-1)
        kl_steps = w[:, None] * sq / (2 * std.detach() ** 2)
        loss = loss + beta * kl_steps.sum() / d
        metrics["kl_ref"] = kl_steps.sum().item() / max(1.0, float(w.sum()) * k)
    sel = (w[:, None] > 0).expand_as(ratio)
    with torch.no_grad():
        n = max(1.0, float(sel.sum()))
        metrics.update(
            clipfrac=((low | high) & sel).sum().item() / n,
            approx_kl=(0.5 * (log_prob - old_log_prob) ** 2)[sel].sum().item() / n,
            **_ratio_stats(ratio, sel),
        )
    return loss, metrics


def total_loss(
    text_loss: torch.Tensor, image_loss: torch.Tensor | None, lambda_img: float = 1.0
) -> torch.Tensor:
    """L = L_text + lambda_img * L_img: one backward, one optimizer step over both modalities."""
    return text_loss if image_loss is None else text_loss + lambda_img * image_loss
