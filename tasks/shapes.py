"""ShapesVQA: a procedurally generated, degraded multiple-choice VQA set (the default task).

Each item is a small RGB image (default 32 x 32, gray background) with one or a few filled shapes
(circle, square, triangle) in four colours, and a four-way question about colour, shape, count or
position. The answer is a letter A-D. Items are a pure function of (seed, split, index).

Held-out split: every candidate item has a content key (question + clean pixels). Its unsalted hash puts
it in the eval bucket (``EVAL_FRACTION`` of keys) or the train bucket, and each split draws candidates
from its own seed stream until one lands in its bucket. So no (image, question) pair of one split ever
appears in the other, whatever the seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .degrade import CORRUPTIONS, DEFAULT_DEGRADATIONS, apply_degradation, make_rng
from .items import PromptItem, choice_letters

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SHAPE_DISTRACTOR = "star"  # the fourth shape choice; never drawn
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom")
COUNTS: tuple[str, ...] = ("1", "2", "3", "4")
BACKGROUND: tuple[int, int, int] = (96, 96, 96)
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "position")
DEFAULT_QUESTION_TYPES: dict[str, float] = {"color": 0.55, "shape": 0.15, "count": 0.15, "position": 0.15}
EVAL_FRACTION = 0.2
_SPLIT_STREAM = {"train": 0, "eval": 1}
_SUPERSAMPLE = 4


def _in_eval_bucket(question: str, clean: np.ndarray) -> bool:
    h = hashlib.blake2b(digest_size=8)
    h.update(question.encode())
    h.update(np.asarray(clean.shape, dtype=np.int64).tobytes())
    h.update(clean.tobytes())
    return int.from_bytes(h.digest(), "little") % 10_000 < EVAL_FRACTION * 10_000


def render(
    objects: Sequence[Mapping], image_size: int, background: tuple[int, int, int] = BACKGROUND
) -> np.ndarray:
    """Draw shapes ({kind, color, cx, cy, r} in pixels) anti-aliased on a plain background -> (S, S, 3) uint8."""
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * s, image_size * s), background)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        cx, cy, r = o["cx"] * s, o["cy"] * s, o["r"] * s
        fill = COLORS[o["color"]]
        if o["kind"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["kind"] == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["kind"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['kind']!r}")
    return np.asarray(canvas.resize((image_size, image_size), Image.BOX), dtype=np.uint8).copy()


def _normalise_qtypes(question_types: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    if question_types is None:
        qt = dict(DEFAULT_QUESTION_TYPES)
    elif isinstance(question_types, Mapping):
        qt = {str(k): float(v) for k, v in question_types.items()}
    else:
        qt = {str(k): 1.0 for k in question_types}
    bad = [k for k in qt if k not in QUESTION_TYPES]
    if bad:
        raise ValueError(f"unknown question types {bad}; known: {list(QUESTION_TYPES)}")
    if not qt or any(v < 0 for v in qt.values()) or sum(qt.values()) <= 0:
        raise ValueError(f"question_types needs at least one positive weight, got {qt}")
    total = sum(qt.values())
    return {k: v / total for k, v in qt.items() if v > 0}


class ShapesVQA:
    """Procedural degraded VQA: ``ShapesVQA(size, seed, split)[i] -> PromptItem``.

    ``image`` is the (possibly) degraded image; ``meta`` holds ``clean_image``, ``degradation`` (a name,
    or "none"), ``severity`` (1-3, 0 when clean), ``question_type``, ``answer_text``, ``objects``,
    ``split`` and ``index``. ``degradations`` names corruptions of ``tasks.degrade.CORRUPTIONS`` (default:
    ``DEFAULT_DEGRADATIONS``; severity s -> intensity LEVELS[s - 1]).
    """

    def __init__(
        self,
        size: int,
        seed: int = 0,
        split: str = "train",
        image_size: int = 32,
        degradations: Sequence[str] | None = DEFAULT_DEGRADATIONS,
        severities: Sequence[int] = (1, 2, 3),
        degrade_prob: float = 0.75,
        question_types: Sequence[str] | Mapping[str, float] | None = None,
        shuffle_choices: bool = True,
    ) -> None:
        if int(size) < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if int(image_size) < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        degradations = list(degradations or [])
        bad = [d for d in degradations if d not in CORRUPTIONS]
        if bad:
            raise ValueError(
                f"unknown degradations {bad}; known: {sorted(CORRUPTIONS)}"
            )
        severities = [int(s) for s in severities]
        if not severities or any(s not in (1, 2, 3) for s in severities):
            raise ValueError(f"severities must be a non-empty subset of 1, 2, 3, got {severities}")
        if not 0.0 <= float(degrade_prob) <= 1.0:
            raise ValueError(f"degrade_prob must be in [0, 1], got {degrade_prob}")
        self.size = int(size)
        self.seed = int(seed)
        self.split = split
        self.image_size = int(image_size)
        self.degradations = degradations
        self.severities = severities
        self.degrade_prob = float(degrade_prob) if degradations else 0.0
        self.question_types = _normalise_qtypes(question_types)
        self.shuffle_choices = bool(shuffle_choices)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> PromptItem:
        index = int(index)
        if index < 0:
            index += self.size
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesVQA of size {self.size}")
        stream = _SPLIT_STREAM[self.split]
        for attempt in range(10_000):
            rng = np.random.default_rng([self.seed & ((1 << 64) - 1), stream, index, attempt])
            qtype, question, choices, answer, objects = self._sample(rng)
            clean = render(objects, self.image_size)
            if _in_eval_bucket(question, clean) == (self.split == "eval"):
                break
        else:  # pragma: no cover - probability ~0
            raise RuntimeError("could not draw an item for the split")

        image, kind, severity = clean, "none", 0
        drng = make_rng(self.seed, index, f"shapes-degrade-{self.split}")
        if self.degradations and drng.random() < self.degrade_prob:
            kind = self.degradations[int(drng.integers(len(self.degradations)))]
            severity = self.severities[int(drng.integers(len(self.severities)))]
            image = apply_degradation(clean, kind, severity, seed=self.seed, index=stream * (1 << 40) + index)
        return PromptItem(
            prompt_id=f"shapes-{self.split}-{self.seed}-{index}",
            image=image,
            question=question,
            choices=choices,
            answer=answer,
            meta={
                "source": "shapes_vqa",
                "split": self.split,
                "index": index,
                "clean_image": clean,
                "degradation": kind,
                "severity": severity,
                "question_type": qtype,
                "answer_text": choices[choice_letters(len(choices)).index(answer)],
                "objects": objects,
            },
        )

    def __iter__(self):
        for i in range(self.size):
            yield self[i]

    # ------------------------------------------------------------------ generation

    def _choices(
        self, rng: np.random.Generator, options: Sequence[str], correct: str
    ) -> tuple[list[str], str]:
        opts = list(options)
        if self.shuffle_choices:
            opts = [opts[i] for i in rng.permutation(len(opts))]
        return opts, choice_letters(len(opts))[opts.index(correct)]

    def _sample(self, rng: np.random.Generator):
        S = float(self.image_size)
        names = list(self.question_types)
        qtype = names[int(rng.choice(len(names), p=[self.question_types[n] for n in names]))]
        color_names = list(COLORS)

        def pick(seq):
            return seq[int(rng.integers(len(seq)))]

        if qtype in ("color", "shape"):
            r = rng.uniform(0.2, 0.3) * S
            obj = {
                "kind": pick(SHAPES),
                "color": pick(color_names),
                "cx": round(float(rng.uniform(r + 1, S - r - 1)), 2),
                "cy": round(float(rng.uniform(r + 1, S - r - 1)), 2),
                "r": round(float(r), 2),
            }
            objects = [obj]
            if qtype == "color":
                question = f"What color is the {obj['kind']} in the image?"
                choices, answer = self._choices(rng, color_names, obj["color"])
            else:
                question = "What shape is in the image?"
                choices, answer = self._choices(rng, [*SHAPES, SHAPE_DISTRACTOR], obj["kind"])
        elif qtype == "position":
            pos = pick(POSITIONS)
            r = rng.uniform(0.13, 0.18) * S
            along = rng.uniform(0.4 * S, 0.6 * S)  # near the middle of the other axis
            across = rng.uniform(r + 1, 0.3 * S)  # within the outer 30% of the named side
            if pos in ("left", "right"):
                cx, cy = (across if pos == "left" else S - across), along
            else:
                cx, cy = along, (across if pos == "top" else S - across)
            obj = {
                "kind": pick(SHAPES),
                "color": pick(color_names),
                "cx": round(float(cx), 2),
                "cy": round(float(cy), 2),
                "r": round(float(r), 2),
            }
            objects = [obj]
            question = f"Where is the {obj['color']} {obj['kind']} in the image?"
            choices, answer = self._choices(rng, POSITIONS, pos)
        else:  # count: one shape per quadrant, 1-4 quadrants used, shapes never touch
            n = int(rng.integers(1, len(COUNTS) + 1))
            cells = rng.choice(4, size=n, replace=False)
            half = S / 2
            objects = []
            for c in sorted(int(c) for c in cells):
                r = rng.uniform(0.11, 0.16) * S
                ox, oy = (c % 2) * half, (c // 2) * half
                objects.append(
                    {
                        "kind": pick(SHAPES),
                        "color": pick(color_names),
                        "cx": round(float(ox + rng.uniform(r + 1, half - r - 1)), 2),
                        "cy": round(float(oy + rng.uniform(r + 1, half - r - 1)), 2),
                        "r": round(float(r), 2),
                    }
                )
            question = "How many shapes are in the image?"
            choices, answer = self._choices(rng, COUNTS, str(n))
        return qtype, question, choices, answer, objects
