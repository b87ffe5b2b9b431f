"""Named-tensor helpers every policy class uses for its weights: digests and in-place copies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


@torch.no_grad()
def tensor_sums(named: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Name -> float64 sum of the tensor (a replica's weights digest)."""
    return {k: float(v.double().sum()) for k, v in named.items()}


@torch.no_grad()
def copy_named_tensors(
    own: dict[str, torch.Tensor], named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
) -> int:
    """Copy (name, tensor) pairs into ``own`` in place; unknown names or shape mismatches raise."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    n = 0
    for name, tensor in items:
        if name not in own:
            raise KeyError(f"load_trainable: unknown tensor {name!r}")
        if own[name].shape != tensor.shape:
            raise ValueError(f"load_trainable: {name} has shape {tuple(tensor.shape)}, expected {tuple(own[name].shape)}")
        own[name].copy_(tensor)
        n += 1
    return n
