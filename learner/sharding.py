"""One train step's batch split over W learner ranks so that W ranks take the step one rank takes.

The batch is cut into mini-batches of whole prompt groups (the same cut for every W), and each
mini-batch's groups are spread over the ranks, balanced by rows. Every rank then takes the same number
of optimizer steps, and in every mini-batch every rank runs every sub-module the others run: a rank
whose share lacks rows, input-image slots or generated images gets a zero-weight copy of a row that has
them (under ZeRO-3 a skipped sub-module would leave the other ranks waiting in its parameter gather).
Each mini-batch carries its global counts, the denominators of its losses on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from learner.batch import TrainBatch, concat


@dataclass(frozen=True)
class GlobalCounts:
    """Denominators of one global mini-batch's losses, the same on every rank."""

    tokens: int  # sampled tokens of its trajectories (token-mean)
    sequences: int  # its trajectories (the seq-mean modes; the image term is per trajectory)
    width: int  # the padded token width T (seq-mean-token-sum-norm divides by sequences * T)


@dataclass
class RankShard:
    """One rank's part of a train step: its piece of every mini-batch, in step order."""

    minibatches: list[TrainBatch]
    counts: list[GlobalCounts]
    world_size: int


def split_evenly(items: list, parts: int) -> list[list]:
    """``items`` in ``parts`` consecutive runs whose lengths differ by at most one (earlier runs longer)."""
    q, r = divmod(len(items), parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + q + (i < r))
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def balance(sizes: list[int], world: int) -> list[list[int]]:
    """Indices of ``sizes`` per rank: largest first onto the least-loaded rank (ties: lowest rank)."""
    load, out = [0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += sizes[i]
    return [sorted(x) for x in out]


def padding_donors(candidates: list[int], features: list[list[int]], have: list[int]) -> list[int]:
    """Rows to copy as zero-weight padding into a rank's share ``have`` (of ``candidates``) so that it holds
    each feature (rows with an image target, rows with an input slot, ...) that some candidate holds, and at
    least one row: one row holding every missing feature where there is one, else one row per feature."""
    mine = set(have)
    missing = [set(f) for f in features if f and not mine & set(f)]
    if not missing:
        return [] if have else candidates[:1]
    common = set.intersection(*missing)
    return [min(common)] if common else sorted({min(f) for f in missing})


def shard_batch(batch: TrainBatch, mini_batches: int, world: int) -> list[RankShard]:
    """``batch`` (groups labelled by ``row_group``) as ``world`` rank shards of ``min(mini_batches, groups)``
    mini-batches each."""
    groups = torch.unique(batch.row_group, sorted=True).tolist()
    rows_of = {g: torch.nonzero(batch.row_group == g).flatten() for g in groups}
    shards = [RankShard([], [], world) for _ in range(world)]
    generated = set(batch.seg_rows.tolist())  # rows holding an image segment
    for mb_groups in split_evenly(groups, max(1, min(mini_batches, len(groups)))):
        mb_rows = torch.cat([rows_of[g] for g in mb_groups])
        counts = GlobalCounts(tokens=int(batch.loss_mask[mb_rows].sum()), sequences=int(mb_rows.numel()),
                              width=int(batch.input_ids.shape[1]))
        candidates = mb_rows.tolist()
        features = [[r for r in candidates if r in generated], [r for r in candidates if int(batch.slot_counts[r]) > 0]]
        per_rank = balance([rows_of[g].numel() for g in mb_groups], world)
        for shard, picks in zip(shards, per_rank):
            rows = torch.cat([rows_of[mb_groups[i]] for i in picks]) if picks else mb_rows[:0]
            donors = padding_donors(candidates, features, rows.tolist())
            parts = ([batch.select(rows)] if picks else []) + ([batch.padding_rows(torch.tensor(donors))] if donors else [])
            shard.minibatches.append(parts[0] if len(parts) == 1 else concat(parts))
            shard.counts.append(counts)
    return shards
