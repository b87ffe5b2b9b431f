"""UAE: caption an image so that the generator reconstructs it from the caption.

Requests carry the item's clean image and no question (the ``caption`` rollout adds the instruction);
the reward is the similarity of the source and its reconstruction (``clip_similarity``); evaluation is the
mean reward on held-out images (and ``unigrpo eval --benchmark reconstruction``). No stage 1: the tiny
recipe learns from RL alone.
"""

from __future__ import annotations

from recipes.base import Recipe
from tasks.describe import clean_image_of
from tasks.items import PromptItem


def uae_request(item: PromptItem, image_size: int = 32) -> dict:
    """The clean image; the rollout adds the caption instruction and meta source_image / reconstruction."""
    del image_size
    image = clean_image_of(item)
    if image is None:
        raise ValueError(f"uae: task item {item.prompt_id!r} has no image")
    return {"prompt_id": item.prompt_id, "image": image, "meta": {"source": item.meta.get("source", "")}}


UAE = Recipe(
    name="uae",
    summary="caption an image so that the generator reconstructs it from the caption",
    request=uae_request,
    rollout="caption",
    rewards=({"name": "clip_similarity", "weight": 1.0,
              "kwargs": {"tiny": True, "backbones": [{"kind": "clip", "weight": 1.0}]}},),  # no download
    evaluation="heldout_reward",
)
