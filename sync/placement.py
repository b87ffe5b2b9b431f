"""Placement groups that fail loudly instead of waiting forever for resources that never come."""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

PLACEMENT_TIMEOUT_S = float(os.environ.get("UNIGRPO_PLACEMENT_TIMEOUT_S", "300"))


def wait_placement(pg: PlacementGroup, bundle: dict, timeout_s: float = PLACEMENT_TIMEOUT_S) -> None:
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise RuntimeError(
            f"placement group with bundle {bundle} not ready after {timeout_s:.0f} s; cluster has "
            f"{ray.available_resources()} available (lower the actors' num_cpus/num_gpus or add nodes)"
        ) from None
