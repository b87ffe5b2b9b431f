"""``object_store`` backend: each bucket is one ``ray.put`` (numpy, zero-copy on read).

A bucket's object is the list of its tensors' bytes (uint8 numpy views of the tensors themselves): Ray
writes them straight into the object store (pickle protocol 5, out-of-band buffers), so publishing copies
the weights once (parameters -> object store) instead of twice (parameters -> flat bucket -> object
store), and a receiver reads every tensor as a zero-copy view. The bucket layout (``BucketMeta``) is the
same as the collective backends' (``buckets.bucketize``); a flat uint8 buffer per bucket is accepted too.

Where the time goes, and what is done about it (``docs/benchmarks.md``, "bench.weight_sync"):

* Ray copies every out-of-band buffer larger than 1 MiB with 6 threads it spawns for that one buffer, so a
  bucket of a hundred 4-16 MiB tensors paid a hundred rounds of thread start + join. When there are at
  least ``put_threads`` buckets, they are put in parallel from a small thread pool and a tensor's bytes
  are shipped as views of at most ``chunk_bytes`` (1 MiB): one plain memcpy each, no copy here, the
  parallelism is the pool's. (With fewer buckets, whole tensors, so that Ray's copy threads parallelise.)
  Pickle 5 lays a tensor's chunks out back to back, so the receiver re-joins them into one zero-copy view
  (it checks the addresses, and copies only if a Ray version ever lays them out otherwise).
* A put lands in object-store pages that are resident only if an earlier version's space is reused; fresh
  shared-memory pages cost a page fault each on first touch (0.2-3 s per 392 MiB on a 2-core CPU machine). The
  publisher releases its predecessors *before* writing the new version (``keep_last`` counts the new one),
  and clusters started by this project set ``RAY_SYSTEM_CONFIG``: Ray otherwise deletes out-of-scope
  objects from the store only once a second (``free_objects_period_milliseconds``), and a put that comes
  sooner is placed in fresh space instead of the freed version's.

Works for any topology and on CPU. The publisher keeps the refs of the last ``keep_last`` versions
alive and drops older ones; refs inside handles held by workers are kept alive by Ray's reference
counting, so dropping never pulls data out from under a receiver that already has the handle.
"""

from __future__ import annotations

import os
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .base import (
    ModuleDigest,
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

__all__ = ["ObjectStorePublisher", "ObjectStoreReceiver", "CHUNK_BYTES", "RAY_SYSTEM_CONFIG"]

# Ray copies an out-of-band buffer of more than 1 MiB with 6 threads started for it; up to 1 MiB, one memcpy.
CHUNK_BYTES = 1 << 20

# ``ray.init(_system_config=...)`` for a cluster this project starts: an object that goes out of scope is
# deleted from the object store at once (Ray's default batches deletions once a second), so the next
# version's put reuses its resident pages. (Each release is then one FreeObjects call, fanned out to the
# other nodes; on a large cluster freeing many objects per second, a period of a few ms batches them.)
RAY_SYSTEM_CONFIG = {"free_objects_period_milliseconds": 0}


class ObjectStorePublisher(WeightPublisher):
    """Publish buckets of ~``bucket_mb`` MiB to the Ray object store."""

    backend = "object_store"

    def __init__(self, bucket_mb: float = 32.0, keep_last: int = 1, packed: bool = False,
                 chunk_bytes: int | None = CHUNK_BYTES, put_threads: int | None = None) -> None:
        """``packed``: ship each bucket as one flat buffer (``bucketize``, an extra copy of the weights);
        the default ships the tensors' own bytes (one copy, into the object store), as views of at most
        ``chunk_bytes`` when the buckets are put from ``put_threads`` threads (default: up to 4, one per
        core; ``chunk_bytes=None``: always whole tensors)."""
        put_threads = min(4, os.cpu_count() or 1) if put_threads is None else put_threads
        if bucket_mb <= 0 or keep_last < 1 or put_threads < 1 or (chunk_bytes is not None and chunk_bytes < 1):
            raise ValueError("bucket_mb must be > 0, keep_last >= 1, put_threads >= 1, chunk_bytes >= 1")
        self.packed = packed
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self.keep_last = keep_last
        self.chunk_bytes = chunk_bytes
        self.put_threads = put_threads
        self._pool: ThreadPoolExecutor | None = None
        self._live: deque[tuple[int, list]] = deque()  # (version, its ObjectRefs)
        self.last_version: int | None = None

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
                manifest: dict[str, ModuleDigest] | None = None) -> WeightHandle:
        if self.last_version is not None and version <= self.last_version:
            raise ValueError(f"version {version} is not newer than the last published {self.last_version}")
        import ray  # imported on use: the plain worker classes import this module where Ray is absent

        if self.packed:
            buckets = bucketize(named_tensors, self.bucket_bytes, device="cpu")
            metas = [b.meta for b in buckets]
            parts = [b.buffer.view(torch.uint8).numpy() for b in buckets]
        else:
            chunk = self.chunk_bytes if self.put_threads > 1 else None  # one thread: Ray's copy threads
            metas, parts = plan_buckets(named_tensors, self.bucket_bytes, chunk, self.put_threads)
        # keep_last counts the version being published: release the oldest first, so that (held by nobody
        # else) its space is free for this one instead of fresh pages
        while len(self._live) >= self.keep_last:
            self._live.popleft()
        refs = self._put_all(ray, parts)
        self._live.append((version, refs))
        self.last_version = version
        return WeightHandle(
            version=version,
            backend=self.backend,
            buckets=tuple(metas),
            total_bytes=sum(m.nbytes for m in metas),
            refs=tuple(refs),
            manifest=dict(manifest or {}),
        )

    def _put_all(self, ray, parts: list) -> list:
        if self.put_threads == 1 or len(parts) < 2:
            return [ray.put(p) for p in parts]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.put_threads, thread_name_prefix="weight-put")
        return list(self._pool.map(ray.put, parts))  # in bucket order

    @property
    def live_versions(self) -> list[int]:
        """Versions whose objects this publisher still pins."""
        return [v for v, _ in self._live]

    def release(self) -> None:
        """Drop this publisher's refs to every version it published (handles held elsewhere keep theirs)."""
        self._live.clear()

    def close(self) -> None:
        self.release()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes as a flat uint8 numpy array (a view when it is contiguous on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _chunked(a: np.ndarray, chunk_bytes: int | None) -> np.ndarray | list[np.ndarray]:
    """``a`` itself, or views of at most ``chunk_bytes`` that cover it in order (no copy)."""
    if chunk_bytes is None or a.nbytes <= chunk_bytes:
        return a
    return [a[i:i + chunk_bytes] for i in range(0, a.nbytes, chunk_bytes)]


def plan_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 chunk_bytes: int | None = CHUNK_BYTES, min_buckets_to_chunk: int = 1
                 ) -> tuple[list[BucketMeta], list[list]]:
    """The buckets ``bucketize`` would make (same grouping, same metadata), each as the list of its
    tensors' raw bytes (a uint8 array, or the list of its chunks when there are at least
    ``min_buckets_to_chunk`` buckets) instead of one packed buffer: no copy."""
    plans = group_for_buckets(named_tensors, bucket_bytes)
    if len(plans) < min_buckets_to_chunk:
        chunk_bytes = None
    metas, parts = [], []
    for dtype, members in plans:
        entries, offset = [], 0
        for name, t in members:
            entries.append(TensorMeta(name=name, shape=tuple(t.shape), offset=offset, numel=t.numel()))
            offset += t.numel()
        metas.append(BucketMeta(dtype=dtype_to_str(dtype), numel=offset, entries=tuple(entries)))
        parts.append([_chunked(_raw_bytes(t), chunk_bytes) for _, t in members])
    return metas, parts


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _joined(chunks: list[np.ndarray]) -> np.ndarray:
    """One uint8 view over a tensor's chunks when they lie back to back (pickle 5 puts them so), else a copy.
    The view's base is the first chunk, whose buffer keeps the whole object mapped."""
    if len(chunks) == 1:
        return chunks[0]
    start = end = _address(chunks[0])
    for c in chunks:
        if c.ndim != 1 or c.dtype != np.uint8 or _address(c) != end:
            return np.concatenate(chunks)
        end += c.nbytes
    return np.lib.stride_tricks.as_strided(chunks[0], shape=(end - start,), strides=(1,), writeable=False)


