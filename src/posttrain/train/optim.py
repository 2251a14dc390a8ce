"""Optimizer and learning-rate schedule shared by every recipe."""

from __future__ import annotations

import math
from collections.abc import Mapping

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
