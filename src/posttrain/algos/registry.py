"""Registries of the variants a recipe picks by name from its config.

Two families, each with one signature:

* advantage estimators: ``fn(inputs: AdvantageInputs, *, gamma, lam, eps) -> Advantages``
* policy losses:        ``fn(logprobs, old_logprobs, advantages, response_mask, *, clip_low,
  clip_high, dual_clip, agg, normaliser, max_length) -> PolicyLossOutput`` (as ``policy_loss``)

A recipe looks a variant up with ``get_advantage_estimator(cfg.name)`` (or
``ADVANTAGE_ESTIMATORS[name]``); a user adds one with ``@register_advantage_estimator("name")``.
An unknown name raises ``UnknownNameError`` (a ValueError) listing the registered names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from torch import Tensor

from posttrain.algos.advantages import (
    Advantages,
    broadcast_to_tokens,
    gae,
    group_advantages,
    process_advantages,
    reinforce_baseline,
    rloo_advantages,
)
from posttrain.algos.logprobs import masked_sum
from posttrain.algos.losses import PolicyLossOutput, gspo_policy_loss, policy_loss

Fn = TypeVar("Fn", bound=Callable[..., object])


class UnknownNameError(ValueError, KeyError):
    """A name that is not registered. A ValueError for config validation, and a KeyError so the
    registries behave as mappings (``name in registry``, ``registry.get(name)``)."""

    def __str__(self) -> str:
        # KeyError would print the message quoted, as a repr.
        return str(self.args[0])


class Registry(Mapping[str, Fn], Generic[Fn]):
    """A name -> function mapping that can be extended with a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Fn] = {}

    def register(self, name: str) -> Callable[[Fn], Fn]:
        """Decorator that registers ``fn`` under ``name``; re-using a name is an error, but for the same function
        defined again (a notebook cell run again, a module reloaded: same module and name), which replaces it."""

        def decorate(fn: Fn) -> Fn:
            if name in self._entries and _origin(self._entries[name]) != _origin(fn):
                raise ValueError(f"{self.kind} {name!r} is already registered (by "
                                 f"{'.'.join(_origin(self._entries[name]))})")
            self._entries[name] = fn
            return fn

        return decorate

    def __getitem__(self, name: str) -> Fn:
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class AdvantageInputs(NamedTuple):
    """Everything an advantage estimator may read; each uses the fields it needs.

    rewards:       [B, T] token-level rewards (outcome score at the last response token, plus any
                   per-token terms such as -beta * KL); outcome estimators use the per-sequence
                   sum over ``response_mask``.
    response_mask: [B, T].
    values:        [B, T] critic values (GAE).
    group_ids:     [B] prompt id of each completion (group-baseline estimators).
    step_rewards, step_mask, step_ends: [B, S] process rewards (see ``process_advantages``);
    step_positions: [B, S] which step each is (a baseline per position), or None (one per group).
    """

    rewards: Tensor
    response_mask: Tensor
    values: Tensor | None = None
    group_ids: Tensor | None = None
    step_rewards: Tensor | None = None
    step_mask: Tensor | None = None
    step_ends: Tensor | None = None
    step_positions: Tensor | None = None


class AdvantageEstimator(Protocol):
    def __call__(self, inputs: AdvantageInputs, *, gamma: float, lam: float, eps: float) -> Advantages: ...


class PolicyLoss(Protocol):
    def __call__(
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        *,
        clip_low: float,
        clip_high: float | None,
        dual_clip: float | None,
        agg: str,
        normaliser: float | Tensor | None,
        max_length: int | None,
    ) -> PolicyLossOutput: ...


