"""`posttrain` command line: one command per stage, plus demo, recipes and config."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from posttrain import recipes
from posttrain.console import run_console
from posttrain.errors import ConfigError, PosttrainError, storage_fault
from posttrain.train.signals import Interrupted, StoppedInTraining

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training for causal language models, offline on a CPU or scaled out on GPUs.")
console = run_console()

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


def _print_error(message: object) -> None:
    """`error: <message>` in red. The message is the user's own text (paths, values, column names): escaped, so
    that `[/x]` or `:x:` print as typed instead of being read as rich markup (a MarkupError) or an emoji code."""
    console.print(f"[bold red]error:[/] {escape(str(message))}", emoji=False)


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    """A user error, or a file the storage refused (a full disk, a read-only or unwritable directory: `storage_fault`),
    is one `error:` line and exit status 2, not a traceback."""
    try:
        yield
    except PosttrainError as err:
        _print_error(err)
        raise typer.Exit(2) from None
    except Exception as err:
        fault = storage_fault(err)
        if fault is None:
            raise
        _print_error(fault)
        raise typer.Exit(2) from None


def _quiet_libraries() -> None:
    # Offline by default: a local directory never needs the hub, and a typo must not start a download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from posttrain.train.entry import quiet_libraries

    quiet_libraries()  # for the whole command


def _run_stage(stage: str, recipe: str | None, overrides: list[str], quick: bool = False) -> None:
    """Run a stage; a user error, or a stop by SIGINT/SIGTERM at any point, is one message and a nonzero exit."""
    _quiet_libraries()
    try:
        with _one_line_errors():
            result = recipes.run_stage(stage, recipe, overrides, quick=quick)
    except Interrupted as stop:
        if not isinstance(stop, StoppedInTraining):  # (the trainer has said where it stopped and how to resume)
            console.print(f"[yellow]{stop}[/]")
        raise typer.Exit(128 + stop.signum) from None
    if os.environ.get("RANK", "0") != "0":  # under torchrun the run is one: rank 0 says where it is
        return
    console.print(f"[green]done[/] run directory: {result.run_dir}")
    if result.final_dir is not None:
        console.print(f"     final model: {result.final_dir}")


STAGE_HELP = {
    "pretrain": "Pretrain the offline tiny model and tokenizer on built-in synthetic text.",
    "sft": "Supervised fine-tuning (full, LoRA or prefix-tuning) on assistant tokens.",
    "rm": "Reward model (Bradley-Terry, Plackett-Luce) or, with kind=process on stepwise data (the `prm` recipe: "
          "posttrain rm prm), a process reward model.",
    "dpo": "Direct preference optimisation (sigmoid, ipo, hinge, robust; Plackett-Luce for rankings).",
    "kto": "Kahneman-Tversky optimisation on unpaired completions labelled desirable or undesirable.",
    "grpo": "GRPO: group-relative RL from verifiable rewards, with outcome or process (per-step) supervision.",
    "rejection": "Rejection sampling: best-of-N (or above a threshold) by graders / verifier / RM, SFT on the kept, "
                 "R rounds.",
    "ppo": "RLHF with PPO: actor, critic (separate or shared trunk), reference, reward model and/or verifier, GAE.",
    "rft": "Reinforcement fine-tuning: PPO (clipped surrogate, critic with the clipped value loss) against graders; "
           "mode=offline: grader-weighted likelihood on a fixed labelled set.",
}


def _register_stage(stage: str, doc: str) -> None:
    def command(args: RecipeArgs = None, quick: QuickOption = False) -> None:
        recipe, overrides = _split_recipe(args)
        _run_stage(stage, recipe, overrides, quick)

    # Escaped: the help is rich markup, where "[key.sub=value ...]" was taken for a tag and dropped
    command.__doc__ = (f"{doc}\n\n" + escape(f"Usage: posttrain {stage} [RECIPE] [key.sub=value ...]")
                       + f"\n\nEvery setting, with its default and doc: posttrain config {stage}")
    app.command(name=stage)(command)


for _stage, _doc in STAGE_HELP.items():
    _register_stage(_stage, _doc)


@app.command()
def resume(
    run_dir: Annotated[str, typer.Argument(help="Run directory, e.g. runs/sft-arith.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides (e.g. a longer "
                                                                  "train.max_steps).")] = None,
) -> None:
    """Continue an interrupted run from its last checkpoint, bitwise identically on CPU; continue a finished
    run by raising train.max_steps. The run is the one in RUN_DIR, wherever it was copied or moved to."""
    path = Path(run_dir).absolute()
    config_file = path / "config.yaml"
    try:
        if not config_file.is_file():
            from posttrain.train.run_dir import config_from_checkpoint

            raise PosttrainError("not a run directory (no config.yaml)" + config_from_checkpoint(path), file=run_dir)
        for override in overrides or []:
            if override.split("=", 1)[0] in RESUME_FIXED:
                raise PosttrainError(f"resume continues the run in {run_dir} as it is; copy the directory to "
                                     "continue it elsewhere", field=override.split("=", 1)[0])
        stage = recipes.find_recipe(str(config_file)).stage
        saved = _saved_config(config_file)
        _enter_workdir(saved.get("run") or {})
        _check_model_is_there(saved.get("model") or {}, overrides or [])
    except PosttrainError as err:
        _print_error(err)
        raise typer.Exit(2) from None
    # The directory, not the out_dir/name saved in its config (relative to wherever it was started), is the run.
    _run_stage(stage, str(config_file), [*(overrides or []), "run.resume=true", "run.overwrite=false",
                                         f"run.out_dir={path.parent}", f"run.name={path.name}",
                                         f"run.workdir={Path.cwd()}"])


RESUME_FIXED = ("run.resume", "run.overwrite", "run.out_dir", "run.name", "run.workdir")


def _saved_config(config_file: Path) -> dict:
    """The run's config.yaml as read (find_recipe has checked it; a section it lacks predates that section)."""
    import yaml

    try:
        saved = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, dict)} if isinstance(saved, dict) else {}


