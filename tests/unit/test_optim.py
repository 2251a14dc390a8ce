"""The optimizer's parameter groups: weight decay on matrices only, and a peak lr of their own for named parameters."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import OptimConfig
from posttrain.train.optim import build_optimizer, build_scheduler


def test_parameters_under_a_prefix_get_their_own_lr_and_the_schedule_scales_every_group():
    model = torch.nn.ModuleDict({"body": torch.nn.Linear(3, 3), "head": torch.nn.Linear(3, 1)})
    model["body"].bias.requires_grad_(False)  # frozen: in no group
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2)
    optimizer = build_optimizer(model, cfg, {"head.": 5e-2})
    groups = {(g["lr"], g["weight_decay"]): g["params"] for g in optimizer.param_groups}
    assert groups == {(1e-3, 0.1): [model["body"].weight], (1e-3, 0.0): [],
                      (5e-2, 0.1): [model["head"].weight], (5e-2, 0.0): [model["head"].bias]}
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-4, 5e-4, 2.5e-2, 2.5e-2])  # warm-up 1/2
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-3, 5e-2, 5e-2])


def test_a_prefix_that_names_no_trainable_parameter_is_an_error():
    with pytest.raises(ValueError, match="critic"):
        build_optimizer(torch.nn.Linear(2, 2), OptimConfig(), {"critic.": 1e-2})
