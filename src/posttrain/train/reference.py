"""The reference policy of DPO and of the KL-regularised RL stages: a frozen copy, or the policy itself
with its LoRA adapter disabled — the base weights are the reference, so no second copy is kept.

The reference never trains, so the logprobs it gives a fixed dataset are fixed too: computing them
once before training (`precompute_sequence_logprobs`) removes one forward per step and lets the
reference model be freed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor

from posttrain.data.pipeline import Prepared
from posttrain.rollout import Rollout, policy_logprobs_and_entropy
from posttrain.rollout.recompute import PolicyForward
from posttrain.train.comparisons import split_rows
from posttrain.train.forward import per_sequence_sums, response_logprobs


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """Sum (or, with `average`, mean) of the answer tokens' logprobs of every row: [N]."""
    logprobs, mask = response_logprobs(model, batch)
    total = per_sequence_sums(logprobs, mask, batch)
    return total / per_sequence_sums(mask, mask, batch).clamp(min=1) if average else total


@dataclasses.dataclass
class Reference:
    """A frozen reference model, or (`adapter_disabled`) the trained peft model with its adapter off."""

    model: torch.nn.Module
    adapter_disabled: bool = False

    @classmethod
    def frozen_copy(cls, model: torch.nn.Module) -> Reference:
        import copy

        reference = copy.deepcopy(model).eval()
        reference.requires_grad_(False)
        return cls(reference)

    @contextlib.contextmanager
    def _active(self) -> Iterator[torch.nn.Module]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter() if self.adapter_disabled else contextlib.nullcontext():
                yield self.model
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def sequence_logprobs(self, batch: dict[str, Tensor], average: bool = False) -> Tensor:
        with self._active() as model:
            return sequence_logprobs(model, batch, average)

    @torch.no_grad()
    def rollout_logprobs(self, rollout: Rollout, forward: PolicyForward | None = None) -> Tensor:
        """Per-token logprobs [B, T] of a rollout's completions under the reference (RL's KL term), with the
        policy's `forward` (`policy_forward`: padded or padding-free; default padded), so that a reference
        equal to the policy gives exactly the policy's logprobs."""
        with self._active() as model:
            return (forward or policy_logprobs_and_entropy)(model, rollout, entropy=False)[0]


@torch.no_grad()
def precompute_sequence_logprobs(reference: Reference, prepared: Prepared, batch_size: int,
                                 average: bool = False) -> list[Tensor]:
    """The reference's sequence logprobs of every row of `prepared`, in dataset order: one [N_i]
    tensor per row, in the row order of its collated batch (a pair: chosen then rejected; a ranking:
    best first)."""
    dataset, rows = prepared.dataset, []
    # The training batches' own layout (padding-free rows capped at data.padding_free_capacity by default):
    # the values are the same in any layout up to rounding, and the padding-free one computes no padding.
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = prepared.collator(samples)
        values = reference.sequence_logprobs(batch, average)
        rows += split_rows(values, batch)
    return rows
