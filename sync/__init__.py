"""Weight sync from the learner to rollout workers: one contract (see ``base``), several backends.

``make_publisher(backend, **kw)`` / ``make_receiver(backend, **kw)`` pick a backend by name:
``object_store`` (default; Ray object store, any topology, CPU), ``nccl`` (GPU broadcast) and
``gloo`` (the nccl code path over gloo, CPU). Tensors always travel in buckets.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from . import manifest
from .base import (
    ModuleDigest,
    WeightHandle,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    WeightSyncLost,
    WeightSyncMismatch,
    WeightSyncTimeout,
)
from .buckets import Bucket, BucketMeta, TensorMeta, bucketize, unbucketize
from .nccl import NcclPublisher, NcclReceiver, free_port
from .object_store import RAY_SYSTEM_CONFIG, ObjectStorePublisher, ObjectStoreReceiver

__all__ = [
    "Bucket", "BucketMeta", "TensorMeta", "bucketize", "unbucketize",
    "ModuleDigest", "WeightHandle", "WeightPublisher", "WeightReceiver", "manifest",
    "WeightSyncError", "WeightSyncTimeout", "WeightSyncLost", "WeightSyncMismatch",
    "ObjectStorePublisher", "ObjectStoreReceiver", "RAY_SYSTEM_CONFIG", "NcclPublisher", "NcclReceiver", "free_port",
    "PUBLISHERS", "RECEIVERS", "BACKENDS", "make_publisher", "make_receiver", "transport",
]

PUBLISHERS: dict[str, Callable[..., WeightPublisher]] = {
    "object_store": ObjectStorePublisher,
    "nccl": partial(NcclPublisher, dist_backend="nccl"),
    "gloo": partial(NcclPublisher, dist_backend="gloo"),
}
RECEIVERS: dict[str, Callable[..., WeightReceiver]] = {
    "object_store": ObjectStoreReceiver,
    "nccl": partial(NcclReceiver, dist_backend="nccl"),
    "gloo": partial(NcclReceiver, dist_backend="gloo"),
}
BACKENDS = tuple(PUBLISHERS)


def _lookup(table: dict[str, Callable[..., Any]], backend: str) -> Callable[..., Any]:
    try:
        return table[backend]
    except KeyError:
        raise ValueError(f"unknown weight-sync backend {backend!r}; known: {', '.join(table)}") from None


def transport(backend: str, on_cuda: bool) -> str:
    """The transport a configured backend (``learner.sync.backend``) takes in a process: ``nccl`` is the
    collective group, over NCCL where the tensors are on a GPU and over gloo on the CPU."""
    if backend == "nccl":
        return "nccl" if on_cuda else "gloo"
    return backend


def make_publisher(backend: str = "object_store", **kw: Any) -> WeightPublisher:
    """Learner-side publisher, e.g. ``make_publisher("object_store", bucket_mb=32)``."""
    return _lookup(PUBLISHERS, backend)(**kw)


def make_receiver(backend: str = "object_store", **kw: Any) -> WeightReceiver:
    """Worker-side receiver, e.g. ``make_receiver("nccl", device="cuda")``."""
    return _lookup(RECEIVERS, backend)(**kw)
