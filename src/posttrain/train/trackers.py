"""Optional experiment trackers (TensorBoard, Weights & Biases) next to metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError


def check_trackers(tensorboard: bool, wandb: bool) -> None:
    """A ConfigError naming the extra to install for an enabled tracker whose package is missing: at start-up,
    before minutes of loading, data preparation and a first evaluation (the `Trackers` were built after them)."""
    import importlib.util

    for enabled, module in ((tensorboard, "tensorboard"), (wandb, "wandb")):
        if enabled and importlib.util.find_spec(module) is None:
            raise _not_installed(module)


def _not_installed(tracker: str) -> ConfigError:
    return ConfigError(f"{tracker} is not installed: pip install 'posttrain[tracking]'", field=f"run.{tracker}")


class Trackers:
    """Forwards every logged record to the trackers that the run enabled.

    Enabling a tracker whose package is not installed is a `ConfigError` naming the extra to install,
    rather than a silent no-op: a user who asked for curves should not discover later they are missing.
    """

    def __init__(self, run_dir: Path, run_name: str, tensorboard: bool, wandb: bool, config: dict[str, Any]) -> None:
        self._tb = None
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise _not_installed("tensorboard") from None
            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise _not_installed("wandb") from None
            self._wandb = wandb_module.init(project="posttrain", name=run_name, dir=str(run_dir), config=config)

    def log(self, record: dict[str, Any]) -> None:
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
