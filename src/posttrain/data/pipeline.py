"""One call from a `data:` config to what a training loop iterates: rows, tokens, stats, batches.

    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["sft"])
    loader = DataLoader(prepared.dataset, batch_size=16, shuffle=True, collate_fn=prepared.collator)

Every user-caused problem surfaces here, as a DataError or ConfigError, before the first step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from posttrain.data.collate import Collator, pack_dataset
from posttrain.data.columns import arrow_column, with_items
from posttrain.data.config import FORMATS, DataConfig
from posttrain.data.sources import Rows, load_rows
from posttrain.data.tokenize import Tokenized, tokenize_rows
from posttrain.errors import ConfigError, DataError

logger = logging.getLogger("posttrain.data")

SFT_FORMATS = ("completion", "messages", "text")
COMPARISON_FORMATS = ("preference", "ranking")
# Formats whose rows are several sequences: collated padded or padding-free, never packed.
SEQUENCE_FORMATS = (*COMPARISON_FORMATS, "unpaired")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Tokenised samples and stats, the dataset to iterate (packed rows in packed mode) and its collator; `source`
    the rows as read and validated, before any chat template (whose text can change with the day: Llama 3's prints
    today's date): what a resumed run compares with the data it started with (`train.sources`). None for rows handed
    in memory: those a run samples or scores itself, which a resume makes again, perhaps not bit for bit."""

    tokenized: Tokenized
    dataset: Dataset
    collator: Collator
    source: Dataset | None = None

    @property
    def format(self) -> str:
        return self.tokenized.format


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, accepts: Sequence[str] = FORMATS,
                 rows: Iterable[Mapping[str, Any]] | None = None,
                 mask_dtype: torch.dtype = torch.float32, heldout: bool = False,
                 bars: contextlib.AbstractContextManager | None = None, imitates: bool = False) -> Prepared:
    """Load (`cfg.source` or `rows`), validate, tokenise, pack if asked, and build the collator.

    With `cfg.eval_split` > 0 these are the rows trained on, or (`heldout`) the ones held out of training
    (`split_rows`). `mask_dtype` is the dtype of the model's attention (a packed batch's additive mask must
    match it). `imitates`: the stage trains towards every completion (SFT), so a row labelled undesirable is
    refused. Reading and tokenising run inside `bars` (`train.progress.RunProgress.library_bars()`: the `datasets`
    bars of both).
    """
    with bars or contextlib.nullcontext():
        loaded = load_rows(cfg, accepts, rows, imitates)
        if cfg.eval_split > 0:
            trained, held_out = split_rows(loaded, cfg.eval_split, cfg.seed)
            if heldout:
                warn_of_repeats(trained, held_out)
            loaded = held_out if heldout else trained
        elif heldout:
            raise ConfigError("there are no held-out rows without data.eval_split", field="data.eval_split")
        tokenized = tokenize_rows(loaded, tokenizer, cfg)
    stats = tokenized.stats
    if stats.kept == 0:
        raise DataError(f"no row is left to use: {stats.dropped_too_long} of {stats.rows} are longer than "
                        f"data.max_length={cfg.max_length} and {stats.dropped_no_completion} have no trained "
                        "token", file=tokenized.name)  # rows to train on, or (posttrain eval) to evaluate
    padding_free = ("padding_free",) if tokenized.format in SEQUENCE_FORMATS else ()
    if cfg.batch_mode not in ("padded", *padding_free) and tokenized.format not in SFT_FORMATS:
        raise ConfigError(f"batch_mode {cfg.batch_mode!r} is for SFT rows (and padding_free for preference, "
                          f"ranking and unpaired rows); {tokenized.format!r} rows are padded", field="data.batch_mode")
    dataset = tokenized.dataset
    if cfg.batch_mode == "packed":
        dataset = pack_dataset(dataset, cfg.max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collator = Collator(format=tokenized.format, pad_token_id=pad, batch_mode=cfg.batch_mode,
                        packed_attention=cfg.packed_attention, mask_dtype=mask_dtype,
                        row_capacity=cfg.padding_free_capacity, share_prompts=cfg.share_prompts)
    return Prepared(tokenized=tokenized, dataset=dataset, collator=collator,
                    source=loaded.dataset if rows is None else None)


def warn_of_repeats(trained: Rows, held_out: Rows) -> int:
    """Warn when held-out rows are also among the trained ones, the same content on another line (a file with
    repeated rows, split at random): their held-out metrics then measure rows the model was trained on. Returns how
    many. Compared in Arrow (`_row_texts`): a million rows in seconds, where Python objects took half a minute."""
    repeats = pc.sum(pc.is_in(_row_texts(held_out), value_set=_row_texts(trained))).as_py() or 0
    if repeats and int(os.environ.get("RANK", "0")) == 0:  # once, not once per torchrun rank
        logger.warning("%s: %d of the %d held-out rows (data.eval_split) are also among the trained rows, the same "
                       "content on other lines: their held-out metrics measure rows the model was trained on "
                       "(remove the file's repeated rows)", held_out.name, repeats, len(held_out.dataset))
    return repeats


def _row_texts(rows: Rows) -> pa.Array:
    """One text per row that two rows share exactly when their contents (every column but the line) are equal."""
    columns = [_as_text(arrow_column(rows.dataset, name).combine_chunks())
               for name in rows.dataset.column_names if name != "line"]
    return pc.binary_join_element_wise(*columns, "\x1d")


def _as_text(array: pa.Array) -> pa.Array:
    """Each value of an Arrow array of strings, numbers, structs and lists of them as text (lists and structs
    joined with separators no text holds; a missing value as a NUL)."""
    if pa.types.is_struct(array.type):
        fields = [_as_text(array.field(k)) for k in range(array.type.num_fields)]
        joined = pc.binary_join_element_wise(*fields, "\x1f") if fields else pa.array([""] * len(array))
        return pc.if_else(array.is_null(), "\x00", joined)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        items = pc.binary_join(with_items(array, _as_text(array.flatten())), "\x1e")
        # Its length first, so that nested lists split otherwise ([[1], [2, 3]], [[1, 2], [3]]) read otherwise
        counted = pc.binary_join_element_wise(pc.list_value_length(array).cast(pa.string()), items, "\x1f")
        return pc.if_else(array.is_null(), "\x00", counted)  # a missing list is not an empty one
    return pc.fill_null(array.cast(pa.string()), "\x00")


def split_rows(rows: Rows, fraction: float, seed: int) -> tuple[Rows, Rows]:
    """(trained, held out): `fraction` of the rows (rounded, at least one, leaving at least one) held out, drawn by
    a permutation seeded with `seed`, so that every run with the same data and seed holds out the same rows.
    Both parts keep the source's order. Split before tokenisation: a held-out row is never trained on, whatever
    tokenisation later drops."""
    count = len(rows.dataset)
    if count < 2:
        raise DataError(f"data.eval_split={fraction} needs at least 2 rows, the data has {count}", file=rows.name,
                        field="data.eval_split")
    held = min(count - 1, max(1, round(fraction * count)))
    order = np.random.default_rng(seed).permutation(count)
    heldout, trained = sorted(order[:held].tolist()), sorted(order[held:].tolist())
    return (dataclasses.replace(rows, dataset=rows.dataset.select(trained)),
            dataclasses.replace(rows, dataset=rows.dataset.select(heldout)))
