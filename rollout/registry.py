"""Rollout functions by kind and model architecture.

A recipe (``recipes/``) names the kind it samples with; the rollout worker looks it up here:

    get_rollout(kind, arch)(policy, engine, requests, s: RolloutSettings, version, generator) -> list[Trajectory]

Every rollout returns G = ``s.group_size`` trajectories per request, in request-major order.

- ``interleaved``: text with generated images inside it (CLEAR: generate-then-answer), ``rollout.interleaved``.
- ``caption``: image -> caption -> reconstruction (UAE), ``rollout.caption``.
- ``image``: prompt -> image (GvU), ``rollout.image``; on ``model.arch: janus`` the image is VQ-code tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from policy.trajectory import Trajectory
from rollout import interleaved
from rollout.caption import uae_rollout
from rollout.image import gvu_rollout, janus_gvu_rollout

RolloutFn = Callable[..., list[Trajectory]]

ROLLOUTS: dict[str, dict[str, RolloutFn]] = {  # model.arch -> kind -> rollout
    "unified": {"interleaved": interleaved.rollout, "caption": uae_rollout, "image": gvu_rollout},
    "janus": {"image": janus_gvu_rollout},
}


def rollout_kinds(arch: str = "unified") -> tuple[str, ...]:
    """The rollout kinds a model architecture runs."""
    return tuple(ROLLOUTS.get(arch, {}))


def get_rollout(kind: str, arch: str = "unified") -> RolloutFn:
    """The rollout function of ``kind`` (interleaved | caption | image) for a model architecture."""
    table = ROLLOUTS.get(arch)
    if table is None:
        raise ValueError(f"unknown model.arch {arch!r}; known: {', '.join(ROLLOUTS)}")
    try:
        return table[kind]
    except KeyError:
        raise ValueError(f"unknown rollout kind {kind!r} for model.arch {arch!r}; known: {', '.join(table)}") from None