def _enter_workdir(run: dict) -> None:
    """Change into the directory the run was started in (`run.workdir` of its config.yaml), so that the relative
    paths of its config (model.path, data and reward files) mean what they meant then; where that directory is
    gone (the run was copied to another machine), they are taken from the current one, with a warning, and the
    current one is the run's workdir from then on."""
    workdir = run.get("workdir")
    if not workdir or Path(workdir) == Path.cwd():
        return
    if Path(workdir).is_dir():
        os.chdir(workdir)
        console.print(f"relative paths of the run's config resolve against {workdir}, where it was started")
    else:
        console.print(f"[yellow]warning:[/] the run was started in {workdir}, which does not exist here; its "
                      f"relative paths resolve against {Path.cwd()}", highlight=False)


def _check_model_is_there(model: dict, overrides: list[str]) -> None:
    """The model the run started from is read again on resuming (its reference, an adapter's base weights): one that
    moved is named with model.path=<its new place> (the checkpoint checks that it is the same model)."""
    path = model.get("path")
    if path and not any(o.startswith("model.path=") for o in overrides) and not Path(path).exists():
        raise ConfigError(f"{path}, the model the run started from, is not there (moved or deleted?): resume with "
                          "model.path=<where it is now>", field="model.path")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="Tiny budgets: checks every stage's wiring.")] = False,
    out: Annotated[str, typer.Option(help="Directory for all the demo's runs.")] = "runs/demo",
    fresh: Annotated[bool, typer.Option("--fresh", help="Recompute stages whose output exists.")] = False,
    stages: Annotated[str | None, typer.Option(help="Comma-separated subset of stages, e.g. sft.")] = None,
    jobs: Annotated[int, typer.Option(
        help="Stages run at once, each in its own process with its share of the cores (0: one per core, at most "
             "4; 1: one after the other). A stage's numbers depend on its thread count, so on one machine they "
             "reproduce with the same --jobs.")] = 0,
    threads: Annotated[int, typer.Option(hidden=True, help="Every stage's torch threads (0: from --jobs).")] = 0,
    stage_summary: Annotated[str | None, typer.Option(
        hidden=True, help="Write the one stage's summary here, not to demo.json (a parallel demo's stage).")] = None,
) -> None:
    """Run the whole pipeline end to end on the built-in model and tasks (no network needed)."""
    _quiet_libraries()
    from posttrain.demo import DemoStageFailed, DemoStopped, run_demo

    try:
        with _one_line_errors():
            run_demo(out=out, quick=quick, fresh=fresh, console=console, jobs=jobs, threads=threads,
                     stage_summary=stage_summary,
                     stages=[name.strip() for name in stages.split(",")] if stages else None)
    except DemoStageFailed as err:
        _print_error(err)
        raise typer.Exit(1) from None
    except DemoStopped as stop:
        console.print(f"[yellow]{stop}[/]", highlight=False)
        raise typer.Exit(130) from None
    except Interrupted as stop:
        console.print(f"[yellow]{stop}[/]")
        raise typer.Exit(128 + stop.signum) from None


