"""UAE: caption an image so that the generator reconstructs it from the caption.

Requests carry the item's clean image and no question (the ``caption`` rollout adds the instruction);
the reward is the similarity of the source and its reconstruction (``clip_similarity``); evaluation is the
mean reward on held-out images (and ``unigrpo eval --benchmark reconstruction``). Stage 1 is the warm start
a pretrained unified model already has, in the two halves UAE's auto-encoder needs: captioning (image ->
<answer> description </answer>) and generating from a caption alone ("\\n" description "\\n" <gen> -> the
image: the condition ``rollout.caption`` builds from a written caption).
"""

from __future__ import annotations

from collections.abc import Sequence

from recipes.base import Recipe
from recipes.gvu import gvu_sft_examples
from tasks.describe import CAPTION_INSTRUCTION, clean_image_of
from tasks.items import PromptItem


def uae_request(item: PromptItem, image_size: int = 32) -> dict:
    """The clean image; the rollout adds the caption instruction and meta source_image / reconstruction."""
    del image_size
    image = clean_image_of(item)
    if image is None:
        raise ValueError(f"uae: task item {item.prompt_id!r} has no image")
    return {"prompt_id": item.prompt_id, "image": image, "meta": {"source": item.meta.get("source", "")}}


def uae_sft_examples(items: Sequence[PromptItem], generate_prob: float = 1.0) -> list[dict]:
    """GvU's two halves (``recipes.gvu.gvu_sft_examples``) with UAE's caption instruction: even rows caption
    the clean image, odd rows generate it from its description alone."""
    return gvu_sft_examples(items, generate_prob, instruction=CAPTION_INSTRUCTION)


UAE = Recipe(
    name="uae",
    summary="caption an image so that the generator reconstructs it from the caption",
    request=uae_request,
    rollout="caption",
    rewards=({"name": "clip_similarity", "weight": 1.0,
              "kwargs": {"tiny": True, "backbones": [{"kind": "clip", "weight": 1.0}]}},),  # no download
    evaluation="heldout_reward",
    sft=uae_sft_examples,
)
