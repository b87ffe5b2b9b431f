"""Prompt sources and benchmarks: synthetic degraded VQA, the degradation suite, JSONL / TSV loaders.

``build_dataset(name, **kwargs)`` builds a registered dataset ("shapes_vqa", "jsonl", "tsv");
``register_dataset(name)`` adds one. Datasets are sized sequences of ``PromptItem``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .degrade import CORRUPTIONS, DEFAULT_DEGRADATIONS, LEVELS, apply_degradation, degrade, degrade_folder
from .items import PromptItem, format_prompt
from .loaders import JsonlDataset, RowError, TsvDataset
from .sampler import PromptSampler
from .shapes import ShapesVQA

DATASETS: dict[str, Callable[..., Any]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make ``build_dataset(name, ...)`` call the decorated class or factory."""

    def wrap(factory: Callable[..., Any]) -> Callable[..., Any]:
        if name in DATASETS and DATASETS[name] is not factory:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = factory
        return factory

    return wrap


register_dataset("shapes_vqa")(ShapesVQA)
register_dataset("jsonl")(JsonlDataset)
register_dataset("tsv")(TsvDataset)


def build_dataset(name: str, **kwargs: Any) -> Any:
    """Build a registered dataset by name: ``build_dataset("shapes_vqa", size=64, seed=0, split="eval")``."""
    try:
        factory = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None
    return factory(**kwargs)


__all__ = [
    "CORRUPTIONS",
    "DATASETS",
    "DEFAULT_DEGRADATIONS",
    "LEVELS",
    "JsonlDataset",
    "PromptItem",
    "PromptSampler",
    "RowError",
    "ShapesVQA",
    "TsvDataset",
    "apply_degradation",
    "build_dataset",
    "degrade",
    "degrade_folder",
    "format_prompt",
    "register_dataset",
]
