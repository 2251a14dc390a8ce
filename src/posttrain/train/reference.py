"""The reference policy of DPO, KTO and the KL-regularised RL stages: a frozen copy, or the policy itself
with its LoRA adapter disabled — the base weights are the reference, so no second copy is kept.

The reference never trains, so the logprobs it gives a fixed dataset are fixed too: computing them
once before training (`precompute_sequence_logprobs`) removes one forward per step and lets the
reference model be freed. `offline_comparisons` sets this up for the offline preference stages.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor

from posttrain.config import ModelConfig, param
from posttrain.data.pipeline import Prepared
from posttrain.models import load_causal_lm
from posttrain.models.adapters import AdapterConfig, apply_adapter
from posttrain.models.device import model_device, move_to
from posttrain.models.io import check_same_vocabulary
from posttrain.models.likelihood import per_sequence_means, per_sequence_sums, response_logprobs
from posttrain.rollout import Rollout, policy_logprobs_and_entropy
from posttrain.rollout.recompute import PolicyForward
from posttrain.train.comparisons import comparison_step_source, join_rows, split_rows
from posttrain.train.engine import TrainConfig, forward_precision
from posttrain.train.progress import RunProgress
from posttrain.train.sources import ShuffledStepSource


@dataclasses.dataclass(frozen=True)
class ReferenceConfig:
    path: str | None = param(None, "Reference model directory (None: the starting model; with LoRA, the policy "
                                   "with its adapter disabled).")
    precompute: bool = param(True, "Compute the reference logprobs of every row once before training and free "
                                   "the reference (off: one reference forward per micro-batch).")
    batch_size: int = param(32, "Rows per forward when precomputing.", ge=1)


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, Tensor], average: bool = False) -> Tensor:
    """Sum (or, with `average`, mean) of the answer tokens' logprobs of every row: [N]."""
    logprobs, mask = response_logprobs(model, batch)
    return (per_sequence_means if average else per_sequence_sums)(logprobs, mask, batch)


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
        """`sequence_logprobs` under the reference [N], on its device (where the batch is copied)."""
        with self._active() as model:
            return sequence_logprobs(model, move_to(dict(batch), model_device(model)), average)

    @torch.no_grad()
    def rollout_logprobs(self, rollout: Rollout, forward: PolicyForward | None = None) -> Tensor:
        """Per-token logprobs [B, T] of a rollout's completions under the reference (RL's KL term), with the
        policy's `forward` (`policy_forward`: padded or padding-free; default padded), so that a reference
        equal to the policy gives exactly the policy's logprobs."""
        with self._active() as model:
            return (forward or policy_logprobs_and_entropy)(model, rollout, entropy=False)[0]


@torch.no_grad()
def precompute_sequence_logprobs(reference: Reference, prepared: Prepared, batch_size: int,
                                 average: bool = False, progress: RunProgress | None = None) -> list[Tensor]:
    """The reference's sequence logprobs of every row of `prepared`, in dataset order: one [N_i]
    tensor per row, in the row order of its collated batch (a pair: chosen then rejected; a ranking:
    best first). `progress` shows the pass as the phase "reference logprobs"."""
    dataset, rows = prepared.dataset, []
    display = progress or RunProgress(enabled=False)
    # The training batches' own layout (padding-free rows capped at data.padding_free_capacity by default):
    # the values are the same in any layout up to rounding, and the padding-free one computes no padding.
    with display.phase("reference logprobs", len(dataset)) as bar:
        for start in range(0, len(dataset), batch_size):
            samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = prepared.collator(samples)
            values = reference.sequence_logprobs(batch, average).cpu()  # kept for the epoch: in host memory
            rows += split_rows(values, batch)
            bar.advance(len(samples))
    return rows


def load_reference(reference: ReferenceConfig, model: ModelConfig) -> Reference | None:
    """The frozen reference at `reference.path`, or None (the starting policy is the reference)."""
    if not reference.path:
        return None
    # It scores the policy's token ids: with another tokenizer it read them as other tokens (logprobs that meant
    # nothing, silently, or an index error mid-run).
    check_same_vocabulary(model.path, reference.path, "reference.path", trust_remote_code=model.trust_remote_code,
                          remedy="Use a reference with the policy's tokenizer (the model the policy was trained "
                                 "from), or none (reference.path=null: the starting policy)")
    return Reference(load_causal_lm(reference.path, trust_remote_code=model.trust_remote_code,
                                    dtype=model.dtype, field="reference.path").eval().requires_grad_(False))


def cached_step_source(prepared: Prepared, train: TrainConfig, seed: int,
                       cached: list[torch.Tensor]) -> ShuffledStepSource:
    """Comparison steps whose micro-batches carry the precomputed reference logprobs as `ref_logprobs` [N]."""
    dataset, ranking = prepared.dataset, prepared.format == "ranking"

    def collate(indices: list[int]) -> dict:
        batch = prepared.collator([dataset[i] for i in indices])
        batch["ref_logprobs"] = join_rows([cached[i] for i in indices], ranking)
        return batch

    return comparison_step_source(prepared, train, seed, collate=collate)


def offline_comparisons(model: torch.nn.Module, prepared: Prepared, reference: ReferenceConfig, model_cfg: ModelConfig,
                        adapter: AdapterConfig, train: TrainConfig, seed: int, average: bool = False,
                        progress: RunProgress | None = None) -> tuple[torch.nn.Module, ShuffledStepSource,
                                                                      Reference | None]:
    """The policy (`adapter` applied to the starting `model`), the step source over the prepared rows, and the
    reference of the loss: None when its logprobs are precomputed and travel in the batches (`ref_logprobs`).

    Precomputed: before its first update the policy *is* the reference, so no copy is made (a resumed run
    recomputes the cache here, from the starting model, before its checkpoint is loaded). Live: `reference.path`,
    else a frozen copy of the starting model or — with an adapter — the policy with its adapter disabled.
    """
    frozen = load_reference(reference, model_cfg)
    if reference.precompute:
        with forward_precision(train, model):
            cached = precompute_sequence_logprobs(frozen or Reference(model), prepared, reference.batch_size, average,
                                                  progress)
        return apply_adapter(model, adapter), cached_step_source(prepared, train, seed, cached), None
    if frozen is None and adapter.method == "none":
        frozen = Reference.frozen_copy(model)
    policy = apply_adapter(model, adapter)
    frozen = frozen or Reference(policy, adapter_disabled=True)  # an adapter: the base weights, no copy
    return policy, comparison_step_source(prepared, train, seed), frozen
