"""Data: everything between a user's file and a training batch, on Hugging Face `datasets`.

    sources   any source -> validated canonical rows (DataError with file, line, field)
    schemas   the row formats and their validation
    tokenize  chat template -> input_ids + response_mask, truncation, stats
    collate   padded (right/left), padding-free, packed (best-fit decreasing) batches
    tasks     built-in tasks (arith, multistep, sort): rows of every format, extractors, verifiers
    pipeline  prepare_data(cfg, tokenizer, accepts): all of the above in one call
Also here: `arith` (the arith problem space) and `corpus` (synthetic pretraining text).
"""

from posttrain.data.collate import (
    Collator,
    collate_packed,
    collate_padded,
    collate_pairs,
    collate_prompts,
    collate_rankings,
    collate_stepwise,
    pack_bfd,
    pack_dataset,
    ranking_matrix,
)
from posttrain.data.config import FORMATS, STAGE_FORMATS, ColumnsConfig, DataConfig
from posttrain.data.pipeline import Prepared, prepare_data
from posttrain.data.sources import Rows, load_rows
from posttrain.data.tasks import TASKS, Task, get_task
from posttrain.data.tokenize import IGNORE_INDEX, Encoder, Tokenized, TokenStats, tokenize_rows

__all__ = [
    "FORMATS", "IGNORE_INDEX", "STAGE_FORMATS", "TASKS", "Collator", "ColumnsConfig", "DataConfig", "Encoder",
    "Prepared", "Rows", "Task", "TokenStats", "Tokenized", "collate_packed", "collate_padded", "collate_pairs",
    "collate_prompts", "collate_rankings", "collate_stepwise", "get_task", "load_rows", "pack_bfd",
    "pack_dataset", "prepare_data", "ranking_matrix", "tokenize_rows",
]
