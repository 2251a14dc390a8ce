"""The run directory `runs/<name>/`: resolved config, metrics, samples, checkpoints, final model.

A run's identity is its directory: `posttrain resume <dir>` continues the run that is in <dir>, wherever
it was copied or moved to. Nothing of a run is lost to a mistake or a stop on the way:

1. `check_run_dir`, before anything is loaded or written: the directory must be free (or `run.overwrite`),
   or hold a run that can be continued (`run.resume`: a complete checkpoint, steps left to train).
2. `prepare_run_dir`, once the model and data are ready: an old run being overwritten is moved aside to
   `.<name>.replaced`, and the new directory gets an `.unstarted` marker beside its config.
3. `RunDir.begin_training()`, called by the Trainer after its first step: the marker goes, and only now
   the replaced run is deleted.

A run that fails or is stopped before 3 is undone by `abandon_unstarted` (its directory deleted, the
replaced run moved back); a process killed outright leaves the marker, and the next `check_run_dir` of
that directory undoes it then.

One process at a time per run: `check_run_dir` takes an exclusive lock (`run_lock_file`, in the machine's
temporary directory), held until the process ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.config import RunConfig, to_yaml
from posttrain.errors import ConfigError, RunDirError
from posttrain.models.adapters import check_adapter, check_adapter_start
from posttrain.rewards.error_log import ERRORS_FILE
from posttrain.train import dist
from posttrain.train.checkpoint import latest_checkpoint
from posttrain.train.dist_checkpoint import check_world_size
from posttrain.train.metrics import replace_text
from posttrain.train.trackers import check_trackers

UNSTARTED = ".unstarted"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    def write_config(self, text: str) -> None:
        """config.yaml, written atomically: a resume killed here must still find the config it needs."""
        replace_text(self.config, text)

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        return self.path / "samples.jsonl"

    @property
    def reward_errors(self) -> Path:
        return self.path / ERRORS_FILE

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def begin_training(self) -> None:
        """The new run has trained a step: from now on it is the run, and the one it replaces is deleted."""
        marker = self.path / UNSTARTED
        if marker.exists():
            marker.unlink()
            shutil.rmtree(_sibling(self.path, "replaced"), ignore_errors=True)


def config_text(stage: str, cfg: Any) -> str:
    """The resolved config as YAML, headed by its stage so `posttrain resume <run>` can rebuild it, with the
    directory its relative paths mean what they say in (`run.workdir`)."""
    run = getattr(cfg, "run", None)
    if run is not None and run.workdir is None:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(run, workdir=os.getcwd()))
    return f"stage: {stage}\n" + to_yaml(cfg)


def run_path(run: RunConfig) -> Path:
    return Path(run.out_dir) / run.name


def check_run_name(run: RunConfig) -> None:
    """run.name names one directory inside run.out_dir: an empty name (an unset shell variable) or "." would make
    the run directory out_dir itself, which run.overwrite=true then replaces with every other run in it."""
    name = run.name
    if not name or name in (".", "..") or "/" in name or os.sep in name or Path(name).is_absolute():
        raise ConfigError(f"{name!r} is not a run name: give one directory name (no '/', not '.' or '..'); the run "
                          f"directory is run.out_dir/run.name", field="run.name")


def check_run_dir(run: RunConfig, cfg: Any) -> None:
    """Refuse, before anything is loaded or written, a run directory that cannot be used as asked.

    The only change on disk is undoing an earlier attempt that was killed before it trained a step. Under torchrun
    (every rank calls it, once the process group is joined) rank 0 checks and every rank raises its refusal, so
    that none goes on to wait in a collective for a rank that stopped.
    """
    check_run_name(run)
    world_size = dist.init_distributed().world_size
    train = getattr(cfg, "train", None)
    if train is not None and hasattr(train, "check"):
        train.check(world_size)
    model = getattr(cfg, "model", None)
    if getattr(model, "dtype", None) == "float16":
        # AdamW's state and update in float16, with its eps of 1e-8 below float16's resolution: the loss climbs
        raise ConfigError("float16 weights do not train without loss scaling, which posttrain does not do: use "
                          "model.dtype=bfloat16, or fp32 weights with train.precision=bf16", field="model.dtype")
    check_adapter_start(getattr(model, "path", None), getattr(cfg, "adapter", None))
    check_trackers(run.tensorboard, run.wandb)
    refusal = None
    if dist.is_main_process():
        try:
            _check_on_main(run, cfg, world_size)
        except RunDirError as err:
            refusal = err
    refusal = dist.from_main(refusal)
    if refusal is not None:
        raise refusal


def check_writable(path: Path, then: str) -> None:
    """A RunDirError now where files cannot be written at `path` (or, where it does not exist yet, in its nearest
    existing parent): a read-only file system, no permission. Checked by creating one, since a read-only mount is
    not in the mode bits; said before minutes of loading and work, not by the first write after them (a disk that
    fills later is `storage_fault`'s). `then`: what the user can do instead."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise RunDirError(f"cannot write here ({err.strerror or err}): {then}", file=str(existing)) from None


def _check_on_main(run: RunConfig, cfg: Any, world_size: int) -> None:
    path = run_path(run)
    hold_run_lock(path)
    check_writable(path, "resume a copy of the run on a writable disk" if run.resume
                   else "choose a writable run.out_dir")
    undone = _undo_unstarted(path)
    if run.resume and undone.left and not (path / "config.yaml").is_file():
        raise RunDirError(f"the run had been stopped before its first step, so there is nothing to resume: "
                          f"{undone.left}; start it again (without resuming)", file=str(path))
    if not run.resume:
        if path.exists() and any(path.iterdir()) and not run.overwrite:
            raise RunDirError("a run already exists here; pass run.overwrite=true to replace it or "
                              "run.resume=true to continue it", file=str(path))
        if path.exists() and any(path.iterdir()) and not (path / "config.yaml").is_file():
            raise RunDirError("is not a run directory (no config.yaml) and is not empty: run.overwrite=true replaces "
                              "runs only, never other files; choose another run.name or run.out_dir", file=str(path))
        return
    if not (path / "config.yaml").is_file():
        raise RunDirError("run.resume=true but there is no run to resume here (no config.yaml)"
                          + config_from_checkpoint(path), file=str(path))
    checkpoint = latest_checkpoint(path / "checkpoints")
    if checkpoint is None:
        raise RunDirError("no complete checkpoint to resume from (checkpoints/ is missing or empty); start the run "
                          "again with run.overwrite=true", file=str(path))
    max_steps, step = cfg.train.max_steps, int(checkpoint.name.removeprefix("step-"))
    if step > max_steps:
        raise RunDirError(f"the last checkpoint ({checkpoint.name}) is past train.max_steps={max_steps}; resume "
                          f"with train.max_steps={step} or more", file=str(path), field="train.max_steps")
    finished = finished_steps(path)
    if finished is not None and finished >= max_steps:
        raise RunDirError(f"this run has finished its {finished} steps; to train it further, resume it with a "
                          f"larger train.max_steps (it continues from {checkpoint.name})", file=str(path),
                          field="train.max_steps")
    check_world_size(checkpoint, world_size)


def config_from_checkpoint(path: Path) -> str:
    """For a run directory whose config.yaml is gone: where its last checkpoint keeps a copy (or nothing)."""
    checkpoint = latest_checkpoint(Path(path) / "checkpoints")
    if checkpoint is None or not (checkpoint / "config.yaml").is_file():
        return ""
    return (f"; its last checkpoint keeps the config it was trained with: copy {checkpoint / 'config.yaml'} to "
            f"{Path(path) / 'config.yaml'} to resume")


def prepare_run_dir(run: RunConfig, cfg: Any, stage: str, model: Any = None) -> RunDir:
    """Create (or reopen, when resuming) the run directory and write the resolved config into it.

    Call it once every check that can fail has passed (model, tokenizer, data): it is the first write. Given the
    loaded `model`, the checks that need it run here first (`cfg.adapter`'s LoRA targets). An
    existing run is never silently replaced: it takes `run.overwrite=true` (and is deleted only once the new
    run has trained a step) or `run.resume=true`. Under torchrun this joins the process group, and only rank 0
    touches the directory.
    """
    adapter = getattr(cfg, "adapter", None)
    if model is not None and adapter is not None:
        check_adapter(model, adapter)
    path = run_path(run)
    check_run_dir(run, cfg)  # every rank: the process group joined, rank 0's verdict shared
    if not dist.is_main_process():
        dist.barrier()  # rank 0 has cleared and created the directory
        return RunDir(path)
    if not run.resume:
        # Each rename is atomic, so a kill at any point leaves either the old run in place or the new one
        # marked unstarted with the old one aside: both are undone by the next `check_run_dir`.
        staging = _sibling(path, "new")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        (staging / UNSTARTED).write_text("", encoding="utf-8")
        if path.exists() and any(path.iterdir()):
            os.replace(path, _sibling(path, "replaced"))
        elif path.exists():
            path.rmdir()
        os.replace(staging, path)
    run_dir = RunDir(path)
    run_dir.write_config(config_text(stage, cfg))
    dist.barrier()
    return run_dir


# The run directories this process holds the lock of, with the open lock file (held until the process ends, or
# until the stage that took it returns: `run_locks_released`).
_HELD_LOCKS: dict[Path, Any] = {}


@contextlib.contextmanager
def run_locks_released() -> Iterator[None]:
    """Release the run locks taken within the block after it (a stage called from Python has ended: its run may be
    resumed or overwritten by another process now)."""
    before = set(_HELD_LOCKS)
    try:
        yield
    finally:
        for path in [path for path in _HELD_LOCKS if path not in before]:
            _HELD_LOCKS.pop(path).close()  # closing the file releases its flock


def run_lock_file(path: Path) -> Path:
    """The lock file of the run directory `path`: in the machine's temporary directory, keyed by the directory's
    resolved path, so that nothing is left in the user's runs/ (a failed start leaves nothing there)."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    return Path(tempfile.gettempdir()) / "posttrain-run-locks" / f"{digest}.lock"


def hold_run_lock(path: Path, what: str = "this run") -> None:
    """One process per run directory: an exclusive lock (`run_lock_file`), taken before anything of the run is
    touched and held until the process ends (or its stage returns, `run_locks_released`). A second process (a
    `posttrain resume` of a run still running, an overwrite under a live run) would otherwise truncate the metrics
    the first appends to, and both would rename the same checkpoints. Where no lock file can be written, nothing
    is locked."""
    path = path.resolve()  # one key however the directory is spelled (elsewhere/../runs/sft)
    if path in _HELD_LOCKS:
        return
    lock_file = run_lock_file(path)
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_file.open("a")
    except OSError:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirError(f"another process is running {what} now (it holds {lock_file}): wait for it to end, or "
                          "stop it, before running it again, resuming or overwriting it", file=str(path)) from None
    _HELD_LOCKS[path] = handle


@dataclass(frozen=True)
class Abandoned:
    """What `abandon_unstarted` left: a sentence for the user, and where the reward errors of a run undone before
    its first step went (`moved_errors`: from, to), for an error message that named them where they were."""

    left: str
    moved_errors: tuple[Path, Path] | None = None


def abandon_unstarted(run: RunConfig) -> Abandoned:
    """After a failure or a stop: undo the run if it had not trained a step yet; say what is left."""
    try:
        check_run_name(run)
    except ConfigError:
        return Abandoned("")  # refused before anything was touched
    path = run_path(run)
    if not dist.is_main_process():
        return Abandoned("")
    undone = _undo_unstarted(path)
    if undone.left:
        return undone
    if latest_checkpoint(path / "checkpoints") is not None:
        return Abandoned(f"resume with: {dist.resume_command(path)}")
    return Abandoned(f"{path} holds no checkpoint to resume from" if path.exists() else "nothing was written")


def _sibling(path: Path, kind: str) -> Path:
    """`.<name>.replaced` (an overwritten run until the new one trains), `.new`, `.abandoned` (transient)."""
    return path.parent / f".{path.name}.{kind}"


def _undo_unstarted(path: Path) -> Abandoned:
    """Delete a run directory that never trained a step and put back the run it was replacing.

    Safe to cut short anywhere (each step is one rename, or a deletion of what is no longer needed): a
    missing directory with a replaced one beside it means the replaced one is to be put back."""
    abandoned, aside = _sibling(path, "abandoned"), _sibling(path, "replaced")
    undone = (path / UNSTARTED).is_file()
    kept, moved = "", None
    if undone:
        shutil.rmtree(abandoned, ignore_errors=True)
        os.replace(path, abandoned)
        # A start stopped by its rewards' errors (a function broken on every row stops in the first round) sent the
        # user to its grader_errors.jsonl: that file outlives the run, beside it, where no rerun is refused for it.
        errors = abandoned / ERRORS_FILE
        if errors.is_file() and errors.stat().st_size:
            beside = path.parent / f"{path.name}.{ERRORS_FILE}"
            os.replace(errors, beside)
            kept, moved = f" but its reward errors, now in {beside}", (path / ERRORS_FILE, beside)
    restored = False
    if aside.exists():
        if path.exists():  # the new run had trained a step; deleting the old one was cut short
            shutil.rmtree(aside)
        else:
            os.replace(aside, path)
            restored = True
    shutil.rmtree(abandoned, ignore_errors=True)
    shutil.rmtree(_sibling(path, "new"), ignore_errors=True)
    if restored:
        return Abandoned(f"nothing of the new run was kept{kept}; the run it was to replace is back in {path}", moved)
    return Abandoned(f"nothing of the run was kept{kept}" if undone else "", moved)


def finished_steps(path: Path) -> int | None:
    """The steps a finished run trained (from its summary.json), or None if it has not finished."""
    try:
        steps = json.loads((path / "summary.json").read_text(encoding="utf-8"))["summary"]["steps"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return steps if isinstance(steps, int) else None


@dataclass(frozen=True)
class RunResult:
    """What every recipe's `main(cfg)` returns."""

    run_dir: Path
    final_dir: Path | None
    summary: dict[str, Any]
