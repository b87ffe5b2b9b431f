"""Named-tensor helpers every policy class uses for its weights: digests and in-place loads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


@torch.no_grad()
def tensor_sums(named: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Name -> float64 sum of the tensor (a replica's weights digest)."""
    return {k: float(v.double().sum()) for k, v in named.items()}


@torch.no_grad()
def load_named_tensors(
    own: dict[str, torch.Tensor], named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    share: bool = False,
) -> int:
    """Load (name, tensor) pairs into ``own`` in place; unknown names or shape mismatches raise.

    ``share``: a received tensor of the destination's dtype and device becomes the destination's storage
    (``own[name].data = tensor``) instead of being copied into it. ``own`` then holds the parameter objects
    themselves (``state_dict(keep_vars=True)``), so every module that uses one (tied weights included) sees
    the new data. This is how a rollout replica takes its weights from a receiver whose tensors are its own
    to keep (``sync.WeightReceiver``): an object-store receiver's zero-copy views of shared memory (read
    only: a replica that never trains never writes them), a collective's fresh receive buffers. Other
    tensors (another dtype or device, empty) are copied."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    n = 0
    for name, tensor in items:
        if name not in own:
            raise KeyError(f"load_trainable: unknown tensor {name!r}")
        dst = own[name]
        if dst.shape != tensor.shape:
            raise ValueError(f"load_trainable: {name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
        if share and tensor.dtype == dst.dtype and tensor.device == dst.device and tensor.numel():
            dst.data = tensor
        else:
            dst.copy_(tensor)
        n += 1
    return n
