"""`posttrain` command line: one command per stage, plus demo, recipes and config."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from posttrain import recipes
from posttrain.errors import PosttrainError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training for causal language models, offline on a CPU or scaled out on GPUs.")
console = Console()

RecipeArgs = Annotated[list[str] | None, typer.Argument(
    help="Recipe name or path.yaml (default: the stage's own recipe), then key.sub=value overrides.",
    show_default=False)]
QuickOption = Annotated[bool, typer.Option("--quick", help="Apply the recipe's quick budgets (checks wiring).")]


def _split_recipe(args: list[str] | None) -> tuple[str | None, list[str]]:
    """The first argument is a recipe unless it is an override (contains '=')."""
    args = list(args or [])
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def _quiet_libraries() -> None:
    # Offline by default: a local directory never needs the hub, and a typo must not start a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _run_stage(stage: str, args: list[str] | None, quick: bool) -> None:
    _quiet_libraries()
    recipe, overrides = _split_recipe(args)
    try:
        result = recipes.run_stage(stage, recipe, overrides, quick=quick)
    except PosttrainError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    console.print(f"[green]done[/] run directory: {result.run_dir}")
    if result.final_dir is not None:
        console.print(f"     final model: {result.final_dir}")


@app.command()
def pretrain(args: RecipeArgs = None, quick: QuickOption = False) -> None:
    """Pretrain the offline tiny model and tokenizer on built-in synthetic text."""
    _run_stage("pretrain", args, quick)


@app.command()
def resume(
    run_dir: Annotated[str, typer.Argument(help="Run directory, e.g. runs/sft-arith.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides (e.g. a longer "
                                                                  "train.max_steps).")] = None,
) -> None:
    """Continue an interrupted run from its last checkpoint, bitwise identically on CPU."""
    from pathlib import Path

    _quiet_libraries()
    config_file = Path(run_dir) / "config.yaml"
    try:
        if not config_file.is_file():
            raise PosttrainError("not a run directory (no config.yaml)", file=run_dir)
        recipe = recipes.find_recipe(str(config_file))
        result = recipes.run_stage(recipe.stage, str(config_file), ["run.resume=true", *(overrides or [])])
    except PosttrainError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    console.print(f"[green]done[/] run directory: {result.run_dir}")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny budgets: checks every stage's wiring.")] = False,
    out: Annotated[str, typer.Option(help="Directory for all the demo's runs.")] = "runs/demo",
    fresh: Annotated[bool, typer.Option("--fresh", help="Recompute stages whose output exists.")] = False,
) -> None:
    """Run the whole pipeline end to end on the built-in model and tasks (no network needed)."""
    _quiet_libraries()
    from posttrain.demo import run_demo

    try:
        run_demo(out=out, quick=quick, fresh=fresh, console=console)
    except PosttrainError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None


@app.command("recipes")
def list_recipes() -> None:
    """List the shipped recipes."""
    table = Table("recipe", "stage", "description")
    for recipe in recipes.shipped_recipes():
        table.add_row(recipe.name, recipe.stage, recipe.description)
    console.print(table)


@app.command()
def config(
    recipe: Annotated[str, typer.Argument(help="Recipe name or path.yaml.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides.")] = None,
    quick: QuickOption = False,
) -> None:
    """Print a recipe's resolved config, with each field's doc."""
    from posttrain.config import describe

    try:
        found = recipes.find_recipe(recipe)
        cfg = recipes.build_config(found, list(overrides or []), quick)
    except PosttrainError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(2) from None
    table = Table("key", "value", "doc", title=f"{found.name} ({found.stage})")
    for key, value, doc in describe(cfg):
        table.add_row(key, repr(value), doc)
    console.print(table)


def main() -> None:
    app(prog_name="posttrain")


if __name__ == "__main__":
    sys.exit(main())
