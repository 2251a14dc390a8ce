"""What every stage's `main(cfg)` does around its own work (the `stage_main` decorator).

The CLI runs one stage per process, but the Python API runs them in the user's process: a notebook, or a
script that runs several. There a stage must leave the process as it found it, so that the next call (or the
user's own code) is not changed by it:
- the config is checked as `load_config` checks it, whether it was loaded or built directly
  (`dataclasses.replace`, a constructor): a bad value is a ConfigError naming its field, not a torch traceback
  after the run directory was made; a config of another stage is refused;
- torch's thread count and the global random generators (torch, numpy, `random`) are set for the run
  (`run.threads`, `run.seed`) and put back after;
- the run directory's lock is released (a later `posttrain resume` of it, from a shell, is not refused as if
  the run were still going);
- the child processes that ran the run's reward functions are stopped (an edited reward file is read anew by
  the next run, as a fresh process would; no idle child outlives the run);
- transformers' and datasets' progress bars and logs are quiet during the run, as on the command line, and as
  they were after.
One setting stays: with glibc, the Trainer's malloc thresholds that keep freed memory for reuse (`train.allocator`;
`POSTTRAIN_MALLOC_TUNING=0` leaves malloc alone). They change no result, and glibc cannot report the old ones.
A stop by Ctrl-C or SIGTERM inside the training loop saves a checkpoint and raises `StoppedInTraining` (a
KeyboardInterrupt) to the caller, as any interrupted Python call does.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

from posttrain.config import check_config_object
from posttrain.errors import ConfigError
from posttrain.rewards.function_process import user_function_processes_closed
from posttrain.rewards.user_functions import import_reward_function
from posttrain.train.run_dir import run_locks_released
from posttrain.train.seed import seed_everything, threads_for

Main = TypeVar("Main", bound=Callable[..., Any])


def stage_main(config_class: type) -> Callable[[Main], Main]:
    """Decorate a stage's `main(cfg)`: see the module's docstring."""

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def run(cfg: Any) -> Any:
            if type(cfg) is not config_class:  # (a subclass is another stage's: RFTConfig is a PPOConfig)
                raise ConfigError(f"{main.__module__}.main takes its stage's config, {config_class.__name__}, not "
                                  f"{type(cfg).__name__} (build it with load_config({config_class.__name__}, ...))")
            cfg = check_config_object(cfg)
            restore_libraries = quiet_libraries()
            try:
                with _process_state_kept(cfg.run.threads), _run_resources_released():
                    seed_everything(cfg.run.seed)
                    return main(cfg)
            finally:
                restore_libraries()

        return run  # type: ignore[return-value]

    return decorate


@contextlib.contextmanager
def _process_state_kept(threads: int) -> Iterator[None]:
    """torch on `threads` threads for the block; the thread count and the global RNGs as they were after."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with threads_for(threads):
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _run_resources_released() -> Iterator[None]:
    """Release what the run took that outlives it in the process: run locks, reward-function children, and the
    reward functions imported into this process."""
    with run_locks_released(), user_function_processes_closed():  # the lock goes whatever stopping a child raised
        try:
            yield
        finally:
            import_reward_function.cache_clear()  # an in-process function (`__main__:fn`, in_process) is read anew


def quiet_libraries() -> Callable[[], None]:
    """transformers' and datasets' progress bars and info logs off (posttrain shows its own progress; `datasets`'
    bars come back where it shows them, `RunProgress.library_bars`); returns what puts them back as they were."""
    import datasets
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    data_verbosity, data_bars = datasets.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()

    def restore() -> None:
        hf_logging.set_verbosity(verbosity)
        datasets.logging.set_verbosity(data_verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if data_bars:
            datasets.enable_progress_bars()

    return restore
