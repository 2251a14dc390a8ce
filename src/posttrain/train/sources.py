"""Step sources for datasets held in memory: a seeded shuffle per epoch, resumable by position."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.train.dist import rank_slice
from posttrain.train.engine import StepBatch


class ShuffledStepSource:
    """Walks a dataset of `size` samples in a fresh seeded permutation each epoch.

    The permutation of epoch e depends only on (seed, e), so the data state is just two integers
    and a resumed run sees exactly the samples an uninterrupted run would have seen.

    `collate(indices)` builds one micro-batch; `count(indices)` returns (normaliser, trained tokens)
    for the whole step — the global normaliser every micro-batch's loss is divided by.

    Under torchrun every rank walks the same permutation, counts the whole global batch (so the
    normaliser needs no communication) and collates only its own contiguous slice of it
    (`dist.rank_slice`): the ranks together see exactly the batch a single process would, and the
    data state stays the same two integers on every rank.
    """

    def __init__(self, size: int, batch_size: int, micro_batch_size: int, seed: int,
                 collate: Callable[[list[int]], Any], count: Callable[[list[int]], tuple[float, int]]) -> None:
        if size == 0:
            raise ValueError("the training set is empty")
        self.size, self.batch_size, self.micro_batch_size, self.seed = size, batch_size, micro_batch_size, seed
        self.collate, self.count = collate, count
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _take(self, k: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < k:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            chunk = self._order[self.position:self.position + k - len(taken)]
            taken += chunk
            self.position += len(chunk)
        return taken

    def next_step(self) -> StepBatch:
        indices = self._take(self.batch_size)
        normaliser, tokens = self.count(indices)
        mine = rank_slice(indices)
        micro = [mine[i:i + self.micro_batch_size] for i in range(0, len(mine), self.micro_batch_size)]
        return StepBatch(micro_batches=[self.collate(m) for m in micro], normaliser=normaliser, tokens=tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The walk where the checkpoint left it. Its permutations are of the data it was walking: a resumed run
        on data of another size (data.size, an edited file, another filter) would be another run, so it is a
        ConfigError (a checkpoint from before the size was kept: where its position does not fit)."""
        saved = state.get("size")
        if (saved is not None and saved != self.size) or state["position"] > self.size:
            raise ConfigError(f"the checkpoint walked {saved if saved is not None else 'more'} rows of training "
                              f"data and this run has {self.size}: a resumed run trains on the data it started with "
                              "(the same data settings and files), or starts afresh (run.resume=false)",
                              field="data")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)
