"""The collective weight group the driver owns (``learner.sync.backend: nccl``).

Rank 0 is the learner's rank 0 (the publisher); ranks 1..N are the receivers: the rollout workers that
are up and the reward actor when it scores with the policy (GvU). The group is a standalone
torch.distributed group (``sync.nccl.new_group``: NCCL on GPUs, gloo on CPU, the same code), rebuilt
under a new name and port whenever its membership changes (a worker added, removed or replaced), so a
receiver never waits on a broadcast meant for another membership. Every actor taking part exposes
``join_sync_group(addr, port, world_size, rank, group_name, timeout_s)``; the publisher also
``sync_rendezvous()`` (its node's address and a free port there) and ``send_weights(version, timeout_s)``
(broadcast the version it staged when it published: ``sync.nccl.NcclPublisher.stage``).

The publisher's calls go to its concurrency group ``WEIGHT_SYNC`` (one thread beside the one that trains:
the actor is created with ``concurrency_groups={WEIGHT_SYNC: 1}``), so a sync never waits behind a train
call and sends the version it names, not the weights the learner holds by then; building, rebuilding and
sending are ordered by the caller (one thread at a time).

A member that does not join, or dies during a broadcast, fails that build or sync within
``timeout_s`` (``GroupBuildError`` names the members that failed; the publisher's wait raises
``WeightSyncTimeout``); the driver replaces it and the next ``ensure`` builds a group without it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import ray

from .base import WeightHandle, WeightSyncError

JOIN_GRACE_S = 10.0  # on top of the group's own timeout: the remote call's overhead
WEIGHT_SYNC = "weight_sync"  # the publisher's concurrency group for the calls below


@dataclass(frozen=True)
class GroupMember:
    """A receiver: ``key`` names the actor instance (e.g. ("rollout", worker id, instance))."""

    key: Hashable
    actor: Any


class GroupBuildError(WeightSyncError):
    """The group could not be built: ``failed`` maps members' keys to the error each gave; ``lost`` are
    the members at fault (their actor died or never answered), the others only timed out waiting for them."""

    def __init__(self, failed: dict[Hashable, str], lost: set[Hashable]) -> None:
        self.failed, self.lost = failed, lost
        super().__init__("the weight-sync group could not be built; lost: "
                         + (", ".join(map(str, sorted(lost, key=str))) or "none") + "; "
                         + "; ".join(f"{k}: {v}" for k, v in failed.items()))

    def __reduce__(self) -> tuple:
        return type(self), (self.failed, self.lost)


class CollectiveGroup:
    """Builds and rebuilds the group; ``members`` is the receivers of the current build, in rank order."""

    def __init__(self, publisher: Any, timeout_s: float, name: str = "unigrpo_weights") -> None:
        self.publisher, self.timeout_s, self.name = publisher, timeout_s, name
        self.epoch = 0
        self.members: tuple[GroupMember, ...] | None = None

    @property
    def keys(self) -> tuple[Hashable, ...]:
        return () if self.members is None else tuple(m.key for m in self.members)

    def ensure(self, members: Sequence[GroupMember]) -> bool:
        """Build a group over ``members`` unless the current one has exactly them; True when it built."""
        if self.members is not None and self.keys == tuple(m.key for m in members):
            return False
        self.build(members)
        return True

    def stamp(self, handle: WeightHandle) -> WeightHandle:
        """``handle`` addressed to the current group (its name and size: a receiver checks both)."""
        if self.members is None:
            raise WeightSyncError("the weight-sync group is not built")
        return replace(handle, group={**handle.group, "world_size": 1 + len(self.members),
                                      "name": f"{self.name}_{self.epoch}"})

    def send(self, handle: WeightHandle, timeout_s: float) -> Any:
        """The publisher broadcasts ``handle.version`` (staged when it was published) to the current group;
        the call's ref (it raises WeightSyncTimeout when a receiver does not take it within ``timeout_s``)."""
        return self._publisher("send_weights").remote(handle.version, timeout_s)

    def _publisher(self, method: str) -> Any:
        return getattr(self.publisher, method).options(concurrency_group=WEIGHT_SYNC)

    def invalidate(self) -> None:
        """The current group is broken (a failed broadcast): the next ``ensure`` builds a new one."""
        self.members = None

    def build(self, members: Sequence[GroupMember]) -> None:
        self.members = None
        self.epoch += 1
        wait = self.timeout_s + JOIN_GRACE_S
        addr, port = ray.get(self._publisher("sync_rendezvous").remote(), timeout=wait)
        world, name = 1 + len(members), f"{self.name}_{self.epoch}"
        joins = {"publisher": self._publisher("join_sync_group").remote(addr, port, world, 0, name, self.timeout_s)}
        for rank, m in enumerate(members, start=1):
            joins[m.key] = m.actor.join_sync_group.remote(addr, port, world, rank, name, self.timeout_s)
        failed: dict[Hashable, str] = {}
        lost: set[Hashable] = set()
        ready, _ = ray.wait(list(joins.values()), num_returns=len(joins), timeout=wait)
        done = set(ready)
        for key, ref in joins.items():
            if ref not in done:
                failed[key] = f"did not answer within {wait:g} s"
                lost.add(key)
                continue
            try:
                ray.get(ref, timeout=JOIN_GRACE_S)
            except ray.exceptions.RayActorError as e:
                failed[key] = f"actor died: {type(e).__name__}"
                lost.add(key)
            except Exception as e:  # noqa: BLE001 - the store timed out waiting for a lost peer
                failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if failed:
            raise GroupBuildError(failed, lost)
        self.members = tuple(members)
