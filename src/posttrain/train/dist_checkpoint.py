"""Checkpoints of a run with several ranks: `torch.distributed.checkpoint` (DCP) for model and optimizer.

Layout of `checkpoints/step-N/` when WORLD_SIZE > 1 (a single process keeps `checkpoint.py`'s layout):
  dcp/                     model + optimizer state, written by every rank in parallel (each its own
                           shards under FSDP; replicated DDP tensors are written once)
  state.json               step, scheduler state, trainer and data state, the world size
  rng-<rank>.safetensors + rng-<rank>.json   each rank's RNG states (ranks sample differently)
  config.yaml, COMPLETE    as in a single-process checkpoint; COMPLETE (the manifest) is written last

Rank 0 creates `.tmp-step-N/`, every rank writes into it, and rank 0 renames it into place after a
barrier, so a crash mid-save leaves the previous checkpoint loadable. DCP can load into another
parallel layout (DDP <-> FSDP); RNG states are per rank, so a resume keeps the world size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from posttrain.errors import RunDirError
from posttrain.models.io import follow_umask
from posttrain.train.checkpoint import (
    _fsync_dir,
    _fsync_tree,
    _jsonable,
    _restore_rng,
    _rng_state,
    _write_json,
    prune_checkpoints,
    unwritten_message,
    write_failure,
    write_manifest,
)
from posttrain.train.dist import DistributedModel, all_reduce_max, barrier, context

DCP_DIR = "dcp"


def is_sharded_checkpoint(path: Path) -> bool:
    return (path / DCP_DIR).is_dir()


def check_world_size(path: Path, world_size: int) -> None:
    """A RunDirError unless the checkpoint at `path` was written by `world_size` processes: its RNG states (and a
    sharded one's layout) are per rank, so a run resumes as it ran."""
    written = json.loads((path / "state.json").read_text(encoding="utf-8"))["world_size"] \
        if is_sharded_checkpoint(path) else 1
    if written != world_size:
        how = f"torchrun --nproc_per_node={written}" if written > 1 else "one plain process (no torchrun)"
        raise RunDirError(f"{path.name} was written by {written} process{'es' if written > 1 else ''} and this run "
                          f"has {world_size}: resume it as it ran, with {how}", file=str(path.parent.parent),
                          field="run.resume")


def save_sharded_checkpoint(root: Path, step: int, *, model: DistributedModel, optimizer: torch.optim.Optimizer,
                            scheduler: Any, trainer_state: dict[str, Any], config_text: str, keep_last: int,
                            keep_before: int | None = None) -> Path:
    """Write `root/step-<step>/` from every rank (collective: all ranks call it) and prune old ones
    (`checkpoint.prune_checkpoints`)."""
    ctx = context()
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    failure: Exception | None = None
    if ctx.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except OSError as err:
            failure = err
    _all_written(failure, step, root, tmp)  # also the barrier before anyone writes into tmp
    model_state, optim_state = get_state_dict(model.root, optimizer)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp / DCP_DIR))
        rng_tensors, rng_json = _rng_state()
        save_file(rng_tensors, str(tmp / f"rng-{ctx.rank}.safetensors"))
        _write_json(tmp / f"rng-{ctx.rank}.json", rng_json)
    except (OSError, SafetensorError, CheckpointException) as err:  # DCP raises its exception on every rank alike
        failure = err
    _all_written(failure, step, root, tmp)
    if ctx.is_main:
        try:
            _write_json(tmp / "state.json", {"step": step, "world_size": ctx.world_size,
                                             "schedulers": {"model": _jsonable(scheduler.state_dict())},
                                             "trainer": trainer_state})
            (tmp / "config.yaml").write_text(config_text, encoding="utf-8")
            follow_umask(tmp)  # every rank's files are written by now (the barrier above)
            _fsync_tree(tmp)
            write_manifest(tmp, step)
            _fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            prune_checkpoints(root, keep_last, keep_before)
        except OSError as err:
            failure = err
    _all_written(failure, step, root, tmp)
    return final


def _all_written(failure: Exception | None, step: int, root: Path, tmp: Path) -> None:
    """A barrier that also agrees on whether every rank wrote its part: where one failed (a full disk, a quota, a
    directory turned read-only), every rank raises the single-process save's RunDirError, and the half-written
    copy is removed (the rank that failed alone would have died with a traceback, its peers with a lost connection,
    and the copy would have stayed on the full disk)."""
    if all_reduce_max(float(failure is not None)) == 0:
        return
    if context().is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()  # the copy is gone when any rank reports it
    reason = write_failure(failure) if failure is not None else "it failed on another rank"
    raise RunDirError(unwritten_message(root, step, reason), file=str(root))


def load_sharded_checkpoint(path: Path, *, model: DistributedModel, optimizer: torch.optim.Optimizer,
                            scheduler: Any) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNGs from `path`; return the trainer state."""
    ctx = context()
    check_world_size(path, ctx.world_size)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    model_state, optim_state = get_state_dict(model.root, optimizer)
    loaded = {"model": model_state, "optim": optim_state}
    dcp.load(loaded, checkpoint_id=str(path / DCP_DIR))
    set_state_dict(model.root, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    scheduler.load_state_dict(state["schedulers"]["model"])
    rng_json = json.loads((path / f"rng-{ctx.rank}.json").read_text(encoding="utf-8"))
    _restore_rng(load_file(str(path / f"rng-{ctx.rank}.safetensors")), rng_json)
    if dist.is_initialized():
        barrier()
    return {"step": state["step"], **state["trainer"]}
