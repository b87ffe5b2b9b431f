"""The weight-sync contract: errors, the handle, and the publisher / receiver interfaces.

Phases (every backend):

1. **init**: ``publisher.init_group(...)`` / ``receiver.init_group(...)`` set up transport state
   (a no-op for ``object_store``; a process group of learner rank 0 + every rollout worker for ``nccl``).
2. **publish**: ``handle = publisher.publish(version, named_tensors)`` packs tensors into buckets and
   starts shipping them; ``handle`` is a small picklable :class:`WeightHandle` the driver sends to workers.
   Collective backends then need ``publisher.wait(timeout_s)`` while the workers receive.
3. **receive**: ``for name, t in receiver.receive(handle, timeout_s): ...`` inside each rollout worker. The
   tensors are the worker's to keep: the receiver never reuses or writes them afterwards, so a replica
   takes them as its weights without a copy (``policy.load_trainable(..., share=True)``). Object-store
   tensors are read-only views of shared memory: kept or copied, never written to.
4. **verify** (LoRA): ``publish(..., manifest=...)`` puts a count and checksum per adapted module into the
   handle; after loading, each receiver checks every module it adapts against it (``sync.manifest.verify``).

A sync that cannot finish raises :class:`WeightSyncTimeout` within ``timeout_s``; it never hangs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .buckets import BucketMeta

__all__ = [
    "WeightSyncError",
    "WeightSyncTimeout",
    "WeightSyncLost",
    "WeightSyncMismatch",
    "ModuleDigest",
    "WeightHandle",
    "WeightPublisher",
    "WeightReceiver",
]


class WeightSyncError(RuntimeError):
    """A weight sync failed (bad handle, wrong backend, transport error)."""


class WeightSyncTimeout(WeightSyncError, TimeoutError):
    """The weights of ``version`` did not arrive via ``backend`` within ``timeout_s`` seconds."""

    def __init__(self, version: int, backend: str, timeout_s: float, detail: str = "") -> None:
        self.version, self.backend, self.timeout_s, self.detail = version, backend, timeout_s, detail
        msg = f"weight sync of version {version} via backend {backend!r} did not complete within {timeout_s:g} s"
        super().__init__(f"{msg}: {detail}" if detail else msg)

    def __reduce__(self) -> tuple:  # picklable across Ray processes despite the custom __init__
        return type(self), (self.version, self.backend, self.timeout_s, self.detail)


class WeightSyncLost(WeightSyncTimeout):
    """The weights can never arrive (object freed, owner died). A WeightSyncTimeout, so one handler covers both."""


class WeightSyncMismatch(WeightSyncError):
    """The sync completed, but what was loaded is not what the publisher shipped (``sync.manifest``: an adapted
    module missing, short or different). Not a transport fault: retrying cannot help, the run stops."""


@dataclass(frozen=True)
class ModuleDigest:
    """What the publisher shipped of one adapted module: its tensor count and the checksum of their contents
    (``sync.manifest.checksum``)."""

    count: int
    checksum: str


@dataclass(frozen=True)
class WeightHandle:
    """What the driver hands to rollout workers: small and picklable, no tensor data.

    ``refs``: one Ray ObjectRef per bucket (``object_store``), empty for collective backends;
    ``buckets``: layout of every bucket (names, shapes, offsets, dtype); ``group``: collective metadata;
    ``manifest``: adapted module -> :class:`ModuleDigest` of this version (LoRA; empty otherwise).
    """

    version: int
    backend: str
    buckets: tuple[BucketMeta, ...]
    total_bytes: int
    refs: tuple[Any, ...] = ()
    group: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, ModuleDigest] = field(default_factory=dict)

    @property
    def num_tensors(self) -> int:
        return sum(len(b.entries) for b in self.buckets)

    def names(self) -> list[str]:
        return [e.name for b in self.buckets for e in b.entries]


class WeightPublisher(ABC):
    """Learner side (rank 0 only)."""

    backend: str = ""

    def init_group(self, *args: Any, **kwargs: Any) -> None:  # noqa: B027 - optional phase
        """Phase 1; no-op unless the backend needs a transport group."""

    @abstractmethod
    def publish(self, version: int, named_tensors: Iterable[tuple[str, torch.Tensor]],
                manifest: dict[str, ModuleDigest] | None = None) -> WeightHandle:
        """Phase 2: bucket and ship ``named_tensors`` as ``version`` (strictly increasing); ``manifest`` rides
        in the handle (phase 4)."""

    def wait(self, timeout_s: float) -> None:  # noqa: B027 - optional phase
        """Block until the last publish is delivered (collectives); no-op for object_store."""

    def close(self) -> None:  # noqa: B027
        """Release transport state and published data."""


class WeightReceiver(ABC):
    """Rollout-worker side."""

    backend: str = ""

    def init_group(self, *args: Any, **kwargs: Any) -> None:  # noqa: B027 - optional phase
        """Phase 1; no-op unless the backend needs a transport group."""

    @abstractmethod
    def receive(self, handle: WeightHandle, timeout_s: float) -> Iterator[tuple[str, torch.Tensor]]:
        """Phase 3: ``(name, tensor)`` pairs of ``handle.version``; raises WeightSyncTimeout, never hangs."""

    def close(self) -> None:  # noqa: B027
        """Release transport state."""

    def _check(self, handle: WeightHandle) -> None:
        if not isinstance(handle, WeightHandle):
            raise WeightSyncError(f"expected a WeightHandle, got {type(handle).__name__}")
        if handle.backend != self.backend:
            raise WeightSyncError(
                f"handle of version {handle.version} was published with backend {handle.backend!r}, "
                f"this receiver is {self.backend!r}"
            )
