"""``object_store`` backend: each bucket is one ``ray.put`` (numpy, zero-copy on read).

A bucket's object is the list of its tensors' bytes (uint8 numpy views of the tensors themselves): Ray
writes them straight into the object store (pickle protocol 5, out-of-band buffers), so publishing copies
the weights once (parameters -> object store) instead of twice (parameters -> flat bucket -> object
store), and a receiver reads every tensor as a zero-copy view. The bucket layout (``BucketMeta``) is the
same as the collective backends' (``buckets.bucketize``); a flat uint8 buffer per bucket is accepted too.

Works for any topology and on CPU. The publisher keeps the refs of the last ``keep_last`` versions
alive and drops older ones; refs inside handles held by workers are kept alive by Ray's reference
counting, so dropping never pulls data out from under a receiver that already has the handle.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from .base import (
    WeightHandle,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    WeightSyncLost,
    WeightSyncTimeout,
)
from .buckets import (
    BucketMeta,
    TensorMeta,
    bucketize,
    dtype_from_str,
    dtype_to_str,
    group_for_buckets,
    unbucketize,
)

__all__ = ["ObjectStorePublisher", "ObjectStoreReceiver"]


class ObjectStorePublisher(WeightPublisher):
    """Publish buckets of ~``bucket_mb`` MiB to the Ray object store."""

    backend = "object_store"

    def __init__(self, bucket_mb: float = 32.0, keep_last: int = 1, packed: bool = False) -> None:
        """``packed``: ship each bucket as one flat buffer (``bucketize``, an extra copy of the weights);
        the default ships the tensors' own bytes (one copy, into the object store)."""
        if bucket_mb <= 0 or keep_last < 1:
            raise ValueError("bucket_mb must be > 0 and keep_last >= 1")
        self.packed = packed
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self.keep_last = keep_last
        self._live: deque[tuple[int, list]] = deque()  # (version, its ObjectRefs)
        self.last_version: int | None = None

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> WeightHandle:
        if self.last_version is not None and version <= self.last_version:
            raise ValueError(f"version {version} is not newer than the last published {self.last_version}")
        import ray  # imported on use: the plain worker classes import this module where Ray is absent

        if self.packed:
            buckets = bucketize(named_tensors, self.bucket_bytes, device="cpu")
            metas = [b.meta for b in buckets]
            refs = [ray.put(b.buffer.view(torch.uint8).numpy()) for b in buckets]
        else:
            metas, parts = plan_buckets(named_tensors, self.bucket_bytes)
            refs = [ray.put(p) for p in parts]
        self._live.append((version, refs))
        while len(self._live) > self.keep_last:
            self._live.popleft()
        self.last_version = version
        return WeightHandle(
            version=version,
            backend=self.backend,
            buckets=tuple(metas),
            total_bytes=sum(m.nbytes for m in metas),
            refs=tuple(refs),
        )

    @property
    def live_versions(self) -> list[int]:
        """Versions whose objects this publisher still pins."""
        return [v for v, _ in self._live]

    def close(self) -> None:
        self._live.clear()


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 numpy array (a view when it is contiguous on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> tuple[list[BucketMeta], list[list[np.ndarray]]]:
    """The buckets ``bucketize`` would make (same grouping, same metadata), each as the list of its
    tensors' raw bytes instead of one packed buffer: no copy here."""
    plans = group_for_buckets(named_tensors, bucket_bytes)
    metas, parts = [], []
    for dtype, members in plans:
        entries, offset = [], 0
        for name, t in members:
            entries.append(TensorMeta(name=name, shape=tuple(t.shape), offset=offset, numel=t.numel()))
            offset += t.numel()
        metas.append(BucketMeta(dtype=dtype_to_str(dtype), numel=offset, entries=tuple(entries)))
        parts.append([_raw_bytes(t) for _, t in members])
    return metas, parts


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
        import ray

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
        for meta, a in zip(handle.buckets, arrays, strict=True):
            if isinstance(a, list) and (len(a) != len(meta.entries) or sum(x.nbytes for x in a) != meta.nbytes):
                raise WeightSyncError(f"bucket object does not match its metadata ({len(meta.entries)} tensors, "
                                      f"{meta.nbytes} bytes)")
        buffers = [a if isinstance(a, list) else _as_tensor(m, a) for m, a in zip(handle.buckets, arrays, strict=True)]
        return self._iterate(handle.buckets, buffers, self.device)

    @staticmethod
    def _iterate(metas: tuple[BucketMeta, ...], buffers: list, device) -> Iterator[tuple[str, torch.Tensor]]:
        for meta, buf in zip(metas, buffers, strict=True):
            if isinstance(buf, list):  # one zero-copy view per tensor
                dtype = dtype_from_str(meta.dtype)
                for e, arr in zip(meta.entries, buf, strict=True):
                    t = _from_numpy(arr).view(dtype).view(e.shape)
                    yield e.name, t if device is None else t.to(device)
            else:
                yield from unbucketize((meta, buf if device is None else buf.to(device)))


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # zero-copy views of the read-only object store buffer
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)
