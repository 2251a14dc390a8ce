"""`posttrain data inspect`: what a user checks before a long run.

A few samples rendered exactly as the model will see them, trained tokens highlighted (everything
else dim), and the token statistics: lengths, how many rows were truncated, how many dropped and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from posttrain.console import run_console
from posttrain.data.collate import pack_bfd
from posttrain.data.columns import column_values
from posttrain.data.config import IMITATING_STAGES, STAGE_FORMATS, DataConfig
from posttrain.data.sources import load_rows
from posttrain.data.tokenize import Tokenized, tokenize_rows
from posttrain.errors import ConfigError

TRAINED = "bold black on green3"
CONTEXT = "grey50"
STEP_END = "bold black on yellow3"


def inspect_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, stage: str = "sft", samples: int = 3,
                 console: Console | None = None) -> Tokenized:
    """Load and tokenise `cfg.source` as `stage` would, print `samples` rendered rows and the stats."""
    if stage not in STAGE_FORMATS:
        raise ConfigError(f"unknown stage {stage!r}: use one of {', '.join(STAGE_FORMATS)}", field="recipe")
    console = console or run_console()
    tokenized = tokenize_rows(load_rows(cfg, STAGE_FORMATS[stage], imitates=stage in IMITATING_STAGES), tokenizer,
                              cfg)
    console.print(f"[bold]{tokenized.name}[/] as [bold]{tokenized.format}[/] rows for {stage}   "
                  f"legend: [{TRAINED}] trained [/] [{CONTEXT}]context (not trained)[/]"
                  + (f" [{STEP_END}] step end [/]" if tokenized.format == "stepwise" else ""))
    for i in range(min(samples, len(tokenized.dataset))):
        console.print(_sample_panel(tokenized.dataset[i], tokenized.format, tokenizer))
    console.print(_stats_table(tokenized, cfg))
    return tokenized


def render_masked(tokenizer: PreTrainedTokenizerBase, input_ids: Sequence[int], mask: Sequence[int],
                  marks: Sequence[int] = ()) -> Text:
    """The decoded tokens, trained runs highlighted. Runs are decoded whole, so characters split
    across byte-level tokens still read correctly."""
    styles = [STEP_END if i in set(marks) else TRAINED if m else CONTEXT for i, m in enumerate(mask)]
    text = Text()
    start = 0
    for i in range(1, len(input_ids) + 1):
        if i == len(input_ids) or styles[i] != styles[start]:
            piece = tokenizer.decode(list(input_ids[start:i]), skip_special_tokens=False)
            if styles[start] == STEP_END:  # a separator is often a bare newline: make it visible
                piece = "↵" + piece if piece.endswith("\n") else piece + "↵"
            text.append(piece, style=styles[start])
            start = i
    return text


def _sample_panel(row: dict[str, Any], fmt: str, tokenizer: PreTrainedTokenizerBase) -> Panel:
    title = f"line {row['line']} · {row['length']} tokens"
    if fmt == "preference":
        margin = f" · margin {row['margin']}" if row.get("margin") is not None else ""
        body: Any = Group(Text("chosen", style="bold"),
                          render_masked(tokenizer, row["chosen_input_ids"], row["chosen_response_mask"]),
                          Text("rejected", style="bold"),
                          render_masked(tokenizer, row["rejected_input_ids"], row["rejected_response_mask"]))
        title += margin
    elif fmt == "ranking":
        scores = row.get("scores")
        parts = []
        for k, (ids, mask) in enumerate(zip(row["ranked_input_ids"], row["ranked_response_mask"], strict=True)):
            score = f" (score {scores[k]:g})" if scores else ""
            parts += [Text(f"rank {k + 1}{score}", style="bold"), render_masked(tokenizer, ids, mask)]
        body = Group(*parts)
    elif fmt == "verifiable":
        steps = f"\nsteps: {', '.join(row['steps'])}" if row.get("steps") else ""
        body = Group(render_masked(tokenizer, row["prompt_input_ids"], [0] * len(row["prompt_input_ids"])),
                     Text(f"answer: {row['answer'] if row['answer'] is not None else '(none: prompt only)'}{steps}",
                          style="bold"))
    elif fmt == "stepwise":
        labels = " ".join("✓" if label >= 0.5 else "✗" for label in row["step_labels"])
        body = Group(render_masked(tokenizer, row["input_ids"], row["response_mask"], row["step_ends"]),
                     Text(f"step labels: {labels}", style="bold"))
    elif fmt == "unpaired":
        body = Group(render_masked(tokenizer, row["input_ids"], row["response_mask"]),
                     Text("mismatched pair (KTO's reference point)", style="bold"),
                     render_masked(tokenizer, row["kl_input_ids"], row["kl_response_mask"]))
        title += " · desirable" if row["label"] else " · undesirable"
    else:
        body = render_masked(tokenizer, row["input_ids"], row["response_mask"])
    return Panel(body, title=title, title_align="left")


def _stats_table(tokenized: Tokenized, cfg: DataConfig) -> Table:
    s = tokenized.stats
    table = Table("token statistics", "value", title=f"max_length {cfg.max_length}, truncation {cfg.truncation}")
    table.add_row("rows read", str(s.rows))
    table.add_row("rows kept", str(s.kept))
    table.add_row("truncated (prompt cut from the left)", str(s.truncated))
    table.add_row("dropped: longer than max_length", _flag(s.dropped_too_long))
    table.add_row("dropped: no trained token left", _flag(s.dropped_no_completion))
    table.add_row("length min / mean / p50 / p95 / max",
                  f"{s.length_min} / {s.length_mean:.1f} / {s.length_p50:g} / {s.length_p95:g} / {s.length_max}")
    if s.truncated or s.dropped_too_long:  # the kept rows' lengths say nothing of how long the others were
        table.add_row("length before max_length: p95 / max", f"{s.original_p95:g} / {s.original_max}")
    if tokenized.format != "verifiable":
        per_row = s.response_tokens / max(s.kept, 1)
        table.add_row("trained tokens (total, per row)", f"{s.response_tokens} ({per_row:.1f})")
    if cfg.batch_mode == "packed" and tokenized.format in ("completion", "messages") and s.kept:
        lengths = column_values(tokenized.dataset, "length")
        bins = pack_bfd(lengths, cfg.max_length)
        table.add_row("packed rows (fill)", f"{len(bins)} ({sum(lengths) / (len(bins) * cfg.max_length):.1%})")
    return table


def _flag(count: int) -> str:
    return f"[bold red]{count}[/]" if count else "0"
