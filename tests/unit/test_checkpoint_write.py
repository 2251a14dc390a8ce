"""What a failed checkpoint write says of its cause."""

from __future__ import annotations

import errno
import traceback

from torch.distributed.checkpoint.api import CheckpointException

from posttrain.train.checkpoint import write_failure


def test_a_sharded_save_that_failed_says_why_from_the_failed_ranks_own_error():
    """torch.distributed.checkpoint raises one CheckpointException whose text starts "CheckpointException
    ranks:dict_keys([0, 1])": a run under torchrun said that where one process said "File too large"."""
    too_large = OSError(errno.EFBIG, "File too large")
    failures = {1: (too_large, traceback.StackSummary()), 0: (too_large, traceback.StackSummary())}
    assert write_failure(CheckpointException("save failed", failures)) == "File too large, on rank 0"
    assert write_failure(OSError(errno.ENOSPC, "No space left on device")) == "No space left on device"


def test_the_resume_hint_under_torchrun_names_torchrun_with_as_many_processes(monkeypatch):
    """A run stopped under torchrun said `posttrain resume <dir>`, which is refused there (written by 2 processes)."""
    from posttrain.train.dist import resume_command

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command("runs/sft") == "torchrun --nproc_per_node=2 -m posttrain resume runs/sft"
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # two machines of 8
    assert resume_command("runs/sft") == "torchrun --nnodes=2 --nproc_per_node=8 -m posttrain resume runs/sft"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.delenv("WORLD_SIZE")
    assert resume_command("runs/sft") == "posttrain resume runs/sft"


def test_the_micro_batch_size_a_refusal_names_fits_every_rank():
    """batch_size=12 and micro_batch_size=5 on 2 ranks named 4, which the next check refused (12 is no multiple of
    4 x 2)."""
    import pytest

    from posttrain.errors import ConfigError
    from posttrain.train.engine import TrainConfig

    with pytest.raises(ConfigError, match=r"set train.micro_batch_size=3 "):
        TrainConfig(batch_size=12, micro_batch_size=5).check(world_size=2)
    TrainConfig(batch_size=12, micro_batch_size=3).check(world_size=2)
