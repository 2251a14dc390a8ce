"""`posttrain demo`: the whole pipeline on the built-in model and tasks, offline, on a CPU.

Stages run in order; each writes its own run directory under `out`. A stage whose final model
already exists is reused unless `fresh` (so an interrupted demo picks up where it stopped).
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from posttrain import recipes


def run_demo(out: str = "runs/demo", quick: bool = False, fresh: bool = False,
             console: Console | None = None) -> dict[str, Path]:
    console = console or Console()
    out_dir = Path(out)
    produced: dict[str, Path] = {}
    table = Table("stage", "time", "result", "output", title="posttrain demo")

    final = out_dir / "pretrain" / "final"
    if final.is_dir() and not fresh:
        table.add_row("pretrain", "-", "reused", str(final))
    else:
        start = time.perf_counter()
        result = recipes.run_stage("pretrain", None, [f"run.out_dir={out_dir}", "run.name=pretrain",
                                                      "run.overwrite=true"], quick=quick)
        loss = f"held-out loss {result.summary['initial_eval_loss']:.2f} -> {result.summary['final_eval_loss']:.2f}"
        table.add_row("pretrain", f"{time.perf_counter() - start:.0f}s", loss, str(result.final_dir))
    produced["pretrain"] = final

    console.print(table)
    console.print(f"The pretrained model is in [bold]{final}[/] (Hugging Face format: "
                  "AutoModelForCausalLM.from_pretrained loads it). Next stages build on it.")
    return produced
