"""What every policy class offers (``UnifiedPolicy``, ``JanusPolicy``): the surface the learner, the rollout
workers, weight sync and the rewards use without knowing the architecture.

Where the two truly differ (latents and SDE windows vs image-code tokens) callers branch on ``arch``. The
learner reaches the language model only through ``lm_config`` and ``text_logits``, not through an attribute
of one class (``UnifiedPolicy.lm``, ``JanusPolicy.model``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class Policy(Protocol):
    arch: str  # PolicyConfig.arch of the class ("unified" | "janus")
    cfg: Any  # the PolicyConfig it was built from (None for a Janus loaded without one)
    tokenizer: Any
    token_ids: dict[str, int]  # special tokens: pad, eos, img, gen, ...

    @property
    def device(self) -> torch.device: ...

    @property
    def n_image_tokens(self) -> int:
        """Tokens of one image in the sequence (latent slot placeholders, or VQ codes)."""
        ...

    @property
    def lm_config(self) -> Any:
        """The language model's transformers config (``hidden_size``, ``_attn_implementation``, ...)."""
        ...

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on last hidden states (..., H) -> text-vocabulary logits (..., V)."""
        ...

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       images: torch.Tensor | None = None, temperature: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp (B,T), hidden (B,T,H)): ``logp[:, t] = log p(x_t | x_<t)``; ``images`` are the sequence's
        image inputs (slot latents of a unified policy, understanding pixels of Janus)."""
        ...

    def module_groups(self) -> dict[str, list[nn.Module]]:
        """Trainable sub-modules by side: ``understanding`` and ``generation``."""
        ...

    def trainable_state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]: ...

    def load_trainable(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       share: bool = False) -> int: ...

    def weights_digest(self) -> dict[str, float]: ...

    def adapted_modules(self) -> dict[str, list[str]]:
        """LoRA: adapted module -> its adapter tensors' names (``sync.manifest`` verifies each); {} without."""
        ...

    def save_pretrained(self, directory: str | Path) -> None: ...

    def train(self, mode: bool = True) -> Any: ...

    def eval(self) -> Any: ...

    def to(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterable[nn.Parameter]: ...