@app.command("eval")
def evaluate(
    path: Annotated[str, typer.Argument(help="A run directory (runs/demo/grpo), its final/, a checkpoint "
                                             "(runs/demo/grpo/checkpoints/step-20), or a model directory.")],
    data: Annotated[str | None, typer.Option(help="Your own verifiable file (prompt rows, an `answer` column for the "
                                                  "`correct` check, an optional `category` column): .jsonl, .json, "
                                                  ".parquet, .csv or a `datasets` directory, instead of a built-in "
                                                  "task; scored with the run's rewards (or --reward). For a reward "
                                                  "model: your comparisons (preference or ranking rows; stepwise "
                                                  "rows for a process reward model). For a DPO or KTO run: rows of "
                                                  "its kind (preference or ranking; unpaired), scored with the "
                                                  "stage's loss against the run's reference.")] = None,
    task: Annotated[str | None, typer.Option(help="Built-in task (default: the run's eval task); with --data, the task "
                                                  "whose answer check `correct` uses (default: the run's reward.task).")
                    ] = None,
    problems: Annotated[int, typer.Option(min=1, help="Distinct held-out problems (with --data: the first N rows).")
                        ] = 500,
    samples: Annotated[int, typer.Option(min=0, help="Samples per problem at temperature 1 for pass@k, "
                                                     "rewards and KL (0: greedy accuracy only).")] = 8,
    k: Annotated[list[int] | None, typer.Option("--k", min=1, help="pass@k values (repeat the option).")] = None,
    reward: Annotated[list[str] | None, typer.Option(help="Reward functions / graders to average, weight 1 each "
                                                          "(repeat; default: correct and format, with --data the "
                                                          "run's reward.functions, else correct).")] = None,
    correct_by: Annotated[str | None, typer.Option(help="With --data: the reward function whose score decides "
                                                        "whether a completion is correct (default: `correct` when "
                                                        "used, else the weighted total).")] = None,
    threshold: Annotated[float, typer.Option(help="With --data: a completion is correct when that score reaches "
                                                  "this.")] = 1.0,
    grader: Annotated[str | None, typer.Option(help="Grader file or shipped grader name of the `grader` "
                                                    "reward (default: the run's reward.grader).")] = None,
    reference: Annotated[str | None, typer.Option(help="Model to measure KL against (default: the model "
                                                       "the run started from).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Generation budget (default: the run's).")
                              ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the held-out draw and of the samples.")] = 1234,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts (or rows a reward model scores) per forward; the "
                                                        "results do not depend on it.")] = 64,
    precision: Annotated[str, typer.Option(help="fp32, bf16 (autocast) or auto (bf16 where the hardware has it), "
                                                "as train.precision.")] = "fp32",
    template: Annotated[str | None, typer.Option(help="How prompts are written, as data.template: chat (the "
                                                      "tokenizer's template) or plain (a base model without one); "
                                                      "default: the run's.")] = None,
    thinking: Annotated[str | None, typer.Option(help="As data.thinking: on, off or fusion (default: the run's).")
                        ] = None,
    out: Annotated[str | None, typer.Option(help="JSON file of the results (default: eval.json in the run's or "
                                                 "model's directory; eval-<file name>.json with --data).")] = None,
) -> None:
    """Held-out accuracy (95% CI), pass@k, rewards, KL to the starting model, and the headroom per category (greedy
    and sampled accuracy, pass@k, share of problems with 0 < p < 1) of a built-in task or of your own --data file;
    reward models: pairwise accuracy."""
    _quiet_libraries()
    import dataclasses

    from posttrain.data.config import DataConfig
    from posttrain.eval.evaluate import EvalOptions, resolve_target
    from posttrain.eval.evaluate import evaluate as run_eval
    from posttrain.recipes.comparison_eval import comparison_stage, evaluate_comparisons

    data_settings = {name: value for name, value in (("template", template), ("thinking", thinking))
                     if value is not None}
    allowed = {field.name: field.metadata.get("choices") for field in dataclasses.fields(DataConfig)}
    for name, value in data_settings.items():
        if value not in allowed[name]:  # named as the option, not as the run's config.yaml
            _print_error(f"--{name}: {value!r} is not one of {', '.join(allowed[name])}")
            raise typer.Exit(2)
    if k and samples and max(k) > samples:  # pass@k of k samples out of fewer than k is not defined
        _print_error(f"--k: pass@{max(k)} needs at least {max(k)} samples per problem (--samples {samples})")
        raise typer.Exit(2)
    options = EvalOptions(task=task, problems=problems, samples=samples, pass_k=tuple(k or (1, samples or 1)),
                          rewards=tuple(reward) if reward else None, reference=reference,
                          max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, precision=precision,
                          data=data,
                          correct_by=correct_by, threshold=threshold, grader=grader, out=out,
                          data_settings=data_settings)
    with _one_line_errors():
        # A DPO or KTO run on a file of its own kind of rows: the stage's held-out loss against its reference
        target = resolve_target(path) if data is not None else None
        stage = comparison_stage(target, data) if target is not None and not target.is_reward_model else None
        result = evaluate_comparisons(target, options, stage) if stage else run_eval(path, options)
    table = Table("metric", "value", title=f"eval of {escape(result['model'])} on "
                                           f"{escape(str(result.get('data') or result.get('task')))}")
    for key, value in result.items():
        if key not in ("model", "task", "data", "categories", "per_problem"):
            table.add_row(key, escape(_format_value(value)))
    console.print(table)
    categories = result.get("categories")
    if categories:  # headroom: where sampling already finds answers that greedy decoding misses
        columns = list(categories["all"])
        headroom = Table("category", *(HEADROOM_HEADERS.get(c, c) for c in columns),
                         title="headroom per category (sampled at temperature 1)")
        for name, entry in categories.items():
            headroom.add_row(escape(name), *(_format_value(entry.get(c)) for c in columns))
        console.print(headroom)


