"""Step sources for datasets held in memory: a seeded shuffle per epoch, resumable by position."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import torch

from posttrain.errors import ConfigError
from posttrain.train.dist import rank_slice
from posttrain.train.engine import StepBatch


class ShuffledStepSource:
    """Walks a dataset of `size` samples in a fresh seeded permutation each epoch, `batch_size` a step.

    A step whose batch straddles two epochs (a batch size that does not divide the data) holds no row twice: the
    next epoch's permutation puts the rows its first batch would repeat after that batch (each row is still seen
    once an epoch). Only a batch larger than the data holds a row twice (the Trainer warns of it).

    The permutation of epoch e is the seeded shuffle of (seed, e), with the rows of the step that straddled into
    it (`_held`, at most a batch) put after the rest of that step: the data state is two integers and those rows,
    and a resumed run sees exactly the samples an uninterrupted run would have seen (with another batch size too;
    a checkpoint from before the rows were kept resumes the plain shuffle it walked).

    `collate(indices)` builds one micro-batch; `count(indices)` returns (normaliser, tokens) for the whole step:
    the global normaliser every micro-batch's loss is divided by, and every token of its rows, prompts included.

    Under torchrun every rank walks the same permutation, counts the whole global batch (so the
    normaliser needs no communication) and collates only its own contiguous slice of it
    (`dist.rank_slice`): the ranks together see exactly the batch a single process would, and the
    data state stays the same two integers on every rank.
    """

    def __init__(self, size: int, batch_size: int, micro_batch_size: int, seed: int,
                 collate: Callable[[list[int]], Any], count: Callable[[list[int]], tuple[float, int]],
                 rows: Any = None) -> None:
        if size == 0:
            raise ValueError("the training set is empty")
        self.size, self.batch_size, self.micro_batch_size, self.seed = size, batch_size, micro_batch_size, seed
        self.collate, self.count = collate, count
        self.rows = rows  # what is walked (a datasets.Dataset or a tensor): its digest is in the state
        self._digest: str | None = None
        self.epoch, self.position = 0, 0
        self._order = self._shuffled(0)
        self._held: list[int] = []  # the previous epoch's rows in the step that started this one, and its size
        self._held_batch = 0

    def _shuffled(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _order_after(self, epoch: int, held: list[int], batch: int) -> list[int]:
        """Epoch `epoch`'s permutation when the step that starts it (of `batch` rows) holds `held`, the previous
        epoch's last rows: those among its first rows are put after that step's."""
        order = self._shuffled(epoch)
        if not held:
            return order
        kept = set(held)
        first = [i for i in order if i not in kept][:batch - len(held)]
        chosen = set(first)
        return first + [i for i in order if i not in chosen]

    def _take(self, k: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < k:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                # (a batch larger than the data repeats rows whatever the order: the plain shuffle)
                self._held, self._held_batch = (list(taken), k) if 0 < len(taken) and self.size >= k else ([], 0)
                self._order = self._order_after(self.epoch, self._held, self._held_batch)
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
        state = {"epoch": self.epoch, "position": self.position, "size": self.size, "held": list(self._held),
                 "held_batch": self._held_batch}
        if self.rows is not None:
            state["digest"] = self.digest()
        return state

    def digest(self) -> str:
        """A digest of the rows' contents (`content_digest`), taken once, when first asked for (the state the
        Trainer keeps before the first step, or a checkpoint)."""
        if self._digest is None:
            self._digest = content_digest(self.rows)
        return self._digest

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
        if self.rows is not None and state.get("digest") not in (None, self.digest()):
            raise ConfigError(f"the checkpoint walked other rows of training data than this run has ({self.size} "
                              "either way, with other contents: an edited or other file, or other data or template "
                              "settings): a resumed run trains on the data it started with, or starts afresh "
                              "(run.resume=false)", field="data")
        self.epoch, self.position = state["epoch"], state["position"]
        self._held, self._held_batch = list(state.get("held", [])), int(state.get("held_batch", 0))
        self._order = self._order_after(self.epoch, self._held, self._held_batch)


def content_digest(rows: Any) -> str:
    """A digest of what `rows` hold (a tensor's values, or a `datasets.Dataset`'s columns and rows in order), the
    same however they were stored or computed (the Arrow chunks of a cached or a freshly tokenised dataset): the
    dataset is read a thousand rows at a time, each slice combined into one chunk and written in Arrow's IPC form."""
    digest = hashlib.sha256()
    if isinstance(rows, torch.Tensor):
        digest.update(str((rows.dtype, tuple(rows.shape))).encode())
        digest.update(rows.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:32]
    arrow = rows.with_format("arrow")
    for start in range(0, len(rows), 1000):
        table = arrow[start:start + 1000].combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        digest.update(sink.getvalue())
    return digest.hexdigest()[:32]
