"""Bucketing: pack many tensors into few flat, contiguous, single-dtype buffers (and unpack as views).

Weight sync never ships one parameter per call: the publisher packs the named tensors into buckets of
about ``bucket_bytes`` each (one dtype per bucket), ships each bucket's flat buffer in one transfer, and
the receiver rebuilds ``(name, tensor)`` pairs as views into the received buffer (no per-tensor copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["TensorMeta", "BucketMeta", "Bucket", "bucketize", "unbucketize", "dtype_from_str", "dtype_to_str"]


def dtype_to_str(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_str(name: str) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; unknown names raise ValueError."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor lives inside its bucket: ``offset`` and ``numel`` count elements of the bucket dtype."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class BucketMeta:
    """Picklable description of one bucket: dtype name, total elements, and the tensors in it (in order)."""

    dtype: str
    numel: int
    entries: tuple[TensorMeta, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_from_str(self.dtype).itemsize

    def empty(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """An uninitialised flat buffer this bucket fits in (what a collective receiver fills)."""
        return torch.empty(self.numel, dtype=dtype_from_str(self.dtype), device=device)


@dataclass
class Bucket:
    """A flat 1-D buffer of one dtype plus the metadata to cut it back into named tensors."""

    meta: BucketMeta
    buffer: torch.Tensor = field(repr=False)

    @property
    def nbytes(self) -> int:
        return self.meta.nbytes


def group_for_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> list[tuple[torch.dtype, list[tuple[str, torch.Tensor]]]]:
    """The bucket plan, without copying: (dtype, members) per bucket, in the order buckets open; a
    tensor larger than ``bucket_bytes`` gets a bucket of its own. Names must be unique."""
    items = [(name, t.detach()) for name, t in named_tensors]
    seen: set[str] = set()
    for name, _ in items:
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)

    plans: list[tuple[torch.dtype, list[tuple[str, torch.Tensor]]]] = []
    open_plan: dict[torch.dtype, int] = {}  # dtype -> index into plans
    open_bytes: dict[torch.dtype, int] = {}
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        idx = open_plan.get(t.dtype)
        if idx is None or (nbytes > 0 and open_bytes[t.dtype] > 0 and open_bytes[t.dtype] + nbytes > bucket_bytes):
            plans.append((t.dtype, []))
            idx = open_plan[t.dtype] = len(plans) - 1
            open_bytes[t.dtype] = 0
        plans[idx][1].append((name, t))
        open_bytes[t.dtype] += nbytes

    return plans


def bucketize(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    bucket_bytes: int,
    device: torch.device | str | None = "cpu",
) -> list[Bucket]:
    """Pack ``(name, tensor)`` pairs into flat per-dtype buffers of at most ``bucket_bytes`` each.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Tensors keep their input order within
    a dtype; buckets come out in the order they were opened. ``device=None`` keeps each bucket on the
    device of its first tensor. Names must be unique.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    plans = group_for_buckets(named_tensors, bucket_bytes)

    buckets: list[Bucket] = []
    for dtype, members in plans:
        numel = sum(t.numel() for _, t in members)
        dev = device if device is not None else members[0][1].device
        buffer = torch.empty(numel, dtype=dtype, device=dev)
        entries: list[TensorMeta] = []
        offset = 0
        for name, t in members:
            n = t.numel()
            if n:
                buffer[offset : offset + n].copy_(t.reshape(-1))
            entries.append(TensorMeta(name=name, shape=tuple(t.shape), offset=offset, numel=n))
            offset += n
        meta = BucketMeta(dtype=dtype_to_str(dtype), numel=numel, entries=tuple(entries))
        buckets.append(Bucket(meta=meta, buffer=buffer))
    return buckets


def unbucketize(bucket: Bucket | tuple[BucketMeta, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` views into the bucket's flat buffer (no copy; copy before mutating)."""
    meta, buffer = (bucket.meta, bucket.buffer) if isinstance(bucket, Bucket) else bucket
    if buffer.dim() != 1 or buffer.numel() != meta.numel or dtype_to_str(buffer.dtype) != meta.dtype:
        raise ValueError(
            f"buffer ({dtype_to_str(buffer.dtype)}, {tuple(buffer.shape)}) does not match bucket "
            f"({meta.dtype}, ({meta.numel},))"
        )
    for e in meta.entries:
        yield e.name, buffer[e.offset : e.offset + e.numel].view(e.shape)
