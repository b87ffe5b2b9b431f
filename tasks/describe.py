"""Text descriptions of task items: what GvU generates from and what its understanding side should say.

``describe_shapes(objects, image_size)`` writes a shapes image's content ("a red circle on the left");
``describe_item(item)`` picks the best description an item carries: its shapes, else a ``description`` /
``caption`` / ``prompt`` in its meta, else its question (a prompt-only JSONL / TSV row).
"""

from __future__ import annotations

from .items import PromptItem

_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

CAPTION_INSTRUCTION = "Describe the image in detail."  # UAE: what the captioner is asked (rollout and stage 1)


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


def clean_image_of(item: PromptItem):
    """The item's undegraded image (``meta["clean_image"]``), else its image (None for a text-only item)."""
    clean = item.meta.get("clean_image")
    return clean if clean is not None else item.image


def describe_item(item: PromptItem, image_size: int = 32) -> str:
    """The item's description; ``image_size`` sizes shape positions when the item holds no image."""
    m = item.meta or {}
    if m.get("objects"):
        ref = clean_image_of(item)
        return describe_shapes(m["objects"], int(ref.shape[1]) if ref is not None else image_size)
    for key in ("description", "caption", "prompt"):
        if m.get(key):
            return str(m[key])
    return item.question  # a prompt-only row (JSONL / TSV): the question column is the prompt
