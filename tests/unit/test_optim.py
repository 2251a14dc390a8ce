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


def test_a_checkpoint_whose_groups_were_keyed_by_lr_resumes_into_groups_by_prefix(tmp_path, tiny_model):
    """Up to 9066fc3 groups were keyed by lr value: a critic at optim.lr shared the two default groups. Such a
    checkpoint met an optimizer that gives the critic groups of its own ("a different number of parameter groups")
    and could not resume: its per-parameter state is rearranged, parameter by parameter."""
    import copy

    from posttrain.models.value import CRITIC_PREFIXES, ActorCritic
    from posttrain.train.checkpoint import load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = ActorCritic(copy.deepcopy(tiny_model))  # a value head on the policy's trunk: "value_head.*"
    cfg = OptimConfig(lr=1e-3, weight_decay=0.1, warmup_steps=2)
    trained = list(model.parameters())
    legacy = torch.optim.AdamW([{"params": [p for p in trained if p.ndim >= 2], "lr": 1e-3, "weight_decay": 0.1},
                                {"params": [p for p in trained if p.ndim < 2], "lr": 1e-3, "weight_decay": 0.0}],
                               lr=1e-3, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    legacy_scheduler = build_scheduler(legacy, cfg, total_steps=10)
    for _ in range(2):
        for p in trained:
            p.grad = torch.randn_like(p)
        legacy.step()
        legacy_scheduler.step()
    saved_state = {id(p): {k: v.clone() for k, v in legacy.state[p].items()} for p in trained}
    path = save_checkpoint(tmp_path, 2, modules={"model": model}, optimizers={"model": legacy},
                           schedulers={"model": legacy_scheduler}, trainer_state={}, config_text="", keep_last=1)

    optimizer = build_optimizer(model, cfg, {prefix: 1e-3 for prefix in CRITIC_PREFIXES})
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    assert len(optimizer.param_groups) == 4
    load_checkpoint(path, modules={"model": model}, optimizers={"model": optimizer}, schedulers={"model": scheduler})
    for p in trained:
        for key, value in saved_state[id(p)].items():
            assert torch.equal(optimizer.state[p][key], value), key
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.1, 0.0]
    assert scheduler.base_lrs == [1e-3] * 4 and scheduler.last_epoch == 2
    # The next step is the one the legacy optimizer would have taken.
    grads = [torch.randn_like(p) for p in trained]
    for p, g in zip(trained, grads, strict=True):
        p.grad = g.clone()
    before = [p.detach().clone() for p in trained]
    legacy.step()
    expected = [p.detach().clone() for p in trained]
    with torch.no_grad():
        for p, b in zip(trained, before, strict=True):
            p.copy_(b)
    for p, g in zip(trained, grads, strict=True):
        p.grad = g.clone()
    optimizer.step()
    for p, e in zip(trained, expected, strict=True):
        assert torch.equal(p.detach(), e)
