"""Recipes: one readable module per stage, plus the shipped YAML recipes loadable by name.

A stage module exposes a frozen config dataclass and `main(cfg) -> RunResult`. A YAML recipe names
its stage, a one-line description, its settings, and optionally a `quick:` mapping of overrides
that `--quick` applies (small budgets that check the wiring, not the gains).
"""

from __future__ import annotations

import difflib
import importlib
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.config import load_config, read_yaml_with_lines
from posttrain.errors import ConfigError, PosttrainError, storage_fault
from posttrain.train.signals import Interrupted, StoppedInTraining, interrupt_on_signals

if TYPE_CHECKING:  # the run directory's module imports torch: `run_stage` imports it when a stage runs
    from posttrain.train.run_dir import RunResult

CONFIG_DIR = Path(__file__).parent / "configs"

# stage -> (module, config class). Modules are imported only when their stage is used.
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("posttrain.recipes.pretrain", "PretrainConfig"),
    "sft": ("posttrain.recipes.sft", "SFTConfig"),
    "rm": ("posttrain.recipes.rm", "RMConfig"),
    "dpo": ("posttrain.recipes.dpo", "DPOConfig"),
    "kto": ("posttrain.recipes.kto", "KTOConfig"),
    "grpo": ("posttrain.recipes.grpo", "GRPOConfig"),
    "rejection": ("posttrain.recipes.rejection", "RejectionConfig"),
    "ppo": ("posttrain.recipes.ppo", "PPOConfig"),
    "rft": ("posttrain.recipes.rft", "RFTConfig"),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    stage: str
    description: str
    quick: dict[str, Any]


def shipped_recipes() -> list[Recipe]:
    return [read_recipe(path) for path in sorted(CONFIG_DIR.glob("*.yaml"))]


def read_recipe(path: Path) -> Recipe:
    data, lines = read_yaml_with_lines(path)
    stage = data.get("stage")
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r} is not one of {', '.join(STAGES)}", file=str(path),
                          line=lines.get("stage"), field="stage")
    quick = data.get("quick") or {}
    if not isinstance(quick, dict):
        raise ConfigError("quick must be a mapping of key: value overrides", file=str(path),
                          line=lines.get("quick"), field="quick")
    return Recipe(name=path.stem, path=path, stage=stage, description=str(data.get("description", "")),
                  quick=quick)


def find_recipe(name_or_path: str) -> Recipe:
    """A shipped recipe by name (`pretrain`), or any YAML file by path."""
    path = Path(name_or_path)
    # A directory of that name (a run directory called `ppo` in the working directory) is not a recipe file: the
    # name still means the shipped recipe.
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ConfigError("recipe file not found", file=str(path))
        return read_recipe(path)
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return read_recipe(shipped)
    names = [p.stem for p in CONFIG_DIR.glob("*.yaml")]
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f" — did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"no recipe named {name_or_path!r}{hint} Shipped recipes: {', '.join(sorted(names))}")


def config_class(stage: str) -> type:
    module, name = STAGES[stage]
    return getattr(importlib.import_module(module), name)


def build_config(recipe: Recipe, overrides: list[str], quick: bool = False) -> Any:
    return load_config(config_class(recipe.stage), recipe.path, overrides,
                       extra=recipe.quick if quick else None)


def run_stage(stage: str, recipe_name: str | None, overrides: list[str], quick: bool = False) -> RunResult:
    """Resolve a recipe for `stage` and run it: what `posttrain <stage> ...` does."""
    recipe = find_recipe(recipe_name or stage)
    if recipe.stage != stage:
        raise ConfigError(f"recipe is for stage {recipe.stage!r}, not {stage!r}", file=str(recipe.path),
                          field="stage")
    cfg = build_config(recipe, overrides, quick)
    # Here, not at the top: the CLI imports this module for its commands, and `posttrain --help` should not pay
    # for torch (the run directory's checks import it).
    from posttrain.train.run_dir import run_locks_released

    with run_locks_released():  # the run's own, taken by check_run_dir before `main`, when the stage is over
        return _run_checked(stage, cfg)


def _run_checked(stage: str, cfg: Any) -> RunResult:
    from posttrain.train.run_dir import Abandoned, abandon_unstarted, check_run_dir

    check_run_dir(cfg.run, cfg)  # before minutes of loading and data preparation
    try:
        with interrupt_on_signals():
            return importlib.import_module(STAGES[stage][0]).main(cfg)
    except StoppedInTraining:  # the run trained and saved its checkpoint: nothing to undo
        raise
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        raise Interrupted(signum, abandon_unstarted(cfg.run).left) from None
    except BaseException as err:
        try:
            abandoned = abandon_unstarted(cfg.run)  # a run that never trained a step must not block its retry
        except OSError:  # the directory cannot be changed either (read-only): what stopped the run is the news
            abandoned = Abandoned("")
        if abandoned.moved_errors is not None:  # the error may send the user to a file that is now elsewhere
            print(f"({abandoned.left})", file=sys.stderr, flush=True)
            was, now = map(str, abandoned.moved_errors)
            if isinstance(err, PosttrainError) and was in err.message:
                raise type(err)(err.message.replace(was, now), file=err.file, line=err.line,
                                field=err.field) from None
        # A disk that refused a file (full, read-only, ...) after training began: one line, and what is left.
        fault = storage_fault(err, abandoned.left)
        if fault is not None:
            raise fault from err
        raise

