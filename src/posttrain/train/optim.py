"""Optimizer and learning-rate schedule shared by every recipe."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from posttrain.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    lr_by_prefix: Mapping[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors).

    `lr_by_prefix` gives the parameters whose names start with a prefix their own peak lr (PPO's critic); the
    others get cfg.lr. The schedule multiplies every group's peak lr by the same factor."""
    lr_by_prefix = lr_by_prefix or {}
    lrs: dict[str | None, float] = {None: cfg.lr, **lr_by_prefix}
    # Grouped by prefix, not by lr value: the groups' layout must not depend on the rates (a resume with another
    # critic lr, or one equal to optim.lr, would otherwise meet a checkpoint with another number of groups).
    by_group: dict[tuple[str | None, bool], list[torch.nn.Parameter]] = {(None, True): [], (None, False): []}
    matched = False
    for name, param in model.named_parameters():
        if param.requires_grad:
            prefix = next((p for p in lr_by_prefix if name.startswith(p)), None)
            matched |= prefix is not None
            by_group.setdefault((prefix, param.ndim >= 2), []).append(param)
    if lr_by_prefix and not matched:  # a renamed or wrapped module would otherwise train at cfg.lr unnoticed
        raise ValueError(f"no trainable parameter's name starts with {', '.join(lr_by_prefix)}: their own learning "
                         "rate would apply to nothing")
    # The default lr's two groups first (decayed, then not), as before there were others: a checkpoint's
    # param_groups keep their order.
    groups = [{"params": params, "lr": lrs[prefix], "weight_decay": cfg.weight_decay if decayed else 0.0}
              for (prefix, decayed), params in by_group.items()]
    # The fused kernel is one pass over all parameters instead of a loop of small ops; torch has it
    # for CPU and CUDA fp32/bf16 tensors.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def from_lr_keyed_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         saved: dict[str, Any]) -> tuple[dict[str, Any], list[int] | None]:
    """Optimizer state `saved` by a posttrain whose groups were keyed by lr value (up to 9066fc3): a critic at
    optim.lr (critic.lr unset or equal) shared the two default groups — every trainable 2-D parameter in the model's
    order, then the others — where `optimizer` (`build_optimizer`) gives it groups of its own. Returns the state
    rearranged into `optimizer`'s groups, each with the hyperparameters of the saved group its parameters were in,
    and for each of its groups the saved group's index (to rearrange a scheduler's per-group lists alike); any
    other state as it is, with None."""
    groups, old_groups = optimizer.param_groups, saved["param_groups"]
    trained = [p for _, p in model.named_parameters() if p.requires_grad]
    legacy = [p for p in trained if p.ndim >= 2] + [p for p in trained if p.ndim < 2]  # the saved flat order
    if (len(old_groups) != 2 or len(groups) <= 2 or [len(g["params"]) for g in old_groups]
            != [sum(p.ndim >= 2 for p in trained), sum(p.ndim < 2 for p in trained)]
            or len(legacy) != sum(len(g["params"]) for g in groups)):
        return saved, None
    index = {id(p): i for i, p in enumerate(p for g in groups for p in g["params"])}
    state = {index[id(p)]: saved["state"][old] for old, p in enumerate(legacy) if old in saved["state"]}
    source = [0 if group["params"][0].ndim >= 2 else 1 for group in groups]  # each group's saved group
    rearranged = [{**old_groups[old], "params": [index[id(p)] for p in group["params"]]}
                  for group, old in zip(groups, source, strict=True)]
    return {"state": state, "param_groups": rearranged}, source


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warm-up, then the chosen decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