def _entry_nbytes(x) -> int:
    """Bytes of one tensor's entry (an array or the list of its chunks); -1 for anything else."""
    if isinstance(x, np.ndarray):
        return x.nbytes
    if isinstance(x, list) and all(isinstance(c, np.ndarray) for c in x):
        return sum(c.nbytes for c in x)
    return -1


def _check_bucket(meta: BucketMeta, obj) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype != np.uint8 or obj.nbytes != meta.nbytes:
            raise WeightSyncError(f"bucket object does not match its metadata ({meta.dtype} x {meta.numel} = "
                                  f"{meta.nbytes} bytes)")
        return
    itemsize = dtype_from_str(meta.dtype).itemsize
    if not isinstance(obj, list) or len(obj) != len(meta.entries) or any(
            _entry_nbytes(x) != e.numel * itemsize for e, x in zip(meta.entries, obj, strict=False)):
        raise WeightSyncError(f"bucket object does not match its metadata ({len(meta.entries)} tensors, "
                              f"{meta.nbytes} bytes)")


class ObjectStoreReceiver(WeightReceiver):
    """Fetch all buckets of a handle with one bounded ``ray.get``; yields read-only views.

    ``device``: move each bucket there (one copy per bucket); ``None`` keeps zero-copy CPU views, which a
    replica takes as its weights (``load_trainable(share=True)``: the workers of a node then share one copy
    of the weights, pinned in the store until they load the next version) or copies; never writes to. A
    bucket's views are let go as soon as the consumer moves past it, so once the iteration ends nothing
    here pins the objects.
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
            _check_bucket(meta, a)
        return self._iterate(handle.buckets, arrays, self.device)

    @staticmethod
    def _iterate(metas: tuple[BucketMeta, ...], buffers: list, device) -> Iterator[tuple[str, torch.Tensor]]:
        for i, meta in enumerate(metas):
            buf, buffers[i] = buffers[i], None  # this generator no longer pins bucket i once past it
            if isinstance(buf, list):  # one zero-copy view per tensor
                dtype = dtype_from_str(meta.dtype)
                for e, x in zip(meta.entries, buf, strict=True):
                    t = _from_numpy(_joined(x) if isinstance(x, list) else x).view(dtype).view(e.shape)
                    yield e.name, t if device is None else t.to(device)
            else:
                yield from unbucketize((meta, _as_tensor(meta, buf) if device is None
                                        else _as_tensor(meta, buf).to(device)))
            del buf


def _as_tensor(meta: BucketMeta, array: np.ndarray) -> torch.Tensor:
    return _from_numpy(array).view(dtype_from_str(meta.dtype))


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # zero-copy views of the read-only object store buffer
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)
