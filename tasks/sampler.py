"""Seeded, resumable prompt batches.

The prompt stream is the concatenation of one seeded permutation of the dataset per epoch (the
permutation of epoch e depends only on (seed, e)). Batches are consecutive slices of that stream, so
every batch is full and a batch may span the end of one epoch and the start of the next. The state is
(seed, epoch, position in the epoch): a sampler restored from ``state_dict()`` yields exactly the batch
the original would have yielded next.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from .items import PromptItem


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> PromptItem: ...


class PromptSampler:
    """``next_batch()`` / iteration yields lists of ``batch_size`` PromptItems, forever, epoch by epoch."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.position = 0
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    def __len__(self) -> int:
        """Batches per epoch (rounded up)."""
        return -(-len(self.dataset) // self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The dataset indices of ``epoch`` in the order they are served."""
        if self._order_epoch != epoch or self._order is None:
            n = len(self.dataset)
            if self.shuffle:
                rng = np.random.default_rng([self.seed & ((1 << 64) - 1), int(epoch)])
                self._order = rng.permutation(n)
            else:
                self._order = np.arange(n)
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        """Dataset indices of the next batch; advances the state."""
        n = len(self.dataset)
        out: list[int] = []
        while len(out) < self.batch_size:
            order = self.order(self.epoch)
            take = min(self.batch_size - len(out), n - self.position)
            out.extend(int(i) for i in order[self.position : self.position + take])
            self.position += take
            if self.position >= n:
                self.epoch += 1
                self.position = 0
        return out

    def next_batch(self) -> list[PromptItem]:
        """The next ``batch_size`` PromptItems; advances the state."""
        return [self.dataset[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[list[PromptItem]]:
        while True:
            yield self.next_batch()

    def __next__(self) -> list[PromptItem]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: seed, epoch, position (+ dataset size, checked on load).

        The position counts items, not batches, so a run resumed with another batch size continues with
        the next unserved items."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "dataset_len": len(self.dataset),
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position from ``state_dict()``; the next batch is the one the saver would have served."""
        try:
            seed, epoch, position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid sampler state {state!r}: {e}") from e
        n = len(self.dataset)
        if "dataset_len" in state and int(state["dataset_len"]) != n:
            raise ValueError(
                f"sampler state is for a dataset of {state['dataset_len']} items, this one has {n}"
            )
        if epoch < 0 or not 0 <= position < n:
            raise ValueError(f"sampler state out of range: epoch {epoch}, position {position} (dataset {n})")
        if "shuffle" in state:
            self.shuffle = bool(state["shuffle"])
        self.seed, self.epoch, self.position = seed, epoch, position
        self._order_epoch, self._order = -1, None