ADVANTAGE_ESTIMATORS: Registry[AdvantageEstimator] = Registry("advantage estimator")
POLICY_LOSSES: Registry[PolicyLoss] = Registry("policy loss")
register_advantage_estimator = ADVANTAGE_ESTIMATORS.register
register_policy_loss = POLICY_LOSSES.register


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The advantage estimator registered as ``name``; UnknownNameError lists the allowed names."""
    return ADVANTAGE_ESTIMATORS[name]


def get_policy_loss(name: str) -> PolicyLoss:
    """The policy loss registered as ``name``; UnknownNameError lists the allowed names."""
    return POLICY_LOSSES[name]


def clip_ranges(loss: PolicyLoss, clip_low: float | None, clip_high: float | None) -> tuple[float, float | None]:
    """The (clip_low, clip_high) a policy loss runs with: those given, or, for clip_low None, the loss's own defaults
    (PPO's 0.2 and clip_high = clip_low; GSPO's 3e-4 and 4e-4, whose sequence ratio a range of 0.2 would never clip),
    with clip_high if given; a loss without defaults gets PPO's."""
    if clip_low is not None:
        return clip_low, clip_high
    parameters = inspect.signature(loss).parameters

    def default(name: str, fallback: float | None) -> float | None:
        parameter = parameters.get(name)
        return fallback if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default

    return default("clip_low", 0.2), clip_high if clip_high is not None else default("clip_high", None)


def _require(inputs: AdvantageInputs, estimator: str, *fields: str) -> None:
    missing = [field for field in fields if getattr(inputs, field) is None]
    if missing:
        raise ValueError(f"advantage estimator {estimator!r} needs AdvantageInputs.{', '.join(missing)}")


def _outcome(inputs: AdvantageInputs, sequence_advantages: Tensor) -> Advantages:
    advantages = broadcast_to_tokens(sequence_advantages, inputs.response_mask)
    return Advantages(advantages=advantages, returns=advantages)


def _scores(inputs: AdvantageInputs) -> Tensor:
    return masked_sum(inputs.rewards, inputs.response_mask, dim=-1)


@register_advantage_estimator("gae")
def _gae(inputs: AdvantageInputs, *, gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6) -> Advantages:
    """PPO: ``gae`` on token-level rewards and critic values (eps unused)."""
    _require(inputs, "gae", "values")
    return gae(inputs.rewards, inputs.values, inputs.response_mask, gamma, lam)


def _group_estimator(name: str, scale: str) -> None:
    @register_advantage_estimator(name)
    def estimate(inputs: AdvantageInputs, *, gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6) -> Advantages:
        _require(inputs, name, "group_ids")
        return _outcome(inputs, group_advantages(_scores(inputs), inputs.group_ids, scale=scale, eps=eps))

    estimate.__doc__ = f"Outcome ``group_advantages`` with scale={scale!r} (gamma, lam unused)."


_group_estimator("grpo", "group")
_group_estimator("grpo_batch_std", "batch")
_group_estimator("dr_grpo", "none")


@register_advantage_estimator("grpo_process")
def _grpo_process(inputs: AdvantageInputs, *, gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6) -> Advantages:
    """Process supervision: ``process_advantages`` on the step rewards, gamma discounting per step, a baseline per
    step position where the inputs give positions (rewards, lam unused)."""
    _require(inputs, "grpo_process", "group_ids", "step_rewards", "step_mask", "step_ends")
    advantages = process_advantages(
        inputs.step_rewards,
        inputs.step_mask,
        inputs.step_ends,
        inputs.group_ids,
        inputs.response_mask,
        eps=eps,
        gamma=gamma,
        step_positions=inputs.step_positions,
    )
    return Advantages(advantages=advantages, returns=advantages)


@register_advantage_estimator("rloo")
def _rloo(inputs: AdvantageInputs, *, gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6) -> Advantages:
    """``rloo_advantages`` on the sequence scores (gamma, lam, eps unused)."""
    _require(inputs, "rloo", "group_ids")
    return _outcome(inputs, rloo_advantages(_scores(inputs), inputs.group_ids))


@register_advantage_estimator("reinforce_baseline")
def _reinforce(inputs: AdvantageInputs, *, gamma: float = 1.0, lam: float = 1.0, eps: float = 1e-6) -> Advantages:
    """``reinforce_baseline`` with the batch-mean baseline (gamma, lam, eps unused)."""
    return _outcome(inputs, reinforce_baseline(_scores(inputs)))


register_policy_loss("ppo")(policy_loss)
register_policy_loss("gspo")(gspo_policy_loss)


def _origin(fn: Any) -> tuple[str, str]:
    return getattr(fn, "__module__", "?") or "?", getattr(fn, "__qualname__", repr(fn))
