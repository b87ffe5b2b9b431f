"""What each recipe sends through the service: rollout requests and stage-1 examples.

``requests_for(recipe, items)`` turns task items into rollout requests: CLEAR gets the (degraded) image and
the question; UAE gets the clean image (no question: the rollout asks for a caption); GvU gets a text
description of the image's content (``describe_shapes`` for the shapes task) and no image.
``sft_examples(recipe, items)`` gives the stage-1 examples ``learner.sft.sft_batch`` takes. Rewards that
need the policy (GvU) get the run's model section via ``with_policy_rewards``.
"""

from __future__ import annotations

import zlib

from tasks.items import PromptItem, format_prompt


def request_of(item: PromptItem) -> dict:
    """A rollout request from a task item; the reward meta travels with it."""
    meta = {"answer": item.answer, "choices": item.choices, "answer_type": "choice" if item.choices else None,
            "severity": int(item.meta.get("severity", 0)), "degradation": item.meta.get("degradation", "none")}
    return {"prompt_id": item.prompt_id, "text": format_prompt(item), "image": item.image, "meta": meta}


# ------------------------------------------------------------------------------------- requests per recipe
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


def _where(o: dict, size: float) -> str:
    """'left' / 'top right' / 'center' ... from a shape's centre (pixels) in an image of ``size`` pixels."""
    fx, fy = o["cx"] / size - 0.5, o["cy"] / size - 0.5
    horiz = "left" if fx < -0.12 else "right" if fx > 0.12 else ""
    vert = "top" if fy < -0.12 else "bottom" if fy > 0.12 else ""
    if horiz and vert and abs(abs(fx) - abs(fy)) > 0.12:  # clearly more one way than the other
        horiz, vert = (horiz, "") if abs(fx) > abs(fy) else ("", vert)
    return " ".join(w for w in (vert, horiz) if w) or "center"


def describe_shapes(objects: list[dict], image_size: int) -> str:
    """A short description of a shapes image from its ``meta["objects"]``: "a red circle on the left",
    "two shapes: a blue square at the top left and a green triangle at the bottom right"."""
    parts = []
    for o in objects:
        where = _where(o, float(image_size))
        prep = "in the" if where == "center" else "on the" if where in ("left", "right") else "at the"
        parts.append(f"a {o['color']} {o['kind']} {prep} {where}")
    if len(parts) == 1:
        return parts[0]
    head = f"{_COUNT_WORDS.get(len(parts), len(parts))} shapes: "
    return head + ", ".join(parts[:-1]) + " and " + parts[-1]


def _description(item: PromptItem, image_size: int) -> str:
    m = item.meta or {}
    if m.get("objects"):
        ref = m.get("clean_image") if m.get("clean_image") is not None else item.image
        return describe_shapes(m["objects"], int(ref.shape[1]) if ref is not None else image_size)
    for key in ("description", "caption", "prompt"):
        if m.get(key):
            return str(m[key])
    return item.question  # a prompt-only row (JSONL / TSV): the question column is the prompt


def uae_request(item: PromptItem) -> dict:
    """UAE: the clean image; the rollout adds the caption instruction and meta source_image / reconstruction."""
    image = item.meta.get("clean_image") if item.meta.get("clean_image") is not None else item.image
    if image is None:
        raise ValueError(f"uae: task item {item.prompt_id!r} has no image")
    return {"prompt_id": item.prompt_id, "image": image, "meta": {"source": item.meta.get("source", "")}}


def gvu_request(item: PromptItem, image_size: int = 32) -> dict:
    """GvU: a description of the item's image as the generation prompt (no image)."""
    desc = _description(item, image_size)
    return {"prompt_id": item.prompt_id, "text": desc, "image": None, "meta": {"description": desc}}


def requests_for(recipe: str, items: list[PromptItem], image_size: int = 32) -> list[dict]:
    """Rollout requests for ``recipe`` (clear | uae | gvu) from task items, one per item, in order."""
    if recipe == "clear":
        return [request_of(i) for i in items]
    if recipe == "uae":
        return [uae_request(i) for i in items]
    if recipe == "gvu":
        return [gvu_request(i, image_size) for i in items]
    raise ValueError(f"unknown recipe {recipe!r}; known: clear, uae, gvu")


def sft_examples(recipe: str, items: list[PromptItem], instruction: str = "Describe the image",
                 generate_prob: float = 1.0) -> list[dict]:
    """Stage-1 examples for ``learner.sft.sft_batch``.

    CLEAR: generate-then-answer on degraded images (the answer letter; <gen> + the clean latent when degraded).
    GvU: the warm start a pretrained unified model already has, in the two halves GvU needs. Even rows teach
    understanding: clean image + ``instruction`` -> <answer> description </answer> (what the GvU reward scores
    with ``answer_tags``). Odd rows teach generation: description (no image) + <gen> -> the clean latent, the
    context ``rollout.recipes.gvu_rollout`` generates from. UAE has no stage 1 (the tiny recipe learns from RL).
    """
    if recipe == "gvu":
        out = []
        for k, it in enumerate(items):
            clean = it.meta.get("clean_image") if it.meta.get("clean_image") is not None else it.image
            desc = _description(it, int(clean.shape[1]))
            if k % 2 == 0:
                out.append({"text": instruction, "image": clean, "clean_image": clean, "answer": desc,
                            "generate": False})
            else:
                out.append({"text": desc, "image": None, "clean_image": clean, "answer": desc, "generate": True})
        return out
    return [{"text": format_prompt(it), "image": it.image, "clean_image": it.meta["clean_image"],
             "answer": it.answer, "generate": _generates(it, generate_prob)} for it in items]


def _generates(item: PromptItem, generate_prob: float) -> bool:
    """CLEAR stage 1: a degraded image's target is generate-then-answer for a fixed ``generate_prob`` share
    of items (by a hash of the prompt id, so it is the same every epoch and run); the rest answer directly,
    so both paths are trained and stage 2 learns when generating pays."""
    if int(item.meta.get("severity", 0)) <= 0:
        return False
    return zlib.crc32(str(item.prompt_id).encode()) % 10_000 < generate_prob * 10_000


# ------------------------------------------------------------------------------ rewards that hold a policy