HEADROOM_HEADERS = {"accuracy": "greedy", "sampled_accuracy": "sampled", "intermediate_share": "0<p<1"}


@app.command()
def report(
    run_dir: Annotated[str, typer.Argument(help="A demo directory (runs/demo) or a run directory.")],
) -> None:
    """Rebuild report.md and its plots from what a run (finished, or stopped before its end: what it logged so far)
    or the whole demo left on disk."""
    from posttrain.demo import STAGES
    from posttrain.eval.demo_report import write_demo_report
    from posttrain.eval.report import rebuild_training_report, write_unfinished_report
    from posttrain.train.run_dir import RunDir

    path = Path(run_dir)
    with _one_line_errors():  # a damaged metrics.jsonl or summary.json: the line and file, not a traceback
        if (path / "demo.json").is_file():
            written = write_demo_report(path, {s.name: s.builds_on for s in STAGES}, {s.name: s.task for s in STAGES})
        elif (path / "summary.json").is_file():
            written = rebuild_training_report(RunDir(path))
        elif (path / "metrics.jsonl").is_file():  # a run stopped before its end: what it logged, marked so
            written = write_unfinished_report(RunDir(path))
        else:
            _print_error(f"{run_dir}: neither a demo directory (demo.json) nor a run (summary.json, metrics.jsonl)")
            raise typer.Exit(2)
    console.print(f"[green]written[/] {written}")


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


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
        _print_error(err)
        raise typer.Exit(2) from None
    table = Table("key", "value", "doc", title=f"{found.name} ({found.stage})")
    for key, value, doc in describe(cfg):
        table.add_row(key, repr(value), doc)
    console.print(table)


