"""Group-relative advantages (GRPO): one scalar per trajectory, shared by its text tokens and its
denoising steps."""

from __future__ import annotations

import torch


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (n_samples,), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise TypeError(f"rewards must be a floating tensor, got {rewards.dtype}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps); scale="none" (Dr. GRPO) omits the division.

    ``rewards`` is (n_groups * group_size,), grouped contiguously; the result has the same shape.
    """
    g = _groups(rewards, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "std":
        std = g.std(dim=1, keepdim=True, unbiased=group_size > 1)
        centred = centred / (std + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none', got {scale!r}")
    return centred.reshape(rewards.shape)


def zero_variance_groups(rewards: torch.Tensor, group_size: int, tol: float = 1e-8) -> torch.Tensor:
    """(n_groups,) bool: groups whose rewards are all equal (they carry no learning signal)."""
    g = _groups(rewards, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) <= tol
