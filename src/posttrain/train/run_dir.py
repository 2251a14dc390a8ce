"""The run directory `runs/<name>/`: resolved config, metrics, samples, checkpoints, final model."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import RunConfig, to_yaml
from posttrain.errors import RunDirError
from posttrain.train import dist


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def plots(self) -> Path:
        return self.path / "plots"


def config_text(stage: str, cfg: Any) -> str:
    """The resolved config as YAML, headed by its stage so `posttrain resume <run>` can rebuild it."""
    return f"stage: {stage}\n" + to_yaml(cfg)


def prepare_run_dir(run: RunConfig, cfg: Any, stage: str) -> RunDir:
    """Create (or reopen, when resuming) the run directory and write the resolved config into it.

    An existing run is never silently replaced: it takes `run.overwrite=true` or `run.resume=true`.
    Under torchrun this joins the process group, and only rank 0 touches the directory.
    """
    dist.init_distributed()
    path = Path(run.out_dir) / run.name
    if not dist.is_main_process():
        dist.barrier()  # rank 0 has checked, cleared and created the directory
        return RunDir(path)
    if run.resume:
        if not path.is_dir():
            raise RunDirError("run.resume=true but there is no run to resume here", file=str(path))
    elif path.exists() and any(path.iterdir()):
        if not run.overwrite:
            raise RunDirError("a run already exists here; pass run.overwrite=true to replace it or "
                              "run.resume=true to continue it", file=str(path))
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(path)
    run_dir.config.write_text(config_text(stage, cfg), encoding="utf-8")
    dist.barrier()
    return run_dir


@dataclass(frozen=True)
class RunResult:
    """What every recipe's `main(cfg)` returns."""

    run_dir: Path
    final_dir: Path | None
    summary: dict[str, Any]
