"""The trainer's side of the logprob bookkeeping: recompute the policy's logprobs of a Rollout.

The sampler's logprobs come from a KV-cached, token-by-token forward; the trainer's from one padded
forward over prompt + completion. On CPU fp32 they agree to rounding (mean |diff| ~1e-7); a larger
mismatch means the positions, the masks or the temperature differ between the two, and it biases
every importance ratio, so recipes report it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from posttrain.algos import entropy_from_logits, masked_mean, token_logprobs
from posttrain.rollout.base import Rollout


def policy_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float | None = None) -> Tensor:
    """Per-token logprobs [B, T] of the rollout's completions under `model`, 0 outside the response mask.

    One forward over [prompt | completion] with the rollout's attention mask and positions (counted
    from each row's first real token, as while sampling); only the T + 1 last positions' logits are
    computed. `temperature` defaults to the rollout's. Gradients flow unless the caller disables them.
    """
    return policy_logprobs_and_entropy(model, rollout, temperature, entropy=False)[0]


def policy_logprobs_and_entropy(model: torch.nn.Module, rollout: Rollout, temperature: float | None = None,
                                entropy: bool = True) -> tuple[Tensor, Tensor | None]:
    """`policy_logprobs` and, from the same logits, the policy's entropy [B, T] at every completion
    position (0 outside the response mask; no gradient: it is a statistic to log, not a loss term)."""
    width = rollout.completion_ids.shape[1]
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=rollout.position_ids, logits_to_keep=width + 1).logits
    return completion_logprobs(logits, rollout, temperature, entropy)


def completion_logprobs(logits: Tensor, rollout: Rollout, temperature: float | None = None, entropy: bool = True,
                        entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Logprobs [B, T] of the rollout's completion tokens and the entropy [B, T] at each completion position
    (both 0 outside the response mask), from the logits of the last T + 1 positions [B, T + 1, V]. The
    entropy has a gradient only with `entropy_grad` (an entropy bonus); otherwise it is a statistic."""
    logits = logits[:, :-1]
    temperature = rollout.temperature if temperature is None else temperature
    labels = rollout.completion_ids.masked_fill(rollout.response_mask == 0, -100)
    logprobs = token_logprobs(logits, labels, temperature)
    if not entropy:
        return logprobs, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        values = entropy_from_logits(logits if entropy_grad else logits.detach(), temperature)
    return logprobs, values * rollout.response_mask


def logprob_mismatch(sampler_logprobs: Tensor, trainer_logprobs: Tensor, response_mask: Tensor) -> Tensor:
    """mean over response tokens of |sampler - trainer| logprobs (a scalar; 0 for an empty mask).

    Shapes: all [B, T]. ~0 when sampler and trainer compute the same distribution; it grows with
    precision or kernel differences (bf16, vLLM) and when the policy moved since sampling.
    """
    return masked_mean((sampler_logprobs - trainer_logprobs.detach()).abs(), response_mask)
