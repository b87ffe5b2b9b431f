"""GvU: generate an image from a description, scored by the policy's own understanding of it.

Requests carry a text description of the item's image (``tasks.describe``) and no image; the rollout is
``image`` (latents on ``model.arch: unified``, VQ-code tokens on ``janus``); the ``gvu`` reward scores the
description given the generated image with the current policy; evaluation is the mean reward on held-out
prompts. Stage 1 is the warm start a pretrained unified model already has, in the two halves GvU needs.
"""

from __future__ import annotations

from collections.abc import Sequence

from recipes.base import Recipe
from tasks.describe import clean_image_of, describe_item
from tasks.items import PromptItem

SFT_INSTRUCTION = "Describe the image"


def gvu_request(item: PromptItem, image_size: int = 32) -> dict:
    """A description of the item's image as the generation prompt (no image)."""
    desc = describe_item(item, image_size)
    return {"prompt_id": item.prompt_id, "text": desc, "image": None, "meta": {"description": desc}}


def gvu_sft_examples(items: Sequence[PromptItem], generate_prob: float = 1.0,
                     instruction: str = SFT_INSTRUCTION) -> list[dict]:
    """Even rows teach understanding: clean image + ``instruction`` -> <answer> description </answer> (what
    the gvu reward scores with ``answer_tags``). Odd rows teach generation: description (no image) + <gen> ->
    the clean latent, the context ``rollout.image.gvu_rollout`` generates from. ``generate_prob`` is CLEAR's
    and unused here (every odd row generates)."""
    del generate_prob
    out = []
    for k, it in enumerate(items):
        clean = clean_image_of(it)
        desc = describe_item(it, int(clean.shape[1]))
        if k % 2 == 0:
            out.append({"text": instruction, "image": clean, "clean_image": clean, "answer": desc, "generate": False})
        else:
            out.append({"text": desc, "image": None, "clean_image": clean, "answer": desc, "generate": True})
    return out


GVU = Recipe(
    name="gvu",
    summary="generate an image from a description, scored by the policy's own understanding of it",
    request=gvu_request,
    rollout="image",
    rewards=({"name": "gvu", "weight": 1.0, "kwargs": {"answer_tags": True}},),
    evaluation="heldout_reward",
    sft=gvu_sft_examples,
    architectures=("unified", "janus"),
)
