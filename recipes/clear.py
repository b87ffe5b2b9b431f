"""CLEAR: answer questions about (degraded) images, generating a restored image first when it pays.

Requests carry the item's (degraded) image and its question; the rollout is ``interleaved``
(generate-then-answer); rewards are answer correctness and format; evaluation is answer accuracy, clean and
by degradation severity. Stage 1 teaches generate-then-answer on degraded images.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from recipes.base import Recipe
from tasks.items import PromptItem, format_prompt


def clear_request(item: PromptItem, image_size: int = 32) -> dict:
    """A rollout request from a task item: its image and prompt; the reward meta travels with it, with the
    clean image a restoration is scored against (``reference_image``, when the task has one)."""
    del image_size
    meta = {"answer": item.answer, "choices": item.choices, "answer_type": "choice" if item.choices else None,
            "severity": int(item.meta.get("severity", 0)), "degradation": item.meta.get("degradation", "none"),
            "reference_image": item.meta.get("clean_image")}
    return {"prompt_id": item.prompt_id, "text": format_prompt(item), "image": item.image, "meta": meta}


def generates(item: PromptItem, generate_prob: float) -> bool:
    """Stage 1: a degraded image's target is generate-then-answer for a fixed ``generate_prob`` share of items
    (by a hash of the prompt id, so it is the same every epoch and run); the rest answer directly, so both
    paths are trained and stage 2 learns when generating pays."""
    if int(item.meta.get("severity", 0)) <= 0:
        return False
    return zlib.crc32(str(item.prompt_id).encode()) % 10_000 < generate_prob * 10_000


def clear_sft_examples(items: Sequence[PromptItem], generate_prob: float = 1.0) -> list[dict]:
    """Generate-then-answer on degraded images: the answer letter; <gen> + the clean latent when degraded."""
    return [{"text": format_prompt(it), "image": it.image, "clean_image": it.meta["clean_image"],
             "answer": it.answer, "generate": generates(it, generate_prob)} for it in items]


CLEAR = Recipe(
    name="clear",
    summary="answer questions about degraded images, generating a restored image first when it pays",
    request=clear_request,
    rollout="interleaved",
    rewards=({"name": "answer", "weight": 1.0}, {"name": "format", "weight": 0.1}),
    evaluation="accuracy",
    sft=clear_sft_examples,
    restores=True,
    default_strength=0.6,  # restorations start from the degraded input's latent noised to sigma 0.6
)
