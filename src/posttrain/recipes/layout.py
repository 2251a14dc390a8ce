"""Padded batches for a model that cannot take padding-free or packed ones.

Padding-free batches are every stage's default (packed ones a choice). A model that cannot keep the samples of one
row apart (`models.attention.packing_obstacle`: Bloom and MPT, whose positions come from the 2-D mask; hybrids with
linear-attention, convolution or state-space layers) would stop at its first forward; its stage runs on padded
batches instead, the same losses with the padding computed, says so once, and its saved config records it. So does a
stage with a prefix-tuning adapter.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, TypeVar

import torch

from posttrain.errors import ConfigError
from posttrain.models.attention import packing_obstacle, position_limit, rope_switch_length

logger = logging.getLogger("posttrain")
C = TypeVar("C")


def batches_for(cfg: C, model: torch.nn.Module) -> C:
    """`cfg` with data.batch_mode=padded and update.padding_free=false (those it has and sets otherwise) when `model`,
    or the adapter `cfg` puts on it, cannot take padding-free or packed batches; `cfg` itself when they can. And a
    ConfigError now, not an IndexError mid-run, when its sequences are longer than the model's positions
    (`check_position_limit`)."""
    check_position_limit(cfg, model)
    obstacle = packing_obstacle(model)
    if obstacle is None and getattr(getattr(cfg, "adapter", None), "method", None) == "prefix":
        # peft prepends the virtual tokens' keys to every row and widens a 2-D mask to match; a 4-D one it cannot.
        obstacle = "prefix-tuning's virtual tokens do not fit the block mask of padding-free and packed batches"
    if obstacle is None:
        return cfg
    changes: dict[str, Any] = {}
    data, update = getattr(cfg, "data", None), getattr(cfg, "update", None)
    if data is not None and data.batch_mode != "padded":
        changes["data"] = dataclasses.replace(data, batch_mode="padded")
    if update is not None and update.padding_free:
        changes["update"] = dataclasses.replace(update, padding_free=False)
    if changes and int(os.environ.get("RANK", "0")) == 0:  # once under torchrun (its group is not joined yet)
        names = {"data": "data.batch_mode=padded", "update": "update.padding_free=false"}
        settings = ", ".join(names[key] for key in changes)
        logger.warning("%s: this run uses padded batches (%s)", obstacle, settings)
    return dataclasses.replace(cfg, **changes)


def check_position_limit(cfg: Any, model: torch.nn.Module) -> None:
    """A model with a learned table of positions (GPT-2, OPT: `models.attention.position_limit`) cannot take a
    sequence longer than the table: data.max_length must fit, after prefix-tuning's virtual tokens (they take the
    first positions of every row)."""
    limit, data = position_limit(model), getattr(cfg, "data", None)
    adapter = getattr(cfg, "adapter", None)
    virtual = adapter.num_virtual_tokens if getattr(adapter, "method", None) == "prefix" else 0
    if limit is not None and data is not None and data.max_length + virtual > limit:
        after = f" after the adapter's {virtual} virtual tokens" if virtual else ""
        raise ConfigError(f"data.max_length={data.max_length} is longer than the {limit - virtual} positions this "
                          f"model has{after} (its table of learned positions): set data.max_length <= "
                          f"{limit - virtual}", field="data.max_length")


def check_sampled_length(model: torch.nn.Module, longest_prompt: int, max_new_tokens: int) -> None:
    """For a stage that samples: its longest prompt and sampling.max_new_tokens new tokens fit the model's table of
    learned positions (where it has one) and the length its rotary scaling is fixed up to (`rope_switch_length`),
    or a ConfigError before anything is sampled."""
    limit = position_limit(model)
    if limit is not None and longest_prompt + max_new_tokens > limit:
        raise ConfigError(f"the longest prompt ({longest_prompt} tokens) and sampling.max_new_tokens="
                          f"{max_new_tokens} new ones are longer than the {limit} positions this model has: make "
                          f"their sum <= {limit} (or shorten the prompts: data.max_length)",
                          field="sampling.max_new_tokens")
    switch = rope_switch_length(model)
    if switch is not None and longest_prompt + max_new_tokens > switch:
        raise ConfigError(f"the longest prompt ({longest_prompt} tokens) and sampling.max_new_tokens="
                          f"{max_new_tokens} new ones are longer than {switch} positions, past which this model's "
                          f"rotary scaling changes its frequencies with the longest sequence of a forward: the "
                          f"sampler and the trainer would score the same tokens differently. Make their sum <= "
                          f"{switch}", field="sampling.max_new_tokens")
    declared = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is None and isinstance(declared, int) and longest_prompt + max_new_tokens > declared \
            and int(os.environ.get("RANK", "0")) == 0:  # once, not once per torchrun rank
        # RoPE and ALiBi have no table to run out of, so nothing fails: the model is only past what it was trained on
        logger.warning("the longest prompt (%d tokens) and sampling.max_new_tokens=%d new ones are longer than the "
                       "%d positions this model was made for (max_position_embeddings): it samples and trains there "
                       "untested (shorter prompts, data.max_length, or fewer new tokens)", longest_prompt,
                       max_new_tokens, declared)
