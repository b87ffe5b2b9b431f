"""The two small trainable heads between the LM and the latent space, and position helpers.

- :class:`LatentBridge` (the Latent Representation Bridge): latent (N, C, h, w) -> LM tokens
  (N, n_image_tokens, H) by patchifying with patch p, an MLP, and a learned position embedding.
- :class:`Connector`: LM hidden states -> generator conditioning (encoder_hidden_states, pooled).
"""

from __future__ import annotations

import torch
from torch import nn


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids ``cumsum(mask) - 1`` clamped at 0: left and right padding give the same values."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class LatentBridge(nn.Module):
    """Patchify a latent and project each patch to one LM input embedding."""

    def __init__(self, latent_channels: int, latent_side: int, patch: int, hidden_size: int):
        super().__init__()
        if latent_side % patch:
            raise ValueError(f"latent side {latent_side} is not divisible by bridge_patch {patch}")
        self.latent_channels = latent_channels
        self.latent_side = latent_side
        self.patch = patch
        self.n_tokens = (latent_side // patch) ** 2
        self.proj = nn.Sequential(
            nn.Linear(latent_channels * patch * patch, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.pos = nn.Parameter(torch.randn(self.n_tokens, hidden_size) * 0.02)

    def patchify(self, latent: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, (h/p)*(w/p), C*p*p), patches in row-major order."""
        n, c, h, w = latent.shape
        if (c, h, w) != (self.latent_channels, self.latent_side, self.latent_side):
            raise ValueError(
                f"bridge expects latents of shape (N, {self.latent_channels}, {self.latent_side}, "
                f"{self.latent_side}), got {tuple(latent.shape)}"
            )
        p = self.patch
        x = latent.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.patchify(latent.to(self.pos.dtype))
        return self.proj(x) + self.pos


class Connector(nn.Module):
    """LM hidden -> generator ``encoder_hidden_states`` (per token) and ``pooled`` (masked mean)."""

    def __init__(self, hidden_size: int, joint_dim: int, pooled_dim: int):
        super().__init__()
        self.tokens = nn.Linear(hidden_size, joint_dim)
        self.pooled = nn.Linear(hidden_size, pooled_dim)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (B, L, H), mask (B, L) bool -> ((B, L, D) zero where masked out, (B, P))."""
        m = mask.to(hidden.dtype).unsqueeze(-1)
        tokens = self.tokens(hidden) * m
        mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
        return tokens, self.pooled(mean)
