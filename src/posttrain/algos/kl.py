"""Per-token KL estimators and the KL-coefficient controllers of RLHF.

The estimators follow Schulman, "Approximating KL Divergence" (2020): with tokens sampled from
the policy pi and log r = log pi_ref(x) - log pi(x),

    k1 = -log r                      unbiased, high variance, can be negative
    k2 = (log r)^2 / 2               biased, low variance, >= 0
    k3 = (r - 1) - log r             unbiased, low variance, >= 0   (used by GRPO)

all estimate KL(pi || pi_ref) = E_pi[log pi - log pi_ref].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

KL_KINDS = ("k1", "k2", "k3", "abs")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the logprobs of sampled tokens.

    With d = logprobs - ref_logprobs:
        k1  = d
        k2  = d^2 / 2
        k3  = exp(-d) - (-d) - 1 = expm1(-d) + d
        abs = |d|

    k3 is computed with ``expm1``: ``exp(-d) - 1`` cancels catastrophically for small d, while
    ``expm1(-d) + d`` is accurate near 0, exactly 0 at d = 0 and, since expm1(x) >= x holds in
    floating point as well, never negative. No mask is applied: the caller aggregates over
    ``response_mask``.

    Shapes: logprobs, ref_logprobs [B, T] -> [B, T].
    Source: Schulman (2020), "Approximating KL Divergence"; k1 in the reward is the RLHF penalty of
    Ziegler et al. (2019, §2.2); k3 in the loss is GRPO (Shao et al. 2024, "DeepSeekMath", eq. 4).
    """
    diff = logprobs - ref_logprobs
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff.square()
    if kind == "k3":
        return torch.expm1(-diff) + diff
    if kind == "abs":
        return diff.abs()
    raise ValueError(f"unknown KL estimator {kind!r}; allowed: {', '.join(KL_KINDS)}")


class FixedKLController:
    """A constant KL coefficient beta: ``update`` leaves it unchanged.

    Source: Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", §2.2.
    """

    def __init__(self, beta: float) -> None:
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Return beta unchanged (the arguments exist so both controllers are interchangeable)."""
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        """The controller state for a checkpoint (exact resume needs beta)."""
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.beta = float(state["beta"])


class AdaptiveKLController:
    """KL coefficient that steers the measured KL towards a target.

    e    = clip(KL / target - 1, -0.2, 0.2)
    beta <- beta * (1 + e * n_steps / horizon)

    ``current_kl`` is the mean per-sequence KL of the batch just collected, ``n_steps`` the
    number of samples (episodes) in it; ``horizon`` sets how fast beta moves (in samples).

    Source: Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", §2.2.
    """

    def __init__(self, beta: float, target: float, horizon: float) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.beta = float(beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one proportional update and return the new beta."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        """The controller state for a checkpoint (exact resume needs beta)."""
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by ``state_dict``."""
        self.beta = float(state["beta"])
