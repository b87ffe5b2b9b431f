"""``nccl`` backend: bucketed ``broadcast`` from learner rank 0 to every rollout worker.

The group (rank 0 = learner, ranks 1..N = rollout workers) is a *standalone* process group built on a
``torch.distributed.TCPStore`` + ``PrefixStore``, not the default group: the learner already has one
(DeepSpeed) and vLLM workers have their own, and ``init_process_group`` can only make one per process
(the same reason OpenRLHF's ``vllm_worker_wrap`` and vLLM's stateless groups build their own).
``dist_backend="gloo"`` runs the same code on CPU (tests, CPU clusters).

Flow: driver picks ``master_addr``/``master_port`` (``free_port()`` on the learner node), calls
``receiver.init_group(...)`` on every worker (``.remote``) and ``publisher.init_group(...)`` on the
learner concurrently; then per version ``handle = publisher.publish(v, tensors)`` (posts async
broadcasts), ``worker.update_weights.remote(handle)``, ``publisher.wait(timeout_s)``.
A resized pool needs a new group (close + init_group with the new world size).

Staged flow (the learner's; any mode, needed by async): ``publisher.stage(v, tensors)`` copies version v
into buckets when it is published, with no group yet; ``publisher.send(v, timeout_s)``, later and from
another thread, broadcasts exactly that copy to the group of the moment and waits for it, while the
tensors it came from go on changing. Staged versions stay until sent (a failed send can be repeated to a
rebuilt group); sending v forgets v and every older one.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .base import (
    ModuleDigest,
    WeightHandle,
    WeightPublisher,
    WeightReceiver,
    WeightSyncError,
    WeightSyncTimeout,
)
from .buckets import BucketMeta, bucketize, unbucketize

__all__ = ["NcclPublisher", "NcclReceiver", "free_port", "new_group"]


def free_port(host: str = "") -> int:
    """A TCP port free on this host right now (for ``master_port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def new_group(
    master_addr: str,
    master_port: int,
    world_size: int,
    rank: int,
    *,
    dist_backend: str = "nccl",
    group_name: str = "unigrpo_weights",
    timeout_s: float = 120.0,
) -> tuple[Any, Any]:
    """Rendezvous a standalone group of ``world_size`` ranks; returns ``(group, store)``. Rank 0 hosts the store."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout)
    except Exception as e:  # DistStoreError / RuntimeError when the peers never show up
        raise WeightSyncError(f"could not reach the weight-sync store at {master_addr}:{master_port} "
                              f"(rank {rank}/{world_size}) within {timeout_s:g} s: {e}") from e
    prefixed = dist.PrefixStore(group_name, store)
    if dist_backend == "gloo":
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    elif dist_backend == "nccl":
        if not torch.cuda.is_available() or not hasattr(dist, "ProcessGroupNCCL"):
            raise WeightSyncError("the nccl weight-sync backend needs CUDA and a torch build with NCCL")
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    else:
        raise ValueError(f"dist_backend must be 'nccl' or 'gloo', got {dist_backend!r}")
    return group, store


def _broadcast(group: Any, buffer: torch.Tensor) -> Any:
    """Post an async broadcast of ``buffer`` (as bytes) from rank 0; returns the Work."""
    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    opts.rootTensor = 0
    return group.broadcast([buffer.view(torch.uint8)], opts)


def _wait(work: Any, version: int, backend: str, timeout_s: float, what: str) -> None:
    try:
        work.wait(timedelta(seconds=timeout_s))
    except Exception as e:  # gloo/nccl raise RuntimeError (or DistBackendError) on timeout or abort
        raise WeightSyncTimeout(version, backend, timeout_s, f"{what}: {e}") from e


class _Collective:
    backend = "nccl"

    def __init__(self, dist_backend: str = "nccl", device: torch.device | str | None = None) -> None:
        self.dist_backend = dist_backend
        self.backend = dist_backend  # handle.backend: "nccl" (or "gloo" on CPU)
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if dist_backend == "nccl" else torch.device("cpu"))
        self._group: Any = None
        self._store: Any = None
        self.rank: int | None = None
        self.world_size: int | None = None
        self.group_name: str | None = None

    def init_group(self, master_addr: str, master_port: int, world_size: int, rank: int,
                   group_name: str = "unigrpo_weights", timeout_s: float = 120.0) -> None:
        """Phase 1: join the weight group (all ranks must call this concurrently)."""
        self.close()
        self._group, self._store = new_group(master_addr, master_port, world_size, rank,
                                             dist_backend=self.dist_backend, group_name=group_name,
                                             timeout_s=timeout_s)
        self.rank, self.world_size, self.group_name = rank, world_size, group_name

    def _require_group(self) -> Any:
        if self._group is None:
            raise WeightSyncError(f"{type(self).__name__}: call init_group(...) before syncing weights")
        return self._group

    def close(self) -> None:
        group, self._group, self._store = self._group, None, None
        if group is not None and hasattr(group, "shutdown"):
            try:
                group.shutdown()
            except Exception:  # noqa: BLE001 - best effort on teardown
                pass


class NcclPublisher(_Collective, WeightPublisher):
    """Rank 0: bucketize on ``device`` and broadcast each bucket once."""

    def __init__(self, bucket_mb: float = 32.0, dist_backend: str = "nccl",
                 device: torch.device | str | None = None) -> None:
        super().__init__(dist_backend, device)
        if bucket_mb <= 0:
            raise ValueError("bucket_mb must be > 0")
        self.bucket_bytes = max(1, int(bucket_mb * 1024 * 1024))
        self._pending: list[tuple[Any, torch.Tensor]] = []
        self._pending_version: int | None = None
        self.last_version: int | None = None
        self._staged: dict[int, list[Any]] = {}  # version -> its buckets (stage / send)
        self._staged_lock = threading.Lock()

    def init_group(self, master_addr: str, master_port: int, world_size: int, rank: int = 0,
                   group_name: str = "unigrpo_weights", timeout_s: float = 120.0) -> None:
        if rank != 0:
            raise ValueError("the publisher is rank 0 of the weight group")
        super().init_group(master_addr, master_port, world_size, 0, group_name, timeout_s)
        self.last_version = None  # a new membership: its first broadcast may repeat the version the old one had

    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
                manifest: dict[str, ModuleDigest] | None = None) -> WeightHandle:
        group = self._require_group()
        if self._pending:
            raise WeightSyncError(f"version {self._pending_version} is still in flight: call wait() first")
        if self.last_version is not None and version <= self.last_version:
            raise ValueError(f"version {version} is not newer than the last published {self.last_version}")
        buckets = bucketize(named_tensors, self.bucket_bytes, device=self.device)
        handle = WeightHandle(
            version=version, backend=self.backend, buckets=tuple(b.meta for b in buckets),
            total_bytes=sum(b.nbytes for b in buckets),
            group={"world_size": self.world_size, "dist_backend": self.dist_backend, "name": self.group_name},
            manifest=dict(manifest or {}),
        )
        # Buffers stay referenced until wait(): the async ops read them.
        self._pending = [(_broadcast(group, b.buffer), b.buffer) for b in buckets]
        self._pending_version = self.last_version = version
        return handle

    def stage(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
              manifest: dict[str, ModuleDigest] | None = None) -> WeightHandle:
        """Copy ``named_tensors`` into buckets as ``version`` now and keep them for ``send``; no group is
        needed. The handle names no group: the group's owner stamps it with the one that receives it
        (``sync.group.CollectiveGroup.stamp``)."""
        buckets = bucketize(named_tensors, self.bucket_bytes, device=self.device)
        handle = WeightHandle(version=version, backend=self.backend, buckets=tuple(b.meta for b in buckets),
                              total_bytes=sum(b.nbytes for b in buckets), group={"dist_backend": self.dist_backend},
                              manifest=dict(manifest or {}))
        with self._staged_lock:
            self._staged[version] = buckets
        return handle

    def staged_versions(self) -> list[int]:
        with self._staged_lock:
            return sorted(self._staged)

    def send(self, version: int, timeout_s: float) -> None:
        """Broadcast the staged ``version`` to the current group and wait until every receiver has it
        (WeightSyncTimeout after ``timeout_s`` per bucket); then forget it and every older staged version. A
        failed send keeps it, to be sent again to a rebuilt group."""
        group = self._require_group()
        with self._staged_lock:
            buckets = self._staged.get(version)
            staged = sorted(self._staged)
        if buckets is None:
            raise WeightSyncError(f"version {version} is not staged (staged: {staged})")
        works = [_broadcast(group, b.buffer) for b in buckets]
        for i, work in enumerate(works):
            _wait(work, version, self.backend, timeout_s,
                  f"bucket {i + 1}/{len(works)} not delivered to all {self.world_size} ranks")
        with self._staged_lock:
            for v in [v for v in self._staged if v <= version]:
                del self._staged[v]

    def wait(self, timeout_s: float) -> None:
        """Block until every receiver has the last published version; WeightSyncTimeout otherwise."""
        pending, version = self._pending, self._pending_version
        self._pending, self._pending_version = [], None
        for i, (work, _) in enumerate(pending):
            _wait(work, version if version is not None else -1, self.backend, timeout_s,
                  f"bucket {i + 1}/{len(pending)} not delivered to all {self.world_size} ranks")

    def close(self) -> None:
        self._pending, self._pending_version = [], None
        super().close()


class NcclReceiver(_Collective, WeightReceiver):
    """Ranks 1..N: receive every bucket into a fresh buffer on ``device`` and yield views.

    ``stream=True`` receives bucket by bucket as the iterator is consumed (peak memory: one bucket);
    it must be consumed fully. ``stream=False`` receives all buckets before returning.
    """

    def __init__(self, dist_backend: str = "nccl", device: torch.device | str | None = None,
                 stream: bool = False) -> None:
        super().__init__(dist_backend, device)
        self.stream = stream

    def receive(self, handle: WeightHandle, timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
        self._check(handle)
        group = self._require_group()
        if handle.group.get("world_size") not in (None, self.world_size):
            raise WeightSyncError(f"handle of version {handle.version} is for a group of "
                                  f"{handle.group['world_size']} ranks, this one has {self.world_size}")
        if handle.group.get("name") not in (None, self.group_name):
            raise WeightSyncError(f"handle of version {handle.version} is for group {handle.group['name']!r}, "
                                  f"this receiver is in {self.group_name!r}")
        if self.stream:
            return self._stream(group, handle, timeout_s)
        buffers = [self._recv(group, handle, i, m, timeout_s) for i, m in enumerate(handle.buckets)]
        return (pair for m, b in zip(handle.buckets, buffers, strict=True) for pair in unbucketize((m, b)))

    def _recv(self, group: Any, handle: WeightHandle, i: int, meta: BucketMeta, timeout_s: float) -> torch.Tensor:
        buf = meta.empty(self.device)
        _wait(_broadcast(group, buf), handle.version, self.backend, timeout_s,
              f"bucket {i + 1}/{len(handle.buckets)} ({meta.nbytes} bytes) not received")
        return buf

    def _stream(self, group: Any, handle: WeightHandle, timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
        for i, meta in enumerate(handle.buckets):
            yield from unbucketize((meta, self._recv(group, handle, i, meta, timeout_s)))
