"""Async batches carried in a checkpoint: those generated (and scored) under a policy version older than the
checkpoint's when the run stopped (Ctrl-C, SIGTERM, a failure), which a resumed run could not generate
again. They go into ``<checkpoint>/pipeline/`` and come back, unchanged, at the head of the resumed run's
pipeline (``services.pipeline``).

pipeline/
  tensors.safetensors   every tensor and array of every carried batch
  batches.json          the rest: per batch its step, version, prompt ids, rewards, pool metrics and the
                        trajectories' fields, tensors named by their key in tensors.safetensors

Nothing is pickled: the JSON names only the types below (tensors, arrays, trajectories, image segments,
plain values); anything else is refused when written and when read.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from policy.trajectory import ImageSegment, Trajectory

DIR = "pipeline"
TENSORS = "tensors.safetensors"
INDEX = "batches.json"
FORMAT = 1

_RECORDS: dict[str, type] = {"trajectory": Trajectory, "image_segment": ImageSegment}


class CarriedBatchError(ValueError):
    """A carried batch that cannot be written or read back as it was."""


@dataclass(frozen=True)
class CarriedBatch:
    """One batch of the pipeline as the learner would have taken it: the step it trains, the version it was
    generated under, its prompts' ids (checked against the prompts the resumed sampler draws), the
    trajectories, their reward totals and components, and the pool's metrics when it was generated."""

    step: int
    version: int
    prompt_ids: tuple[str, ...]
    trajectories: list[Trajectory]
    totals: list[float]
    components: dict[str, list[float]]
    pool: dict[str, float]


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _tensor(self, t: torch.Tensor, tag: str) -> dict:
        key = f"{len(self.tensors):06d}"
        self.tensors[key] = t.detach().cpu().contiguous().clone()  # owned: safetensors refuses shared storage
        return {tag: key}

    def __call__(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return self._tensor(v, "$tensor")
        if isinstance(v, np.ndarray):
            if v.dtype == object:
                raise CarriedBatchError("an object array cannot be carried")
            return self._tensor(torch.from_numpy(np.ascontiguousarray(v)), "$array")
        if isinstance(v, np.generic):
            v = v.item()
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"$float": repr(v)}
        if isinstance(v, (list, tuple)):
            items = [self(x) for x in v]
            return items if isinstance(v, list) else {"$tuple": items}
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise CarriedBatchError(f"a dict with non-string keys cannot be carried: {list(v)[:3]}")
            return {"$dict": {k: self(x) for k, x in v.items()}}
        for tag, cls in _RECORDS.items():
            if type(v) is cls:
                return {f"${tag}": {f.name: self(getattr(v, f.name)) for f in dataclasses.fields(cls)}}
        raise CarriedBatchError(f"a {type(v).__name__} cannot be carried in a checkpoint")


def _decode(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) != 1:
        raise CarriedBatchError(f"unknown record {sorted(v)[:3]}")
    (tag, body), = v.items()
    if tag in ("$tensor", "$array"):
        if body not in tensors:
            raise CarriedBatchError(f"tensor {body!r} missing from {TENSORS}")
        return tensors[body] if tag == "$tensor" else tensors[body].numpy()
    if tag == "$float":
        return float(body)  # 'nan', 'inf', '-inf'
    if tag == "$tuple":
        return tuple(_decode(x, tensors) for x in body)
    if tag == "$dict":
        return {k: _decode(x, tensors) for k, x in body.items()}
    cls = _RECORDS.get(tag[1:])
    if cls is None:
        raise CarriedBatchError(f"unknown record {tag!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    if set(body) != names:
        raise CarriedBatchError(f"{tag}: fields {sorted(set(body) ^ names)} differ from {cls.__name__}'s")
    return cls(**{k: _decode(x, tensors) for k, x in body.items()})


def write(directory: str | Path, batches: list[CarriedBatch]) -> None:
    """Write ``batches`` into ``directory/pipeline/`` (nothing when there are none)."""
    if not batches:
        return
    enc = _Encoder()
    index = [{"step": b.step, "version": b.version, "prompt_ids": list(b.prompt_ids),
              "trajectories": enc(b.trajectories), "totals": enc([float(x) for x in b.totals]),
              "components": enc({k: [float(x) for x in v] for k, v in b.components.items()}),
              "pool": enc({k: float(x) for k, x in b.pool.items()})} for b in batches]
    out = Path(directory) / DIR
    out.mkdir(parents=True, exist_ok=True)
    save_file(enc.tensors, str(out / TENSORS))
    (out / INDEX).write_text(json.dumps({"format": FORMAT, "batches": index}))


def read(directory: str | Path) -> list[CarriedBatch]:
    """The batches a checkpoint carries, in step order ([] when it carries none)."""
    d = Path(directory) / DIR
    if not (d / INDEX).exists():
        return []
    try:
        index = json.loads((d / INDEX).read_text())
        tensors = load_file(str(d / TENSORS))
    except (OSError, ValueError) as e:
        raise CarriedBatchError(f"{d}: unreadable ({e})") from None
    if index.get("format") != FORMAT:
        raise CarriedBatchError(f"{d}: format {index.get('format')!r}, this version reads {FORMAT}")
    out = []
    for b in index["batches"]:
        trajs = _decode(b["trajectories"], tensors)
        if not all(isinstance(t, Trajectory) for t in trajs):
            raise CarriedBatchError(f"{d}: step {b['step']}: not a list of trajectories")
        out.append(CarriedBatch(int(b["step"]), int(b["version"]), tuple(b["prompt_ids"]), trajs,
                                _decode(b["totals"], tensors), _decode(b["components"], tensors),
                                _decode(b["pool"], tensors)))
    return sorted(out, key=lambda b: b.step)
