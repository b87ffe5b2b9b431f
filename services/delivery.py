"""Collective weight sync (``learner.sync.backend: nccl``), the driver's side: the weight group kept over
the members that are up (``sync.group``), and a broadcast that fails sent again to a rebuilt group.

In sync mode ``Run.deliver`` runs on the driver thread right after a publish; in async mode on the rollout
pipeline's thread (``services.pipeline``), in order with the batches' generation, while the learner trains
the next step. Either way the learner sends the version it staged when it published, so what a member
loads is that version's weights; the group is built, rebuilt and sent to from that one thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import ray

from services import control
from sync import WeightSyncError
from sync.group import GroupBuildError, GroupMember

log = logging.getLogger(__name__)


class GroupDelivery:
    def __init__(self, run: Any) -> None:
        self.run = run

    def members(self) -> list[GroupMember]:
        run = self.run
        members = [GroupMember(("rollout", wid, inst), actor) for wid, inst, actor in run.pool.joinable()]
        if run.reward.follows_policy:
            members.append(GroupMember(("reward",), run.reward.actor))
        return members

    def ensure(self) -> None:
        """The weight group over the members that are up; a member lost while joining is replaced (the
        pool restarts it) and the group is built without it."""
        run = self.run
        attempts = run.pool.spec.max_attempts
        for attempt in range(attempts):
            try:
                run.sync_group.ensure(self.members())
                return
            except GroupBuildError as e:
                if "publisher" in e.lost or ("reward",) in e.lost or attempt == attempts - 1:
                    raise
                for key in e.lost:
                    run.pool.worker_failed(key[1], key[2], e)

    def with_retries(self, deliver: Callable[[Any], None], handle: Any) -> None:
        """``deliver(handle)``; a failed broadcast is sent again (the same staged version) to a group
        rebuilt without the members lost, up to ``rollout``'s ``max_attempts`` times."""
        run = self.run
        attempts = run.pool.spec.max_attempts
        for attempt in range(attempts):
            try:
                deliver(handle)
                return
            except (WeightSyncError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError) as e:
                if attempt == attempts - 1:
                    raise
                log.warning("weight broadcast of version %d failed (%s); rebuilding the group", handle.version,
                            control.one_line(e))
                run.sync_group.invalidate()