data_app = typer.Typer(no_args_is_help=True, help="Look at data before training on it.")
app.add_typer(data_app, name="data")


@data_app.command("inspect")
def data_inspect(
    source: Annotated[str, typer.Argument(help="A .jsonl/.json/.parquet/.csv file, a `datasets` directory or a "
                                               "built-in task (arith, chain, multistep, multistep-long, sort).")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="data settings as key=value (max_length=256 truncation=truncate_left columns.prompt=question).",
        show_default=False)] = None,
    recipe: Annotated[str, typer.Option("--recipe", help="The stage (sft, rm, prm, dpo, kto, ppo, grpo, rft, "
                                                         "rejection) or recipe whose data settings to use.")] = "sft",
    model: Annotated[str | None, typer.Option(help="Model directory whose tokenizer and chat template to use "
                                                   "(default: runs/pretrain/final, else the built-in tokenizer).")
                     ] = None,
    samples: Annotated[int, typer.Option("--samples", "-n", min=0, help="Rendered samples to show.")] = 3,
) -> None:
    """Show rendered samples with the trained tokens highlighted, and token statistics."""
    _quiet_libraries()
    import dataclasses

    from posttrain.data.config import STAGE_FORMATS
    from posttrain.data.inspect import inspect_data
    from posttrain.models import load_tokenizer

    with _one_line_errors():
        # The data settings the stage would run with: its config class's defaults, the recipe's, the overrides
        # (the shipped sft recipe's max_length of 256, not DataConfig's 512).
        found = recipes.find_recipe(recipe)
        stage = recipe if recipe in STAGE_FORMATS else found.stage
        built = recipes.build_config(found, [f"data.{o.removeprefix('data.')}" for o in overrides or []])
        if not hasattr(built, "data"):
            raise ConfigError(f"the {recipe} recipe reads no data file (it has no data settings)", field="--recipe")
        cfg = dataclasses.replace(built.data, source=source)
        if model is None and (Path("runs/pretrain/final") / "config.json").is_file():
            model = "runs/pretrain/final"
        if model is not None:
            tokenizer = load_tokenizer(model)
        else:
            import itertools

            from posttrain.data.corpus import plain_text, synthetic_documents
            from posttrain.models import train_tokenizer

            console.print("[dim]no --model and no runs/pretrain/final: using the built-in tokenizer[/]")
            tokenizer = train_tokenizer(plain_text(d) for d in itertools.islice(synthetic_documents(seed=0), 3000))
        inspect_data(cfg, tokenizer, stage=stage, samples=samples, console=console)


def main() -> None:
    app(prog_name="posttrain")


if __name__ == "__main__":
    sys.exit(main())
