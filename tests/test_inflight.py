"""Async batches carried in a checkpoint (``services.inflight``) come back field for field, bit for bit, and the
files name nothing but tensors, arrays, trajectories, image segments and plain values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from policy.trajectory import ImageSegment, Trajectory
from services import inflight


def _trajectory(g: torch.Generator, i: int) -> Trajectory:
    t = 9 + i
    seg = ImageSegment(cond_end=5, latents=torch.randn(2, 4, 3, 3, generator=g),
                       next_latents=torch.randn(2, 4, 3, 3, generator=g), sigmas=torch.tensor([1.0, 0.75]),
                       sigma_nexts=torch.tensor([0.75, 0.5]), log_probs=torch.randn(2, generator=g, dtype=torch.float64),
                       final_latent=torch.randn(4, 3, 3, generator=g), cond_ids=torch.arange(5) if i else None,
                       cond_start=i)
    return Trajectory(
        prompt_id=f"p{i // 2}", group_index=i % 2, input_ids=torch.randint(0, 50, (t,), generator=g), prompt_len=4,
        loss_mask=torch.arange(t) >= 4, behaviour_logp=torch.randn(t, generator=g), slot_latents=torch.randn(1, 4, 3, 3),
        images=[seg] if i % 2 else [], vision_images=torch.randint(0, 255, (1, 6, 6, 3), dtype=torch.uint8),
        policy_version=3, response_text=f"answer {i} é", reward=float("nan"),
        reward_components={"answer": 1.0, "format": -math.inf},
        meta={"answer": "B", "choices": ["A", "B"], "pair": (1, 2.5), "worker_id": 2, "none": None,
              "clean_image": np.full((4, 4, 3), i, np.uint8), "generated_codes": torch.arange(6),
              "score": np.float32(0.25), "nested": {"bf16": torch.ones(2, dtype=torch.bfloat16)}})


def _same(a, b) -> None:
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, (Trajectory, ImageSegment)):
        for k in vars(a):
            _same(getattr(a, k), getattr(b, k))
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def test_carried_batches_come_back_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [inflight.CarriedBatch(step=s, version=s - 1, prompt_ids=("p0", "p1"),
                                     trajectories=[_trajectory(g, i) for i in range(4)],
                                     totals=[0.5, float("nan"), 1.0 / 3.0, -2.0],
                                     components={"answer": [1.0, 0.0, 1.0, 0.0], "format": [0.1, 0.2, 0.3, 0.4]},
                                     pool={"pool/size": 2.0, "fleet/failures": 0.0}) for s in (3, 2)]
    inflight.write(tmp_path, batches)
    back = inflight.read(tmp_path)
    assert [b.step for b in back] == [2, 3]  # in step order
    for want, got in zip(sorted(batches, key=lambda b: b.step), back):
        for t in want.trajectories:  # a numpy scalar in meta comes back as the Python value it holds
            t.meta["score"] = float(t.meta["score"])
        _same(want.trajectories, got.trajectories)
        assert (got.step, got.version, got.prompt_ids, got.pool) == (want.step, want.version, want.prompt_ids, want.pool)
        _same(want.totals, got.totals)
        _same(want.components, got.components)
    assert inflight.read(tmp_path / "nothing") == []


def test_nothing_but_known_records_is_read_or_written(tmp_path):
    with pytest.raises(inflight.CarriedBatchError, match="object array"):
        inflight.write(tmp_path, [inflight.CarriedBatch(0, 0, ("p",), [_bad_meta(np.array([object()], dtype=object))],
                                                        [0.0], {}, {})])
    with pytest.raises(inflight.CarriedBatchError, match="set cannot be carried"):
        inflight.write(tmp_path, [inflight.CarriedBatch(0, 0, ("p",), [_bad_meta({1, 2})], [0.0], {}, {})])
    g = torch.Generator().manual_seed(1)
    inflight.write(tmp_path, [inflight.CarriedBatch(1, 0, ("p0",), [_trajectory(g, 0)], [1.0], {}, {})])
    index = tmp_path / inflight.DIR / inflight.INDEX
    doc = json.loads(index.read_text())
    doc["batches"][0]["trajectories"][0] = {"$builtins.eval": {"source": "1"}}
    index.write_text(json.dumps(doc))
    with pytest.raises(inflight.CarriedBatchError, match="unknown record"):
        inflight.read(tmp_path)
    doc["batches"][0]["trajectories"][0] = {"$trajectory": {"prompt_id": "p0"}}
    index.write_text(json.dumps(doc))
    with pytest.raises(inflight.CarriedBatchError, match="differ from Trajectory"):
        inflight.read(tmp_path)


def _bad_meta(value) -> Trajectory:
    t = _trajectory(torch.Generator().manual_seed(2), 0)
    t.meta["bad"] = value
    return t
