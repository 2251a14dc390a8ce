"""One call from a `data:` config to what a training loop iterates: rows, tokens, stats, batches.

    prepared = prepare_data(cfg.data, tokenizer, accepts=STAGE_FORMATS["sft"])
    loader = DataLoader(prepared.dataset, batch_size=16, shuffle=True, collate_fn=prepared.collator)

Every user-caused problem surfaces here, as a DataError or ConfigError, before the first step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from posttrain.data.collate import Collator, pack_dataset
from posttrain.data.config import FORMATS, DataConfig
from posttrain.data.sources import load_rows
from posttrain.data.tokenize import Tokenized, tokenize_rows
from posttrain.errors import ConfigError, DataError

SFT_FORMATS = ("completion", "messages", "text")
COMPARISON_FORMATS = ("preference", "ranking")
# Formats whose rows are several sequences: collated padded or padding-free, never packed.
SEQUENCE_FORMATS = (*COMPARISON_FORMATS, "unpaired")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """Tokenised samples and stats, the dataset to iterate (packed rows in packed mode) and its collator."""

    tokenized: Tokenized
    dataset: Dataset
    collator: Collator

    @property
    def format(self) -> str:
        return self.tokenized.format


def prepare_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, accepts: Sequence[str] = FORMATS,
                 rows: Iterable[Mapping[str, Any]] | None = None,
                 mask_dtype: torch.dtype = torch.float32) -> Prepared:
    """Load (`cfg.source` or `rows`), validate, tokenise, pack if asked, and build the collator.

    `mask_dtype` is the dtype of the model's attention (a packed batch's additive mask must match it).
    """
    tokenized = tokenize_rows(load_rows(cfg, accepts, rows), tokenizer, cfg)
    stats = tokenized.stats
    if stats.kept == 0:
        raise DataError(f"no row is left to train on: {stats.dropped_too_long} of {stats.rows} are longer than "
                        f"data.max_length={cfg.max_length} and {stats.dropped_no_completion} have no trained "
                        "token", file=tokenized.name)
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
                        row_capacity=cfg.padding_free_capacity)
    return Prepared(tokenized=tokenized, dataset=dataset, collator=collator)
