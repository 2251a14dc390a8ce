"""The `data:` section every recipe shares: where rows come from and how they become batches."""

from __future__ import annotations

import dataclasses

from posttrain.config import param, section
from posttrain.errors import ConfigError

# The row formats (see `schemas.py` for their columns) and which of them each stage takes.
FORMATS = ("completion", "messages", "text", "preference", "ranking", "verifiable", "stepwise", "unpaired")
STAGE_FORMATS: dict[str, tuple[str, ...]] = {
    "sft": ("messages", "completion", "text"),
    "rejection": ("verifiable",),
    "rm": ("preference", "ranking"),
    "prm": ("stepwise",),
    "dpo": ("preference", "ranking"),
    "kto": ("unpaired",),
    "ppo": ("verifiable",),
    "grpo": ("verifiable",),
    "rft": ("verifiable",),
}
# Stages that train towards every completion they read: an unpaired row labelled false is refused there.
IMITATING_STAGES = ("sft",)


@dataclasses.dataclass(frozen=True)
class ColumnsConfig:
    """Where each canonical column lives in the source, when its name differs (None = same name).

    A dataclass, not a free mapping, so that a typo (`columns.promt=question`) is an error that
    suggests the right key instead of a rename that silently never happens.
    """

    prompt: str | None = param(None, "Source column holding `prompt`.")
    completion: str | None = param(None, "Source column holding `completion`.")
    messages: str | None = param(None, "Source column holding `messages`.")
    chosen: str | None = param(None, "Source column holding `chosen`.")
    rejected: str | None = param(None, "Source column holding `rejected`.")
    margin: str | None = param(None, "Source column holding `margin`.")
    preference_prob: str | None = param(None, "Source column holding `preference_prob`.")
    responses: str | None = param(None, "Source column holding `responses`.")
    scores: str | None = param(None, "Source column holding `scores`.")
    answer: str | None = param(None, "Source column holding `answer`.")
    steps: str | None = param(None, "Source column holding `steps`.")
    completions: str | None = param(None, "Source column holding `completions`.")
    labels: str | None = param(None, "Source column holding `labels`.")
    label: str | None = param(None, "Source column holding `label`.")
    text: str | None = param(None, "Source column holding `text`.")
    tools: str | None = param(None, "Source column holding `tools`.")

    def __post_init__(self) -> None:
        self.renames()  # refused as the config is read, not once a model is loaded

    def renames(self) -> dict[str, str]:
        """{source column: canonical column} for every column that is renamed. One column renamed to two names
        (columns.prompt=q columns.answer=q) is refused: one of the two was silently lost."""
        renames: dict[str, str] = {}
        for f in dataclasses.fields(self):
            source = getattr(self, f.name)
            if source in (None, "", f.name):
                continue
            if source in renames:
                raise ConfigError(f"the column {source!r} is renamed to both {renames[source]} and {f.name}: a column "
                                  "becomes one of them (copy it in the data for both)", field=f"data.columns.{f.name}")
            renames[source] = f.name
        return renames


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = param("arith", "A .jsonl/.json/.parquet/.csv file, a `datasets` directory "
                                 "(save_to_disk) or a built-in task: arith, chain, multistep, multistep-long, sort.")
    format: str = param("auto", "Row format; auto = the first format the stage takes whose columns "
                                "the rows have.", choices=("auto", *FORMATS))
    columns: ColumnsConfig = section(ColumnsConfig, "Column renames (columns.prompt=question).")
    split: str = param("train", "Built-in task split, or the split of a `datasets` DatasetDict directory.")
    size: int = param(2000, "Rows generated from a built-in task.", ge=1)
    seed: int = param(0, "Seed of a built-in task's generator.", ge=0)
    limit: int = param(0, "Use only the first N rows of a file (0 = all).", ge=0)
    eval_split: float = param(0.0, "Share of the rows held out for evaluation, never trained on (0: none): drawn "
                                   "with data.seed before tokenisation, evaluated with the stage's own loss or "
                                   "rewards.", ge=0, lt=1)
    max_length: int = param(512, "Longest tokenised sequence (for verifiable rows: the longest prompt).", ge=2)
    truncation: str = param("drop", "Too-long rows: drop them, cut the prompt from the left (keeping BOS; a row "
                                    "whose cut would reach the completion is dropped; an RL prompt keeps the "
                                    "header that opens the answer), or stop with an error.",
                            choices=("drop", "truncate_left", "error"))
    loss_on: str = param("all", "Assistant turns trained in a multi-turn chat: all, or only the last.",
                         choices=("all", "last"))
    template: str = param("chat", "chat = the tokenizer's chat template; plain = BOS + prompt + completion "
                                  "+ EOS as raw text.", choices=("chat", "plain"))
    thinking: str = param("on", "on: reasoning rendered as a thinking block; off: reasoning dropped, an empty "
                                "block rendered, prompts end with it; fusion: per row, rows with reasoning "
                                "on and rows without off (one model, both modes).",
                          choices=("on", "off", "fusion"))
    batch_mode: str = param("padded", "padded: one sample per row; padding_free: the micro-batch's samples "
                                      "without padding (see padding_free_capacity); packed: rows filled "
                                      "best-fit decreasing up to max_length.",
                            choices=("padded", "padding_free", "packed"))
    padding_free_capacity: int = param(256, "padding_free rows: a micro-batch's samples (and the sequences of "
                                            "pairs and rankings) best-fit into rows of at most this many tokens (a "
                                            "longer sample, or a prompt with an answer, gets its own row), so "
                                            "attention stays short; of the widths up to it, the one that pads "
                                            "least; 0: the whole micro-batch in one row.", ge=0)
    share_prompts: bool = param(True, "padding_free comparisons (preference pairs, rankings, KTO's rows and their "
                                      "pairs): sequences that open with the same prompt lay it out once, each "
                                      "answer attending to that copy (the same logprobs, rewards and gradients "
                                      "up to float rounding; the prompt is computed once instead of once per "
                                      "answer; with dropout on, one dropout draw over the shared prompt). A "
                                      "group longer than padding_free_capacity is cut into pieces, each with its "
                                      "copy. Needs packed_attention=mask.")
    packed_attention: str = param("mask", "How packed rows keep samples apart: a 4-D block-diagonal mask "
                                          "(any attention kernel), or position_ids alone (flash/sdpa with "
                                          "use_cache=False).", choices=("mask", "position_ids"))
    num_proc: int = param(1, "Processes for tokenisation (datasets.map).", ge=1)
    cache_dir: str | None = param(None, "Arrow cache directory (None: the `datasets` default).")
