"""``object_store`` backend: each bucket's flat buffer is one ``ray.put`` (numpy, zero-copy on read).

Works for any topology and on CPU. The publisher keeps the refs of the last ``keep_last`` versions
alive and drops older ones; refs inside handles held by workers are kept alive by Ray's reference
counting, so dropping never pulls data out from under a receiver that already has the handle.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import ray
import torch

from .base import (
    WeightHandle,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    WeightSyncLost,
    WeightSyncTimeout,
)
from .buckets import BucketMeta, bucketize, dtype_from_str, unbucketize

__all__ = ["ObjectStorePublisher", "ObjectStoreReceiver"]


class ObjectStorePublisher(WeightPublisher):
    """Publish buckets of ~``bucket_mb`` MiB to the Ray object store."""

    backend = "object_store"

    def __init__(self, bucket_mb: float = 32.0, keep_last: int = 1) -> None:
        if bucket_mb <= 0 or keep_last < 1:
            raise ValueError("bucket_mb must be > 0 and keep_last >= 1")
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self.keep_last = keep_last
        self._live: deque[tuple[int, list[ray.ObjectRef]]] = deque()
        self.last_version: int | None = None

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightHandle:
        if self.last_version is not None and version <= self.last_version:
            raise ValueError(f"version {version} is not newer than the last published {self.last_version}")
        buckets = bucketize(named_tensors, self.bucket_bytes, device="cpu")
        refs = [ray.put(b.buffer.view(torch.uint8).numpy()) for b in buckets]
        self._live.append((version, refs))
        while len(self._live) > self.keep_last:
            self._live.popleft()
        self.last_version = version
        return WeightHandle(
            version=version,
            backend=self.backend,
            buckets=tuple(b.meta for b in buckets),
            total_bytes=sum(b.nbytes for b in buckets),
            refs=tuple(refs),
        )

    @property
    def live_versions(self) -> list[int]:
        """Versions whose objects this publisher still pins."""
        return [v for v, _ in self._live]

    def close(self) -> None:
        self._live.clear()


def _as_tensor(meta: BucketMeta, array: np.ndarray) -> torch.Tensor:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.nbytes != meta.nbytes:
        raise WeightSyncError(
            f"bucket object does not match its metadata ({meta.dtype} x {meta.numel} = {meta.nbytes} bytes)"
        )
    with warnings.catch_warnings():  # zero-copy views of the read-only object store buffer
        warnings.filterwarnings("ignore", message=".*not writable.*")
        raw = torch.from_numpy(array)
    return raw.view(dtype_from_str(meta.dtype))


class ObjectStoreReceiver(WeightReceiver):
    """Fetch all buckets of a handle with one bounded ``ray.get``; yields read-only views.

    ``device``: move each bucket there (one copy per bucket); ``None`` keeps zero-copy CPU views,
    which must be copied (e.g. ``param.copy_(t)``) rather than written to.
    """

    backend = "object_store"

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device

    def receive(self, handle: WeightHandle, timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
        self._check(handle)
        if len(handle.refs) != len(handle.buckets):
            raise WeightSyncError(f"handle of version {handle.version} has {len(handle.refs)} refs for "
                                  f"{len(handle.buckets)} buckets")
        try:
            arrays = ray.get(list(handle.refs), timeout=timeout_s) if handle.refs else []
        except ray.exceptions.GetTimeoutError as e:
            raise WeightSyncTimeout(handle.version, self.backend, timeout_s,
                                    f"{len(handle.refs)} bucket(s), {handle.total_bytes} bytes not fetched") from e
        except ray.exceptions.ObjectLostError as e:  # freed, owner died, reconstruction failed
            raise WeightSyncLost(handle.version, self.backend, timeout_s,
                                 f"bucket object lost ({type(e).__name__})") from e
        except ray.exceptions.RayError as e:
            raise WeightSyncError(f"weight sync of version {handle.version} via {self.backend!r} failed: {e}") from e
        buffers = [_as_tensor(m, a) for m, a in zip(handle.buckets, arrays, strict=True)]
        if self.device is not None:
            buffers = [b.to(self.device) for b in buffers]
        return self._iterate(handle.buckets, buffers)

    @staticmethod
    def _iterate(metas: tuple[BucketMeta, ...], buffers: list[torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        for meta, buf in zip(metas, buffers, strict=True):
            yield from unbucketize((meta, buf))
